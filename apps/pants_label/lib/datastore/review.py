"""Review campaigns over a labelled root: readings, double reading, agreement, senior review, QA.

A *review campaign* (``--conf campaign review``) serves scans that already have a label, as
PanTS ran its own review: readers correct the best current label, a share of scans gets a
second, independent reading, the two readings' per-class DSC is stored, and low lesion
agreement flags the scan for a senior reviewer. In any campaign, every label version records
its provenance (:mod:`lib.datastore.provenance`) and every save is checked against the
annotation standard (:mod:`lib.qa`).

State lives in the index, table ``review`` (one row per scan once it has been read)::

    phase          second (waits for its second reading) | flagged (readers disagree: senior
                   review) | done (read; no second reading, or the two agree) | resolved (a
                   senior reviewer's label is final)
    start_*        the label the first reading started from (the second reader starts from it too)
    first_*, second_*, senior_*   reader, ``final`` version and time of each reading
    agreement      JSON ``{class: DSC}`` between the two readings

Which label 3D Slicer opens: its module loads only the listing's ``original`` label into the
editor. In a review campaign ``original`` is therefore *served* as the scan's best current
label (the reader's ``final``, else the imported PanTS masks, else the model's ``original``;
for a scan waiting for its second reading, the label the first reader started from). Nothing
is copied: the index keeps every label under its true tag and provenance, and
``served_from`` in the label info says which one is shown.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from lib.core.errors import ClientError
from lib.core.identity import current_identity
from lib.core.review_config import ReviewConfig
from lib.datastore import provenance
from lib.datastore.index import dumps
from lib.datastore.protocol import FINAL_TAG, IMPORTED_TAG
from lib.qa import qa_info

if TYPE_CHECKING:
    import sqlite3

    from lib.datastore.pants import PanTSDatastore

logger = logging.getLogger(__name__)

MODEL_TAG = provenance.MODEL_TAG
CAMPAIGNS = ("annotate", "review")
PHASES = ("second", "flagged", "done", "resolved")
#: best current label, in order (the reader's, the imported masks, the model's)
BEST_ORDER = (FINAL_TAG, IMPORTED_TAG, MODEL_TAG)

SCHEMA = provenance.SCHEMA + """
CREATE TABLE IF NOT EXISTS review (
    image_id       TEXT PRIMARY KEY,
    phase          TEXT NOT NULL,
    start_tag      TEXT,
    start_version  INTEGER,
    first_reader   TEXT NOT NULL,
    first_version  INTEGER NOT NULL,
    first_ts       REAL NOT NULL,
    double_read    INTEGER NOT NULL,
    second_reader  TEXT,
    second_version INTEGER,
    second_ts      REAL,
    agreement      TEXT,
    senior_reader  TEXT,
    senior_version INTEGER,
    senior_ts      REAL
);
CREATE INDEX IF NOT EXISTS review_phase ON review (phase);
"""
#: a change of review state changes the listing (served ``original``, image info ``review``)
_TRIGGERS = [
    f"CREATE TRIGGER IF NOT EXISTS listing_review_{event.lower()} AFTER {event} ON review "
    "BEGIN UPDATE changes SET n = n + 1 WHERE name = 'listing'; END"
    for event in ("INSERT", "UPDATE", "DELETE")
]
_REVIEW_COLUMNS = (
    "image_id, phase, start_tag, start_version, first_reader, first_version, first_ts, double_read, "
    "second_reader, second_version, second_ts, agreement, senior_reader, senior_version, senior_ts"
)


@dataclass
class ReviewRow:
    image_id: str
    phase: str
    start_tag: str | None
    start_version: int | None
    first_reader: str
    first_version: int
    first_ts: float
    double_read: int
    second_reader: str | None = None
    second_version: int | None = None
    second_ts: float | None = None
    agreement: str | None = None
    senior_reader: str | None = None
    senior_version: int | None = None
    senior_ts: float | None = None

    def as_info(self) -> dict[str, Any]:
        """Image info ``review``: phase, readers and agreement."""
        out: dict[str, Any] = {"phase": self.phase, "double_read": bool(self.double_read),
                               "first_reader": self.first_reader}
        if self.second_reader:
            out["second_reader"] = self.second_reader
        if self.agreement:
            out["agreement"] = json.loads(self.agreement)
        if self.senior_reader:
            out["senior_reader"] = self.senior_reader
        return out


@dataclass
class SavePlan:
    """What saving one label means for the campaign, decided before it is stored."""

    image_id: str
    tag: str
    prov: provenance.Provenance
    kind: str | None = None  # first | first_again | second | senior | None (no reading)
    phase: str | None = None  # the phase the scan was in
    start: tuple[str, int | None] | None = None
    double_read: bool = False
    agreement: dict[str, float] = field(default_factory=dict)
    flagged: bool = False


def reader_name(prov: provenance.Provenance) -> str:
    return prov.reader or "anonymous"


def dice_per_class(a: np.ndarray, b: np.ndarray, names: list[str]) -> dict[str, float]:
    """DSC of every class present in either map (classes both leave empty are left out)."""
    n = len(names) + 1
    ca = np.bincount(a.ravel(), minlength=n)[:n]
    cb = np.bincount(b.ravel(), minlength=n)[:n]
    same = a == b
    both = np.bincount(a[same].ravel(), minlength=n)[:n]
    out = {}
    for k, name in enumerate(names, start=1):
        total = int(ca[k]) + int(cb[k])
        if total:
            out[name] = round(2.0 * int(both[k]) / total, 4)
    return out


def _in_share(image_id: str, fraction: float) -> bool:
    """A stable pseudo-random ``fraction`` of scan ids (the same after every restart)."""
    h = int(hashlib.sha1(image_id.encode()).hexdigest()[:8], 16)
    return h / 2**32 < fraction


class ReviewLayer:
    """The campaign's bookkeeping for one PanTS datastore (see the module docstring).

    Args:
        ds: the datastore (its index holds the tables).
        cfg: ``configs/review.yaml``.
        campaign: ``annotate`` (provenance and QA only) or ``review``.
    """

    def __init__(self, ds: "PanTSDatastore", cfg: ReviewConfig, campaign: str = "annotate") -> None:
        if campaign not in CAMPAIGNS:
            from lib.core.errors import ConfigError, unknown

            raise ConfigError(unknown("campaign", campaign, CAMPAIGNS))
        self.ds = ds
        self.cfg = cfg.check_labels(ds.lm)
        self.campaign = campaign
        self._create_schema()

    @property
    def reviewing(self) -> bool:
        return self.campaign == "review"

    def _create_schema(self) -> None:
        with self.ds.index.write() as db:
            for stmt in re.sub(r"--[^\n]*", "", SCHEMA).split(";"):
                if stmt.strip():
                    db.execute(stmt)
            for stmt in _TRIGGERS:
                db.execute(stmt)

    # ---- review rows --------------------------------------------------------------------------
    def row(self, image_id: str, conn: "sqlite3.Connection | None" = None) -> ReviewRow | None:
        c = conn or self.ds.index.conn()
        r = c.execute(f"SELECT {_REVIEW_COLUMNS} FROM review WHERE image_id = ?", (image_id,)).fetchone()
        return ReviewRow(*r) if r else None

    def rows(self) -> dict[str, ReviewRow]:
        return {r[0]: ReviewRow(*r) for r in self.ds.index.conn().execute(f"SELECT {_REVIEW_COLUMNS} FROM review")}

    # ---- the best current label ---------------------------------------------------------------
    def best_label(self, image_id: str, row: ReviewRow | None = None) -> tuple[str, int | None] | None:
        """``(tag, version)`` of the label a reader should start from (version None: the imported masks)."""
        row = row if row is not None else self.row(image_id)
        if row is not None and row.phase == "second":
            return (row.start_tag, row.start_version) if row.start_tag else None
        for tag in BEST_ORDER:
            if tag == IMPORTED_TAG:
                r = self.ds._row(image_id)
                if r is not None and self.ds._imported_visible(r):
                    return (IMPORTED_TAG, None)
                continue
            cur = self.ds.index.current_label(image_id, tag)
            if cur is not None:
                return (tag, int(cur[0]))
        return None

    def label_path(self, image_id: str, tag: str, version: int | None) -> str:
        if tag == IMPORTED_TAG:
            path = self.ds.consolidate_imported(image_id)
            return str(path) if path else ""
        return self.ds.get_label_version_uri(image_id, tag, int(version or 0))

    def served_original_uri(self, image_id: str) -> str | None:
        """In a review campaign, the file served as ``original`` (``""`` if none); else None."""
        if not self.reviewing:
            return None
        best = self.best_label(image_id)
        return self.label_path(image_id, *best) if best else ""

    def served_original_info(self, image_id: str) -> dict[str, Any] | None:
        if not self.reviewing:
            return None
        best = self.best_label(image_id)
        if best is None:
            return {}
        tag, version = best
        if tag == IMPORTED_TAG:
            info = self.ds.get_label_info(image_id, IMPORTED_TAG)
            prov = provenance.imported()
        else:
            info = next((dict(v["info"], version=version, ts=int(v["ts"]))
                         for v in self.ds.label_versions(image_id, tag) if v["version"] == version), {})
            prov = provenance.of_version(self.ds.index.conn(), image_id, tag, int(version or 0))
        return {**info, "served_from": tag, **({"provenance": prov.as_info()} if prov else {})}

    # ---- saving -------------------------------------------------------------------------------
    def before_save(self, image_id: str, tag: str, params: dict[str, Any], array: np.ndarray) -> SavePlan:
        """Provenance of the upload and what it means for the campaign; refusals before anything is stored.

        Raises:
            ClientError: 400 for a bad ``time_spent_s``; 403 when a scan flagged for senior
                review gets a ``final`` from someone without the reviewer role.
        """
        plan = SavePlan(image_id, tag, provenance.for_upload(tag, params))
        if not (self.reviewing and tag == FINAL_TAG):
            return plan
        row = self.row(image_id)
        me = reader_name(plan.prov)
        plan.phase = row.phase if row else None
        if row is None:
            plan.kind = "first"
            plan.start = self.best_label(image_id)
            plan.double_read = self._wants_second_reading(image_id, array)
        elif row.phase == "second":
            if me == row.first_reader:
                plan.kind = "first_again"
            else:
                plan.kind = "second"
                first = np.asarray(nib.load(self.label_path(image_id, FINAL_TAG, row.first_version)).dataobj, np.uint8)
                plan.agreement = dice_per_class(first, array, self.ds.lm.names)
                ag = self.cfg.agreement
                plan.flagged = any(plan.agreement.get(c, 1.0) < ag.flag_below_dsc for c in ag.flag_classes)
        elif row.phase == "flagged":
            who = current_identity()
            if who is None or not who.reviews:
                raise ClientError(
                    403,
                    f"scan {image_id!r} is flagged for senior review (its two readings disagree); only a user "
                    "with the reviewer role may save its final label",
                )
            plan.kind = "senior"
        return plan

    def _wants_second_reading(self, image_id: str, array: np.ndarray) -> bool:
        dr = self.cfg.double_reading
        if dr.tumour_positive:
            lesion = self.ds.lm.name_to_id["pancreatic_lesion"]
            if bool((array == lesion).any()) or self.ds.get_metadata(image_id).get("tumor") is True:
                return True
        return _in_share(image_id, dr.other_fraction)

    def record(self, db: "sqlite3.Connection", plan: SavePlan, version: int, ts: float) -> None:
        """Inside the write transaction storing the version: provenance and the reading.

        Raises:
            ClientError: 409 when another save moved the scan's review on since :meth:`before_save`.
        """
        provenance.record(db, plan.image_id, plan.tag, version, plan.prov, ts)
        if plan.kind is None:
            return
        me = reader_name(plan.prov)
        if plan.kind == "first":
            start_tag, start_version = plan.start or (None, None)
            cur = db.execute(
                "INSERT INTO review (image_id, phase, start_tag, start_version, first_reader, first_version, "
                "first_ts, double_read) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(image_id) DO NOTHING",
                (plan.image_id, "second" if plan.double_read else "done", start_tag, start_version, me, version,
                 ts, int(plan.double_read)),
            )
        elif plan.kind == "first_again":
            cur = db.execute(
                "UPDATE review SET first_version = ?, first_ts = ? WHERE image_id = ? AND phase = 'second'",
                (version, ts, plan.image_id),
            )
        elif plan.kind == "second":
            cur = db.execute(
                "UPDATE review SET phase = ?, second_reader = ?, second_version = ?, second_ts = ?, agreement = ? "
                "WHERE image_id = ? AND phase = 'second'",
                ("flagged" if plan.flagged else "done", me, version, ts, dumps(plan.agreement), plan.image_id),
            )
        else:  # senior
            cur = db.execute(
                "UPDATE review SET phase = 'resolved', senior_reader = ?, senior_version = ?, senior_ts = ? "
                "WHERE image_id = ? AND phase = 'flagged'",
                (me, version, ts, plan.image_id),
            )
        if cur.rowcount != 1:
            raise ClientError(409, f"scan {plan.image_id!r}: its review moved on while this label was sent; "
                                   "ask for the next sample again")

    def after_save(self, plan: SavePlan, version: int, array: np.ndarray, affine: np.ndarray) -> None:
        """The QA checks of the stored version, into image info ``qa``."""
        self.check_label(plan.image_id, array, affine, f"{plan.tag} v{version}")
        if plan.kind:
            logger.info("review %s: %s reading by %s%s", plan.image_id, plan.kind, reader_name(plan.prov),
                        f", agreement {plan.agreement}" if plan.agreement else "")

    # ---- QA -----------------------------------------------------------------------------------
    def check_label(self, image_id: str, array: np.ndarray, affine: np.ndarray, what: str) -> dict[str, Any]:
        result = qa_info(array, affine, self.ds.lm, self.cfg.qa, what, time.time())
        self.ds.update_image_info(image_id, {"qa": result})
        return result

    def check_imported(self, stop: threading.Event | None = None) -> int:
        """QA of every visible imported label not checked yet (a review campaign's start); returns how many."""
        done = 0
        for image_id in self.ds.get_labeled_images(IMPORTED_TAG):
            if stop is not None and stop.is_set():
                break
            if "qa" in self.ds.get_image_info(image_id):
                continue
            try:
                path = self.ds.get_label_uri(image_id, IMPORTED_TAG)
                img = nib.load(path)
                self.check_label(image_id, np.asarray(img.dataobj, np.uint8), img.affine, IMPORTED_TAG)
                done += 1
            except Exception:  # noqa: BLE001 - one bad mask folder must not stop the others
                logger.exception("QA of the imported masks of %s failed", image_id)
        return done

    def start_import_checks(self) -> threading.Thread | None:
        if not (self.reviewing and self.cfg.qa.run_on_import):
            return None
        t = threading.Thread(target=self.check_imported, name="pants-qa-import", daemon=True)
        t.start()
        return t

    # ---- listing ------------------------------------------------------------------------------
    def decorate(self, objects: dict[str, dict[str, Any]]) -> None:
        """Add ``review`` to image info and, in a review campaign, the best current label as
        ``original`` (one query, not one per scan). Provenance stays out of the listing: it would
        double the rebuild after every save at 36k scans; label info and the report carry it."""
        reviews = self.rows()
        for image_id, obj in objects.items():
            labs = obj["labels"]
            row = reviews.get(image_id)
            if row is not None:
                obj["image"]["info"]["review"] = row.as_info()
            if not self.reviewing:
                continue
            if row is not None and row.phase == "second":
                if row.start_tag:
                    labs[MODEL_TAG] = {"ext": ".nii.gz", "info": {"served_from": row.start_tag,
                                                                  "version": row.start_version}}
                else:
                    labs.pop(MODEL_TAG, None)
                continue
            src = next((t for t in BEST_ORDER if t in labs), None)
            if src is not None:
                labs[MODEL_TAG] = {"ext": ".nii.gz", "info": {**labs[src]["info"], "served_from": src}}

    # ---- next samples -------------------------------------------------------------------------
    def next_to_review(self, reader: str, now: float) -> tuple[str, str] | None:
        """``(scan, why)``: a labelled, unleased scan without a review, or waiting for a second
        reading by someone other than ``reader``; QA-flagged scans first, then second readings."""
        where, args = self.ds.index._label_filter(BEST_ORDER, IMPORTED_TAG, self.ds.hide_imported, True)
        splits = self.ds.served_splits
        q = (
            "SELECT i.id, r.phase, COALESCE(json_extract(i.info, '$.qa.errors'), 0) AS qa FROM images i "
            "LEFT JOIN review r ON r.image_id = i.id "
            f"WHERE i.removed = 0 AND i.split IN ({', '.join('?' * len(splits))}) AND {where} "
            "AND (r.image_id IS NULL OR (r.phase = 'second' AND r.first_reader != ?)) "
            "AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.image_id = i.id AND l.expires > ?) "
            "ORDER BY qa > 0 DESC, r.phase IS NOT NULL DESC, i.id LIMIT 1"
        )
        hit = self.ds.index.conn().execute(q, (*splits, *args, reader, now)).fetchone()
        if hit is None:
            return None
        why = "second reading" if hit[1] == "second" else "review"
        return hit[0], (f"{why}, QA-flagged" if hit[2] else why)

    def next_flagged(self, now: float) -> str | None:
        """The oldest flagged, unleased scan (senior review)."""
        q = (
            "SELECT r.image_id FROM review r JOIN images i ON i.id = r.image_id WHERE r.phase = 'flagged' "
            "AND i.removed = 0 AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.image_id = r.image_id "
            "AND l.expires > ?) ORDER BY r.second_ts LIMIT 1"
        )
        hit = self.ds.index.conn().execute(q, (now,)).fetchone()
        return hit[0] if hit else None


__all__ = ["CAMPAIGNS", "PHASES", "ReviewLayer", "ReviewRow", "SavePlan", "dice_per_class", "reader_name"]
