"""The clasp strategy behind the real server: per-class scores from background scoring, concurrent annotators."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from lib.activelearning.scoring import INFO_KEY, model_version
from lib.model.model_store import model_path
from al_fixtures import AL_YAML as BASE_AL_YAML, server_info, start_al_server, wait_scored
from server import Server

pytestmark = pytest.mark.server

N = 6
CLIENTS = 4
AL_YAML = BASE_AL_YAML + "  clasp_noise: 1.0\n"


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    server, _, model_dir = start_al_server(tmp_path_factory.mktemp("clasp_app"), N, 9, AL_YAML)
    try:
        yield server, model_dir
    finally:
        server.stop()


def test_concurrent_annotators_get_distinct_scans_from_clasp(app) -> None:
    from monailabel.client import MONAILabelClient

    server, model_dir = app
    assert "clasp" in server_info(server)["strategies"]
    wait_scored(server, model_version(model_path(model_dir, "fast")))
    got: list[dict] = []
    errors: list[BaseException] = []

    def annotator(k: int) -> None:
        try:
            got.append(MONAILabelClient(server.url, client_id=f"clasp-{k}").next_sample("clasp", {}))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=annotator, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    served = [a["id"] for a in got]
    assert len(served) == CLIENTS == len(set(served)), got  # 4 requests at once, 4 different scans
    # the stored per-class scores steered it: class turns and overall turns, none a fallback
    assert all(a["selected_by"].startswith("clasp:") for a in got), got
    assert any(a["selected_by"] != "clasp:overall" for a in got), got
    assert all(0 <= a["noise"] <= 1 for a in got)
    assert server_info(server)["active_learning"]["leases"] == CLIENTS
    info = MONAILabelClient(server.url).datastore()["objects"][served[0]]["image"]["info"][INFO_KEY]
    assert info["model_version"] == model_version(model_path(model_dir, "fast"))
