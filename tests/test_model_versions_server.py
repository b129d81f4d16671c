"""Model versions through the real server and ``MONAILabelClient``: each dataset has its own model
store (two datasets served one after the other never share weights), the train task publishes a
version with its card, ``/info`` shows the served card, and an admin's rollback (HTTP or CLI) is
served at the next inference without a restart, which names the version in its result and in
the stored ``original`` label.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch

from lib.core.labelmap import load_labelmap
from lib.core.settings import load_segmentation_config
from lib.model.model_store import ModelStore
from lib.model.segmenter import build_network
from pants_tools.phantom import write_pants_tree
from server import REPO, Server

LM = load_labelmap()
SHAPE, SPACING = (24, 24, 16), (6.0, 6.0, 6.0)


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("versions")
    write_pants_tree(base / "A", 4, shape=SHAPE, spacing=SPACING, seed=21)
    write_pants_tree(base / "B", 3, shape=SHAPE, spacing=SPACING, seed=22)
    return base / "A", base / "B"


@pytest.fixture(scope="module")
def server_a(roots: tuple[Path, Path]) -> Iterator[Server]:
    """Dataset A served with no model_dir: its models live in A/.pants_label/models."""
    srv = Server(roots[0], roots[0].parent / "a.log", conf={"preset": "fast"})
    try:
        yield srv
    finally:
        srv.stop()


def _client(srv: Server):  # noqa: ANN202
    from monailabel.client import MONAILabelClient

    return MONAILabelClient(srv.url, tmpdir=str(Path(srv.log).parent))


def _train_and_wait(srv: Server, timeout: float = 300) -> dict:
    client = _client(srv)
    client.train_start("segmentation", {"max_epochs": 1, "iterations_per_epoch": 1, "batch_size": 1})
    deadline = time.time() + timeout
    while time.time() < deadline:
        stats = client.info()["train_stats"]["segmentation"]
        if stats.get("status") in ("DONE", "FAILED") and not client.train_status(check_if_running=True):
            return stats
        time.sleep(1)
    raise TimeoutError(srv.tail())


def test_the_train_task_publishes_v1_into_the_datasets_own_store_and_b_does_not_see_it(
        server_a: Server, roots: tuple[Path, Path]) -> None:
    a, b = roots
    assert _client(server_a).info()["model_card"]["trained"] is False
    stats = _train_and_wait(server_a)
    assert stats["status"] == "DONE" and stats["published"] is True and stats["version"] == "v1", stats
    card = _client(server_a).info()["model_card"]
    assert card["version"] == "v1" and card["trained"] is True
    assert Path(card["path"]).parent == (a / ".pants_label" / "models").resolve()
    assert card["dataset"] == str(a.resolve()) and "warning" not in card
    assert card["training_scans"]["label_tags"] == {"pants": stats["train_size"]}  # bootstrapped from the masks
    assert card["parent"] is None and card["preset"] == "fast" and card["network"]["name"] == "SegResNet"
    assert {"dsc", "nsd"} <= set(card["validation"]["per_class"]["liver"]) and card["device"] == "cpu"

    srv_b = Server(b, b.parent / "b.log", conf={"preset": "fast"})
    try:
        info = _client(srv_b).info()
        assert info["model_card"]["trained"] is False and info["model_card"]["version"] is None
        assert info["models"]["segmentation"]["trained"] is False
        _, params = _client(srv_b).infer("segmentation", "PanTS_00000001", {})
        assert params["trained"] is False and params["model_version"] is None
    finally:
        srv_b.stop()
    assert not (b / ".pants_label" / "models" / "segresnet_fast.pt").exists()


def _publish_v2(store_dir: Path) -> str:
    """A second version, as an offline scripts/train.py run would publish it."""
    cfg = load_segmentation_config()
    torch.manual_seed(5)
    meta = {"labels": LM.names, "preset": "fast", "preprocessing": cfg.preprocessing.input_map()}
    return ModelStore(store_dir, "fast").publish(build_network(cfg, LM.num_classes).state_dict(), meta,
                                                 {"summary": "second", "parent": "v1"})


def test_rollback_over_http_and_cli_is_served_without_restart(server_a: Server, roots: tuple[Path, Path]) -> None:
    a = roots[0]
    store_dir = a / ".pants_label" / "models"
    if not (store_dir / "versions" / "fast" / "v1").exists():
        pytest.skip("needs the v1 of the previous test")
    assert _publish_v2(store_dir) == "v2"
    client = _client(server_a)
    assert client.info()["model_card"]["version"] == "v2"
    listing = requests.get(f"{server_a.url}/model/segmentation/versions", timeout=30).json()
    assert listing["serving"] == "v2" and [v["version"] for v in listing["versions"]] == ["v1", "v2"]

    r = requests.post(f"{server_a.url}/model/segmentation/rollback", params={"version": "v1"}, timeout=30)
    assert r.status_code == 200 and r.json()["previous"] == "v2", r.text
    assert client.info()["model_card"]["version"] == "v1"
    label, params = client.infer("segmentation", "PanTS_00000002", {"save_label": True})
    assert params["model_version"] == "v1"
    info = requests.get(f"{server_a.url}/datastore/label/info", params={"label": "PanTS_00000002", "tag": "original"},
                        timeout=30).json()
    assert info["params"]["model_version"] == "v1"  # the stored prediction names its model
    assert info["provenance"]["source"] == "model" and info["provenance"]["model_version"] == "v1"

    digest = ModelStore(store_dir, "fast").serving_sha256()
    for query, status, words in [({"version": "v9"}, 404, ("v9", "v1, v2")), ({}, 400, ("version",)),
                                 ({"version": "../v1"}, 404, ("v1, v2",))]:
        r = requests.post(f"{server_a.url}/model/segmentation/rollback", params=query, timeout=30)
        assert r.status_code == status and all(w in r.json()["detail"] for w in words), r.text
    assert requests.post(f"{server_a.url}/model/nope/rollback", params={"version": "v1"}, timeout=30).status_code == 404
    assert ModelStore(store_dir, "fast").serving_sha256() == digest  # refusals changed nothing

    cli = subprocess.run([sys.executable, str(REPO / "scripts" / "model_versions.py"), "--studies", str(a),
                          "rollback", "v2"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert cli.returncode == 0 and "now serving v2 (was v1)" in cli.stdout, cli.stderr
    _, params = client.infer("segmentation", "PanTS_00000002", {})
    assert params["model_version"] == "v2" and client.info()["model_card"]["summary"] == "second"
    listed = subprocess.run([sys.executable, str(REPO / "scripts" / "model_versions.py"), "--studies", str(a), "list"],
                            capture_output=True, text=True, cwd=REPO, timeout=120).stdout
    assert "* v2" in listed and "  v1" in listed


def test_diverged_weights_are_refused_by_rollback_and_infer_says_why(server_a: Server, roots: tuple[Path, Path]) -> None:
    store_dir = roots[0] / ".pants_label" / "models"
    if not (store_dir / "versions" / "fast" / "v2").exists():
        pytest.skip("needs the versions of the previous tests")
    cfg = load_segmentation_config()
    torch.manual_seed(6)
    state = build_network(cfg, LM.num_classes).state_dict()
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first].view(-1)[0] = float("nan")
    meta = {"labels": LM.names, "preset": "fast", "preprocessing": cfg.preprocessing.input_map()}
    store = ModelStore(store_dir, "fast")
    bad = store.keep(state, meta, {"summary": "diverged"}, "training diverged")
    digest = store.serving_sha256()
    r = requests.post(f"{server_a.url}/model/segmentation/rollback", params={"version": bad}, timeout=30)
    assert r.status_code == 409 and "never served" in r.json()["detail"] and first in r.json()["detail"], r.text
    assert store.serving_sha256() == digest

    # copied over the served file by hand, past the store: infer answers 503 with the reason, not an empty mask
    good = store.serving_path.read_bytes()
    tmp = store.serving_path.with_suffix(".tmp")
    tmp.write_bytes((store.versions_dir / bad / "model.pt").read_bytes())
    tmp.replace(store.serving_path)
    r = requests.post(f"{server_a.url}/infer/segmentation", params={"image": "PanTS_00000002"}, timeout=120)
    assert r.status_code == 503 and "non-finite weights" in r.json()["detail"] and "rollback" in r.json()["detail"], \
        r.text
    tmp.write_bytes(good)
    tmp.replace(store.serving_path)
    _, params = _client(server_a).infer("segmentation", "PanTS_00000002", {})
    assert params["trained"] is True
