#!/usr/bin/env python
"""Second-stage benchmark: does a finer model over the pancreas find what the whole-body model misses?

Stage 1 is a whole-body model (default: the committed demo model, ``fast`` preset at 6 mm, trained
on the learning benchmark's phantoms). Stage 2 (``lib/model/pancreas_stage.py``, preset
``pancreas`` at 2 mm) is trained here with the app's own train task on boxes around the pancreas
region of the same training phantoms (two boxes per scan, margins ``--margins``), then tested on the
held-out phantoms: stage 1 segments the whole scan, the box around its predicted pancreas region
goes to stage 2, and stage 2 decides that region (:func:`merge`). Printed: DSC per pancreas-region
class, whole pancreas, lesion DSC on lesion-positive scans, detection AUC and mean DSC, for stage 1
alone and for both stages, with training wall and CPU minutes; ``--out`` gets ``summary.json``.

The phantom set is the learning benchmark's (``scripts/bench_learning.py`` makes it, same options).

Examples:
    .venv/bin/pants-label bench-two-stage --out out/bench_two_stage
    .venv/bin/pants-label bench-two-stage --out /tmp/b2 --steps 200 --save-model /tmp/stage2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # bench_learning.py lives beside this script

import bench_learning  # noqa: E402
from lib.core.labelmap import LabelMap, load_labelmap  # noqa: E402
from lib.core.settings import load_segmentation_config  # noqa: E402
from lib.datastore.folder_scan import read_mask_folder  # noqa: E402
from lib.datastore.pants import PanTSDatastore  # noqa: E402
from lib.imaging.volume_io import load_volume  # noqa: E402
from lib.model.metrics import LESION_CLASS, auc_score, lesion_score_from_label, mean_dice  # noqa: E402
from lib.core.atomic import write_json_atomic  # noqa: E402
from lib.model.model_store import model_path, publish  # noqa: E402
from lib.model.pancreas_stage import crop, merge, region_box, write_crop_case  # noqa: E402
from lib.model.segmenter import Segmenter  # noqa: E402
from lib.trainers.segmentation import PanTSTrain  # noqa: E402

DEMO = REPO / "apps" / "pants_label" / "demo_model" / "segresnet_fast.pt"
STAGE2 = "pancreas"


def build_parser() -> argparse.ArgumentParser:
    p = bench_learning.build_parser()
    p.prog, p.description, p.epilog = "bench_two_stage.py", __doc__.split("\n\n")[0], __doc__.split("\n\n", 1)[1]
    p.set_defaults(preset=STAGE2)
    p.add_argument("--stage1", type=Path, default=DEMO, help="whole-body weights (preset fast)")
    p.add_argument("--margins", type=float, nargs="+", default=(16.0, 32.0), help="training box margins, mm")
    p.add_argument("--test-margin", type=float, default=load_segmentation_config().second_stage.margin_mm,
                   help="margin of the box around stage 1's pancreas, mm (default: infer's, configs/presets.yaml)")
    p.add_argument("--lesion-boxes", type=int, default=0,
                   help="extra boxes per lesion-positive training scan, shifted at random by up to 16 mm")
    return p


def write_crops(root: Path, out: Path, lm: LabelMap, margins: list[float], lesion_boxes: int = 0) -> int:
    """Stage 2's training set: boxes around each training phantom's pancreas, PanTS layout; scans
    with a lesion get ``lesion_boxes`` more, shifted (lesions are rare: 11% of scans)."""
    rng = np.random.default_rng(0)
    lid = lm.id_of(LESION_CLASS)
    n = 0
    for case in tqdm(sorted((root / "ImageTr").iterdir()), desc="crops", unit="scan"):
        vol = load_volume(case / "ct.nii.gz")
        label = read_mask_folder(root / "LabelTr" / case.name / "segmentations", lm)
        for k, margin in enumerate(margins):
            box = region_box(label, lm, vol.spacing, margin)
            if box is None:
                continue
            cid = f"{case.name}m{k}"
            write_crop_case(vol, label, lm, box, out / "ImageTr" / cid / "ct.nii.gz",
                            out / "LabelTr" / cid / "segmentations")
            n += 1
        if not (label == lid).any():
            continue
        for k in range(lesion_boxes):
            box = region_box(label, lm, vol.spacing, float(rng.uniform(16, 32)))
            shift = [int(rng.integers(-16, 17) / sp) for sp in vol.spacing]
            box = tuple(slice(max(b.start + d, 0), min(b.stop + d, size))
                        for b, d, size in zip(box, shift, label.shape))
            cid = f"{case.name}l{k}"
            write_crop_case(vol, label, lm, box, out / "ImageTr" / cid / "ct.nii.gz",
                            out / "LabelTr" / cid / "segmentations")
            n += 1
    return n


def evaluate(stage1: Segmenter, stage2: Segmenter, lm: LabelMap, root: Path, margin: float) -> dict[str, dict]:
    """Per-stage summaries on the test split."""
    lid = lm.id_of(LESION_CLASS)
    region = [c.name for c in lm.classes if c.group == "pancreas"]
    rows: dict[str, list[dict]] = {"stage1": [], "two_stage": []}
    scores: dict[str, list[float]] = {"stage1": [], "two_stage": []}
    truths, seconds = [], []
    for case in tqdm(sorted((root / "ImageTe").iterdir()), desc="testing", unit="scan"):
        vol = load_volume(case / "ct.nii.gz")
        truth = read_mask_folder(root / "LabelTe" / case.name / "segmentations", lm)
        first, _ = stage1.segment(vol)
        t0 = time.perf_counter()
        box = region_box(first, lm, vol.spacing, margin)
        both = first
        if box is not None:
            second, _ = stage2.segment(crop(vol, box))
            both = merge(first, second, box, lm)
        seconds.append(time.perf_counter() - t0)
        present = {c.name for c in lm.classes if (truth == c.id).any()}
        truths.append(bool((truth == lid).any()))
        for name, pred in (("stage1", first), ("two_stage", both)):
            rows[name].append({"present": present, **mean_dice(pred, truth, lm)})
            scores[name].append(lesion_score_from_label(pred, vol.spacing, lm))
    out = {}
    for name, rs in rows.items():
        out[name] = {
            **{c: bench_learning.nan_free_mean([r[c] for r in rs if c in r["present"]]) for c in region},
            "whole_pancreas": bench_learning.nan_free_mean([r["whole_pancreas"] for r in rs]),
            "lesion": bench_learning.nan_free_mean([r[LESION_CLASS] for r, t in zip(rs, truths) if t]),
            "lesion_auc": auc_score(scores[name], truths) if any(truths) and not all(truths) else math.nan,
            "mean": bench_learning.nan_free_mean([r["mean"] for r in rs]),
        }
    out["two_stage"]["stage2_s_per_scan"] = round(float(np.mean(seconds)), 2)
    return out


def save_model(weights: Path, args: argparse.Namespace, summary: dict) -> Path:
    """Publish stage 2 into ``args.save_model`` with a phantom-model card (``model_card_<preset>.json``
    beside it, and inside the weights file)."""
    blob = torch.load(weights, map_location="cpu", weights_only=True)
    card = {**blob["meta"], "phantom_model": True, "note": bench_learning.PHANTOM_NOTE,
            "command": "python scripts/" + Path(sys.argv[0]).name + " " + " ".join(sys.argv[1:]),
            "phantoms": {"n_train": args.n_train, "n_test": args.n_test, "shape": list(args.shape),
                         "spacing_mm": list(args.spacing), "seed": args.data_seed},
            "stage1_weights": Path(summary["stage1_weights"]).name, "training_boxes": summary["crops"],
            "test_dice": {"stage1": _rounded(summary["stage1"]), "two_stages": _rounded(summary["two_stage"])},
            "train_wall_s": round(summary["train_wall_min"] * 60, 1), "train_cpu_s": round(summary["train_cpu_min"] * 60, 1),
            "threads": args.threads, "device": summary["device"], "torch": str(torch.__version__)}
    out = model_path(args.save_model, args.preset)
    publish(blob["state_dict"], card, out)
    write_json_atomic(args.save_model / f"model_card_{args.preset}.json", card)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) and its model_card_{args.preset}.json")
    return out


def _rounded(d: dict) -> dict:
    return {k: None if isinstance(v, float) and math.isnan(v) else round(float(v), 4) for k, v in d.items()}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    lm = load_labelmap()
    root = bench_learning.make_data(args)
    cfg, request = bench_learning.recipe(load_segmentation_config(), lm, args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench_two_stage_") as tmp:
        work = Path(tmp)
        n = write_crops(root, work / "crops", lm, list(args.margins), args.lesion_boxes)
        ds = PanTSDatastore(work / "crops", state_dir=work / "state", labelmap=lm)
        trainer = PanTSTrain(cfg, lm, args.preset, work / "model", device)
        stats, wall, cpu = bench_learning.run_training(trainer, request, ds)
        weights = model_path(work / "model", args.preset)
        if not weights.exists():
            print(f"training published no model: {stats}")
            return 1
        stage1 = Segmenter(load_segmentation_config(), lm, "fast", args.stage1, device)
        stage2 = Segmenter(trainer.cfg, lm, args.preset, weights, device)
        result = evaluate(stage1, stage2, lm, root, args.test_margin)
        summary = {**result, "train_wall_min": round(wall / 60, 2), "train_cpu_min": round(cpu / 60, 2),
                   "crops": n, "iterations": stats.get("iterations"), "val_metric": stats.get("best_metric"),
                   "request": request, "stage1_weights": str(args.stage1), "data": str(root), "device": device}
        if args.save_model:
            save_model(weights, args, summary)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    keys = [k for k in result["stage1"]]
    print(f"\n{'test DSC':<22} {'stage 1':>8} {'2 stages':>9}")
    for k in keys:
        print(f"{k:<22} {result['stage1'][k]:>8.3f} {result['two_stage'][k]:>9.3f}")
    print(f"\nstage 2: {n} training boxes, {stats.get('iterations')} iterations, training wall {summary['train_wall_min']} "
          f"min, CPU {summary['train_cpu_min']} min; {result['two_stage']['stage2_s_per_scan']} s per test scan")
    return 0


if __name__ == "__main__":
    sys.exit(main())
