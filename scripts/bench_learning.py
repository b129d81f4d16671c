#!/usr/bin/env python
"""Learning benchmark: train the app's model on adult-size phantoms, test on held-out ones.

The phantoms keep adult anatomy (body scale 1: a 370 x 370 x 400 mm field of view) at a coarse
grid, so lesions keep PanTS sizes. Training scans come from all five phantom centers, about 11%
with a lesion (evenly spread); the test split forces a lesion on ``--test-lesions`` of its scans so
that lesion DSC and detection AUC have enough cases. Training is the train task itself
(``lib/trainers/segmentation.py``, as ``POST /train/segmentation`` runs it, center-stratified
validation included), with the recipe of ``configs/presets.yaml`` for this device unless options
below change it. Testing segments each held-out phantom with the infer code (``lib/model/segmenter.py``)
at its own grid and scores it with ``lib/metrics.py``.

It prints DSC per class (mean over test scans where the class is present), whole pancreas, lesion
DSC on lesion-positive scans, lesion-detection AUC (score: predicted lesion volume), the training
wall and CPU minutes, and the peak RSS; ``--out`` gets ``summary.json`` and ``per_class.csv``.
The phantom set is kept in ``--data`` and reused by later runs with the same geometry.

Examples:
    .venv/bin/pants-label bench-learning --out out/bench_learning
    .venv/bin/pants-label bench-learning --out /tmp/bl --n-train 12 --n-test 4 --steps 40 --lr 2e-4
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

import numpy as np
import torch
from tqdm import tqdm

from lib.datastore.folder_scan import read_mask_folder
from lib.datastore.pants import PanTSDatastore
from lib.core.labelmap import LabelMap, load_labelmap
from lib.model.metrics import LESION_CLASS, auc_score, lesion_score_from_label, mean_dice
from lib.model.model_store import model_path, publish, read_json, write_json_atomic
from pants_tools.phantom import write_pants_tree
from pants_tools.training_options import with_recipe_options
from lib.model.segmenter import Segmenter
from lib.core.settings import SegmentationConfig, load_segmentation_config
from lib.trainers.segmentation import PanTSTrain
from lib.imaging.volume_io import load_volume

#: large organs with their own target (issue: >= 0.90)
LARGE_ORGANS = ("liver", "spleen", "kidney_left", "kidney_right", "stomach", "aorta", "postcava")
PHANTOM_NOTE = ("phantom model: trained on synthetic PanTS-layout phantoms (scripts/bench_learning.py); "
                "it shows the app working and is not for real CT")
TARGETS = {"mean": 0.80, "large_organs": 0.90, "whole_pancreas": 0.85, "lesion": 0.60, "lesion_auc": 0.90}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_learning.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="results folder")
    p.add_argument("--data", type=Path, default=None, help="phantom set (default: data/bench_learning_<geometry>)")
    p.add_argument("--n-train", type=int, default=40, help="labelled phantoms (the trainer holds 20%% out for validation)")
    p.add_argument("--n-test", type=int, default=10, help="held-out test phantoms")
    p.add_argument("--test-lesions", type=int, default=5, help="test phantoms with a forced lesion")
    p.add_argument("--train-lesions", type=int, default=None,
                   help="training phantoms with a lesion, spread evenly (default: 11%%, PanTS's share); "
                        "another count gets a phantom set of its own")
    p.add_argument("--shape", type=int, nargs=3, default=(128, 128, 112), help="phantom array size")
    p.add_argument("--spacing", type=float, nargs=3, default=(2.9, 2.9, 3.6), help="phantom voxel size, mm")
    p.add_argument("--data-seed", type=int, default=0, help="phantom seed")
    p.add_argument("--preset", default="fast", help="presets.yaml preset to train")
    p.add_argument("--steps", type=int, default=None, help="training iterations in all (default: the preset's recipe)")
    p.add_argument("--evals", type=int, default=5, help="validations during training (epochs)")
    p.add_argument("--lr", type=float, default=None, help="learning rate")
    p.add_argument("--batch", type=int, default=None, help="batch size")
    p.add_argument("--patch", type=int, nargs=3, default=None, help="patch size")
    p.add_argument("--lesion-weight", type=float, default=None, help="crop-centre weight of the lesion class")
    p.add_argument("--dice-over", choices=["all_classes", "present_classes"], default=None,
                   help="the loss's Dice term: every class, or those in the crop (default: presets.yaml)")
    p.add_argument("--augment", type=float, default=None,
                   help="share of training crops rotated and scaled at random (presets.yaml training.augment)")
    p.add_argument("--synth-lesions", type=float, default=None, metavar="P",
                   help="share of lesion-free gland crops given a synthetic lesion (presets.yaml "
                        "training.lesion_synthesis)")
    p.add_argument("--synth-contrast", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="how much darker than the gland a synthetic lesion is, HU, drawn uniformly "
                        "(presets.yaml training.lesion_synthesis.contrast_hu)")
    p.add_argument("--seed", type=int, default=None, help="training seed (initial weights, crops)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--save-model", type=Path, default=None,
                   help="folder to write the trained weights to, with a phantom-model card (model_card.json)")
    return p


def make_data(args: argparse.Namespace) -> Path:
    geo = "x".join(map(str, args.shape)) + "_" + "x".join(f"{s:g}" for s in args.spacing)
    k = max(1, round(0.11 * args.n_train)) if args.train_lesions is None else args.train_lesions
    if not 0 <= k <= args.n_train:
        raise SystemExit(f"--train-lesions {k}: must be between 0 and --n-train {args.n_train}")
    # The skip-complete-cases resume of write_pants_tree cannot tell lesion shares apart: own folder.
    tag = "" if args.train_lesions is None else f"_tl{k}"
    root = args.data or REPO / "data" / f"bench_learning_{geo}_s{args.data_seed}{tag}"
    n = args.n_train + args.n_test
    lesions = {i: (i * k) // args.n_train != ((i + 1) * k) // args.n_train for i in range(args.n_train)}
    lesions.update({args.n_train + j: j < args.test_lesions for j in range(args.n_test)})
    write_pants_tree(root, n, shape=args.shape, spacing=args.spacing, seed=args.data_seed, n_test=args.n_test,
                     progress=True, lesions=lesions)
    return root


def recipe(cfg: SegmentationConfig, lm: LabelMap, args: argparse.Namespace) -> tuple[SegmentationConfig, dict]:
    """The config to train with and the train request, from presets.yaml plus the options."""
    cfg = cfg.model_copy(update={"training": with_recipe_options(cfg.training, args)})
    request: dict[str, Any] = {"from_scratch": True, "trigger": "scripts/bench_learning.py"}
    if args.steps:
        request["max_epochs"] = args.evals
        request["iterations_per_epoch"] = max(1, math.ceil(args.steps / args.evals))
    if args.lr:
        request["learning_rate"] = args.lr
    if args.batch:
        request["batch_size"] = args.batch
    return cfg, request


def follow(stats_path: Path, done: threading.Event) -> None:
    """A progress bar fed from the train task's stats file (what /info shows as train_stats)."""
    bar = tqdm(total=1000, desc="training", unit="‰")
    while not done.wait(2.0):
        s = read_json(stats_path, default={}) or {}
        bar.n = int(1000 * float(s.get("progress", 0.0)))
        bar.set_postfix(epoch=s.get("epoch"), loss=s.get("loss"), val=s.get("val_metric"))
        bar.refresh()
    bar.close()


def run_training(trainer: PanTSTrain, request: dict, ds: PanTSDatastore) -> tuple[dict, float, float]:
    """Run the train task with a progress bar; (its stats, wall s, CPU s). Closes ``ds``."""
    done = threading.Event()
    watcher = threading.Thread(target=follow, args=(trainer.stats_path, done), daemon=True)
    watcher.start()
    t0, cpu0 = time.time(), time.process_time()
    try:
        stats = trainer(request, ds)
    finally:
        done.set()
        watcher.join()
        ds.close()
    return stats, time.time() - t0, time.process_time() - cpu0


def test(weights: Path, cfg: SegmentationConfig, lm: LabelMap, preset: str, root: Path) -> tuple[list[dict], dict]:
    """Per-scan Dice on the test split, and the summary figures."""
    seg = Segmenter(cfg, lm, preset, weights, "cuda" if torch.cuda.is_available() else "cpu")
    lid = lm.id_of(LESION_CLASS)
    rows, scores, truths, infer_s = [], [], [], []
    for case in tqdm(sorted((root / "ImageTe").iterdir()), desc="testing", unit="scan"):
        vol = load_volume(case / "ct.nii.gz")
        truth = read_mask_folder(root / "LabelTe" / case.name / "segmentations", lm)
        t0 = time.perf_counter()
        pred, _ = seg.segment(vol)
        infer_s.append(time.perf_counter() - t0)
        d = mean_dice(pred, truth, lm)
        present = {c.name for c in lm.classes if (truth == c.id).any()}
        rows.append({"case": case.name, "present": present, **d})
        scores.append(lesion_score_from_label(pred, vol.spacing, lm))
        truths.append(bool((truth == lid).any()))
    per_class = {c.name: nan_free_mean([r[c.name] for r in rows if c.name in r["present"]]) for c in lm.classes}
    summary = {
        "mean": nan_free_mean([r["mean"] for r in rows]),
        "large_organs": nan_free_mean([per_class[n] for n in LARGE_ORGANS]),
        "whole_pancreas": nan_free_mean([r["whole_pancreas"] for r in rows]),
        "lesion": nan_free_mean([r[LESION_CLASS] for r, t in zip(rows, truths) if t]),
        "lesion_auc": auc_score(scores, truths) if any(truths) and not all(truths) else math.nan,
        "test_scans": len(rows),
        "lesion_scans": int(sum(truths)),
        "infer_s_per_scan": round(float(np.mean(infer_s)), 2),
    }
    return [{"class": k, "dsc": v} for k, v in per_class.items()], summary


def save_model(weights: Path, args: argparse.Namespace, summary: dict, per_class: list[dict]) -> Path:
    """Publish the weights into ``args.save_model`` with a card saying it is a phantom model."""
    blob = torch.load(weights, map_location="cpu", weights_only=True)
    card = {**blob["meta"], "phantom_model": True, "note": PHANTOM_NOTE,
            "command": "python scripts/" + Path(sys.argv[0]).name + " " + " ".join(sys.argv[1:]),
            "phantoms": {"n_train": args.n_train, "n_test": args.n_test, "shape": list(args.shape),
                         "spacing_mm": list(args.spacing), "seed": args.data_seed},
            "test_dice": {**{r["class"]: _rounded(r["dsc"]) for r in per_class},  # None: in no test scan
                          **{k: _rounded(summary[k]) for k in TARGETS}},
            "train_wall_s": round(summary["train_wall_min"] * 60, 1), "train_cpu_s": round(summary["train_cpu_min"] * 60, 1),
            "threads": args.threads, "device": summary["device"], "torch": str(torch.__version__)}
    out = model_path(args.save_model, args.preset)
    publish(blob["state_dict"], card, out)
    write_json_atomic(args.save_model / "model_card.json", card)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) and its model_card.json")
    return out


def _rounded(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)


def nan_free_mean(xs: list[float]) -> float:
    """Mean of the values that are not NaN (NaN when there are none)."""
    xs = [x for x in xs if not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else math.nan


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    lm = load_labelmap()
    root = make_data(args)
    cfg, request = recipe(load_segmentation_config(), lm, args)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench_learning_") as tmp:
        work = Path(tmp)
        ds = PanTSDatastore(root, state_dir=work / "state", hide_imported_labels=False, labelmap=lm)
        trainer = PanTSTrain(cfg, lm, args.preset, work / "model", "cuda" if torch.cuda.is_available() else "cpu")
        stats, wall, cpu = run_training(trainer, request, ds)
        weights = model_path(work / "model", args.preset)
        if not weights.exists():
            print(f"training published no model: {stats}")
            return 1
        per_class, summary = test(weights, trainer.cfg, lm, args.preset, root)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        summary.update(train_wall_min=round(wall / 60, 2), train_cpu_min=round(cpu / 60, 2), peak_rss_mib=round(peak),
                   iterations=stats.get("iterations"), fastest_iteration_s=stats.get("fastest_iteration_s"),
                   val_metric=stats.get("best_metric"), request=request, patch=stats.get("patch"),
                   batch_size=stats.get("batch_size"), data=str(root), threads=args.threads,
                   device="cuda" if torch.cuda.is_available() else "cpu", torch=str(torch.__version__))
        if args.save_model:
            save_model(weights, args, summary, per_class)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    with open(args.out / "per_class.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["class", "dsc"])
        w.writeheader()
        w.writerows(per_class)
    print(f"\n{'class':<28} test DSC")
    for r in per_class:
        print(f"{r['class']:<28} {r['dsc']:.3f}")
    print(f"\n{'figure':<28} {'value':>8} {'target':>8}")
    for k, target in TARGETS.items():
        v = summary[k]
        print(f"{k:<28} {v:>8.3f} {'>= ' + format(target, '.2f'):>8} {'met' if v >= target else 'MISSED'}")
    print(f"\n{summary['test_scans']} test scans ({summary['lesion_scans']} with a lesion); "
          f"{summary['iterations']} iterations, patch {summary['patch']} x {summary['batch_size']}; "
          f"training wall {summary['train_wall_min']} min, CPU {summary['train_cpu_min']} min; "
          f"peak RSS {summary['peak_rss_mib']} MiB; infer {summary['infer_s_per_scan']} s/scan")
    return 0


if __name__ == "__main__":
    sys.exit(main())
