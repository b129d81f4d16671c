"""The datastore behind a real server, driven by 3D Slicer's client (``MONAILabelClient``).

One module-scoped server (``monailabel start_server --app apps/pants_label``) serves a tiny
PanTS-layout phantom tree in place.
"""

from __future__ import annotations

import json
import shutil
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lib.datastore.pants import IMPORTED_TAG, STATE_DIRNAME, PanTSDatastore
from lib.core.labelmap import load_labelmap
from pants_tools.phantom import write_pants_tree
from server import Server

pytestmark = pytest.mark.server

LM = load_labelmap()
SHAPE = (32, 32, 24)
TRAIN = ["PanTS_00000001", "PanTS_00000002", "PanTS_00000003"]
TEST = ["PanTS_00000004"]
NEW = "PanTS_00000099"  # a scan without masks (the full PanTS has many): the only unlabeled one


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and STATE_DIRNAME not in p.parts
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path, dict]]:
    root = tmp_path_factory.mktemp("served") / "PanTS"
    write_pants_tree(root, 4, shape=SHAPE, n_test=1)
    (root / "ImageTr" / NEW).mkdir()
    shutil.copy(root / "ImageTr" / TRAIN[0] / "ct.nii.gz", root / "ImageTr" / NEW / "ct.nii.gz")
    before = _snapshot(root)
    server = Server(root, root.parent / "server.log")
    try:
        yield server, root, before
    finally:
        server.stop()


@pytest.fixture()
def client(served: tuple[Server, Path, dict]):
    from monailabel.client import MONAILabelClient

    return MONAILabelClient(served[0].url, tmpdir=str(served[1].parent))


def masks_of(root: Path, image_id: str) -> dict[str, np.ndarray]:
    seg = root / "LabelTr" / image_id / "segmentations"
    return {n: np.asarray(nib.load(seg / f"{n}.nii.gz").dataobj) for n in LM.names}


def affine_of(root: Path, image_id: str) -> np.ndarray:
    return nib.load(root / "ImageTr" / image_id / "ct.nii.gz").affine


def load(path: str | Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def http_json(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url, timeout=30).read())


def versions(root: Path, image_id: str, tag: str = "final") -> list[int]:
    ds = PanTSDatastore(root)  # a second process-level reader of the same index, as training is
    try:
        return [v["version"] for v in ds.label_versions(image_id, tag)]
    finally:
        ds.close()


# ---- serving in place --------------------------------------------------------------------------


def test_pants_tree_served_in_place(served, client) -> None:
    server, root, _ = served
    info = client.info()
    assert info["datastore"]["total"] == 4 and info["datastore"]["completed"] == 3
    listing = client.datastore()
    assert sorted(listing["objects"]) == TRAIN + [NEW]  # ImageTe is not served
    assert listing["objects"][NEW]["labels"] == {}
    assert IMPORTED_TAG in listing["objects"][TRAIN[0]]["labels"]
    meta = http_json(f"{server.url}/datastore/image/info?image={TRAIN[0]}")
    assert meta["path"] == str(root / "ImageTr" / TRAIN[0] / "ct.nii.gz")
    assert meta["center"].startswith("center_") and meta["contrast_phase"] and "tumor" in meta
    img = urllib.request.urlopen(f"{server.url}/datastore/image?image={TRAIN[0]}", timeout=30).read()
    assert img == (root / "ImageTr" / TRAIN[0] / "ct.nii.gz").read_bytes()


def test_masks_consolidated_by_priority(served, client) -> None:
    _, root, _ = served
    local = client.download_label(TRAIN[1], IMPORTED_TAG)
    np.testing.assert_array_equal(load(local), LM.consolidate(masks_of(root, TRAIN[1])))
    np.testing.assert_allclose(nib.load(local).affine, affine_of(root, TRAIN[1]))


def test_next_sample_draws_unlabeled_scans(served, client) -> None:
    # scans with imported masks count as labeled: the one without masks is the only candidate
    sample = client.next_sample("random", {"client_id": "annotator-1"})
    assert sample["id"] == NEW and sample["path"] == str(served[1] / "ImageTr" / NEW / "ct.nii.gz")
    # it is now leased to annotator-1: nobody else gets it while the lease runs
    assert client.next_sample("random", {"client_id": "annotator-2"}) == {}
    assert "random" in client.datastore()["objects"][NEW]["image"]["info"]["strategy"]


# ---- uploads -----------------------------------------------------------------------------------


def slicer_label(root: Path, tmp: Path, image_id: str, seed: int) -> tuple[Path, list[dict], np.ndarray]:
    truth = LM.consolidate(masks_of(root, image_id))
    present = [int(v) for v in np.unique(truth) if v]
    order = np.random.default_rng(seed).permutation(present)
    upload = np.zeros(SHAPE, np.uint8)
    info = []
    for pos, cid in enumerate(order, start=1):
        upload[truth == cid] = pos
        info.append({"name": LM.id_to_name[int(cid)], "idx": pos})
    path = tmp / f"slicer_{image_id}_{seed}.nii.gz"
    nib.save(nib.Nifti1Image(upload, affine_of(root, image_id)), path)
    return path, info, truth


def test_slicer_upload_with_shuffled_label_info(served, client, tmp_path: Path) -> None:
    _, root, _ = served
    path, info, truth = slicer_label(root, tmp_path, TRAIN[0], seed=3)
    res = client.save_label(TRAIN[0], str(path), tag="final", params={"label_info": info})
    assert res["image"] == TRAIN[0]
    np.testing.assert_array_equal(load(client.download_label(TRAIN[0], "final")), truth)
    assert client.datastore()["objects"][TRAIN[0]]["labels"]["final"]["info"]["counts"]


def _bad_uploads(root: Path, tmp: Path) -> list[tuple[str, str, Path, dict, str]]:
    """(case, image id, file, params, expected message fragment)."""
    aff = affine_of(root, TRAIN[2])
    good = np.zeros(SHAPE, np.uint8)
    good[4:8, 4:8, 4:8] = 1

    def nifti(name: str, arr: np.ndarray, affine: np.ndarray = aff) -> Path:
        nib.save(nib.Nifti1Image(arr, affine), tmp / name)
        return tmp / name

    corrupt = tmp / "corrupt.nii.gz"
    raw = nifti("ok.nii.gz", good).read_bytes()
    corrupt.write_bytes(raw[: len(raw) // 2] + b"\x00junk" * 8)
    text = tmp / "text.nii.gz"
    text.write_text("not an image at all")
    shifted = aff.copy()
    shifted[:3, 3] += 2.0
    out_of_range = good.copy()
    out_of_range[0, 0, 0] = 99
    return [
        ("corrupt gzip", TRAIN[2], corrupt, {}, "gzip"),
        ("not NIfTI", TRAIN[2], text, {}, "neither NIfTI"),
        ("wrong shape", TRAIN[2], nifti("shape.nii.gz", np.zeros((32, 32, 12), np.uint8)), {}, "shape"),
        ("wrong affine", TRAIN[2], nifti("affine.nii.gz", good, shifted), {}, "affine"),
        ("float values", TRAIN[2], nifti("float.nii.gz", good.astype(np.float32) * 0.5), {}, "integers"),
        ("out-of-range values", TRAIN[2], nifti("range.nii.gz", out_of_range), {}, "outside 0..28"),
        ("unknown name", TRAIN[2], nifti("name.nii.gz", good), {"label_info": [{"name": "kidney_middle", "idx": 1}]},
         "kidney_middle"),
        ("unnamed value", TRAIN[2], nifti("unnamed.nii.gz", good * 3), {"label_info": [{"name": "liver", "idx": 1}]},
         "not named"),
        ("../ id", "../" + TRAIN[2], nifti("id.nii.gz", good), {}, "not a valid image id"),
        ("unknown image", "PanTS_99999999", nifti("unknown.nii.gz", good), {}, "not found"),
    ]


def test_listing_never_stale_after_a_save(served, client, tmp_path: Path) -> None:
    server, root, _ = served
    url = f"{server.url}/datastore/?output=all"
    before = http_json(url)
    assert http_json(url) == before  # served twice from the cache
    image_id = TRAIN[2]
    path, label_info, _ = slicer_label(root, tmp_path, image_id, seed=7)
    client.save_label(image_id, str(path), tag="final", params={"label_info": label_info})
    after = http_json(url)
    old = before["objects"][image_id]["labels"].get("final", {}).get("info", {}).get("version", 0)
    assert after["objects"][image_id]["labels"]["final"]["info"]["version"] == old + 1
    assert http_json(f"{server.url}/datastore/?output=stats")["total"] == len(after["objects"])  # other outputs as before


def test_bad_upload_battery_refused_cleanly(served, client, tmp_path: Path) -> None:
    from monailabel.client.client import MONAILabelClientException

    _, root, _ = served
    first = np.zeros(SHAPE, np.uint8)
    first[2:4] = LM.name_to_id["stomach"]
    nib.save(nib.Nifti1Image(first, affine_of(root, TRAIN[2])), tmp_path / "first.nii.gz")
    client.save_label(TRAIN[2], str(tmp_path / "first.nii.gz"), tag="final")
    before_versions = versions(root, TRAIN[2])
    label_dir = root / STATE_DIRNAME / "labels"
    before_files = sorted(p.relative_to(label_dir) for p in label_dir.rglob("*"))
    failures = []
    for case, image_id, path, params, fragment in _bad_uploads(root, tmp_path):
        try:
            client.save_label(image_id, str(path), tag="final", params=params)
        except MONAILabelClientException as err:
            status = int(err.msg.split("Status: ")[1].split(";")[0])
            if not (400 <= status < 500 and fragment in err.msg):
                failures.append(f"{case}: {err.msg}")
        else:
            failures.append(f"{case}: accepted")
    assert not failures, "\n".join(failures)
    assert versions(root, TRAIN[2]) == before_versions
    assert sorted(p.relative_to(label_dir) for p in label_dir.rglob("*")) == before_files
    np.testing.assert_array_equal(load(client.download_label(TRAIN[2], "final")), first)
    assert not (root.parent / TRAIN[2]).exists()


def test_bad_tag_refused(served, client, tmp_path: Path) -> None:
    from monailabel.client.client import MONAILabelClientException

    _, root, _ = served
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), affine_of(root, TRAIN[1])), tmp_path / "z.nii.gz")
    for tag in ("../final", "pants"):
        with pytest.raises(MONAILabelClientException, match="Status: 400"):
            client.save_label(TRAIN[1], str(tmp_path / "z.nii.gz"), tag=tag)


def test_concurrent_saves_lose_nothing(served, tmp_path: Path) -> None:
    from monailabel.client import MONAILabelClient

    server, root, _ = served
    image_id = TRAIN[1]
    start = len(versions(root, image_id))
    uploads = [slicer_label(root, tmp_path, image_id, seed=s) for s in range(4)]
    errors: list[str] = []

    def worker(k: int) -> None:
        c = MONAILabelClient(server.url, tmpdir=str(tmp_path), client_id=f"annotator{k}")
        path, info, _ = uploads[k]
        for _ in range(3):
            try:
                c.save_label(image_id, str(path), tag="final", params={"label_info": info})
            except Exception as err:  # noqa: BLE001 - reported below
                errors.append(repr(err))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    ds = PanTSDatastore(root)
    hist = ds.label_versions(image_id, "final")
    assert [v["version"] for v in hist] == list(range(1, start + 13))
    new = hist[start:]
    assert sorted(v["info"]["client_id"] for v in new) == sorted(f"annotator{k}" for k in range(4) for _ in range(3))
    truth = uploads[0][2]
    for v in new:  # every stored version is the canonical map, whichever segment order it came in
        np.testing.assert_array_equal(load(v["path"]), truth)


def test_campaign_with_imported_labels_hidden(served, tmp_path: Path) -> None:
    """--conf hide_imported_labels true: every scan starts unlabeled; a reveal shows its masks."""
    from monailabel.client import MONAILabelClient

    root = tmp_path / "PanTS"  # a fresh copy: the module's server has stored final labels
    shutil.copytree(served[1], root, ignore=shutil.ignore_patterns(STATE_DIRNAME))
    server = Server(root, tmp_path / "campaign.log", conf={"hide_imported_labels": "true"})
    try:
        c = MONAILabelClient(server.url, tmpdir=str(tmp_path))
        assert c.info()["datastore"]["completed"] == 0
        assert IMPORTED_TAG not in c.datastore()["objects"][TRAIN[0]]["labels"]
        assert c.next_sample("random", {})["id"] in TRAIN + [NEW]
        PanTSDatastore(root, hide_imported_labels=True).reveal_imported(TRAIN[0])  # the simulator, another process
        assert c.info()["datastore"]["completed"] == 1
        np.testing.assert_array_equal(load(c.download_label(TRAIN[0], IMPORTED_TAG)),
                                      LM.consolidate(masks_of(root, TRAIN[0])))
    finally:
        server.stop()


def test_dataset_files_untouched(served) -> None:
    _, root, before = served
    assert _snapshot(root) == before
    leftovers = [p for p in (root / STATE_DIRNAME).rglob(".tmp-*")]
    assert not leftovers
