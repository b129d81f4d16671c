"""Training data for full-size 28-class CT: a disk cache of preprocessed scans (built by parallel
worker processes), class-aware crops, and a validation split that never moves a scan once it is placed.

Scans are preprocessed once with exactly the infer pipeline (:func:`lib.model.segmenter.prepare`), stored
as ``.npy`` at the preset's spacing and memory-mapped while training, so RAM use does not grow with
the number of scans (MONAI's CacheDataset keeps every volume in memory).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from lib.core.atomic import staged_dir
from lib.core.labelmap import LabelMap
from lib.model.segmenter import prepare, resample_label
from lib.core.settings import AugmentConfig, Preset, SegmentationConfig
from lib.model.augment import random_transform, transformed_crop
from lib.model.lesion_synthesis import LesionSynthesizer
from lib.imaging.volume_io import load_volume

logger = logging.getLogger(__name__)

_MAX_CENTRES_PER_CLASS = 4000  # stored candidate crop centres per class and scan


@dataclass
class CachedCase:
    image_id: str
    image: np.ndarray  # (d, h, w) float16, memory-mapped
    label: np.ndarray  # (d, h, w) uint8, memory-mapped
    centres: dict[int, np.ndarray]  # class id -> (n, 3) voxel coordinates


def cache_key(settings: Sequence[str], files: Sequence[str | Path | None]) -> str:
    """A cache entry's name: the settings that shaped it and the identity (path, size, mtime) of the
    files it was made from; a changed file or setting makes a new entry. ``None``: no such file."""
    parts = list(settings)
    for p in files:
        if p is None:
            parts.append("-")
            continue
        st = os.stat(p)
        parts.append(f"{os.path.abspath(p)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def _key(image: str, label: str, preset: Preset, cfg: SegmentationConfig) -> str:
    # the input map is part of the key: a cache made under another HU map would train the wrong input
    return cache_key([preset.model_dump_json(), cfg.preprocessing.model_dump_json()], [image, label])


class CaseCache:
    """Preprocessed (image, label) pairs on disk, keyed by file identity and preset."""

    def __init__(self, root: Path, cfg: SegmentationConfig, preset: Preset, labelmap: LabelMap) -> None:
        self.root = Path(root)
        self.cfg, self.preset, self.labelmap = cfg, preset, labelmap

    def has(self, image: str, label: str) -> bool:
        return (self.root / _key(image, label, self.preset, self.cfg) / "done").exists()

    def get(self, image_id: str, image: str, label: str) -> CachedCase:
        folder = self.root / _key(image, label, self.preset, self.cfg)
        if not (folder / "done").exists():
            self._build(folder, image, label)
        img = np.load(folder / "image.npy", mmap_mode="r")
        lab = np.load(folder / "label.npy", mmap_mode="r")
        with np.load(folder / "centres.npz") as z:
            centres = {int(k): z[k] for k in z.files}
        return CachedCase(image_id, img, lab, centres)

    def _build(self, folder: Path, image: str, label: str) -> None:
        vol = load_volume(image)
        lab = load_volume(label, dtype=np.uint8)
        if lab.array.shape != vol.array.shape:
            raise ValueError(f"{label}: label shape {lab.array.shape} differs from image {vol.array.shape}")
        prep = prepare(vol, self.cfg, self.preset)
        small_shape = tuple(prep.image.shape[2:])
        lab_c = np.ascontiguousarray(prep.reorient.to_canonical(lab.array))
        small_lab = resample_label(lab_c, small_shape)  # type: ignore[arg-type]
        rng = np.random.default_rng(0)
        centres: dict[str, np.ndarray] = {}
        for cid in np.unique(small_lab):
            coords = np.argwhere(small_lab == cid)
            if len(coords) > _MAX_CENTRES_PER_CLASS:
                coords = coords[rng.choice(len(coords), _MAX_CENTRES_PER_CLASS, replace=False)]
            centres[str(int(cid))] = coords.astype(np.int16)
        with staged_dir(folder) as tmp:  # another process may build it first: then its copy is kept
            np.save(tmp / "image.npy", prep.image[0, 0].numpy().astype(np.float16))
            np.save(tmp / "label.npy", small_lab.astype(np.uint8))
            np.savez(tmp / "centres.npz", **centres)
            (tmp / "done").write_text(json.dumps({"image": image, "label": label}))


# ---- validation split ------------------------------------------------------------------------


def _unit_hash(seed: int, image_id: str) -> float:
    h = hashlib.sha1(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_train_val(
    image_ids: Sequence[str], centers: dict[str, str | None], fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """A validation split that stays fixed as labels arrive, stratified by center.

    A scan is in validation when its seeded hash falls below ``fraction``, so adding scans never
    moves an existing one between sets. Each center with at least two labelled scans keeps at
    least one validation scan (its lowest hash), and at least one scan always stays in training.
    """
    ids = sorted(set(image_ids))
    if len(ids) < 2:
        return ids, []
    val = {i for i in ids if _unit_hash(seed, i) < fraction}
    by_center: dict[str, list[str]] = {}
    for i in ids:
        by_center.setdefault(str(centers.get(i) or "unknown"), []).append(i)
    for members in by_center.values():
        if len(members) >= 2 and not val.intersection(members):
            val.add(min(members, key=lambda i: _unit_hash(seed, i)))
    if len(val) == len(ids):
        val.discard(max(val, key=lambda i: _unit_hash(seed, i)))
    return [i for i in ids if i not in val], [i for i in ids if i in val]


# ---- class-aware crops ------------------------------------------------------------------------


#: scan_first: a scan uniformly, then a class present in it by weight (a class's share of crops
#: follows its share of scans); class_first: a class by weight, then a scan that holds it (a lesion
#: in 1 scan of 10 is drawn as often as one in every scan).
CROP_ORDERS = ("scan_first", "class_first")


class CropSampler:
    """Draws (image, label) patches whose centres are chosen by class weight.

    Tiny structures (lesion, duct) cover <0.1% of a CT; uniform crops would almost never train them.
    """

    def __init__(
        self,
        cases: list[CachedCase],
        patch: tuple[int, int, int],
        class_weights: dict[int, float],
        background_weight: float,
        seed: int = 0,
        order: str = "scan_first",
        augment: AugmentConfig | None = None,
        synthesizer: LesionSynthesizer | None = None,
    ) -> None:
        if order not in CROP_ORDERS:
            raise ValueError(f"crop order {order!r}: expected one of {', '.join(CROP_ORDERS)}")
        self.cases, self.patch, self.order = cases, patch, order
        self.augment = augment  # random_transform draws nothing when its probability is 0
        self.synthesizer = synthesizer
        self.painted = 0  # crops that got a synthetic lesion
        self.class_weights, self.background_weight = class_weights, background_weight
        self.rng = np.random.default_rng(seed)
        # class_first: the scans that hold each class, so a class is drawn however few scans show it
        self._holders: dict[int, list[int]] = {}
        for k, case in enumerate(cases):
            for c, pts in case.centres.items():
                if c != 0 and len(pts):
                    self._holders.setdefault(c, []).append(k)
        self._classes = sorted(self._holders)

    def _draw(self) -> tuple[CachedCase, np.ndarray]:
        """One crop's scan and centre voxel."""
        if self.order == "scan_first":
            case = self._any_case()
            return case, self._voxel(case, self._pick([c for c in case.centres if c != 0 and len(case.centres[c])]))
        cls = self._pick(self._classes)  # over the labelled set, then a scan that holds it
        holders = self._holders.get(cls)
        case = self.cases[holders[int(self.rng.integers(len(holders)))]] if holders else self._any_case()
        return case, self._voxel(case, cls)

    def _any_case(self) -> CachedCase:
        return self.cases[int(self.rng.integers(len(self.cases)))]

    def _pick(self, ids: list[int]) -> int:
        """A class of ``ids`` by its weight, or -1 (background) by ``background_weight``."""
        weights = [self.class_weights.get(c, 1.0) for c in ids]
        if self.background_weight > 0:
            ids, weights = [*ids, -1], [*weights, self.background_weight]
        w = np.asarray(weights, dtype=np.float64)
        return ids[int(self.rng.choice(len(ids), p=w / w.sum()))] if w.sum() > 0 else -1

    def _voxel(self, case: CachedCase, cls: int) -> np.ndarray:
        """A voxel of class ``cls`` in ``case``; -1: any voxel."""
        if cls == -1:
            return np.array([self.rng.integers(0, s) for s in case.image.shape])
        pts = case.centres[cls]
        return pts[self.rng.integers(len(pts))].astype(np.int64)

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch: images (b, 1, *patch) float32 and labels (b, 1, *patch) int64."""
        x = torch.empty((batch_size, 1, *self.patch), dtype=torch.float32)
        y = torch.empty((batch_size, 1, *self.patch), dtype=torch.int64)
        xs, ys = x.numpy(), y.numpy()  # crops are written straight into the batch: no stacking copies
        for b in range(batch_size):
            case, centre = self._draw()
            matrix = random_transform(self.rng, self.augment) if self.augment else None
            if matrix is None:
                crop(case.image, case.label, centre, self.patch, out=(xs[b, 0], ys[b, 0]))
            else:
                transformed_crop(case.image, case.label, centre, self.patch, matrix, out=(xs[b, 0], ys[b, 0]))
            if self.synthesizer is not None and self.synthesizer.paint(self.rng, xs[b, 0], ys[b, 0]):
                self.painted += 1
            # Mild intensity jitter: centers differ in scanner calibration and noise.
            scale, shift = self.rng.uniform(0.9, 1.1), self.rng.uniform(-0.05, 0.05)
            xs[b, 0] *= scale
            xs[b, 0] += shift
        return x, y


class PrefetchSampler:
    """Batches of a :class:`CropSampler` made on a background thread while the network computes.

    The sampler's random generator is used by that one thread only, in order, so the batches are
    exactly those of calling ``sampler.sample`` in a loop: the same seed gives the same training.
    Crops read the memory-mapped cache (numpy releases the GIL for the copies); ``depth`` batches
    wait ready at most, so memory stays bounded. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, sampler: CropSampler, batch_size: int, depth: int = 2, pin_memory: bool = False) -> None:
        self.sampler, self.batch_size, self.pin_memory = sampler, batch_size, pin_memory
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="crop-prefetch", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                x, y = self.sampler.sample(self.batch_size)
                if self.pin_memory:  # page-locked: the copy to the GPU overlaps compute
                    x, y = x.pin_memory(), y.pin_memory()
                while not self._stop.is_set():
                    try:
                        self._queue.put((x, y), timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            self._queue.put(err)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise RuntimeError("preparing a training batch failed") from item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def __enter__(self) -> "PrefetchSampler":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def crop(
    image: np.ndarray,
    label: np.ndarray,
    centre: np.ndarray,
    patch: Sequence[int],
    out: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Patch around ``centre``, padded with air (-1) / background (0) where it leaves the volume.

    ``out``: arrays of shape ``patch`` to write into (any dtypes); new float32 / uint8 ones otherwise.
    """
    if out is None:
        out = (np.empty(patch, dtype=np.float32), np.empty(patch, dtype=np.uint8))
    out_i, out_l = out
    src, dst = [], []
    for c, p, n in zip(centre, patch, image.shape):
        start = int(c) - p // 2
        s0, s1 = max(start, 0), min(start + p, n)
        src.append(slice(s0, s1))
        dst.append(slice(s0 - start, s1 - start))
    if any(d.start > 0 or d.stop < p for d, p in zip(dst, patch)):
        out_i.fill(-1.0)
        out_l.fill(0)
    out_i[tuple(dst)] = image[tuple(src)]
    out_l[tuple(dst)] = label[tuple(src)]
    return out_i, out_l


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5,
                 ce_weight: torch.Tensor | None = None, dice_over: str = "all_classes") -> torch.Tensor:
    """Dice (foreground classes) + cross-entropy, as MONAI's ``DiceCELoss(to_onehot_y=True,
    softmax=True, include_background=False)``, without its one-hot target.

    The one-hot target of 28 classes is 29 floats per voxel, and the stock loss makes several more
    tensors of that size; here the per-class sums come from one log-softmax, a gather and a
    ``scatter_add``, which matters on a CPU where the loss would otherwise cost a tenth of the step.

    Args:
        logits: (b, c, *spatial) network output, any memory format.
        target: (b, 1, *spatial) integer class ids in ``[0, c)``.
        ce_weight: optional (c,) weight per class for the cross-entropy (PyTorch's weighted mean:
            each voxel's term times its true class's weight, over the sum of those weights).
        dice_over: ``all_classes`` (MONAI's loss) or ``present_classes``: the Dice term only for
            (item, class) pairs whose class is in the item's crop. With 28 classes most are absent
            from a crop, and an absent class's Dice is best when it is predicted nowhere: a class
            present in few crops (the lesion) is then taught mostly to vanish. The cross-entropy
            still penalizes it where it is predicted and absent.

    Returns:
        Scalar loss: mean over batch items and classes 1..c-1 (or the present ones) of
        ``1 - Dice``, plus the mean voxel cross-entropy.
    """
    b, c = logits.shape[:2]
    t = target.long()
    if t.dim() == logits.dim() - 1:
        t = t[:, None]
    x = logits if logits.dtype == torch.float64 else logits.float()  # fp32 under AMP
    spatial = tuple(range(2, x.dim()))
    if x.stride(1) == 1:  # channels-last: softmax over the innermost axis is ~8x faster on a CPU
        x, t, cdim, spatial = x.movedim(1, -1), t.movedim(1, -1), -1, tuple(range(1, x.dim() - 1))
    else:
        cdim = 1
    logp = torch.log_softmax(x, dim=cdim)
    logp_true = logp.gather(cdim, t).reshape(b, -1)  # log p of the true class, per voxel
    ids = t.reshape(b, -1)
    if ce_weight is None:
        ce = -logp_true.mean()
    else:
        w = ce_weight.to(logp_true.device, logp_true.dtype)[ids]
        ce = -(w * logp_true).sum() / w.sum()
    inter = torch.zeros(b, c, dtype=logp.dtype, device=logp.device).scatter_add_(1, ids, logp_true.exp())
    ground = torch.zeros(b, c, dtype=logp.dtype, device=logp.device).scatter_add_(
        1, ids, torch.ones_like(logp_true)
    )
    pred = logp.exp().sum(dim=spatial)
    dice = 1.0 - (2.0 * inter + smooth) / (pred + ground + smooth)
    if dice_over == "present_classes":
        present = ground[:, 1:] > 0
        return (dice[:, 1:] * present).sum() / present.sum().clamp(min=1) + ce
    return dice[:, 1:].mean() + ce


def ce_class_weights(cases: Sequence[CachedCase], num_classes: int, cap: float) -> torch.Tensor:
    """Cross-entropy weight per class: sqrt(background voxels / class voxels), between 1 and ``cap``.

    Organs cover about a tenth of an abdominal CT and most classes under 1% of it: with plain
    cross-entropy a network first spends hundreds of steps learning to say background.
    """
    counts = np.ones(num_classes, dtype=np.float64)
    for case in cases:
        counts += np.bincount(np.asarray(case.label).ravel(), minlength=num_classes)[:num_classes]
    return torch.tensor(np.clip(np.sqrt(counts[0] / counts), 1.0, cap), dtype=torch.float32)


def effective_patch(patch: Sequence[int], shapes: Sequence[Sequence[int]]) -> tuple[int, int, int]:
    """The configured patch, shrunk (to multiples of 8) where every scan is smaller."""
    biggest = np.max(np.asarray(shapes), axis=0)
    return tuple(int(min(p, max(16, int(np.ceil(b / 8)) * 8))) for p, b in zip(patch, biggest))  # type: ignore[return-value]


def class_weights(cfg: SegmentationConfig, labelmap: LabelMap) -> dict[int, float]:
    return {labelmap.id_of(name): w for name, w in cfg.training.crop_class_weights.items()}


def meta_centers(datastore: Any, image_ids: Sequence[str]) -> dict[str, str | None]:
    """Center per scan from the datastore's metadata (None where unknown or unsupported)."""
    get = getattr(datastore, "get_metadata", None)
    out: dict[str, str | None] = {}
    for i in image_ids:
        try:
            out[i] = (get(i) or {}).get("center") if get else None
        except Exception:  # noqa: BLE001 - metadata is optional for splitting
            out[i] = None
    return out


# ---- building the cache in parallel ------------------------------------------------------------


def auto_cache_workers(requested: int, cases: int) -> int:
    """Cache workers: as asked, else up to 8 processes (only when there are enough scans to share)."""
    if requested:
        return requested
    return 1 if cases < 16 else max(1, min(8, (os.cpu_count() or 2) // 2))


def _build_one(cache: Any, item: tuple[str, str, str]) -> str:
    cache.get(*item)
    return item[0]


def build_cache(cache: Any, items: Sequence[tuple[str, str, str]], workers: int = 1,
                progress: Any = None) -> int:
    """Preprocess every ``(image id, image file, label file)`` into ``cache`` (those not there yet).

    ``cache``: any cache with ``has(image, label)`` and ``get(image id, image, label)``, picklable
    (:class:`CaseCache`, :class:`lib.model.click_training.ClickCaseCache`).

    ``workers`` > 1 spreads the scans over that many processes (a fresh interpreter each, safe in
    a threaded server subprocess); each writes its scans to disk itself, so nothing accumulates in
    RAM. ``progress(done, total)`` is called as scans finish. Returns how many were built.
    """
    todo = [t for t in items if not cache.has(t[1], t[2])]
    if workers <= 1 or len(todo) < 2:
        for k, t in enumerate(todo):
            cache.get(*t)
            if progress:
                progress(k + 1, len(todo))
        return len(todo)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx) as pool:
        futures = [pool.submit(_build_one, cache, t) for t in todo]
        for k, f in enumerate(as_completed(futures)):
            f.result()  # a scan that cannot be read fails the run, naming it
            if progress:
                progress(k + 1, len(todo))
    return len(todo)
