"""The 28-class segmentation pipeline, shared by infer, training validation, scoring and batch inference.

Memory is the design constraint. The stock pipeline resamples a C-channel float prediction back
to full resolution and only then takes the argmax: at 512x512x300 with 26+ classes that is >20 GB.
Here the network runs at the preset's coarse spacing, and its logits are brought back to the image
grid slab by slab (bilinear in-plane, linear across slabs) with the argmax taken per slab, so the
full-resolution output is only ever a uint8 array.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.networks.nets import SegResNet

from lib.labelmap import LabelMap
from lib.settings import Preset, SegmentationConfig
from lib.volume_io import Volume, canonical_spacing, reorientation

logger = logging.getLogger(__name__)


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
    """Clip HU to the configured window and scale it to [-1, 1] (float32 tensor, may share memory)."""
    p = cfg.preprocessing
    t = torch.as_tensor(arr, dtype=torch.float32)
    t = t.clamp(p.hu_min, p.hu_max)
    centre, half = (p.hu_max + p.hu_min) / 2, (p.hu_max - p.hu_min) / 2
    return t.sub_(centre).div_(half)


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
    reorient: object  # lib.volume_io.Reorientation


def prepare(vol: Volume, cfg: SegmentationConfig, preset: Preset) -> Prepared:
    axcodes = cfg.preprocessing.orientation
    ro = reorientation(vol.affine, axcodes)
    arr = np.ascontiguousarray(ro.to_canonical(vol.array))
    spacing = canonical_spacing(vol.affine, axcodes)
    x = normalize_hu(arr, cfg)[None, None]
    small = resample_image(x, target_shape(arr.shape, spacing, preset.spacing_mm))
    return Prepared(small.contiguous(), tuple(arr.shape), tuple(vol.array.shape), ro)  # type: ignore[arg-type]


# ---- postprocessing ------------------------------------------------------------------------------


def _linear_weights(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of linear interpolation (align_corners=False, edges clamped)."""
    s = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    s = np.clip(s, 0, n_in - 1)
    i0 = np.floor(s).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (s - i0).astype(np.float32)


def upsample_argmax(logits: torch.Tensor, out_shape: tuple[int, int, int], slab: int = 16) -> np.ndarray:
    """Argmax of trilinearly upsampled logits, computed slab by slab along the first axis.

    Args:
        logits: (1, C, d, h, w) float tensor on any device.
        out_shape: (D, H, W) of the result.
        slab: output slices per step; memory is about ``C * slab * H * W * 4`` bytes.

    Returns:
        uint8 array of shape ``out_shape`` on the CPU.
    """
    _, _, d, _, _ = logits.shape
    D, H, W = out_shape
    out = np.empty(out_shape, dtype=np.uint8)
    i0, i1, w = _linear_weights(D, d)
    src = logits[0].transpose(0, 1)  # (d, C, h, w) view: low-res slices as a batch, no copy
    for a in range(0, D, slab):
        b = min(a + slab, D)
        lo, hi = int(i0[a]), int(i1[b - 1])
        # Channels last: the per-voxel argmax below then reads contiguous memory.
        chunk = src[lo : hi + 1].contiguous(memory_format=torch.channels_last)
        up = F.interpolate(chunk, size=(H, W), mode="bilinear", align_corners=False)
        up = up.permute(0, 2, 3, 1)  # (n, H, W, C), contiguous
        for k in range(a, b):
            s = torch.lerp(up[i0[k] - lo], up[i1[k] - lo], float(w[k])) if w[k] else up[i0[k] - lo]
            out[k] = s.argmax(dim=-1).to(torch.uint8).cpu().numpy()
        del up
    return out


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
                raise ValueError(
                    f"{self.model_path}: model was trained for labels {names}, not this label map; "
                    "move it aside or retrain"
                )
            net.load_state_dict(ckpt["state_dict"])
            trained = True
            logger.info(f"loaded weights {self.model_path} ({meta.get('summary', '')})")
        else:
            logger.warning(f"no weights at {self.model_path}: the model is UNTRAINED (random weights)")
            torch.manual_seed(0)  # same untrained output every time
            net = build_network(self.cfg, self.labelmap.num_classes)
        self.info = ModelInfo(self.model_path, trained, mtime, meta)
        return net.to(self.device).eval()

    # -- inference
    @contextmanager
    def _timer(self, latencies: dict[str, float], key: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        latencies[key] = round(time.perf_counter() - t0, 3)

    def predict_logits(self, image: torch.Tensor, net: torch.nn.Module | None = None) -> torch.Tensor:
        """Sliding-window logits (1, C, d, h, w) of a prepared image."""
        net = net or self.network()
        p = self.preset
        roi = tuple(min(r, max(16, s)) for r, s in zip(p.roi_size, image.shape[2:]))
        roi = tuple(int(np.ceil(r / 8) * 8) for r in roi)  # SegResNet needs multiples of 8
        use_amp = self.device.type == "cuda"
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=use_amp):
            logits = sliding_window_inference(
                image.to(self.device),
                roi_size=roi,
                sw_batch_size=p.sw_batch_size,
                predictor=net,
                overlap=p.overlap,
                mode="gaussian",
                padding_mode="constant",
                cval=-1.0,  # air after HU normalisation
            )
        return logits.float()

    def segment(self, vol: Volume) -> tuple[np.ndarray, dict[str, float]]:
        """Label map (uint8, the volume's own shape and orientation) and stage latencies in seconds."""
        lat: dict[str, float] = {}
        net = self.network()
        with self._timer(lat, "pre"):
            prep = prepare(vol, self.cfg, self.preset)
        with self._timer(lat, "infer"):
            logits = self.predict_logits(prep.image, net)
        with self._timer(lat, "post"):
            label = upsample_argmax(logits, prep.canonical_shape, self.cfg.output_slab_slices)
            del logits
            label = np.ascontiguousarray(prep.reorient.from_canonical(label))
        assert label.shape == prep.volume_shape, (label.shape, prep.volume_shape)
        return label, lat


def default_threads() -> None:
    """Use every core for intra-op work unless the operator set OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
