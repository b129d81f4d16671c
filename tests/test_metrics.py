"""Metrics against values computed by hand (paper appendix B.4 definitions)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lib.core.labelmap import load_labelmap
from lib.model.metrics import (
    as_label_map,
    auc_score,
    detection_metrics,
    dice,
    evaluate_case,
    lesion_score_from_label,
    mean_dice,
    nsd,
    roc_curve,
    summarize,
)

LM = load_labelmap()


def _cubes(shift_axis: int = 0, shift: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """A 4x4x4 cube and the same cube shifted by ``shift`` voxels, with background around."""
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros_like(a)
    a[2:6, 2:6, 2:6] = True
    sl = [slice(2, 6)] * 3
    sl[shift_axis] = slice(2 + shift, 6 + shift)
    b[tuple(sl)] = True
    return a, b


def test_dice_two_cubes_known_overlap() -> None:
    # |A| = |B| = 4^3 = 64; a shift of 2 leaves a 2x4x4 = 32 voxel overlap.
    # DSC = 2 * 32 / (64 + 64) = 0.5
    a, b = _cubes(shift=2)
    assert dice(a, b) == pytest.approx(0.5)
    # shift 1: overlap 3x4x4 = 48 -> 96 / 128 = 0.75
    a, b = _cubes(shift=1)
    assert dice(a, b) == pytest.approx(0.75)


@pytest.mark.parametrize("method", ["kdtree", "edt"])
@pytest.mark.parametrize(
    ("tolerance", "expected"),
    [
        # Cube n=4 shifted by 1 voxel along z, spacing (0.8, 0.8, 2.0) mm.
        # Each surface has n^3 - (n-2)^3 = 56 voxels. For A (B is symmetric):
        #   36 side-ring voxels at z = 1..3 of A are also on B's surface   -> d = 0
        #    4 top-face interior voxels: nearest is B's side ring in-plane -> d = 0.8 mm
        #   16 bottom-face voxels: nearest is B's bottom face one z up    -> d = 2.0 mm
        (0.5, 36 / 56),  # 9/14
        (1.0, 40 / 56),  # 5/7
        (2.0, 40 / 56),  # strict "< tau": 2.0 mm is not within 2.0 mm
        (2.5, 1.0),
    ],
)
def test_nsd_shifted_cube_anisotropic(tolerance: float, expected: float, method: str) -> None:
    a, b = _cubes(shift_axis=2, shift=1)
    assert nsd(a, b, (0.8, 0.8, 2.0), tolerance, method=method) == pytest.approx(expected)


def test_nsd_segments_spacing_scales_distance() -> None:
    # A (20, 1, 1) array: every voxel is surface. A = [2, 8), B = [4, 10).
    # A's voxels 2, 3 are 2 and 1 voxels from B; B's 8, 9 are 1 and 2 from A; the 8 others are 0.
    # spacing 1.5 mm along x: off-distances 1.5 and 3.0 mm on each side.
    a = np.zeros((20, 1, 1), bool)
    b = np.zeros_like(a)
    a[2:8] = True
    b[4:10] = True
    sp = (1.5, 1.0, 1.0)
    assert nsd(a, b, sp, 1.0) == pytest.approx(8 / 12)
    assert nsd(a, b, sp, 2.0) == pytest.approx(10 / 12)
    assert nsd(a, b, sp, 3.5) == pytest.approx(1.0)
    assert nsd(a, a, sp, 0.1) == pytest.approx(1.0)


def test_fast_paths_match_scipy_reference() -> None:
    from scipy import ndimage

    from lib.model.metrics import _surface

    rng = np.random.default_rng(0)
    a = ndimage.binary_opening(rng.random((14, 12, 9)) > 0.4)
    b = ndimage.binary_opening(rng.random((14, 12, 9)) > 0.4)
    ref = a & ~ndimage.binary_erosion(a, ndimage.generate_binary_structure(3, 1), border_value=0)
    assert np.array_equal(_surface(a), ref)
    sp = (0.7, 1.1, 2.5)
    for tol in (0.5, 1.0, 2.0, 3.0):
        assert nsd(a, b, sp, tol) == pytest.approx(nsd(a, b, sp, tol, method="edt"))


def test_empty_conventions() -> None:
    e = np.zeros((5, 5, 5), bool)
    f = e.copy()
    f[2, 2, 2] = True
    assert dice(e, e) == 1.0 and nsd(e, e, (1, 1, 1), 1.0) == 1.0
    assert dice(e, f) == 0.0 and nsd(e, f, (1, 1, 1), 1.0) == 0.0
    assert dice(f, e) == 0.0 and nsd(f, e, (1, 1, 1), 1.0) == 0.0


def test_bad_inputs_name_the_problem() -> None:
    a, b = _cubes()
    with pytest.raises(ValueError, match="shapes differ"):
        dice(a, b[:5])
    with pytest.raises(ValueError, match="spacing"):
        nsd(a, b, (1.0, 1.0), 1.0)
    with pytest.raises(ValueError, match="method"):
        nsd(a, b, (1, 1, 1), 1.0, method="hausdorff")
    with pytest.raises(ValueError, match=r"0\.\.28"):
        as_label_map(np.full((2, 2, 2), 29, np.int16), 28)
    with pytest.raises(ValueError, match="unknown class 'liverr'"):
        evaluate_case(a.astype(np.uint8), b.astype(np.uint8), (1, 1, 1), LM, classes=["liverr"])


def _pancreas_case() -> tuple[np.ndarray, np.ndarray]:
    head, lesion = LM.name_to_id["pancreas_head"], LM.name_to_id["pancreatic_lesion"]
    truth = np.zeros((12, 12, 12), np.uint8)
    truth[2:4, 2:4, 2:4] = head  # 8 voxels
    truth[4:6, 2:4, 2:4] = lesion  # 8 voxels touching the head -> part of whole pancreas
    truth[9:11, 9:11, 9:11] = lesion  # 8 voxels far away -> not pancreas
    pred = np.zeros_like(truth)
    pred[2:4, 2:4, 2:4] = head
    return pred, truth


def test_whole_pancreas_composite_and_rows() -> None:
    pred, truth = _pancreas_case()
    rows = {r["class"]: r for r in evaluate_case(pred, truth, (1.0, 1.0, 2.0), LM)}
    assert len(rows) == 29 and list(rows)[-1] == "whole_pancreas"
    wp = rows["whole_pancreas"]
    # truth whole pancreas = head 8 + touching lesion 8 = 16; pred = head 8, all inside.
    # DSC = 2 * 8 / (8 + 16) = 2/3
    assert wp["dsc"] == pytest.approx(2 / 3)
    assert wp["class_id"] is None and wp["tolerance_mm"] == 1.0
    assert (wp["pred_voxels"], wp["truth_voxels"]) == (8, 16)
    # voxel = 1 * 1 * 2 mm^3 = 0.002 mL
    assert wp["truth_ml"] == pytest.approx(0.032)
    les = rows["pancreatic_lesion"]
    assert (les["dsc"], les["nsd"], les["truth_voxels"], les["empty_both"]) == (0.0, 0.0, 16, False)
    assert rows["pancreas_head"]["dsc"] == 1.0 and rows["pancreas_head"]["nsd"] == 1.0
    liver = rows["liver"]
    assert liver["empty_both"] and liver["dsc"] == 1.0 and liver["nsd"] == 1.0
    assert liver["class_id"] == LM.name_to_id["liver"] and liver["tolerance_mm"] == 2.0
    # subset by name or id, returned in label-map order
    sub = evaluate_case(pred, truth, (1, 1, 2), LM, classes=["whole_pancreas", 19])
    assert [r["class"] for r in sub] == ["pancreas_head", "whole_pancreas"]


def test_mean_dice_numpy_and_torch() -> None:
    torch = pytest.importorskip("torch")
    pred, truth = _pancreas_case()
    md = mean_dice(pred, truth, LM)
    # present in truth: head (1.0) and lesion (0.0) -> mean 0.5
    assert md["mean"] == pytest.approx(0.5)
    assert md["whole_pancreas"] == pytest.approx(2 / 3)
    assert md["liver"] == 1.0
    mt = mean_dice(torch.from_numpy(pred)[None], torch.from_numpy(truth)[None].float(), LM)
    assert mt == pytest.approx(md)


def test_lesion_score_is_predicted_lesion_ml() -> None:
    _, truth = _pancreas_case()
    # 16 lesion voxels of 0.5 * 0.5 * 2 mm^3 = 0.5 mm^3 -> 8 mm^3 = 0.008 mL
    assert lesion_score_from_label(truth, (0.5, 0.5, 2.0), LM) == pytest.approx(0.008)


def test_auc_with_ties_by_hand() -> None:
    scores = [0.1, 0.4, 0.4, 0.8]
    truths = [False, False, True, True]
    # positive-negative pairs: (0.4 vs 0.1) = 1, (0.4 vs 0.4) = 0.5 (tie),
    # (0.8 vs 0.1) = 1, (0.8 vs 0.4) = 1  ->  3.5 / 4 = 0.875
    assert auc_score(scores, truths) == pytest.approx(0.875)
    fpr, tpr, thr = roc_curve(scores, truths)
    assert fpr.tolist() == [0.0, 0.0, 0.5, 1.0] and tpr.tolist() == [0.0, 0.5, 1.0, 1.0]
    assert float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)) == pytest.approx(0.875)  # trapezoids
    m = detection_metrics(scores, truths, threshold=0.3)  # called: 0.4, 0.4, 0.8
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 0)
    assert (m["sensitivity"], m["specificity"], m["auc"]) == (1.0, 0.5, pytest.approx(0.875))
    m = detection_metrics(scores, truths, threshold=0.4)  # strictly above: only 0.8
    assert (m["sensitivity"], m["specificity"]) == (0.5, 1.0)


def test_auc_undefined_with_one_class() -> None:
    m = detection_metrics([0.0, 2.0], [True, True])
    assert math.isnan(m["auc"]) and math.isnan(m["specificity"]) and m["sensitivity"] == 0.5


def test_summarize_skips_empty_both_but_counts_them() -> None:
    rows = [
        {"class": "liver", "dsc": 0.8, "nsd": 0.6, "empty_both": False, "center": "A"},
        {"class": "liver", "dsc": 0.6, "nsd": 0.4, "empty_both": False, "center": "B"},
        {"class": "liver", "dsc": 1.0, "nsd": 1.0, "empty_both": True, "center": "B"},
        {"class": "prostate", "dsc": 1.0, "nsd": 1.0, "empty_both": True, "center": None},
    ]
    s = summarize(rows)
    assert s["liver"]["n_cases"] == 3 and s["liver"]["n_empty_both"] == 1
    assert s["liver"]["dsc_mean"] == pytest.approx(0.7) and s["liver"]["nsd_median"] == pytest.approx(0.5)
    assert math.isnan(s["prostate"]["dsc_mean"])
    g = summarize(rows, by="center")
    assert set(g) == {"A", "B", "unknown"}
    assert g["B"]["liver"]["dsc_mean"] == pytest.approx(0.6) and g["B"]["liver"]["n_empty_both"] == 1
