"""What the active-learning server tests share: a scoring config fast enough for tiny phantoms,
and seeded random weights published as a model (a new model version triggers re-scoring)."""

from __future__ import annotations

from pathlib import Path

import torch

from lib.core.labelmap import load_labelmap
from lib.core.settings import load_segmentation_config
from lib.model.model_store import publish
from lib.model.segmenter import build_network
from lib.model.model_store import model_path
from pants_tools.phantom import write_pants_tree

#: active_learning.yaml for the tests: no localize pass (the phantoms are tiny), 2 MC passes,
#: a 1 s model watcher, 30-minute leases
AL_YAML = """
scoring:
  localize_spacing_mm: null
  mc_samples: 2
  watch_interval_s: 1.0
strategies:
  lease_minutes: 30
"""


def publish_random_model(path: Path, seed: int) -> None:
    """Publish seeded random ``fast`` weights at ``path`` (different seeds, different scores)."""
    cfg, lm = load_segmentation_config(), load_labelmap()
    torch.manual_seed(seed)
    publish(build_network(cfg, lm.num_classes).state_dict(), {"labels": lm.names}, path)


def concurrent_next_samples(url: str, strategies: tuple[str, ...], per_strategy: int = 2) -> dict[str, list[dict]]:
    """``per_strategy`` annotators per strategy ask for a next sample at once, each with its own
    ``client_id`` (as 3D Slicer sends it); their answers by strategy. Raises what any of them raised."""
    import threading

    from monailabel.client import MONAILabelClient

    got: dict[str, list[dict]] = {s: [] for s in strategies}
    errors: list[BaseException] = []

    def annotator(strategy: str, k: int) -> None:
        try:
            got[strategy].append(MONAILabelClient(url, client_id=f"{strategy}-{k}").next_sample(strategy, {}))
        except BaseException as err:  # noqa: BLE001 - raised below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=annotator, args=(s, k)) for s in strategies for k in range(per_strategy)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return got


def server_info(server) -> dict:
    """``GET /info/`` of a test server (a ``server.Server``)."""
    import json
    import urllib.request

    return json.loads(urllib.request.urlopen(f"{server.url}/info/", timeout=30).read())


def wait_scored(server, version: str | None, timeout: float = 420) -> dict:
    """Wait until background scoring is done with model ``version``; ``/info``'s active_learning."""
    import time

    deadline, al = time.time() + timeout, {}
    while time.time() < deadline:
        al = server_info(server)["active_learning"]
        st = al.get("scoring", {})
        if st.get("state") == "done" and st.get("model_version") == version:
            return al
        time.sleep(1)
    raise AssertionError(f"scoring did not finish with model {version}: {al}\n{server.tail()}")


def start_al_server(base: Path, n: int, seed: int, al_yaml: str):
    """A server on ``n`` small phantoms with their masks hidden, random published weights and the
    given active-learning settings. Returns (server, PanTS root, model folder); stop the server."""
    from server import Server

    root = base / "PanTS"
    write_pants_tree(root, n, shape=(24, 24, 16), spacing=(4.0, 4.0, 4.0), seed=seed)
    model_dir = base / "model"
    publish_random_model(model_path(model_dir, "fast"), 0)
    (base / "al.yaml").write_text(al_yaml)
    conf = {"model_dir": str(model_dir), "preset": "fast", "hide_imported_labels": "true",
            "al_config": str(base / "al.yaml")}
    return Server(root, base / "server.log", conf=conf), root, model_dir
