"""Click-guided correction of one class of a 28-class label map, inside a window around the clicks.

The design (DeepEdit's, made local): for the class being corrected, a window of the scan around its
clicks is resampled to ``clicks.yaml spacing_mm`` (2 mm) in the canonical orientation; a small
SegResNet sees

* the CT window (the segmentation model's HU map, :func:`lib.model.segmenter.normalize_hu`),
* a heat map of the class's clicks and one of the background (and other classes') clicks,
* the class's current mask and the mask of every other class there,
* which group the class belongs to (lesion, duct, gland part, other: one constant channel each),

and answers the class's mask in the window. :func:`merge` writes it back into the label map inside
the window only: every voxel outside it stays as it was, bit for bit.

Infer (:mod:`lib.infers.clicks`) and training (:mod:`lib.model.click_training`, ``scripts/train_click_model.py``)
use the same :func:`window_for`, :func:`encode` and :func:`simulate_click`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import SegResNet
from scipy import ndimage

from lib.core.click_config import ClickConfig
from lib.core.labelmap import LabelMap
from lib.core.settings import SegmentationConfig
from lib.imaging.volume_io import Reorientation, reorientation
from lib.model.segmenter import normalize_hu

logger = logging.getLogger(__name__)

Point = tuple[int, int, int]
Box = tuple[slice, slice, slice]
#: input channels besides the group one-hot: CT, positive clicks, negative clicks, class mask, other classes
BASE_CHANNELS = 5


def in_channels(cfg: ClickConfig) -> int:
    return BASE_CHANNELS + len(cfg.group_names)


class ClickNet(torch.nn.Module):
    """SegResNet on 2x2x2 blocks: the input's 2x2x2 neighbourhoods become channels (space to depth),
    the network runs at half the resolution, and its 8 output channels per voxel become the 2x2x2
    answer again. The answer keeps the input's 2 mm; the network costs about a tenth (a 48^3
    window: 0.05-0.09 s instead of 0.6 s on this CPU, where 8-channel full-resolution
    convolutions are memory-bound)."""

    def __init__(self, cfg: ClickConfig) -> None:
        super().__init__()
        n = cfg.network
        self.net = SegResNet(spatial_dims=3, in_channels=in_channels(cfg) * 8, out_channels=8,
                             init_filters=n.init_filters, blocks_down=n.blocks_down, blocks_up=n.blocks_up)

    @staticmethod
    def unshuffle(x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        x = x.reshape(b, c, d // 2, 2, h // 2, 2, w // 2, 2)
        return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * 8, d // 2, h // 2, w // 2)

    @staticmethod
    def shuffle(x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        x = x.reshape(b, c // 8, 2, 2, 2, d, h, w)
        return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, c // 8, d * 2, h * 2, w * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.net(self.unshuffle(x)))


def build_click_network(cfg: ClickConfig) -> ClickNet:
    return ClickNet(cfg)


# ---- the window ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """A box of the scan (stored index space) and the network grid it is resampled to."""

    box: Box
    grid: tuple[int, int, int]  # network voxels per stored axis (multiples of 8)

    @property
    def start(self) -> np.ndarray:
        return np.array([s.start for s in self.box])

    @property
    def size(self) -> np.ndarray:
        return np.array([s.stop - s.start for s in self.box])


def _round8(n: float) -> int:
    """Network sides: multiples of 8 (2x2x2 blocks, then two halvings), at least 16."""
    return max(16, int(np.ceil(n / 8.0)) * 8)


def window_for(points: Sequence[Point], shape: Sequence[int], spacing: Sequence[float], cfg: ClickConfig,
               newest: Point | None = None) -> Window:
    """The window around ``points`` (stored voxel indices) of a scan of ``shape`` and ``spacing`` (mm).

    Each side holds every point with ``window_margin`` network voxels around it, at least
    ``window_min`` and at most ``window_max`` network voxels (then centred on ``newest``), clipped
    to the scan.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    scale = np.asarray(spacing, dtype=np.float64) / cfg.spacing_mm  # network voxels per scan voxel
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    box, grid = [], []
    for a in range(3):
        need = (hi[a] - lo[a]) * scale[a] + 2 * cfg.window_margin + 1
        side = min(max(_round8(need), cfg.window_min), cfg.window_max)
        centre = (lo[a] + hi[a]) / 2.0
        if need > cfg.window_max and newest is not None:
            centre = float(newest[a])
        # scan voxels a side, rounded down: rounding up could push the grid to the next multiple of 8
        # (77 slices of 1.25 mm are 48.1 voxels at 2 mm, a grid of 56; 76 give 48)
        n = max(1, int(side / scale[a] + 1e-6))
        start = int(round(centre - n / 2.0))
        start = min(max(start, 0), max(int(shape[a]) - n, 0))
        stop = min(start + n, int(shape[a]))
        box.append(slice(start, stop))
        grid.append(_round8((stop - start) * scale[a]))
    return Window(tuple(box), tuple(grid))  # type: ignore[arg-type]


# ---- the network's input ---------------------------------------------------------------------------


class Orienter:
    """Stored axis order <-> the canonical orientation (a permutation and flips of tensors)."""

    def __init__(self, ro: Reorientation) -> None:
        self.perm = [int(ro.transform[a][0]) for a in range(3)]  # canonical axis of each stored axis
        self.flip = [bool(ro.transform[a][1] < 0) for a in range(3)]

    def to_canonical(self, t: torch.Tensor) -> torch.Tensor:
        """(..., a, b, c) stored -> canonical."""
        lead = t.dim() - 3
        flips = [lead + a for a in range(3) if self.flip[a]]
        t = torch.flip(t, flips) if flips else t
        order = [self.perm.index(c) for c in range(3)]
        return t.permute(*range(lead), *[lead + a for a in order])

    def from_canonical(self, t: torch.Tensor) -> torch.Tensor:
        lead = t.dim() - 3
        t = t.permute(*range(lead), *[lead + c for c in self.perm])
        flips = [lead + a for a in range(3) if self.flip[a]]
        return torch.flip(t, flips) if flips else t


def _resample(x: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """(1, C, ...) to ``shape``: area averaging where every side shrinks, else trilinear."""
    if tuple(x.shape[2:]) == tuple(shape):
        return x
    if all(o <= i for o, i in zip(shape, x.shape[2:])):
        return F.interpolate(x, size=shape, mode="area")
    return F.interpolate(x, size=shape, mode="trilinear", align_corners=False)


def heat_map(points: Sequence[Point], window: Window, sigma: float) -> torch.Tensor:
    """Gaussian blobs (max 1) at ``points`` on the window's grid (stored axis order)."""
    out = torch.zeros(window.grid)
    if not len(points):
        return out
    scale = np.asarray(window.grid, dtype=np.float64) / window.size
    axes = [torch.arange(g, dtype=torch.float32) for g in window.grid]
    for p in points:
        q = (np.asarray(p, dtype=np.float64) - window.start + 0.5) * scale - 0.5
        if np.any(q < -3 * sigma) or np.any(q > np.asarray(window.grid) - 1 + 3 * sigma):
            continue  # outside the window
        g = [torch.exp(-((ax - float(c)) ** 2) / (2 * sigma**2)) for ax, c in zip(axes, q)]
        out = torch.maximum(out, g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :])
    return out


def stack_channels(ct: torch.Tensor, cls_mask: torch.Tensor, other_mask: torch.Tensor, pos: torch.Tensor,
                   neg: torch.Tensor, group: int, cfg: ClickConfig) -> torch.Tensor:
    """The network's input channels (C, *grid) in their one order: CT, positive clicks, negative
    clicks, the class's mask, the other classes' mask, then one channel per class group. Infer
    (:func:`encode`) and training (:mod:`lib.model.click_training`) both build the input here."""
    groups = torch.zeros((len(cfg.group_names), *ct.shape))
    groups[group] = 1.0
    return torch.cat([ct[None], pos[None], neg[None], cls_mask[None], other_mask[None], groups])


def encode(image: np.ndarray, label: np.ndarray, cls: int, group: int, positive: Sequence[Point],
           negative: Sequence[Point], window: Window, seg_cfg: SegmentationConfig, cfg: ClickConfig,
           orient: Orienter) -> torch.Tensor:
    """The network input (1, C, *grid) in canonical orientation for one class in one window.

    ``image`` and ``label`` are the whole scan (stored order; only the window is read).
    """
    box = window.box
    ct = normalize_hu(np.ascontiguousarray(image[box]), seg_cfg)[None, None]
    lab = torch.from_numpy(np.ascontiguousarray(label[box]))
    masks = torch.stack([(lab == cls), (lab != 0) & (lab != cls)]).float()[None]
    planes = torch.cat([_resample(ct, window.grid), _resample(masks, window.grid)], dim=1)[0]
    x = stack_channels(planes[0], planes[1], planes[2], heat_map(positive, window, cfg.click_sigma),
                       heat_map(negative, window, cfg.click_sigma), group, cfg)
    return orient.to_canonical(x)[None].contiguous()


def logits_to_mask(logits: torch.Tensor, window: Window, orient: Orienter) -> np.ndarray:
    """(1, 1, *canonical grid) logits -> boolean mask over the window's box (stored order)."""
    t = orient.from_canonical(logits[0, 0])[None, None].float()
    size = tuple(int(n) for n in window.size)
    t = F.interpolate(t, size=size, mode="trilinear", align_corners=False) if tuple(t.shape[2:]) != size else t
    return (t[0, 0] > 0).numpy()


# ---- merging -----------------------------------------------------------------------------------------


def _local(point: Point, start: np.ndarray, shape: Sequence[int]) -> tuple[int, int, int] | None:
    """A scan voxel index as an index into the window that starts at ``start``; None outside it."""
    q = tuple(int(c) for c in np.asarray(point) - start)
    return q if all(0 <= c < s for c, s in zip(q, shape)) else None  # type: ignore[return-value]


def keep_clicked_parts(mask: np.ndarray, before: np.ndarray, positive: Sequence[Point], start: np.ndarray) -> np.ndarray:
    """Parts of ``mask`` that hold a positive click or overlap the class as it was: a new blob
    elsewhere in the window is no answer to these clicks."""
    if not mask.any():
        return mask
    cc, n = ndimage.label(mask)
    if n <= 1 and not positive:
        return mask if (mask & before).any() else np.zeros_like(mask)
    keep = set(np.unique(cc[mask & before]).tolist())
    for p in positive:
        q = _local(p, start, mask.shape)
        if q is not None and cc[q]:
            keep.add(int(cc[q]))
    keep.discard(0)
    return np.isin(cc, sorted(keep)) if keep else np.zeros_like(mask)


def merge_window(window_label: np.ndarray, cls: int, mask: np.ndarray, positive: Sequence[Point],
                 negative: Sequence[Point], start: np.ndarray) -> np.ndarray:
    """The window's labels with class ``cls`` replaced by ``mask``.

    Voxels the class loses take the nearest label of another class (or background) in the window:
    a false lesion inside the pancreas head goes back to head. Positive clicks always get the
    class; background clicks never keep it.
    """
    out = window_label.copy()
    mask = mask.copy()
    for points, value in ((positive, True), (negative, False)):
        for p in points:
            q = _local(p, start, mask.shape)
            if q is not None:
                mask[q] = value
    was = out == cls
    lost = was & ~mask
    if lost.any():
        sub = tuple(slice(max(int(i.min()) - 4, 0), int(i.max()) + 5) for i in np.nonzero(lost))
        region = out[sub]
        seed = region != cls
        if seed.any():
            _, idx = ndimage.distance_transform_edt(~seed, return_distances=True, return_indices=True)
            fill = region[tuple(idx)]
        else:
            fill = np.zeros_like(region)
        lost_sub = lost[sub]
        region[lost_sub] = fill[lost_sub]
    out[mask] = cls
    return out


# ---- the model ---------------------------------------------------------------------------------------


class ClickModel:
    """Loads the click weights (reloading when the file changes) and corrects one class in a window."""

    def __init__(self, cfg: ClickConfig, seg_cfg: SegmentationConfig, labelmap: LabelMap, model_path: Path,
                 device: str = "cpu") -> None:
        self.cfg, self.seg_cfg, self.labelmap = cfg, seg_cfg, labelmap
        self.model_path = Path(model_path)
        self.device = torch.device(device)
        self._lock = threading.Lock()
        self._net: torch.nn.Module | None = None
        self.mtime = -1.0
        self.meta: dict = {}

    @property
    def trained(self) -> bool:
        return self.model_path.exists()

    def network(self) -> torch.nn.Module:
        with self._lock:
            mtime = self.model_path.stat().st_mtime if self.model_path.exists() else 0.0
            if self._net is None or mtime != self.mtime:
                net = build_click_network(self.cfg)
                self.meta = {}
                if mtime:
                    ckpt = torch.load(self.model_path, map_location="cpu", weights_only=True)
                    self.meta = ckpt.get("meta", {})
                    names = self.meta.get("labels")
                    if names and list(names) != self.labelmap.names:
                        raise ValueError(f"{self.model_path}: click model was trained for another label map")
                    net.load_state_dict(ckpt["state_dict"])
                    logger.info(f"loaded click weights {self.model_path} ({self.meta.get('summary', '')})")
                else:
                    logger.warning(f"no click weights at {self.model_path}: the click model is UNTRAINED")
                self._net = net.to(self.device).eval()
                self.mtime = mtime
            return self._net

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        net = self.network()
        with torch.inference_mode():
            return net(x.to(self.device)).float().cpu()

    def correct(self, image: np.ndarray, label: np.ndarray, affine: np.ndarray, cls: int,
                positive: Sequence[Point], negative: Sequence[Point], newest: Point | None = None) -> Box:
        """Correct class ``cls`` of ``label`` (changed in place, inside the returned box only)."""
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        pts = list(positive) + [p for p in negative if label[p] == cls] or list(negative)
        window = window_for(pts, label.shape, spacing, self.cfg, newest)
        orient = Orienter(reorientation(affine, self.seg_cfg.preprocessing.orientation))
        group = self.cfg.group_of(self.labelmap.id_to_name[cls])
        x = encode(image, label, cls, group, positive, negative, window, self.seg_cfg, self.cfg, orient)
        mask = logits_to_mask(self.predict(x), window, orient)
        before = label[window.box] == cls
        mask = keep_clicked_parts(mask, before, positive, window.start)
        label[window.box] = merge_window(label[window.box], cls, mask, positive, negative, window.start)
        return window.box


# ---- simulated annotator ----------------------------------------------------------------------------


def simulate_click(truth: np.ndarray, pred: np.ndarray, exclude: np.ndarray | None = None) -> tuple[Point, bool] | None:
    """The next click of a simulated annotator: the centre (deepest voxel, by distance transform)
    of the largest error region of one class.

    Args:
        truth: boolean mask of the class as it should be.
        pred: boolean mask of the class as it is.
        exclude: voxels not to click (e.g. outside the region of interest).

    Returns:
        ``(point, positive)``: a missed voxel (positive click) or a false one (background click),
        or None when there is no error.
    """
    fn, fp = truth & ~pred, pred & ~truth
    if exclude is not None:
        fn, fp = fn & ~exclude, fp & ~exclude
    best: tuple[int, np.ndarray, bool] | None = None
    for err, positive in ((fn, True), (fp, False)):
        if not err.any():
            continue
        cc, n = ndimage.label(err)
        sizes = np.bincount(cc.ravel())[1:]
        k = int(np.argmax(sizes)) + 1
        if best is None or sizes[k - 1] > best[0]:
            best = (int(sizes[k - 1]), cc == k, positive)
    if best is None:
        return None
    region = best[1]
    bb = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in np.nonzero(region))
    dist = ndimage.distance_transform_edt(region[bb])
    q = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return tuple(int(c + s.start) for c, s in zip(q, bb)), best[2]  # type: ignore[return-value]


__all__ = ["BASE_CHANNELS", "ClickModel", "ClickNet", "Orienter", "Window", "build_click_network", "encode", "heat_map",
           "in_channels", "keep_clicked_parts", "stack_channels", "logits_to_mask", "merge_window", "simulate_click", "window_for"]
