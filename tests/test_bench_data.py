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


def _recipe(tmp: Path, *extra: str):
    from lib.core.labelmap import load_labelmap
    from lib.core.settings import load_segmentation_config

    return bench_learning.recipe(load_segmentation_config(), load_labelmap(), _args(tmp, *extra))


def test_recipe_options_reach_the_training_config(tmp_path: Path) -> None:
    cfg, request = _recipe(tmp_path, "--synth-lesions", "0.5", "--augment", "0.25", "--lesion-weight", "16",
                           "--patch", "48", "48", "32", "--steps", "100", "--evals", "4")
    t = cfg.training
    assert t.lesion_synthesis.probability == 0.5 and t.lesion_synthesis.contrast_hu == (5.0, 60.0)  # rest kept
    assert t.augment.probability == 0.25 and t.crop_class_weights["pancreatic_lesion"] == 16
    assert t.for_device("cpu").patch_size == t.for_device("cuda").patch_size == (48, 48, 32)
    assert request["max_epochs"] == 4 and request["iterations_per_epoch"] == 25
    painted = _recipe(tmp_path, "--synth-lesions", "0.5", "--synth-contrast", "15", "60")[0].training
    assert painted.lesion_synthesis.contrast_hu == (15.0, 60.0) and painted.lesion_synthesis.probability == 0.5


@pytest.mark.parametrize("option, message", [
    (["--synth-lesions", "1.5"], r"--synth-lesions 1.5: .*less than or equal to 1 \(training.lesion_synthesis.probability\)"),
    (["--augment", "-0.1"], r"--augment -0.1: .*greater than or equal to 0 \(training.augment.probability\)"),
    (["--lesion-weight", "-2"], r"--lesion-weight -2: .*\(training.crop_class_weights.pancreatic_lesion\)"),
    (["--synth-contrast", "60", "15"], r"--synth-contrast 60 15: .*\(training.lesion_synthesis.contrast_hu\)"),
    (["--patch", "48", "48", "20"], r"--patch 48 48 20: .*multiple of 8 .* \(training.patch_size\)"),
])
def test_bad_recipe_options_are_refused_naming_the_key(tmp_path: Path, option: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        _recipe(tmp_path, *option)
