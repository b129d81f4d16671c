"""The app over DICOMweb against a real Orthanc: PACS loading, next sample, infer, DICOM SEG
round trip through 3D Slicer's client (``MONAILabelClient``), restart, refusals, no downloads.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient
from nibabel import orientations as nio
from pydicom.dataset import Dataset

from lib.imaging.dicom_seg import dicom_lab_to_rgb, load_seg_coding, seg_to_label
from lib.imaging.dicom_series import read_volume, series_geometry, stable_uid
from lib.datastore.dicomweb import make_client
from lib.core.labelmap import load_labelmap
from lib.imaging.metadata import read_metadata
from pants_tools.phantom import write_pants_tree
from orthanc import Orthanc, require_orthanc
from server import REPO, Server

pytestmark = pytest.mark.server

LM = load_labelmap()
SHAPE, SPACING = (40, 40, 32), (2.5, 2.5, 3.0)
LABELED, UNLABELED = "PanTS_00000001", ("PanTS_00000002", "PanTS_00000003")


class ProxyTrap:
    """A loopback socket set as HTTP(S) proxy of the server: any outbound download lands here."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    self.requests.append(conn.recv(200).decode(errors="replace").splitlines()[0])
                except (OSError, IndexError):
                    self.requests.append("<connection>")

    def env(self) -> dict[str, str]:
        return {"HTTP_PROXY": self.url, "HTTPS_PROXY": self.url, "http_proxy": self.url, "https_proxy": self.url,
                "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def _qido(orthanc: Orthanc, modality: str) -> list[Dataset]:
    client = make_client(orthanc.dicomweb)
    fields = ["InstitutionName", "SeriesDescription", "PatientAge", "PatientSex", "ContentLabel"]
    return [Dataset.from_json(d) for d in client.search_for_series(search_filters={"Modality": modality}, fields=fields)]


def _canonical(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tr = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(("R", "A", "S")))
    return nio.apply_orientation(arr, tr), affine @ nio.inv_ornt_aff(tr, arr.shape)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    require_orthanc()
    base = tmp_path_factory.mktemp("pacs")
    root = base / "PanTS"
    write_pants_tree(root, 3, shape=SHAPE, spacing=SPACING, seed=5)
    orthanc = Orthanc(base / "orthanc", base / "orthanc.log")
    trap = ProxyTrap()
    try:
        script = [sys.executable, str(REPO / "scripts" / "load_pacs.py"), "--url", orthanc.dicomweb, "--root", str(root)]
        for extra in (["--cases", LABELED], ["--cases", *UNLABELED, "--no-labels"]):
            proc = subprocess.run(script + extra, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr
        conf = {"model_dir": str(base / "model"), "preset": "fast", "datastore_dir": str(base / "state")}
        server = Server(orthanc.dicomweb, base / "server.log", conf=conf, extra_env=trap.env())
        state = {"root": root, "orthanc": orthanc, "server": server, "conf": conf, "base": base, "trap": trap}
        yield state
        state["server"].stop()  # the restart test replaces the server: stop the one running now
    finally:
        orthanc.stop()


@pytest.fixture()
def client(pacs: dict):
    from monailabel.client import MONAILabelClient

    return MONAILabelClient(pacs["server"].url, tmpdir=str(pacs["base"]))


def _series_uid(case: str) -> str:
    return stable_uid(case, "ct")


# ---- loading the PACS -------------------------------------------------------------------------


def test_loaded_ct_series_carry_metadata_and_exact_geometry(pacs: dict) -> None:
    meta = read_metadata(pacs["root"] / "metadata.csv")
    series = {str(d.SeriesInstanceUID): d for d in _qido(pacs["orthanc"], "CT")}
    assert set(series) == {_series_uid(c) for c in (LABELED, *UNLABELED)}
    dw = make_client(pacs["orthanc"].dicomweb)
    for case in (LABELED, UNLABELED[0]):
        m = meta[case]
        d = series[_series_uid(case)]
        assert d.InstitutionName == m.center
        assert m.contrast_phase in d.SeriesDescription
        instances = dw.retrieve_series(stable_uid(case, "study"), _series_uid(case))
        first = instances[0]
        assert first.PatientSex == m.sex and first.PatientAge == f"{int(m.age):03d}Y"
        geom = series_geometry(instances)
        ref = nib.load(pacs["root"] / "ImageTr" / case / "ct.nii.gz")
        np.testing.assert_allclose(geom.affine, ref.affine, atol=1e-4)
        assert np.array_equal(read_volume(geom), np.asarray(ref.dataobj))


def test_loaded_masks_are_one_seg_with_28_coded_coloured_segments(pacs: dict) -> None:
    segs = [d for d in _qido(pacs["orthanc"], "SEG") if d.ContentLabel == "PANTS"]
    assert [str(d.SeriesInstanceUID) for d in segs] == [stable_uid(LABELED, "pants-seg")]
    dw = make_client(pacs["orthanc"].dicomweb)
    study = stable_uid(LABELED, "study")
    (seg,) = dw.retrieve_series(study, str(segs[0].SeriesInstanceUID))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == _series_uid(LABELED)
    coding = load_seg_coding()
    items = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert sorted(items) == list(range(1, 29))
    for c in LM.classes:
        s = items[c.id]
        assert s.SegmentLabel == c.name
        assert s.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
        assert s.SegmentedPropertyTypeCodeSequence[0].CodeValue == coding.classes[c.name].type.value
        assert dicom_lab_to_rgb(s.RecommendedDisplayCIELabValue) == tuple(c.color)
    left = items[LM.id_of("kidney_left")].SegmentedPropertyTypeModifierCodeSequence[0]
    assert (left.CodeValue, left.CodeMeaning) == ("7771000", "Left")
    # decodes to the masks consolidated by the label map's priority
    geom = series_geometry(dw.retrieve_series(study, _series_uid(LABELED)))
    masks = {p.name.split(".")[0]: np.asarray(nib.load(p).dataobj)
             for p in (pacs["root"] / "LabelTr" / LABELED / "segmentations").glob("*.nii.gz")}
    assert np.array_equal(seg_to_label(seg, geom), LM.consolidate(masks))


# ---- the server over DICOMweb -----------------------------------------------------------------


def test_info_counts_series_and_labeled(client) -> None:
    info = client.info()
    assert list(info["labels"]) == LM.names
    assert info["datastore"]["total"] == 3
    assert info["datastore"]["completed"] >= 1


def test_next_sample_returns_unlabeled_series_with_study_uid(client) -> None:
    res = client.next_sample("random", {})
    assert res["id"] in {_series_uid(c) for c in UNLABELED}
    case = next(c for c in UNLABELED if _series_uid(c) == res["id"])
    assert res["StudyInstanceUID"] == stable_uid(case, "study")


def test_infer_over_dicomweb_on_the_ct_grid(pacs: dict, client) -> None:
    path, params = client.infer("segmentation", _series_uid(UNLABELED[0]), {"result_extension": ".nii.gz"})
    out = nib.load(path)
    ref = nib.load(pacs["root"] / "ImageTr" / UNLABELED[0] / "ct.nii.gz")
    arr, aff = _canonical(np.asarray(out.dataobj), out.affine)
    ref_arr, ref_aff = _canonical(np.asarray(ref.dataobj), ref.affine)
    assert arr.shape == ref_arr.shape and np.asarray(out.dataobj).dtype == np.uint8
    np.testing.assert_allclose(aff, ref_aff, atol=1e-4)
    assert params["label_names"] == LM.labels_dict()


def _slicer_label(pacs: dict, case: str, tmp_path: Path) -> tuple[Path, list[dict], np.ndarray]:
    """A label as 3D Slicer uploads it: voxel values = segment positions, named in label_info."""
    image = nib.load(pacs["root"] / "ImageTr" / case / "ct.nii.gz")
    masks = {p.name.split(".")[0]: np.asarray(nib.load(p).dataobj)
             for p in (pacs["root"] / "LabelTr" / case / "segmentations").glob("*.nii.gz")}
    canonical = LM.consolidate(masks)
    present = [int(v) for v in np.unique(canonical) if v]
    slicer = np.zeros_like(canonical)
    label_info = []
    for idx, cid in enumerate(reversed(present), start=1):  # Slicer's own order, not the server's ids
        slicer[canonical == cid] = idx
        label_info.append({"name": LM.id_to_name[cid], "idx": idx})
    path = tmp_path / f"{case}.nii.gz"
    nib.save(nib.Nifti1Image(slicer, image.affine), path)
    return path, label_info, canonical


def test_final_label_round_trips_as_dicom_seg(pacs: dict, client, tmp_path: Path) -> None:
    case = UNLABELED[1]
    sid = _series_uid(case)
    before = {str(d.SeriesInstanceUID) for d in _qido(pacs["orthanc"], "SEG")}
    path, label_info, canonical = _slicer_label(pacs, case, tmp_path)
    reader = MONAILabelClient(pacs["server"].url, tmpdir=str(tmp_path), client_id="reader-a")  # as Slicer sends it
    reader.save_label(sid, str(path), "final", {"label_info": label_info, "time_spent_s": 95})

    new = [d for d in _qido(pacs["orthanc"], "SEG") if str(d.SeriesInstanceUID) not in before]
    assert len(new) == 1 and new[0].ContentLabel == "FINAL"
    # who saved it and how long it took, as on a PanTS folder; the SEG names the reader too
    info = requests.get(f"{pacs['server'].url}/datastore/label/info", params={"label": sid, "tag": "final"},
                        timeout=30).json()
    assert info["provenance"] == {"source": "reader", "reader": "reader-a", "reader_from": "client_id", "seconds": 95}
    dw = make_client(pacs["orthanc"].dicomweb)
    study = stable_uid(case, "study")
    (seg,) = dw.retrieve_series(study, str(new[0].SeriesInstanceUID))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sid
    assert [s.SegmentLabel for s in seg.SegmentSequence] == LM.names
    geom = series_geometry(dw.retrieve_series(study, sid))
    ref = nib.load(pacs["root"] / "ImageTr" / case / "ct.nii.gz")
    assert np.array_equal(_canonical(seg_to_label(seg, geom), geom.affine)[0], _canonical(canonical, ref.affine)[0])

    # read back through the server, as Slicer does
    back = Path(client.download_label(sid, "final"))
    img = nib.load(back)
    assert np.array_equal(_canonical(np.asarray(img.dataobj), img.affine)[0], _canonical(canonical, ref.affine)[0])
    # now labeled: next sample never serves it
    for _ in range(5):
        res = client.next_sample("random", {})
        assert res.get("id") != sid


def test_bad_upload_is_refused_and_stores_no_seg(pacs: dict, tmp_path: Path) -> None:
    sid = _series_uid(UNLABELED[0])
    before = len(_qido(pacs["orthanc"], "SEG"))
    bad = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.uint8), np.eye(4)), bad)
    body = (b"--b\r\nContent-Disposition: form-data; name=\"label\"; filename=\"bad.nii.gz\"\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n" + bad.read_bytes() + b"\r\n--b--\r\n")
    req = urllib.request.Request(f"{pacs['server'].url}/datastore/label?image={sid}&tag=final", data=body,
                                 method="PUT", headers={"Content-Type": "multipart/form-data; boundary=b"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    assert 400 <= err.value.code < 500
    assert "shape" in err.value.read().decode()
    assert len(_qido(pacs["orthanc"], "SEG")) == before


def test_ids_info_and_labels_survive_a_restart(pacs: dict) -> None:
    from monailabel.client import MONAILabelClient

    server: Server = pacs["server"]
    sid = _series_uid(UNLABELED[0])
    # a score, as a scoring task writes it (PUT /datastore/image/info takes a form field "info")
    req = urllib.request.Request(
        f"{server.url}/datastore/image/info?image={sid}", method="PUT",
        data=urllib.parse.urlencode({"info": json.dumps({"epistemic_v2": 0.75})}).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert urllib.request.urlopen(req, timeout=30).status == 200
    ids_before = sorted(MONAILabelClient(server.url).datastore()["objects"])
    server.stop()
    restarted = Server(pacs["orthanc"].dicomweb, pacs["base"] / "server2.log", conf=pacs["conf"],
                       extra_env=pacs["trap"].env())
    pacs["server"] = restarted
    c = MONAILabelClient(restarted.url, tmpdir=str(pacs["base"]))
    objects = c.datastore()["objects"]
    assert sorted(objects) == ids_before
    assert objects[sid]["image"]["info"]["epistemic_v2"] == 0.75
    assert "final" in objects[_series_uid(UNLABELED[1])]["labels"]
    assert Path(c.download_label(_series_uid(UNLABELED[1]), "final")).stat().st_size > 0


def _stored_versions(pacs: dict) -> dict[str, str]:
    import hashlib

    labels = pacs["base"] / "state" / "labels"
    return {p.relative_to(labels).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(labels.rglob("v*.nii.gz"))}


def _served(pacs: dict, sid: str) -> dict[str, bytes]:
    base = pacs["server"].url
    out = {}
    for tag in ("original", "final"):
        with urllib.request.urlopen(f"{base}/datastore/label?label={sid}&tag={tag}", timeout=60) as r:
            out[tag] = r.read()
    return out


def test_every_label_version_survives_clean_and_kill9_restarts(pacs: dict, tmp_path: Path) -> None:
    """``original`` and ``final`` versions, and a ``final`` whose SEG the PACS refused, are kept
    and served identically after a clean stop and after kill -9; nothing is moved to orphans/."""
    import os
    import signal

    from monailabel.client import MONAILabelClient
    from monailabel.client.client import MONAILabelClientException

    sid = _series_uid(UNLABELED[0])
    path, label_info, canonical = _slicer_label(pacs, UNLABELED[0], tmp_path)
    c = MONAILabelClient(pacs["server"].url, tmpdir=str(tmp_path))
    c.save_label(sid, str(path), "original", {"label_info": label_info})
    c.save_label(sid, str(path), "final", {"label_info": label_info})  # v1: its SEG goes to the PACS
    # v2 while the PACS is down: 502, kept here only
    edited = nib.load(path)
    arr = np.asarray(edited.dataobj).copy()
    arr[arr == 1] = 0
    nib.save(nib.Nifti1Image(arr, edited.affine), tmp_path / "edited.nii.gz")
    pacs["orthanc"].stop()
    try:
        with pytest.raises(MONAILabelClientException) as err:
            MONAILabelClient(pacs["server"].url, tmpdir=str(tmp_path)).save_label(
                sid, str(tmp_path / "edited.nii.gz"), "final", {"label_info": label_info})
        assert "Status: 502" in err.value.msg and "kept here as version 2" in err.value.msg
    finally:
        pacs["orthanc"].start()
    files, served = _stored_versions(pacs), _served(pacs, sid)
    assert {k.split("/")[0] for k in files} >= {"original", "final"} and f"final/{sid}/v2.nii.gz" in files
    served_final = nib.Nifti1Image.from_bytes(gzip_decompress(served["final"]))
    assert not np.any(np.asarray(served_final.dataobj) == LM.id_of(label_info[0]["name"])), \
        "the newest final (kept here after the PACS refused it) is not the one served"

    for how in ("clean stop", "kill -9"):
        server: Server = pacs["server"]
        if how == "clean stop":
            server.stop()
        else:
            os.kill(server.proc.pid, signal.SIGKILL)
            server.proc.wait(30)
            server._fh.close()
        log = pacs["base"] / f"server-{how.replace(' ', '')}.log"
        pacs["server"] = Server(pacs["orthanc"].dicomweb, log, conf=pacs["conf"], extra_env=pacs["trap"].env())
        assert _stored_versions(pacs) == files, f"label files changed after a {how}"
        assert not list((pacs["base"] / "state" / "orphans").rglob("*.nii.gz")), f"files orphaned after a {how}"
        assert _served(pacs, sid) == served, f"served labels changed after a {how}"
        assert "recovered after an unclean stop" not in pacs["server"].tail(200000)


def gzip_decompress(data: bytes) -> bytes:
    import gzip

    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def test_nothing_was_downloaded_from_outside(pacs: dict) -> None:
    # every server call above went through a proxy trap for non-loopback traffic
    assert pacs["trap"].requests == []
    assert "dcmqi" not in pacs["server"].tail(200000).lower()
