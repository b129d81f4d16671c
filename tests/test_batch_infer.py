"""scripts/batch_infer.py under ``torch.distributed.run`` with 2 gloo processes on the CPU, then resumed;
its outputs name the model version, and so does scripts/evaluate.py's summary of them."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from lib.core.labelmap import load_labelmap
from lib.model.model_store import ModelStore, model_path
from lib.model.pancreas_stage import SecondStage
from pants_tools.phantom import write_pants_tree
from lib.model.segmenter import Segmenter, build_network
from lib.core.settings import load_segmentation_config
from lib.imaging.volume_io import load_volume

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "batch_infer.py"
LM = load_labelmap()
CFG = load_segmentation_config()


def _run(args: list[str], torchrun: bool) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun \
        else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, str(SCRIPT), *args, "--no-progress"], capture_output=True, text=True,
                          timeout=600, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("batch")
    write_pants_tree(base / "PanTS", 3, shape=(24, 24, 16), spacing=(3.0, 3.0, 3.0), n_test=1, seed=2)
    torch.manual_seed(4)
    store = ModelStore(base / "PanTS" / ".pants_label" / "models", "fast", str(base / "PanTS"))  # the dataset's own
    assert store.publish(build_network(CFG, LM.num_classes).state_dict(), {"labels": LM.names}, {"summary": "test"}) == "v1"
    return base, store.serving_path


def test_two_gloo_ranks_share_the_scans_then_a_rerun_does_only_what_is_missing(pool) -> None:
    base, weights = pool
    out = base / "out"
    args = ["--images", str(base / "PanTS"), "--out", str(out), "--preset", "fast"]  # the dataset's served model
    proc = _run(args, torchrun=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 scans, 0 already done, 3 to do on 2 process(es)" in proc.stdout + proc.stderr

    cases = ["PanTS_00000001", "PanTS_00000002", "PanTS_00000003"]  # the last one is the test split
    scores = {c: json.loads((out / "scores" / f"{c}.json").read_text()) for c in cases}
    assert {s["rank"] for s in scores.values()} == {0, 1}  # sharded: both ranks worked
    assert {s["model_version"] for s in scores.values()} == {"v1"}
    model = json.loads((out / "model.json").read_text())
    assert model["version"] == "v1" and model["path"] == str(weights) and model["summary"] == "test"
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == cases and {r["model_version"] for r in rows} == {"v1"}
    assert all(0.0 <= float(r["score"]) <= 1.0 for r in rows)  # evaluate.py --scores reads case,score

    # Same label map as the infer pipeline gives in this process. In bfloat16 (presets.yaml cpu_bf16,
    # on where the CPU has it) the sums depend on the thread count (a rank has 1 thread, this process
    # 2), and random weights' 29 logits are near-tied: a few voxels may differ; in float32 none.
    ct = base / "PanTS" / "ImageTr" / cases[0] / "ct.nii.gz"
    seg = Segmenter(CFG, LM, "fast", weights)
    expected, _ = seg.segment(load_volume(ct))
    got = nib.load(out / "labels" / f"{cases[0]}.nii.gz")
    differ = float(np.mean(np.asarray(got.dataobj) != expected))
    assert differ <= (0.01 if seg.cpu_bf16 else 0.0), differ
    np.testing.assert_allclose(got.affine, nib.load(ct).affine, atol=1e-5)
    ml = np.count_nonzero(expected == LM.id_of("pancreatic_lesion")) * 27 / 1000  # 3 mm voxels
    assert scores[cases[0]]["lesion_ml"] == pytest.approx(ml, abs=1e-3)

    # Interrupted run: one scan's score file never written. The rerun redoes only that scan.
    (out / "scores" / f"{cases[1]}.json").unlink()
    kept = {c: (out / "labels" / f"{c}.nii.gz").stat().st_mtime_ns for c in (cases[0], cases[2])}
    proc = _run(args, torchrun=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 scans, 2 already done, 1 to do on 1 process(es)" in proc.stdout + proc.stderr
    assert {c: (out / "labels" / f"{c}.nii.gz").stat().st_mtime_ns for c in kept} == kept
    assert (out / "scores" / f"{cases[1]}.json").is_file()
    assert len(json.loads((out / "scores.json").read_text())) == 3
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temp files left


def test_missing_weights_is_refused_naming_the_file(pool) -> None:
    base, _ = pool
    proc = _run(["--images", str(base / "PanTS"), "--out", str(base / "o2"), "--model", str(base / "none.pt"),
                 "--preset", "fast"], torchrun=False)
    assert proc.returncode != 0
    assert "none.pt" in proc.stderr and "--allow-untrained" in proc.stderr


def test_evaluate_names_the_version_and_another_model_cannot_add_to_the_same_output(pool, tmp_path: Path) -> None:
    base, weights = pool
    out = base / "out"
    ev = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), "--pred", str(out / "labels"),
                         "--truth", str(base / "PanTS" / "LabelTr"), "--out", str(tmp_path / "ev"), "--no-plots",
                         "--allow-missing"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert ev.returncode == 0, ev.stdout + ev.stderr
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["model"]["version"] == "v1" and summary["model"]["sha256"] == json.loads(
        (out / "model.json").read_text())["sha256"]
    assert "model v1" in ev.stderr

    torch.manual_seed(5)
    store = ModelStore(weights.parent, "fast")
    assert store.publish(build_network(CFG, LM.num_classes).state_dict(), {"labels": LM.names}, {}) == "v2"
    proc = _run(["--images", str(base / "PanTS"), "--out", str(out), "--preset", "fast"], torchrun=False)
    assert proc.returncode != 0 and "holds predictions of another model (v1)" in proc.stderr
    assert json.loads((out / "model.json").read_text())["version"] == "v1"


def test_pancreas_stage_beside_the_weights_is_used_as_the_server_would(pool, tmp_path: Path) -> None:
    base, weights = pool
    torch.manual_seed(6)
    stage2 = ModelStore(weights.parent, CFG.second_stage.preset)
    meta = {"labels": LM.names, "preset": CFG.second_stage.preset}
    assert stage2.publish(build_network(CFG, LM.num_classes).state_dict(), meta, {}) == "v1"
    try:
        out = tmp_path / "two"
        proc = _run(["--images", str(base / "PanTS"), "--out", str(out), "--preset", "fast", "--limit", "1"],
                    torchrun=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        model = json.loads((out / "model.json").read_text())
        assert model["second_stage"]["version"] == "v1" and model["second_stage"]["path"] == str(stage2.serving_path)
        vol = load_volume(base / "PanTS" / "ImageTr" / "PanTS_00000001" / "ct.nii.gz")
        first, _ = Segmenter(CFG, LM, "fast", model_path(weights.parent, "fast")).segment(vol)
        stage = SecondStage(Segmenter(CFG, LM, CFG.second_stage.preset, stage2.serving_path), CFG.second_stage.margin_mm)
        expected, _ = stage.refine(vol, first)
        got = np.asarray(nib.load(out / "labels" / "PanTS_00000001.nii.gz").dataobj)
        np.testing.assert_array_equal(got, expected)
    finally:
        stage2.serving_path.unlink()
