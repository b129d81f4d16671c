"""Training data for full-size 28-class CT: a disk cache of preprocessed scans, class-aware crops,
and a validation split that never moves a scan once it is placed.

Scans are preprocessed once with exactly the infer pipeline (:func:`lib.segmenter.prepare`), stored
as ``.npy`` at the preset's spacing and memory-mapped while training, so RAM use does not grow with
the number of scans (MONAI's CacheDataset keeps every volume in memory).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from lib.labelmap import LabelMap
from lib.segmenter import prepare, resample_label
from lib.settings import Preset, SegmentationConfig
from lib.volume_io import load_volume

logger = logging.getLogger(__name__)

_MAX_CENTRES_PER_CLASS = 4000  # stored candidate crop centres per class and scan


@dataclass
class CachedCase:
    image_id: str
    image: np.ndarray  # (d, h, w) float16, memory-mapped
    label: np.ndarray  # (d, h, w) uint8, memory-mapped
    centres: dict[int, np.ndarray]  # class id -> (n, 3) voxel coordinates


def _key(image: str, label: str, preset: Preset) -> str:
    parts = [preset.model_dump_json()]
    for p in (image, label):
        st = os.stat(p)
        parts.append(f"{os.path.abspath(p)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


class CaseCache:
    """Preprocessed (image, label) pairs on disk, keyed by file identity and preset."""

    def __init__(self, root: Path, cfg: SegmentationConfig, preset: Preset, labelmap: LabelMap) -> None:
        self.root = Path(root)
        self.cfg, self.preset, self.labelmap = cfg, preset, labelmap

    def get(self, image_id: str, image: str, label: str) -> CachedCase:
        folder = self.root / _key(image, label, self.preset)
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
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        np.save(tmp / "image.npy", prep.image[0, 0].numpy().astype(np.float16))
        np.save(tmp / "label.npy", small_lab.astype(np.uint8))
        np.savez(tmp / "centres.npz", **centres)
        (tmp / "done").write_text(json.dumps({"image": image, "label": label}))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process built it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


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
    ) -> None:
        self.cases, self.patch = cases, patch
        self.class_weights, self.background_weight = class_weights, background_weight
        self.rng = np.random.default_rng(seed)

    def _centre(self, case: CachedCase) -> np.ndarray:
        ids = [c for c in case.centres if c != 0 and len(case.centres[c])]
        weights = [self.class_weights.get(c, 1.0) for c in ids]
        if self.background_weight > 0:
            ids.append(-1)
            weights.append(self.background_weight)
        w = np.asarray(weights, dtype=np.float64)
        choice = ids[int(self.rng.choice(len(ids), p=w / w.sum()))] if w.sum() > 0 else -1
        if choice == -1:
            return np.array([self.rng.integers(0, s) for s in case.image.shape])
        pts = case.centres[choice]
        return pts[self.rng.integers(len(pts))].astype(np.int64)

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        imgs, labs = [], []
        for _ in range(batch_size):
            case = self.cases[int(self.rng.integers(len(self.cases)))]
            centre = self._centre(case)
            img, lab = crop(case.image, case.label, centre, self.patch)
            # Mild intensity jitter: centers differ in scanner calibration and noise.
            img = img * self.rng.uniform(0.9, 1.1) + self.rng.uniform(-0.05, 0.05)
            imgs.append(img)
            labs.append(lab)
        x = torch.from_numpy(np.stack(imgs)[:, None].astype(np.float32))
        y = torch.from_numpy(np.stack(labs)[:, None].astype(np.int64))
        return x, y


def crop(image: np.ndarray, label: np.ndarray, centre: np.ndarray, patch: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Patch around ``centre``, padded with air (-1) / background (0) where it leaves the volume."""
    out_i = np.full(patch, -1.0, dtype=np.float32)
    out_l = np.zeros(patch, dtype=np.uint8)
    src, dst = [], []
    for c, p, n in zip(centre, patch, image.shape):
        start = int(c) - p // 2
        s0, s1 = max(start, 0), min(start + p, n)
        src.append(slice(s0, s1))
        dst.append(slice(s0 - start, s1 - start))
    out_i[tuple(dst)] = image[tuple(src)]
    out_l[tuple(dst)] = label[tuple(src)]
    return out_i, out_l


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
