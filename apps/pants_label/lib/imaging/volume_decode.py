"""Decoding volume files that a client sent, without trusting their headers.

Every path that decodes a client's file goes through here: label saves (both datastores), image
uploads, infer with an uploaded image or a session image. Accepted are single files with their
data attached: NIfTI-1/2 (``.nii``, ``.nii.gz``) and NRRD (raw or gzip encoding, including 3D
Slicer's ``.seg.nrrd``). The rules:

* the header is read first, from at most :data:`MAX_HEADER_BYTES`, and checked: a detached NRRD
  header (``data file``), line skips, a negative or oversized byte skip, unknown encodings and
  data types are refused, so a header can never make the server read another file;
* the caller checks the header's shape (and grid) against what it expects *before* any voxel
  buffer exists, so a 372-byte file cannot claim gigabytes;
* voxel data is read as a stream into one buffer of exactly the header's size; gzip is
  decompressed incrementally and never past that size, so a decompression bomb stops at the
  size a valid file of that shape has.

Errors are :class:`lib.errors.ClientError` (400 corrupt stream, 413 too large, 415 not a
supported format, 422 a header or data that cannot be right).
"""

from __future__ import annotations

import io
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from lib.core.errors import bad_request, too_large, unprocessable, unsupported

#: largest header accepted (NRRD text header; NIfTI ``vox_offset``)
MAX_HEADER_BYTES = 1 << 20
#: largest dimension along any axis, and most voxels, of an uploaded *image*; labels are bounded
#: by their image instead
MAX_IMAGE_DIM = 4096
MAX_IMAGE_VOXELS = 1 << 30
#: most layers of a ``.seg.nrrd`` (overlapping segments); one per class is the most that is useful
MAX_LAYERS = 255
_READ = 1 << 20  # bytes per read from disk

_NRRD_TYPES = {
    "signed char": "i1", "int8": "i1", "int8_t": "i1",
    "uchar": "u1", "unsigned char": "u1", "uint8": "u1", "uint8_t": "u1",
    "short": "i2", "short int": "i2", "signed short": "i2", "signed short int": "i2", "int16": "i2",
    "int16_t": "i2",
    "ushort": "u2", "unsigned short": "u2", "unsigned short int": "u2", "uint16": "u2", "uint16_t": "u2",
    "int": "i4", "signed int": "i4", "int32": "i4", "int32_t": "i4",
    "uint": "u4", "unsigned int": "u4", "uint32": "u4", "uint32_t": "u4",
    "longlong": "i8", "long long": "i8", "long long int": "i8", "signed long long": "i8",
    "signed long long int": "i8", "int64": "i8", "int64_t": "i8",
    "ulonglong": "u8", "unsigned long long": "u8", "unsigned long long int": "u8", "uint64": "u8",
    "uint64_t": "u8",
    "float": "f4", "double": "f8",
}
_NRRD_SPACES = {
    "right-anterior-superior": (1, 1, 1),
    "ras": (1, 1, 1),
    "left-posterior-superior": (-1, -1, 1),
    "lps": (-1, -1, 1),
    "left-anterior-superior": (-1, 1, 1),
    "las": (-1, 1, 1),
}
#: NIfTI data types a volume may have (integers and floats; no complex or RGB)
_NIFTI_KINDS = "iuf"


@dataclass
class VolumeHeader:
    """What a file's header says, checked for self-consistency but not yet against an image.

    ``shape`` is the numpy shape of the stored data in Fortran order (NIfTI x, y, z[, ...];
    NRRD in ``sizes`` order). ``spatial_axes`` are the axes that are space; the rest are
    layers (``.seg.nrrd``) or a trailing length-1 NIfTI axis.
    """

    kind: str  # "nifti" | "nrrd"
    shape: tuple[int, ...]
    dtype: np.dtype
    affine: np.ndarray
    data_offset: int  # bytes before the data: in the file (raw) or the decompressed stream (gzip)
    gzip_from: int | None  # file offset where a gzip stream starts (None: raw data)
    spatial_axes: tuple[int, ...] = (0, 1, 2)
    scale: tuple[float, float] = (1.0, 0.0)  # NIfTI scl_slope, scl_inter
    fields: dict[str, Any] = field(default_factory=dict)  # the NRRD header (segment table)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.spatial_axes)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


# ---- headers -------------------------------------------------------------------------------------


def read_header(path: str | os.PathLike) -> VolumeHeader:
    """The header of a NIfTI or attached NRRD file, identified by content (not by name)."""
    with open(path, "rb") as fh:
        head = fh.read(4)
        fh.seek(0)
        if head[:4] == b"NRRD":
            return _nrrd_header(fh)
        if head[:2] == b"\x1f\x8b":
            stream = _GzipStream(fh, 0)
            first = stream.read(544)
            if first[:4] == b"NRRD":
                raise unsupported("the file is a gzip-compressed NRRD; send the .nrrd itself "
                                  "(NRRD compresses its own data with 'encoding: gzip')")
            return _nifti_header(first, gzip_from=0)
        return _nifti_header(fh.read(544), gzip_from=None)


def _nifti_header(head: bytes, gzip_from: int | None) -> VolumeHeader:
    import nibabel as nib

    kind = _nifti_kind(head)
    if kind is None:
        raise unsupported(
            f"the file is neither NIfTI (.nii/.nii.gz) nor NRRD (.nrrd/.seg.nrrd); first bytes {head[:8]!r}"
        )
    if kind == "pair":
        raise unsupported("the file is a NIfTI .hdr/.img pair; send a single-file .nii or .nii.gz")
    klass, size = (nib.Nifti1Header, 348) if kind == "nifti1" else (nib.Nifti2Header, 540)
    try:
        hdr = klass.from_fileobj(io.BytesIO(head[:size]), check=True)
        shape = tuple(int(s) for s in hdr.get_data_shape())
        dtype = np.dtype(hdr.get_data_dtype())
        affine = np.asarray(hdr.get_best_affine(), dtype=np.float64)
        slope, inter = hdr.get_slope_inter()
        offset = float(hdr["vox_offset"])
    except Exception as err:  # nibabel raises several types for inconsistent headers
        raise unprocessable(f"the file is a damaged NIfTI ({type(err).__name__}: {err})") from None
    if dtype.kind not in _NIFTI_KINDS or dtype.itemsize > 8:
        raise unprocessable(f"NIfTI voxel type {dtype} is not accepted; use an integer type such as uint8")
    if offset == 0:  # older writers leave it unset: the data follows the header and its 4-byte extension flag
        offset = size + 4
    if not size <= offset <= MAX_HEADER_BYTES or offset != int(offset):
        raise unprocessable(f"NIfTI vox_offset {offset:g} is not accepted (allowed {size}..{MAX_HEADER_BYTES})")
    if not shape or min(shape) < 1:
        raise unprocessable(f"NIfTI dimensions {shape} are not a volume")
    if not np.all(np.isfinite(affine)):
        raise unprocessable("NIfTI affine holds non-finite values")
    scale = (1.0 if slope is None or not np.isfinite(slope) else float(slope),
             0.0 if inter is None or not np.isfinite(inter) else float(inter))
    return VolumeHeader("nifti", shape, dtype, affine, int(offset), gzip_from,
                        scale=scale)


def _nifti_kind(head: bytes) -> str | None:
    if len(head) >= 348:
        for order in ("<", ">"):
            size = int(np.frombuffer(head[:4], dtype=f"{order}i4")[0])
            if size == 348 and head[344:348] == b"n+1\x00":
                return "nifti1"
            if size == 540 and head[4:8] == b"n+2\x00" and len(head) >= 540:
                return "nifti2"
            if size in (348, 540) and head[344:347] == b"ni1":
                return "pair"
    return None


def _nrrd_header(fh: BinaryIO) -> VolumeHeader:
    import nrrd

    head = fh.read(MAX_HEADER_BYTES + 2)
    end = head.find(b"\n\n")
    end_crlf = head.find(b"\r\n\r\n")
    if end < 0 and end_crlf < 0:
        raise unprocessable(f"NRRD header has no blank line ending it within {MAX_HEADER_BYTES} bytes")
    end, sep = (end, 2) if end_crlf < 0 or 0 <= end < end_crlf else (end_crlf, 4)
    text = head[:end].decode("latin-1")
    try:
        fields = nrrd.read_header(text.splitlines())
    except Exception as err:  # pynrrd raises NRRDError and ValueError
        raise unprocessable(f"NRRD header is not readable ({type(err).__name__}: {err})") from None
    _refuse_detached(fields)
    encoding = str(fields.get("encoding", "")).lower()
    if encoding not in ("raw", "gzip", "gz"):
        raise unsupported(f"NRRD encoding {encoding!r} is not accepted; use raw or gzip")
    byte_skip = _int_field(fields, ("byte skip", "byteskip"), 0)
    if not 0 <= byte_skip <= MAX_HEADER_BYTES:
        raise unprocessable(f"NRRD byte skip {byte_skip} is not accepted (allowed 0..{MAX_HEADER_BYTES})")
    if _int_field(fields, ("line skip", "lineskip"), 0) != 0:
        raise unprocessable("NRRD line skip is not accepted: the data must follow the header")
    type_name = str(fields.get("type", "")).lower()
    if type_name not in _NRRD_TYPES:
        raise unprocessable(f"NRRD type {type_name!r} is not accepted; use an integer type such as uint8")
    dtype = np.dtype(_NRRD_TYPES[type_name])
    if dtype.itemsize > 1:
        endian = str(fields.get("endian", "little")).lower()
        if endian not in ("little", "big"):
            raise unprocessable(f"NRRD endian {endian!r} is not 'little' or 'big'")
        dtype = dtype.newbyteorder("<" if endian == "little" else ">")
    sizes = tuple(int(s) for s in np.atleast_1d(fields.get("sizes", [])))
    if not sizes or min(sizes) < 1:
        raise unprocessable(f"NRRD sizes {sizes} are not a volume")
    affine, spatial = _nrrd_affine(fields, len(sizes))
    data_start = end + sep
    gz = encoding in ("gzip", "gz")
    return VolumeHeader("nrrd", sizes, dtype, affine, byte_skip if gz else data_start + byte_skip,
                        data_start if gz else None, spatial_axes=spatial, fields=dict(fields))


def _refuse_detached(fields: dict[str, Any]) -> None:
    for key in ("data file", "datafile"):
        if key in fields:
            raise unprocessable(
                f"NRRD header has '{key}': detached data files are not accepted; send one .nrrd with its data "
                "attached (3D Slicer saves it that way)"
            )


def _int_field(fields: dict[str, Any], names: tuple[str, ...], default: int) -> int:
    for name in names:
        if name in fields:
            try:
                return int(fields[name])
            except (TypeError, ValueError):
                raise unprocessable(f"NRRD '{name}' {fields[name]!r} is not an integer") from None
    return default


def _nrrd_affine(fields: dict[str, Any], ndim: int) -> tuple[np.ndarray, tuple[int, ...]]:
    space = str(fields.get("space", "left-posterior-superior")).lower()
    if space not in _NRRD_SPACES:
        raise unprocessable(f"NRRD space {space!r} is not supported; use RAS or LPS")
    dirs, origin = fields.get("space directions"), fields.get("space origin")
    if dirs is None or origin is None:
        raise unprocessable("NRRD has no 'space directions'/'space origin'; its geometry is unknown")
    try:
        dirs = np.asarray(dirs, dtype=np.float64).reshape(ndim, -1)
        origin = np.asarray(origin, dtype=np.float64).reshape(3)
    except ValueError:
        raise unprocessable("NRRD 'space directions'/'space origin' do not match its dimension") from None
    spatial = tuple(i for i in range(ndim) if np.all(np.isfinite(dirs[i])))
    if len(spatial) != 3 or dirs.shape[1] != 3 or not np.all(np.isfinite(origin)):
        raise unprocessable(f"NRRD must have 3 spatial axes with finite geometry, got {len(spatial)}")
    flip = np.array(_NRRD_SPACES[space], dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = dirs[list(spatial)].T * flip[:, None]
    affine[:3, 3] = origin * flip
    return affine, spatial


# ---- checks a caller makes before data is read ---------------------------------------------------


def check_image_header(hdr: VolumeHeader, what: str = "image") -> None:
    """An uploaded image: 3-D (a trailing length-1 axis allowed), every axis and the total bounded."""
    shape = hdr.shape
    extra = [s for i, s in enumerate(shape) if i not in hdr.spatial_axes]
    if len(hdr.spatial_axes) != 3 or len(shape) < 3 or any(s != 1 for s in extra):
        raise unprocessable(f"{what} must be a 3-D volume, got shape {shape}")
    if max(shape) > MAX_IMAGE_DIM or int(np.prod(shape, dtype=np.int64)) > MAX_IMAGE_VOXELS:
        raise too_large(f"{what} shape {shape} is too large (at most {MAX_IMAGE_DIM} voxels per axis and "
                        f"{MAX_IMAGE_VOXELS} voxels)")


# ---- data ----------------------------------------------------------------------------------------


class _GzipStream:
    """Reads a gzip stream (possibly several members) from ``fh`` at ``start``, decompressing only
    as far as asked: ``read(n)`` never inflates more than ``n`` bytes past what was consumed."""

    def __init__(self, fh: BinaryIO, start: int) -> None:
        self.fh = fh
        fh.seek(start)
        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._in = b""  # compressed input not yet inflated

    def readinto(self, buf: memoryview) -> int:
        n = 0
        while n < len(buf):
            if self._d.eof:  # a member ended: another may follow (or zero padding)
                self._in = (self._d.unused_data + self._in).lstrip(b"\0")
                while not self._in:
                    chunk = self.fh.read(_READ)
                    if not chunk:
                        return n
                    self._in = chunk.lstrip(b"\0")
                self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            if not self._in:
                self._in = self.fh.read(_READ)
                if not self._in:
                    raise bad_request("the file is a truncated gzip stream (incomplete or corrupt upload)")
            try:
                out = self._d.decompress(self._in, len(buf) - n)
            except zlib.error as err:
                raise bad_request(f"the file is not a valid gzip stream ({err})") from None
            self._in = self._d.unconsumed_tail
            buf[n : n + len(out)] = out
            n += len(out)
        return n

    def read(self, n: int) -> bytes:
        buf = bytearray(n)
        got = self.readinto(memoryview(buf))
        return bytes(buf[:got])

    def skip(self, n: int) -> int:
        skipped = 0
        scratch = memoryview(bytearray(min(n, _READ) or 1))
        while skipped < n:
            got = self.readinto(scratch[: min(n - skipped, len(scratch))])
            if not got:
                break
            skipped += got
        return skipped


def _stream(fh: BinaryIO, hdr: VolumeHeader) -> Any:
    """A reader positioned at the first data byte."""
    if hdr.gzip_from is None:
        fh.seek(hdr.data_offset)
        return fh
    stream = _GzipStream(fh, hdr.gzip_from)
    if stream.skip(hdr.data_offset) < hdr.data_offset:
        raise unprocessable("the file ends before its data starts")
    return stream


def _short(got: int, hdr: VolumeHeader) -> None:
    raise unprocessable(
        f"the file holds {got} bytes of voxel data but its header ({hdr.kind}, shape {hdr.shape}, "
        f"{hdr.dtype}) needs {hdr.nbytes}; incomplete or damaged upload"
    )


def _check_raw_size(path: Path, hdr: VolumeHeader) -> None:
    """Uncompressed data: the file itself must be long enough (nothing is read)."""
    size = path.stat().st_size
    if size < hdr.data_offset + hdr.nbytes:
        _short(max(0, size - hdr.data_offset), hdr)


def read_data(path: str | os.PathLike, hdr: VolumeHeader) -> np.ndarray:
    """The voxels, as an array of ``hdr.shape`` (Fortran order) in ``hdr.dtype``.

    Call it only after the header's shape was checked against what is expected: this allocates
    exactly ``hdr.nbytes``.
    """
    if hdr.gzip_from is None:
        _check_raw_size(Path(path), hdr)
    out = np.empty(hdr.nbytes, dtype=np.uint8)
    view = memoryview(out)
    with open(path, "rb") as fh:
        stream = _stream(fh, hdr)
        got = 0
        while got < hdr.nbytes:
            n = stream.readinto(view[got : min(hdr.nbytes, got + _READ * 16)])
            if not n:
                break
            got += n
        if got < hdr.nbytes:
            _short(got, hdr)
        if hdr.gzip_from is not None and stream.read(1):  # inflate one byte past, never more
            raise too_large(f"the file decompresses to more voxel data than its header ({hdr.kind}, shape "
                            f"{hdr.shape}, {hdr.dtype}) describes; too large or damaged")
    return out.view(hdr.dtype).reshape(hdr.shape, order="F")


def check_data_complete(path: str | os.PathLike, hdr: VolumeHeader) -> None:
    """Refuse a file whose data is shorter than its header says, reading it in small pieces
    (nothing of the header's size is allocated): for files handed to other readers afterwards."""
    if hdr.gzip_from is None:
        _check_raw_size(Path(path), hdr)
        return
    with open(path, "rb") as fh:
        stream = _stream(fh, hdr)
        got = stream.skip(hdr.nbytes)
    if got < hdr.nbytes:
        _short(got, hdr)


def check_client_image(path: str | os.PathLike, what: str = "image") -> VolumeHeader:
    """Everything about an uploaded image that can be checked without decoding it: a single
    NIfTI or attached NRRD, 3-D, of bounded size, with all its data present."""
    if os.path.isdir(path):
        raise unsupported(f"{what}: send a single NIfTI (.nii/.nii.gz) or NRRD (.nrrd) file")
    hdr = read_header(path)
    check_image_header(hdr, what)
    check_data_complete(path, hdr)
    return hdr


__all__ = [
    "VolumeHeader",
    "read_header",
    "read_data",
    "check_image_header",
    "check_data_complete",
    "check_client_image",
    "MAX_HEADER_BYTES",
    "MAX_LAYERS",
]
