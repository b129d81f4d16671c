"""Per-scan metadata: model, CSV/XLSX reading with aliases, writing, error messages."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from lib.imaging.metadata import CANONICAL_COLUMNS, CaseMeta, find_metadata, normalize_phase, read_metadata, write_metadata

ROWS = [
    CaseMeta(case_id="PanTS_00000001", center="center_a", contrast_phase="venous", age=61.0, sex="M",
             spacing=(0.8, 0.8, 1.25), diagnosis="PDAC", tumor=True),
    CaseMeta(case_id="PanTS_00000002", center="center_b", contrast_phase="non-contrast", age=47.5, sex="F",
             spacing=(0.703125, 0.703125, 2.5), diagnosis="normal", tumor=False),
    CaseMeta(case_id="PanTS_00000003"),  # everything unknown
]


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _write_xlsx(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.append(header)
    for r in rows:
        ws.append(r)
    wb.save(path)
    return path


# ---- model -----------------------------------------------------------------------------------


def test_case_meta_normalises_and_is_frozen() -> None:
    m = CaseMeta(case_id=" PanTS_1 ", contrast_phase="Portal Venous", sex="female", tumor="yes")
    assert (m.case_id, m.contrast_phase, m.sex, m.tumor) == ("PanTS_1", "venous", "F", True)
    assert CaseMeta(case_id="x", contrast_phase="Late Arterial").contrast_phase == "arterial"
    assert CaseMeta(case_id="x", contrast_phase="Dual Energy").contrast_phase == "dual energy"
    with pytest.raises(ValidationError):
        m.age = 3  # type: ignore[misc]
    with pytest.raises(ValidationError):
        CaseMeta(case_id="x", spacing=(0.8, -1, 1))
    with pytest.raises(ValidationError):
        CaseMeta(case_id="x", sex="X")


@pytest.mark.parametrize("raw,expected", [("NC", "non-contrast"), ("non_contrast", "non-contrast"),
                                          ("PV", "venous"), ("Delay", "delayed"), ("ART", "arterial")])
def test_normalize_phase(raw: str, expected: str) -> None:
    assert normalize_phase(raw) == expected


def test_info_is_json_friendly() -> None:
    info = ROWS[0].info()
    assert json.loads(json.dumps(info)) == info
    assert info["spacing"] == [0.8, 0.8, 1.25] and info["tumor"] is True
    assert set(ROWS[2].info()) == set(info) and ROWS[2].info()["spacing"] is None


# ---- round trip -----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".xlsx"])
def test_round_trip(tmp_path: Path, suffix: str) -> None:
    path = write_metadata(tmp_path / f"metadata{suffix}", ROWS)
    got = read_metadata(path)
    assert list(got) == [r.case_id for r in ROWS]
    assert list(got.values()) == ROWS
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left


def test_csv_canonical_columns(tmp_path: Path) -> None:
    path = write_metadata(tmp_path / "metadata.csv", ROWS[:1])
    header, row = list(csv.reader(path.open()))
    assert tuple(header) == CANONICAL_COLUMNS
    assert row == ["PanTS_00000001", "center_a", "venous", "61", "M", "0.8", "0.8", "1.25", "PDAC", "yes"]


# ---- aliases ---------------------------------------------------------------------------------


def test_csv_aliases(tmp_path: Path) -> None:
    path = _write_csv(
        tmp_path / "m.csv",
        ["PanTS ID", "Gender", "Contrast Phase", "Tumor Yes/No", "In-plane spacing", "Slice thickness (mm)",
         "Age", "Scanner"],
        [["PanTS_00000007", "Male", "Portal venous", "No", "0.75", "2.5", "063Y", "GE"],
         ["PanTS_00000008", "Unknown", "", "yes", "", "", "", "Siemens"]],
    )
    got = read_metadata(path)
    a, b = got["PanTS_00000007"], got["PanTS_00000008"]
    assert (a.sex, a.contrast_phase, a.tumor, a.spacing, a.age) == ("M", "venous", False, (0.75, 0.75, 2.5), 63.0)
    assert (b.sex, b.contrast_phase, b.tumor, b.spacing, b.age) == (None, None, True, None, None)


@pytest.mark.parametrize(
    "header,row,spacing",
    [
        (["case_id", "spacing"], ["c1", "0.8x0.8x1.25"], (0.8, 0.8, 1.25)),
        (["id", "Spacing"], ["c1", "(0.8, 0.8, 1.25)"], (0.8, 0.8, 1.25)),
        (["BDMAP ID", "spacing_x", "spacing_y", "spacing_z"], ["c1", "0.7", "0.7", "3"], (0.7, 0.7, 3.0)),
    ],
)
def test_spacing_forms(tmp_path: Path, header: list[str], row: list[str], spacing: tuple) -> None:
    got = read_metadata(_write_csv(tmp_path / "m.csv", header, [row]))
    assert got["c1"].spacing == spacing


def test_xlsx_aliases_and_native_cells(tmp_path: Path) -> None:
    path = _write_xlsx(
        tmp_path / "m.xlsx",
        ["BDMAP ID", "sex", "phase", "has_tumor", "age", "Center", "notes"],
        [[1001, "F", "arterial", True, 55, 3, "x"], [1002, "m", "NC", 0, 70.5, "site_b", None],
         [None, None, None, None, None, None, None]],  # trailing blank row
    )
    got = read_metadata(path)
    assert list(got) == ["1001", "1002"]
    assert got["1001"] == CaseMeta(case_id="1001", sex="F", contrast_phase="arterial", tumor=True, age=55, center="3")
    assert (got["1002"].sex, got["1002"].contrast_phase, got["1002"].tumor) == ("M", "non-contrast", False)


# ---- errors ----------------------------------------------------------------------------------


def test_missing_case_id_column(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "m.csv", ["patient", "sex"], [["a", "M"]])
    with pytest.raises(ValueError, match=r"m\.csv.*no case-id column.*'patient', 'sex'"):
        read_metadata(path)


@pytest.mark.parametrize(
    "column,value,message",
    [
        ("sex", "X", "expected M/F"),
        ("age", "old", "expected a number"),
        ("age", "200", "0..130"),
        ("spacing", "1x2", "three spacings"),
        ("tumor", "maybe", "yes/no"),
    ],
)
def test_bad_cell_names_file_row_column(tmp_path: Path, column: str, value: str, message: str) -> None:
    path = _write_csv(tmp_path / "bad.csv", ["case_id", column], [["a", ""], ["b", value]])
    with pytest.raises(ValueError, match=rf"bad\.csv: row 3, column '{column}': .*{message}"):
        read_metadata(path)


def test_duplicate_and_empty_ids(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="row 3: duplicate case id 'a' \\(first in row 2\\)"):
        read_metadata(_write_csv(tmp_path / "d.csv", ["case_id"], [["a"], ["a"]]))
    with pytest.raises(ValueError, match="row 2, column 'case_id': empty case id"):
        read_metadata(_write_csv(tmp_path / "e.csv", ["case_id", "sex"], [["", "M"]]))


def test_unsupported_suffix(tmp_path: Path) -> None:
    (tmp_path / "m.json").write_text("{}")
    with pytest.raises(ValueError, match="use .csv or .xlsx"):
        read_metadata(tmp_path / "m.json")
    with pytest.raises(ValueError, match="use .csv or .xlsx"):
        write_metadata(tmp_path / "m.tsv", ROWS)
    with pytest.raises(FileNotFoundError):
        read_metadata(tmp_path / "missing.csv")


def test_find_metadata_prefers_xlsx(tmp_path: Path) -> None:
    assert find_metadata(tmp_path) is None
    write_metadata(tmp_path / "metadata.csv", ROWS)
    assert find_metadata(tmp_path) == tmp_path / "metadata.csv"
    write_metadata(tmp_path / "metadata.xlsx", ROWS)
    assert find_metadata(tmp_path) == tmp_path / "metadata.xlsx"


def test_pants_sized_csv_reads_fast(tmp_path: Path) -> None:
    """36,390 rows (all of PanTS) read well under a second; the bound leaves room for a busy CI box."""
    rows = [CaseMeta(case_id=f"PanTS_{i:08d}", center=f"c{i % 145}", contrast_phase=("venous", "arterial")[i % 2],
                     age=float(20 + i % 70), sex="MF"[i % 2], spacing=(0.8, 0.8, 1.25), diagnosis="normal",
                     tumor=i % 9 == 0) for i in range(36390)]
    path = write_metadata(tmp_path / "metadata.csv", rows)
    t0 = time.perf_counter()
    got = read_metadata(path)
    elapsed = time.perf_counter() - t0
    assert len(got) == 36390 and got["PanTS_00000009"] == rows[9]
    assert elapsed < 2.5, f"reading 36,390 rows took {elapsed:.2f} s"
