"""CT volumes as DICOM series and back, with exact geometry.

Geometry convention (both directions): a volume array ``a[i, j, k]`` with a NIfTI-style
voxel -> RAS affine becomes slices ``k`` whose DICOM pixel ``(row, column)`` is ``a[column,
row, k]``; ImageOrientationPatient holds the (LPS) directions of ``i`` and ``j``, and
ImagePositionPatient the world position of voxel ``(0, 0, k)``. Reading a series sorts the
slices along the normal and rebuilds the same array and affine, so a NIfTI -> DICOM -> NIfTI
round trip is exact (up to HU rounding to int16).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

#: RAS <-> LPS (DICOM patient coordinates)
_FLIP = np.diag([-1.0, -1.0, 1.0])
#: our UIDs: derived from the case id, so loading a scan twice gives the same UIDs
UID_PREFIX = "2.25."


def stable_uid(*parts: str) -> str:
    """A UID that depends only on ``parts`` (re-loading a case yields the same study/series).

    ``2.25.<128-bit integer>`` as for UUID-derived UIDs, the integer a hash of ``parts``.
    """
    digest = hashlib.sha256("\x1f".join(("pants-label", *parts)).encode()).digest()[:16]
    return UID_PREFIX + str(int.from_bytes(digest, "big"))


@dataclass(frozen=True)
class SeriesGeometry:
    """Slices of a single-frame series sorted along their normal, with the volume's affine."""

    datasets: list[Dataset]  # sorted along the slice normal (k = 0, 1, ...)
    affine: np.ndarray  # voxel (i = column, j = row, k = slice) -> RAS mm

    @property
    def shape(self) -> tuple[int, int, int]:
        ds = self.datasets[0]
        return int(ds.Columns), int(ds.Rows), len(self.datasets)

    @property
    def sop_instance_uids(self) -> list[str]:
        return [str(d.SOPInstanceUID) for d in self.datasets]


def series_geometry(datasets: Sequence[Dataset], rtol: float = 1e-3) -> SeriesGeometry:
    """Sort single-frame slices along their normal and derive the volume affine.

    Raises:
        ValueError: no slices, slices of different orientation/size, or uneven slice spacing.
    """
    if not datasets:
        raise ValueError("series has no instances")
    first = datasets[0]
    iop = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    for ds in datasets:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, float), iop, atol=1e-4):
            raise ValueError(f"instance {ds.SOPInstanceUID}: orientation differs from the rest of the series")
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise ValueError(f"instance {ds.SOPInstanceUID}: size differs from the rest of the series")
    ordered = sorted(datasets, key=lambda d: float(np.dot(np.asarray(d.ImagePositionPatient, float), normal)))
    positions = np.array([np.asarray(d.ImagePositionPatient, float) for d in ordered])
    dr, dc = (float(v) for v in first.PixelSpacing)  # between rows, between columns
    if len(ordered) > 1:
        steps = np.diff(positions, axis=0)
        step = steps.mean(axis=0)
        if not np.allclose(steps, step, rtol=rtol, atol=1e-3 * max(1.0, float(np.linalg.norm(step)))):
            raise ValueError("slices are not evenly spaced: cannot form one volume")
    else:
        step = normal * float(getattr(first, "SliceThickness", 1.0) or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * dc  # i runs along a row: column index
    lps[:3, 1] = col_dir * dr  # j runs down a column: row index
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    ras = np.eye(4)
    ras[:3, :] = _FLIP @ lps[:3, :]
    return SeriesGeometry(list(ordered), ras)


def read_volume(geometry: SeriesGeometry, dtype: type = np.int16) -> np.ndarray:
    """The series' voxels in HU as ``a[i, j, k]`` (see module docstring)."""
    out = np.empty(geometry.shape, dtype=dtype)
    for k, ds in enumerate(geometry.datasets):
        px = ds.pixel_array.astype(np.float64)
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        icpt = float(getattr(ds, "RescaleIntercept", 0) or 0)
        out[:, :, k] = np.rint(px * slope + icpt).T if np.issubdtype(dtype, np.integer) else (px * slope + icpt).T
    return out


@dataclass(frozen=True)
class CTStudy:
    """What a CT series says about the patient and the scan (all optional but the ids)."""

    patient_id: str
    study_uid: str
    series_uid: str
    institution: str | None = None
    contrast_phase: str | None = None
    age_years: float | None = None
    sex: str | None = None  # "M" | "F"
    study_description: str = "PanTS abdominal CT"
    series_number: int = 1


def _age_string(age: float | None) -> str | None:
    return None if age is None else f"{int(round(age)):03d}Y"


def _contrast(phase: str | None) -> tuple[str | None, str]:
    """(ContrastBolusAgent, SeriesDescription) for a PanTS contrast phase."""
    if phase is None:
        return None, "CT"
    if phase == "non-contrast":
        return None, "CT non-contrast"
    return "IV contrast", f"CT {phase} phase"


def ct_series(volume: np.ndarray, affine: np.ndarray, study: CTStudy) -> list[Dataset]:
    """One CT Image Storage instance per slice ``k`` of ``volume`` (HU, any numeric dtype).

    Args:
        volume: 3-D array ``a[i, j, k]``.
        affine: voxel -> RAS mm (NIfTI convention); any orientation, not only axial.
        study: patient/study/series identity and metadata.

    Raises:
        ValueError: not a 3-D volume, or an affine whose columns are not orthogonal.
    """
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3-D, got shape {volume.shape}")
    lps = _FLIP @ np.asarray(affine, float)[:3, :]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"affine has a zero-length axis: {affine.tolist()}")
    dirs = lps[:, :3] / spacing
    if abs(float(np.dot(dirs[:, 0], dirs[:, 1]))) > 1e-4:
        raise ValueError("affine: the in-plane axes are not orthogonal (sheared volume)")
    hu = np.rint(np.asarray(volume, dtype=np.float64))
    lo, hi = float(hu.min()), float(hu.max())
    intercept = min(-1024.0, lo)  # keep stored values within int16
    if hi - intercept > 32767:
        raise ValueError(f"HU range {lo}..{hi} does not fit in int16")
    now = _dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    agent, series_description = _contrast(study.contrast_phase)
    frame_uid = stable_uid(study.series_uid, "frame")
    out: list[Dataset] = []
    for k in range(volume.shape[2]):
        ds = Dataset()
        sop_uid = stable_uid(study.series_uid, "slice", str(k))
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        # Orthanc stores a dataset without a preamble but then cannot read it back.
        ds.preamble = b"\0" * 128
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientID = study.patient_id
        ds.PatientName = f"{study.patient_id}^"  # family name only
        ds.PatientBirthDate = ""  # type 2: present, unknown
        ds.PatientSex = study.sex if study.sex in ("M", "F") else ""
        ds.ReferringPhysicianName = ""
        age = _age_string(study.age_years)
        if age:
            ds.PatientAge = age
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study.study_uid, study.series_uid
        ds.StudyID = study.patient_id[-16:]
        ds.AccessionNumber = ""
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
        ds.StudyDescription = study.study_description
        ds.SeriesDescription = series_description
        ds.SeriesNumber, ds.InstanceNumber = study.series_number, k + 1
        ds.Manufacturer = "PanTS Label"
        if study.institution:
            ds.InstitutionName = study.institution
        if agent:
            ds.ContrastBolusAgent = agent
        ds.BodyPartExamined = "ABDOMEN"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [float(v) for v in lps @ np.array([0.0, 0.0, k, 1.0])]
        ds.ImageOrientationPatient = [float(v) for v in (*dirs[:, 0], *dirs[:, 1])]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # between rows, between columns
        ds.SliceThickness = float(spacing[2])
        ds.SliceLocation = float(ds.ImagePositionPatient[2])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(volume.shape[1]), int(volume.shape[0])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = intercept, 1.0, "HU"
        ds.WindowCenter, ds.WindowWidth = 40.0, 400.0
        ds.KVP = 120
        pixels = (hu[:, :, k].T - intercept).astype(np.int16)
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        out.append(ds)
    return out


__all__ = ["CTStudy", "SeriesGeometry", "ct_series", "read_volume", "series_geometry", "stable_uid"]
