"""The learning benchmarks' phantom set: how many training phantoms hold a lesion, and where they go."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
from server import REPO

spec = importlib.util.spec_from_file_location("bench_learning", REPO / "scripts" / "bench_learning.py")
bench_learning = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_learning)


def _tumours(root: Path) -> list[bool]:
    with open(root / "metadata.csv", newline="") as fh:
        return [r["tumor"] == "yes" for r in csv.DictReader(fh)]


def _args(tmp: Path, *extra: str):
    return bench_learning.build_parser().parse_args(
        ["--out", str(tmp / "out"), "--n-train", "6", "--n-test", "2", "--test-lesions", "1",
         "--shape", "24", "24", "16", "--spacing", "6", "6", "6", *extra])


def test_train_lesions_sets_the_count_and_gets_its_own_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(bench_learning, "REPO", tmp_path)
    default = bench_learning.make_data(_args(tmp_path))
    assert _tumours(default) == [False] * 5 + [True] + [True, False]  # 11% of 6 rounds to 1
    rich = bench_learning.make_data(_args(tmp_path, "--train-lesions", "3"))
    assert rich != default and rich.name.endswith("_tl3")
    assert _tumours(rich) == [False, True] * 3 + [True, False]
    assert _tumours(default) == [False] * 5 + [True] + [True, False]  # the default set is left as it was


def test_train_lesions_out_of_range_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(bench_learning, "REPO", tmp_path)
    with pytest.raises(SystemExit, match="--train-lesions 7: must be between 0 and --n-train 6"):
        bench_learning.make_data(_args(tmp_path, "--train-lesions", "7"))
    assert not (tmp_path / "data").exists()
