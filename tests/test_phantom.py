"""Synthetic PanTS phantoms: determinism, orientation, mask relations, lesions, centers, layout."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from lib.core.labelmap import load_labelmap
from lib.imaging.metadata import read_metadata
from pants_tools.phantom import (
    DEFAULT_CENTERS,
    LESION_PREVALENCE,
    Center,
    case_id,
    case_meta,
    has_lesion,
    make_case,
    write_pants_tree,
)

TINY = (32, 32, 24)
SMALL = (48, 48, 32)
LM = load_labelmap()


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


def test_case_id() -> None:
    assert case_id(0) == "PanTS_00000001"
    assert case_id(41) == "PanTS_00000042"
    with pytest.raises(ValueError, match="index"):
        case_id(-1)


def test_deterministic_by_seed() -> None:
    a, b = make_case(3, shape=TINY), make_case(3, shape=TINY)
    assert np.array_equal(a.ct, b.ct) and a.meta == b.meta
    assert all(np.array_equal(a.masks[k], b.masks[k]) for k in a.masks)
    other = make_case(3, shape=TINY, seed=1)
    assert not np.array_equal(a.ct, other.ct)
    # The case's draws do not depend on the grid: same patient at every resolution.
    assert make_case(3, shape=SMALL).meta == a.meta == case_meta(3)


def test_types_affine_and_orientation() -> None:
    spacing = (0.9, 0.7, 1.5)
    p = make_case(0, shape=(64, 64, 48), spacing=spacing)
    assert p.ct.dtype == np.int16 and p.ct.shape == (64, 64, 48)
    assert list(p.masks) == LM.names
    assert all(m.dtype == np.uint8 and m.shape == p.ct.shape and m.max() <= 1 for m in p.masks.values())
    np.testing.assert_array_equal(p.affine, np.diag([-0.9, -0.7, 1.5, 1.0]))
    assert nib.aff2axcodes(p.affine) == ("L", "P", "S")
    c = {k: _centroid(m) for k, m in p.masks.items() if m.any()}
    # i runs from the patient's right to left; in RAS+ world the liver has the larger x.
    assert c["liver"][0] < c["spleen"][0] and c["kidney_right"][0] < c["kidney_left"][0]
    assert (p.affine @ [*c["liver"], 1])[0] > (p.affine @ [*c["spleen"], 1])[0]
    assert c["pancreas_head"][0] < c["pancreas_body"][0] < c["pancreas_tail"][0]
    assert c["duodenum"][0] < c["pancreas_head"][0] + 2  # head sits in the duodenal C-loop
    assert c["aorta"][1] > c["pancreas"][1]  # j runs anterior -> posterior
    assert c["lung_left"][2] > c["liver"][2] > c["pancreas"][2] > c["bladder"][2] > c["femur_left"][2]
    assert c["adrenal_gland_left"][2] > c["kidney_left"][2]


def test_intensities_plausible() -> None:
    p = make_case(0, shape=(64, 64, 48), centers=(Center("quiet", noise_hu=3.0, phases=(0, 0, 1, 0)),))
    inner = {k: ndimage.binary_erosion(m) for k, m in p.masks.items()}
    mean = {k: float(p.ct[m].mean()) for k, m in inner.items() if m.any()}
    assert p.ct[0, 0, 0] <= -950  # air outside the body
    assert mean["lung_left"] < -600 and mean["femur_left"] > 500
    assert 30 < mean["liver"] < 200 and mean["aorta"] > mean["kidney_left"] - 60 > 0
    assert mean["gall_bladder"] < 40


@pytest.mark.parametrize("index", [0, 1, 2, 5])
def test_mask_relations(index: int) -> None:
    p = make_case(index, shape=SMALL, lesion=True)
    m = {k: v.astype(bool) for k, v in p.masks.items()}
    gland, head, body, tail = m["pancreas"], m["pancreas_head"], m["pancreas_body"], m["pancreas_tail"]
    assert not (head & body).any() and not (head & tail).any() and not (body & tail).any()
    assert np.array_equal(head | body | tail, gland)
    assert not (m["pancreatic_duct"] & ~gland).any()
    lesion = m["pancreatic_lesion"]
    assert lesion.any() and (lesion & gland).sum() >= 0.5 * lesion.sum()
    expected_empty = {"prostate"} if p.meta.sex == "F" else set()
    assert {k for k, v in m.items() if not v.any()} == expected_empty


def test_consolidated_label_map_has_all_classes() -> None:
    p = make_case(1, shape=(64, 64, 48), lesion=True)
    label = LM.consolidate(p.masks)
    present = {LM.name_to_id[k] for k, v in p.masks.items() if v.any()}
    # The gland id only marks gland that no part covers; the parts partition it here.
    assert set(np.unique(label).tolist()) == {0} | present - {LM.name_to_id["pancreas"]}
    assert len(present) >= 27


def test_lesion_prevalence_and_forcing() -> None:
    draws = np.array([has_lesion(i) for i in range(2000)])
    assert abs(draws.mean() - LESION_PREVALENCE) < 0.02
    assert 10 <= draws[:200].sum() <= 35
    assert all(case_meta(i).tumor == draws[i] for i in range(50))
    neg = make_case(int(np.flatnonzero(draws)[0]), shape=TINY, lesion=False)
    assert not neg.masks["pancreatic_lesion"].any() and neg.meta.tumor is False and neg.meta.diagnosis == "normal"
    pos = make_case(int(np.flatnonzero(~draws)[0]), shape=TINY, lesion=True)
    assert pos.masks["pancreatic_lesion"].any() and pos.meta.diagnosis in ("PDAC", "cyst")


def test_lesion_is_hypodense_in_enhanced_phases() -> None:
    arterial = (Center("art", noise_hu=2.0, phases=(0, 1, 0, 0)),)
    for i in range(4):
        p = make_case(i, shape=(96, 96, 64), centers=arterial, lesion=True)
        lesion = p.masks["pancreatic_lesion"].astype(bool)
        # Gland core away from edges: small glands are mostly partial-volume boundary.
        parenchyma = p.masks["pancreas"].astype(bool) & ~lesion & ~p.masks["pancreatic_duct"].astype(bool)
        core = ndimage.binary_erosion(parenchyma)
        assert np.median(p.ct[lesion]) < np.median(p.ct[core]) - 20, p.meta


def test_centers_differ() -> None:
    assert len(DEFAULT_CENTERS) >= 4
    noise = {}
    for c in (DEFAULT_CENTERS[2], DEFAULT_CENTERS[3]):  # quietest and noisiest
        p = make_case(3, shape=SMALL, centers=(c,))
        liver = ndimage.binary_erosion(p.masks["liver"], iterations=2)
        noise[c.name] = float(p.ct[liver].std())
    assert noise["center_d"] > 2.5 * noise["center_c"]
    phases = {case_meta(i).contrast_phase for i in range(60)}
    centers = {case_meta(i).center for i in range(60)}
    assert len(phases) >= 3 and len(centers) == len(DEFAULT_CENTERS)


def test_phase_changes_enhancement() -> None:
    aorta = {}
    for phase, weights in (("non-contrast", (1, 0, 0, 0)), ("arterial", (0, 1, 0, 0))):
        p = make_case(0, shape=SMALL, centers=(Center("c", noise_hu=2.0, phases=weights),))
        assert p.meta.contrast_phase == phase
        aorta[phase] = float(p.ct[ndimage.binary_erosion(p.masks["aorta"])].mean())
    assert aorta["arterial"] > aorta["non-contrast"] + 150


@pytest.mark.parametrize(
    "kwargs,match",
    [({"shape": (4, 4, 4)}, "shape"), ({"spacing": (0.8, 0, 1)}, "spacing"), ({"centers": ()}, "centers")],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_case(0, **kwargs)


def test_bad_center() -> None:
    with pytest.raises(ValueError, match="phases"):
        Center("x", noise_hu=1.0, phases=(0, 0, 0, 0))


@pytest.mark.parametrize("fmt", ["csv", "xlsx"])
def test_write_pants_tree(tmp_path: Path, fmt: str) -> None:
    ids = write_pants_tree(tmp_path, 3, shape=TINY, n_test=1, metadata_format=fmt)
    assert ids == ["PanTS_00000001", "PanTS_00000002", "PanTS_00000003"]
    for cid, split in zip(ids, ("Tr", "Tr", "Te")):
        ct = nib.load(tmp_path / f"Image{split}" / cid / "ct.nii.gz")
        assert ct.get_data_dtype() == np.int16 and ct.shape == TINY
        np.testing.assert_allclose(ct.affine, np.diag([-0.8, -0.8, 1.25, 1]))
        segs = sorted(p.name for p in (tmp_path / f"Label{split}" / cid / "segmentations").iterdir())
        assert segs == sorted(f"{n}.nii.gz" for n in LM.names)
    liver = nib.load(tmp_path / "LabelTr" / ids[0] / "segmentations" / "liver.nii.gz")
    assert liver.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(liver.dataobj), make_case(0, shape=TINY).masks["liver"])
    meta = read_metadata(tmp_path / f"metadata.{fmt}")
    assert list(meta) == ids and meta[ids[2]] == case_meta(2)
    assert not list(tmp_path.rglob(".*"))  # no temporary files left behind


def test_write_pants_tree_resumes(tmp_path: Path) -> None:
    write_pants_tree(tmp_path, 2, shape=TINY)
    ct0 = tmp_path / "ImageTr" / "PanTS_00000001" / "ct.nii.gz"
    stamp = ct0.stat().st_mtime_ns
    missing = tmp_path / "LabelTr" / "PanTS_00000002" / "segmentations" / "spleen.nii.gz"
    missing.unlink()
    write_pants_tree(tmp_path, 2, shape=TINY, metadata_format="xlsx")
    assert ct0.stat().st_mtime_ns == stamp  # complete case skipped
    assert missing.is_file()  # incomplete case regenerated
    assert (tmp_path / "metadata.xlsx").is_file() and not (tmp_path / "metadata.csv").exists()


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    script = Path(__file__).parents[1] / "scripts" / "make_phantoms.py"
    spec = importlib.util.spec_from_file_location("make_phantoms", script)
    assert spec and spec.loader
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--out", str(tmp_path), "--n", "2", "--shape", *map(str, TINY), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "wrote 2 cases" in out and "tumor-positive" in out and "MiB" in out
    with pytest.raises(SystemExit):
        cli.main(["--out", str(tmp_path), "--n", "2", "--n-test", "3"])

    # A cohort's tumour scans, all held out: every case has a lesion mask and a cohort center.
    rich = tmp_path / "cohort_lesions"
    assert cli.main(["--out", str(rich), "--n", "3", "--n-test", "3", "--cohort", "--lesions", "all",
                     "--shape", *map(str, TINY), "--spacing", "6", "6", "6", "--no-progress"]) == 0
    assert "tumor-positive: 3 (100.0%)" in capsys.readouterr().out
    meta = read_metadata(rich / "metadata.csv")
    assert all(m.tumor and m.center.startswith("site_") for m in meta.values())
    for case in meta:
        lesion = rich / "LabelTe" / case / "segmentations" / "pancreatic_lesion.nii.gz"
        assert np.asarray(nib.load(lesion).dataobj).any()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["--out", str(tmp_path / "bad"), "--n", "2", "--cohort", str(tmp_path / "no_such.yaml")])
    assert "--cohort" in capsys.readouterr().err
