"""A MONAI Label datastore over a DICOMweb server (Orthanc, a PACS): ``--studies http://.../dicom-web``.

Images are CT series (image id = SeriesInstanceUID). Labels are DICOM SEG series in the same
server, written here by highdicom (no converter downloaded at run time) with the 28 PanTS
segments' names, colours and SNOMED CT codes, referencing their CT series. A SEG's
ContentLabel gives its tag: ``PANTS`` for masks loaded from PanTS (``scripts/load_pacs.py``),
anything else (``FINAL`` from this server, or a viewer's own) is a ``final`` label.

Everything this datastore keeps lives in one writable folder (``--conf datastore_dir``, default
``~/.cache/pants_label/dicomweb/<hash of the URL>``), so image ids, image info (scores,
strategy timestamps) and label history survive a restart::

    index.sqlite                          series seen, their info; SEG series and what they reference
    dicom/<series>/<sop>.dcm              downloaded CT instances (headers are the SEG's source)
    images/<series>.nii.gz                the CT as NIfTI (what infer and clients read)
    labels/<tag>/<series>/v<N>.nii.gz     every label version saved through the API
    segs/<seg series>.nii.gz              SEG series decoded to the 28-class label map
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset

from lib.core.atomic import staged_dir
from lib.datastore.index import dumps, loads
from lib.datastore.protocol import FINAL_TAG, IMPORTED_TAG, PanTSStore
from lib.imaging.dicom_seg import check_seg_size, label_to_seg, seg_to_label
from lib.imaging.dicom_series import CTStudy, SeriesGeometry, ct_series, read_volume, series_geometry
from lib.datastore.label_upload import DatastoreError, bad_request, check_image_id, check_label, check_tag, read_geometry
from lib.core.labelmap import LabelMap, load_labelmap
from lib.datastore.sqlite_file import SQLiteFile
from lib.imaging.volume_decode import check_client_image
from lib.imaging.volume_io import write_label, write_volume

logger = logging.getLogger(__name__)

#: SEG ContentLabel -> tag; any other ContentLabel counts as ``final``
CONTENT_LABEL_TAGS = {"PANTS": IMPORTED_TAG}
#: QIDO fields kept as image info (and returned by next sample: OHIF needs StudyInstanceUID)
SERIES_FIELDS = (
    "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "Modality", "SeriesDescription", "SeriesNumber",
    "StudyDate", "SeriesDate", "SeriesTime", "InstitutionName", "ContentLabel",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series (
    id     TEXT PRIMARY KEY,            -- SeriesInstanceUID of a CT series
    study  TEXT NOT NULL,
    qido   TEXT NOT NULL DEFAULT '{}',  -- QIDO-RS fields (SERIES_FIELDS)
    info   TEXT NOT NULL DEFAULT '{}',  -- update_image_info: scores, strategy timestamps
    seen   REAL NOT NULL                -- last refresh that listed it
);
CREATE TABLE IF NOT EXISTS segs (
    id      TEXT PRIMARY KEY,           -- SeriesInstanceUID of a SEG series
    study   TEXT NOT NULL,
    ref     TEXT,                       -- the CT series it references (NULL: none we serve)
    tag     TEXT NOT NULL,
    created TEXT NOT NULL               -- SeriesDate + SeriesTime: newest wins
);
CREATE INDEX IF NOT EXISTS segs_ref ON segs (ref, tag, created);
CREATE TABLE IF NOT EXISTS labels (
    image_id TEXT NOT NULL,
    tag      TEXT NOT NULL,
    version  INTEGER NOT NULL,
    path     TEXT NOT NULL,             -- relative to the state folder
    seg      TEXT,                      -- SEG series stored for this version (final only)
    ts       REAL NOT NULL,
    info     TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (image_id, tag, version)
);
"""


def make_client(url: str, username: str = "", password: str = "") -> DICOMwebClient:
    """A DICOMweb client for ``url``; monailabel's subclass tolerates servers that label
    multipart answers loosely."""
    from monailabel.datastore.dicom import DICOMwebClientX

    session = None
    if username and password:
        from dicomweb_client.session_utils import create_session_from_user_pass

        session = create_session_from_user_pass(username, password)
    return DICOMwebClientX(url=url.rstrip("/"), session=session)


def default_state_dir(url: str) -> Path:
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return Path.home() / ".cache" / "pants_label" / "dicomweb" / digest


def _value(item: dict[str, Any], keyword: str) -> str | None:
    """A QIDO JSON attribute's first value as text (PersonName -> Alphabetic)."""
    tag = pydicom.datadict.tag_for_keyword(keyword)
    entry = item.get(f"{tag:08X}") if tag is not None else None
    values = (entry or {}).get("Value") or []
    if not values:
        return None
    v = values[0]
    return str(v.get("Alphabetic", "")) if isinstance(v, dict) else str(v)


def store(client: DICOMwebClient, datasets: Sequence[Dataset]) -> None:
    """STOW-RS ``datasets``; raises ``RuntimeError`` if the server refuses any instance."""
    result = client.store_instances(list(datasets))
    failed = getattr(result, "FailedSOPSequence", None)
    if failed:
        reasons = sorted({str(getattr(f, "FailureReason", "?")) for f in failed})
        raise RuntimeError(f"the DICOMweb server refused {len(failed)} instance(s) (failure reasons {reasons})")


class DICOMwebDatastore(PanTSStore):
    """MONAI Label ``Datastore`` over a DICOMweb server, with DICOM SEG labels.

    Args:
        url: the DICOMweb root (``http://host:port/dicom-web``).
        state_dir: writable folder for the index and caches (see module docstring).
        labelmap: the label map; default ``configs/labels.yaml``.
        max_upload_bytes: largest label upload accepted.
        client: a ready client (tests, authenticated sessions); default :func:`make_client`.
        search_filter: QIDO filter of the CT series served.
        refresh_interval_s: how long a listing of the server is reused before asking again.
    """

    def __init__(
        self,
        url: str,
        *,
        state_dir: str | os.PathLike | None = None,
        labelmap: LabelMap | None = None,
        max_upload_bytes: int = 1 << 30,
        client: DICOMwebClient | None = None,
        search_filter: dict[str, str] | None = None,
        refresh_interval_s: float = 10.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.client = client or make_client(self.url)
        self.lm = labelmap or load_labelmap()
        self.max_upload_bytes = max_upload_bytes
        self.search_filter = dict(search_filter or {"Modality": "CT"})
        self.refresh_interval_s = refresh_interval_s
        self.state_dir = Path(state_dir or default_state_dir(self.url)).expanduser().resolve()
        for sub in ("dicom", "images", "labels", "segs"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        # FULL is SQLite's default and what this index always had; the PanTS index relaxes it only
        # because its label files are fsynced before their rows
        self._sql = SQLiteFile(self.state_dir / "index.sqlite", synchronous="FULL")
        self._db, self._write = self._sql.conn, self._sql.write
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._last_refresh = 0.0
        self._db().executescript(_SCHEMA)  # executescript commits on its own: not inside _write()
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO meta VALUES ('url', ?)", (self.url,))
        self._name = "DICOMweb: " + self.url
        self._description = f"CT series and DICOM SEG labels in {self.url}"
        logger.info(f"DICOMweb datastore {self.url}; state in {self.state_dir}")

    # ---- locks ----------------------------------------------------------------------------------
    def _lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    # ---- listing the server ----------------------------------------------------------------------
    def refresh(self, force: bool = True) -> None:
        """List the CT and SEG series on the server (at most every ``refresh_interval_s`` unless forced)."""
        with self._refresh_lock:
            if not force and time.monotonic() - self._last_refresh < self.refresh_interval_s:
                return
            try:
                cts = self.client.search_for_series(search_filters=self.search_filter, fields=list(SERIES_FIELDS))
                segs = self.client.search_for_series(search_filters={"Modality": "SEG"}, fields=list(SERIES_FIELDS))
            except Exception as err:  # server down: keep serving what the index knows
                logger.warning(f"DICOMweb listing of {self.url} failed: {err}")
                return
            now = time.time()
            with self._write() as db:
                for item in cts:
                    sid, study = _value(item, "SeriesInstanceUID"), _value(item, "StudyInstanceUID")
                    if not sid or not study:
                        continue
                    qido = {k: _value(item, k) for k in SERIES_FIELDS if k != "ContentLabel"}
                    db.execute(
                        "INSERT INTO series (id, study, qido, seen) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT(id) DO UPDATE SET qido = excluded.qido, seen = excluded.seen",
                        (sid, study, dumps(qido), now),
                    )
                known = {r[0] for r in db.execute("SELECT id FROM segs")}
            for item in segs:
                sid, study = _value(item, "SeriesInstanceUID"), _value(item, "StudyInstanceUID")
                if sid and study and sid not in known:
                    self._index_seg(sid, study, item)
            self._last_refresh = time.monotonic()

    def _index_seg(self, seg_uid: str, study: str, qido: dict[str, Any]) -> None:
        """Record which CT series a SEG references (one metadata request per new SEG, ever)."""
        try:
            meta = Dataset.from_json(self.client.retrieve_series_metadata(study, seg_uid)[0])
        except Exception as err:
            logger.warning(f"SEG {seg_uid}: metadata not readable ({err}); ignored")
            return
        ref = None
        if meta.get("ReferencedSeriesSequence"):
            ref = str(meta.ReferencedSeriesSequence[0].SeriesInstanceUID)
        label = str(meta.get("ContentLabel", "") or "").upper()
        created = f"{meta.get('SeriesDate', '') or ''}{meta.get('SeriesTime', '') or ''}"
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO segs VALUES (?, ?, ?, ?, ?)",
                (seg_uid, study, ref, CONTENT_LABEL_TAGS.get(label, FINAL_TAG), created),
            )

    def _fresh(self) -> sqlite3.Connection:
        self.refresh(force=False)
        return self._db()

    # ---- identity -----------------------------------------------------------------------------
    def name(self) -> str:
        return self._name

    def set_name(self, name: str) -> None:
        self._name = name

    def description(self) -> str:
        return self._description

    def set_description(self, description: str) -> None:
        self._description = description

    # ---- images -----------------------------------------------------------------------------------
    def list_images(self) -> list[str]:
        return [r[0] for r in self._fresh().execute("SELECT id FROM series ORDER BY id")]

    def _series_row(self, image_id: str) -> tuple[str, str, str]:
        check_image_id(image_id)
        row = self._db().execute("SELECT study, qido, info FROM series WHERE id = ?", (image_id,)).fetchone()
        if row is None:
            self.refresh(force=True)
            row = self._db().execute("SELECT study, qido, info FROM series WHERE id = ?", (image_id,)).fetchone()
        if row is None:
            raise DatastoreError(404, f"image {image_id!r}: no such CT series in {self.url}")
        return row

    def _series_dir(self, image_id: str) -> Path:
        return self.state_dir / "dicom" / image_id

    def _image_path(self, image_id: str) -> Path:
        return self.state_dir / "images" / f"{image_id}.nii.gz"

    def _download_series(self, study: str, series: str, folder: Path) -> None:
        with staged_dir(folder) as tmp:
            for ds in self.client.retrieve_series(study, series):
                ds.save_as(str(tmp / f"{ds.SOPInstanceUID}.dcm"), write_like_original=False)

    def series_geometry(self, image_id: str, with_pixels: bool = False) -> SeriesGeometry:
        """The CT series' instances (downloaded once) sorted into a volume grid."""
        study = self._series_row(image_id)[0]
        folder = self._series_dir(image_id)
        with self._lock(f"dicom:{image_id}"):
            if not folder.is_dir():
                self._download_series(study, image_id, folder)
        datasets = [pydicom.dcmread(str(f), stop_before_pixels=not with_pixels) for f in sorted(folder.glob("*.dcm"))]
        return series_geometry(datasets)

    def get_image_uri(self, image_id: str) -> str:
        """The CT as NIfTI, downloaded and converted on first use (then served from the cache)."""
        path = self._image_path(image_id)
        if path.is_file():
            return str(path)
        self._series_row(image_id)
        with self._lock(f"image:{image_id}"):
            if not path.is_file():
                t = time.perf_counter()
                geom = self.series_geometry(image_id, with_pixels=True)
                write_volume(read_volume(geom), geom.affine, path)
                logger.info(f"image {image_id}: {geom.shape} from DICOMweb in {time.perf_counter() - t:.2f} s")
        return str(path)

    def get_image(self, image_id: str, params: Any = None) -> Any:
        return Path(self.get_image_uri(image_id)).read_bytes()

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        try:
            study, qido, info = self._series_row(image_id)
        except DatastoreError:
            return {}
        out = {**loads(qido), **loads(info), "StudyInstanceUID": study, "SeriesInstanceUID": image_id}
        path = self._image_path(image_id)
        if path.is_file():
            out["path"] = str(path)
        return out

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        self._series_row(image_id)
        with self._write() as db:
            row = db.execute("SELECT info FROM series WHERE id = ?", (image_id,)).fetchone()
            db.execute("UPDATE series SET info = ? WHERE id = ?", (dumps({**loads(row[0]), **info}), image_id))

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """Store an uploaded NIfTI CT in the server as a new CT series; returns its SeriesInstanceUID."""
        from lib.imaging.dicom_series import stable_uid
        from lib.imaging.volume_io import load_volume

        check_client_image(image_filename, "uploaded image")
        try:
            vol = load_volume(image_filename)
        except ValueError as err:
            raise DatastoreError(422, str(err)) from None
        patient = check_image_id(image_id or Path(image_filename).name.split(".")[0])
        study = CTStudy(patient_id=patient, study_uid=stable_uid(patient, "study"),
                        series_uid=stable_uid(patient, "ct", str(time.time())))
        store(self.client, ct_series(vol.array, vol.affine, study))
        self.refresh(force=True)
        if image_info:
            self.update_image_info(study.series_uid, dict(image_info))
        return study.series_uid

    def remove_image(self, image_id: str) -> None:
        raise bad_request("images live in the PACS: remove the series there (the next listing drops it)")

    # ---- labels: which images have them --------------------------------------------------------
    def _tags(self, label_tag: str | None) -> tuple[str, ...]:
        return (label_tag,) if label_tag else (FINAL_TAG, IMPORTED_TAG)

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        tags = self._tags(label_tag)
        q = ",".join("?" * len(tags))
        db = self._fresh()
        ids = {r[0] for r in db.execute(
            f"SELECT DISTINCT s.id FROM series s JOIN segs g ON g.ref = s.id WHERE g.tag IN ({q})", tags)}
        ids |= {r[0] for r in db.execute(f"SELECT DISTINCT image_id FROM labels WHERE tag IN ({q})", tags)}
        return sorted(ids)

    def get_unlabeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        labeled = set(self.get_labeled_images(label_tag, labels))
        return [i for i in self.list_images() if i not in labeled]

    def sample_random_unlabeled(
        self, strategy: str = "random", label_tag: str | None = None, rng: np.random.Generator | None = None
    ) -> dict[str, Any] | None:
        """MONAI Label's ``Random`` choice (unlabeled series weighted by seconds since this strategy
        served them) in one query; a uniform pick when all were served this second (where
        ``Random`` itself fails on zero weights).

        Returns:
            ``{"id": ..., "weight": ...}`` or None when every series is labeled.
        """
        rng = rng or np.random.default_rng()
        unlabeled = set(self.get_unlabeled_images(label_tag))
        rows = [(sid, loads(info).get("strategy", {}).get(strategy, {}).get("ts", 0))
                for sid, info in self._db().execute("SELECT id, info FROM series ORDER BY id") if sid in unlabeled]
        if not rows:
            return None
        now = time.time()
        weights = np.clip(np.array([now - float(ts or 0) for _, ts in rows]), 0, None)
        total = weights.sum()
        k = int(rng.choice(len(rows), p=weights / total)) if total > 0 else int(rng.integers(len(rows)))
        return {"id": rows[k][0], "weight": int(weights[k])}

    # ---- labels: reading ------------------------------------------------------------------------
    def _latest_seg(self, image_id: str, tag: str) -> str | None:
        row = self._fresh().execute(
            "SELECT id FROM segs WHERE ref = ? AND tag = ? ORDER BY created DESC, rowid DESC LIMIT 1", (image_id, tag)
        ).fetchone()
        return row[0] if row else None

    def _latest_local(self, image_id: str, tag: str) -> tuple | None:
        return self._db().execute(
            "SELECT version, path, seg, ts, info FROM labels WHERE image_id = ? AND tag = ? "
            "ORDER BY version DESC LIMIT 1", (image_id, tag)
        ).fetchone()

    def _decode_seg(self, image_id: str, seg_uid: str) -> Path:
        """The SEG series as a label map on the CT's grid (decoded once per SEG)."""
        out = self.state_dir / "segs" / f"{seg_uid}.nii.gz"
        if out.is_file():
            return out
        with self._lock(f"seg:{seg_uid}"):
            if not out.is_file():
                study = self._series_row(image_id)[0]
                geom = self.series_geometry(image_id)
                try:  # sizes from the metadata first: the pixel data is fetched only if they fit
                    check_seg_size(Dataset.from_json(self.client.retrieve_series_metadata(study, seg_uid)[0]), geom)
                except ValueError as err:
                    raise DatastoreError(422, f"SEG series {seg_uid}: {err}") from None
                seg_ds = self.client.retrieve_series(study, seg_uid)
                if len(seg_ds) != 1:
                    raise DatastoreError(502, f"SEG series {seg_uid} holds {len(seg_ds)} instances; expected 1")
                try:
                    label = seg_to_label(seg_ds[0], geom, self.lm)
                except ValueError as err:
                    raise DatastoreError(422, f"SEG series {seg_uid}: {err}") from None
                write_label(label, geom.affine, out)
        return out

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """The newest label of ``label_tag`` for image ``label_id``: a SEG in the server or,
        for tags kept only here (``original``), the newest local version. '' if none."""
        image_id = check_image_id(label_id, "label")
        tag = check_tag(label_tag or FINAL_TAG)
        local = self._latest_local(image_id, tag)
        if tag in (FINAL_TAG, IMPORTED_TAG):
            seg = self._latest_seg(image_id, tag)
            if seg and not (local is not None and self._local_is_newer(local, seg)):
                return str(self._decode_seg(image_id, seg))
        return str(self.state_dir / local[1]) if local else ""

    def _local_is_newer(self, local: tuple, seg_uid: str) -> bool:
        """A version saved here whose SEG the server refused (502) is newer than every SEG made
        before it: it is served from here until a newer SEG appears."""
        if local[2] is not None:  # its SEG was stored: the SEG listing serves it (or a newer one)
            return False
        row = self._db().execute("SELECT created FROM segs WHERE id = ?", (seg_uid,)).fetchone()
        saved = time.strftime("%Y%m%d%H%M%S", time.localtime(float(local[3])))
        return row is None or str(row[0])[:14] <= saved

    def get_label(self, label_id: str, label_tag: str, params: Any = None) -> Any:
        uri = self.get_label_uri(label_id, label_tag)
        return Path(uri).read_bytes() if uri else None

    def get_labels_by_image_id(self, image_id: str) -> dict[str, str]:
        out = {}
        for tag in (FINAL_TAG, IMPORTED_TAG, DefaultLabelTag.ORIGINAL.value):
            uri = self.get_label_uri(image_id, tag)
            if uri:
                out[tag] = image_id
        return out

    def get_label_by_image_id(self, image_id: str, tag: str) -> str:
        return image_id if self.get_label_uri(image_id, tag) else ""

    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]:
        tag = check_tag(label_tag or FINAL_TAG)
        local = self._latest_local(check_image_id(label_id, "label"), tag)
        info = {**loads(local[4]), "version": local[0], "ts": local[3]} if local else {}
        seg = self._latest_seg(label_id, tag) if tag in (FINAL_TAG, IMPORTED_TAG) else None
        if seg:
            info["SeriesInstanceUID"] = seg
        return info

    def stored_label_files(self) -> set[Path]:
        """Every label file a row of the index points at (start-up recovery keeps these)."""
        return {self.state_dir / p for (p,) in self._db().execute("SELECT path FROM labels")}

    # ---- labels: writing -------------------------------------------------------------------------
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Check an uploaded label, keep it as a new local version and, for ``final``, store it
        in the server as a DICOM SEG over the image's CT series.

        Refusals raise :class:`DatastoreError` (HTTP 4xx naming the problem) and store nothing.
        If the server refuses the SEG (HTTP 502), the checked label stays here as a version.
        """
        image_id = check_image_id(image_id)
        tag = check_tag(label_tag or FINAL_TAG)
        if tag == IMPORTED_TAG:
            raise bad_request(f"tag {tag!r} is reserved for masks loaded from PanTS; use 'final'")
        params = dict(label_info or {})
        image = read_geometry(self.get_image_uri(image_id))
        checked = check_label(label_filename, image, self.lm, params.get("label_info"), self.max_upload_bytes)
        with self._lock(f"label:{image_id}:{tag}"):
            row = self._db().execute(
                "SELECT COALESCE(MAX(version), 0) FROM labels WHERE image_id = ? AND tag = ?", (image_id, tag)
            ).fetchone()
            version = int(row[0]) + 1
            rel = Path("labels") / tag / image_id / f"v{version}.nii.gz"
            write_label(checked.array, image.affine, self.state_dir / rel)
            info = {**params, "counts": checked.counts, "named_by": checked.source}
            seg_uid, error = None, None
            if tag == FINAL_TAG:
                try:
                    seg_uid = self._store_seg(image_id, checked.array, image.affine, params)
                except Exception as err:
                    error = f"{type(err).__name__}: {err}"
                    info["pacs_error"] = error
            with self._write() as db:
                db.execute(
                    "INSERT INTO labels VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (image_id, tag, version, str(rel), seg_uid, time.time(), dumps(info)),
                )
        if error:
            raise DatastoreError(502, f"label kept here as version {version}, but the DICOMweb server did "
                                      f"not store its SEG: {error}")
        logger.info(f"saved {tag} label v{version} for {image_id}" + (f" as SEG {seg_uid}" if seg_uid else ""))
        return image_id

    def _store_seg(self, image_id: str, label: np.ndarray, affine: np.ndarray, params: dict[str, Any]) -> str:
        geom = self.series_geometry(image_id)
        creator = str(params.get("client_id") or params.get("user") or "") or None
        seg = label_to_seg(label, affine, geom, lm=self.lm, content_label="FINAL",
                           description="PanTS final label (MONAI Label)",
                           creator=f"{creator}^" if creator and "^" not in creator else creator)
        store(self.client, [seg])
        # Record it now: the next listing would find it, but next sample must see it at once.
        study = self._series_row(image_id)[0]
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO segs VALUES (?, ?, ?, ?, ?)",
                       (str(seg.SeriesInstanceUID), study, image_id, FINAL_TAG,
                        f"{seg.SeriesDate}{seg.SeriesTime}"))
        return str(seg.SeriesInstanceUID)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        raise bad_request("labels are DICOM SEG series in the PACS: remove the SEG series there")

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        tag = check_tag(label_tag or FINAL_TAG)
        local = self._latest_local(check_image_id(label_id, "label"), tag)
        if local is None:
            raise DatastoreError(404, f"no {tag!r} label saved here for image {label_id!r}")
        with self._write() as db:
            db.execute("UPDATE labels SET info = ? WHERE image_id = ? AND tag = ? AND version = ?",
                       (dumps({**loads(local[4]), **info}), label_id, tag, local[0]))

    # ---- lists for training and clients --------------------------------------------------------
    def final_labels_since(self, mark: int) -> tuple[int, int]:
        # No append-only history here: the cursor is the number of scans with a final label.
        total = len(self.get_labeled_images(FINAL_TAG))
        return max(0, total - mark), total

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        """Labeled images for training (``final`` preferred over ``pants``); downloads what it needs."""
        out = []
        final = set(self.get_labeled_images(FINAL_TAG))
        for image_id in self.get_labeled_images():
            tag = FINAL_TAG if image_id in final else IMPORTED_TAG
            label = self.get_label_uri(image_id, tag)
            if label:
                out.append({"image": self.get_image_uri(image_id), "label": label})
        return out

    def status(self) -> dict[str, Any]:
        tags = {t: len(self.get_labeled_images(t)) for t in (FINAL_TAG, IMPORTED_TAG)}
        return {"total": len(self.list_images()), "completed": len(self.get_labeled_images()), "label_tags": tags}

    def json(self) -> dict[str, Any]:
        db = self._fresh()
        labeled: dict[str, dict[str, Any]] = {}
        for ref, tag in db.execute("SELECT DISTINCT ref, tag FROM segs WHERE ref IS NOT NULL"):
            labeled.setdefault(ref, {})[tag] = {"info": {}}
        objects = {}
        for sid, study, qido, info in db.execute("SELECT id, study, qido, info FROM series ORDER BY id"):
            objects[sid] = {"image": {"info": {**loads(qido), **loads(info), "StudyInstanceUID": study}},
                            "labels": labeled.get(sid, {})}
        return {"name": self._name, "description": self._description, "objects": objects}

    def get_dataset_archive(self, limit_cases: int | None) -> str:
        raise DatastoreError(501, "dataset archives are not built over DICOMweb; export from the PACS")

    def close(self) -> None:
        self._sql.close()


__all__ = ["DICOMwebDatastore", "make_client", "store", "default_state_dir", "IMPORTED_TAG", "FINAL_TAG"]
