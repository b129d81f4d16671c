#!/usr/bin/env python
"""Training speed of the PanTS train task on this machine: iterations/s and epoch time per patch size.

Runs the real train task (lib/trainers/segmentation.py: memmap cache, class-weighted crops, DiceCE,
validation) on synthetic phantoms in a PanTS layout, one short run per patch size, and prints a
table (also written as CSV). Phantoms default to a real CT's field of view (512x512x300 at
0.8x0.8x1.25 mm), at half the in-plane resolution to keep their generation short; at the fast
preset's 3 mm both give the same training grid.

Example
  python scripts/bench_train.py --out runs/bench_train --patches 96 64 48 --iters 3
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "pants_label"))

import torch  # noqa: E402

from lib.datastore import PanTSDatastore  # noqa: E402
from lib.labelmap import load_labelmap  # noqa: E402
from lib.phantom import write_pants_tree  # noqa: E402
from lib.settings import load_segmentation_config  # noqa: E402
from lib.trainers.segmentation import PanTSTrain  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/bench_train"), help="work folder (phantoms, models, CSV)")
    p.add_argument("--n", type=int, default=5, help="phantom scans (one goes to validation)")
    p.add_argument("--shape", type=int, nargs=3, default=(256, 256, 150))
    p.add_argument("--spacing", type=float, nargs=3, default=(1.6, 1.6, 2.5))
    p.add_argument("--preset", choices=("fast", "full"), default="fast")
    p.add_argument("--patches", type=int, nargs="+", default=(96, 64, 48), help="cubic patch sides to time")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=3, help="iterations per epoch (2 epochs are run)")
    args = p.parse_args()

    cfg0, lm = load_segmentation_config(), load_labelmap()
    root = args.out / "PanTS"
    t0 = time.time()
    write_pants_tree(root, args.n, shape=args.shape, spacing=args.spacing, progress=True)
    print(f"phantoms: {args.n} x {tuple(args.shape)} at {tuple(args.spacing)} mm ({time.time() - t0:.1f} s)")
    ds = PanTSDatastore(root)
    rows = []
    for side in args.patches:
        training = cfg0.training.model_copy(update={"patch_size": (side, side, side)})
        cfg = cfg0.model_copy(update={"training": training})
        model_dir = args.out / f"model_p{side}"
        for f in model_dir.glob("segresnet_*.pt"):
            f.unlink()  # no current model: no baseline validation in the timing
        os.makedirs(model_dir, exist_ok=True)
        if rows:  # share the preprocessed cache of the first run
            cache = args.out / f"model_p{args.patches[0]}" / ".cache"
            if not (model_dir / ".cache").exists():
                os.symlink(cache.resolve(), model_dir / ".cache")
        trainer = PanTSTrain(cfg, lm, args.preset, model_dir, "cuda" if torch.cuda.is_available() else "cpu")
        t = time.time()
        s = trainer({"max_epochs": 2, "iterations_per_epoch": args.iters, "batch_size": args.batch, "val_every": 2}, ds)
        wall = time.time() - t
        one_pass = math.ceil(s["train_size"] / args.batch)
        rows.append({
            "patch": "x".join(map(str, s["patch"])), "batch": args.batch, "iterations": 2 * args.iters,
            "it_per_s": s["iterations_per_s"], "epoch_s": s["epoch_time_s"],
            "epoch_one_pass_s": round(one_pass / s["iterations_per_s"], 1), "cache_build_s": s["cache_s"],
            "run_s": round(wall, 1), "val_dice": s.get("best_metric"),
        })
        print(rows[-1])
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"\nTraining speed, preset '{args.preset}', batch {args.batch}, {dev}, torch {torch.__version__}, "
          f"{platform.machine()}; training grid {s.get('patch')} max")
    head = f"{'patch':>10} {'it/s':>7} {'epoch s':>8} {'1 pass s':>9} {'cache s':>8} {'run s':>7}"
    print(head)
    for r in rows:
        print(f"{r['patch']:>10} {r['it_per_s']:>7} {r['epoch_s']:>8} {r['epoch_one_pass_s']:>9} "
              f"{r['cache_build_s']:>8} {r['run_s']:>7}")
    with open(args.out / "bench_train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"\nCSV: {args.out / 'bench_train.csv'}  (epoch s: {args.iters} iterations; "
          f"1 pass s: one pass over the {s['train_size']} training scans)")


if __name__ == "__main__":
    main()
