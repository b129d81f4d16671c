"""The PanTS app behind the real server, driven by 3D Slicer's client (``MONAILabelClient``).

Covers /info, next sample, infer (geometry, dtype, values, Slicer's .nrrd request), save label,
and a short training run that publishes a model the infer task then uses without a restart.
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
import torch

from lib.core.labelmap import load_labelmap
from lib.core.settings import load_segmentation_config
from lib.model.model_store import publish
from lib.model.segmenter import build_network
from pants_tools.phantom import write_pants_tree
from server import Server, run_server_expecting_failure

pytestmark = pytest.mark.server

LM = load_labelmap()
# Coarse voxels so that the 'fast' preset (3 mm) still sees ~13 voxels per side.
SHAPE, SPACING = (40, 40, 32), (2.5, 2.5, 3.0)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path, Path]]:
    base = tmp_path_factory.mktemp("app")
    root = base / "PanTS"
    write_pants_tree(root, 6, shape=SHAPE, spacing=SPACING, seed=3)
    model_dir = base / "model"
    server = Server(root, base / "server.log", conf={"model_dir": str(model_dir), "preset": "fast"})
    try:
        yield server, root, model_dir
    finally:
        server.stop()


@pytest.fixture()
def client(app: tuple[Server, Path, Path]):
    from monailabel.client import MONAILabelClient

    return MONAILabelClient(app[0].url, tmpdir=str(app[1].parent))


def test_info_lists_28_labels_model_trainer_strategies(client) -> None:
    info = client.info()
    assert list(info["labels"]) == LM.names
    assert [info["models"]["segmentation"]["labels"][n] for n in LM.names] == list(range(1, 29))
    model = info["models"]["segmentation"]
    assert model["type"] == "segmentation" and model["dimension"] == 3
    assert model["labels"] == LM.labels_dict()
    assert model["preset"] == "fast"
    assert model["precision"] in {"float32", "bfloat16 mixed"}
    assert "segmentation" in info["trainers"]
    assert "random" in info["strategies"]
    assert info["datastore"]["total"] == 6


def test_untrained_model_is_said_plainly(app, client) -> None:
    model_dir = app[2]
    if (model_dir / "segresnet_fast.pt").exists():
        pytest.skip("a model was already published in this module")
    model = client.info()["models"]["segmentation"]
    assert model["trained"] is False
    assert "UNTRAINED" in model["description"]


def test_next_sample_returns_a_served_scan(app, client) -> None:
    res = client.next_sample("random", {})
    # Every phantom has imported masks, so all are labelled: the answer is empty, not an error.
    assert res == {} or res["id"].startswith("PanTS_")


def _infer(client, image_id: str, params: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    path, params_out = client.infer("segmentation", image_id, params)
    img = nib.load(path) if not path.endswith(".nrrd") else None
    if img is not None:
        return np.asarray(img.dataobj), img.affine, params_out
    import nrrd

    data, header = nrrd.read(path)
    return data, header, params_out


def test_infer_geometry_dtype_and_values(app, client) -> None:
    root = app[1]
    ref = nib.load(root / "ImageTr" / "PanTS_00000001" / "ct.nii.gz")
    label, affine, params = _infer(client, "PanTS_00000001", {})
    assert label.shape == ref.shape
    assert label.dtype == np.uint8
    np.testing.assert_allclose(affine, ref.affine, atol=1e-4)
    assert label.min() >= 0 and label.max() <= 28
    assert set(params["latencies"]) >= {"load", "pre", "infer", "post", "write", "total"}


def test_infer_as_slicer_asks_nrrd_uint8(app, client) -> None:
    root = app[1]
    ref = nib.load(root / "ImageTr" / "PanTS_00000002" / "ct.nii.gz")
    data, header, _ = _infer(client, "PanTS_00000002", {"result_extension": ".nrrd", "result_dtype": "uint8"})
    assert data.shape == ref.shape and data.dtype == np.uint8
    # NRRD geometry is LPS: it must describe the same voxel grid as the NIfTI (RAS) affine.
    lps = np.diag([-1.0, -1.0, 1.0]) @ ref.affine[:3, :3]
    np.testing.assert_allclose(np.asarray(header["space directions"]).T, lps, atol=1e-4)
    np.testing.assert_allclose(header["space origin"], np.diag([-1.0, -1.0, 1.0]) @ ref.affine[:3, 3], atol=1e-4)


def test_infer_refuses_bad_extension(app) -> None:
    url = f"{app[0].url}/infer/segmentation?image=PanTS_00000001"
    body = (
        "--b\r\nContent-Disposition: form-data; name=\"params\"\r\n\r\n"
        '{"result_extension": ".exe"}\r\n--b--\r\n'
    ).encode()
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "multipart/form-data; boundary=b"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    assert 400 <= err.value.code < 500
    assert "result_extension" in err.value.read().decode()


def test_save_label_then_download(app, client, tmp_path: Path) -> None:
    root = app[1]
    ref = nib.load(root / "ImageTr" / "PanTS_00000003" / "ct.nii.gz")
    label = np.zeros(ref.shape, np.uint8)
    label[10:20, 10:20, 8:16] = LM.id_of("liver")
    label[22:26, 20:24, 10:14] = LM.id_of("pancreas_head")
    f = tmp_path / "final.nii.gz"
    nib.save(nib.Nifti1Image(label, ref.affine), f)
    client.save_label("PanTS_00000003", str(f), tag="final")
    with urllib.request.urlopen(f"{app[0].url}/datastore/label?label=PanTS_00000003&tag=final", timeout=30) as r:
        (tmp_path / "back.nii.gz").write_bytes(r.read())
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "back.nii.gz").dataobj), label)


def _wait_training(client, timeout: float = 600, model: str = "segmentation", since: float = 0.0) -> dict:
    """The stats of the run that ended last, started after ``since`` (an earlier run's DONE stats
    are still there right after a new run was asked for)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        running = client.train_status(check_if_running=True)
        stats = client.info()["train_stats"].get(model, {})
        if not running and stats.get("status") in {"DONE", "FAILED"} and stats.get("start_ts", 0) >= since:
            return stats
        time.sleep(1)
    raise TimeoutError("training did not finish")


def test_training_publishes_a_model_that_infer_uses_without_restart(app, client) -> None:
    _, _, before = _infer(client, "PanTS_00000001", {})
    assert before["trained"] is False
    client.train_start("segmentation", {"max_epochs": 2, "iterations_per_epoch": 2, "batch_size": 1})
    stats = _wait_training(client)
    assert stats["status"] == "DONE", stats
    assert stats["published"] is True
    assert stats["val_size"] >= 1 and stats["train_size"] >= 1
    assert (app[2] / "segresnet_fast.pt").exists()
    model = client.info()["models"]["segmentation"]
    assert model["trained"] is True and "UNTRAINED" not in model["description"]
    _, _, after = _infer(client, "PanTS_00000001", {})
    assert after["trained"] is True
    assert after["model_mtime"] == pytest.approx((app[2] / "segresnet_fast.pt").stat().st_mtime)


def test_pancreas_stage_is_used_once_its_weights_are_published(app, client) -> None:
    stage = client.info()["models"]["segmentation"]["second_stage"]
    assert stage["preset"] == "pancreas" and stage["ready"] is False
    _, _, alone = _infer(client, "PanTS_00000002", {})
    assert "second_stage" not in alone and "stage2" not in alone["latencies"]

    cfg = load_segmentation_config()
    torch.manual_seed(0)
    meta = {"labels": LM.names, "preset": "pancreas", "preprocessing": cfg.preprocessing.input_map()}
    publish(build_network(cfg, LM.num_classes).state_dict(), meta, app[2] / "segresnet_pancreas.pt")
    model = client.info()["models"]["segmentation"]
    assert model["second_stage"]["ready"] is True and "pancreas region at 2 mm" in model["description"]
    label, _, both = _infer(client, "PanTS_00000002", {})
    assert both["second_stage"]["preset"] == "pancreas" and "stage2" in both["latencies"]
    assert label.shape == nib.load(app[1] / "ImageTr" / "PanTS_00000002" / "ct.nii.gz").shape
    (app[2] / "segresnet_pancreas.pt").unlink()  # the rest of the module: stage 1 alone


def test_click_model_trains_on_the_labels_and_publishes_only_a_better_version(app, client) -> None:
    import os
    import shutil

    from monailabel.client.client import MONAILabelClientException

    with pytest.raises(MONAILabelClientException) as err:  # refused before a run starts
        client.train_start("deepedit", {"steps": 0})
    assert "422" in str(err.value) or "steps" in str(err.value.msg), err.value
    assert client.info()["models"]["deepedit"]["model_version"] is None

    # Nothing served yet: the first run publishes (the segmentation model's rule).
    client.train_start("deepedit", {"steps": 3})
    first = _wait_training(client, model="deepedit")
    assert first["status"] == "DONE" and first["progress"] == 1.0, first
    assert first["train_size"] >= 1 and first["val_size"] >= 1
    assert first["cache_built"] == first["train_size"] + first["val_size"]
    assert first["published"] is True and first["baseline_metric"] is None and first["version"] == "v1", first
    assert "first_iteration_s" in first and first["step"] == 3
    served = client.info()["models"]["deepedit"]
    assert served["trained"] is True and served["model_version"] == "v1"
    card = json.loads((app[2] / "versions" / "clicks" / "v1" / "card.json").read_text())
    assert card["val_metric"] == first["val_metric"] and card["baseline"]["val_metric"] is None

    # Weights placed by hand (the trained demo weights) become the served version; a short run from
    # scratch scores below them on the same held-out windows, so it is not served. The scans
    # come from the disk cache: nothing is prepared again.
    demo = Path(__file__).resolve().parents[1] / "apps" / "pants_label" / "demo_model" / "segresnet_clicks.pt"
    tmp = app[2] / "segresnet_clicks.pt.part"
    shutil.copy(demo, tmp)
    os.replace(tmp, app[2] / "segresnet_clicks.pt")
    t0 = time.time()
    client.train_start("deepedit", {"steps": 2, "from_scratch": True})
    second = _wait_training(client, model="deepedit", since=t0)
    assert second["status"] == "DONE" and second["cache_built"] == 0, second
    assert second["parent_version"] == "v2" and second["baseline_metric"] is not None, second
    assert second["val_metric"] < second["baseline_metric"] and second["published"] is False, second
    assert client.info()["models"]["deepedit"]["model_version"] == "v2"
    # the refused run is kept as v3, unserved, and its card says why
    assert second["version"] == "v3", second
    card = json.loads((app[2] / "versions" / "clicks" / "v3" / "card.json").read_text())
    assert card["published"] is False and card["refused"].startswith(f"val Dice {second['val_metric']:.4f} < served")


def test_bad_conf_stops_the_server_naming_the_key(tmp_path: Path) -> None:
    write_pants_tree(tmp_path / "d", 1, shape=(24, 24, 16))
    code, out = run_server_expecting_failure(tmp_path / "d", {"preset": "turbo"})
    assert code != 0
    assert "--conf preset" in out and "turbo" in out
