"""scripts/lesion_logit_sweep.py on tiny phantoms with an untrained network."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from server import REPO

from lib.core.labelmap import load_labelmap
from lib.core.settings import load_segmentation_config
from lib.model.model_store import publish
from lib.model.segmenter import build_network
from pants_tools.phantom import write_pants_tree

spec = importlib.util.spec_from_file_location("lesion_logit_sweep", REPO / "scripts" / "lesion_logit_sweep.py")
sweep = importlib.util.module_from_spec(spec)
sys.modules["lesion_logit_sweep"] = sweep  # its dataclass looks its module up by name
spec.loader.exec_module(sweep)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sweep")
    write_pants_tree(root / "pool", 4, shape=(32, 32, 24), spacing=(6.0, 6.0, 6.0), seed=3,
                     lesions={0: True, 1: False, 2: True, 3: False})
    lm = load_labelmap()
    model = root / "segresnet_fast.pt"
    publish(build_network(load_segmentation_config(), lm.num_classes).state_dict(), {"labels": lm.names}, model)
    return root / "pool", model


def test_sweep_table_and_rows(pool: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images, model = pool
    out = tmp_path / "sweep.csv"
    assert sweep.main(["--images", str(images), "--model", str(model), "--biases", "-40", "0", "40",
                       "--csv", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "highest lesion probability in a scan, median (range): tumour scans 0." in printed
    lines = [ln for ln in printed.splitlines() if ln.startswith("|")]
    assert lines[0].startswith("| lesion logit + | lesion DSC, tumour scans (2) |") and len(lines) == 5
    assert lines[2] == "| -40 | 0.000 | 0.000 | 0.000 | 0/2 | 0/2 | 0.0 / 0.0 |"  # pushed down: drawn nowhere
    assert lines[4].split(" | ")[4:6] == ["2/2", "2/2"]  # pushed up: drawn in every scan
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 * 3
    by_case: dict[str, list[float]] = {}
    for r in rows:
        by_case.setdefault(r["case"], []).append(float(r["pred_ml"]))
        assert (r["dsc"] == "") == (r["tumour"] == "False")  # DSC only where there is a lesion
        assert 0 < float(r["max_lesion_prob"]) < 1
        assert (int(r["pieces"]) == 0) == (float(r["pred_ml"]) == 0)  # a blob wherever lesion is drawn
    for drawn in by_case.values():  # a larger raise never draws less lesion
        assert drawn == sorted(drawn)
    hit = [r for r in rows if r["tumour"] == "True" and r["bias"] == "40.0"]
    assert all(float(r["dsc"]) > 0 for r in hit)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()  # nothing leaks to later tests


def test_box_margin_cuts_to_the_pancreas(pool: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    images, model = pool
    assert sweep.main(["--images", str(images), "--model", str(model), "--biases", "40", "--limit", "2",
                       "--box-margin", "6"]) == 0
    table = capsys.readouterr().out
    whole = [ln for ln in table.splitlines() if ln.startswith("| 40 |")][0]
    ml_per_tumour_scan = float(whole.split(" | ")[2])
    assert 0 < ml_per_tumour_scan < 32 * 32 * 24 * 0.216 / 4  # a box, far less than the scan


def test_bad_options_are_refused(pool: tuple[Path, Path]) -> None:
    images, model = pool
    with pytest.raises(SystemExit, match="--preset nope: not in configs/presets.yaml"):
        sweep.main(["--images", str(images), "--model", str(model), "--preset", "nope"])
    with pytest.raises(SystemExit, match="no ImageTe/ for --split test"):
        sweep.main(["--images", str(images), "--model", str(model), "--split", "test"])
    with pytest.raises(SystemExit, match="no such file"):
        sweep.main(["--images", str(images), "--model", str(images / "none.pt")])
