"""Active learning over DICOMweb against a real Orthanc: background scoring of PACS series with
metadata from their DICOM attributes, every strategy leasing distinct series to concurrent
annotators (answers carry StudyInstanceUID, as OHIF needs), a restart that keeps scores and
leases, a final label that ends a lease, and a new model that rescores."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lib.activelearning.scoring import INFO_KEY, model_version
from lib.imaging.dicom_series import stable_uid
from lib.imaging.metadata import read_metadata
from lib.model.model_store import model_path
from orthanc import Orthanc, require_orthanc
from pants_tools.phantom import write_pants_tree
from al_fixtures import AL_YAML, concurrent_next_samples, publish_random_model, server_info, wait_scored
from server import REPO, Server

pytestmark = pytest.mark.server

N = 10  # unlabelled series (two per strategy); one more carries PanTS masks
LABELED = "PanTS_00000009"
STRATEGIES = ("hybrid", "random", "random_fg", "uncertainty", "clasp")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    require_orthanc()
    base = tmp_path_factory.mktemp("pacs_al")
    root = base / "PanTS"
    ids = write_pants_tree(root, N + 1, shape=(24, 24, 16), spacing=(4.0, 4.0, 4.0), seed=11)
    orthanc = Orthanc(base / "orthanc", base / "orthanc.log")
    try:
        script = [sys.executable, str(REPO / "scripts" / "load_pacs.py"), "--url", orthanc.dicomweb, "--root", str(root)]
        for extra in (["--cases", LABELED], ["--cases", *[i for i in ids if i != LABELED], "--no-labels"]):
            proc = subprocess.run(script + extra, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr
        model_dir = base / "model"
        publish_random_model(model_path(model_dir, "fast"), 0)
        (base / "al.yaml").write_text(AL_YAML)
        conf = {"model_dir": str(model_dir), "preset": "fast", "datastore_dir": str(base / "state"),
                "al_config": str(base / "al.yaml")}
        state = {"root": root, "ids": ids, "orthanc": orthanc, "conf": conf, "base": base, "model_dir": model_dir}
        state["server"] = Server(orthanc.dicomweb, base / "server.log", conf=conf)
        yield state
        state["server"].stop()
    finally:
        orthanc.stop()




def test_series_are_scored_in_the_background_with_metadata_from_dicom(pacs: dict) -> None:
    from monailabel.client import MONAILabelClient

    server = pacs["server"]
    v1 = model_version(model_path(pacs["model_dir"], "fast"))
    al = wait_scored(server, v1)
    assert al["scored"] == N  # the series with PanTS masks is labelled: not scored
    meta = read_metadata(next(pacs["root"].glob("metadata.*")))
    objects = MONAILabelClient(server.url).datastore()["objects"]
    for case in pacs["ids"]:
        info = objects[stable_uid(case, "ct")]["image"]["info"]
        assert info["StudyInstanceUID"] == stable_uid(case, "study")
        # center and phase read back from InstitutionName / SeriesDescription, as balance needs
        assert info["center"] == meta[case].center
        assert info["contrast_phase"] == meta[case].contrast_phase
        if case != LABELED:  # scored, so downloaded: age and sex come from the series' headers
            assert info[INFO_KEY]["model_version"] == v1
            assert info["sex"] == meta[case].sex and info["age"] == pytest.approx(meta[case].age, abs=1)
    assert LABELED not in {k for k, v in objects.items() if INFO_KEY in v["image"]["info"]}


def test_every_strategy_leases_distinct_series_to_concurrent_annotators(pacs: dict) -> None:
    from monailabel.client import MONAILabelClient

    server = pacs["server"]
    wait_scored(server, model_version(model_path(pacs["model_dir"], "fast")))
    got = concurrent_next_samples(server.url, STRATEGIES)
    answers = [a for ans in got.values() for a in ans]
    assert all(len(a) == 2 for a in got.values()), got
    served = [a["id"] for a in answers]
    assert len(set(served)) == N == len(served), served  # 10 requests at once, 10 different series
    assert stable_uid(LABELED, "ct") not in served
    for a in answers:  # what OHIF's Next Sample opens
        assert a["StudyInstanceUID"] and a["SeriesInstanceUID"] == a["id"] and a["lease_expires"] > time.time()
    assert {a["selected_by"] for a in got["uncertainty"]} == {"uncertainty"}  # scores steered it
    assert all(a["selected_by"].startswith("clasp:") for a in got["clasp"]), got["clasp"]
    assert MONAILabelClient(server.url, client_id="late").next_sample("hybrid", {}) == {}
    assert server_info(server)["active_learning"]["leases"] == N


def test_restart_keeps_scores_and_leases(pacs: dict) -> None:
    from monailabel.client import MONAILabelClient

    before = server_info(pacs["server"])["active_learning"]
    pacs["server"].stop()
    pacs["server"] = server = Server(pacs["orthanc"].dicomweb, pacs["base"] / "server2.log", conf=pacs["conf"])
    after = server_info(server)["active_learning"]
    assert after["leases"] == before["leases"] == N
    assert after["scored"] == before["scored"] == N
    assert MONAILabelClient(server.url, client_id="after-restart").next_sample("random", {}) == {}


def test_final_label_ends_lease_and_new_model_rescores(pacs: dict, tmp_path: Path) -> None:
    from monailabel.client import MONAILabelClient

    server = pacs["server"]
    client = MONAILabelClient(server.url, client_id="saver", tmpdir=str(tmp_path))
    case = pacs["ids"][0]
    sid = stable_uid(case, "ct")
    img = nib.load(pacs["root"] / "ImageTr" / case / "ct.nii.gz")
    label = np.zeros(img.shape, np.uint8)
    label[8:14, 8:14, 5:9] = 14
    f = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(label, img.affine), f)
    client.save_label(sid, str(f), tag="final")
    assert server_info(server)["active_learning"]["leases"] == N - 1
    # the annotation standard's checks ran on the save, as on a PanTS folder: one cube is no abdomen
    qa = client.datastore()["objects"][sid]["image"]["info"]["qa"]
    assert qa["label"] == "final v1" and qa["errors"] > 0 and "required" in " ".join(qa["failed"])

    mp = model_path(pacs["model_dir"], "fast")
    publish_random_model(mp, 1)
    v2 = model_version(mp)
    wait_scored(server, v2)
    objects = client.datastore()["objects"]
    versions = {i: o["image"]["info"].get(INFO_KEY, {}).get("model_version") for i, o in objects.items()}
    assert versions[sid] != v2  # labelled now: not rescored
    assert sum(v == v2 for v in versions.values()) == N - 1
