"""The second stage: the pancreas region again, at a finer spacing.

At the whole-body spacing (``fast``: 6 mm) the duct and most lesions are a voxel or two. As the
strongest pancreatic-tumour pipelines do, a second network of the same kind (its own preset, the
same label map and training engine) sees only a box around the pancreas:

* training: boxes around each labelled scan's pancreas region (:func:`region_box` on the label),
  written as a dataset of crops (:func:`write_crop_case`) that the ordinary train task learns;
* infer: the box around the first stage's predicted pancreas region; inside it, the second stage
  decides every voxel that either stage calls pancreas, duct or lesion (:func:`merge`).
  :class:`SecondStage` does this whenever the dataset's model store holds weights for the
  ``second_stage`` preset (``configs/presets.yaml``); until then infer is the first stage alone.

The pancreas region is the label map's ``pancreas`` group (gland, head, body, tail, duct, lesion).
"""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np

from lib.core.labelmap import LabelMap
from lib.imaging.volume_io import Volume
from lib.model.segmenter import Segmenter

Box = tuple[slice, slice, slice]

#: label-map group that the second stage refines
REGION_GROUP = "pancreas"


def region_ids(lm: LabelMap) -> np.ndarray:
    return np.asarray(lm.ids_in_group(REGION_GROUP), dtype=np.int64)


def region_box(label: np.ndarray, lm: LabelMap, spacing: tuple[float, ...], margin_mm: float) -> Box | None:
    """The bounding box of the pancreas region in ``label`` plus ``margin_mm`` on each side,
    clipped to the array; None when the label has no pancreas voxel."""
    mask = np.isin(label, region_ids(lm))
    if not mask.any():
        return None
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        pad = int(np.ceil(margin_mm / float(spacing[axis])))
        out.append(slice(max(int(hit[0]) - pad, 0), min(int(hit[-1]) + 1 + pad, label.shape[axis])))
    return tuple(out)  # type: ignore[return-value]


def crop(vol: Volume, box: Box) -> Volume:
    """The sub-volume in ``box``, with the affine of its first voxel (same spacing and axes)."""
    start = np.array([s.start for s in box] + [1], dtype=np.float64)
    affine = vol.affine.copy()
    affine[:3, 3] = (vol.affine @ start)[:3]
    return Volume(np.ascontiguousarray(vol.array[box]), affine)


def merge(first: np.ndarray, second: np.ndarray, box: Box, lm: LabelMap) -> np.ndarray:
    """The first stage's label with the second stage's answer inside ``box`` wherever either
    stage sees the pancreas region (elsewhere the whole-body model decides)."""
    out = first.copy()
    ids = region_ids(lm)
    inner = out[box]
    decide = np.isin(inner, ids) | np.isin(second, ids)
    inner[decide] = second[decide]
    return out


class SecondStage:
    """Infer's second stage over the first stage's pancreas region (see the module docstring)."""

    def __init__(self, segmenter: Segmenter, margin_mm: float) -> None:
        self.segmenter = segmenter
        self.margin_mm = margin_mm

    def ready(self) -> bool:
        """Weights are in place (checked per request: a published stage 2 is used without a restart)."""
        return self.segmenter.model_path.exists()

    def refine(self, vol: Volume, first: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """``first`` with the region decided again; latencies ``stage2`` (s) and the box's voxels."""
        t0 = time.perf_counter()
        lm = self.segmenter.labelmap
        box = region_box(first, lm, vol.spacing, self.margin_mm)
        if box is None:  # no pancreas found: nothing to refine
            return first, {"stage2": round(time.perf_counter() - t0, 3)}
        second, _ = self.segmenter.segment(crop(vol, box))
        out = merge(first, second, box, lm)
        return out, {"stage2": round(time.perf_counter() - t0, 3)}


def write_crop_case(image: Volume, label: np.ndarray, lm: LabelMap, box: Box, image_path: Path, mask_dir: Path) -> None:
    """One training case of the second stage in the PanTS layout: the CT crop and one mask per
    structure present in it (the datastore consolidates them as it does PanTS masks)."""
    part = crop(image, box)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(part.array.astype(np.int16), part.affine), str(image_path))
    sub = label[box]
    for c in lm.classes:
        m = sub == c.id
        if m.any():
            nib.save(nib.Nifti1Image(m.astype(np.uint8), part.affine), str(mask_dir / f"{c.name}.nii.gz"))


__all__ = ["REGION_GROUP", "Box", "SecondStage", "crop", "merge", "region_box", "region_ids", "write_crop_case"]
