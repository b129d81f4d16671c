"""28-class label maps as DICOM SEG (written by highdicom in-process) and back.

Each PanTS class is one SEG segment: segment number = class id, label = class name, colour
from ``configs/labels.yaml`` (as CIELab), category/type codes from ``configs/dicom_seg.yaml``
(SNOMED CT). A SEG references its source CT series instance by instance, so a viewer (OHIF,
3D Slicer) overlays it on that series. Reading maps segments back to class ids by name, so a
SEG written by another tool with other segment numbers still lands on the right classes.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import highdicom as hd
import numpy as np
from nibabel import orientations as nio
from pydantic import BaseModel, ConfigDict, model_validator
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from lib.core.config_errors import ConfigError, load_yaml_model
from lib.core.errors import unknown
from lib.imaging.dicom_series import SeriesGeometry, stable_uid
from lib.core.labelmap import REPO_ROOT, LabelMap, load_labelmap

DEFAULT_SEG_CODES = REPO_ROOT / "configs" / "dicom_seg.yaml"
MANUFACTURER = "PanTS Label"
SOFTWARE_VERSION = "1.0"


# ---- coding config -----------------------------------------------------------------------------


class CodeItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    scheme: Literal["SCT", "DCM"]
    value: str
    meaning: str

    def code(self) -> Code:
        return Code(self.value, self.scheme, self.meaning)


class ClassCoding(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: CodeItem
    category: str = "anatomy"
    laterality: Literal["left", "right"] | None = None
    region: CodeItem | None = None


class SegCoding(BaseModel):
    """``configs/dicom_seg.yaml``: codes per class; :func:`load_seg_coding` checks it against the label map."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    categories: dict[str, CodeItem]
    laterality: dict[Literal["left", "right"], CodeItem]
    classes: dict[str, ClassCoding]

    @model_validator(mode="after")
    def _categories_known(self) -> "SegCoding":
        for name, c in self.classes.items():
            if c.category not in self.categories:
                raise ValueError(f"classes.{name}.category: {unknown('category', c.category, self.categories)}")
        return self


@functools.lru_cache(maxsize=4)
def _read_seg_coding(path: str) -> SegCoding:
    return load_yaml_model(Path(path), SegCoding)


def load_seg_coding(path: str | Path = DEFAULT_SEG_CODES, labelmap: LabelMap | None = None) -> SegCoding:
    """Load the SEG codes; every label-map class must be coded, and nothing else.

    Raises:
        ConfigError: a bad file, or classes that differ from the label map's (named).
    """
    lm = labelmap or load_labelmap()
    coding = _read_seg_coding(str(path))
    missing = [n for n in lm.names if n not in coding.classes]
    extra = sorted(set(coding.classes) - set(lm.names))
    if missing or extra:
        raise ConfigError(f"{path}: classes must match the label map (missing {missing}, unknown {extra})")
    return coding


# ---- colour ------------------------------------------------------------------------------------

# sRGB (D65) -> XYZ adapted to D50, the illuminant of DICOM's PCS-Lab (ICC sRGB matrix).
_RGB_TO_XYZ_D50 = np.array(
    [[0.4360747, 0.3850649, 0.1430804], [0.2225045, 0.7168786, 0.0606169], [0.0139322, 0.0971045, 0.7141733]]
)
_D50 = np.array([0.9642, 1.0, 0.8249])


def rgb_to_dicom_lab(rgb: Sequence[int]) -> tuple[int, int, int]:
    """sRGB 0..255 -> RecommendedDisplayCIELabValue (three 16-bit integers)."""
    c = np.asarray(rgb, float) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    t = (_RGB_TO_XYZ_D50 @ lin) / _D50
    f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])
    enc = [lab[0] * 65535 / 100, (lab[1] + 128) * 65535 / 255, (lab[2] + 128) * 65535 / 255]
    return tuple(int(np.clip(round(v), 0, 65535)) for v in enc)  # type: ignore[return-value]


def dicom_lab_to_rgb(value: Sequence[int]) -> tuple[int, int, int]:
    """RecommendedDisplayCIELabValue -> sRGB 0..255 (inverse of :func:`rgb_to_dicom_lab`)."""
    v = np.asarray(value, float)
    lab = np.array([v[0] * 100 / 65535, v[1] * 255 / 65535 - 128, v[2] * 255 / 65535 - 128])
    fy = (lab[0] + 16) / 116
    f = np.array([fy + lab[1] / 500, fy, fy - lab[2] / 200])
    t = np.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29))
    lin = np.linalg.solve(_RGB_TO_XYZ_D50, t * _D50)
    lin = np.clip(lin, 0, 1)
    c = np.where(lin <= 0.0031308, lin * 12.92, 1.055 * lin ** (1 / 2.4) - 0.055)
    return tuple(int(np.clip(round(x * 255), 0, 255)) for x in c)  # type: ignore[return-value]


# ---- writing -----------------------------------------------------------------------------------


def segment_descriptions(
    lm: LabelMap, coding: SegCoding, algorithm: hd.AlgorithmIdentificationSequence | None = None
) -> list[hd.seg.SegmentDescription]:
    """One description per class (number = id), MANUAL unless an ``algorithm`` is given."""
    out = []
    for c in lm.classes:
        cc = coding.classes[c.name]
        desc = hd.seg.SegmentDescription(
            segment_number=c.id,
            segment_label=c.name,
            segmented_property_category=coding.categories[cc.category].code(),
            segmented_property_type=cc.type.code(),
            algorithm_type="AUTOMATIC" if algorithm is not None else "MANUAL",
            algorithm_identification=algorithm,
            tracking_uid=stable_uid("pants-class", c.name),
            tracking_id=c.name,
            anatomic_regions=[cc.region.code()] if cc.region is not None else None,
        )
        if cc.laterality is not None:
            desc.SegmentedPropertyTypeModifierCodeSequence = [hd.sr.CodedConcept.from_code(
                coding.laterality[cc.laterality].code())]
        desc.RecommendedDisplayCIELabValue = list(rgb_to_dicom_lab(c.color))
        out.append(desc)
    return out


def align_to_series(label: np.ndarray, affine: np.ndarray, geometry: SeriesGeometry, rtol: float = 1e-3) -> np.ndarray:
    """Permute/flip ``label`` onto the series' voxel grid; refuse a different grid.

    Raises:
        ValueError: shape or affine do not describe the series' grid (message says how).
    """
    label = np.asarray(label)
    if label.ndim != 3:
        raise ValueError(f"label must be 3-D, got shape {label.shape}")
    fwd = nio.ornt_transform(nio.io_orientation(affine), nio.io_orientation(geometry.affine))
    out = nio.apply_orientation(label, fwd)
    new_affine = affine @ nio.inv_ornt_aff(fwd, label.shape)
    if out.shape != geometry.shape:
        raise ValueError(f"label shape {label.shape} does not match the series ({geometry.shape} after reorienting)")
    scale = float(np.abs(geometry.affine[:3, :3]).max())
    if not np.allclose(new_affine, geometry.affine, rtol=rtol, atol=rtol * scale):
        raise ValueError("label geometry does not match the series (affine differs)")
    return np.ascontiguousarray(out)


def label_to_seg(
    label: np.ndarray,
    affine: np.ndarray,
    geometry: SeriesGeometry,
    *,
    lm: LabelMap | None = None,
    coding: SegCoding | None = None,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    series_number: int = 300,
    content_label: str = "FINAL",
    description: str = "PanTS 28-class label",
    creator: str | None = None,
    algorithm: hd.AlgorithmIdentificationSequence | None = None,
) -> hd.seg.Segmentation:
    """A BINARY DICOM SEG of a uint8 label map (ids 0..N) over the CT series ``geometry``.

    All N classes are described (names, colours, codes) even when empty; only frames that hold
    a segment are stored.

    Raises:
        ValueError: the label does not lie on the series' grid, or holds ids outside 0..N.
    """
    lm = lm or load_labelmap()
    coding = coding or load_seg_coding(labelmap=lm)
    arr = align_to_series(label, affine, geometry)
    if arr.size and int(arr.max()) > lm.num_classes:
        raise ValueError(f"label holds value {int(arr.max())}; ids must be 0..{lm.num_classes}")
    # (frames, rows, columns) in the order of the sorted source instances
    pixels = np.ascontiguousarray(arr.astype(np.uint8, copy=False).transpose(2, 1, 0))
    source = geometry.datasets
    seg = hd.seg.Segmentation(
        source_images=source,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(lm, coding, algorithm),
        series_instance_uid=series_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="PanTS Label",
        software_versions=SOFTWARE_VERSION,
        device_serial_number="0",
        content_label=content_label,
        content_description=description[:64],
        content_creator_name=creator,
        omit_empty_frames=True,
    )
    seg.SeriesDescription = description[:64]
    # Series date/time order the label versions of one image (newest wins when read).
    seg.SeriesDate, seg.SeriesTime = seg.ContentDate, seg.ContentTime
    # Orthanc stores a dataset without a preamble but then cannot read it back.
    seg.preamble = b"\0" * 128
    return seg


# ---- reading -----------------------------------------------------------------------------------


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")


def segment_to_class(seg: Dataset, lm: LabelMap) -> dict[int, int]:
    """Segment number -> class id, by segment label (case/space-insensitive).

    Raises:
        ValueError: a segment whose label names no class of the label map.
    """
    by_name = {_norm(n): i for n, i in lm.name_to_id.items()}
    out: dict[int, int] = {}
    unknown = []
    for item in seg.SegmentSequence:
        cid = by_name.get(_norm(str(item.SegmentLabel)))
        if cid is None:
            unknown.append(str(item.SegmentLabel))
        else:
            out[int(item.SegmentNumber)] = cid
    if unknown:
        raise ValueError(f"SEG segments {unknown} name no class of the label map ({', '.join(lm.names)})")
    return out


#: most segments a SEG may describe (one per class is all that maps to the label map)
MAX_SEGMENTS = 255


def check_seg_size(seg_ds: Dataset, geometry: SeriesGeometry) -> None:
    """Refuse a SEG whose header does not fit the series, before any pixel is decoded: its frames
    must have the series' rows and columns, be at most one per segment and slice, and its pixel
    data must be as long as they say (a header cannot make the decoder allocate more).

    Raises:
        ValueError: naming the field that does not fit.
    """
    cols, rows, slices = geometry.shape
    try:
        n_rows, n_cols = int(seg_ds.Rows), int(seg_ds.Columns)
        frames = int(getattr(seg_ds, "NumberOfFrames", 1) or 1)
        bits = int(seg_ds.BitsAllocated)
        segments = len(seg_ds.SegmentSequence)
    except (AttributeError, TypeError, ValueError) as err:
        raise ValueError(f"the SEG header is incomplete ({err})") from None
    if (n_rows, n_cols) != (rows, cols):
        raise ValueError(f"SEG frames are {n_rows}x{n_cols}; the CT series has {rows}x{cols}")
    if not 1 <= segments <= MAX_SEGMENTS:
        raise ValueError(f"SEG describes {segments} segments; 1..{MAX_SEGMENTS} are accepted")
    if not 1 <= frames <= segments * slices:
        raise ValueError(f"SEG has {frames} frames; at most {segments * slices} (segments x slices) fit this series")
    if bits not in (1, 8):
        raise ValueError(f"SEG BitsAllocated {bits} is not 1 or 8")
    pixel_data = seg_ds.get("PixelData") if isinstance(seg_ds, Dataset) else None
    if pixel_data:  # absent from a metadata-only answer
        need = (frames * rows * cols * bits + 7) // 8
        if len(pixel_data) < need:
            raise ValueError(f"SEG pixel data holds {len(pixel_data)} bytes; its header needs {need}")


def seg_to_label(seg_ds: Dataset, geometry: SeriesGeometry, lm: LabelMap | None = None) -> np.ndarray:
    """Decode a SEG over ``geometry``'s series into a uint8 label map ``a[i, j, k]``.

    Overlapping segments (a SEG from another tool) are merged by the label map's overlap priority.

    Raises:
        ValueError: the SEG names unknown classes or does not reference this series.
    """
    lm = lm or load_labelmap()
    check_seg_size(seg_ds, geometry)
    seg = seg_ds if isinstance(seg_ds, hd.seg.Segmentation) else hd.seg.Segmentation.from_dataset(seg_ds)
    lut_map = segment_to_class(seg, lm)
    uids = geometry.sop_instance_uids
    referenced = {str(r.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence
                  for r in s.ReferencedInstanceSequence}
    if not referenced & set(uids):
        raise ValueError("the SEG does not reference any instance of this series")
    common = dict(source_sop_instance_uids=uids, assert_missing_frames_are_empty=True)
    try:
        combined = seg.get_pixels_by_source_instance(combine_segments=True, relabel=False, **common)
        lut = np.zeros(max(lut_map) + 1, dtype=np.uint8)
        for number, cid in lut_map.items():
            lut[number] = cid
        frames = lut[combined]
    except RuntimeError:  # overlapping segments: consolidate by priority
        masks: dict[str, np.ndarray] = {}
        for number, cid in lut_map.items():
            m = seg.get_pixels_by_source_instance(segment_numbers=[number], **common)[..., 0].astype(bool)
            name = lm.id_to_name[cid]
            masks[name] = masks[name] | m if name in masks else m
        frames = lm.consolidate(masks)
    return np.ascontiguousarray(frames.transpose(2, 1, 0).astype(np.uint8))


__all__ = [
    "DEFAULT_SEG_CODES",
    "check_seg_size",
    "SegCoding",
    "align_to_series",
    "dicom_lab_to_rgb",
    "label_to_seg",
    "load_seg_coding",
    "rgb_to_dicom_lab",
    "seg_to_label",
    "segment_descriptions",
    "segment_to_class",
]
