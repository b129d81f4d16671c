"""The DICOMweb datastore's index: the shared :class:`~lib.datastore.index.Index` plus DICOM SEG series.

CT series are ``images`` rows (split ``pacs``), so scores, leases, change counters, label
versions and image info are the same tables and the same SQL as for a PanTS folder. The ``provenance`` table (who saved each
label version) is the PanTS folder's too. What only a
PACS has is the ``segs`` table: SEG series found on the server, the CT series each references
and the tag its ContentLabel gives. A scan counts as labelled under a tag when it has a live
label version of that tag here *or* a SEG of that tag on the server.

Version 1 of this datastore kept its own schema in ``index.sqlite`` (tables ``series``, ``segs``,
``labels``); :func:`migrate_v1` copies such a file into this index once, at start.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lib.core.atomic import commit
from lib.datastore import provenance
from lib.datastore.index import Index, dumps, loads, placeholders

logger = logging.getLogger(__name__)

#: the split every CT series of the PACS is served under
PACS_SPLIT = "pacs"

_SEGS = [
    """CREATE TABLE IF NOT EXISTS segs (
    id      TEXT PRIMARY KEY,           -- SeriesInstanceUID of a SEG series
    study   TEXT NOT NULL,
    ref     TEXT,                       -- the CT series it references (NULL: none we serve)
    tag     TEXT NOT NULL,
    created TEXT NOT NULL               -- SeriesDate + SeriesTime: newest wins
)""",
    "CREATE INDEX IF NOT EXISTS segs_ref ON segs (ref, tag, created)",
    "CREATE INDEX IF NOT EXISTS segs_tag ON segs (tag, ref)",
    # a new SEG changes what is labelled: the hybrid strategy's references and the listing
    *(
        f"CREATE TRIGGER IF NOT EXISTS changes_segs_{event.lower()} AFTER {event} ON segs BEGIN "
        "UPDATE changes SET n = n + 1 WHERE name IN ('references', 'listing'); END"
        for event in ("INSERT", "UPDATE", "DELETE")
    ),
]


class PacsIndex(Index):
    """:class:`Index` with the ``segs`` table (see module docstring)."""

    def extra_schema(self) -> list[str]:
        # who saved each label version, as on a PanTS folder (one table definition for both)
        records = [stmt for stmt in provenance.SCHEMA.split(";") if stmt.strip()]
        return [*_SEGS, *records]

    # ---- labelled = a live version here or a SEG on the server --------------------------------
    def _live_label_conditions(
        self, tags: Sequence[str], imported_tag: str, hide_imported: bool
    ) -> tuple[list[str], list[Any]]:
        conds, args = super()._live_label_conditions(tags, imported_tag, hide_imported)
        if tags:
            conds.append(f"EXISTS (SELECT 1 FROM segs g WHERE g.ref = i.id AND g.tag IN ({placeholders(tags)}))")
            args.extend(tags)
        return conds, args

    def _labelled_id_sets(
        self, tags: Sequence[str], imported_tag: str, hide_imported: bool
    ) -> tuple[list[str], list[Any]]:
        parts, args = super()._labelled_id_sets(tags, imported_tag, hide_imported)
        if tags:
            parts.append(f"SELECT ref AS id FROM segs WHERE ref IS NOT NULL AND tag IN ({placeholders(tags)})")
            args.extend(tags)
        return parts, args

    # ---- series --------------------------------------------------------------------------------
    def upsert_series(self, rows: Iterable[tuple[str, dict[str, Any]]], path_of: Any, now: float) -> None:
        """Insert or refresh CT series ``(id, meta)``; ``meta`` holds ``study``, ``qido`` (the
        QIDO fields) and ``case`` (case metadata derived from them). A refresh keeps ``headers``,
        the case metadata read from the series' own DICOM headers once it was downloaded."""
        with self.write() as db:
            for sid, meta in rows:
                old = db.execute("SELECT meta FROM images WHERE id = ?", (sid,)).fetchone()
                if old is None:
                    db.execute(
                        "INSERT INTO images (id, split, path, meta, added_ts) VALUES (?, ?, ?, ?, ?)",
                        (sid, PACS_SPLIT, path_of(sid), dumps(meta), now),
                    )
                    continue
                kept = loads(old[0])
                merged = {**meta, **({"headers": kept["headers"]} if "headers" in kept else {})}
                if merged != kept:  # unchanged rows are not rewritten (the listing counter stays)
                    db.execute("UPDATE images SET meta = ? WHERE id = ?", (dumps(merged), sid))

    def set_header_metadata(self, sid: str, case: dict[str, Any]) -> None:
        """Case metadata read from the series' DICOM headers (more complete than QIDO's)."""
        with self.write() as db:
            row = db.execute("SELECT meta FROM images WHERE id = ?", (sid,)).fetchone()
            if row is not None:
                db.execute("UPDATE images SET meta = ? WHERE id = ?", (dumps({**loads(row[0]), "headers": case}), sid))

    def series_rows(self) -> list[tuple[str, str | None, str]]:
        """``(id, meta, info)`` of every CT series, by id."""
        q = "SELECT id, meta, info FROM images WHERE split = ? AND removed = 0 ORDER BY id"
        return list(self.conn().execute(q, (PACS_SPLIT,)))

    # ---- SEG series ----------------------------------------------------------------------------
    def seg_ids(self) -> set[str]:
        return {r[0] for r in self.conn().execute("SELECT id FROM segs")}

    def put_seg(self, seg_uid: str, study: str, ref: str | None, tag: str, created: str) -> None:
        with self.write() as db:
            db.execute(
                "INSERT INTO segs (id, study, ref, tag, created) VALUES (?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE "
                "SET study = excluded.study, ref = excluded.ref, tag = excluded.tag, created = excluded.created",
                (seg_uid, study, ref, tag, created),
            )

    def latest_seg(self, image_id: str, tag: str) -> str | None:
        row = self.conn().execute(
            "SELECT id FROM segs WHERE ref = ? AND tag = ? ORDER BY created DESC, rowid DESC LIMIT 1", (image_id, tag)
        ).fetchone()
        return row[0] if row else None

    def seg_created(self, seg_uid: str) -> str | None:
        row = self.conn().execute("SELECT created FROM segs WHERE id = ?", (seg_uid,)).fetchone()
        return row[0] if row else None

    def seg_tags(self) -> list[tuple[str, str]]:
        """``(CT series, tag)`` for every SEG that references a served series."""
        return list(self.conn().execute("SELECT DISTINCT ref, tag FROM segs WHERE ref IS NOT NULL"))


def migrate_v1(old: Path, new: Path, path_of: Any) -> bool:
    """Copy a version-1 DICOMweb index (``series``/``segs``/``labels`` tables) into a new
    :class:`PacsIndex` at ``new``: series info, SEG records and every label version.

    The new file is built beside ``new`` and renamed into place, so an interrupted migration
    leaves nothing half-done; the old file is kept (renamed ``*.v1``). False if ``old`` is no
    version-1 index.
    """
    if not old.is_file():
        return False
    src = sqlite3.connect(str(old))
    try:
        names = {r[0] for r in src.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "series" not in names:
            return False
        series = list(src.execute("SELECT id, study, qido, info, seen FROM series"))
        segs = list(src.execute("SELECT id, study, ref, tag, created FROM segs"))
        labels = list(src.execute("SELECT image_id, tag, version, path, seg, ts, info FROM labels ORDER BY version"))
    finally:
        src.close()
    staging = new.with_name(new.name + ".migrating")
    for leftover in (staging, Path(f"{staging}-wal"), Path(f"{staging}-shm")):
        leftover.unlink(missing_ok=True)
    idx = PacsIndex(staging)
    with idx.write() as db:
        for sid, study, qido, info, seen in series:
            q = loads(qido)
            db.execute(
                "INSERT INTO images (id, split, path, meta, info, added_ts) VALUES (?, ?, ?, ?, ?, ?)",
                (sid, PACS_SPLIT, path_of(sid), dumps({"study": study, "qido": q, "case": {}}), info or "{}", seen),
            )
        for row in segs:
            db.execute("INSERT INTO segs (id, study, ref, tag, created) VALUES (?, ?, ?, ?, ?)", row)
        for image_id, tag, version, path, seg, ts, info in labels:
            extra = loads(info)
            if seg:
                extra["seg"] = seg
            idx.insert_label(db, image_id, tag, int(version), path, "upload", float(ts), extra)
    idx.conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the main file before the rename
    idx.close()
    commit(staging, new)
    old.rename(old.with_name(old.name + ".v1"))
    logger.info(f"DICOMweb index: {len(series)} series, {len(labels)} label versions moved from {old} to {new}")
    return True


__all__ = ["PacsIndex", "PACS_SPLIT", "migrate_v1"]
