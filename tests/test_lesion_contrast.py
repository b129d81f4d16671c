"""scripts/lesion_contrast.py: lesion contrast and the best threshold rule, on tiny phantoms."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from server import REPO

from pants_tools.phantom import write_pants_tree

spec = importlib.util.spec_from_file_location("lesion_contrast", REPO / "scripts" / "lesion_contrast.py")
contrast = importlib.util.module_from_spec(spec)
sys.modules["lesion_contrast"] = contrast
spec.loader.exec_module(contrast)


def _gland_with_lesion(lesion_hu: float, noise: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    region = np.zeros((24, 24, 24), bool)
    region[4:20, 4:20, 4:20] = True
    lesion = np.zeros_like(region)
    lesion[8:13, 8:13, 8:13] = True
    ct = np.where(region, 80.0, -100.0) + rng.normal(0, noise, region.shape)
    ct[lesion] += lesion_hu - 80.0
    return ct.astype(np.float32), region, lesion


def test_a_dark_lesion_is_found_exactly_and_an_invisible_one_is_not() -> None:
    dsc, at = contrast.best_threshold_dsc(*_gland_with_lesion(30.0), sigma=0.0)
    assert dsc == pytest.approx(1.0) and -50 < at <= 0
    dsc, _ = contrast.best_threshold_dsc(*_gland_with_lesion(80.0, noise=20.0), sigma=1.0)
    assert dsc < 0.2  # same HU as the gland: no threshold separates it
    noisy, _ = contrast.best_threshold_dsc(*_gland_with_lesion(60.0, noise=20.0), sigma=0.0)
    smooth, _ = contrast.best_threshold_dsc(*_gland_with_lesion(60.0, noise=20.0), sigma=1.0)
    assert smooth > noisy  # averaging over neighbours lifts a low-contrast lesion out of the noise


def test_table_and_csv_on_phantoms(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "pool"
    write_pants_tree(root, 3, shape=(48, 48, 40), spacing=(6.0, 6.0, 6.0), seed=2, lesions={0: True, 1: False, 2: True})
    out = tmp_path / "c.csv"
    assert contrast.main(["--images", str(root), "--csv", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| PanTS_00000001 |" in printed and "| PanTS_00000002 |" not in printed  # tumour scans only
    assert "| all | 2 |" in printed
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["case"] for r in rows] == ["PanTS_00000001", "PanTS_00000003"]
    for r in rows:
        assert 0.0 <= float(r["best_dsc"]) <= 1.0 and float(r["lesion_ml"]) > 0
        assert r["contrast_phase"] and r["diagnosis"] in {"PDAC", "cyst", "PNET"}


def test_bad_options_are_refused(tmp_path: Path) -> None:
    write_pants_tree(tmp_path / "clean", 1, shape=(32, 32, 24), spacing=(6.0, 6.0, 6.0), seed=1, lesions={0: False})
    with pytest.raises(SystemExit, match="no scan with a pancreatic_lesion mask"):
        contrast.main(["--images", str(tmp_path / "clean")])
    with pytest.raises(SystemExit, match="no ImageTe/ for --split test"):
        contrast.main(["--images", str(tmp_path / "clean"), "--split", "test"])
    with pytest.raises(SystemExit, match="--sigma -1.0: must be 0 or more"):
        contrast.main(["--images", str(tmp_path / "clean"), "--sigma", "-1"])
