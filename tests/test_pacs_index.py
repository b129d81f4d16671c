"""The DICOMweb index without a server: labelled = a version here or a SEG on the PACS, the
migration of a version-1 state folder, and case metadata from DICOM attributes."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from lib.datastore.index import Unlabeled, loads
from lib.datastore.pacs_index import PACS_SPLIT, PacsIndex, migrate_v1
from lib.datastore.protocol import FINAL_TAG, IMPORTED_TAG, TRAINING_TAGS
from lib.imaging.dicom_meta import age_from_dicom, case_from_dicom, phase_from_dicom

# the schema version 1 of the DICOMweb datastore kept in index.sqlite
V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE series (id TEXT PRIMARY KEY, study TEXT NOT NULL, qido TEXT NOT NULL DEFAULT '{}',
    info TEXT NOT NULL DEFAULT '{}', seen REAL NOT NULL);
CREATE TABLE segs (id TEXT PRIMARY KEY, study TEXT NOT NULL, ref TEXT, tag TEXT NOT NULL, created TEXT NOT NULL);
CREATE TABLE labels (image_id TEXT NOT NULL, tag TEXT NOT NULL, version INTEGER NOT NULL, path TEXT NOT NULL,
    seg TEXT, ts REAL NOT NULL, info TEXT NOT NULL DEFAULT '{}', PRIMARY KEY (image_id, tag, version));
"""


def _path(sid: str) -> str:
    return f"@state/images/{sid}.nii.gz"


def _index(tmp_path: Path) -> PacsIndex:
    idx = PacsIndex(tmp_path / "pacs_index.sqlite")
    rows = [(f"1.2.{k}", {"study": f"9.{k}", "qido": {}, "case": {}}) for k in range(4)]
    idx.upsert_series(rows, _path, 1.0)
    return idx


def _unlabeled(idx: PacsIndex, tags=TRAINING_TAGS) -> list[str]:
    return idx.labeled_ids((PACS_SPLIT,), tags, IMPORTED_TAG, False, False)


def test_a_seg_or_a_saved_version_makes_a_series_labelled(tmp_path: Path) -> None:
    idx = _index(tmp_path)
    assert _unlabeled(idx) == ["1.2.0", "1.2.1", "1.2.2", "1.2.3"]
    idx.put_seg("5.0", "9.0", "1.2.0", IMPORTED_TAG, "20260101120000")  # PanTS masks loaded as a SEG
    idx.put_seg("5.9", "9.9", None, FINAL_TAG, "20260101120000")  # references nothing served
    with idx.write() as db:
        idx.insert_label(db, "1.2.1", FINAL_TAG, 1, "labels/final/1.2.1/v1.nii.gz", "upload", 2.0, {})
        idx.insert_label(db, "1.2.2", "original", 1, "labels/original/1.2.2/v1.nii.gz", "upload", 2.0, {})
    assert _unlabeled(idx) == ["1.2.2", "1.2.3"]  # an inference result is no label
    assert _unlabeled(idx, (FINAL_TAG,)) == ["1.2.0", "1.2.2", "1.2.3"]
    assert idx.latest_seg("1.2.0", IMPORTED_TAG) == "5.0"
    # the hybrid strategy's references and the random draw see the same sets
    idx.store_scores([{"image_id": i, "model_version": "m", "uncertainty": 0.5, "lesion_prob": 0.1,
                       "priority": 0.5, "grp": "a|venous", "embedding": None, "ts": 1.0} for i in
                      ("1.2.0", "1.2.1", "1.2.2")], "al_scores")
    assert sorted(r[0] for r in idx.labelled_scores(TRAINING_TAGS, IMPORTED_TAG, False, 10)) == ["1.2.0", "1.2.1"]
    scans = Unlabeled((PACS_SPLIT,), TRAINING_TAGS, IMPORTED_TAG, False, None)
    assert sorted(r[0] for r in idx.unlabeled_with_value(scans, "$.x")) == ["1.2.2", "1.2.3"]
    assert [r.image_id for r in idx.top_scored("priority", (PACS_SPLIT,), TRAINING_TAGS, IMPORTED_TAG, False, 5.0, 5)] == ["1.2.2"]


def test_a_new_seg_moves_the_change_counters(tmp_path: Path) -> None:
    idx = _index(tmp_path)
    before = idx.change_count("references"), idx.change_count("listing")
    idx.put_seg("5.1", "9.1", "1.2.1", FINAL_TAG, "20260101120000")
    after = idx.change_count("references"), idx.change_count("listing")
    assert after[0] > before[0] and after[1] > before[1]


def test_refresh_keeps_header_metadata_and_does_not_rewrite_unchanged_series(tmp_path: Path) -> None:
    idx = _index(tmp_path)
    idx.set_header_metadata("1.2.0", {"age": 54.0, "sex": "F"})
    count = idx.change_count("listing")
    idx.upsert_series([("1.2.0", {"study": "9.0", "qido": {}, "case": {}})], _path, 2.0)
    assert idx.change_count("listing") == count  # nothing changed: the cached listing stays valid
    idx.upsert_series([("1.2.0", {"study": "9.0", "qido": {"SeriesDescription": "CT"}, "case": {}})], _path, 3.0)
    meta = loads(idx.image_row("1.2.0").meta)
    assert meta["headers"] == {"age": 54.0, "sex": "F"} and meta["qido"] == {"SeriesDescription": "CT"}


def test_version_1_state_is_migrated_once_with_every_label_version(tmp_path: Path) -> None:
    old = tmp_path / "index.sqlite"
    db = sqlite3.connect(old)
    db.executescript(V1_SCHEMA)
    db.execute("INSERT INTO series VALUES ('1.2.0', '9.0', '{\"InstitutionName\": \"c1\"}', '{\"epistemic\": 0.5}', 1.0)")
    db.execute("INSERT INTO series VALUES ('1.2.1', '9.1', '{}', '{}', 1.0)")
    db.execute("INSERT INTO segs VALUES ('5.0', '9.0', '1.2.0', 'final', '20260101120000')")
    db.execute("INSERT INTO labels VALUES ('1.2.0', 'final', 1, 'labels/final/1.2.0/v1.nii.gz', '5.0', 10.0, '{}')")
    db.execute("INSERT INTO labels VALUES ('1.2.0', 'final', 2, 'labels/final/1.2.0/v2.nii.gz', NULL, 20.0, "
               "'{\"pacs_error\": \"refused\"}')")
    db.commit()
    db.close()
    new = tmp_path / "pacs_index.sqlite"
    assert migrate_v1(old, new, _path)
    assert not old.exists() and (tmp_path / "index.sqlite.v1").is_file()
    assert not migrate_v1(old, new, _path)  # once
    idx = PacsIndex(new)
    assert idx.image_ids((PACS_SPLIT,)) == ["1.2.0", "1.2.1"]
    assert loads(idx.image_row("1.2.0").info) == {"epistemic": 0.5}
    versions = idx.label_versions("1.2.0", FINAL_TAG)
    assert [v[0] for v in versions] == [1, 2] and loads(versions[0].info) == {"seg": "5.0"}
    assert idx.current_label("1.2.0", FINAL_TAG).version == 2
    assert idx.latest_seg("1.2.0", FINAL_TAG) == "5.0"
    assert _unlabeled(idx) == ["1.2.1"]


@pytest.mark.parametrize(
    "description, agent, phase",
    [
        ("CT venous phase", "IV contrast", "venous"),  # what PanTS's loader writes
        ("CT arterial phase", "IV contrast", "arterial"),
        ("CT non-contrast", None, "non-contrast"),
        ("ABD PORTAL VENOUS 2.5mm", "Omnipaque", "venous"),
        ("Abdomen ART 1.0 B30f", "Omnipaque", "arterial"),
        ("DELAYED 5 min", "Iodine", "delayed"),
        ("Abdomen plain 5mm", None, "non-contrast"),
        ("Abdomen 5mm", "Omnipaque", None),  # contrast given, phase not named: unknown
        ("Abdomen 5mm", None, "non-contrast"),
        (None, None, None),
    ],
)
def test_phase_from_series_description(description, agent, phase) -> None:
    assert phase_from_dicom(description, agent) == phase


def test_case_metadata_from_dicom_attributes() -> None:
    assert age_from_dicom("058Y") == 58 and age_from_dicom("006M") == 0.5 and age_from_dicom("abc") is None
    case = case_from_dicom({"InstitutionName": "Center A ", "SeriesDescription": "CT venous phase",
                            "PatientAge": "061Y", "PatientSex": "m"}, (0.8, 0.8, 2.5))
    assert case == {"center": "Center A", "contrast_phase": "venous", "age": 61.0, "sex": "M",
                    "spacing": [0.8, 0.8, 2.5]}
