"""The model store on real files: immutable versions with hash and card, adoption of weights placed
by hand, atomic rollback that a loaded Segmenter picks up, refusals that leave everything as it was."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from lib.core.errors import ClientError
from lib.core.labelmap import load_labelmap
from lib.core.settings import NetworkConfig, load_segmentation_config
from lib.model.model_store import ModelStore, model_path, publish, sha256_file
from lib.model.segmenter import Segmenter, build_network
from lib.model.store_location import dataset_identity, model_dir_for

LM = load_labelmap()
CFG = load_segmentation_config().model_copy(update={"network": NetworkConfig(init_filters=8)})


def _weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_network(CFG, LM.num_classes).state_dict()


def _meta() -> dict:
    return {"labels": LM.names, "preset": "fast", "preprocessing": CFG.preprocessing.input_map()}


def test_versions_are_numbered_hashed_immutable_and_served(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, "fast", "/data/A")
    assert store.serving()["trained"] is False and store.serving_version() is None
    v1 = store.publish(_weights(1), _meta(), {"summary": "first"})
    v2 = store.publish(_weights(2), _meta(), {"summary": "second", "parent": v1})
    assert (v1, v2) == ("v1", "v2")
    cards = store.versions()
    assert [c["version"] for c in cards] == ["v1", "v2"]
    for c in cards:  # the card's hash is the stored file's, and the served file is a byte copy of v2
        assert c["sha256"] == sha256_file(tmp_path / "versions" / "fast" / c["version"] / "model.pt")
        assert c["dataset"] == "/data/A" and c["preset"] == "fast" and c["created_ts"] > 0
    assert sha256_file(store.serving_path) == cards[1]["sha256"]
    served = store.serving()
    assert served["version"] == "v2" and served["summary"] == "second" and served["parent"] == "v1"
    assert "warning" not in served
    assert torch.load(store.serving_path, weights_only=True)["meta"]["version"] == "v2"
    assert [h["event"] for h in store.history()] == ["publish", "publish"]


def test_a_refused_run_is_kept_as_a_version_that_is_not_served(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, "fast")
    v1 = store.publish(_weights(1), _meta(), {"summary": "first"})
    served = store.serving_path.read_bytes()
    v2 = store.keep(_weights(2), _meta(), {"summary": "refused: worse"}, "val 0.40 < served 0.50")
    assert v2 == "v2" and store.serving_version() == v1 and store.serving_path.read_bytes() == served
    cards = {c["version"]: c for c in store.versions()}
    assert cards[v1]["published"] is True and "refused" not in cards[v1]
    assert cards[v2]["published"] is False and cards[v2]["refused"] == "val 0.40 < served 0.50"
    assert cards[v2]["sha256"] == sha256_file(tmp_path / "versions" / "fast" / v2 / "model.pt")
    assert [(h["event"], h["version"]) for h in store.history()] == [("publish", v1), ("refused", v2)]
    store.rollback(v2, by="admin")  # an admin may still serve it
    assert store.serving_version() == v2


def test_rollback_is_atomic_and_a_loaded_segmenter_serves_it_without_restart(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, "fast")
    store.publish(_weights(1), _meta(), {})
    store.publish(_weights(2), _meta(), {})
    seg = Segmenter(CFG, LM, "fast", store.serving_path)
    assert seg.network() is not None and seg.info.meta["version"] == "v2"
    before = {p.name for p in tmp_path.iterdir()}
    out = store.rollback("v1", by="alice")
    assert out["version"] == "v1" and out["previous"] == "v2"
    seg.network()
    assert seg.info.meta["version"] == "v1" and store.serving_version() == "v1"
    assert {p.name for p in tmp_path.iterdir()} == before  # no temporary file left beside it
    assert store.history()[-1] == {**store.history()[-1], "event": "rollback", "version": "v1", "by": "alice",
                                   "previous": "v2"}
    # stored versions never change
    assert [c["sha256"] for c in store.versions()] == [sha256_file(tmp_path / "versions" / "fast" / v / "model.pt")
                                                       for v in ("v1", "v2")]


def test_unknown_version_is_refused_naming_the_known_ones(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, "fast")
    with pytest.raises(ClientError) as err:
        store.rollback("v1")
    assert err.value.status_code == 404 and "no version is stored yet" in err.value.detail
    store.publish(_weights(1), _meta(), {})
    digest = sha256_file(store.serving_path)
    for bad in ("v7", "../v1", "latest"):
        with pytest.raises(ClientError) as err:
            store.rollback(bad)
        assert err.value.status_code == 404 and "v1" in err.value.detail, err.value.detail
    assert sha256_file(store.serving_path) == digest and len(store.history()) == 1


def test_weights_placed_by_hand_are_recorded_once_as_a_version(tmp_path: Path) -> None:
    publish(_weights(3), {**_meta(), "summary": "placed"}, model_path(tmp_path, "fast"))
    digest = sha256_file(model_path(tmp_path, "fast"))
    store = ModelStore(tmp_path, "fast", "/data/A")
    served = store.serving()
    assert served["version"] is None and "unrecorded" in served["source"]
    assert store.adopt_serving() == "v1"
    assert store.adopt_serving() is None  # already recorded
    assert sha256_file(model_path(tmp_path, "fast")) == digest  # the served file is not rewritten
    card = store.serving()
    assert card["version"] == "v1" and card["summary"] == "placed" and card["source"].startswith("weights placed")
    assert store.publish(_weights(4), _meta(), {}) == "v2"
    store.rollback("v1")
    assert store.serving_version() == "v1"


def test_a_card_from_another_dataset_or_preset_is_flagged(tmp_path: Path) -> None:
    ModelStore(tmp_path, "fast", "/data/demo").publish(_weights(1), _meta(), {})
    other = ModelStore(tmp_path, "fast", "/data/PanTS").serving()
    assert other["version"] == "v1" and "/data/demo" in other["warning"] and "/data/PanTS" in other["warning"]
    assert "preset 'full'" in (ModelStore(tmp_path, "fast").mismatch({"preset": "full"}) or "")


def test_concurrent_publishers_never_share_a_version_number(tmp_path: Path) -> None:
    weights = _weights(1)
    got: list[str] = []

    def one() -> None:
        got.append(ModelStore(tmp_path, "fast").publish(weights, _meta(), {}))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == ["v1", "v2", "v3", "v4"]
    assert not [p for p in (tmp_path / "versions" / "fast").iterdir() if p.name.startswith(".tmp-")]


def test_each_dataset_gets_its_own_store_unless_model_dir_is_given(tmp_path: Path) -> None:
    class Store:  # what the app reads from a datastore: its state folder and root
        def __init__(self, root: Path) -> None:
            self.root, self.state_dir = root, root / ".pants_label"

    a, b = Store(tmp_path / "A"), Store(tmp_path / "B")
    assert model_dir_for(None, a) == (tmp_path / "A" / ".pants_label" / "models").resolve()
    assert model_dir_for(None, a) != model_dir_for(None, b)
    assert model_dir_for(str(tmp_path / "shared"), a) == model_dir_for(str(tmp_path / "shared"), b)
    assert dataset_identity(a) == str(tmp_path / "A")
    json.dumps(ModelStore(model_dir_for(None, a), "fast").serving())  # /info can send it as it is


def _diverged(seed: int) -> tuple[dict[str, torch.Tensor], str]:
    """Weights with one NaN, as a diverged run leaves them, and the name of the tensor holding it."""
    state = _weights(seed)
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first].view(-1)[0] = float("nan")
    return state, first


def test_diverged_weights_are_never_published_nor_served_by_rollback(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, "fast")
    v1 = store.publish(_weights(1), _meta(), {"summary": "first"})
    digest = sha256_file(store.serving_path)
    bad, first = _diverged(2)
    with pytest.raises(ValueError, match=f"non-finite weights in 1 tensors \\(first: {first}\\)"):
        store.publish(bad, _meta(), {"summary": "diverged"})
    assert [c["version"] for c in store.versions()] == [v1]  # nothing stored
    kept = store.keep(bad, _meta(), {"summary": "refused"}, "training diverged")
    with pytest.raises(ClientError) as err:
        store.rollback(kept, by="admin")
    assert err.value.status_code == 409 and kept in err.value.detail and first in err.value.detail, err.value.detail
    assert sha256_file(store.serving_path) == digest and store.serving_version() == v1
    assert [h["event"] for h in store.history()] == ["publish", "refused"]


def test_a_segmenter_refuses_diverged_served_weights_until_good_ones_are_served(tmp_path: Path) -> None:
    bad, first = _diverged(3)
    path = publish(bad, _meta(), model_path(tmp_path, "fast"))  # copied in by hand, past the store
    seg = Segmenter(CFG, LM, "fast", path)
    for _ in range(2):  # every call says so, not only the first
        with pytest.raises(ClientError) as err:
            seg.network()
        assert err.value.status_code == 503, err.value
        assert str(path) in err.value.detail and first in err.value.detail and "rollback" in err.value.detail
    publish(_weights(3), _meta(), path)
    assert seg.network() is not None and seg.info.trained


def test_only_the_newest_refused_versions_are_kept(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, "fast")
    v1 = store.publish(_weights(1), _meta(), {})
    refused = [store.keep(_weights(10 + i), _meta(), {}, "worse") for i in range(3)]  # v2, v3, v4
    store.rollback(refused[0], by="admin")  # an admin served v2 once: it stays
    store.rollback(v1, by="admin")
    more = [store.keep(_weights(20 + i), _meta(), {}, "worse") for i in range(3)]  # v5, v6, v7
    assert store.prune_refused(keep=2) == [refused[1], refused[2], more[0]]
    assert [c["version"] for c in store.versions()] == [v1, refused[0], more[1], more[2]]
    assert not [p for p in (tmp_path / "versions" / "fast").iterdir() if p.name.startswith(".tmp")]
    assert [h["version"] for h in store.history() if h["event"] == "pruned"] == [refused[1], refused[2], more[0]]
    assert store.prune_refused(keep=2) == [] and store.serving_version() == v1
    assert store.keep(_weights(30), _meta(), {}, "worse") == "v8"  # numbers are never reused
    with pytest.raises(ValueError, match="keep 0"):
        store.prune_refused(keep=0)
