"""QA checks against the annotation standard on phantom labels: clean phantoms pass, and each
injected error (kidneys swapped, duct moved out, liver split, head and tail swapped, lesion
moved away, a structure erased) is caught by its check, naming the structure."""

from __future__ import annotations

import numpy as np
import pytest

from lib.core.labelmap import load_labelmap
from lib.core.review_config import load_review_config
from lib.qa import run_checks, summary
from pants_tools.phantom import make_case

LM = load_labelmap()
CFG = load_review_config().check_labels(LM).qa
#: adult-size phantoms (370 x 370 x 400 mm) at a coarse grid: 0.4 s each
SHAPE, SPACING = (96, 96, 80), (3.85, 3.85, 5.0)


@pytest.fixture(scope="module")
def cases() -> dict[int, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for index, lesion in ((0, False), (1, False), (3, True)):
        p = make_case(index, shape=SHAPE, spacing=SPACING, lesion=lesion)
        out[index] = (LM.consolidate(p.masks), p.affine)
    return out


def _ids(*names: str) -> list[int]:
    return [LM.name_to_id[n] for n in names]


def _swap(label: np.ndarray, a: str, b: str) -> np.ndarray:
    out = label.copy()
    ia, ib = _ids(a, b)
    out[label == ia], out[label == ib] = ib, ia
    return out


def _errors(label: np.ndarray, affine: np.ndarray) -> set[tuple[str, str]]:
    return {(f.check, f.structure) for f in run_checks(label, affine, LM, CFG) if f.severity == "error"}


@pytest.mark.parametrize("index", [0, 1, 3])
def test_clean_phantoms_pass(cases, index: int) -> None:
    label, affine = cases[index]
    found = run_checks(label, affine, LM, CFG)
    assert [f for f in found if f.severity == "error"] == []
    qa = summary(found, "pants")
    assert qa["errors"] == 0 and qa["label"] == "pants"


def test_kidneys_swapped(cases) -> None:
    label, affine = cases[0]
    found = run_checks(_swap(label, "kidney_left", "kidney_right"), affine, LM, CFG)
    hit = [f for f in found if f.check == "laterality"]
    assert [f.structure for f in hit] == ["kidney_left"]
    assert "kidney_right" in hit[0].message and "patient's right" in hit[0].message


def test_head_and_tail_swapped(cases) -> None:
    label, affine = cases[1]
    errors = _errors(_swap(label, "pancreas_head", "pancreas_tail"), affine)
    assert ("pancreas_order", "pancreas_head") in errors or ("pancreas_order", "pancreas_body") in errors


def test_duct_moved_out_of_the_gland(cases) -> None:
    label, affine = cases[0]
    out = label.copy()
    duct = label == LM.name_to_id["pancreatic_duct"]
    out[duct] = LM.name_to_id["pancreas_body"]  # the gland keeps its shape; the duct goes 40 mm forward
    out[np.roll(duct, -10, axis=1) & (out == 0)] = LM.name_to_id["pancreatic_duct"]
    assert ("duct_inside_gland", "pancreatic_duct") in _errors(out, affine)


def test_liver_split(cases) -> None:
    label, affine = cases[0]
    out = label.copy()
    liver = np.argwhere(label == LM.name_to_id["liver"])
    mid = int(np.median(liver[:, 2]))
    cut = out[:, :, mid - 1 : mid + 2]
    cut[cut == LM.name_to_id["liver"]] = 0  # a 15 mm gap across the liver
    found = [f for f in run_checks(out, affine, LM, CFG) if f.check == "connected_pieces"]
    assert [f.structure for f in found] == ["liver"] and "2 pieces" in found[0].message


def test_lesion_far_from_the_gland(cases) -> None:
    label, affine = cases[3]
    out = label.copy()
    lesion = label == LM.name_to_id["pancreatic_lesion"]
    assert lesion.any()
    out[lesion] = LM.name_to_id["pancreas_head"]
    out[np.roll(lesion, 12, axis=2)] = LM.name_to_id["pancreatic_lesion"]  # 60 mm up, into the liver
    assert ("lesion_near_gland", "pancreatic_lesion") in _errors(out, affine)


def test_a_required_structure_missing(cases) -> None:
    label, affine = cases[0]
    out = label.copy()
    out[out == LM.name_to_id["pancreas_tail"]] = 0
    assert ("required_present", "pancreas_tail") in _errors(out, affine)


def test_volume_out_of_range_is_a_warning(cases) -> None:
    label, affine = cases[0]
    big = affine.copy()
    big[:3, :3] *= 3  # the same voxels, 27x the volume
    vol = [f for f in run_checks(label, big, LM, CFG) if f.check == "volume"]
    assert vol and all(f.severity == "warning" for f in vol) and any(f.structure == "liver" for f in vol)


def test_orientation_does_not_matter(cases) -> None:
    """The same anatomy stored the other way round (i flipped, affine following) gives the same findings."""
    label, affine = cases[0]
    flipped = label[::-1].copy()
    aff = affine.copy()
    aff[:3, 3] += aff[:3, 0] * (label.shape[0] - 1)
    aff[:3, 0] *= -1
    assert _errors(flipped, aff) == set()
    assert ("laterality", "kidney_left") in _errors(_swap(flipped, "kidney_left", "kidney_right"), aff)


def test_tail_detached_from_the_body(cases) -> None:
    label, affine = cases[0]
    out = label.copy()
    tail = label == LM.name_to_id["pancreas_tail"]
    out[tail | (label == LM.name_to_id["pancreatic_duct"])] = 0  # the duct would bridge the gap
    out[np.roll(tail, 6, axis=0) & (out == 0)] = LM.name_to_id["pancreas_tail"]  # 23 mm further to the left
    errors = _errors(out, affine)
    assert ("pancreas_parts_touch", "pancreas_body") in errors
    assert not any(check == "pancreas_order" for check, _ in errors)  # still in order
