"""A review campaign on a labelled PanTS root, through the real server and ``MONAILabelClient``
(one client per reader and request, as 3D Slicer makes them), with the senior reviewer behind
the real nginx front (``scripts/make_proxy.py``).

One campaign, in order: the editor's starting label is the imported mask; the first reader's
save records provenance, QA and the review; the lesion scan goes to a second, independent
reading by another reader (never its first reader), who starts from the imported mask again;
their disagreement on the lesion flags the scan; only the reviewer role gets it through
``senior_review``, and the reviewer's label becomes the final.
"""

from __future__ import annotations

import csv
import getpass
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import urllib3
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from lib.core.labelmap import load_labelmap
from pants_tools.access import login_client
from pants_tools.phantom import write_pants_tree
from server import REPO, Server, free_port

pytestmark = pytest.mark.server
urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

LM = load_labelmap()
LESION = LM.name_to_id["pancreatic_lesion"]
N = 3  # PanTS_00000001 has a lesion (double reading); the others none (other_fraction 0)
LESION_SCAN = "PanTS_00000001"
REVIEWER, ANNOTATOR, ADMIN = ("carol", "rev-pw-3"), ("bob", "annot-pw-2"), ("alice", "admin-pw-1")
SECRET = "front-secret-for-the-review-test-0123456789"
REVIEW_YAML = """
double_reading: {tumour_positive: true, other_fraction: 0.0}
agreement: {flag_classes: [pancreatic_lesion], flag_below_dsc: 0.2}
qa:
  required: [liver, aorta]
"""


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    base = tmp_path_factory.mktemp("review")
    root = base / "PanTS"
    # adult size (370 x 370 x 400 mm) on a coarse grid
    write_pants_tree(root, N, shape=(40, 40, 32), spacing=(9.25, 9.25, 12.5), seed=3, lesions={0: True, 1: False, 2: False})
    (base / "review.yaml").write_text(REVIEW_YAML)
    (base / "front.secret").write_text(SECRET + "\n")
    conf = {"preset": "fast", "model_dir": str(base / "model"), "campaign": "review",
            "review_config": str(base / "review.yaml"), "front_secret_file": str(base / "front.secret"),
            "auto_train_after": "0"}
    server = Server(root, base / "server.log", conf=conf)
    try:
        yield server, base
    finally:
        server.stop()


@pytest.fixture(scope="module")
def front(campaign: tuple[Server, Path]) -> Iterator[str]:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.skip("nginx is not installed (Debian package 'nginx'); the senior-review test needs it")
    server, base = campaign
    out, port = base, free_port()
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_proxy.py"), "--out", str(out), "--upstream",
         f"127.0.0.1:{server.port}", "--listen", f"127.0.0.1:{port}", "--server-name", "127.0.0.1",
         "--admin", ":".join(ADMIN), "--annotator", ":".join(ANNOTATOR), "--reviewer", ":".join(REVIEWER),
         *(["--worker-user", getpass.getuser()] if os.geteuid() == 0 else [])],
        check=True, capture_output=True, text=True,
    )
    assert (out / "front.secret").read_text().strip() == SECRET  # kept: the running server trusts it
    proc = subprocess.Popen([nginx, "-p", str(out), "-c", str(out / "nginx.conf"), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                requests.get(url + "/auth/", verify=False, timeout=2)
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.time() < deadline, "nginx did not start"
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _client(server: Server, reader: str, tmp: Path) -> MONAILabelClient:
    return MONAILabelClient(server.url, tmpdir=str(tmp), client_id=reader)


def _load(path: str) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj, dtype=np.uint8)


def _save(client: MONAILabelClient, image_id: str, label: np.ndarray, tmp: Path, **params) -> dict:
    """Upload ``label`` as the reader's final, on the grid of the label they downloaded."""
    path = tmp / f"{image_id}-{time.time_ns()}.nii.gz"
    nib.save(nib.Nifti1Image(label, _AFFINES[image_id]), path)
    return client.save_label(image_id, str(path), tag="final", params=params)


_AFFINES: dict[str, np.ndarray] = {}


def _original(client: MONAILabelClient, image_id: str) -> np.ndarray:
    """What 3D Slicer's module loads into the editor: the listing's ``original``, if any."""
    listing = client.datastore()
    assert "original" in listing["objects"][image_id]["labels"], listing["objects"][image_id]["labels"]
    path = client.download_label(image_id, "original")
    _AFFINES[image_id] = nib.load(path).affine
    return _load(path)


def _info(server: Server, image_id: str) -> dict:
    return requests.get(f"{server.url}/datastore/image/info", params={"image": image_id}, timeout=30).json()


def _review_pass(server: Server, tmp: Path, reader: str) -> list[str]:
    """``reader`` reviews every scan ``review`` serves them, saving the starting label unchanged."""
    seen = []
    for _ in range(N + 1):
        pick = _client(server, reader, tmp).next_sample("review", {})
        if not pick:
            break
        image_id = pick["id"]
        assert image_id not in seen, f"{reader} got {image_id} twice"
        seen.append(image_id)
        _save(_client(server, reader, tmp), image_id, _original(_client(server, reader, tmp), image_id), tmp,
              time_spent_s=30 + len(seen))
    return seen


def test_review_campaign_double_reading_and_senior_review(campaign, front: str, tmp_path: Path) -> None:
    server, _ = campaign
    info = _client(server, "reader-a", tmp_path).info()
    assert list(info["strategies"])[:2] == ["review", "senior_review"]  # review is the clients' default
    assert info["campaign"] == "review"

    # -- every scan is labelled (imported masks): the editor starts from them
    listing = _client(server, "reader-a", tmp_path).datastore()
    for image_id, obj in listing["objects"].items():
        original = obj["labels"]["original"]["info"]
        assert original["served_from"] == "pants"
    served = requests.get(f"{server.url}/datastore/label/info", params={"label": LESION_SCAN, "tag": "original"},
                          timeout=30).json()
    assert served["served_from"] == "pants" and served["provenance"] == {"source": "imported", "reader_from": "none"}
    pants = _load(_client(server, "reader-a", tmp_path).download_label(LESION_SCAN, "pants"))
    assert np.array_equal(_original(_client(server, "reader-a", tmp_path), LESION_SCAN), pants)
    assert (pants == LESION).any()
    deadline = time.time() + 60  # QA of the imported masks runs in the background at start
    while not all("qa" in _info(server, i) for i in listing["objects"]):
        assert time.time() < deadline, "QA of the imported masks did not finish"
        time.sleep(0.5)
    assert _info(server, LESION_SCAN)["qa"]["label"] == "pants"

    # -- reader A reviews all three; the lesion scan waits for a second reading
    seen_a = _review_pass(server, tmp_path, "reader-a")
    assert sorted(seen_a) == sorted(listing["objects"])
    final_info = requests.get(f"{server.url}/datastore/label/info", params={"label": LESION_SCAN, "tag": "final"},
                              timeout=30).json()
    assert final_info["provenance"] == {"source": "reader", "reader": "reader-a", "reader_from": "client_id",
                                        "seconds": 31.0 + seen_a.index(LESION_SCAN)}
    review = _info(server, LESION_SCAN)["review"]
    assert review == {"phase": "second", "double_read": True, "first_reader": "reader-a"}
    for other in set(seen_a) - {LESION_SCAN}:
        assert _info(server, other)["review"]["phase"] == "done"
        assert _info(server, other)["qa"]["label"].startswith("final v")
    assert _client(server, "reader-a", tmp_path).next_sample("review", {}) == {}  # never their own second reading

    # -- reader B: the second reading starts from the imported mask, not from reader A's label
    pick = _client(server, "reader-b", tmp_path).next_sample("review", {})
    assert pick["id"] == LESION_SCAN and pick["selected_by"].startswith("second reading")
    start = _original(_client(server, "reader-b", tmp_path), LESION_SCAN)
    assert np.array_equal(start, pants)
    assert _client(server, "reader-b", tmp_path).datastore()["objects"][LESION_SCAN]["labels"]["original"]["info"][
        "served_from"] == "pants"
    b_label = start.copy()
    b_label[b_label == LESION] = LM.name_to_id["pancreas_head"]  # B sees no lesion: agreement 0 on it
    _save(_client(server, "reader-b", tmp_path), LESION_SCAN, b_label, tmp_path)
    review = _info(server, LESION_SCAN)["review"]
    assert review["phase"] == "flagged" and review["second_reader"] == "reader-b"
    assert review["agreement"]["pancreatic_lesion"] == 0.0 and review["agreement"]["liver"] == 1.0
    assert _client(server, "reader-c", tmp_path).next_sample("review", {}) == {}

    # -- the flagged scan is for reviewers only
    with pytest.raises(MONAILabelClientException) as err:  # no front: no role
        _client(server, "reader-c", tmp_path).next_sample("senior_review", {})
    assert "403" in err.value.msg and "reviewer role" in err.value.msg
    spoof = {"X-Remote-User": "carol", "X-Remote-Role": "reviewer", "X-PanTS-Front": "guessed-secret-0000000000"}
    r = requests.post(f"{server.url}/activelearning/senior_review", json={}, headers=spoof, timeout=30)
    assert r.status_code == 403  # the front's headers count only with its secret
    with pytest.raises(MONAILabelClientException) as err:  # an annotator saving its final
        _save(_client(server, "reader-c", tmp_path), LESION_SCAN, pants, tmp_path)
    assert "403" in err.value.msg and "flagged for senior review" in err.value.msg

    def via_front(account: tuple[str, str]) -> MONAILabelClient:
        return login_client(front, *account, tmpdir=str(tmp_path))

    with pytest.raises(MONAILabelClientException) as err:
        via_front(ANNOTATOR).next_sample("senior_review", {})
    assert "401" in err.value.msg  # nginx: senior_review needs reviewers.htpasswd
    with pytest.raises(MONAILabelClientException) as err:
        _save(via_front(ANNOTATOR), LESION_SCAN, pants, tmp_path)
    assert "403" in err.value.msg  # the app: an annotator's final on a flagged scan

    pick = via_front(REVIEWER).next_sample("senior_review", {})
    assert pick["id"] == LESION_SCAN
    senior_start = _original(via_front(REVIEWER), LESION_SCAN)
    assert np.array_equal(senior_start, b_label)  # the latest reading
    _save(via_front(REVIEWER), LESION_SCAN, pants, tmp_path, time_spent_s=120)
    review = _info(server, LESION_SCAN)["review"]
    assert review["phase"] == "resolved" and review["senior_reader"] == "carol"
    final_info = requests.get(f"{server.url}/datastore/label/info", params={"label": LESION_SCAN, "tag": "final"},
                              timeout=30).json()
    assert final_info["provenance"] == {"source": "reader", "reader": "carol", "reader_from": "front",
                                        "role": "reviewer", "seconds": 120.0}
    assert np.array_equal(_load(via_front(REVIEWER).download_label(LESION_SCAN, "final")), pants)
    assert via_front(REVIEWER).next_sample("senior_review", {}) == {}


def test_bad_time_spent_is_refused_and_nothing_is_stored(campaign, tmp_path: Path) -> None:
    server, _ = campaign
    image_id = "PanTS_00000002"
    before = requests.get(f"{server.url}/datastore/label/info", params={"label": image_id, "tag": "final"},
                          timeout=30).json()
    label = _original(_client(server, "reader-a", tmp_path), image_id)
    for bad in (-1, "soon", 1e9):
        with pytest.raises(MONAILabelClientException) as err:
            _save(_client(server, "reader-a", tmp_path), image_id, label, tmp_path, time_spent_s=bad)
        assert "400" in err.value.msg and "time_spent_s" in err.value.msg
    after = requests.get(f"{server.url}/datastore/label/info", params={"label": image_id, "tag": "final"},
                         timeout=30).json()
    assert after.get("version") == before.get("version")


def test_campaign_report_endpoint_and_script(campaign, tmp_path: Path) -> None:
    """After the campaign above: the JSON endpoint and the script's CSV and PNG agree with it."""
    server, _ = campaign
    report = requests.get(f"{server.url}/review/report", timeout=60).json()
    assert report["campaign"] == "review"
    totals = {k: sum(r[k] for r in report["progress"]) for k in
              ("scans", "labelled", "reviewed", "double_read", "flagged", "resolved")}
    assert totals == {"scans": N, "labelled": N, "reviewed": N, "double_read": 1, "flagged": 1, "resolved": 1}
    agreement = {r["class"]: r for r in report["agreement"]}
    assert agreement["pancreatic_lesion"]["median_dsc"] == 0.0 and agreement["liver"]["median_dsc"] == 1.0
    readers = {r["reader"]: r for r in report["throughput"]}
    assert readers["reader-a"]["labels"] == N and readers["reader-a"]["seconds_total"] == 31 + 32 + 33
    assert readers["reader-b"]["labels"] == 1 and readers["reader-b"]["seconds_total"] is None
    assert readers["carol"]["labels"] == 1 and readers["carol"]["seconds_median"] == 120.0
    assert all(set(r) == {"check", "severity", "scans"} for r in report["qa"])

    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "campaign_report.py"), "--url", server.url,
                           "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "reviewed 3" in proc.stdout and "resolved 1" in proc.stdout
    rows = list(csv.DictReader(open(out / "agreement.csv")))
    assert {r["class"] for r in rows} == set(agreement)
    assert (out / "campaign.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "report.json").read_text())["progress"] == report["progress"]
