"""Per-scan metadata (center, contrast phase, age, sex, spacing, diagnosis, tumor).

PanTS ships ``metadata.xlsx`` beside ``ImageTr/``; other sources use CSV files with
their own column names. :func:`read_metadata` accepts either, maps the usual column
aliases onto :class:`CaseMeta` and rejects bad cells with a message naming the file,
row and column. :func:`write_metadata` writes the canonical columns back.

Example:
    >>> meta = read_metadata("PanTS/metadata.xlsx")   # doctest: +SKIP
    >>> meta["PanTS_00000001"].contrast_phase          # doctest: +SKIP
    'venous'
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from lib.core.atomic import atomic_write

#: columns written by :func:`write_metadata`, in order
CANONICAL_COLUMNS: tuple[str, ...] = (
    "case_id",
    "center",
    "contrast_phase",
    "age",
    "sex",
    "spacing_x",
    "spacing_y",
    "spacing_z",
    "diagnosis",
    "tumor",
)

#: normalised contrast phases; other values are kept lower-cased as given
PHASES: tuple[str, ...] = ("non-contrast", "arterial", "venous", "delayed")

_PHASE_ALIASES: dict[str, str] = {
    **{k: "non-contrast" for k in ("non-contrast", "noncontrast", "non contrast", "nc", "plain",
                                   "unenhanced", "native", "pre-contrast", "precontrast")},
    **{k: "arterial" for k in ("arterial", "art", "a", "early arterial", "late arterial",
                               "pancreatic", "pancreatic phase", "arterial phase")},
    **{k: "venous" for k in ("venous", "v", "pv", "portal", "portal venous", "portal-venous",
                             "portal venous phase", "venous phase", "portovenous")},
    **{k: "delayed" for k in ("delayed", "delay", "d", "delayed phase", "excretory")},
}
_SEX_ALIASES = {"m": "M", "male": "M", "man": "M", "f": "F", "female": "F", "woman": "F"}
_TRUE = {"yes", "y", "1", "true", "t", "positive", "pos"}
_FALSE = {"no", "n", "0", "false", "f", "negative", "neg"}
# Cells meaning "not recorded" (PanTS marks missing sex as "Unknown").
_MISSING = {"", "na", "n/a", "nan", "none", "null", "unknown", "unk", "-", "?"}


def normalize_phase(value: str) -> str:
    """Map a contrast-phase spelling onto :data:`PHASES`; unknown spellings are lower-cased."""
    key = " ".join(value.strip().lower().replace("_", " ").split())
    return _PHASE_ALIASES.get(key, _PHASE_ALIASES.get(key.replace("-", " "), key))


class CaseMeta(BaseModel):
    """Metadata of one CT scan. ``spacing`` is (x, y, z) in mm; ``tumor`` means a pancreatic lesion."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    case_id: str
    center: str | None = None
    contrast_phase: str | None = None
    age: float | None = None
    sex: Literal["M", "F"] | None = None
    spacing: tuple[float, float, float] | None = None
    diagnosis: str | None = None
    tumor: bool | None = None

    @field_validator("case_id")
    @classmethod
    def _case_id(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("case_id must not be empty")
        return v

    @field_validator("contrast_phase", mode="before")
    @classmethod
    def _phase(cls, v: Any) -> Any:
        return normalize_phase(v) if isinstance(v, str) else v

    @field_validator("sex", mode="before")
    @classmethod
    def _sex(cls, v: Any) -> Any:
        return _SEX_ALIASES.get(v.strip().lower(), v) if isinstance(v, str) else v

    @field_validator("age")
    @classmethod
    def _age(cls, v: float | None) -> float | None:
        if v is not None and not 0 <= v <= 130:
            raise ValueError(f"age must be within 0..130 years, got {v}")
        return v

    @field_validator("spacing")
    @classmethod
    def _spacing(cls, v: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if v is not None and not all(math.isfinite(s) and s > 0 for s in v):
            raise ValueError(f"spacing must be three positive numbers (mm), got {v}")
        return v

    def info(self) -> dict[str, Any]:
        """JSON-friendly fields for a datastore's image info (every key present, ``None`` if unknown)."""
        return {
            "case_id": self.case_id,
            "center": self.center,
            "contrast_phase": self.contrast_phase,
            "age": self.age,
            "sex": self.sex,
            "spacing": list(self.spacing) if self.spacing is not None else None,
            "diagnosis": self.diagnosis,
            "tumor": self.tumor,
        }


# ---- reading ---------------------------------------------------------------------------------

# Header aliases after _norm_header(); the first alias present in a file wins.
_ALIASES: dict[str, tuple[str, ...]] = {
    "case_id": ("case id", "pants id", "bdmap id", "caseid", "case", "id", "patient id", "scan id"),
    "center": ("center", "centre", "site", "institution", "hospital", "center id", "source"),
    "contrast_phase": ("contrast phase", "phase", "contrast", "ct phase"),
    "age": ("age", "age years", "patient age"),
    "sex": ("sex", "gender", "patient sex"),
    "spacing": ("spacing", "voxel spacing"),
    "spacing_x": ("spacing x", "x spacing"),
    "spacing_y": ("spacing y", "y spacing"),
    "spacing_z": ("spacing z", "z spacing"),
    "in_plane": ("in plane spacing", "inplane spacing", "pixel spacing"),
    "thickness": ("slice thickness", "slice spacing"),
    "diagnosis": ("diagnosis", "dx", "pathology", "diagnosis type"),
    "tumor": ("tumor", "tumor yes/no", "has tumor", "tumour", "tumour yes/no", "pancreatic tumor",
              "pancreatic tumor yes/no", "lesion"),
}


def _norm_header(h: Any) -> str:
    s = re.sub(r"[\s_\-()\[\]]+", " ", str(h or "").strip().lower()).strip()
    return re.sub(r"\s+mm$", "", s)  # "slice thickness (mm)" -> "slice thickness"


class _CellError(ValueError):
    """A bad cell; :func:`read_metadata` adds file, row and column."""


def _text(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, float):
        if math.isnan(v):
            return None
        if v.is_integer():  # numeric ids / centres typed into Excel
            v = int(v)
    s = str(v).strip()
    return None if s.lower() in _MISSING else s


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        raise _CellError(f"expected a number, got {v!r}")
    if isinstance(v, (int, float)):
        f = float(v)
        return None if math.isnan(f) else f
    s = _text(v)
    if s is None:
        return None
    m = re.fullmatch(r"([+-]?\d+(?:\.\d*)?|[+-]?\.\d+)(?:\s*(?:y|yr|yrs|years?|mm))?", s.lower())
    if not m:
        raise _CellError(f"expected a number, got {v!r}")
    return float(m.group(1))


def _positive(v: Any) -> float | None:
    f = _number(v)
    if f is not None and not (math.isfinite(f) and f > 0):
        raise _CellError(f"expected a positive spacing in mm, got {v!r}")
    return f


def _age(v: Any) -> float | None:
    f = _number(v)  # PanTS / DICOM style "063Y" is accepted by the unit suffix
    if f is not None and not 0 <= f <= 130:
        raise _CellError(f"age must be within 0..130 years, got {v!r}")
    return f


def _sex(v: Any) -> str | None:
    s = _text(v)
    if s is None:
        return None
    try:
        return _SEX_ALIASES[s.lower()]
    except KeyError:
        raise _CellError(f"expected M/F/male/female, got {v!r}") from None


def _phase(v: Any) -> str | None:
    s = _text(v)
    return None if s is None else normalize_phase(s)


def _tumor(v: Any) -> bool | None:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    s = _text(v)
    if s is None:
        return None
    s = s.lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise _CellError(f"expected yes/no/1/0/true/false, got {v!r}")


def _spacing(v: Any) -> tuple[float, float, float] | None:
    s = _text(v)
    if s is None:
        return None
    parts = [p for p in re.split(r"[x×*,;\s]+", s.strip("()[] ").lower()) if p]
    if len(parts) != 3:
        raise _CellError(f"expected three spacings like '0.8x0.8x1.25', got {v!r}")
    try:
        sp = tuple(float(p) for p in parts)
    except ValueError:
        raise _CellError(f"expected three spacings like '0.8x0.8x1.25', got {v!r}") from None
    if not all(math.isfinite(x) and x > 0 for x in sp):
        raise _CellError(f"spacings must be positive, got {v!r}")
    return sp  # type: ignore[return-value]


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "case_id": _text,
    "center": _text,
    "contrast_phase": _phase,
    "age": _age,
    "sex": _sex,
    "spacing": _spacing,
    "spacing_x": _positive,
    "spacing_y": _positive,
    "spacing_z": _positive,
    "in_plane": _positive,
    "thickness": _positive,
    "diagnosis": _text,
    "tumor": _tumor,
}


def _iter_rows(path: Path) -> Iterator[Sequence[Any]]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as fh:
            yield from csv.reader(fh)
    elif suffix == ".xlsx":
        from openpyxl import load_workbook

        wb = load_workbook(path, read_only=True, data_only=True)
        try:
            yield from wb.worksheets[0].iter_rows(values_only=True)
        finally:
            wb.close()
    else:
        raise ValueError(f"{path}: unsupported metadata format {path.suffix!r}; use .csv or .xlsx")


def read_metadata(path: str | os.PathLike) -> dict[str, CaseMeta]:
    """Read a metadata table into ``{case_id: CaseMeta}``.

    Column names are matched case-insensitively against common aliases (``PanTS ID``,
    ``BDMAP ID``, ``gender``, ``phase``, ``tumor yes/no``, ``in-plane spacing`` +
    ``slice thickness``, ...). Unknown columns are ignored; empty rows are skipped;
    ``Unknown``/``NA``/empty cells become ``None``.

    Args:
        path: a ``.csv`` or ``.xlsx`` file (the first sheet is read).

    Returns:
        Metadata per case id, in file order.

    Raises:
        ValueError: unsupported suffix, no case-id column (the message lists the columns
            found), a bad cell (names file, row and column) or a duplicate case id.
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metadata file not found: {path}")
    rows = _iter_rows(path)
    header = next(rows, None)
    if header is None:
        raise ValueError(f"{path}: empty metadata file (no header row)")
    names = [str(h).strip() if h is not None else "" for h in header]
    normed = [_norm_header(h) for h in names]

    # field -> column index, first matching alias wins
    cols: dict[str, int] = {}
    for field, aliases in _ALIASES.items():
        for alias in aliases:
            if alias in normed:
                cols[field] = normed.index(alias)
                break
    if "case_id" not in cols:
        raise ValueError(
            f"{path}: no case-id column (expected one of {list(_ALIASES['case_id'])}); "
            f"columns found: {[n for n in names if n]}"
        )
    id_idx = cols.pop("case_id")
    width = len(names)
    # Pad short rows, drop empty ones (trailing blank rows are common in .xlsx files).
    table = [
        (row_no, row if len(row) >= width else [*row, *([None] * (width - len(row)))])
        for row_no, row in enumerate(rows, start=2)  # spreadsheet numbering: header is row 1
        if any(c is not None and c != "" for c in row)
    ]

    ids: list[str] = []
    first_row: dict[str, int] = {}
    for row_no, row in table:
        case_id = _text(row[id_idx])
        if case_id is None:
            raise ValueError(f"{path}: row {row_no}, column {names[id_idx]!r}: empty case id")
        if case_id in first_row:
            raise ValueError(f"{path}: row {row_no}: duplicate case id {case_id!r} (first in row {first_row[case_id]})")
        first_row[case_id] = row_no
        ids.append(case_id)

    # Parse column by column, memoising cells: apart from the case id, metadata columns
    # repeat a handful of values (phases, centres, spacings), which keeps 36k rows fast.
    columns: dict[str, list[Any]] = {}
    for field, idx in cols.items():
        parse, cache = _PARSERS[field], {}
        try:
            columns[field] = [
                cache[c] if c in cache else cache.setdefault(c, parse(c)) for _, r in table for c in (r[idx],)
            ]
        except _CellError:
            _raise_cell_error(path, table, idx, names[idx], parse)
    n = len(table)
    none = [None] * n

    spacing = columns.get("spacing", none)
    xyz = [columns.get(f"spacing_{a}", none) for a in "xyz"]
    in_plane, thick = columns.get("in_plane", none), columns.get("thickness", none)
    for i in range(n):
        if spacing[i] is None:
            if None not in (xyz[0][i], xyz[1][i], xyz[2][i]):
                spacing = spacing if spacing is not none else list(none)
                spacing[i] = (xyz[0][i], xyz[1][i], xyz[2][i])
            elif in_plane[i] is not None and thick[i] is not None:
                spacing = spacing if spacing is not none else list(none)
                spacing[i] = (in_plane[i], in_plane[i], thick[i])
    columns["spacing"] = spacing

    fields = [columns.get(f, none) for f in _META_FIELDS]
    # Cells are parsed and checked above, so skip pydantic's second validation pass.
    fields_set = {"case_id", *_META_FIELDS}
    return {
        case_id: CaseMeta.model_construct(fields_set, case_id=case_id, **dict(zip(_META_FIELDS, vals)))
        for case_id, *vals in zip(ids, *fields)
    }


def _raise_cell_error(path: Path, table: list, idx: int, name: str, parse: Callable[[Any], Any]) -> None:
    """Re-parse a failed column cell by cell to report the first bad row."""
    for row_no, row in table:
        try:
            parse(row[idx])
        except _CellError as err:
            raise ValueError(f"{path}: row {row_no}, column {name!r}: {err}") from None


_META_FIELDS = ("center", "contrast_phase", "age", "sex", "spacing", "diagnosis", "tumor")


# ---- writing ---------------------------------------------------------------------------------


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else repr(v)
    return str(v)


def _row(m: CaseMeta) -> list[Any]:
    sp = m.spacing or (None, None, None)
    return [m.case_id, m.center, m.contrast_phase, m.age, m.sex, *sp, m.diagnosis,
            None if m.tumor is None else ("yes" if m.tumor else "no")]


def write_metadata(path: str | os.PathLike, rows: Iterable[CaseMeta]) -> Path:
    """Write metadata with :data:`CANONICAL_COLUMNS` as ``.csv`` or ``.xlsx`` (chosen by suffix).

    The file is written to a temporary name in the same folder and moved into place, so
    readers never see a half-written table.

    Args:
        path: destination ending in ``.csv`` or ``.xlsx``.
        rows: the cases, written in the given order.

    Returns:
        The written path.

    Raises:
        ValueError: unsupported suffix.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".xlsx"):
        raise ValueError(f"{path}: unsupported metadata format {path.suffix!r}; use .csv or .xlsx")

    def write(tmp: Path) -> None:
        if suffix == ".csv":
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh)
                w.writerow(CANONICAL_COLUMNS)
                w.writerows([_csv_cell(v) for v in _row(m)] for m in rows)
        else:
            from openpyxl import Workbook

            wb = Workbook(write_only=True)
            ws = wb.create_sheet("metadata")
            ws.append(list(CANONICAL_COLUMNS))
            for m in rows:
                ws.append(_row(m))
            wb.save(tmp)

    return atomic_write(path, write)


def find_metadata(root: str | os.PathLike) -> Path | None:
    """The metadata table of a dataset folder: ``metadata.xlsx`` if present, else ``metadata.csv``."""
    for name in ("metadata.xlsx", "metadata.csv"):
        p = Path(root) / name
        if p.is_file():
            return p
    return None


__all__ = [
    "CaseMeta",
    "CANONICAL_COLUMNS",
    "PHASES",
    "normalize_phase",
    "read_metadata",
    "write_metadata",
    "find_metadata",
]
