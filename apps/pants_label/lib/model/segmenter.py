"""The 28-class segmentation pipeline, shared by infer, training validation, scoring and batch inference.

Memory is the design constraint. The stock pipeline resamples a C-channel float prediction back
to full resolution and only then takes the argmax: at 512x512x300 with 26+ classes that is >20 GB.
Here the network runs at the preset's coarse spacing, and its logits are brought back to the image
grid slab by slab (bilinear in-plane, linear across slabs) with the argmax taken per slab, so the
full-resolution output is only ever a uint8 array.

Speed at 512x512x300 on 2 cores comes from doing less: full-resolution work follows the volume's
memory order (no transpositions); the network runs only on the body's bounding box; voxels whose
low-resolution cell has one label on all 8 corners take it without interpolation (exact).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.networks.nets import SegResNet

from lib.model.precision import autocast, describe as describe_precision, resolve_cpu_bf16
from lib.core.errors import ModelUnusable
from lib.core.labelmap import LabelMap
from lib.core.settings import Preset, SegmentationConfig
from lib.imaging.volume_io import Reorientation, Volume, canonical_spacing, reorientation
from lib.model.model_store import diverged

logger = logging.getLogger(__name__)

# MONAI's sliding_window_inference indexes its input with a list of slices, which torch 2.13
# deprecates with a warning on every call (training validation, infer, scoring); the result is
# the same, so the warning is only noise in the logs.
warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")


def build_network(cfg: SegmentationConfig, num_classes: int) -> SegResNet:
    """SegResNet with ``num_classes + 1`` output channels (0 = background)."""
    n = cfg.network
    return SegResNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=num_classes + 1,
        init_filters=n.init_filters,
        blocks_down=n.blocks_down,
        blocks_up=n.blocks_up,
        dropout_prob=n.dropout_prob,
    )


# ---- preprocessing ---------------------------------------------------------------------------


def normalize_hu(arr: np.ndarray | torch.Tensor, cfg: SegmentationConfig) -> torch.Tensor:
    """Clip HU to ``[hu_min, hu_max]`` and map it to [-1, 1] (float32 tensor, may share memory).

    With ``soft_tissue_hu`` the map is piecewise linear: organs differ by tens of HU, and a single
    map of 2,000 HU onto [-1, 1] leaves them a few thousandths apart, so the soft-tissue range
    gets most of the input range (presets.yaml ``preprocessing``). The map is monotonic, so HU
    thresholds (body box) carry over by mapping the threshold.
    """
    p = cfg.preprocessing
    xs, ys = p.hu_knots()
    t = torch.as_tensor(arr, dtype=torch.float32)
    t = t.clamp(xs[0], xs[-1])  # a new tensor: the in-place steps below never touch ``arr``
    slopes = [(ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i]) for i in range(len(xs) - 1)]
    # y = y0 + s0 (t - x0) + sum_k (s_k - s_{k-1}) relu(t - x_k), with one full-size temporary
    bends = None
    for k in range(1, len(slopes)):
        term = (t - xs[k]).clamp_(min=0).mul_(slopes[k] - slopes[k - 1])
        bends = term if bends is None else bends.add_(term)
    t = t.sub_(xs[0]).mul_(slopes[0]).add_(ys[0])
    return t if bends is None else t.add_(bends)


def target_shape(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]) -> tuple[int, int, int]:
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))  # type: ignore[return-value]


def resample_image(x: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Resample a (1,1,D,H,W) image; area averaging when shrinking avoids aliasing of thin structures."""
    if tuple(x.shape[2:]) == tuple(shape):
        return x
    shrinking = all(o <= i for o, i in zip(shape, x.shape[2:]))
    if shrinking:
        return F.interpolate(x, size=shape, mode="area")
    return F.interpolate(x, size=shape, mode="trilinear", align_corners=False)


def resample_label(label: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Nearest-neighbour resampling of a label map (used to build training targets)."""
    if tuple(label.shape) == tuple(shape):
        return label
    t = torch.from_numpy(np.ascontiguousarray(label, dtype=np.uint8))[None, None].float()
    return F.interpolate(t, size=shape, mode="nearest-exact")[0, 0].to(torch.uint8).numpy()


@dataclass
class Prepared:
    """A CT brought to the network's grid, with what is needed to go back."""

    image: torch.Tensor  # (1, 1, d, h, w) normalised, canonical orientation, preset spacing
    canonical_shape: tuple[int, int, int]
    volume_shape: tuple[int, int, int]
    reorient: Reorientation
    # The volume's axes from the slowest to the fastest in memory: the full-resolution work is
    # done in this order, so a Fortran-ordered NIfTI array is never transposed (at 512x512x300 a
    # transposition costs more than the arithmetic).
    memory_axes: tuple[int, int, int] = (0, 1, 2)

    def canonical_axis(self, stored_axis: int) -> tuple[int, bool]:
        """The canonical axis a stored axis becomes, and whether it is flipped."""
        row = self.reorient.transform[stored_axis]
        return int(row[0]), bool(row[1] < 0)


def memory_axes(arr: np.ndarray) -> tuple[int, int, int]:
    """Axes of ``arr`` from the largest stride to the smallest (C order: 0, 1, 2; Fortran: 2, 1, 0)."""
    return tuple(int(a) for a in sorted(range(arr.ndim), key=lambda a: -abs(arr.strides[a])))  # type: ignore[return-value]


def prepare(vol: Volume, cfg: SegmentationConfig, preset: Preset) -> Prepared:
    axcodes = cfg.preprocessing.orientation
    ro = reorientation(vol.affine, axcodes)
    order = memory_axes(vol.array)
    mem = np.ascontiguousarray(vol.array.transpose(order))  # a view unless the array was strided
    can = [int(ro.transform[a][0]) for a in order]  # canonical axis of each memory axis
    canonical_shape = [0, 0, 0]
    for a in range(3):
        canonical_shape[int(ro.transform[a][0])] = vol.array.shape[a]
    small_shape = target_shape(tuple(canonical_shape), canonical_spacing(vol.affine, axcodes), preset.spacing_mm)
    x = normalize_hu(mem, cfg)[None, None]
    small = resample_image(x, tuple(small_shape[c] for c in can))[0, 0]  # type: ignore[arg-type]
    del x
    # Only the small image is brought to the canonical orientation (area resampling commutes
    # with axis flips and permutations).
    flips = [m for m, a in enumerate(order) if ro.transform[a][1] < 0]
    small = torch.flip(small, flips) if flips else small
    small = small.permute([can.index(c) for c in range(3)])
    return Prepared(small[None, None].contiguous(), tuple(canonical_shape), tuple(vol.array.shape), ro, order)  # type: ignore[arg-type]


def body_box(image: torch.Tensor, cfg: SegmentationConfig, spacing_mm: tuple[float, ...]) -> tuple[slice, slice, slice]:
    """Bounding box of the body (voxels above ``body_threshold_hu``) on a prepared image, with margin.

    Air around the patient is about half of a CT's field of view; the network only runs inside
    this box. A margin of air keeps the network's view of the body's edge as it was.
    """
    p = cfg.preprocessing
    shape = tuple(image.shape[2:])
    full = tuple(slice(0, n) for n in shape)
    if p.body_threshold_hu is None:
        return full  # type: ignore[return-value]
    level = float(normalize_hu(np.array([p.body_threshold_hu], np.float32), cfg)[0])
    body = image[0, 0] > level
    if not bool(body.any()):
        return full  # type: ignore[return-value]
    box = []
    for ax in range(3):
        hit = body.any(dim=[a for a in range(3) if a != ax]).nonzero()[:, 0]
        margin = int(np.ceil(p.body_margin_mm / spacing_mm[ax]))
        lo, hi = max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, shape[ax])
        if hi - lo < 16:  # the network needs 16 voxels a side: grow around the centre
            lo = max(0, min((lo + hi) // 2 - 8, shape[ax] - 16))
            hi = min(shape[ax], lo + 16)
        box.append(slice(lo, hi))
    return tuple(box)  # type: ignore[return-value]


def window_size(shape: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> tuple[int, int, int]:
    """The smallest sliding window (multiples of 8, at most ``roi``) that needs no more windows than ``roi``.

    A 181-voxel side with a 160 window and 0.125 overlap needs 2 windows either way; windows of 104
    cover it with 2 as well, at 65% of the work.
    """

    def count(n: int, r: int) -> int:  # windows MONAI's sliding window places along one side
        return 1 if n <= r else int(np.ceil((n - r) / max(1, int(r * (1 - overlap))))) + 1

    out = []
    for n, r in zip(shape, roi):
        r = min(r, int(np.ceil(max(16, n) / 8) * 8))
        need = count(n, r)
        best = r
        for cand in range(16, r + 1, 8):
            if count(n, cand) <= need:
                best = cand
                break
        out.append(best)
    return tuple(out)  # type: ignore[return-value]


# ---- postprocessing ------------------------------------------------------------------------------


def _linear_weights(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of linear interpolation (align_corners=False, edges clamped)."""
    s = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    s = np.clip(s, 0, n_in - 1)
    i0 = np.floor(s).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (s - i0).astype(np.float32)


@dataclass(frozen=True)
class AxisMap:
    """How one output axis samples one axis of the (cropped) logits: linear interpolation.

    Output indices ``valid`` have both sources inside the crop; the others are background.
    """

    src_axis: int  # axis of the logits (0..2, spatial)
    i0: torch.Tensor  # int64, per valid output index, into the crop
    i1: torch.Tensor
    w: torch.Tensor  # float32 weight of i1
    valid: slice
    size: int  # output length
    n_low: int  # length of the whole low-resolution axis
    crop: slice  # the part of it the logits hold
    flip: bool  # the output axis runs against the low-resolution one

    @staticmethod
    def build(src_axis: int, n_out: int, n_low: int, crop: slice, flip: bool = False) -> "AxisMap":
        """Map ``n_out`` output indices onto a low-resolution axis of ``n_low`` voxels, of which the
        logits hold ``crop``; ``flip``: the output axis runs the other way."""
        i0, i1, w = _linear_weights(n_out, n_low)
        if flip:
            i0, i1, w = i0[::-1], i1[::-1], w[::-1]
        inside = np.nonzero((i0 >= crop.start) & (i1 < crop.stop))[0]
        valid = slice(int(inside[0]), int(inside[-1]) + 1) if len(inside) else slice(0, 0)
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a[valid]))  # noqa: E731
        return AxisMap(src_axis, t(i0 - crop.start), t(i1 - crop.start), t(w), valid, n_out, n_low, crop, flip)


def _uniform_cells(low: torch.Tensor) -> torch.Tensor:
    """Per low-resolution cell (a voxel and its +1 neighbours on each axis, clamped at the edge):
    the label when all 8 corners share it, else 255.

    Linear interpolation is a convex combination of the corners' logits, so where every corner
    has the same argmax, every point of the cell has it too: there the answer is exact without
    interpolating 29 channels.
    """
    padded = low
    for ax in range(3):
        padded = torch.cat([padded, padded.narrow(ax, padded.shape[ax] - 1, 1)], dim=ax)
    d, h, w = low.shape
    same = torch.ones_like(low, dtype=torch.bool)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                if dz or dy or dx:
                    same &= padded[dz : dz + d, dy : dy + h, dx : dx + w] == low
    return torch.where(same, low, torch.full_like(low, 255))


def labels_from_logits(logits: torch.Tensor, axes: tuple[AxisMap, AxisMap, AxisMap], slab: int = 16,
                       sparse_below: float = 0.15, chunk: int = 32768) -> np.ndarray:
    """Argmax of trilinearly upsampled logits, interpolating only where the answer is not known.

    Per slab of output slices, every voxel first takes its cell's label where the cell's 8
    corners agree (:func:`_uniform_cells`, exact). The rest is interpolated: voxel by voxel when
    fewer than ``sparse_below`` of the slab (a trained model: organ boundaries), else the whole slab
    (a random model: confetti everywhere) as bilinear in-plane, linear across slices.

    Args:
        logits: (1, C, d, h, w) on any device; C <= 255.
        axes: for each axis of the output (slowest in memory first), how it samples the logits.
        slab: output slices along the first axis per step (bounds the memory).
        sparse_below: fraction of undecided voxels below which they are done one by one.
        chunk: voxels interpolated per step in the sparse path (keeps the work in cache).

    Returns:
        uint8 C-contiguous array of shape ``(axes[0].size, axes[1].size, axes[2].size)``, 0
        outside the crop.
    """
    out = np.zeros(tuple(a.size for a in axes), dtype=np.uint8)
    if any(a.valid.stop <= a.valid.start for a in axes):
        return out
    src = [a.src_axis for a in axes]
    low = logits[0].max(dim=0).indices.to(torch.uint8)  # max: about twice as fast as argmax on CPU
    cells = _uniform_cells(low).permute(src).contiguous().cpu().numpy()
    # Logits in the output's axis order, once: a slab of output slices then reads one contiguous
    # block (in the canonical order it is a thin strided slice of every row: 3x slower at 1.5 mm).
    lg = logits[0].permute(0, 1 + src[0], 1 + src[1], 1 + src[2]).contiguous()
    axes = tuple(replace(a, src_axis=m) for m, a in enumerate(axes))  # type: ignore[assignment]
    a0 = axes[0].valid
    for a in range(a0.start, a0.stop, slab):
        b = min(a + slab, a0.stop)
        k = slice(a - a0.start, b - a0.start)
        lab = _nearest(cells, [axes[0].i0[k].numpy(), axes[1].i0.numpy(), axes[2].i0.numpy()])
        undecided = lab == 255
        n = int(np.count_nonzero(undecided))
        if n and n < sparse_below * lab.size:
            _fill_sparse(lab, np.nonzero(undecided), lg, axes, k, chunk)
        elif n:
            lab = _dense(lg, axes, k)
        out[a:b, axes[1].valid, axes[2].valid] = lab
    return out


def _nearest(cells: np.ndarray, idx: list[np.ndarray]) -> np.ndarray:
    """``cells[idx[0]][:, idx[1]][:, :, idx[2]]`` for monotonic index runs, by np.repeat (fast)."""
    arr = cells
    for ax, seq in enumerate(idx):
        down = len(seq) > 1 and seq[0] > seq[-1]
        inc = seq[::-1] if down else seq
        lo, hi = int(inc[0]), int(inc[-1])
        arr = np.repeat(arr.take(range(lo, hi + 1), axis=ax), np.bincount(inc - lo, minlength=hi - lo + 1), axis=ax)
        if down:
            arr = np.flip(arr, ax)
    return np.ascontiguousarray(arr)


def _source_part(lg: torch.Tensor, src: list[int], sel: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """The logits block the indices ``sel`` (one tensor per output axis) read, channels last:
    (n0, n1, n2, C) on the CPU, and the offset of each axis."""
    part, lows = lg, []
    for ax, idx in zip(src, sel):
        lo, hi = int(idx.min()), int(idx.max())
        part = part.narrow(1 + ax, lo, hi - lo + 1)
        lows.append(lo)
    return part.permute(1 + src[0], 1 + src[1], 1 + src[2], 0).float().cpu().contiguous(), lows


def _fill_sparse(lab: np.ndarray, where: tuple[np.ndarray, ...], lg: torch.Tensor, axes: tuple[AxisMap, ...],
                 k: slice, chunk: int) -> None:
    """Interpolate the logits at the voxels ``where`` of the slab and write their argmax."""
    i0 = [axes[0].i0[k], axes[1].i0, axes[2].i0]
    i1 = [axes[0].i1[k], axes[1].i1, axes[2].i1]
    w = [axes[0].w[k], axes[1].w, axes[2].w]
    part, (l0, l1, l2) = _source_part(lg, [a.src_axis for a in axes], [torch.cat([p, q]) for p, q in zip(i0, i1)])
    n1, n2 = part.shape[1], part.shape[2]
    # Linear along the slab axis for the whole (small) low-resolution block, then bilinear per voxel.
    rows = torch.lerp(part.index_select(0, i0[0] - l0), part.index_select(0, i1[0] - l0),
                      w[0].view(-1, 1, 1, 1)).reshape(-1, part.shape[-1]).numpy()
    j0, j1, wy = (i0[1] - l1).numpy(), (i1[1] - l1).numpy(), w[1].numpy()
    x0, x1, wx = (i0[2] - l2).numpy(), (i1[2] - l2).numpy(), w[2].numpy()
    fill = np.empty(len(where[0]), dtype=np.uint8)
    for c in range(0, len(fill), chunk):
        z, y, x = (v[c : c + chunk] for v in where)
        base0, base1 = (z * n1 + j0[y]) * n2, (z * n1 + j1[y]) * n2
        ax_, ay_ = wx[x, None], wy[y, None]
        top = rows.take(base0 + x0[x], axis=0)
        top += ax_ * (rows.take(base0 + x1[x], axis=0) - top)
        bot = rows.take(base1 + x0[x], axis=0)
        bot += ax_ * (rows.take(base1 + x1[x], axis=0) - bot)
        top += ay_ * (bot - top)
        fill[c : c + chunk] = top.argmax(axis=1)
    lab[where] = fill


def _dense(lg: torch.Tensor, axes: tuple[AxisMap, ...], k: slice) -> np.ndarray:
    """Labels of the slab's valid voxels by full interpolation: bilinear upsampling of the
    low-resolution slices in-plane (channels last), then linear between them per output slice."""
    src = [a.src_axis for a in axes]
    i0, i1, w = axes[0].i0[k], axes[0].i1[k], axes[0].w[k]
    lo, hi = int(torch.minimum(i0, i1).min()), int(torch.maximum(i0, i1).max())
    part = lg.narrow(1 + src[0], lo, hi - lo + 1).permute(1 + src[0], 0, 1 + src[1], 1 + src[2]).float().cpu()
    # F.interpolate needs the whole low-resolution plane: outside the crop it reads zeros, which
    # only voxels outside the valid range (never used) depend on.
    full = torch.zeros(part.shape[0], part.shape[1], axes[1].n_low, axes[2].n_low)
    full[:, :, axes[1].crop, axes[2].crop] = part
    flips = [d for d, a in ((2, axes[1]), (3, axes[2])) if a.flip]
    full = torch.flip(full, flips) if flips else full
    up = F.interpolate(full.contiguous(memory_format=torch.channels_last), size=(axes[1].size, axes[2].size),
                       mode="bilinear", align_corners=False).permute(0, 2, 3, 1)  # (n, H, W, C) contiguous
    up = up[:, axes[1].valid, axes[2].valid]
    res = np.empty((k.stop - k.start, up.shape[1], up.shape[2]), dtype=np.uint8)
    for j in range(len(res)):
        s = torch.lerp(up[int(i0[j]) - lo], up[int(i1[j]) - lo], float(w[j])) if w[j] else up[int(i0[j]) - lo]
        _argmax_rows(s.numpy(), res[j])
    return res


_ARGMAX_THREADS = max(1, min(4, os.cpu_count() or 1))
_POOL = ThreadPoolExecutor(_ARGMAX_THREADS, thread_name_prefix="argmax")


def _argmax_rows(x: np.ndarray, out: np.ndarray) -> None:
    """``out[:] = x.argmax(-1)`` on all cores (numpy's argmax is single-threaded; it frees the GIL)."""

    def part(r: range) -> None:
        out[r.start : r.stop] = x[r.start : r.stop].argmax(axis=-1)

    step = -(-len(x) // _ARGMAX_THREADS)
    list(_POOL.map(part, [range(i, min(i + step, len(x))) for i in range(0, len(x), step)]))


def upsample_argmax(logits: torch.Tensor, out_shape: tuple[int, int, int], slab: int = 16) -> np.ndarray:
    """Argmax of trilinearly upsampled (1, C, d, h, w) logits at ``out_shape`` (uint8, CPU)."""
    low = logits.shape[2:]
    axes = tuple(AxisMap.build(i, out_shape[i], low[i], slice(0, low[i])) for i in range(3))
    return labels_from_logits(logits, axes, slab)  # type: ignore[arg-type]


def labels_in_volume(logits: torch.Tensor, prep: Prepared, box: tuple[slice, slice, slice] | None = None,
                     slab: int = 16) -> np.ndarray:
    """Label map of the volume (its own shape and orientation, uint8) from logits of ``prep.image[box]``.

    The array is laid out in the volume's memory order (a Fortran-ordered NIfTI gives a
    Fortran-ordered label, written without a transposition). Outside ``box``: background.
    """
    low = prep.image.shape[2:]
    box = box or tuple(slice(0, n) for n in low)  # type: ignore[assignment]
    axes = []
    for a in prep.memory_axes:
        c, flip = prep.canonical_axis(a)
        axes.append(AxisMap.build(c, prep.volume_shape[a], low[c], box[c], flip))  # type: ignore[index]
    out = labels_from_logits(logits, tuple(axes), slab)  # type: ignore[arg-type]
    return out.transpose(np.argsort(prep.memory_axes))


# ---- the model ----------------------------------------------------------------------------------


@dataclass
class ModelInfo:
    path: Path
    trained: bool
    mtime: float = 0.0
    meta: dict = field(default_factory=dict)


class Segmenter:
    """Loads the preset's weights (reloading when the file changes) and segments volumes.

    Thread-safe: one instance serves concurrent infer requests.
    """

    def __init__(
        self,
        cfg: SegmentationConfig,
        labelmap: LabelMap,
        preset_name: str,
        model_path: Path,
        device: str = "cpu",
    ) -> None:
        self.cfg = cfg
        self.labelmap = labelmap
        self.preset_name = preset_name
        self.preset = cfg.preset(preset_name)
        self.model_path = Path(model_path)
        self.device = torch.device(device)
        self.cpu_bf16 = resolve_cpu_bf16(cfg.cpu_bf16.infer)
        self.precision = describe_precision(self.device, self.cpu_bf16)
        self._lock = threading.Lock()
        self._net: SegResNet | None = None
        self.info = ModelInfo(self.model_path, trained=False)

    # -- weights
    def network(self) -> SegResNet:
        """The network with the newest published weights (reloaded if the file changed)."""
        with self._lock:
            mtime = self.model_path.stat().st_mtime if self.model_path.exists() else 0.0
            if self._net is None or mtime != self.info.mtime:
                self._net = self._load(mtime)
            return self._net

    def _load(self, mtime: float) -> SegResNet:
        net = build_network(self.cfg, self.labelmap.num_classes)
        meta: dict = {}
        trained = False
        if mtime:
            ckpt = torch.load(self.model_path, map_location="cpu", weights_only=True)
            meta = ckpt.get("meta", {})
            names = meta.get("labels")
            if names and list(names) != self.labelmap.names:
                raise ModelUnusable(
                    f"{self.model_path}: model was trained for labels {names}, not this label map; "
                    "move it aside or retrain"
                )
            made_for, current = meta.get("preprocessing"), self.cfg.preprocessing.input_map()
            if made_for is not None and {k: made_for.get(k) for k in current} != current:
                raise ModelUnusable(
                    f"{self.model_path}: model was trained with preprocessing {made_for}, not this one "
                    f"(configs/presets.yaml preprocessing); move it aside or retrain"
                )
            why = diverged(ckpt["state_dict"])
            if why:  # its output would be NaN, which argmax turns into an empty segmentation
                raise ModelUnusable(f"{self.model_path}: {why}; an admin serves an earlier version with "
                                    "`pants-label model-versions ... rollback vN` or POST /model/<model>/rollback?version=vN")
            net.load_state_dict(ckpt["state_dict"])
            trained = True
            logger.info(f"loaded weights {self.model_path} ({meta.get('summary', '')})")
        else:
            logger.warning(f"no weights at {self.model_path}: the model is UNTRAINED (random weights)")
            torch.manual_seed(0)  # same untrained output every time
            net = build_network(self.cfg, self.labelmap.num_classes)
        self.info = ModelInfo(self.model_path, trained, mtime, meta)
        # channels_last_3d: a 160^3 window takes 4.0 s instead of 7.0 s on 2 CPU cores.
        return net.to(self.device, memory_format=torch.channels_last_3d).eval()

    # -- inference
    @contextmanager
    def _timer(self, latencies: dict[str, float], key: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        latencies[key] = round(time.perf_counter() - t0, 3)

    def predict_logits(self, image: torch.Tensor, net: torch.nn.Module | None = None) -> torch.Tensor:
        """Sliding-window logits (1, C, d, h, w) of a prepared image (or a crop of one)."""
        net = net or self.network()
        p = self.preset
        roi = window_size(tuple(image.shape[2:]), p.roi_size, p.overlap)
        fmt = _memory_format(net)
        with torch.inference_mode(), autocast(self.device, self.cpu_bf16):
            logits = sliding_window_inference(
                image.to(self.device),
                roi_size=roi,
                sw_batch_size=p.sw_batch_size,
                # float32 out: the windows are blended in float32 whatever the network computed in
                predictor=lambda w: net(w.contiguous(memory_format=fmt)).float(),
                overlap=p.overlap,
                mode="gaussian",
                padding_mode="constant",
                cval=-1.0,  # air after HU normalisation
            )
        return logits.float()

    def body_logits(self, vol: Volume, lat: dict[str, float] | None = None
                    ) -> tuple[torch.Tensor, Prepared, tuple[slice, slice, slice]]:
        """Logits over the body's bounding box (:func:`body_box`) of the prepared volume, with the
        preparation and the box, so that :func:`labels_in_volume` maps them to the volume's grid.
        ``lat`` gets the ``pre`` and ``infer`` latencies."""
        lat = {} if lat is None else lat
        net = self.network()
        with self._timer(lat, "pre"):
            prep = prepare(vol, self.cfg, self.preset)
            box = body_box(prep.image, self.cfg, self.preset.spacing_mm)
        with self._timer(lat, "infer"):
            logits = self.predict_logits(prep.image[(slice(None), slice(None), *box)], net)
        return logits, prep, box

    def segment(self, vol: Volume) -> tuple[np.ndarray, dict[str, float]]:
        """Label map (uint8, the volume's own shape and orientation) and stage latencies in seconds.

        The network runs only on the body's bounding box (:func:`body_box`); outside it the label
        is background. The array has the volume's memory order (Fortran for a NIfTI).
        """
        lat: dict[str, float] = {}
        logits, prep, box = self.body_logits(vol, lat)
        with self._timer(lat, "post"):
            label = labels_in_volume(logits, prep, box, self.cfg.output_slab_slices)
            del logits
        assert label.shape == prep.volume_shape, (label.shape, prep.volume_shape)
        return label, lat


def _memory_format(net: torch.nn.Module) -> torch.memory_format:
    """channels_last_3d when the network's convolution weights are stored so, else the default."""
    weight = next((p for p in net.parameters() if p.dim() == 5), None)
    if weight is not None and weight.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def default_threads() -> None:
    """Use every core for intra-op work unless the operator set OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
