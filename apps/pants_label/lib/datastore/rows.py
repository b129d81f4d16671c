"""The index's rows as named records. They are tuples too, so a row unpacks like one."""

from __future__ import annotations

from typing import NamedTuple


class ImageRow(NamedTuple):
    """One scan (table ``images``). ``removed``: 0 live, 1 removed through the API, 2 vanished
    from the folder. ``meta`` and ``info`` are JSON text."""

    id: str
    split: str
    path: str
    mask_dir: str | None
    removed: int
    revealed: int
    meta: str | None
    info: str
    added_ts: float


class ScanState(NamedTuple):
    """What a folder scan compares against: where a known scan was, and whether it is live."""

    split: str
    path: str
    mask_dir: str | None
    removed: int


class LabelRow(NamedTuple):
    """One label version (table ``labels``); ``path`` None marks a removal; ``info`` is JSON text."""

    version: int
    path: str | None
    origin: str
    ts: float
    info: str


class ScoreRow(NamedTuple):
    """A scan's active-learning scores (table ``scores``)."""

    image_id: str
    model_version: str
    uncertainty: float
    lesion_prob: float
    priority: float
    grp: str | None
    embedding: bytes | None


class ScoreRef(NamedTuple):
    """What the diversity and balance terms need of a labelled or leased scan."""

    id: str
    grp: str | None
    embedding: bytes | None


class LeaseRow(NamedTuple):
    image_id: str
    client_id: str
    strategy: str
    ts: float
    expires: float


class ImportedRow(NamedTuple):
    """The consolidation cache of a scan's PanTS masks (table ``imported``)."""

    signature: str | None
    path: str | None
    ts: float | None
    info: str


def factory(record: type) -> object:
    """A ``Cursor.row_factory`` that builds ``record`` from each row."""
    return lambda cursor, row: record(*row)


__all__ = ["ImageRow", "ScanState", "LabelRow", "ScoreRow", "ScoreRef", "LeaseRow", "ImportedRow", "factory"]
