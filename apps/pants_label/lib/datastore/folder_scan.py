"""Reading a dataset folder into index rows: the PanTS layout or a flat folder of NIfTI images.

PanTS layout (read in place, never modified)::

    ROOT/ImageTr/<id>/ct.nii.gz                     training scans
    ROOT/LabelTr/<id>/segmentations/<name>.nii.gz   one binary mask per structure
    ROOT/ImageTe/..., ROOT/LabelTe/...              the test split

Flat layout: ``ROOT/<id>.nii.gz``, with existing labels in ``ROOT/labels/<tag>/<id>.nii.gz``.

Paths are kept relative to the root (``@root/...``), so a moved dataset folder still resolves.
A scan the index already knows costs one directory entry (no stat), so re-opening 36k scans is fast.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lib.core.labelmap import LabelMap
from lib.datastore.index import ScanChanges
from lib.datastore.label_upload import DatastoreError, check_image_id, check_tag
from lib.datastore.protocol import IMPORTED_TAG
from lib.datastore.rows import ScanState

logger = logging.getLogger(__name__)

PANTS_SPLITS = {"train": ("ImageTr", "LabelTr"), "test": ("ImageTe", "LabelTe")}
IMAGE_NAMES = ("ct.nii.gz", "ct.nii")
MASK_SUFFIXES = (".nii.gz", ".nii")
ROOT, STATE = "@root/", "@state/"

#: a scanned scan: (split, image path, mask folder or None), paths relative to the root
Scanned = tuple[str, str, str | None]


def detect_layout(root: str | os.PathLike) -> str:
    """``"pants"`` when ``root`` has ``ImageTr/`` or ``ImageTe/``, else ``"flat"``."""
    root = Path(root)
    return "pants" if any((root / d).is_dir() for d, _ in PANTS_SPLITS.values()) else "flat"


def strip_ext(name: str, exts: Sequence[str]) -> tuple[str, str] | None:
    """``(stem, extension)`` when ``name`` ends with one of ``exts``, else None."""
    for ext in exts:
        if name.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], ext
    return None


def scandir_names(path: Path, dirs: bool) -> list[str]:
    """Entry names (no hidden ones); ``is_dir`` uses d_type, so no stat per entry."""
    try:
        with os.scandir(path) as it:
            return [e.name for e in it if not e.name.startswith(".") and e.is_dir() == dirs]
    except FileNotFoundError:
        return []


def mask_files(folder: Path) -> dict[str, Path]:
    """``{structure name: file}`` of a PanTS ``segmentations/`` folder."""
    out = {}
    for name in scandir_names(folder, dirs=False):
        parsed = strip_ext(name, MASK_SUFFIXES)
        if parsed and not parsed[0].startswith("."):
            out[parsed[0]] = folder / name
    return out


class _LazyMask:
    """One mask file, read only when :meth:`LabelMap.consolidate` paints it (one mask in memory at a
    time, not 28); a trailing singleton 4th axis, as some exporters write, is dropped."""

    def __init__(self, path: Path) -> None:
        import nibabel as nib

        self.path, self.proxy = path, nib.load(str(path)).dataobj
        shape = tuple(int(n) for n in self.proxy.shape)
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) != 3:
            raise ValueError(f"mask {path}: expected a 3-D mask, got shape {shape}")
        self.shape = shape

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        return np.asarray(self.proxy).reshape(self.shape)


def read_mask_folder(folder: Path, lm: LabelMap, shape: Sequence[int] | None = None) -> np.ndarray:
    """A PanTS ``segmentations/`` folder as one uint8 label map, merged by the label map's overlap
    rule (:meth:`LabelMap.consolidate`). Files named after no structure are skipped with a warning.

    Raises ValueError naming the folder or file: no structure masks, or masks whose shapes differ
    from each other or from ``shape`` (the CT's)."""
    files = mask_files(Path(folder))
    unknown = sorted(set(files) - set(lm.names))
    if unknown:
        logger.warning("%s: skipping masks of unknown structures %s", folder, unknown)
    masks = {name: _LazyMask(path) for name, path in files.items() if name not in unknown}
    if not masks:
        raise ValueError(f"{folder}: no masks named after PanTS structures")
    want = tuple(shape) if shape is not None else masks[min(masks)].shape
    for m in (masks[n] for n in sorted(masks)):
        if m.shape != want:
            raise ValueError(f"mask {m.path} has shape {m.shape}, " +
                             ("the CT " if shape is not None else "the other masks ") + str(want))
    return lm.consolidate(masks)  # type: ignore[arg-type]


def scan_folder(root: Path, layout: str, exts: Sequence[str], known: dict[str, ScanState]) -> dict[str, Scanned]:
    """Every scan in the folder; known scans (``known``, from the index) are trusted without a stat."""
    return _scan_pants(root, known) if layout == "pants" else _scan_flat(root, exts)


def _scan_pants(root: Path, known: dict[str, ScanState]) -> dict[str, Scanned]:
    out: dict[str, Scanned] = {}
    for split, (img_dir, lab_dir) in PANTS_SPLITS.items():
        label_ids = set(scandir_names(root / lab_dir, dirs=True))
        for image_id in scandir_names(root / img_dir, dirs=True):
            if image_id in out:
                logger.warning("scan %s is in both ImageTr and ImageTe; serving the ImageTr copy", image_id)
                continue
            old = known.get(image_id)
            if old is not None and old.split == split and old.removed != 2:
                image_rel = old.path  # known scan: trust its file (no stat per scan on re-open)
            else:
                found = next((n for n in IMAGE_NAMES if (root / img_dir / image_id / n).is_file()), None)
                if found is None:
                    continue
                image_rel = f"{ROOT}{img_dir}/{image_id}/{found}"
            mask_dir = None
            if image_id in label_ids:
                rel = f"{ROOT}{lab_dir}/{image_id}/segmentations"
                if (old is not None and old.mask_dir == rel) or mask_files(root / lab_dir / image_id / "segmentations"):
                    mask_dir = rel
            out[image_id] = (split, image_rel, mask_dir)
    return out


def _scan_flat(root: Path, exts: Sequence[str]) -> dict[str, Scanned]:
    out: dict[str, Scanned] = {}
    for name in sorted(scandir_names(root, dirs=False)):
        parsed = strip_ext(name, exts)
        if parsed is None:
            continue
        image_id = parsed[0]
        try:
            check_image_id(image_id)
        except DatastoreError:
            logger.warning("skipping %s: its name is not a usable image id", name)
            continue
        out[image_id] = ("flat", ROOT + name, None)
    return out


def diff(scanned: dict[str, Scanned], known: dict[str, ScanState]) -> ScanChanges:
    """What the index must change to match the folder: new, moved, vanished and returned scans."""
    new, moved, missing, back = [], [], [], []
    for image_id, (split, rel, mask_dir) in scanned.items():
        old = known.get(image_id)
        if old is None:
            new.append((image_id, split, rel, mask_dir))
            continue
        if old.removed == 2:
            back.append(image_id)
        if (old.split, old.path, old.mask_dir) != (split, rel, mask_dir):
            moved.append((split, rel, mask_dir, image_id))
    missing = [i for i, old in known.items() if i not in scanned and old.removed == 0]
    return ScanChanges(new, moved, missing, back)


def flat_label_files(root: Path, exts: Sequence[str]) -> dict[tuple[str, str], str]:
    """``{(image id, tag): path}`` of the labels a flat folder ships (``labels/<tag>/<id>.nii.gz``)."""
    labels_dir = root / "labels"
    found: dict[tuple[str, str], str] = {}
    for tag in scandir_names(labels_dir, dirs=True):
        try:
            check_tag(tag)
        except DatastoreError:
            continue
        if tag == IMPORTED_TAG:
            continue
        for name in scandir_names(labels_dir / tag, dirs=False):
            parsed = strip_ext(name, exts)
            if parsed:
                found[(parsed[0], tag)] = f"{ROOT}labels/{tag}/{name}"
    return found


__all__ = [
    "PANTS_SPLITS", "ROOT", "STATE", "Scanned", "detect_layout", "diff", "flat_label_files", "mask_files",
    "scan_folder", "scandir_names", "strip_ext",
]
