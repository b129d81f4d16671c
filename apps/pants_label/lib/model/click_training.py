"""Training the click model with simulated clicks (DeepEdit's recipe, on windows).

A training case is a scan and its label brought once to the click grid (``clicks.yaml
spacing_mm``) over the pancreas region and its neighbours (:func:`prepare_case`), with the
segmentation model's answer beside it when there is one. Each sample (:func:`make_sample`):

1. picks a class (``training.class_weights``: lesion, duct and the gland parts first);
2. starts from the segmentation model's answer, or from the truth corrupted (erased, shrunk,
   grown or shifted), so that the network learns to add, remove and move;
3. clicks like an annotator: the centre of the largest error (:func:`lib.model.clicks.simulate_click`);
4. for a random number of rounds up to ``training.rounds``, runs the network as it is now, merges
   its answer and clicks again at the largest remaining error, so that later clicks see the
   network's own mistakes (DeepEdit's simulated interaction);
5. answers the input and the class's true mask in a window around the clicks.

The same input encoding as infer: :func:`lib.model.clicks.heat_map`, the class-group channels,
the canonical orientation (:class:`lib.model.clicks.Orienter`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from lib.core.atomic import staged_dir
from lib.core.click_config import ClickConfig
from lib.core.labelmap import LabelMap
from lib.core.settings import SegmentationConfig
from lib.imaging.volume_io import Volume, load_volume, reorientation
from lib.model.checkpoint import Checkpoint
from lib.model.clicks import Orienter, Window, heat_map, merge_window, simulate_click, stack_channels
from lib.model.engine import Engine, plain_state
from lib.model.pancreas_stage import region_box
from lib.model.segmenter import Segmenter, normalize_hu, resample_image, resample_label, target_shape
from lib.model.training import cache_key

logger = logging.getLogger(__name__)


@dataclass
class ClickCase:
    """A scan on the click grid (stored axis order): normalised CT, truth, and a start label."""

    image: np.ndarray  # float32
    label: np.ndarray  # uint8
    start: np.ndarray | None  # uint8: the segmentation model's answer, or None
    orient: Orienter


def prepare_case(vol: Volume, label: np.ndarray, start: np.ndarray | None, lm: LabelMap,
                 seg_cfg: SegmentationConfig, cfg: ClickConfig, margin_mm: float = 60.0) -> ClickCase | None:
    """The region around the pancreas (``margin_mm`` more on each side) on the click grid."""
    spacing = tuple(float(s) for s in np.sqrt((vol.affine[:3, :3] ** 2).sum(axis=0)))
    box = region_box(label, lm, spacing, margin_mm)
    if box is None:
        return None
    shape = target_shape(tuple(s.stop - s.start for s in box), spacing, (cfg.spacing_mm,) * 3)
    shape = tuple(max(16, n) for n in shape)
    ct = normalize_hu(np.ascontiguousarray(vol.array[box]), seg_cfg)[None, None]
    image = resample_image(ct, shape)[0, 0].numpy()
    lab = resample_label(np.ascontiguousarray(label[box]), shape)
    st = resample_label(np.ascontiguousarray(start[box]), shape) if start is not None else None
    # every window of ``training.crop`` voxels fits: pad with air and background
    pad = [(0, max(0, cfg.training.crop - n)) for n in shape]
    if any(p[1] for p in pad):
        image = np.pad(image, pad, constant_values=-1.0)
        lab = np.pad(lab, pad)
        st = np.pad(st, pad) if st is not None else None
    return ClickCase(image, lab, st, Orienter(reorientation(vol.affine, seg_cfg.preprocessing.orientation)))


class ClickCaseCache:
    """Click cases on disk, memory-mapped while training (the segmentation trainer's
    :class:`lib.model.training.CaseCache` for the click grid), built by the same
    :func:`lib.model.training.build_cache`.

    A case's start label is the served segmentation model's answer, so the weights file is part of
    an entry's identity: a new segmentation version makes new entries, the same one reuses them.
    Scans with no pancreas region to click in are remembered as such.
    """

    def __init__(self, root: Path, cfg: ClickConfig, seg_cfg: SegmentationConfig, labelmap: LabelMap,
                 seg_preset: str | None = None, seg_model: Path | None = None) -> None:
        self.root = Path(root)
        self.cfg, self.seg_cfg, self.labelmap = cfg, seg_cfg, labelmap
        self.seg_preset, self.seg_model = seg_preset, Path(seg_model) if seg_model is not None else None
        self._segmenter: Segmenter | None = None

    def __getstate__(self) -> dict[str, Any]:  # sent to cache workers without the loaded network
        return {**self.__dict__, "_segmenter": None}

    def _folder(self, image: str, label: str) -> Path:
        settings = [self.cfg.model_dump_json(), self.seg_cfg.preprocessing.model_dump_json(), str(self.seg_preset)]
        return self.root / cache_key(settings, [image, label, self._served_model()])

    def _served_model(self) -> Path | None:
        """The segmentation weights that give the start labels, when there are any."""
        ok = self.seg_preset is not None and self.seg_model is not None and self.seg_model.exists()
        return self.seg_model if ok else None

    def has(self, image: str, label: str) -> bool:
        return (self._folder(image, label) / "done").exists()

    def get(self, image_id: str, image: str, label: str) -> ClickCase | None:
        folder = self._folder(image, label)
        if not (folder / "done").exists():
            self._build(folder, image, label)
        if json.loads((folder / "done").read_text()).get("empty"):
            return None
        start = folder / "start.npy"
        affine = np.load(folder / "affine.npy")
        return ClickCase(np.load(folder / "image.npy", mmap_mode="r"), np.load(folder / "label.npy", mmap_mode="r"),
                         np.load(start, mmap_mode="r") if start.exists() else None,
                         Orienter(reorientation(affine, self.seg_cfg.preprocessing.orientation)))

    def _start_label(self, vol: Volume) -> np.ndarray | None:
        model = self._served_model()
        if model is None:
            return None
        if self._segmenter is None:
            self._segmenter = Segmenter(self.seg_cfg, self.labelmap, self.seg_preset, model, "cpu")  # type: ignore[arg-type]
        return self._segmenter.segment(vol)[0]

    def _build(self, folder: Path, image: str, label: str) -> None:
        vol = load_volume(image)
        lab = np.asarray(load_volume(label, dtype=np.uint8).array)
        if lab.shape != vol.array.shape:
            raise ValueError(f"{label}: label shape {lab.shape} differs from image {vol.array.shape}")
        case = prepare_case(vol, lab, self._start_label(vol), self.labelmap, self.seg_cfg, self.cfg)
        with staged_dir(folder) as tmp:  # another process may build it first: then its copy is kept
            if case is not None:
                np.save(tmp / "image.npy", case.image.astype(np.float32))
                np.save(tmp / "label.npy", case.label.astype(np.uint8))
                if case.start is not None:
                    np.save(tmp / "start.npy", case.start.astype(np.uint8))
                np.save(tmp / "affine.npy", np.asarray(vol.affine, dtype=np.float64))
            (tmp / "done").write_text(json.dumps({"image": image, "label": label, "empty": case is None}))


def corrupt(mask: np.ndarray, rng: np.random.Generator, cfg: ClickConfig) -> np.ndarray:
    """The class as a careless model might have it: erased, shrunk, grown, shifted or left as it is."""
    t = cfg.training
    u = rng.random()
    if u < t.start_erase:
        return np.zeros_like(mask)
    u -= t.start_erase
    if u < t.start_shrink:
        return ndimage.binary_erosion(mask, iterations=int(rng.integers(1, 3)))
    u -= t.start_shrink
    if u < t.start_grow:
        return ndimage.binary_dilation(mask, iterations=int(rng.integers(1, 3)))
    u -= t.start_grow
    if u < t.start_shift:
        return np.roll(mask, tuple(int(v) for v in rng.integers(-3, 4, 3)), axis=(0, 1, 2))
    return mask.copy()


def _pick_class(label: np.ndarray, lm: LabelMap, cfg: ClickConfig, rng: np.random.Generator) -> int | None:
    present = [int(c) for c in np.unique(label) if c]
    if not present:
        return None
    w = np.array([cfg.training.class_weights.get(lm.id_to_name[c], cfg.training.other_weight) for c in present])
    if w.sum() <= 0:
        return None
    return present[int(rng.choice(len(present), p=w / w.sum()))]


def _window(points: Sequence[tuple[int, int, int]], shape: Sequence[int], crop: int,
            rng: np.random.Generator) -> Window:
    """A ``crop``-voxel window around the points (click-grid voxels), jittered a little: infer
    centres its window on the clicks too (:func:`lib.model.clicks.window_for`)."""
    pts = np.asarray(points).reshape(-1, 3)
    centre = (pts.min(axis=0) + pts.max(axis=0)) / 2.0 + rng.integers(-4, 5, 3)
    box = []
    for a in range(3):
        start = int(round(centre[a] - crop / 2))
        start = min(max(start, 0), max(shape[a] - crop, 0))
        box.append(slice(start, min(start + crop, shape[a])))
    return Window(tuple(box), (crop, crop, crop))  # type: ignore[arg-type]


def _input(case: ClickCase, cur: np.ndarray, cls: int, group: int, pos: list, neg: list, window: Window,
           cfg: ClickConfig) -> torch.Tensor:
    """The network input of one window (C, *grid), canonical orientation; points are click-grid voxels."""
    box = window.box
    img = torch.from_numpy(np.ascontiguousarray(case.image[box]))
    lab = torch.from_numpy(np.ascontiguousarray(cur[box]))
    x = stack_channels(img, (lab == cls).float(), ((lab != 0) & (lab != cls)).float(),
                       heat_map(pos, window, cfg.click_sigma), heat_map(neg, window, cfg.click_sigma), group, cfg)
    return case.orient.to_canonical(x)


def make_sample(case: ClickCase, lm: LabelMap, cfg: ClickConfig, rng: np.random.Generator,
                net: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One (input, target) pair, (C, crop, crop, crop) and (1, crop, crop, crop), canonical; None
    when the case holds no class."""
    cls = _pick_class(case.label, lm, cfg, rng)
    if cls is None:
        return None
    group = cfg.group_of(lm.id_to_name[cls])
    truth = case.label == cls
    if case.start is not None and rng.random() < 0.5:
        cur = case.start.copy()
    else:
        cur = merge_window(case.label, cls, corrupt(truth, rng, cfg), [], [], np.zeros(3, int))
    first = simulate_click(truth, cur == cls)
    if first is None:  # nothing wrong: a confirming click inside the class
        inside = np.argwhere(truth)
        first = (tuple(int(c) for c in inside[rng.integers(len(inside))]), True)
    pos: list = [first[0]] if first[1] else []
    neg: list = [] if first[1] else [first[0]]
    window = _window([first[0]], cur.shape, cfg.training.crop, rng)
    outside = np.ones(cur.shape, bool)
    outside[window.box] = False
    rounds = int(rng.integers(0, cfg.training.rounds + 1)) if net is not None else 0
    for _ in range(rounds):
        x = _input(case, cur, cls, group, pos, neg, window, cfg)
        with torch.no_grad():
            logits = net(x[None].to(next(net.parameters()).device))[0, 0].float().cpu()
        mask = (case.orient.from_canonical(logits) > 0).numpy()
        cur[window.box] = merge_window(cur[window.box], cls, mask, pos, neg, window.start)
        nxt = simulate_click(truth, cur == cls, exclude=outside)
        if nxt is None:
            break
        (pos if nxt[1] else neg).append(nxt[0])
    x = _input(case, cur, cls, group, pos, neg, window, cfg)
    y = torch.from_numpy(np.ascontiguousarray(truth[window.box])).float()[None]
    return x, case.orient.to_canonical(y)


def dice_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits)
    inter = (p * target).sum(dim=(1, 2, 3, 4))
    den = p.sum(dim=(1, 2, 3, 4)) + target.sum(dim=(1, 2, 3, 4))
    dice = 1 - (2 * inter + 1.0) / (den + 1.0)
    return dice.mean() + F.binary_cross_entropy_with_logits(logits, target)


__all__ = ["ClickCase", "corrupt", "dice_bce", "make_sample", "prepare_case"]


# ---- the loop -----------------------------------------------------------------------------------


def fit_clicks(cases: Sequence[ClickCase], lm: LabelMap, cfg: ClickConfig, steps: int, seed: int = 0,
               state: dict[str, torch.Tensor] | None = None, progress: bool = False, log_every: int = 50,
               device: str = "cpu", checkpoint: Checkpoint | None = None, checkpoint_every: int = 50,
               on_step: Callable[[int, list[float], dict[str, float]], None] | None = None,
               cpu_bf16: bool = False) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train the click network for ``steps`` batches on the shared :class:`lib.model.engine.Engine`;
    returns its weights and the loss per step.

    ``state``: weights to start from (the served click model); else from scratch with ``seed``.
    ``checkpoint``: every ``checkpoint_every`` steps the run's state is saved there, and a run that
    finds one goes on from it (drawing its samples from a new seed, as the segmentation trainer
    does). ``on_step(step, losses, timing)`` is called after each step. ``cpu_bf16``: bfloat16
    mixed precision on a CPU (:mod:`lib.model.precision`).
    """
    from lib.model.clicks import build_click_network

    torch.manual_seed(seed)
    net = build_click_network(cfg)
    if state is not None:
        net.load_state_dict(state)
    dev = torch.device(device)
    net.to(dev)
    t = cfg.training
    opt = torch.optim.AdamW(net.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=t.learning_rate, total_steps=max(steps, 1), pct_start=0.1)
    engine = Engine(net, opt, sched, dev, cpu_bf16=cpu_bf16)
    first, losses = 0, []
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        net.load_state_dict(saved["net"])
        engine.load_state_dict(saved)
        first, losses = int(saved["step"]), [float(v) for v in saved["losses"]]
        logger.info(f"click model: resuming at step {first}/{steps} ({checkpoint.path})")  # type: ignore[union-attr]
    rng = np.random.default_rng(seed + 1000 * first)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=first, desc="click model", unit="step")
    engine.timing.restart()
    for step in range(first, steps):
        net.eval()  # the simulated rounds run the network as it is now
        batch = []
        while len(batch) < t.batch_size:
            s = make_sample(cases[int(rng.integers(len(cases)))], lm, cfg, rng, net)
            if s is not None:
                batch.append(s)
        x = torch.stack([b[0] for b in batch])
        y = torch.stack([b[1] for b in batch])
        losses.append(float(engine.step(x, y, dice_bce)))
        done = step + 1
        if checkpoint is not None and done % checkpoint_every == 0 and done < steps:
            checkpoint.save({"step": done, "net": plain_state(net), **engine.state_dict(), "losses": losses})
            engine.timing.restart()
        if on_step is not None:
            on_step(done, losses, engine.timing.stats())
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        elif log_every and step % log_every == 0:
            logger.info(f"click model step {step}/{steps}: loss {np.mean(losses[-log_every:]):.4f}")
    if bar is not None:
        bar.close()
    return engine.weights(), losses


__all__ += ["ClickCaseCache", "fit_clicks"]
