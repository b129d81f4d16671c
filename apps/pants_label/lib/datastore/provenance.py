"""Who made each stored label version, how, and how long it took.

One row per label version in the index table ``provenance`` (written in the same transaction
as the version itself, so a version never exists without its record):

    reader        the nginx front's authenticated user, else the client's ``client_id``
                  (3D Slicer sends one), else NULL
    reader_from   ``front`` | ``client_id`` | ``none``: how far ``reader`` can be trusted
    role          the front's role for the user (annotator | reviewer | admin), NULL without a front
    source        ``reader`` (drawn or edited by a person), ``model`` (an inference result stored
                  as a label, tag ``original``) or ``imported`` (files that came with the data)
    seconds       time spent, when the client sends ``time_spent_s`` with the label
    model_version the weights that produced a ``model`` label, when known (NULL otherwise)

The PanTS masks (tag ``pants``) are not label versions: their record is implied
(``source = imported``, no reader), see :func:`imported`.
"""

from __future__ import annotations

import math
import re
import sqlite3
from dataclasses import asdict, dataclass
from typing import Any

from lib.core.errors import bad_request
from lib.core.identity import current_identity

SCHEMA = """
CREATE TABLE IF NOT EXISTS provenance (
    image_id      TEXT NOT NULL,
    tag           TEXT NOT NULL,
    version       INTEGER NOT NULL,
    reader        TEXT,
    reader_from   TEXT NOT NULL,
    role          TEXT,
    source        TEXT NOT NULL,
    seconds       REAL,
    model_version TEXT,
    ts            REAL NOT NULL,
    PRIMARY KEY (image_id, tag, version)
);
CREATE INDEX IF NOT EXISTS provenance_reader ON provenance (reader, ts);
"""

SOURCES = ("reader", "model", "imported")
#: the longest time a client may report for one label (a day): more is a client bug
MAX_SECONDS = 86400.0
MODEL_TAG = "original"


@dataclass(frozen=True)
class Provenance:
    """The record of one label version (see the module docstring for the fields)."""

    source: str
    reader: str | None = None
    reader_from: str = "none"
    role: str | None = None
    seconds: float | None = None
    model_version: str | None = None

    def as_info(self) -> dict[str, Any]:
        """For label info and the listing: the fields that are set."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def imported() -> Provenance:
    return Provenance(source="imported")


def _seconds(params: dict[str, Any]) -> float | None:
    raw = params.get("time_spent_s")
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise bad_request(f"params.time_spent_s: expected seconds as a number, got {raw!r}")
    try:
        value = float(raw)
    except ValueError:
        raise bad_request(f"params.time_spent_s: expected seconds as a number, got {raw!r}") from None
    if not math.isfinite(value) or not 0 <= value <= MAX_SECONDS:
        raise bad_request(f"params.time_spent_s: must be between 0 and {MAX_SECONDS:.0f} seconds, got {raw!r}")
    return value


_VERSION = re.compile(r"v[0-9]{1,9}")


def _model_version(tag: str, params: dict[str, Any]) -> str | None:
    """The model-store version named by an inference result stored as ``original``.

    MONAI Label's infer with ``save_label`` stores the result with ``{"model": ..., "params": <the
    infer task's answer>}``; the segmentation task puts the serving version into that answer.
    """
    if tag != MODEL_TAG:
        return None
    answer = params.get("params")
    found = answer.get("model_version") if isinstance(answer, dict) else params.get("model_version")
    return found if isinstance(found, str) and _VERSION.fullmatch(found) else None


def for_upload(tag: str, params: dict[str, Any]) -> Provenance:
    """The record of a label being stored now (the request's trusted identity first).

    Raises:
        ClientError: 400 for a ``time_spent_s`` that is not a number of seconds in 0..86400.
    """
    seconds = _seconds(params)
    source = "model" if tag == MODEL_TAG else "reader"
    version = _model_version(tag, params)
    who = current_identity()
    if who is not None:
        return Provenance(source, who.name, "front", who.role, seconds, version)
    client = params.get("client_id")
    if isinstance(client, str) and client.strip():
        return Provenance(source, client.strip()[:64], "client_id", None, seconds, version)
    return Provenance(source, None, "none", None, seconds, version)


def record(db: sqlite3.Connection, image_id: str, tag: str, version: int, prov: Provenance, ts: float) -> None:
    """Inside the write transaction that stores the version."""
    db.execute(
        "INSERT OR REPLACE INTO provenance (image_id, tag, version, reader, reader_from, role, source, seconds, "
        "model_version, ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (image_id, tag, version, prov.reader, prov.reader_from, prov.role, prov.source, prov.seconds,
         prov.model_version, ts),
    )


_COLUMNS = "reader, reader_from, role, source, seconds, model_version"  # Provenance's field order


def _from_row(row: tuple) -> Provenance:
    reader, reader_from, role, source, seconds, model_version = row
    return Provenance(source, reader, reader_from, role, seconds, model_version)


def of_version(conn: sqlite3.Connection, image_id: str, tag: str, version: int) -> Provenance | None:
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM provenance WHERE image_id = ? AND tag = ? AND version = ?", (image_id, tag, version)
    ).fetchone()
    return _from_row(row) if row else None


def rows(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every record with its version and time (the campaign report)."""
    q = f"SELECT image_id, tag, version, ts, {_COLUMNS} FROM provenance ORDER BY ts"
    return [
        {"image_id": r[0], "tag": r[1], "version": r[2], "ts": r[3], **_from_row(r[4:]).as_info()}
        for r in conn.execute(q)
    ]


__all__ = ["Provenance", "SCHEMA", "SOURCES", "for_upload", "imported", "of_version", "record", "rows"]
