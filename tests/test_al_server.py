"""Active learning behind the real server: background scoring, concurrent annotators, leases, new models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lib.model.model_store import model_path
from lib.activelearning.scoring import INFO_KEY, model_version
from al_fixtures import AL_YAML, concurrent_next_samples, publish_random_model, server_info, start_al_server, wait_scored
from server import Server

pytestmark = pytest.mark.server

N = 8
STRATEGIES = ("hybrid", "random", "random_fg", "uncertainty")


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path, Path]]:
    server, root, model_dir = start_al_server(tmp_path_factory.mktemp("al_app"), N, 4, AL_YAML)
    try:
        yield server, root, model_dir
    finally:
        server.stop()




def test_info_lists_strategies_and_scoring(app) -> None:
    info = server_info(app[0])
    assert set(STRATEGIES) <= set(info["strategies"])
    assert list(info["strategies"])[0] == "clasp"  # the default (strategies.default) comes first
    assert "pants_uncertainty" in info["scoring"]
    assert "lease_minutes" in info["active_learning"]


def test_background_scoring_at_start_puts_scores_in_imageserver_info(app) -> None:
    from monailabel.client import MONAILabelClient

    server, root, model_dir = app
    v1 = model_version(model_path(model_dir, "fast"))
    al = wait_scored(server, v1)
    assert al["scored"] == N
    listing = MONAILabelClient(server.url).datastore()
    scores = listing["objects"]["PanTS_00000003"]["image"]["info"][INFO_KEY]
    assert scores["model_version"] == v1 and 0 <= scores["uncertainty"] <= 1


def test_concurrent_annotators_get_different_scans_from_every_strategy(app) -> None:
    from monailabel.client import MONAILabelClient

    server = app[0]
    v1 = model_version(model_path(app[2], "fast"))
    wait_scored(server, v1)
    answers = concurrent_next_samples(server.url, STRATEGIES)
    got = {s: [a["id"] for a in ans] for s, ans in answers.items()}
    served = [i for ids in got.values() for i in ids]
    assert all(len(ids) == 2 for ids in got.values()), got
    assert len(set(served)) == N == len(served)  # 8 requests at once, 8 different scans
    # every scan is leased now: the next annotator gets an empty answer, not a duplicate
    assert MONAILabelClient(server.url, client_id="late").next_sample("hybrid", {}) == {}
    assert server_info(server)["active_learning"]["leases"] == N


def test_final_label_ends_lease_and_new_model_rescores(app, tmp_path: Path) -> None:
    import nibabel as nib
    import numpy as np
    from monailabel.client import MONAILabelClient

    server, root, model_dir = app
    client = MONAILabelClient(server.url, client_id="saver")
    leases_before = server_info(server)["active_learning"]["leases"]
    img = nib.load(root / "ImageTr" / "PanTS_00000001" / "ct.nii.gz")
    label = np.zeros(img.shape, np.uint8)
    label[8:14, 8:14, 5:9] = 14
    f = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(label, img.affine), f)
    client.save_label("PanTS_00000001", str(f), tag="final")
    assert server_info(server)["active_learning"]["leases"] == max(leases_before - 1, 0)

    # A newly published model is noticed and only the unlabelled scans are rescored with it.
    mp = model_path(model_dir, "fast")
    publish_random_model(mp, 1)
    v2 = model_version(mp)
    wait_scored(server, v2)
    objects = client.datastore()["objects"]
    versions = {i: o["image"]["info"][INFO_KEY]["model_version"] for i, o in objects.items()}
    assert versions["PanTS_00000001"] != v2  # labelled: not rescored
    assert all(v == v2 for i, v in versions.items() if i != "PanTS_00000001")
