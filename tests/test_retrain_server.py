"""Auto-retrain behind the real server, driven by 3D Slicer's client (``MONAILabelClient``).

With ``--conf auto_train_after 2`` the second new ``final`` label starts training by itself
(MONAI Label's own background train task); two more labels saved while that run is going queue
exactly one more run, which starts when the first ends. Each run retrains the click model after the
segmentation model (``auto_train_clicks``, with ``click_train_steps 2`` to stay short).
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lib.core.labelmap import load_labelmap
from pants_tools.phantom import write_pants_tree
from server import Server

pytestmark = pytest.mark.server

LM = load_labelmap()
SHAPE, SPACING = (24, 24, 16), (3.0, 3.0, 3.0)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path, Path, list[str]]]:
    base = tmp_path_factory.mktemp("retrain")
    root = base / "PanTS"
    ids = write_pants_tree(root, 5, shape=SHAPE, spacing=SPACING, seed=7)
    model_dir = base / "model"
    # each automatic run of the segmentation model is followed by a short one of the click model
    conf = {"model_dir": str(model_dir), "preset": "fast", "auto_train_after": "2", "train_max_epochs": "1",
            "auto_train_clicks": "true", "click_train_steps": "2"}
    server = Server(root, base / "server.log", conf=conf)
    try:
        yield server, root, model_dir, ids
    finally:
        server.stop()


@pytest.fixture()
def client(app):
    from monailabel.client import MONAILabelClient

    return MONAILabelClient(app[0].url, tmpdir=str(app[1].parent))


def _save_final(client, root: Path, image_id: str, tmp: Path) -> None:
    ref = nib.load(root / "ImageTr" / image_id / "ct.nii.gz")
    label = np.zeros(ref.shape, np.uint8)
    label[4:14, 4:14, 3:10] = LM.id_of("liver")
    label[14:18, 12:16, 6:9] = LM.id_of("pancreas_head")
    f = tmp / f"{image_id}.nii.gz"
    nib.save(nib.Nifti1Image(label, ref.affine), f)
    client.save_label(image_id, str(f), tag="final")


def _auto(client) -> dict:
    return client.info()["train_stats"]["segmentation"]["auto_retrain"]


def _wait(client, done, timeout: float = 600) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        auto = _auto(client)
        if done(auto):
            return auto
        time.sleep(1)
    raise TimeoutError(f"auto-retrain state never matched: {_auto(client)}")


def test_nth_final_label_starts_training_and_triggers_during_a_run_queue_one_more(app, client, tmp_path) -> None:
    server, root, model_dir, ids = app
    auto = _auto(client)
    assert auto["auto_train_after"] == 2 and auto["runs_started"] == 0 and not auto["pending"]

    _save_final(client, root, ids[0], tmp_path)
    time.sleep(3)  # longer than the launcher's poll: nothing may start after one label
    auto = _auto(client)
    assert auto["runs_started"] == 0 and not auto["pending"] and auto["new_final_labels"] == 1
    assert client.train_status(check_if_running=True) is False

    _save_final(client, root, ids[1], tmp_path)  # the 2nd new final label: training starts by itself
    auto = _wait(client, lambda a: a["runs_started"] == 1)
    assert auto["running"] is True

    # Two more labels while that run is going: one pending run, not lost, not doubled.
    _save_final(client, root, ids[2], tmp_path)
    _save_final(client, root, ids[2], tmp_path)  # the same scan again counts once
    _save_final(client, root, ids[3], tmp_path)
    auto = _auto(client)
    assert auto["pending"] is True and auto["running"] is True and auto["runs_started"] == 1, auto

    auto = _wait(client, lambda a: a["runs_started"] == 2 and not a["running"] and not a["pending"])
    assert auto["last_status"] == "DONE", server.tail()
    stats = client.info()["train_stats"]["segmentation"]
    assert stats["status"] == "DONE" and stats["progress"] == 1.0
    assert stats["trigger"] == "auto: 2 new final labels"
    assert "best_metric" in stats and "baseline_metric" in stats
    # The first run had no model to beat, so it published; infer serves it without a restart.
    assert (model_dir / "segresnet_fast.pt").exists()
    assert client.info()["models"]["segmentation"]["trained"] is True
    # Both runs went through MONAI Label's train task list (what GET /train/ reports).
    with urllib.request.urlopen(f"{server.url}/train/?all=true", timeout=30) as r:
        tasks = json.loads(r.read())
    auto_runs = [t for t in tasks if str(t["request"].get("trigger", "")).startswith("auto:")]
    assert len(auto_runs) == 2 and all(t["status"] == "DONE" for t in auto_runs), tasks
    # The click model was retrained after each, on the same labels: the first chained run had no
    # click weights to beat, so it published a version that the deepedit model now serves.
    clicks = client.info()["train_stats"]["deepedit"]
    assert clicks["status"] == "DONE" and clicks["trigger"] == "auto: 2 new final labels", clicks
    assert clicks["steps"] == 2 and clicks["train_size"] + clicks["val_size"] == 5
    assert (model_dir / "versions" / "clicks" / "v1" / "card.json").exists()
    card = json.loads((model_dir / "versions" / "clicks" / "v1" / "card.json").read_text())
    assert card["trigger"] == "auto: 2 new final labels" and card["baseline"]["val_metric"] is None
    served = client.info()["models"]["deepedit"]
    assert served["trained"] is True and served["model_version"] in {"v1", "v2"}
