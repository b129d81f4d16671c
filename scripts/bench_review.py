#!/usr/bin/env python
"""Review campaign costs at PanTS scale: next sample, listing rebuild and campaign report.

Indexes N scans (default 36,390; index rows only, no image files are read), every one with a
reader's ``final`` label and its provenance; a share of them QA-flagged, reviewed, waiting for a
second reading or flagged for senior review. Then times, as the server runs them:

    review          the review strategy's full call (selection + lease)
    senior_review   the selection of a flagged scan
    listing         GET /datastore/?output=all rebuilt after a change (review vs annotate campaign)
    report          the campaign report (GET /review/report)

Prints median / p95 wall ms and median CPU ms, and writes OUT/bench_review.csv.

Example
  pants-label bench-review --out /tmp/bench_review
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import time
from pathlib import Path


def _time(fn, reps: int) -> tuple[float, float, float]:
    """Median and p95 wall ms, and median CPU ms (steadier on a shared, loaded machine)."""
    wall, cpu = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - t) * 1000)
        cpu.append((time.process_time() - c) * 1000)
    wall.sort()
    return statistics.median(wall), wall[int(0.95 * (len(wall) - 1))], statistics.median(cpu)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="scratch folder (emptied first)")
    ap.add_argument("--n", type=int, default=36390, help="scans")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args(argv)

    from lib.activelearning.review_strategies import ReviewStrategy
    from lib.core.al_config import StrategyConfig
    from lib.datastore.campaign import campaign_report
    from lib.datastore.pants import PanTSDatastore

    root = args.out / "flat"
    shutil.rmtree(args.out, ignore_errors=True)
    root.mkdir(parents=True)
    ds = PanTSDatastore(root, campaign="review")
    ids = [f"PanTS_{i:08d}" for i in range(1, args.n + 1)]
    now = time.time()
    qa = json.dumps({"label": "final v1", "errors": 1, "warnings": 0, "failed": ["laterality"],
                     "findings": [{"check": "laterality", "severity": "error", "structure": "kidney_left",
                                   "message": "kidney_left lies to the patient's right of kidney_right"}]})
    with ds.index.write() as db:
        db.executemany(
            "INSERT INTO images (id, split, path, added_ts, info) VALUES (?, 'flat', ?, ?, ?)",
            ((i, f"@root/{i}.nii.gz", now, json.dumps({"qa": json.loads(qa)}) if k % 50 == 0 else "{}")
             for k, i in enumerate(ids)))
        db.executemany("INSERT INTO labels (image_id, tag, version, path, origin, ts, info) "
                       "VALUES (?, 'final', 1, ?, 'upload', ?, '{}')", ((i, f"@state/{i}.nii.gz", now) for i in ids))
        db.executemany("INSERT INTO current (image_id, tag, version) VALUES (?, 'final', 1)", ((i,) for i in ids))
        db.executemany("INSERT INTO provenance (image_id, tag, version, reader, reader_from, source, seconds, ts) "
                       "VALUES (?, 'final', 1, ?, 'front', 'reader', ?, ?)",
                       ((i, f"reader{k % 23}", 300.0 + k % 600, now - 86400 * (k % 30)) for k, i in enumerate(ids)))
        reviewed = ids[: args.n // 2]  # half reviewed: most done, some waiting or flagged
        phases = ("done",) * 17 + ("second", "flagged", "resolved")
        db.executemany(
            "INSERT INTO review (image_id, phase, start_tag, start_version, first_reader, first_version, first_ts, "
            "double_read, second_reader, agreement) VALUES (?, ?, 'pants', NULL, ?, 1, ?, ?, ?, ?)",
            ((i, phases[k % 20], f"reader{k % 23}", now, int(k % 20 >= 17), f"reader{(k + 1) % 23}"
              if k % 20 >= 18 else None, json.dumps({"liver": 0.95, "pancreatic_lesion": 0.1 * (k % 10)})
              if k % 20 >= 18 else None) for k, i in enumerate(reviewed)))
    ds.index.conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")  # as a long-running server's index is
    results = []
    print(f"{args.n} scans, all with a final label; {len(reviewed)} reviewed")
    print(f"{'what':<28} {'median ms':>10} {'p95 ms':>8} {'CPU ms':>8}")

    def row(what: str, med: float, p95: float, cpu: float) -> None:
        results.append({"what": what, "median_ms": round(med, 2), "p95_ms": round(p95, 2), "cpu_ms": round(cpu, 2)})
        print(f"{what:<28} {med:>10.2f} {p95:>8.2f} {cpu:>8.2f}")

    strategy = ReviewStrategy(StrategyConfig(), seed=0)
    k = iter(range(10**6))
    row("review (select + lease)", *_time(lambda: strategy({"strategy": "review", "client_id": f"c{next(k)}"}, ds),
                                          args.reps))
    row("senior_review (select)", *_time(lambda: ds.review.next_flagged(time.time()), args.reps))

    def rebuild() -> None:
        ds._listing_cache = None
        ds.json_bytes()

    row("listing rebuild, review", *_time(rebuild, max(3, args.reps // 6)))
    ds.review.campaign = "annotate"
    row("listing rebuild, annotate", *_time(rebuild, max(3, args.reps // 6)))
    ds.review.campaign = "review"
    decorate, ds.review.decorate = ds.review.decorate, lambda objects: None
    row("listing rebuild, no review", *_time(rebuild, max(3, args.reps // 6)))  # the listing without this layer
    ds.review.decorate = decorate
    row("campaign report", *_time(lambda: campaign_report(ds), max(3, args.reps // 6)))
    print(f"1-min load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    with open(args.out / "bench_review.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["what", "median_ms", "p95_ms", "cpu_ms"])
        w.writeheader()
        w.writerows(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
