"""A flat folder's label map file, as the PACS loader reads it: checked against the CT and the
label map before anything is stored."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicomweb_client import DICOMwebClient

from lib.core.labelmap import load_labelmap
from pants_tools.pacs_load import find_cases, load_case, read_label_file
from pants_tools.processes import free_port

SHAPE = (12, 10, 8)


def _write(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))
    return path


def _label(dtype: type = np.uint8) -> np.ndarray:
    arr = np.zeros(SHAPE, dtype=dtype)
    arr[2:5, 2:5, 2:5] = 1
    arr[6:9, 3:6, 1:4] = 28
    return arr


def test_a_good_file_reads_as_uint8_also_from_float_or_4d(tmp_path: Path) -> None:
    lm = load_labelmap()
    want = _label()
    for name, arr in (("u8", want), ("f32", want.astype(np.float32)), ("i16_4d", want.astype(np.int16)[..., None])):
        got = read_label_file(_write(tmp_path / f"{name}.nii.gz", arr), SHAPE, lm)
        assert got.dtype == np.uint8 and np.array_equal(got, want), name


@pytest.mark.parametrize("arr, words", [
    (np.full(SHAPE, 257, dtype=np.uint16), "values 257 to 257; ids must be 0..28"),  # uint8 would wrap to 1
    (np.full(SHAPE, -1, dtype=np.int16), "values -1 to -1"),
    (np.full(SHAPE, 1.5, dtype=np.float32), "label values must be integers; found 1.5"),  # uint8 would truncate to 1
    (np.zeros((12, 10, 9), dtype=np.uint8), "has shape (12, 10, 9), the CT (12, 10, 8)"),
])
def test_a_bad_file_is_refused_with_what_is_wrong(tmp_path: Path, arr: np.ndarray, words: str) -> None:
    path = _write(tmp_path / "bad.nii.gz", arr)
    with pytest.raises(ValueError) as err:
        read_label_file(path, SHAPE, load_labelmap())
    assert words in str(err.value) and str(path) in str(err.value)


def test_a_bad_label_stops_the_case_before_its_ct_is_stored(tmp_path: Path) -> None:
    """No DICOMweb server listens on the port: had the loader stored the CT first, the error would
    be a connection error, not the label's."""
    root = tmp_path / "flat"
    _write(root / "case1.nii.gz", np.zeros(SHAPE, dtype=np.int16))
    _write(root / "labels" / "final" / "case1.nii.gz", np.full(SHAPE, 40, dtype=np.uint8))
    (case,) = find_cases(root)
    client = DICOMwebClient(f"http://127.0.0.1:{free_port()}/dicom-web")
    with pytest.raises(ValueError, match=r"case1: label .* holds values 40 to 40"):
        load_case(client, case)
