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


def _flat_root(tmp_path: Path) -> Path:
    """good1, a truncated CT, a CT whose header claims 10^12 voxels, a label that does not fit, good2."""
    root = tmp_path / "flat"
    ct = np.zeros(SHAPE, dtype=np.int16)
    ct[4:8, 3:7, 2:6] = 40
    for good in ("good1", "good2"):
        _write(root / f"{good}.nii.gz", ct)
        _write(root / "labels" / "final" / f"{good}.nii.gz", _label())
    whole = _write(root / "truncated.nii", ct).read_bytes()
    (root / "truncated.nii").write_bytes(whole[: len(whole) - 200])
    huge = nib.Nifti1Image(np.zeros((2, 2, 2), dtype=np.int16), np.eye(4))
    huge.header.set_data_shape((10_000, 10_000, 10_000))
    (root / "huge.nii").write_bytes(huge.header.binaryblock + b"\0" * 4 + b"\0" * 16)
    _write(root / "misfit.nii.gz", ct)
    _write(root / "labels" / "final" / "misfit.nii.gz", np.zeros((3, 3, 3), dtype=np.uint8))
    return root


def test_bad_cases_are_skipped_with_the_reason_before_anything_is_stored(tmp_path: Path) -> None:
    """No server listens: a case that reached storing would raise a connection error instead."""
    from pants_tools.pacs_load import Skipped, load_cases

    cases = find_cases(_flat_root(tmp_path), ["truncated", "huge", "misfit"])
    client = DICOMwebClient(f"http://127.0.0.1:{free_port()}/dicom-web")
    reasons = list(load_cases(client, cases))
    assert all(isinstance(r, Skipped) for r in reasons)
    assert [r.case_id for r in reasons] == ["truncated", "huge", "misfit"]
    assert "truncated:" in reasons[0].reason
    assert reasons[1].reason.startswith("huge: CT") and "too large" in reasons[1].reason
    assert "misfit: label" in reasons[2].reason and "has shape (3, 3, 3)" in reasons[2].reason


def test_the_loader_stores_the_good_cases_and_names_the_skipped_ones(tmp_path: Path) -> None:
    import subprocess
    import sys

    from orthanc import Orthanc, require_orthanc
    from server import REPO

    from lib.datastore.dicomweb import make_client
    from lib.imaging.dicom_series import stable_uid

    require_orthanc()
    root = _flat_root(tmp_path)
    orthanc = Orthanc(tmp_path / "orthanc", tmp_path / "orthanc.log")
    try:
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / "load_pacs.py"), "--url", orthanc.dicomweb,
                               "--root", str(root)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr
        assert "loaded 2 case(s)" in proc.stdout and "2 SEG" in proc.stdout
        assert "skipped 3 case(s)" in proc.stderr and "--cases huge misfit truncated" in proc.stderr
        stored = {str(d["0020000E"]["Value"][0]) for d in make_client(orthanc.dicomweb).search_for_series()}
        assert stored == {stable_uid(c, k) for c in ("good1", "good2") for k in ("ct", "pants-seg")}
    finally:
        orthanc.stop()
