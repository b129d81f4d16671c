#!/usr/bin/env python
"""Measure the active-learning scoring cost per scan on a full-size CT (512x512x300 by default).

Writes (once, reused) a phantom CT of the given shape and spacing, then scores it ``--reps`` times
with the app's scorer (``lib.activelearning.scoring``, settings from ``configs/active_learning.yaml``) and the
preset's network (random weights: the cost does not depend on them). Prints a table of the stage
medians (load, pre, localize, uncertainty, total), the CPU time and the load average, and writes
OUT/bench_scoring.csv.

Examples
  python scripts/bench_scoring.py --out /tmp/bench_scoring
  python scripts/bench_scoring.py --out /tmp/bench_scoring --device cuda --preset full
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from pathlib import Path



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the phantom CT and the CSV")
    ap.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300))
    ap.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 1.25))
    ap.add_argument("--preset", default="fast", help="segmentation preset (fast on CPU, full on GPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--config", type=Path, default=None, help="active-learning config (default: configs/active_learning.yaml)")
    args = ap.parse_args(argv)

    import torch

    from lib.core.al_config import load_al_config
    from lib.core.labelmap import load_labelmap
    from pants_tools.phantom import make_case, write_case
    from lib.activelearning.scoring import ScanScorer, load_for_scoring
    from lib.model.segmenter import Segmenter, default_threads
    from lib.core.settings import load_segmentation_config

    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        default_threads()
    out: Path = args.out
    ct = out / f"ct_{'x'.join(map(str, args.shape))}.nii.gz"
    if not ct.is_file():
        print(f"writing a {tuple(args.shape)} phantom CT to {ct} (once)")
        p = make_case(0, shape=args.shape, spacing=args.spacing, seed=0, lesion=True)
        write_case(p, ct, out / "segmentations")
    cfg, lm = load_segmentation_config(), load_labelmap()
    al = load_al_config(args.config) if args.config else load_al_config()
    seg = Segmenter(cfg, lm, args.preset, out / "no_model.pt", args.device)  # random weights
    scorer = ScanScorer(seg, al.scoring)
    net = seg.network()
    rows = []
    for rep in range(args.reps + 1):  # the first run warms up (allocator, kernels) and is not counted
        t0, c0 = time.perf_counter(), time.process_time()
        vol = load_for_scoring(ct)
        t_load = time.perf_counter() - t0
        s = scorer.score_volume(vol, net)
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
        if rep:
            rows.append({"load": t_load, **s.seconds, "total": total, "cpu": cpu, "loadavg": os.getloadavg()[0]})
        print(f"run {rep}{' (warm-up)' if not rep else ''}: {total:.2f} s {s.seconds} crop {s.crop_shape}")
    keys = ["load", "pre", "localize", "uncertainty", "total", "cpu", "loadavg"]
    med = {k: statistics.median(r[k] for r in rows) for k in keys}
    print()
    print(f"scoring cost per scan, {tuple(args.shape)} CT at {tuple(args.spacing)} mm, preset {args.preset}, "
          f"{args.device}, {torch.get_num_threads()} threads, {al.scoring.mc_samples} stochastic passes, "
          f"localize at {al.scoring.localize_spacing_mm} mm, crop <= {al.scoring.max_crop_voxels}; median of {len(rows)}")
    print(f"{'stage':<12} {'seconds':>8}")
    for k in keys[:5]:
        print(f"{k:<12} {med[k]:>8.2f}")
    # Wall time depends on what else runs on the machine; CPU time (all threads) hardly does.
    print(f"CPU time {med['cpu']:.2f} s over {torch.get_num_threads()} threads; "
          f"1-min load average {med['loadavg']:.2f} on {os.cpu_count()} cores")
    budget = al.scoring.cost_budget_s
    print(f"budget {budget:.1f} s: {'met' if med['total'] <= budget else 'NOT met'}")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_scoring.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: round(r[k], 3) for k in keys})  # per run
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
