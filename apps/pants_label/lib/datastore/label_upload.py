"""Label files in and out: checking an uploaded label and mapping it to canonical ids; writing
label maps atomically; splitting a label map back into PanTS per-structure masks.

An upload (``PUT /datastore/label``) is refused with an HTTP 4xx whose message names the problem
unless it is a NIfTI (``.nii``/``.nii.gz``) or NRRD (``.nrrd``/``.seg.nrrd``) volume with the
image's shape and affine, integer values, and every non-zero value named: by
``params["label_info"]`` (``[{"name": ..., "idx": ...}]``, where 3D Slicer's ``idx`` is the
segment's position and the voxel value it exports), by a ``.seg.nrrd``'s own segment header, or,
without either, already a canonical id ``1..N`` of the label map.
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from lib.core.atomic import atomic_write
from lib.core.errors import ClientError, bad_request, unprocessable
from lib.core.labelmap import LabelMap
from lib.datastore.protocol import FINAL_TAG, IMPORTED_TAG
from lib.imaging.volume_decode import MAX_LAYERS, read_data, read_header

#: relative tolerance when comparing a label's affine with its image's
AFFINE_RTOL = 1e-3
#: voxel values above this are refused outright (no bincount over billions of bins)
MAX_LABEL_VALUE = 65535
_CHUNK = 1 << 22  # voxels per chunk: keeps int64 temporaries of value counting at 32 MB

#: ids and tags: a file/folder name that cannot leave its parent folder
#: (matched in full: ``$`` would also accept a trailing newline)
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SAFE_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


#: the datastores' name for the client error type (one type for every refused request)
DatastoreError = ClientError


def check_image_id(image_id: Any, param: str = "image") -> str:
    """Refuse ids that are empty, not strings, or could escape a folder (``..``, ``/``, absolute)."""
    if not isinstance(image_id, str) or not _SAFE_NAME.fullmatch(image_id) or ".." in image_id:
        raise bad_request(
            f"{param} {image_id!r} is not a valid image id: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..' or path separators"
        )
    return image_id


def check_tag(tag: Any) -> str:
    if not isinstance(tag, str) or not _SAFE_TAG.fullmatch(tag):
        raise bad_request(
            f"tag {tag!r} is not a valid label tag: use 1-64 letters, digits, '_' or '-', "
            "starting with a letter or digit (no '.', '/' or '..')"
        )
    return tag


def check_save_target(image_id: Any, label_tag: Any) -> tuple[str, str]:
    """The image id and tag of a label save (both backends); the imported tag only the dataset writes."""
    image_id = check_image_id(image_id)
    tag = check_tag(label_tag or FINAL_TAG)
    if tag == IMPORTED_TAG:
        raise bad_request(f"tag {tag!r} is reserved for the masks imported from PanTS (read-only); save as 'final'")
    return image_id, tag


# ---- reading ---------------------------------------------------------------------------------


@dataclass
class Geometry:
    """Voxel grid of an image: shape and voxel-to-RAS affine."""

    shape: tuple[int, ...]
    affine: np.ndarray


@dataclass
class LabelFile:
    """A decoded label upload before value mapping."""

    data: np.ndarray  # 3-D (or 4-D layers for a multi-layer .seg.nrrd, layer axis first)
    affine: np.ndarray
    kind: str  # "nifti" | "nrrd"
    segments: list[tuple[str, int, int]] | None = None  # .seg.nrrd: (name, layer, value)


def read_geometry(path: str | os.PathLike) -> Geometry:
    """Shape and affine from an image header (no voxel data read)."""
    img = nib.load(str(path))
    return Geometry(tuple(int(s) for s in img.shape[:3]), np.asarray(img.affine, dtype=np.float64))


def read_label_file(path: str | os.PathLike, image: Geometry, max_bytes: int) -> LabelFile:
    """Decode a NIfTI or attached NRRD label for ``image`` (by content; the upload's name is not trusted).

    The header is checked against the image's grid before any voxel buffer is allocated, and the
    data is read as a stream of exactly the header's size (:mod:`lib.imaging.volume_decode`), so a file
    cannot make the server read another file or allocate more than a label of this image needs.

    Raises:
        DatastoreError: 400 corrupt gzip, 413 too large, 415 neither NIfTI nor NRRD,
            422 a header or data that does not fit the image.
    """
    size = Path(path).stat().st_size
    if size > max_bytes:
        raise DatastoreError(413, f"label file is {size} bytes; the limit is {max_bytes}")
    hdr = read_header(path)
    segments = _seg_nrrd_segments(hdr.fields) if hdr.kind == "nrrd" else None
    layer_axes = [a for a in range(len(hdr.shape)) if a not in hdr.spatial_axes]
    layers = [hdr.shape[a] for a in layer_axes if hdr.shape[a] != 1]
    if hdr.kind == "nifti" and tuple(hdr.spatial_axes) != (0, 1, 2):
        raise unprocessable(f"label must be a 3-D volume, got shape {hdr.shape}")
    if len(layers) > (1 if segments else 0) or (layers and layers[0] > MAX_LAYERS):
        raise unprocessable(f"label must be a 3-D volume (or up to {MAX_LAYERS} .seg.nrrd segment layers), "
                            f"got shape {hdr.shape}")
    check_geometry(hdr.spatial_shape, hdr.affine, image)
    if hdr.scale != (1.0, 0.0) and hdr.scale != (0.0, 0.0):
        raise unprocessable(f"label has NIfTI scaling (scl_slope {hdr.scale[0]:g}, scl_inter {hdr.scale[1]:g}); "
                            "save the label map unscaled")
    data = read_data(path, hdr)
    if layer_axes:  # layers first, then the three spatial axes
        data = np.moveaxis(data, layer_axes, list(range(len(layer_axes)))).reshape((-1, *hdr.spatial_shape))
        data = data if segments else data[0]
    elif segments:
        data = data[None]
    return LabelFile(data=data, affine=hdr.affine, kind=hdr.kind, segments=segments)


def _seg_nrrd_segments(header: Mapping[str, Any]) -> list[tuple[str, int, int]] | None:
    """3D Slicer ``.seg.nrrd`` segment table: ``SegmentN_Name/_Layer/_LabelValue``."""
    segs = []
    n = 0
    while f"Segment{n}_Name" in header:
        if n >= MAX_LAYERS:
            raise unprocessable(f"seg.nrrd header lists more than {MAX_LAYERS} segments")
        name = str(header[f"Segment{n}_Name"])
        try:
            layer = int(header.get(f"Segment{n}_Layer", 0))
            value = int(header.get(f"Segment{n}_LabelValue", n + 1))
        except ValueError:
            raise unprocessable(f"seg.nrrd header: Segment{n}_Layer/_LabelValue are not integers") from None
        if value <= 0 or value > MAX_LABEL_VALUE:
            raise unprocessable(
                f"seg.nrrd Segment{n}_LabelValue {value} ({name!r}) is out of range: segment values are "
                f"1..{MAX_LABEL_VALUE} (0 is background)"
            )
        if layer < 0:
            raise unprocessable(f"seg.nrrd Segment{n}_Layer {layer} ({name!r}) is negative")
        segs.append((name, layer, value))
        n += 1
    return segs or None


# ---- checking and mapping --------------------------------------------------------------------


def check_geometry(shape: tuple[int, ...], affine: np.ndarray, image: Geometry, rtol: float = AFFINE_RTOL) -> None:
    """Refuse a label whose grid is not the image's: same shape, affine equal within ``rtol``.

    The tolerance is relative to the size of each affine entry, with a floor of ``rtol`` times
    the largest voxel size, so float32 header round-off passes and a voxel shift or flip does not.
    """
    if tuple(shape) != tuple(image.shape):
        raise unprocessable(f"label shape {tuple(shape)} does not match the image shape {tuple(image.shape)}")
    voxel = float(np.sqrt((image.affine[:3, :3] ** 2).sum(axis=0)).max())
    if not np.allclose(affine, image.affine, rtol=rtol, atol=rtol * max(voxel, 1e-6)):
        diff = float(np.abs(affine - image.affine).max())
        raise unprocessable(
            f"label affine does not match the image affine (largest difference {diff:.4g}, "
            f"tolerance {rtol:g} relative); label affine {np.round(affine, 4).tolist()}, "
            f"image affine {np.round(image.affine, 4).tolist()}"
        )


def _flat_views(data: np.ndarray) -> tuple[np.ndarray, str]:
    if data.flags.f_contiguous and not data.flags.c_contiguous:
        return data.reshape(-1, order="F"), "F"
    return np.ascontiguousarray(data).reshape(-1), "C"


def as_integer(data: np.ndarray) -> np.ndarray:
    """Integer voxel values: integer dtypes pass; floats pass only if every value is a whole number."""
    if data.dtype.kind in "iu":
        return data
    if data.dtype.kind == "b":
        return data.view(np.uint8)
    if data.dtype.kind != "f":
        raise unprocessable(f"label voxel type {data.dtype} is not numeric; use an integer type such as uint8")
    flat, _ = _flat_views(data)
    for s in range(0, flat.size, _CHUNK):
        part = flat[s : s + _CHUNK]
        bad = ~np.isfinite(part) | (part != np.round(part))
        if bad.any():
            v = part[bad][0]
            raise unprocessable(
                f"label values must be integers; found {float(v)!r} (voxel type {data.dtype}); "
                "save the segmentation as a labelmap with an integer type such as uint8"
            )
    lo, hi = float(np.nanmin(data)), float(np.nanmax(data))
    if lo < 0 or hi > MAX_LABEL_VALUE:
        _range_error(lo, hi)
    return data.astype(np.uint16 if hi > 255 else np.uint8)


def _range_error(lo: float, hi: float) -> None:
    if lo < 0:
        raise unprocessable(f"label values must be >= 0; found {lo:g}")
    raise unprocessable(f"label value {hi:g} is out of range (values must be 0..{MAX_LABEL_VALUE})")


def present_values(data: np.ndarray) -> np.ndarray:
    """Voxel counts per value (index = value), counted in chunks to bound memory."""
    lo, hi = int(data.min()), int(data.max())
    if lo < 0 or hi > MAX_LABEL_VALUE:
        _range_error(lo, hi)
    counts = np.zeros(hi + 1, dtype=np.int64)
    flat, _ = _flat_views(data)
    for s in range(0, flat.size, _CHUNK):
        counts += np.bincount(flat[s : s + _CHUNK].astype(np.intp, copy=False), minlength=hi + 1)
    return counts


def normalize_name(name: str) -> str:
    """Segment names as typed in viewers ("Pancreas head") to label-map names ("pancreas_head")."""
    return re.sub(r"[\s\-]+", "_", str(name).strip().lower())


def value_to_name(label_info: Any) -> dict[int, str]:
    """``{voxel value: segment name}`` from ``params["label_info"]``; refuses malformed entries."""
    if isinstance(label_info, str):
        import json

        try:
            label_info = json.loads(label_info)
        except ValueError:
            raise bad_request("params.label_info is not valid JSON") from None
    if not isinstance(label_info, Sequence) or isinstance(label_info, (str, bytes)):
        raise bad_request(
            f"params.label_info must be a list of {{'name': ..., 'idx': ...}}, got {type(label_info).__name__}"
        )
    out: dict[int, str] = {}
    for i, entry in enumerate(label_info):
        if not isinstance(entry, Mapping) or "name" not in entry:
            raise bad_request(f"params.label_info[{i}] must be an object with 'name' and 'idx', got {entry!r}")
        raw_idx = entry.get("idx", entry.get("id"))
        try:
            idx = int(raw_idx)
            if isinstance(raw_idx, bool) or idx != float(raw_idx):
                raise ValueError
        except (TypeError, ValueError):
            raise bad_request(f"params.label_info[{i}].idx must be an integer voxel value, got {raw_idx!r}") from None
        name = str(entry["name"])
        if normalize_name(name) == "background":
            if idx != 0:
                raise bad_request(f"params.label_info[{i}]: 'background' must have idx 0, got {idx}")
            continue
        if not 1 <= idx <= MAX_LABEL_VALUE:
            raise bad_request(
                f"params.label_info[{i}].idx {idx} is out of range: segments use voxel values 1..{MAX_LABEL_VALUE} "
                "(0 is background)"
            )
        if idx in out and normalize_name(out[idx]) != normalize_name(name):
            raise bad_request(f"params.label_info: idx {idx} is given two names, {out[idx]!r} and {name!r}")
        out[idx] = name
    return out


def resolve_names(named: Mapping[int, str], lm: LabelMap, source: str) -> dict[int, int]:
    """``{voxel value: canonical id}``; refuses names the label map does not know."""
    lut: dict[int, int] = {}
    unknown = []
    for value, name in named.items():
        cid = lm.name_to_id.get(normalize_name(name))
        if cid is None:
            unknown.append(f"{name!r} (value {value})")
        else:
            lut[value] = cid
    if unknown:
        raise unprocessable(
            f"unknown label names in {source}: {', '.join(unknown)}; known names: {', '.join(lm.names)}"
        )
    return lut


def map_values(data: np.ndarray, lut: Mapping[int, int], counts: np.ndarray, source: str) -> np.ndarray:
    """Apply ``lut`` (voxel value -> canonical id) as a uint8 lookup table, refusing unnamed values."""
    present = [int(v) for v in np.flatnonzero(counts) if v != 0]
    unnamed = [v for v in present if v not in lut]
    if unnamed:
        named = sorted(lut)
        raise unprocessable(
            f"voxel values {unnamed[:20]} are present in the label but not named by {source} "
            f"(named values: {named[:40]}); every non-zero value needs a segment name"
        )
    if data.dtype == np.uint8 and all(lut.get(v) == v for v in present):
        return data  # already canonical: nothing to copy
    table = np.zeros(len(counts), dtype=np.uint8)
    for v, cid in lut.items():
        if v < len(table):
            table[v] = cid
    flat, order = _flat_views(data)
    out = np.empty(data.shape, dtype=np.uint8, order=order)
    out_flat = out.reshape(-1, order=order)
    for s in range(0, flat.size, _CHUNK):
        out_flat[s : s + _CHUNK] = table[flat[s : s + _CHUNK]]
    return out


@dataclass
class CheckedLabel:
    """An upload turned into a canonical uint8 map on the image grid, with what was mapped."""

    array: np.ndarray
    counts: dict[str, int]  # voxels per class name (non-empty classes)
    mapping: dict[int, int]  # uploaded value -> canonical id
    source: str  # what named the values


def check_label(
    path: str | os.PathLike,
    image: Geometry,
    lm: LabelMap,
    label_info: Any = None,
    max_bytes: int = 1 << 30,
) -> CheckedLabel:
    """Read, check and map an uploaded label; raises :class:`DatastoreError` (4xx) on any problem."""
    # checked before the file is read; present but empty ({}) is refused too, not taken as "no names"
    named = value_to_name(label_info) if label_info is not None else None
    lf = read_label_file(path, image, max_bytes)
    if lf.segments is not None:
        return _check_seg_nrrd(lf, image, lm)
    data = as_integer(lf.data)
    counts = present_values(data)
    if named is not None:
        source = "params.label_info"
        lut = resolve_names(named, lm, source)
    else:
        source = f"the canonical ids 1..{lm.num_classes} (no params.label_info given)"
        if len(counts) - 1 > lm.num_classes:
            extra = [int(v) for v in np.flatnonzero(counts) if v > lm.num_classes]
            raise unprocessable(
                f"label values {extra[:20]} are outside 0..{lm.num_classes}: without params.label_info "
                f"values must be canonical ids 0..{lm.num_classes}"
            )
        lut = {i: i for i in range(1, lm.num_classes + 1)}
    out = map_values(data, lut, counts, source)
    class_counts: dict[str, int] = {}
    for v in np.flatnonzero(counts):
        if v:
            name = lm.id_to_name[lut[int(v)]]
            class_counts[name] = class_counts.get(name, 0) + int(counts[v])
    return CheckedLabel(out, class_counts, {int(k): int(v) for k, v in lut.items()}, source)


def _check_seg_nrrd(lf: LabelFile, image: Geometry, lm: LabelMap) -> CheckedLabel:
    """A ``.seg.nrrd``: names come from its segment header; overlapping layers merge by priority."""
    assert lf.segments is not None
    data = as_integer(lf.data)  # (layers, x, y, z), geometry checked on reading
    named = {i: name for i, (name, _, _) in enumerate(lf.segments)}
    lut = resolve_names(named, lm, "the seg.nrrd segment names")
    described = {(layer, value) for _, layer, value in lf.segments}
    for layer in range(data.shape[0]):
        counts = present_values(data[layer])
        extra = [int(v) for v in np.flatnonzero(counts) if v and (layer, int(v)) not in described]
        if extra:
            raise unprocessable(
                f"seg.nrrd layer {layer} holds voxel values {extra[:20]} that no segment in its header describes"
            )
    masks: dict[str, np.ndarray] = {}
    for i, (_, layer, value) in enumerate(lf.segments):
        if layer >= data.shape[0]:
            raise unprocessable(f"seg.nrrd Segment{i}_Layer {layer} does not exist (file has {data.shape[0]} layers)")
        name = lm.id_to_name[lut[i]]
        m = data[layer] == value
        masks[name] = masks[name] | m if name in masks else m
    out = lm.consolidate(masks) if masks else np.zeros(image.shape, dtype=np.uint8)
    counts = np.bincount(out.reshape(-1), minlength=lm.num_classes + 1)
    class_counts = {lm.id_to_name[i]: int(c) for i, c in enumerate(counts) if i and c}
    return CheckedLabel(out, class_counts, {}, "the seg.nrrd segment names")


# ---- writing ---------------------------------------------------------------------------------


def write_label_gz(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """A uint8 label map as ``.nii.gz`` at gzip level 1 (labels compress well anyway; level 9 is
    about 5x slower on full CTs). Call it through :mod:`lib.core.atomic`."""
    img = nib.Nifti1Image(np.asarray(array, dtype=np.uint8), affine)
    img.header.set_data_dtype(np.uint8)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with open(path, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=1, mtime=0) as gz:
        gz.write(img.to_bytes())


def atomic_write_nifti(array: np.ndarray, affine: np.ndarray, dest: Path) -> Path:
    return atomic_write(dest, lambda tmp: write_label_gz(array, affine, tmp))


# ---- export ----------------------------------------------------------------------------------


def split_label_map(label: np.ndarray, lm: LabelMap, composite: str = "whole_pancreas") -> dict[str, np.ndarray]:
    """Per-structure boolean masks (PanTS release format) from a canonical label map.

    Every class is ``label == id``, except ``pancreas``: the whole gland is recovered with the
    label map's composite (gland + head + body + tail + duct, plus lesion parts touching them).
    """
    gland = lm.composite_mask(label, composite) if composite in lm.composites else None
    out = {}
    for c in lm.classes:
        out[c.name] = gland if (c.name == "pancreas" and gland is not None) else (label == c.id)
    return out


__all__ = [
    "DatastoreError",
    "Geometry",
    "CheckedLabel",
    "check_image_id",
    "check_tag",
    "check_label",
    "check_geometry",
    "read_geometry",
    "read_label_file",
    "atomic_write_nifti",
    "write_label_gz",
    "split_label_map",
    "normalize_name",
]
