"""scripts/evaluate.py end to end on three tiny cases written here."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lib.core.labelmap import load_labelmap

REPO = Path(__file__).resolve().parents[1]
LM = load_labelmap()
LIVER, HEAD, LESION = (LM.name_to_id[n] for n in ("liver", "pancreas_head", "pancreatic_lesion"))
AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])  # voxel = 2 mm^3 = 0.002 mL
SHAPE = (12, 12, 8)


def _load_cli():
    spec = importlib.util.spec_from_file_location("pants_evaluate", REPO / "scripts" / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["pants_evaluate"] = mod  # worker processes unpickle jobs by module name
    spec.loader.exec_module(mod)
    return mod


cli = _load_cli()


def _save(arr: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr.astype(np.uint8), affine), str(path))


def _cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (pred, truth)."""
    base = np.zeros(SHAPE, np.uint8)
    base[2:6, 2:6, 2:6] = LIVER  # 64 voxels
    # a: perfect prediction of liver, pancreas head and a lesion touching it (tumour, found)
    a = base.copy()
    a[7:9, 7:9, 2:4] = HEAD
    a[9:11, 7:9, 2:4] = LESION  # 8 voxels = 0.016 mL
    # b: liver shifted by 2 voxels -> DSC 2*32/128 = 0.5; one false lesion voxel (no tumour, called)
    b_pred = np.zeros(SHAPE, np.uint8)
    b_pred[4:8, 2:6, 2:6] = LIVER
    b_pred[10, 10, 6] = LESION  # 0.002 mL
    # c: lesion in the truth only (tumour, missed)
    c_truth = base.copy()
    c_truth[9:11, 9:11, 5:7] = LESION
    return {"a": (a, a.copy()), "b": (b_pred, base.copy()), "c": (base.copy(), c_truth)}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    for name, (pred, truth) in _cases().items():
        _save(pred, tmp_path / "pred" / f"{name}.nii.gz")
        _save(truth, tmp_path / "truth" / f"{name}.nii.gz")
    (tmp_path / "meta.csv").write_text(
        "case_id,center,contrast_phase,tumor\na,X,venous,yes\nb,X,arterial,no\nc,Y,portal venous,\n"
    )
    return tmp_path


def _read(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_end_to_end(data: Path) -> None:
    out = data / "eval"
    rc = cli.main(["--pred", str(data / "pred"), "--truth", str(data / "truth"), "--out", str(out),
                   "--metadata", str(data / "meta.csv")])
    assert rc == 0
    for name in ("metrics.csv", "detection.csv", "summary.json", "dsc_boxplot.png", "roc.png",
                 "dsc_by_center.png", "dsc_by_contrast_phase.png"):
        assert (out / name).stat().st_size > 0, name

    rows = _read(out / "metrics.csv")
    assert len(rows) == 3 * 29
    assert list(rows[0])[:6] == ["case", "class", "class_id", "dsc", "nsd", "tolerance_mm"]
    liver = {r["case"]: r for r in rows if r["class"] == "liver"}
    assert float(liver["b"]["dsc"]) == pytest.approx(0.5)
    assert liver["b"]["center"] == "X" and liver["c"]["contrast_phase"] == "venous"
    assert float(liver["a"]["truth_ml"]) == pytest.approx(0.128)  # 64 voxels * 0.002 mL

    s = json.loads((out / "summary.json").read_text())
    assert s["n_cases"] == 3
    # liver DSC a, b, c = 1, 0.5, 1
    assert s["classes"]["liver"]["dsc_mean"] == pytest.approx(2.5 / 3)
    assert s["classes"]["liver"]["dsc_median"] == pytest.approx(1.0)
    assert s["classes"]["prostate"]["n_empty_both"] == 3 and s["classes"]["prostate"]["dsc_mean"] is None
    # lesion scores: a 0.016 (tumour), b 0.002 (none), c 0 (tumour); positive when > 0
    # TP a, FP b, FN c -> sensitivity 1/2, specificity 0/1; AUC pairs (a>b)=1, (c>b)=0 -> 0.5
    d = s["detection"]
    assert (d["tp"], d["fp"], d["tn"], d["fn"]) == (1, 1, 0, 1)
    assert d["sensitivity"] == 0.5 and d["specificity"] == 0.0 and d["auc"] == pytest.approx(0.5)
    assert d["n_mask_metadata_disagree"] == 0
    assert set(s["by_center"]["classes"]) == {"X", "Y"}
    assert s["by_center"]["classes"]["X"]["liver"]["dsc_mean"] == pytest.approx(0.75)
    assert set(s["by_contrast_phase"]["classes"]) == {"venous", "arterial"}

    det = {r["case"]: r for r in _read(out / "detection.csv")}
    assert float(det["a"]["score"]) == pytest.approx(0.016)
    assert det["c"]["truth_tumor"] == "True" and det["c"]["called_positive"] == "False"


def test_options_scores_threshold_metadata_truth_and_workers(data: Path) -> None:
    base = ["--pred", str(data / "pred"), "--truth", str(data / "truth"), "--no-plots"]
    (data / "scores.csv").write_text("case,score\na,0.9\nb,0.2\nc,0.6\n")
    assert cli.main([*base, "--out", str(data / "e1"), "--scores", str(data / "scores.csv"), "--threshold", "0.5",
                     "--metadata", str(data / "meta.csv"), "--tumor-truth", "metadata", "--workers", "2",
                     "--classes", "liver", "whole_pancreas"]) == 0
    s = json.loads((data / "e1" / "summary.json").read_text())
    assert list(s["classes"]) == ["liver", "whole_pancreas"]
    d = s["detection"]
    # c has no metadata tumour value -> mask (tumour). a 0.9 TP, b 0.2 TN, c 0.6 TP
    assert (d["tp"], d["fp"], d["tn"], d["fn"], d["auc"]) == (2, 0, 1, 0, 1.0)
    assert d["n_metadata_fallback_to_mask"] == 1
    assert not list((data / "e1").glob("*.png"))
    # the worker pool gives the same rows as the single-process run
    assert cli.main([*base, "--out", str(data / "e2"), "--classes", "liver", "whole_pancreas"]) == 0
    one = [{k: r[k] for k in ("case", "class", "dsc", "nsd")} for r in _read(data / "e2" / "metrics.csv")]
    two = [{k: r[k] for k in ("case", "class", "dsc", "nsd")} for r in _read(data / "e1" / "metrics.csv")]
    assert one == two


def test_print_by_phase_table(data: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    base = ["--pred", str(data / "pred"), "--truth", str(data / "truth"), "--no-plots", "--classes", "liver", "prostate"]
    assert cli.main([*base, "--out", str(data / "e"), "--metadata", str(data / "meta.csv"),
                     "--print-by", "contrast_phase"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "| class | all (3) | arterial (1) | venous (2) |",
        "|---|---|---|---|",
        "| liver | 0.833 | 0.500 | 1.000 |",
        "| prostate | - | - | - |",  # in no truth and no prediction
        "| tumour scans | 1/2 found, 0/1 clean | 0/1 clean | 1/2 found |",
    ]
    assert cli.main([*base, "--out", str(data / "e2"), "--print-by", "center"]) == 2
    assert "--print-by center needs --metadata" in caplog.text and not (data / "e2").exists()


def test_shape_mismatch_names_the_case(data: Path, caplog: pytest.LogCaptureFixture) -> None:
    _save(np.zeros((12, 12, 9), np.uint8), data / "pred" / "b.nii.gz")
    rc = cli.main(["--pred", str(data / "pred"), "--truth", str(data / "truth"), "--out", str(data / "e")])
    assert rc == 2
    assert "b: prediction shape (12, 12, 9) != truth shape (12, 12, 8)" in caplog.text
    assert not (data / "e" / "metrics.csv").exists()


def test_affine_mismatch_is_an_error(data: Path, caplog: pytest.LogCaptureFixture) -> None:
    _save(_cases()["a"][0], data / "pred" / "a.nii.gz", affine=np.diag([1.0, 1.0, 3.0, 1.0]))
    assert cli.main(["--pred", str(data / "pred"), "--truth", str(data / "truth"), "--out", str(data / "e")]) == 2
    assert "a: prediction affine differs" in caplog.text


def test_missing_prediction(data: Path, caplog: pytest.LogCaptureFixture) -> None:
    (data / "pred" / "c.nii.gz").unlink()
    args = ["--pred", str(data / "pred"), "--truth", str(data / "truth"), "--out", str(data / "e"), "--no-plots"]
    assert cli.main(args) == 2
    assert "1 case(s)" in caplog.text and ": c." in caplog.text and "--allow-missing" in caplog.text
    assert cli.main([*args, "--allow-missing"]) == 0
    rows = [r for r in _read(data / "e" / "metrics.csv") if r["case"] == "c"]
    assert all(r["pred_missing"] == "True" for r in rows)
    assert {r["class"]: r["dsc"] for r in rows}["liver"] == "0"
    assert json.loads((data / "e" / "summary.json").read_text())["cases_missing_prediction"] == ["c"]


def test_pants_layout_truth_is_consolidated(data: Path) -> None:
    pred, truth = _cases()["a"]
    # per-structure masks that overlap: pancreas covers head and lesion; the label map's
    # priority (lesion > head > pancreas) must decide the shared voxels
    masks = {
        "liver": truth == LIVER,
        "pancreas_head": truth == HEAD,
        "pancreatic_lesion": truth == LESION,
        "pancreas": np.isin(truth, [HEAD, LESION]),
    }
    seg = data / "pants" / "LabelTr" / "a" / "segmentations"
    for name, m in masks.items():
        _save(m, seg / f"{name}.nii.gz")
    label = cli.load_label(seg, LM)
    assert np.array_equal(label, LM.consolidate(masks)) and np.array_equal(label, truth)
    (data / "pred" / "b.nii.gz").unlink()
    (data / "pred" / "c.nii.gz").unlink()
    assert cli.main(["--pred", str(data / "pred"), "--truth", str(data / "pants"), "--out", str(data / "e"),
                     "--no-plots"]) == 0
    rows = _read(data / "e" / "metrics.csv")
    assert {r["case"] for r in rows} == {"a"}
    assert all(r["dsc"] == "1" for r in rows)


def test_list_classes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--list-classes"]) == 0
    out = capsys.readouterr().out
    assert "28  pancreatic_lesion" in out and "whole_pancreas" in out
