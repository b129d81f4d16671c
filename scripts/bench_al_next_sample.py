#!/usr/bin/env python
"""Next-sample latency of every active-learning strategy from stored scores at PanTS scale.

Indexes N scans (default 36,390; rows only, no image files are read), stores a score row per scan
(uncertainty, lesion probability, priority, center|phase group, 128-d embedding), labels
``--labelled`` of them, then times each strategy's full call (selection + lease) as the server
runs it. Prints median / p95 per strategy and writes OUT/bench_al_next_sample.csv.

Example
  python scripts/bench_al_next_sample.py --out /tmp/bench_al
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import time
from pathlib import Path



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=36390)
    ap.add_argument("--labelled", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args(argv)
    import numpy as np

    from lib.core.al_config import StrategyConfig
    from lib.datastore.pants import PanTSDatastore
    from lib.activelearning.scoring import INFO_KEY
    from lib.activelearning.strategies import make_strategies

    root = args.out / "flat"
    shutil.rmtree(args.out, ignore_errors=True)
    root.mkdir(parents=True)
    ds = PanTSDatastore(root)
    rng = np.random.default_rng(0)
    ids = [f"PanTS_{i:08d}" for i in range(1, args.n + 1)]
    now = time.time()
    with ds.index.write() as db:
        db.executemany("INSERT INTO images (id, split, path, added_ts) VALUES (?, 'flat', ?, ?)",
                       ((i, f"@root/{i}.nii.gz", now) for i in ids))
    rows = []
    for k, i in enumerate(ids):
        e = rng.normal(size=128).astype(np.float32)
        u, lp = float(rng.random()), float(rng.random() ** 8)
        rows.append({"image_id": i, "model_version": "v1", "uncertainty": u, "lesion_prob": lp,
                     "priority": u * (1 + 2 * lp), "grp": f"center_{k % 145:03d}|{('venous', 'arterial')[k % 2]}",
                     "embedding": (e / np.linalg.norm(e)).astype(np.float16).tobytes(), "ts": now,
                     "info": {"uncertainty": u}})
    ds.store_scores(rows, INFO_KEY)
    with ds.index.write() as db:  # labelled scans (final labels) for diversity and balance
        db.executemany("INSERT INTO current (image_id, tag, version) VALUES (?, 'final', 1)",
                       ((i,) for i in ids[: args.labelled]))
    results = []
    print(f"{args.n} scans, {args.labelled} labelled; each call selects and leases one scan")
    print(f"{'strategy':<12} {'median ms':>10} {'p95 ms':>8}")
    for name, s in make_strategies(StrategyConfig(), seed=0).items():
        times = []
        for r in range(args.reps):
            t = time.perf_counter()
            res = s({"strategy": name, "client_id": f"c{r}"}, ds)
            times.append((time.perf_counter() - t) * 1000)
            assert res.get("id"), res
        times.sort()
        med, p95 = statistics.median(times), times[int(0.95 * (len(times) - 1))]
        results.append({"strategy": name, "median_ms": round(med, 2), "p95_ms": round(p95, 2)})
        print(f"{name:<12} {med:>10.2f} {p95:>8.2f}")
    print(f"1-min load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    with open(args.out / "bench_al_next_sample.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["strategy", "median_ms", "p95_ms"])
        w.writeheader()
        w.writerows(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
