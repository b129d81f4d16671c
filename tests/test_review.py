"""Review bookkeeping without a server: front identity, provenance, readings and their state,
agreement, the served ``original``, and the annotate campaign (provenance and QA only).
The same flow through the real server and nginx is in test_review_server.py."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lib.core import identity
from lib.core.errors import ClientError, ConfigError
from lib.core.labelmap import load_labelmap
from lib.core.review_config import ReviewConfig, load_review_config
from lib.core.settings import AppSettings
from lib.datastore.label_upload import DatastoreError
from lib.datastore.pants import IMPORTED_TAG, PanTSDatastore
from lib.datastore.review import _in_share, dice_per_class
from pants_tools.phantom import write_pants_tree

LM = load_labelmap()
LESION = LM.name_to_id["pancreatic_lesion"]
IDS = ["PanTS_00000001", "PanTS_00000002"]  # the first has a lesion
SECRET = "s" * 24


# ---- identity from the front ---------------------------------------------------------------


@pytest.fixture()
def front_secret(tmp_path: Path) -> Iterator[None]:
    (tmp_path / "front.secret").write_text(SECRET + "\n")
    identity.load_front_secret(tmp_path / "front.secret")
    try:
        yield
    finally:
        identity.load_front_secret(None)


def _headers(**h: str) -> list[tuple[bytes, bytes]]:
    names = {"user": b"x-remote-user", "role": b"x-remote-role", "front": b"x-pants-front"}
    return [(names[k], v.encode()) for k, v in h.items()]


def test_front_headers_count_only_with_the_secret(front_secret: None) -> None:
    who = identity.identity_from_headers(_headers(user="carol", role="reviewer", front=SECRET))
    assert who == identity.Identity("carol", "reviewer") and who.reviews
    assert identity.identity_from_headers(_headers(user="carol", role="reviewer", front="x" * 24)) is None
    assert identity.identity_from_headers(_headers(user="carol", role="reviewer")) is None
    assert identity.identity_from_headers(_headers(role="admin", front=SECRET)) is None  # no user
    who = identity.identity_from_headers(_headers(user="bob", role="root", front=SECRET))
    assert who.role == "annotator" and not who.reviews  # an unknown role is the least one


def test_without_a_secret_no_header_is_trusted() -> None:
    identity.load_front_secret(None)
    assert identity.identity_from_headers(_headers(user="carol", role="admin", front=SECRET)) is None


def test_a_short_or_missing_secret_stops_the_server(tmp_path: Path) -> None:
    (tmp_path / "short").write_text("abc")
    with pytest.raises(ConfigError, match="at least 16"):
        identity.load_front_secret(tmp_path / "short")
    with pytest.raises(ConfigError, match="cannot read"):
        identity.load_front_secret(tmp_path / "missing")
    with pytest.raises(ConfigError, match="campaign"):
        AppSettings.from_conf({"campaign": "reveiw"})


def test_review_config_names_unknown_classes() -> None:
    cfg = ReviewConfig.model_validate({"agreement": {"flag_classes": ["pancreatic_tumour"]}})
    with pytest.raises(ConfigError, match="agreement.flag_classes.*pancreatic_tumour"):
        cfg.check_labels(LM)
    assert load_review_config().check_labels(LM).agreement.flag_below_dsc == 0.2


# ---- agreement and sampling ----------------------------------------------------------------


def test_dice_per_class() -> None:
    a = np.zeros((4, 4, 4), np.uint8)
    b = a.copy()
    a[:2], b[:1] = 14, 14  # liver: 32 and 16 voxels, 16 shared
    a[3, 3, 3] = LESION  # only one reader drew a lesion
    d = dice_per_class(a, b, LM.names)
    assert d == {"liver": round(2 * 16 / 48, 4), "pancreatic_lesion": 0.0}  # empty in both: left out


def test_share_of_other_scans_is_stable_and_close_to_the_fraction() -> None:
    ids = [f"PanTS_{k:08d}" for k in range(4000)]
    picked = [i for i in ids if _in_share(i, 0.05)]
    assert 0.04 < len(picked) / len(ids) < 0.06
    assert picked == [i for i in ids if _in_share(i, 0.05)]
    assert not any(_in_share(i, 0.0) for i in ids) and all(_in_share(i, 1.0) for i in ids)


# ---- the datastore -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("review_src") / "PanTS"
    write_pants_tree(root, 2, shape=(40, 40, 32), spacing=(9.25, 9.25, 12.5), seed=3, lesions={0: True, 1: False})
    return root


def _store(tree: Path, tmp_path: Path, campaign: str, other_fraction: float = 0.0, **kw) -> PanTSDatastore:
    root = tmp_path / "PanTS"
    shutil.copytree(tree, root)
    cfg = ReviewConfig.model_validate({"double_reading": {"other_fraction": other_fraction},
                                       "qa": {"required": ["liver"]}})
    return PanTSDatastore(root, review=cfg, campaign=campaign, **kw)


def _save(ds: PanTSDatastore, image_id: str, label: np.ndarray, reader: str, tmp_path: Path, tag: str = "final",
          **params) -> None:
    path = tmp_path / f"{image_id}-{reader}-{tag}.nii.gz"
    nib.save(nib.Nifti1Image(label, nib.load(ds.get_image_uri(image_id)).affine), path)
    ds.save_label(image_id, str(path), tag, {"client_id": reader, **params})


def _pants(ds: PanTSDatastore, image_id: str) -> np.ndarray:
    return np.asarray(nib.load(ds.get_label_uri(image_id, IMPORTED_TAG)).dataobj, np.uint8)


def test_annotate_campaign_records_provenance_and_qa_but_no_readings(tree: Path, tmp_path: Path) -> None:
    ds = _store(tree, tmp_path, "annotate")
    label = _pants(ds, IDS[1])
    _save(ds, IDS[1], label, "reader-a", tmp_path, time_spent_s=12.5)
    info = ds.get_label_info(IDS[1], "final")
    assert info["provenance"] == {"source": "reader", "reader": "reader-a", "reader_from": "client_id", "seconds": 12.5}
    image = ds.get_image_info(IDS[1])
    assert image["qa"]["label"] == "final v1" and "review" not in image
    assert ds.get_label_uri(IDS[1], "original") == ""  # nothing served as original outside a review campaign
    assert "original" not in ds.json()["objects"][IDS[1]]["labels"]
    _save(ds, IDS[1], label, "batch", tmp_path, tag="original")
    assert ds.get_label_info(IDS[1], "original")["provenance"]["source"] == "model"
    # an inference stored by the server names the model version that produced it (a bad name is dropped)
    _save(ds, IDS[1], label, "batch", tmp_path, tag="original", params={"model_version": "v3"})
    assert ds.get_label_info(IDS[1], "original")["provenance"]["model_version"] == "v3"
    _save(ds, IDS[1], label, "batch", tmp_path, tag="original", params={"model_version": "../v3"})
    assert "model_version" not in ds.get_label_info(IDS[1], "original")["provenance"]


def test_front_identity_wins_over_client_id(tree: Path, tmp_path: Path, front_secret: None) -> None:
    ds = _store(tree, tmp_path, "annotate")
    token = identity.REQUEST_IDENTITY.set(identity.Identity("bob", "annotator"))
    try:
        _save(ds, IDS[1], _pants(ds, IDS[1]), "spoofed-client-id", tmp_path)
    finally:
        identity.REQUEST_IDENTITY.reset(token)
    prov = ds.get_label_info(IDS[1], "final")["provenance"]
    assert prov == {"source": "reader", "reader": "bob", "reader_from": "front", "role": "annotator"}


def test_readings_agreement_and_flags(tree: Path, tmp_path: Path) -> None:
    ds = _store(tree, tmp_path, "review")
    lesion_scan, plain = IDS
    pants = _pants(ds, lesion_scan)
    # the best current label is served as original: the imported masks
    assert ds.get_label_info(lesion_scan, "original")["served_from"] == IMPORTED_TAG
    assert np.array_equal(np.asarray(nib.load(ds.get_label_uri(lesion_scan, "original")).dataobj), pants)

    # a scan without a lesion and other_fraction 0: one reading, done
    _save(ds, plain, _pants(ds, plain), "reader-a", tmp_path)
    assert ds.get_image_info(plain)["review"]["phase"] == "done"
    assert ds.get_label_info(plain, "original")["served_from"] == "final"

    # the lesion scan: first reading, then the first reader again (still waiting), then a second reader
    edited = pants.copy()
    edited[edited == LM.name_to_id["spleen"]] = 0
    _save(ds, lesion_scan, edited, "reader-a", tmp_path)
    assert ds.review.row(lesion_scan).phase == "second"
    assert ds.get_label_info(lesion_scan, "original")["served_from"] == IMPORTED_TAG  # not reader A's
    _save(ds, lesion_scan, pants, "reader-a", tmp_path)
    row = ds.review.row(lesion_scan)
    assert (row.phase, row.first_version, row.second_reader) == ("second", 2, None)
    assert ds.review.next_to_review("reader-a", 0.0) is None  # never their own scan for the second reading
    assert ds.review.next_to_review("reader-b", 0.0) == (lesion_scan, "second reading")

    # two second readings race: the one that stores second gets 409, and nothing of it is live
    plan_b = ds.review.before_save(lesion_scan, "final", {"client_id": "reader-b"}, pants)
    _save(ds, lesion_scan, pants, "reader-c", tmp_path)
    assert ds.review.row(lesion_scan).phase == "done"  # agreement 1.0 everywhere
    with pytest.raises(ClientError) as err:
        with ds.index.write() as db:
            ds.review.record(db, plan_b, 99, 0.0)
    assert err.value.status_code == 409
    assert ds.get_label_info(lesion_scan, "final")["version"] == 3
    assert ds.review.row(lesion_scan).agreement is not None
    assert ds.review.row(lesion_scan).as_info()["agreement"]["pancreatic_lesion"] == 1.0


def test_low_lesion_agreement_flags_and_only_a_reviewer_resolves(tree: Path, tmp_path: Path,
                                                                 front_secret: None) -> None:
    ds = _store(tree, tmp_path, "review")
    scan = IDS[0]
    pants = _pants(ds, scan)
    _save(ds, scan, pants, "reader-a", tmp_path)
    no_lesion = pants.copy()
    no_lesion[no_lesion == LESION] = LM.name_to_id["pancreas_head"]
    _save(ds, scan, no_lesion, "reader-b", tmp_path)
    assert ds.review.row(scan).phase == "flagged"
    assert ds.review.next_flagged(0.0) == scan
    assert ds.get_label_info(scan, "original")["served_from"] == "final"
    with pytest.raises(DatastoreError) as err:  # a reader without the role
        _save(ds, scan, pants, "reader-c", tmp_path)
    assert err.value.status_code == 403 and ds.get_label_info(scan, "final")["version"] == 2
    token = identity.REQUEST_IDENTITY.set(identity.Identity("carol", "reviewer"))
    try:
        _save(ds, scan, pants, "ignored", tmp_path)
    finally:
        identity.REQUEST_IDENTITY.reset(token)
    row = ds.review.row(scan)
    assert (row.phase, row.senior_reader, row.senior_version) == ("resolved", "carol", 3)
    assert ds.review.next_flagged(0.0) is None


def test_model_label_is_served_when_nothing_better_exists(tree: Path, tmp_path: Path) -> None:
    ds = _store(tree, tmp_path, "review", hide_imported_labels=True)
    assert ds.get_label_uri(IDS[1], "original") == ""
    _save(ds, IDS[1], _pants(ds.__class__(ds.root, state_dir=tmp_path / "peek"), IDS[1]), "batch-infer", tmp_path,
          tag="original")
    info = ds.get_label_info(IDS[1], "original")
    assert info["served_from"] == "original" and info["provenance"]["source"] == "model"
    assert ds.review.next_to_review("reader-a", 0.0) == (IDS[1], "review")
