"""Loading PanTS NIfTI scans (and their masks) into a DICOMweb server as CT series + DICOM SEG.

A case becomes one study (UIDs derived from the case id, so loading it again replaces it
instead of duplicating it) with one CT series carrying the metadata PanTS knows: center as
InstitutionName, contrast phase (SeriesDescription, ContrastBolusAgent), patient age and sex.
Its masks, consolidated by the label map's overlap priority, become one SEG with ContentLabel
``PANTS`` (served by the DICOMweb datastore under the tag ``pants``).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from dicomweb_client import DICOMwebClient

from lib.imaging.dicom_seg import label_to_seg
from lib.imaging.dicom_series import CTStudy, ct_series, series_geometry, stable_uid
from lib.datastore.dicomweb import store
from lib.datastore.folder_scan import mask_files, read_mask_folder
from lib.datastore.label_upload import as_integer
from lib.core.errors import ClientError
from lib.core.labelmap import LabelMap, load_labelmap
from lib.imaging.metadata import CaseMeta, find_metadata, read_metadata
from lib.imaging.volume_decode import check_image_header, read_header

#: slices per STOW-RS request (a 512x512 int16 slice is 0.5 MB)
STOW_BATCH = 64


@dataclass(frozen=True)
class Case:
    case_id: str
    image: Path
    masks: Path | None  # PanTS segmentations/ folder, or a flat label map file
    meta: CaseMeta | None


@dataclass(frozen=True)
class Loaded:
    case_id: str
    study_uid: str
    series_uid: str
    seg_uid: str | None
    slices: int


@dataclass(frozen=True)
class Skipped:
    """A case whose files could not be loaded; nothing of it was stored."""

    case_id: str
    reason: str


class CaseError(ValueError):
    """A case's own files are unreadable or do not fit (the message names the case). Other cases
    can still load, unlike a server or network failure."""


#: what reading a broken NIfTI (or a label that does not fit) raises
_FILE_ERRORS = (ValueError, OSError, EOFError, zlib.error, ImageFileError, ClientError)


def find_cases(root: str | os.PathLike, case_ids: Sequence[str] | None = None) -> list[Case]:
    """Cases under a PanTS root (``ImageTr``/``ImageTe`` + ``LabelTr``/``LabelTe``) or a flat
    folder (``<id>.nii.gz``, labels in ``labels/final/<id>.nii.gz``), with their metadata rows.

    Raises:
        FileNotFoundError: ``root`` is not a folder, or a requested case id is not there.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    meta_file = find_metadata(root)
    meta = read_metadata(meta_file) if meta_file else {}
    cases: list[Case] = []
    pants = [(root / i, root / lab) for i, lab in (("ImageTr", "LabelTr"), ("ImageTe", "LabelTe")) if (root / i).is_dir()]
    if pants:
        for images, labels in pants:
            for d in sorted(p for p in images.iterdir() if p.is_dir() and not p.name.startswith(".")):
                ct = next((d / n for n in ("ct.nii.gz", "ct.nii") if (d / n).is_file()), None)
                if ct is not None:
                    seg = labels / d.name / "segmentations"
                    cases.append(Case(d.name, ct, seg if seg.is_dir() else None, meta.get(d.name)))
    else:
        for f in sorted(root.iterdir()):
            for ext in (".nii.gz", ".nii"):
                if f.is_file() and f.name.endswith(ext) and not f.name.startswith("."):
                    cid = f.name[: -len(ext)]
                    lab = root / "labels" / "final" / f.name
                    cases.append(Case(cid, f, lab if lab.is_file() else None, meta.get(cid)))
    if case_ids:
        by_id = {c.case_id: c for c in cases}
        missing = [c for c in case_ids if c not in by_id]
        if missing:
            raise FileNotFoundError(f"cases not found under {root}: {missing}")
        cases = [by_id[c] for c in case_ids]
    return cases


def read_label_file(path: Path, shape: tuple[int, ...], lm: LabelMap) -> np.ndarray:
    """A flat label map file as uint8, checked against the CT's shape (from the header, before
    reading the voxels) and the label map's ids (no silent wrap-around or truncation).

    Raises:
        ValueError: another shape, or values that are not the ids 0..N (message names them).
    """
    img = nib.load(str(path))
    dims = tuple(img.shape)
    if len(dims) == 4 and dims[3] == 1:
        dims = dims[:3]
    if dims != tuple(shape):
        raise ValueError(f"label {path} has shape {tuple(img.shape)}, the CT {tuple(shape)}")
    try:  # the server's check of uploaded labels: whole numbers, counted in chunks
        arr = as_integer(np.asarray(img.dataobj).reshape(dims))
    except ClientError as err:
        raise ValueError(f"label {path}: {err.detail}; ids must be 0..{lm.num_classes}") from None
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if lo < 0 or hi > lm.num_classes:
        raise ValueError(f"label {path} holds values {lo:g} to {hi:g}; ids must be 0..{lm.num_classes}")
    return arr.astype(np.uint8)


def case_label(case: Case, shape: tuple[int, ...], lm: LabelMap) -> np.ndarray | None:
    """The case's masks as one label map (``None`` if it has none).

    Raises:
        ValueError: a mask or label file that does not fit the CT or the label map (names the case).
    """
    if case.masks is None:
        return None
    if case.masks.is_file():
        try:
            return read_label_file(case.masks, shape, lm)
        except ValueError as err:
            raise ValueError(f"{case.case_id}: {err}") from None
    if not set(mask_files(case.masks)) & set(lm.names):
        return None
    try:
        return read_mask_folder(case.masks, lm, shape)
    except ValueError as err:
        raise ValueError(f"{case.case_id}: {err}") from None


def _read_case(case: Case, with_labels: bool, lm: LabelMap) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The CT (float32), its affine and (``with_labels``) its label map, all checked before anything
    is stored: a bad label leaves the case out, not half-loaded as a CT that looks unlabelled.

    Raises:
        CaseError: an unreadable or oversized CT, or masks that do not fit it.
    """
    try:
        # the header's size is checked before nibabel allocates what it claims
        check_image_header(read_header(case.image), what=f"CT {case.image}")
        img = nib.load(str(case.image))
        volume = np.asarray(img.dataobj, dtype=np.float32)
        if volume.ndim == 4 and volume.shape[3] == 1:
            volume = volume[..., 0]
        label = case_label(case, volume.shape, lm) if with_labels else None
    except _FILE_ERRORS as err:
        text = err.detail if isinstance(err, ClientError) else str(err) or type(err).__name__
        text = " ".join(text.split())  # one line per skipped case in the loader's report
        raise CaseError(text if text.startswith(case.case_id) else f"{case.case_id}: {text}") from None
    return volume, img.affine, label


def load_case(client: DICOMwebClient, case: Case, *, with_labels: bool = True, lm: LabelMap | None = None) -> Loaded:
    """Store one case in the server: its CT series and (``with_labels``) its masks as a SEG.

    Raises:
        CaseError: the case's files (nothing was stored). Server and network errors pass through.
    """
    lm = lm or load_labelmap()
    volume, affine, label = _read_case(case, with_labels, lm)
    m = case.meta
    study = CTStudy(
        patient_id=case.case_id,
        study_uid=stable_uid(case.case_id, "study"),
        series_uid=stable_uid(case.case_id, "ct"),
        institution=m.center if m else None,
        contrast_phase=m.contrast_phase if m else None,
        age_years=m.age if m else None,
        sex=m.sex if m else None,
    )
    datasets = ct_series(volume, affine, study)
    for s in range(0, len(datasets), STOW_BATCH):
        store(client, datasets[s : s + STOW_BATCH])
    seg_uid = None
    if label is not None:
        seg_uid = stable_uid(case.case_id, "pants-seg")
        seg = label_to_seg(
            label, affine, series_geometry(datasets), lm=lm, series_uid=seg_uid,
            sop_instance_uid=stable_uid(case.case_id, "pants-seg", "instance"), content_label="PANTS",
            description="PanTS masks", series_number=200,
        )
        store(client, [seg])
    return Loaded(case.case_id, study.study_uid, study.series_uid, seg_uid, len(datasets))


def load_cases(
    client: DICOMwebClient, cases: Sequence[Case], *, with_labels: bool = True, progress: bool = False
) -> Iterator[Loaded | Skipped]:
    """:func:`load_case` for each case, with a progress bar if asked. A case whose files are bad is
    yielded as :class:`Skipped` and the rest still load; a server or network error stops the run."""
    lm = load_labelmap()
    it: Sequence[Case] = cases
    if progress:
        from tqdm import tqdm

        it = tqdm(cases, desc="loading", unit="case")
    for case in it:
        try:
            yield load_case(client, case, with_labels=with_labels, lm=lm)
        except CaseError as err:
            yield Skipped(case.case_id, str(err))


__all__ = ["Case", "Loaded", "Skipped", "CaseError", "find_cases", "case_label", "read_label_file", "load_case", "load_cases"]
