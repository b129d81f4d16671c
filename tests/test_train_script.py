"""``scripts/train.py`` under ``torchrun`` with 2 gloo processes on the CPU: killed with SIGKILL after
its first checkpoint, started again with the same command, it goes on from that epoch and publishes
model version v1 with its card. The labelled phantom root trains from its imported PanTS masks,
except on a scan with an annotator's ``final`` label, which overrides them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest

from lib.core.labelmap import load_labelmap
from lib.core.settings import load_segmentation_config
from lib.datastore.pants import PanTSDatastore
from lib.model.model_store import ModelStore
from lib.model.training import CaseCache, build_cache
from pants_tools.phantom import write_pants_tree
from server import REPO

LM = load_labelmap()
TORCHRUN = Path(sys.executable).parent / "torchrun"
EPOCHS = 16  # each takes about a second: the run is killed after its first


def _presets(path: Path) -> Path:
    """presets.yaml with a narrow network (8 filters): each step well under a second on 2 cores."""
    text = (REPO / "configs" / "presets.yaml").read_text()
    assert "  init_filters: 16\n" in text
    path.write_text(text.replace("  init_filters: 16\n", "  init_filters: 8\n"))
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 labelled phantoms at the fast preset's 6 mm; one scan also has a final label (background only)."""
    base = tmp_path_factory.mktemp("train_script")
    ids = write_pants_tree(base / "PanTS", 6, shape=(24, 24, 16), spacing=(6.0, 6.0, 6.0), seed=11)
    ds = PanTSDatastore(base / "PanTS")
    ref = nib.load(ds.get_image_uri(ids[0]))
    nib.save(nib.Nifti1Image(np.zeros(ref.shape, np.uint8), ref.affine), base / "final.nii.gz")
    ds.save_label(ids[0], str(base / "final.nii.gz"), "final", {})
    ds.close()
    return base / "PanTS"


def _command(root: Path, presets: Path) -> list[str]:
    return [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(REPO / "scripts" / "train.py"),
            "--studies", str(root), "--presets", str(presets), "--device", "cpu", "--epochs", str(EPOCHS),
            "--iterations-per-epoch", "2", "--batch-size", "1", "--workers", "1", "--lr", "1e-3", "--val-every", "4"]


def test_final_labels_override_imported_masks_in_the_training_list(root: Path) -> None:
    ds = PanTSDatastore(root)
    try:
        entries = {d["image_id"]: d for d in ds.datalist()}
        assert len(entries) == 6
        tags = sorted(d["tag"] for d in entries.values())
        assert tags == ["final"] + ["pants"] * 5
        final = next(d for d in entries.values() if d["tag"] == "final")
        assert nib.load(final["label"]).get_fdata().max() == 0  # the annotator's label, not the masks
    finally:
        ds.close()


def test_torchrun_two_gloo_processes_resume_after_kill_and_publish_a_version(root: Path, tmp_path: Path) -> None:
    cmd = _command(root, _presets(tmp_path / "presets.yaml"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run_dir = root / ".pants_label" / "models" / ".train" / "fast"
    log1 = tmp_path / "first.log"
    with open(log1, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not list(run_dir.glob("checkpoint-*.pt")):
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed:\n{log1.read_text()[-3000:]}"
        # torchrun starts its ranks in sessions of their own: kill all of them, at once
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        assert len(family) >= 3, family  # torchrun and its 2 ranks
        for p in family:
            p.send_signal(signal.SIGKILL)
        proc.wait(30)
        _gone, alive = psutil.wait_procs(family[1:], timeout=20)
        assert all(p.status() == psutil.STATUS_ZOMBIE for p in alive), alive
    stats_path = root / ".pants_label" / "models" / "train_stats_fast.json"
    killed_at = json.loads(stats_path.read_text()).get("epoch", 0)
    assert killed_at < EPOCHS
    assert not (root / ".pants_label" / "models" / "segresnet_fast.pt").exists()  # nothing published yet

    second = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    out = second.stdout + second.stderr
    assert "resuming from the checkpoint of epoch" in out and "published model version v1" in out

    stats = json.loads(stats_path.read_text())
    assert stats["status"] == "DONE" and stats["processes"] == 2 and stats["published"] is True
    assert stats["version"] == "v1" and 1 <= stats["resumed_from_epoch"] < EPOCHS
    assert stats["epoch"] == EPOCHS and stats["iterations"] == EPOCHS * 1  # 2 per epoch shared by 2 ranks
    assert not list(run_dir.glob("checkpoint-*.pt"))  # removed once the run ended

    store = ModelStore(root / ".pants_label" / "models", "fast", str(root))
    assert store.serving_version() == "v1"
    card = store.card("v1")
    assert card["device"] == "cpu x2 (gloo)" and card["epochs"]["resumed_from"] == stats["resumed_from_epoch"]
    scans = card["training_scans"]
    assert scans["scans"] == stats["train_size"] == sum(scans["label_tags"].values())
    ds = PanTSDatastore(root)
    tags = [d["tag"] for d in ds.datalist() if d["image_id"] not in stats["val_ids"]]
    ds.close()
    assert scans["label_tags"] == {t: tags.count(t) for t in set(tags)} and tags.count("pants") >= 3
    assert sum(scans["by_center"].values()) == sum(scans["by_phase"].values()) == scans["scans"]
    assert card["parent"] is None and card["baseline"] == {"version": None, "mean_dice": None}
    assert card["network"]["init_filters"] == 8 and card["preset"] == "fast" and card["code_version"]
    recipe = card["recipe"]  # the crop and loss settings the run used, read from presets.yaml
    assert recipe["augment"] == {"probability": 0.0, "rotate_deg": 15.0, "scale": 0.15}
    assert recipe["crop_order"] == "scan_first" and recipe["crop_class_weights"]["pancreatic_lesion"] == 4.0
    assert recipe["lesion_synthesis"]["probability"] == 0.0 and recipe["lesion_synthesis"]["contrast_hu"] == [5.0, 60.0]
    per_class = card["validation"]["per_class"]
    assert set(LM.names) <= set(per_class) and all({"dsc", "nsd"} <= set(v) for v in per_class.values())
    assert card["training_time_s"] > 0


def test_the_cache_is_built_by_parallel_worker_processes(root: Path, tmp_path: Path) -> None:
    cfg = load_segmentation_config().model_copy()
    ds = PanTSDatastore(root)
    items = [(d["image_id"], d["image"], d["label"]) for d in ds.datalist()][:4]
    ds.close()
    cache = CaseCache(tmp_path / "cache", cfg, cfg.preset("fast"), LM)
    seen: list[tuple[int, int]] = []
    assert build_cache(cache, items, workers=2, progress=lambda d, t: seen.append((d, t))) == 4
    assert seen[-1] == (4, 4) and all(cache.has(i[1], i[2]) for i in items)
    assert build_cache(cache, items, workers=2) == 0  # cached on disk: nothing to do again
    case = cache.get(*items[0])
    assert isinstance(case.image, np.memmap)  # read from disk, not held in RAM
