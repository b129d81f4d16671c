"""The datastore's embedded SQLite index: images, label versions per tag, image info, metadata.

One database file (WAL mode) is shared by the server, a training subprocess and a scoring
subprocess. Each thread and each process gets its own connection; every write is one short
``BEGIN IMMEDIATE`` transaction, so writers queue on SQLite's lock (``busy_timeout``) instead
of failing, and readers never block writers.

Tables:
    meta      key/value pairs (name, description, root, metadata file signature)
    images    one row per scan: split, paths, mask folder, metadata and info as JSON
    labels    every label version ever stored (history); ``path`` NULL marks a removal
    current   the live version per (image, tag); a row exists only when a label is live
    imported  the consolidation cache of the PanTS per-structure masks (tag ``pants``)
    scores    active-learning scores per scan and the model version that produced them
    leases    scans handed to an annotator: withheld from other next-sample requests until expiry
    changes   counters bumped by triggers, so caches can tell cheaply whether a set they hold moved
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lib.core.errors import unknown
from lib.datastore.rows import ImageRow, ImportedRow, LabelRow, LeaseRow, ScanState, ScoreRef, ScoreRow, factory
from lib.datastore.sqlite_file import SQLiteFile

logger = logging.getLogger(__name__)

# 2: scores, leases (added tables only; a version-1 index upgrades in place)
# 3: scores.class_scores (added column; an older index gains it in place, its rows hold NULL)
SCHEMA_VERSION = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id        TEXT PRIMARY KEY,
    split     TEXT NOT NULL,               -- train | test | flat | added
    path      TEXT NOT NULL,               -- image file, '@root/...' or '@state/...'
    mask_dir  TEXT,                        -- PanTS segmentations folder ('@root/...'), NULL if none
    removed   INTEGER NOT NULL DEFAULT 0,  -- removed through the API; kept so refresh will not re-add
    revealed  INTEGER NOT NULL DEFAULT 0,  -- imported masks revealed while hide_imported_labels is on
    meta      TEXT,                        -- JSON of the metadata file's row
    info      TEXT NOT NULL DEFAULT '{}',  -- JSON written by update_image_info (scores, strategy ts)
    added_ts  REAL NOT NULL
);
-- covering index: the unlabeled/labeled queries never touch the (large) rows
CREATE INDEX IF NOT EXISTS images_served ON images (split, removed, id, mask_dir, revealed);
CREATE TABLE IF NOT EXISTS labels (
    image_id  TEXT NOT NULL,
    tag       TEXT NOT NULL,
    version   INTEGER NOT NULL,
    path      TEXT,                        -- NULL: the label was removed at this version
    origin    TEXT NOT NULL,               -- upload | import
    ts        REAL NOT NULL,
    info      TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (image_id, tag, version)
);
CREATE TABLE IF NOT EXISTS current (
    image_id  TEXT NOT NULL,
    tag       TEXT NOT NULL,
    version   INTEGER NOT NULL,
    PRIMARY KEY (image_id, tag)
);
CREATE INDEX IF NOT EXISTS current_tag ON current (tag, image_id);
CREATE TABLE IF NOT EXISTS imported (
    image_id  TEXT PRIMARY KEY,
    signature TEXT,                        -- masks' names, sizes and mtimes when the cache was built
    path      TEXT,                        -- consolidated cache file ('@state/...')
    ts        REAL,
    info      TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS images_revealed ON images (revealed) WHERE revealed = 1;
CREATE TABLE IF NOT EXISTS scores (
    image_id      TEXT PRIMARY KEY,
    model_version TEXT NOT NULL,
    uncertainty   REAL NOT NULL,           -- class-stratified predictive entropy
    lesion_prob   REAL NOT NULL,           -- predicted probability that the scan has a lesion
    priority      REAL NOT NULL,           -- hybrid base score (uncertainty and lesion probability)
    grp           TEXT,                    -- center | contrast phase, for balance
    embedding     BLOB,                    -- float16 unit vector, for diversity
    ts            REAL NOT NULL,
    class_scores  BLOB                     -- float32 per foreground class (clasp strategy), NULL if unknown
);
CREATE INDEX IF NOT EXISTS scores_uncertainty ON scores (uncertainty);
CREATE INDEX IF NOT EXISTS scores_lesion ON scores (lesion_prob);
CREATE INDEX IF NOT EXISTS scores_priority ON scores (priority);
CREATE INDEX IF NOT EXISTS scores_grp ON scores (grp);
CREATE TABLE IF NOT EXISTS leases (
    image_id  TEXT PRIMARY KEY,
    client_id TEXT NOT NULL,
    strategy  TEXT NOT NULL,
    ts        REAL NOT NULL,
    expires   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_expires ON leases (expires);
CREATE TABLE IF NOT EXISTS changes (name TEXT PRIMARY KEY, n INTEGER NOT NULL);
INSERT OR IGNORE INTO changes (name, n) VALUES ('references', 0);
INSERT OR IGNORE INTO changes (name, n) VALUES ('listing', 0);
"""

#: Triggers (bodies hold ';', so kept apart from the schema split on ';'). ``references`` counts
#: every change that can move the labelled scans' scores, groups or embeddings (diversity and
#: balance references of the hybrid strategy): live labels, mask visibility, scores. Leases are
#: left out on purpose: they change on every next-sample call and are read live.
_TRIGGERS = [
    f"CREATE TRIGGER IF NOT EXISTS changes_{name} AFTER {event} ON {table} "
    "BEGIN UPDATE changes SET n = n + 1 WHERE name = 'references'; END"
    for name, event, table in (
        ("current_ins", "INSERT", "current"),
        ("current_upd", "UPDATE", "current"),
        ("current_del", "DELETE", "current"),
        ("scores_ins", "INSERT", "scores"),
        ("scores_upd", "UPDATE", "scores"),
        ("scores_del", "DELETE", "scores"),
        ("images_ins", "INSERT", "images"),
        ("images_upd", "UPDATE OF split, mask_dir, removed, revealed", "images"),
        ("images_del", "DELETE", "images"),
    )
] + [
    # ``listing`` counts every change to what ``GET /datastore/?output=all`` shows (images and
    # their info, live labels and their info, name/description): the cached listing is rebuilt
    # when it moved, whichever process committed the change.
    f"CREATE TRIGGER IF NOT EXISTS listing_{table}_{event.lower()} AFTER {event} ON {table} "
    "BEGIN UPDATE changes SET n = n + 1 WHERE name = 'listing'; END"
    for table in ("images", "current", "labels", "meta")
    for event in ("INSERT", "UPDATE", "DELETE")
]

_IMAGE_COLUMNS = "id, split, path, mask_dir, removed, revealed, meta, info, added_ts"

#: score columns a strategy may rank by
SCORE_COLUMNS = ("uncertainty", "lesion_prob", "priority")


def _json_default(obj: Any) -> Any:
    """JSON for numpy scalars/arrays that scores often are (``default=str`` would quote them)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def dumps(obj: Any) -> str:
    return json.dumps(obj, default=_json_default, separators=(",", ":"))


def loads(text: str | None) -> dict[str, Any]:
    return json.loads(text) if text else {}


class Index(SQLiteFile):
    """Connections and SQL for one index file.

    Args:
        path: the SQLite file (created with its schema when missing).
        busy_timeout_s: how long a writer waits for another process's transaction.
    """

    def __init__(self, path: Path, busy_timeout_s: float = 60.0) -> None:
        # Label files are fsynced before their row is committed, so NORMAL (the default) is enough.
        super().__init__(path, busy_timeout_s)
        self._create_schema()

    def _create_schema(self) -> None:
        with self.write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path}: index schema version {version} is newer than this code ({SCHEMA_VERSION})"
                )
            schema = re.sub(r"--[^\n]*", "", _SCHEMA)  # comments may hold ';'
            for stmt in schema.split(";"):
                if stmt.strip():
                    db.execute(stmt)
            columns = {r[1] for r in db.execute("PRAGMA table_info(scores)")}
            if "class_scores" not in columns:  # a version-2 index: scores kept, the new column NULL
                db.execute("ALTER TABLE scores ADD COLUMN class_scores BLOB")
            for stmt in [*_TRIGGERS, *self.extra_schema()]:
                db.execute(stmt)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def extra_schema(self) -> list[str]:
        """Statements a backend's index adds to the shared schema (tables, indexes, triggers)."""
        return []

    # ---- meta --------------------------------------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.conn().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str, db: sqlite3.Connection | None = None) -> None:
        sql = "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value"
        if db is not None:
            db.execute(sql, (key, value))
        else:
            with self.write() as w:
                w.execute(sql, (key, value))

    def set_meta_many(self, items: dict[str, str]) -> None:
        with self.write() as db:
            for key, value in items.items():
                self.set_meta(key, value, db)

    # ---- images ------------------------------------------------------------------------------
    def apply_scan(self, changes: "ScanChanges", now: float) -> None:
        """Apply what a folder scan found, in one transaction. Vanished scans get ``removed = 2``
        (kept with their history; back to 0 when they return); API removals are ``removed = 1``."""
        with self.write() as db:
            db.executemany(
                "INSERT INTO images (id, split, path, mask_dir, added_ts) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO NOTHING",
                ((i, s, r, m, now) for i, s, r, m in changes.new),
            )
            db.executemany("UPDATE images SET split = ?, path = ?, mask_dir = ? WHERE id = ?", changes.moved)
            db.executemany("UPDATE images SET removed = 2 WHERE id = ? AND removed = 0", ((i,) for i in changes.missing))
            db.executemany("UPDATE images SET removed = 0 WHERE id = ? AND removed = 2", ((i,) for i in changes.back))

    def add_uploaded_image(self, image_id: str, path: str, now: float, info: dict[str, Any]) -> None:
        """An image uploaded through the API (split ``added``); replaces a removed one of that id."""
        with self.write() as db:
            db.execute(
                "INSERT INTO images (id, split, path, added_ts, info) VALUES (?, 'added', ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET split = 'added', path = excluded.path, removed = 0, "
                "info = excluded.info, mask_dir = NULL",
                (image_id, path, now, dumps(info)),
            )

    def mark_removed(self, image_id: str) -> None:
        with self.write() as db:
            db.execute("UPDATE images SET removed = 1 WHERE id = ?", (image_id,))

    def all_image_ids(self) -> set[str]:
        """Every image id the index has ever held (removed ones too)."""
        return {r[0] for r in self.conn().execute("SELECT id FROM images")}

    def set_metadata(self, rows: dict[str, dict[str, Any]], signature: str) -> None:
        """Store metadata rows ``{id: metadata}`` and the signature of the file they came from."""
        with self.write() as db:
            db.executemany("UPDATE images SET meta = ? WHERE id = ?", ((dumps(m), i) for i, m in rows.items()))
            self.set_meta("metadata_signature", signature, db)

    def metadata_rows(self, splits: Sequence[str]) -> dict[str, dict[str, Any]]:
        """``{id: metadata}`` of the live images in ``splits``, one query."""
        q = f"SELECT id, meta FROM images WHERE removed = 0 AND split IN ({_marks(splits)})"
        return {i: loads(m) for i, m in self.conn().execute(q, tuple(splits))}

    def _rows(self, record: type, sql: str, args: Sequence[Any] = (), db: sqlite3.Connection | None = None) -> sqlite3.Cursor:
        """A cursor over ``sql`` whose rows are ``record`` named tuples."""
        cur = (db or self.conn()).cursor()
        cur.row_factory = factory(record)
        return cur.execute(sql, tuple(args))

    def image_row(self, image_id: str) -> ImageRow | None:
        return self._rows(ImageRow, f"SELECT {_IMAGE_COLUMNS} FROM images WHERE id = ?", (image_id,)).fetchone()

    def scan_state(self, splits: Sequence[str]) -> dict[str, ScanState]:
        """``{id: ScanState}`` for the given splits (what refresh diffs against)."""
        q = f"SELECT id, split, path, mask_dir, removed FROM images WHERE split IN ({_marks(splits)})"
        return {r[0]: ScanState(*r[1:]) for r in self.conn().execute(q, tuple(splits))}

    def image_ids(self, splits: Sequence[str]) -> list[str]:
        q = f"SELECT id FROM images WHERE removed = 0 AND split IN ({_marks(splits)}) ORDER BY id"
        return [r[0] for r in self.conn().execute(q, tuple(splits))]

    def _label_filter(
        self, tags: Sequence[str], imported_tag: str, hide_imported: bool, labeled: bool
    ) -> tuple[str, list[Any]]:
        """SQL condition on ``images i``: has (``labeled``) or lacks a live label under any of ``tags``."""
        conds, args = self._live_label_conditions(tags, imported_tag, hide_imported)
        has = " OR ".join(conds) if conds else "0"
        return (f"({has})" if labeled else f"NOT ({has})"), args

    def _live_label_conditions(
        self, tags: Sequence[str], imported_tag: str, hide_imported: bool
    ) -> tuple[list[str], list[Any]]:
        """The ways an image ``i`` can hold a live label of ``tags``: conditions ORed together.

        The imported tag has no rows in ``current``: it is live when the image has a mask folder
        and its masks are visible (not hidden, or revealed, or in the test split). A backend with
        labels kept elsewhere (DICOM SEG series) adds its own condition in a subclass.
        """
        real = [t for t in tags if t != imported_tag]
        conds = []
        args: list[Any] = []
        if real:
            conds.append(
                f"EXISTS (SELECT 1 FROM current c WHERE c.image_id = i.id AND c.tag IN ({_marks(real)}))"
            )
            args.extend(real)
        if imported_tag in tags:
            conds.append("(i.mask_dir IS NOT NULL AND (? = 0 OR i.revealed = 1 OR i.split = 'test'))")
            args.append(int(hide_imported))
        return conds, args

    def labeled_ids(
        self, splits: Sequence[str], tags: Sequence[str], imported_tag: str, hide_imported: bool, labeled: bool
    ) -> list[str]:
        """Ids of images in ``splits`` that have (``labeled``) or lack a live label under ``tags``."""
        where, args = self._label_filter(tags, imported_tag, hide_imported, labeled)
        q = (
            f"SELECT i.id FROM images i WHERE i.removed = 0 AND i.split IN ({_marks(splits)}) AND {where} "
            "ORDER BY i.id"
        )
        return [r[0] for r in self.conn().execute(q, (*splits, *args))]

    def count_per_split(self, splits: Sequence[str]) -> dict[str, int]:
        """``{split: number of live images}`` over ``splits`` (splits without images left out)."""
        q = f"SELECT split, COUNT(*) FROM images WHERE removed = 0 AND split IN ({_marks(splits)}) GROUP BY split"
        return dict(self.conn().execute(q, tuple(splits)).fetchall())

    def count_labeled_ids(
        self, splits: Sequence[str], tags: Sequence[str], imported_tag: str, hide_imported: bool
    ) -> int:
        where, args = self._label_filter(tags, imported_tag, hide_imported, True)
        q = f"SELECT COUNT(*) FROM images i WHERE i.removed = 0 AND i.split IN ({_marks(splits)}) AND {where}"
        return int(self.conn().execute(q, (*splits, *args)).fetchone()[0])

    def image_rows(self, splits: Sequence[str]) -> list[ImageRow]:
        """Full rows (with metadata) of the images in ``splits``."""
        q = f"SELECT {_IMAGE_COLUMNS} FROM images WHERE removed = 0 AND split IN ({_marks(splits)}) ORDER BY id"
        return list(self._rows(ImageRow, q, splits))

    def unlabeled_with_value(self, scans: "Unlabeled", json_path: str) -> list[tuple[str, Any]]:
        """``[(id, info at json_path)]`` of the ``scans`` (one query; next-sample strategies)."""
        where, args = self._served_unlabeled(scans)
        q = f"SELECT i.id, json_extract(i.info, ?) FROM images i WHERE {where}"
        return list(self.conn().execute(q, (json_path, *args)))

    def rowid_range(self) -> tuple[int, int] | None:
        # Two sub-selects: SQLite answers a lone MIN or MAX from the b-tree's ends, but a
        # query with both scans the whole table (~8 ms at 36k scans).
        row = self.conn().execute(
            "SELECT (SELECT MIN(rowid) FROM images), (SELECT MAX(rowid) FROM images)"
        ).fetchone()
        return None if row[0] is None else (int(row[0]), int(row[1]))

    def probe_unlabeled(self, rowid: int, scans: "Unlabeled", json_path: str) -> tuple[str, Any] | None:
        """``(id, info at json_path)`` if the image at ``rowid`` is one of the ``scans``, else None."""
        where, args = self._served_unlabeled(scans)
        q = f"SELECT i.id, json_extract(i.info, ?) FROM images i WHERE i.rowid = ? AND {where}"
        return self.conn().execute(q, (json_path, rowid, *args)).fetchone()

    def _served_unlabeled(self, scans: "Unlabeled") -> tuple[str, list[Any]]:
        """WHERE clause (on ``images i``) and its arguments: live, in the splits, unlabeled, unleased."""
        where, args = self._label_filter(scans.tags, scans.imported_tag, scans.hide_imported, False)
        where, args = _and_unleased(where, args, scans.unleased_at)
        return f"i.removed = 0 AND i.split IN ({_marks(scans.splits)}) AND {where}", [*scans.splits, *args]

    def count_labeled(self, splits: Sequence[str], imported_tag: str, hide_imported: bool) -> dict[str, int]:
        """Live labels per tag over the given splits (``status()``)."""
        c = self.conn()
        q = (
            "SELECT c.tag, COUNT(*) FROM current c JOIN images i ON i.id = c.image_id "
            f"WHERE i.removed = 0 AND i.split IN ({_marks(splits)}) GROUP BY c.tag"
        )
        out = {tag: n for tag, n in c.execute(q, tuple(splits))}
        q = (
            "SELECT COUNT(*) FROM images i WHERE i.removed = 0 AND i.mask_dir IS NOT NULL "
            f"AND (? = 0 OR i.revealed = 1 OR i.split = 'test') AND i.split IN ({_marks(splits)})"
        )
        n = c.execute(q, (int(hide_imported), *splits)).fetchone()[0]
        if n:
            out[imported_tag] = n
        return out

    def update_info(self, updates: dict[str, dict[str, Any]]) -> list[str]:
        """Merge ``{id: info}`` into each image's info (top-level keys, like ``dict.update``).

        Read-modify-write inside one IMMEDIATE transaction, so concurrent writers in other
        processes never lose each other's keys. Returns the ids that do not exist.
        """
        missing = []
        with self.write() as db:
            for image_id, info in updates.items():
                row = db.execute("SELECT info FROM images WHERE id = ?", (image_id,)).fetchone()
                if row is None:
                    missing.append(image_id)
                    continue
                merged = loads(row[0])
                merged.update(info)
                db.execute("UPDATE images SET info = ? WHERE id = ?", (dumps(merged), image_id))
        return missing

    # ---- labels ------------------------------------------------------------------------------
    def current_label(self, image_id: str, tag: str) -> LabelRow | None:
        """The live label version of (image, tag), or None."""
        q = (
            "SELECT l.version, l.path, l.origin, l.ts, l.info FROM current c JOIN labels l "
            "ON l.image_id = c.image_id AND l.tag = c.tag AND l.version = c.version WHERE c.image_id = ? AND c.tag = ?"
        )
        return self._rows(LabelRow, q, (image_id, tag)).fetchone()

    def current_tag_pairs(self) -> list[tuple[str, str]]:
        """``(image id, tag)`` of every live label."""
        return list(self.conn().execute("SELECT image_id, tag FROM current"))

    def current_tags(self, image_id: str) -> list[str]:
        return [r[0] for r in self.conn().execute("SELECT tag FROM current WHERE image_id = ?", (image_id,))]

    def label_paths(self) -> list[str]:
        """Stored paths of every label version (removals have none)."""
        return [p for (p,) in self.conn().execute("SELECT path FROM labels WHERE path IS NOT NULL")]

    def label_versions(self, image_id: str, tag: str) -> list[LabelRow]:
        q = "SELECT version, path, origin, ts, info FROM labels WHERE image_id = ? AND tag = ? ORDER BY version"
        return list(self._rows(LabelRow, q, (image_id, tag)))

    def imported_label_files(self) -> dict[tuple[str, str], str | None]:
        """``{(image, tag): path}`` of the version-0 labels (files found in the dataset folder)."""
        q = "SELECT image_id, tag, path FROM labels WHERE version = 0"
        return {(r[0], r[1]): r[2] for r in self.conn().execute(q)}

    def drop_imported_label_files(self, db: sqlite3.Connection, keys: Iterable[tuple[str, str]]) -> None:
        """Inside a write transaction: forget version-0 labels whose file left the dataset folder."""
        for image_id, tag in keys:
            db.execute("DELETE FROM labels WHERE image_id = ? AND tag = ? AND version = 0", (image_id, tag))
            db.execute("DELETE FROM current WHERE image_id = ? AND tag = ? AND version = 0", (image_id, tag))

    def remove_current_label(self, image_id: str, tag: str, now: float) -> bool:
        """End the live label of (image, tag) with a removal entry in its history; False if none is live."""
        with self.write() as db:
            if db.execute("SELECT 1 FROM current WHERE image_id = ? AND tag = ?", (image_id, tag)).fetchone() is None:
                return False
            self.insert_label(db, image_id, tag, self.next_version(db, image_id, tag), None, "remove", now, {})
        return True

    def next_version(self, db: sqlite3.Connection, image_id: str, tag: str) -> int:
        """Inside a write transaction: the version number the next label of (image, tag) gets."""
        row = db.execute(
            "SELECT COALESCE(MAX(version), 0) FROM labels WHERE image_id = ? AND tag = ?", (image_id, tag)
        ).fetchone()
        return int(row[0]) + 1

    def insert_label(
        self,
        db: sqlite3.Connection,
        image_id: str,
        tag: str,
        version: int,
        path: str | None,
        origin: str,
        ts: float,
        info: dict[str, Any],
    ) -> None:
        db.execute(
            "INSERT INTO labels (image_id, tag, version, path, origin, ts, info) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (image_id, tag, version, path, origin, ts, dumps(info)),
        )
        if path is None:
            db.execute("DELETE FROM current WHERE image_id = ? AND tag = ?", (image_id, tag))
        else:
            db.execute(
                "INSERT INTO current (image_id, tag, version) VALUES (?, ?, ?) "
                "ON CONFLICT(image_id, tag) DO UPDATE SET version = excluded.version",
                (image_id, tag, version),
            )

    def update_label_info(self, image_id: str, tag: str, info: dict[str, Any]) -> bool:
        with self.write() as db:
            row = db.execute(
                "SELECT l.version, l.info FROM current c JOIN labels l ON l.image_id = c.image_id "
                "AND l.tag = c.tag AND l.version = c.version WHERE c.image_id = ? AND c.tag = ?",
                (image_id, tag),
            ).fetchone()
            if row is None:
                return False
            merged = loads(row[1])
            merged.update(info)
            db.execute(
                "UPDATE labels SET info = ? WHERE image_id = ? AND tag = ? AND version = ?",
                (dumps(merged), image_id, tag, row[0]),
            )
        return True

    def listing(self, splits: Sequence[str]) -> tuple[int, list[ImageRow], list[tuple]]:
        """The ``listing`` change count, every served image row (without metadata) and every live
        label, one snapshot, for ``json()``."""
        with self.read() as db:
            changes = db.execute("SELECT n FROM changes WHERE name = 'listing'").fetchone()[0]
            images = list(self._rows(
                ImageRow,
                "SELECT id, split, path, mask_dir, removed, revealed, NULL, info, added_ts FROM images "
                f"WHERE removed = 0 AND split IN ({_marks(splits)}) ORDER BY id",
                splits, db,
            ))
            labels = list(
                db.execute(
                    "SELECT c.image_id, c.tag, l.version, l.ts, l.info FROM current c JOIN labels l "
                    "ON l.image_id = c.image_id AND l.tag = c.tag AND l.version = c.version"
                )
            )
        return changes, images, labels

    def info_values(self, key: str, splits: Sequence[str]) -> dict[str, Any]:
        """``{id: info[key]}`` over served images, one query (strategies ranking 36k scans by a score)."""
        q = (
            "SELECT id, json_extract(info, ?) FROM images "
            f"WHERE removed = 0 AND split IN ({_marks(splits)}) AND json_extract(info, ?) IS NOT NULL"
        )
        path = "$." + json.dumps(key)
        out: dict[str, Any] = {}
        for image_id, value in self.conn().execute(q, (path, *splits, path)):
            out[image_id] = json.loads(value) if isinstance(value, str) and value[:1] in "[{" else value
        return out

    # ---- active learning: scores and leases ----------------------------------------------------
    def store_scores(self, rows: Sequence[dict[str, Any]], info_key: str) -> list[str]:
        """Upsert score rows and merge each one's summary into image info under ``info_key``.

        Each row: ``image_id, model_version, uncertainty, lesion_prob, priority, grp, embedding
        (bytes or None), ts, info (dict for image info)`` and optionally ``class_scores`` (bytes).
        One transaction. Returns unknown ids.
        """
        missing = []
        with self.write() as db:
            for r in rows:
                got = db.execute("SELECT info FROM images WHERE id = ?", (r["image_id"],)).fetchone()
                if got is None:
                    missing.append(r["image_id"])
                    continue
                db.execute(
                    "INSERT INTO scores (image_id, model_version, uncertainty, lesion_prob, priority, grp, embedding, ts, "
                    "class_scores) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(image_id) DO UPDATE SET "
                    "model_version = excluded.model_version, uncertainty = excluded.uncertainty, "
                    "lesion_prob = excluded.lesion_prob, priority = excluded.priority, grp = excluded.grp, "
                    "embedding = excluded.embedding, ts = excluded.ts, class_scores = excluded.class_scores",
                    (r["image_id"], r["model_version"], float(r["uncertainty"]), float(r["lesion_prob"]),
                     float(r["priority"]), r.get("grp"), r.get("embedding"), float(r["ts"]), r.get("class_scores")),
                )
                merged = loads(got[0])
                merged[info_key] = r.get("info", {})
                db.execute("UPDATE images SET info = ? WHERE id = ?", (dumps(merged), r["image_id"]))
        return missing

    def score_versions(self, image_ids: Sequence[str]) -> dict[str, str]:
        """``{id: model_version}`` of the given scans that have a score."""
        out: dict[str, str] = {}
        ids = list(image_ids)
        for k in range(0, len(ids), 500):
            part = ids[k : k + 500]
            q = f"SELECT image_id, model_version FROM scores WHERE image_id IN ({_marks(part)})"
            out.update(dict(self.conn().execute(q, tuple(part))))
        return out

    def final_labels_since(self, tag: str, mark: int) -> tuple[int, int]:
        """Scans with a ``tag`` upload in history rows after ``mark``, and the newest row id."""
        with self.read() as db:
            top = db.execute("SELECT COALESCE(MAX(rowid), 0) FROM labels").fetchone()[0]
            n = db.execute(
                "SELECT COUNT(DISTINCT image_id) FROM labels WHERE tag = ? AND path IS NOT NULL AND origin = 'upload'"
                " AND rowid > ? AND rowid <= ?",
                (tag, mark, top),
            ).fetchone()[0]
        return int(n), int(top)

    def count_scores(self, model_version: str | None = None) -> int:
        if model_version is None:
            return int(self.conn().execute("SELECT COUNT(*) FROM scores").fetchone()[0])
        q = "SELECT COUNT(*) FROM scores WHERE model_version = ?"
        return int(self.conn().execute(q, (model_version,)).fetchone()[0])

    def top_scored(
        self,
        column: str,
        splits: Sequence[str],
        tags: Sequence[str],
        imported_tag: str,
        hide_imported: bool,
        now: float,
        limit: int,
    ) -> list[ScoreRow]:
        """Unlabeled, unleased served scans with the highest ``column`` score, best first.

        The walk follows the score's index, so the cost depends on ``limit``, not the pool size.
        """
        if column not in SCORE_COLUMNS:
            raise ValueError(unknown("score column", column, SCORE_COLUMNS))
        where, args = self._label_filter(tags, imported_tag, hide_imported, False)
        where, args = _and_unleased(where, args, now)
        q = (
            "SELECT s.image_id, s.model_version, s.uncertainty, s.lesion_prob, s.priority, s.grp, s.embedding "
            f"FROM scores s INDEXED BY scores_{'lesion' if column == 'lesion_prob' else column} "
            "JOIN images i ON i.id = s.image_id "
            f"WHERE i.removed = 0 AND i.split IN ({_marks(splits)}) AND {where} "
            f"ORDER BY s.{column} DESC LIMIT ?"
        )
        return list(self._rows(ScoreRow, q, (*splits, *args, int(limit))))

    def unlabeled_class_scores(
        self, splits: Sequence[str], tags: Sequence[str], imported_tag: str, hide_imported: bool
    ) -> list[tuple[str, float, bytes | None]]:
        """``(id, uncertainty, class_scores)`` of every scored, unlabeled served scan (leases ignored:
        callers cache this per change counter and drop leased scans live)."""
        where, args = self._label_filter(tags, imported_tag, hide_imported, False)
        q = (
            "SELECT s.image_id, s.uncertainty, s.class_scores FROM scores s JOIN images i ON i.id = s.image_id "
            f"WHERE i.removed = 0 AND i.split IN ({_marks(splits)}) AND {where} ORDER BY s.image_id"
        )
        return list(self.conn().execute(q, (*splits, *args)))

    def count_labeled_scans(self, splits: Sequence[str], tags: Sequence[str], imported_tag: str, hide_imported: bool) -> int:
        """Served scans with a live label of ``tags`` (imported masks count when visible)."""
        where, args = self._label_filter(tags, imported_tag, hide_imported, True)
        q = f"SELECT COUNT(*) FROM images i WHERE i.removed = 0 AND i.split IN ({_marks(splits)}) AND {where}"
        return int(self.conn().execute(q, (*splits, *args)).fetchone()[0])

    def change_count(self, name: str = "references") -> int:
        """A counter the triggers bump on every change that matters to ``name`` (cache key)."""
        row = self.conn().execute("SELECT n FROM changes WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def labelled_scores(
        self, tags: Sequence[str], imported_tag: str, hide_imported: bool, limit: int
    ) -> list[ScoreRef]:
        """Scored scans with a live label (imported masks if visible).

        Built from the small sets (live labels, revealed scans), not a pass over the pool.
        """
        parts, args = self._labelled_id_sets(tags, imported_tag, hide_imported)
        if not parts:
            return []
        q = (
            f"SELECT s.image_id, s.grp, s.embedding FROM ({' UNION '.join(parts)}) r "
            "JOIN scores s ON s.image_id = r.id LIMIT ?"
        )
        return list(self._rows(ScoreRef, q, (*args, int(limit))))

    def _labelled_id_sets(
        self, tags: Sequence[str], imported_tag: str, hide_imported: bool
    ) -> tuple[list[str], list[Any]]:
        """``SELECT ... AS id`` queries whose union is the images with a live label of ``tags``
        (the set form of :meth:`_live_label_conditions`)."""
        real = [t for t in tags if t != imported_tag]
        parts, args = [], []
        if real:
            parts.append(f"SELECT image_id AS id FROM current WHERE tag IN ({_marks(real)})")
            args.extend(real)
        if imported_tag in tags:
            if hide_imported:
                parts.append("SELECT id FROM images WHERE revealed = 1 AND mask_dir IS NOT NULL")
            else:
                parts.append("SELECT id FROM images WHERE mask_dir IS NOT NULL")
        return parts, args

    def leased_scores(self, now: float) -> list[ScoreRef]:
        """Scored scans under a lease live at ``now``."""
        q = (
            "SELECT s.image_id, s.grp, s.embedding FROM leases l JOIN scores s ON s.image_id = l.image_id "
            "WHERE l.expires > ?"
        )
        return list(self._rows(ScoreRef, q, (now,)))

    def reference_scores(
        self, tags: Sequence[str], imported_tag: str, hide_imported: bool, now: float, limit: int
    ) -> list[ScoreRef]:
        """Scored scans that are labeled or under a live lease (leased first)."""
        leased = self.leased_scores(now)
        seen = {r.id for r in leased}
        labelled = [r for r in self.labelled_scores(tags, imported_tag, hide_imported, limit) if r.id not in seen]
        return (leased + labelled)[: int(limit)]

    def score_groups(self) -> dict[str | None, int]:
        """Scored scans per balance group (center | phase)."""
        return dict(self.conn().execute("SELECT grp, COUNT(*) FROM scores INDEXED BY scores_grp GROUP BY grp"))

    def try_lease(self, image_id: str, client_id: str, strategy: str, now: float, expires: float) -> bool:
        """Take the lease of a scan unless another live lease holds it (atomic)."""
        with self.write() as db:
            cur = db.execute(
                "INSERT INTO leases (image_id, client_id, strategy, ts, expires) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(image_id) DO UPDATE SET client_id = excluded.client_id, strategy = excluded.strategy, "
                "ts = excluded.ts, expires = excluded.expires WHERE leases.expires <= ?",
                (image_id, client_id, strategy, now, expires, now),
            )
            return cur.rowcount > 0

    def release_leases(self, image_ids: Iterable[str], db: sqlite3.Connection | None = None) -> int:
        sql = "DELETE FROM leases WHERE image_id = ?"
        if db is not None:
            return db.executemany(sql, ((i,) for i in image_ids)).rowcount
        with self.write() as w:
            return w.executemany(sql, ((i,) for i in image_ids)).rowcount

    def leases(self, now: float) -> list[LeaseRow]:
        """Live leases, oldest first (expired rows are ignored)."""
        q = "SELECT image_id, client_id, strategy, ts, expires FROM leases WHERE expires > ? ORDER BY ts"
        return list(self._rows(LeaseRow, q, (now,)))

    # ---- imported (PanTS masks) cache ---------------------------------------------------------
    def imported_row(self, image_id: str) -> ImportedRow | None:
        q = "SELECT signature, path, ts, info FROM imported WHERE image_id = ?"
        return self._rows(ImportedRow, q, (image_id,)).fetchone()

    def set_imported_cache(self, image_id: str, signature: str, path: str, ts: float) -> None:
        with self.write() as db:
            db.execute(
                "INSERT INTO imported (image_id, signature, path, ts) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(image_id) DO UPDATE SET signature = excluded.signature, path = excluded.path, "
                "ts = excluded.ts",
                (image_id, signature, path, ts),
            )

    def update_imported_info(self, image_id: str, info: dict[str, Any]) -> None:
        with self.write() as db:
            row = db.execute("SELECT info FROM imported WHERE image_id = ?", (image_id,)).fetchone()
            merged = loads(row[0]) if row else {}
            merged.update(info)
            db.execute(
                "INSERT INTO imported (image_id, info) VALUES (?, ?) "
                "ON CONFLICT(image_id) DO UPDATE SET info = excluded.info",
                (image_id, dumps(merged)),
            )

    def set_revealed(self, image_ids: Iterable[str], revealed: bool) -> int:
        with self.write() as db:
            cur = db.executemany(
                "UPDATE images SET revealed = ? WHERE id = ?", ((int(revealed), i) for i in image_ids)
            )
            return cur.rowcount

    def revealed_ids(self) -> list[str]:
        return [r[0] for r in self.conn().execute("SELECT id FROM images WHERE revealed = 1 ORDER BY id")]


def _and_unleased(where: str, args: list[Any], at: float | None) -> tuple[str, list[Any]]:
    if at is None:
        return where, args
    return (
        f"{where} AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.image_id = i.id AND l.expires > ?)",
        [*args, at],
    )


@dataclass(frozen=True)
class ScanChanges:
    """What a folder scan found against the index: ``new`` ``(id, split, path, mask_dir)`` rows,
    ``moved`` ``(split, path, mask_dir, id)`` updates, ``missing`` and ``back`` (returned) ids."""

    new: Sequence[tuple[str, str, str, str | None]]
    moved: Sequence[tuple[str, str, str | None, str]]
    missing: Sequence[str]
    back: Sequence[str]


@dataclass(frozen=True)
class Unlabeled:
    """Which scans a next-sample query draws from: live, in ``splits``, without a label of
    ``tags`` (imported masks count unless ``hide_imported``), and not leased at ``unleased_at``."""

    splits: Sequence[str]
    tags: Sequence[str]
    imported_tag: str
    hide_imported: bool
    unleased_at: float | None = None


def placeholders(seq: Sequence[Any]) -> str:
    """``?, ?, ?`` for an ``IN (...)`` over ``seq``."""
    if not seq:
        return "NULL"  # `x IN (NULL)` matches nothing
    return ", ".join("?" * len(seq))


_marks = placeholders


__all__ = ["Index", "ScanChanges", "Unlabeled", "dumps", "loads", "placeholders", "SCHEMA_VERSION", "SCORE_COLUMNS"]
