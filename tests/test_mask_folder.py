"""One PanTS ``segmentations/`` folder as one label map: the reader every script and the PACS
loader share (lib.datastore.folder_scan.read_mask_folder)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lib.core.labelmap import load_labelmap
from lib.datastore.folder_scan import read_mask_folder

LM = load_labelmap()


def _write(folder: Path, name: str, mask: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), np.eye(4)), folder / f"{name}.nii.gz")


def test_masks_merge_by_the_overlap_rule_and_unknown_files_are_skipped(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(0)
    masks = {n: rng.random((6, 5, 4)) > 0.6 for n in ("pancreas", "pancreatic_lesion", "liver", "aorta")}
    for name, m in masks.items():
        _write(tmp_path, name, m)
    _write(tmp_path, "notes", np.ones((6, 5, 4)))  # named after no structure
    (tmp_path / "readme.txt").write_text("not a mask")
    label = read_mask_folder(tmp_path, LM)
    assert label.dtype == np.uint8 and np.array_equal(label, LM.consolidate(masks))
    assert (label == LM.id_of("pancreatic_lesion")).sum() > 0  # overlaps resolved, not dropped
    assert "notes" in caplog.text
    # a trailing singleton axis, as some exporters write, is the same mask
    nib.save(nib.Nifti1Image(masks["liver"][..., None].astype(np.uint8), np.eye(4)), tmp_path / "liver.nii.gz")
    assert np.array_equal(read_mask_folder(tmp_path, LM, shape=(6, 5, 4)), label)


def test_bad_folders_are_refused_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no masks named after PanTS structures"):
        read_mask_folder(tmp_path, LM)
    _write(tmp_path, "liver", np.ones((6, 5, 4)))
    _write(tmp_path, "spleen", np.ones((6, 5, 3)))
    with pytest.raises(ValueError, match=r"spleen.nii.gz has shape \(6, 5, 3\), the other masks \(6, 5, 4\)"):
        read_mask_folder(tmp_path, LM)
    with pytest.raises(ValueError, match=r"liver.nii.gz has shape \(6, 5, 4\), the CT \(7, 5, 4\)"):
        read_mask_folder(tmp_path, LM, shape=(7, 5, 4))
    nib.save(nib.Nifti1Image(np.ones((6, 5, 4, 2), np.uint8), np.eye(4)), tmp_path / "spleen.nii.gz")
    with pytest.raises(ValueError, match="expected a 3-D mask"):
        read_mask_folder(tmp_path, LM)
