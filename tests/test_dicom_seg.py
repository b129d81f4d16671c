"""DICOM SEG and CT series codecs in memory (no server): geometry, colours, codes, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from lib.imaging.dicom_seg import dicom_lab_to_rgb, label_to_seg, load_seg_coding, rgb_to_dicom_lab, seg_to_label
from lib.imaging.dicom_series import CTStudy, ct_series, read_volume, series_geometry, stable_uid
from lib.core.labelmap import load_labelmap
from pants_tools.phantom import make_case

LM = load_labelmap()


@pytest.fixture(scope="module")
def case():
    p = make_case(0, shape=(24, 20, 12), spacing=(2.0, 2.5, 3.0), seed=1)
    study = CTStudy(patient_id="P", study_uid=stable_uid("P", "study"), series_uid=stable_uid("P", "ct"))
    return p, series_geometry(ct_series(p.ct, p.affine, study)[::-1])  # order must not matter


def test_stable_uids_are_deterministic_and_valid() -> None:
    uid = stable_uid("PanTS_00000001", "ct")
    assert uid == stable_uid("PanTS_00000001", "ct") != stable_uid("PanTS_00000002", "ct")
    assert uid.startswith("2.25.") and len(uid) <= 64


def test_ct_series_round_trip_is_exact(case) -> None:
    p, geom = case
    np.testing.assert_allclose(geom.affine, p.affine, atol=1e-6)
    assert np.array_equal(read_volume(geom), p.ct)


def test_seg_round_trip_and_flipped_upload(case) -> None:
    p, geom = case
    label = LM.consolidate(p.masks)
    assert np.array_equal(seg_to_label(label_to_seg(label, p.affine, geom), geom), label)
    flipped = label[::-1, :, ::-1]
    aff = p.affine @ np.array([[-1, 0, 0, label.shape[0] - 1], [0, 1, 0, 0], [0, 0, -1, label.shape[2] - 1],
                               [0, 0, 0, 1]], float)
    assert np.array_equal(seg_to_label(label_to_seg(flipped, aff, geom), geom), label)


def test_seg_refuses_other_grid_and_unknown_ids(case) -> None:
    p, geom = case
    label = LM.consolidate(p.masks)
    with pytest.raises(ValueError, match="shape"):
        label_to_seg(label[:-1], p.affine, geom)
    shifted = p.affine.copy()
    shifted[:3, 3] += 10
    with pytest.raises(ValueError, match="affine"):
        label_to_seg(label, shifted, geom)
    bad = label.copy()
    bad[0, 0, 0] = 40
    with pytest.raises(ValueError, match="0..28"):
        label_to_seg(bad, p.affine, geom)


def test_colours_survive_cielab_and_every_class_is_coded() -> None:
    for c in LM.classes:
        assert dicom_lab_to_rgb(rgb_to_dicom_lab(c.color)) == tuple(c.color)
    coding = load_seg_coding()
    assert list(coding.classes) == sorted(coding.classes, key=LM.names.index)
    assert all(coding.classes[n].type.scheme == "SCT" for n in LM.names)
