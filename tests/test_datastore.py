"""PanTSDatastore on tiny phantoms: PanTS and flat layouts, consolidation, hiding, uploads, history,
metadata, concurrency across processes. The server-level tests are in test_datastore_server.py."""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lib.core.config_errors import ConfigError
from lib.datastore.pants import IMPORTED_TAG, STATE_DIRNAME, PanTSDatastore
from lib.datastore.label_upload import DatastoreError
from lib.core.labelmap import load_labelmap
from lib.imaging.metadata import read_metadata
from pants_tools.phantom import write_pants_tree

LM = load_labelmap()
SHAPE = (32, 32, 24)
TRAIN = ["PanTS_00000001", "PanTS_00000002", "PanTS_00000003"]
TEST = ["PanTS_00000004"]


@pytest.fixture(scope="session")
def phantom_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pants_src")
    write_pants_tree(root, 4, shape=SHAPE, n_test=1)
    return root


@pytest.fixture()
def root(phantom_tree: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "PanTS"
    shutil.copytree(phantom_tree, dst)
    return dst


def masks_of(root: Path, image_id: str, split: str = "Tr") -> dict[str, np.ndarray]:
    seg = root / f"Label{split}" / image_id / "segmentations"
    return {n: np.asarray(nib.load(seg / f"{n}.nii.gz").dataobj) for n in LM.names}


def image_affine(root: Path, image_id: str) -> np.ndarray:
    return nib.load(root / "ImageTr" / image_id / "ct.nii.gz").affine


def save_nifti(path: Path, arr: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def load(path: str | Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def tree_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file outside the datastore's own folder with size and mtime."""
    out = {}
    for p in root.rglob("*"):
        if STATE_DIRNAME in p.parts or not p.is_file():
            continue
        st = p.stat()
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def state_snapshot(ds: PanTSDatastore, image_id: str, tag: str = "final") -> tuple:
    folder = ds.state_dir / "labels" / tag / image_id
    files = sorted(p.name for p in folder.glob("*")) if folder.exists() else []
    return (len(ds.label_versions(image_id, tag)), files, ds.get_label_uri(image_id, tag))


# ---- layout, splits, metadata ------------------------------------------------------------------


def test_pants_root_served_in_place(root: Path) -> None:
    before = tree_snapshot(root)
    ds = PanTSDatastore(root)
    assert ds.layout == "pants"
    assert ds.list_images() == TRAIN
    assert ds.test_images() == TEST
    st = ds.status()
    assert st["total"] == 3 and st["completed"] == 3 and st["label_tags"] == {IMPORTED_TAG: 3}
    assert ds.get_image_uri(TRAIN[0]) == str(root / "ImageTr" / TRAIN[0] / "ct.nii.gz")
    assert ds.get_image_uri(TEST[0]).endswith(f"ImageTe/{TEST[0]}/ct.nii.gz")  # test scans stay reachable
    assert ds.datalist() and all(d["image_id"] in TRAIN for d in ds.datalist())
    assert (root / STATE_DIRNAME / "index.sqlite").is_file()
    assert tree_snapshot(root) == before


def test_serve_test_split(root: Path) -> None:
    ds = PanTSDatastore(root, serve_test_split=True)
    assert ds.list_images() == TRAIN + TEST
    assert TEST[0] not in {d["image_id"] for d in ds.datalist()}  # never trained on


def test_metadata_in_image_info(root: Path) -> None:
    ds = PanTSDatastore(root)
    table = read_metadata(root / "metadata.csv")
    for image_id in TRAIN + TEST:
        info = ds.get_image_info(image_id)
        meta = table[image_id]
        for key in ("center", "contrast_phase", "age", "sex", "diagnosis", "tumor"):
            assert info[key] == getattr(meta, key), key
        assert info["spacing"] == list(meta.spacing)
        assert info["split"] == ("test" if image_id in TEST else "train")
        assert info["name"] == f"{image_id}.nii.gz" and Path(info["path"]).is_file()
    assert ds.metadata_table()[TRAIN[1]]["center"] == table[TRAIN[1]].center


def test_metadata_changes_are_reread(root: Path) -> None:
    PanTSDatastore(root).close()
    text = (root / "metadata.csv").read_text().replace("center_", "site_")
    (root / "metadata.csv").write_text(text)
    ds = PanTSDatastore(root)
    assert ds.get_image_info(TRAIN[0])["center"].startswith("site_")


def test_bad_metadata_file_stops_with_message(root: Path) -> None:
    with open(root / "metadata.csv", "a") as fh:
        fh.write("PanTS_00000001,x,venous,notanage,M,0.8,0.8,1.25,normal,no\n")
    with pytest.raises(ConfigError, match="metadata"):
        PanTSDatastore(root)


def test_refresh_adds_new_and_marks_missing_scans(root: Path) -> None:
    ds = PanTSDatastore(root)
    ds.update_image_info(TRAIN[2], {"score": 0.7})
    moved = root.parent / "moved"
    shutil.move(str(root / "ImageTr" / TRAIN[2]), moved)
    shutil.copytree(root / "ImageTr" / TRAIN[0], root / "ImageTr" / "PanTS_00000099")
    ds.refresh()
    assert ds.list_images() == [TRAIN[0], TRAIN[1], "PanTS_00000099"]
    assert not ds.has_imported_labels("PanTS_00000099")
    shutil.move(str(moved), root / "ImageTr" / TRAIN[2])
    ds2 = PanTSDatastore(root)  # a re-open sees it again, with its info kept
    assert TRAIN[2] in ds2.list_images() and ds2.get_image_info(TRAIN[2])["score"] == 0.7


def test_unwritable_state_dir_names_the_setting(root: Path, tmp_path: Path) -> None:
    (root / STATE_DIRNAME).write_text("not a folder")  # what a read-only dataset looks like here
    with pytest.raises(ConfigError, match="datastore_dir"):
        PanTSDatastore(root)
    ds = PanTSDatastore(root, state_dir=tmp_path / "state")
    assert ds.list_images() == TRAIN
    assert (tmp_path / "state" / "index.sqlite").is_file()
    other = tmp_path / "other_root"
    other.mkdir()
    with pytest.raises(ConfigError, match="already indexes"):
        PanTSDatastore(other, state_dir=tmp_path / "state")


# ---- imported masks ----------------------------------------------------------------------------


def test_masks_consolidated_by_priority_and_cached(root: Path) -> None:
    ds = PanTSDatastore(root)
    uri = ds.get_label_uri(TRAIN[0], IMPORTED_TAG)
    label = load(uri)
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, LM.consolidate(masks_of(root, TRAIN[0])))
    np.testing.assert_allclose(nib.load(uri).affine, image_affine(root, TRAIN[0]))
    mtime = Path(uri).stat().st_mtime_ns
    assert ds.get_label_uri(TRAIN[0], IMPORTED_TAG) == uri
    assert Path(uri).stat().st_mtime_ns == mtime  # cache hit: not rebuilt

    # A mask edited in place invalidates the cache.
    seg = root / "LabelTr" / TRAIN[0] / "segmentations"
    liver = np.zeros(SHAPE, np.uint8)
    liver[:4, :4, :4] = 1
    save_nifti(seg / "liver.nii.gz", liver, image_affine(root, TRAIN[0]))
    os.utime(seg / "liver.nii.gz", ns=(time.time_ns(), time.time_ns() + 10**9))
    label2 = load(ds.get_label_uri(TRAIN[0], IMPORTED_TAG))
    expected = LM.consolidate(masks_of(root, TRAIN[0]))
    np.testing.assert_array_equal(label2, expected)
    assert not np.array_equal(label, label2)


def test_hidden_imported_labels_and_reveal(root: Path) -> None:
    ds = PanTSDatastore(root, hide_imported_labels=True)
    assert ds.get_labeled_images() == []
    assert ds.get_unlabeled_images() == TRAIN
    assert ds.get_label_uri(TRAIN[0], IMPORTED_TAG) == ""
    assert ds.get_labels_by_image_id(TRAIN[0]) == {}
    assert ds.datalist() == []
    assert ds.get_image_info(TRAIN[0])["imported_labels"] == "hidden"
    assert ds.get_label_uri(TEST[0], IMPORTED_TAG)  # test ground truth stays visible

    ds.reveal_imported(TRAIN[1])
    assert ds.get_labeled_images() == [TRAIN[1]]
    assert ds.get_label_uri(TRAIN[1], IMPORTED_TAG)
    assert [d["image_id"] for d in ds.datalist()] == [TRAIN[1]]

    reopened = PanTSDatastore(root, hide_imported_labels=True)  # another process sees the reveal
    assert reopened.revealed_images() == [TRAIN[1]]
    assert PanTSDatastore(root).get_labeled_images() == TRAIN  # setting off: all visible
    reopened.reset_revealed()
    assert ds.get_labeled_images() == []
    with pytest.raises(DatastoreError) as err:
        ds.reveal_imported("PanTS_00000077")
    assert err.value.status_code == 404


def test_imported_tag_is_read_only(root: Path, tmp_path: Path) -> None:
    ds = PanTSDatastore(root)
    label = save_nifti(tmp_path / "l.nii.gz", np.zeros(SHAPE, np.uint8), image_affine(root, TRAIN[0]))
    with pytest.raises(DatastoreError, match="reserved"):
        ds.save_label(TRAIN[0], str(label), IMPORTED_TAG, {})
    with pytest.raises(DatastoreError, match="read-only"):
        ds.remove_label(TRAIN[0], IMPORTED_TAG)


# ---- uploads -----------------------------------------------------------------------------------


def slicer_upload(root: Path, tmp_path: Path, image_id: str) -> tuple[Path, list[dict], np.ndarray]:
    """A label as 3D Slicer sends it: segment positions as voxel values, names in label_info."""
    truth = LM.consolidate(masks_of(root, image_id))
    present = [int(v) for v in np.unique(truth) if v]
    rng = np.random.default_rng(1)
    order = rng.permutation(present)  # segment list in some other order than our ids
    upload = np.zeros(SHAPE, np.int16)
    label_info = []
    for pos, cid in enumerate(order, start=1):
        upload[truth == cid] = pos
        label_info.append({"name": LM.id_to_name[int(cid)], "idx": pos})
    rng.shuffle(label_info)  # the list order itself does not matter either
    path = save_nifti(tmp_path / "slicer.nii.gz", upload, image_affine(root, image_id))
    return path, label_info, truth


def test_slicer_upload_mapped_to_canonical_ids(root: Path, tmp_path: Path) -> None:
    ds = PanTSDatastore(root)
    path, label_info, truth = slicer_upload(root, tmp_path, TRAIN[0])
    assert ds.save_label(TRAIN[0], str(path), "final", {"label_info": label_info, "client_id": "slicer"}) == TRAIN[0]
    uri = ds.get_label_uri(TRAIN[0], "final")
    assert Path(uri).parent == root / STATE_DIRNAME / "labels" / "final" / TRAIN[0]
    np.testing.assert_array_equal(load(uri), truth)
    assert load(uri).dtype == np.uint8
    info = ds.get_label_info(TRAIN[0], "final")
    assert info["version"] == 1 and info["client_id"] == "slicer" and info["mapping"]
    assert info["counts"]["liver"] == int((truth == LM.name_to_id["liver"]).sum())
    # final now wins over the imported masks for training
    assert {d["image_id"]: d["tag"] for d in ds.datalist()}[TRAIN[0]] == "final"


def test_canonical_upload_without_label_info_and_history(root: Path, tmp_path: Path) -> None:
    before = tree_snapshot(root)
    ds = PanTSDatastore(root)
    aff = image_affine(root, TRAIN[1])
    uris = []
    for k in range(3):
        arr = np.zeros(SHAPE, np.uint8)
        arr[k : k + 3] = LM.name_to_id["spleen"]
        ds.save_label(TRAIN[1], str(save_nifti(tmp_path / f"u{k}.nii.gz", arr, aff)), "final", {})
        uris.append(ds.get_label_uri(TRAIN[1], "final"))
    versions = ds.label_versions(TRAIN[1], "final")
    assert [v["version"] for v in versions] == [1, 2, 3]
    assert [v["path"] for v in versions] == uris and all(Path(u).is_file() for u in uris)
    assert load(ds.get_label_version_uri(TRAIN[1], "final", 1))[0].max() == LM.name_to_id["spleen"]

    ds.remove_label(TRAIN[1], "final")
    assert ds.get_label_uri(TRAIN[1], "final") == ""
    assert [v["path"] is None for v in ds.label_versions(TRAIN[1], "final")] == [False, False, False, True]
    assert all(Path(u).is_file() for u in uris)  # history kept
    ds.save_label(TRAIN[1], str(tmp_path / "u0.nii.gz"), "final", {})
    assert ds.get_label_info(TRAIN[1], "final")["version"] == 5
    assert tree_snapshot(root) == before


def _corrupt_gzip(path: Path, good: Path) -> None:
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2] + b"\x00garbage" * 10)


def _bad_case(kind: str, tmp_path: Path, aff: np.ndarray) -> tuple[Path, dict, int, str]:
    """(file, params, expected status, message fragment) for one refused upload."""
    good = np.zeros(SHAPE, np.uint8)
    good[4:8, 4:8, 4:8] = 1
    p = tmp_path / f"{kind}.nii.gz"
    if kind == "corrupt_gzip":
        _corrupt_gzip(p, save_nifti(tmp_path / "good.nii.gz", good, aff))
        return p, {}, 400, "gzip"
    if kind == "not_nifti":
        p.write_bytes(gzip.compress(b"hello, this is not an image" * 20))
        return p, {}, 415, "neither NIfTI"
    if kind == "plain_text":
        p.write_text("just text")
        return p, {}, 415, "neither NIfTI"
    if kind == "wrong_shape":
        return save_nifti(p, np.zeros((32, 32, 20), np.uint8), aff), {}, 422, "shape"
    if kind == "wrong_affine":
        shifted = aff.copy()
        shifted[:3, 3] += [0.8, 0, 0]  # one voxel
        return save_nifti(p, good, shifted), {}, 422, "affine"
    if kind == "flipped_affine":
        return save_nifti(p, good, np.diag([1.0, 1.0, 1.0, 1.0]) @ aff @ np.diag([-1, 1, 1, 1])), {}, 422, "affine"
    if kind == "float_values":
        f = good.astype(np.float32) * 0.5
        return save_nifti(p, f, aff), {}, 422, "integers"
    if kind == "out_of_range":
        v = good.copy()
        v[0, 0, 0] = 200
        return save_nifti(p, v, aff), {}, 422, "outside 0..28"
    if kind == "negative":
        v = good.astype(np.int16)
        v[0, 0, 0] = -1
        return save_nifti(p, v, aff), {}, 422, ">= 0"
    if kind == "unknown_name":
        return save_nifti(p, good, aff), {"label_info": [{"name": "tumour_blob", "idx": 1}]}, 422, "tumour_blob"
    if kind == "unnamed_value":
        v = good.copy()
        v[0:2, 0:2, 0:2] = 2
        return save_nifti(p, v, aff), {"label_info": [{"name": "liver", "idx": 1}]}, 422, "not named"
    if kind == "bad_label_info":
        return save_nifti(p, good, aff), {"label_info": [{"name": "liver"}]}, 400, "idx"
    raise AssertionError(kind)


BAD = [
    "corrupt_gzip", "not_nifti", "plain_text", "wrong_shape", "wrong_affine", "flipped_affine", "float_values",
    "out_of_range", "negative", "unknown_name", "unnamed_value", "bad_label_info",
]


@pytest.mark.parametrize("kind", BAD)
def test_bad_uploads_refused_and_nothing_changes(root: Path, tmp_path: Path, kind: str) -> None:
    ds = PanTSDatastore(root)
    aff = image_affine(root, TRAIN[0])
    first = np.zeros(SHAPE, np.uint8)
    first[1:3] = LM.name_to_id["liver"]
    ds.save_label(TRAIN[0], str(save_nifti(tmp_path / "first.nii.gz", first, aff)), "final", {})
    before = state_snapshot(ds, TRAIN[0])
    path, params, status, fragment = _bad_case(kind, tmp_path, aff)
    with pytest.raises(DatastoreError) as err:
        ds.save_label(TRAIN[0], str(path), "final", params)
    assert err.value.status_code == status
    assert fragment in err.value.detail
    assert state_snapshot(ds, TRAIN[0]) == before
    np.testing.assert_array_equal(load(ds.get_label_uri(TRAIN[0], "final")), first)


@pytest.mark.parametrize(
    ("image_id", "tag", "status", "fragment"),
    [
        ("../PanTS_00000001", "final", 400, "not a valid image id"),
        ("PanTS_00000001/../x", "final", 400, "not a valid image id"),
        ("/etc/passwd", "final", 400, "not a valid image id"),
        ("..", "final", 400, "not a valid image id"),
        ("PanTS_00000001", "../final", 400, "not a valid label tag"),
        ("PanTS_00000001", "a/b", 400, "not a valid label tag"),
        ("PanTS_00000001", "..", 400, "not a valid label tag"),
        ("PanTS_99999999", "final", 404, "not found"),
    ],
)
def test_ids_and_tags_that_escape_or_do_not_exist(
    root: Path, tmp_path: Path, image_id: str, tag: str, status: int, fragment: str
) -> None:
    ds = PanTSDatastore(root)
    good = save_nifti(tmp_path / "g.nii.gz", np.zeros(SHAPE, np.uint8), image_affine(root, TRAIN[0]))
    with pytest.raises(DatastoreError) as err:
        ds.save_label(image_id, str(good), tag, {})
    assert err.value.status_code == status and fragment in err.value.detail
    assert not list((ds.state_dir / "labels").rglob("*.nii.gz")) if (ds.state_dir / "labels").exists() else True
    assert ds.get_label_uri(image_id, tag) == ""


def test_float_file_with_whole_values_is_accepted(root: Path, tmp_path: Path) -> None:
    ds = PanTSDatastore(root)
    arr = np.zeros(SHAPE, np.float32)
    arr[2:5] = 3.0
    ds.save_label(TRAIN[0], str(save_nifti(tmp_path / "f.nii.gz", arr, image_affine(root, TRAIN[0]))), "final", {})
    assert set(np.unique(load(ds.get_label_uri(TRAIN[0], "final")))) == {0, 3}


def test_affine_within_tolerance_is_accepted(root: Path, tmp_path: Path) -> None:
    ds = PanTSDatastore(root)
    aff = image_affine(root, TRAIN[0]).copy()
    aff[:3, 3] += 1e-5  # float32 round-off of a re-written header
    ds.save_label(TRAIN[0], str(save_nifti(tmp_path / "t.nii.gz", np.zeros(SHAPE, np.uint8), aff)), "final", {})
    np.testing.assert_allclose(nib.load(ds.get_label_uri(TRAIN[0], "final")).affine, image_affine(root, TRAIN[0]))


def test_nrrd_labelmap_and_seg_nrrd(root: Path, tmp_path: Path) -> None:
    import nrrd

    ds = PanTSDatastore(root)
    aff = image_affine(root, TRAIN[0])
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff  # NRRD geometry in LPS, as Slicer writes it
    header = {"space": "left-posterior-superior", "space directions": lps[:3, :3].T, "space origin": lps[:3, 3]}
    arr = np.zeros(SHAPE, np.uint8)
    arr[2:6] = 1
    arr[10:12] = 2
    nrrd.write(str(tmp_path / "l.nrrd"), arr, header)
    info = [{"name": "pancreas_head", "idx": 2}, {"name": "liver", "idx": 1}]
    ds.save_label(TRAIN[0], str(tmp_path / "l.nrrd"), "final", {"label_info": info})
    out = load(ds.get_label_uri(TRAIN[0], "final"))
    assert (out[2:6] == LM.name_to_id["liver"]).all() and (out[10:12] == LM.name_to_id["pancreas_head"]).all()

    # seg.nrrd with two overlapping layers: names from its header, overlap by the priority rule
    layers = np.zeros((2, *SHAPE), np.uint8)
    layers[0, 4:12] = 1  # pancreas
    layers[1, 6:8] = 1  # lesion inside it
    seg_header = dict(header)
    seg_header["space directions"] = np.vstack([np.full(3, np.nan), lps[:3, :3].T])
    seg_header["kinds"] = ["list", "domain", "domain", "domain"]
    seg_header.update({
        "Segment0_Name": "Pancreas", "Segment0_Layer": "0", "Segment0_LabelValue": "1",
        "Segment1_Name": "pancreatic lesion", "Segment1_Layer": "1", "Segment1_LabelValue": "1",
    })
    nrrd.write(str(tmp_path / "s.seg.nrrd"), layers, seg_header)
    ds.save_label(TRAIN[0], str(tmp_path / "s.seg.nrrd"), "final", {"label_info": [{"name": "x", "idx": 9}]})
    out = load(ds.get_label_uri(TRAIN[0], "final"))
    assert (out[6:8] == LM.name_to_id["pancreatic_lesion"]).all()
    assert (out[4:6] == LM.name_to_id["pancreas"]).all() and (out[:4] == 0).all()

    wrong = dict(header)
    wrong["space origin"] = lps[:3, 3] + 5.0
    nrrd.write(str(tmp_path / "w.nrrd"), arr, wrong)
    with pytest.raises(DatastoreError, match="affine"):
        ds.save_label(TRAIN[0], str(tmp_path / "w.nrrd"), "final", {"label_info": info})


# ---- info, strategies --------------------------------------------------------------------------


def test_update_image_info_merges_and_bulk_values(root: Path) -> None:
    ds = PanTSDatastore(root)
    ds.update_image_info(TRAIN[0], {"epistemic_entropy": np.float32(0.25)})
    ds.update_image_info(TRAIN[0], {"strategy": {"random": {"ts": 5}}})
    info = ds.get_image_info(TRAIN[0])
    assert info["epistemic_entropy"] == 0.25 and info["strategy"]["random"]["ts"] == 5
    assert info["center"]  # metadata kept alongside
    assert ds.image_info_values("epistemic_entropy") == {TRAIN[0]: 0.25}
    assert ds.update_images_info({TRAIN[1]: {"s": 1}, "nope": {"s": 2}}) == ["nope"]
    with pytest.raises(DatastoreError) as err:
        ds.update_image_info("PanTS_00000099", {"s": 1})
    assert err.value.status_code == 404


def test_random_next_sample(root: Path) -> None:
    from monailabel.tasks.activelearning.random import Random

    ds = PanTSDatastore(root, hide_imported_labels=True)
    ds.reveal_imported(TRAIN[0])
    rng = np.random.default_rng(0)
    picks = {ds.sample_random_unlabeled(rng=rng)["id"] for _ in range(60)}
    assert picks == {TRAIN[1], TRAIN[2]}
    # one just served is (almost) never picked again, as with MONAI's Random weights
    ds.update_image_info(TRAIN[1], {"strategy": {"random": {"ts": int(time.time())}}})
    assert {ds.sample_random_unlabeled(rng=rng)["id"] for _ in range(30)} == {TRAIN[2]}
    assert Random()({"strategy": "random"}, ds)["id"] in (TRAIN[1], TRAIN[2])
    ds.reveal_imported_many(TRAIN)
    assert ds.sample_random_unlabeled() is None
    assert ds.sample_random_unlabeled(label_tag="final")["id"] in TRAIN


def test_json_listing_shape(root: Path, tmp_path: Path) -> None:
    ds = PanTSDatastore(root)
    path, label_info, _ = slicer_upload(root, tmp_path, TRAIN[2])
    ds.save_label(TRAIN[2], str(path), "final", {"label_info": label_info})
    listing = json.loads(json.dumps(ds.json()))
    assert sorted(listing["objects"]) == TRAIN
    obj = listing["objects"][TRAIN[2]]
    assert obj["image"]["ext"] == ".nii.gz" and obj["image"]["info"]["name"] == f"{TRAIN[2]}.nii.gz"
    assert set(obj["labels"]) == {"final", IMPORTED_TAG}
    assert obj["labels"]["final"]["info"]["version"] == 1


def test_cached_listing_follows_every_change(root: Path, tmp_path: Path) -> None:
    ds = PanTSDatastore(root)
    first = ds.json_bytes()
    assert json.loads(first) == json.loads(json.dumps(ds.json()))
    assert ds.json_bytes() is first  # nothing changed: the cached body itself
    path, label_info, _ = slicer_upload(root, tmp_path, TRAIN[2])
    ds.save_label(TRAIN[2], str(path), "final", {"label_info": label_info})
    after_save = json.loads(ds.json_bytes())
    assert after_save["objects"][TRAIN[2]]["labels"]["final"]["info"]["version"] == 1
    ds.update_image_info(TRAIN[0], {"epistemic_entropy": 0.25})
    assert json.loads(ds.json_bytes())["objects"][TRAIN[0]]["image"]["info"]["epistemic_entropy"] == 0.25
    ds.set_name("renamed")
    assert json.loads(ds.json_bytes())["name"] == "renamed"
    # a save by another process (training, a second server) reaches this one's cache too
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_save_elsewhere, args=(root, str(path), label_info))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    assert json.loads(ds.json_bytes())["objects"][TRAIN[1]]["labels"]["final"]["info"]["version"] == 1
    assert json.loads(ds.json_bytes()) == json.loads(json.dumps(ds.json()))


def _save_elsewhere(root: Path, path: str, label_info: list[dict]) -> None:
    other = PanTSDatastore(root)
    other.save_label(TRAIN[1], path, "final", {"label_info": label_info})
    other.close()


def test_add_and_remove_image_never_touch_dataset(root: Path, tmp_path: Path) -> None:
    before = tree_snapshot(root)
    ds = PanTSDatastore(root)
    new_id = ds.add_image("extra_scan", str(root / "ImageTr" / TRAIN[0] / "ct.nii.gz"), {"source": "upload"})
    assert new_id in ds.list_images() and ds.split_of(new_id) == "added"
    assert ds.get_image_uri(new_id).startswith(str(ds.state_dir))
    with pytest.raises(DatastoreError) as err:
        ds.add_image("extra_scan", str(root / "ImageTr" / TRAIN[0] / "ct.nii.gz"), {})
    assert err.value.status_code == 409
    ds.remove_image(TRAIN[0])
    assert TRAIN[0] not in ds.list_images()
    assert TRAIN[0] not in PanTSDatastore(root).list_images()  # refresh does not bring it back
    assert tree_snapshot(root) == before


# ---- flat layout -------------------------------------------------------------------------------


def test_flat_folder_with_existing_final_labels(root: Path, tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    (flat / "labels" / "final").mkdir(parents=True)
    for image_id in TRAIN:
        shutil.copy(root / "ImageTr" / image_id / "ct.nii.gz", flat / f"{image_id}.nii.gz")
    truth = LM.consolidate(masks_of(root, TRAIN[0]))
    save_nifti(flat / "labels" / "final" / f"{TRAIN[0]}.nii.gz", truth, image_affine(root, TRAIN[0]))
    before = tree_snapshot(flat)

    ds = PanTSDatastore(flat)
    assert ds.layout == "flat" and ds.list_images() == TRAIN
    assert ds.get_labeled_images() == [TRAIN[0]]
    assert ds.get_label_uri(TRAIN[0], "final") == str(flat / "labels" / "final" / f"{TRAIN[0]}.nii.gz")
    assert ds.get_label_info(TRAIN[0], "final")["version"] == 0
    path, label_info, expected = slicer_upload(root, tmp_path, TRAIN[0])
    ds.save_label(TRAIN[0], str(path), "final", {"label_info": label_info})
    assert ds.get_label_info(TRAIN[0], "final")["version"] == 1
    np.testing.assert_array_equal(load(ds.get_label_uri(TRAIN[0], "final")), expected)
    assert [v["version"] for v in ds.label_versions(TRAIN[0], "final")] == [0, 1]
    assert tree_snapshot(flat) == before
    assert ds.datalist()[0]["tag"] == "final"


# ---- concurrency -------------------------------------------------------------------------------


def _writer(root: str, worker: int, n: int, label: str) -> None:
    ds = PanTSDatastore(root)
    for k in range(n):
        ds.save_label(TRAIN[0], label, "final", {"worker": worker, "k": k})
        ds.update_image_info(TRAIN[0], {f"score_{worker}_{k}": k})
    ds.close()


def test_concurrent_processes_lose_nothing(root: Path, tmp_path: Path) -> None:
    PanTSDatastore(root).close()
    label = save_nifti(tmp_path / "c.nii.gz", np.ones(SHAPE, np.uint8), image_affine(root, TRAIN[0]))
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(root), w, 4, str(label))) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    ds = PanTSDatastore(root)
    versions = ds.label_versions(TRAIN[0], "final")
    assert [v["version"] for v in versions] == list(range(1, 13))
    assert sorted((v["info"]["worker"], v["info"]["k"]) for v in versions) == [
        (w, k) for w in range(3) for k in range(4)
    ]
    assert all(Path(v["path"]).is_file() for v in versions)
    info = ds.get_image_info(TRAIN[0])
    assert all(f"score_{w}_{k}" in info for w in range(3) for k in range(4))


def test_bulk_image_info_has_metadata(root: Path) -> None:
    ds = PanTSDatastore(root)
    ds.update_image_info(TRAIN[1], {"score": 2})
    infos = ds.get_images_info()
    assert sorted(infos) == TRAIN
    assert infos[TRAIN[1]]["score"] == 2 and infos[TRAIN[1]]["center"] == ds.get_image_info(TRAIN[1])["center"]
    assert ds.get_images_info([TEST[0], "nope"]).keys() == {TEST[0]}
