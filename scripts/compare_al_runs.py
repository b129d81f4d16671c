#!/usr/bin/env python
"""Put the full-pool references (or any one strategy) of several simulate-al runs side by side, by round.

Each --run is LABEL=OUT, a simulate-al results folder (its runs/<strategy>_s<seed>/rounds.csv are
read, finished or not). Writes into --out a CSV with every row it used (the run's label in column
"run") and a PNG with each metric by round, one line per run (mean over seeds, band = min..max),
and prints each run's last round and whether its reference flattened (simulate-al's rule). Use it to
choose a training setting on the tuning seeds: the reference that gains more with the same steps.

Example (docs/active_learning_experiments.md, "Fourth design"):
  pants-label compare-al-runs --run "lr 3e-4=out/al_cohort_v3" --run "lr 1e-3=out/al_lr_probe" \\
      --seeds 0 --out docs/al_lr_seed0
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compare_al_runs.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, metavar="LABEL=OUT",
                   help="a legend label and a simulate-al --out folder; repeat for each run")
    p.add_argument("--strategy", default="full", help="whose rows to compare (default: the full-pool reference)")
    p.add_argument("--seeds", nargs="+", help="only these seeds (default: every seed the runs have)")
    p.add_argument("--metrics", nargs="+", default=["mean_dsc", "lesion_dsc", "lesion_auc"])
    p.add_argument("--out", type=Path, required=True, help="writes OUT.csv and OUT.png")
    return p


def parse_run(text: str) -> tuple[str, Path]:
    label, sep, folder = text.partition("=")
    if not sep or not label or not folder:
        raise SystemExit(f"--run {text!r}: expected LABEL=OUT, e.g. 'lr 1e-3=out/al_lr_probe'")
    path = Path(folder)
    if not (path / "runs").is_dir():
        raise SystemExit(f"--run {text!r}: {path} has no runs/ folder (not a simulate-al --out)")
    return label, path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pants_tools.al_campaign import FIELDS, plot_by_round, read_rows, reference_trend, trend_sentence

    runs = [parse_run(r) for r in args.run]
    if len({label for label, _ in runs}) < len(runs):
        raise SystemExit("--run: each run needs its own label")
    rows: list[dict[str, str]] = []
    for label, folder in runs:
        mine = [r for f in sorted((folder / "runs").glob(f"{args.strategy}_s*/rounds.csv")) for r in read_rows(f)
                if r["strategy"] == args.strategy and (not args.seeds or r["seed"] in args.seeds)]
        if not mine:
            raise SystemExit(f"--run {label}={folder}: no {args.strategy!r} rows"
                             + (f" for seeds {' '.join(args.seeds)}" if args.seeds else ""))
        missing = [m for m in args.metrics if m not in mine[0]]
        if missing:
            raise SystemExit(f"--metrics: {', '.join(missing)} not in the rows (have {', '.join(mine[0])})")
        rows += [{**r, "run": label} for r in mine]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["run", *FIELDS], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    # plot_by_round groups by "strategy": let each run be one
    plot_by_round([{**r, "strategy": r["run"]} for r in rows], args.out.with_suffix(".png"), tuple(args.metrics),
                  groups={label: label for label, _ in runs})
    print(f"{'run':<16} {'rounds':>6} " + " ".join(f"{m:>11}" for m in args.metrics) + "  (last round, mean over seeds)")
    for label, _ in runs:
        mine = [r for r in rows if r["run"] == label]
        last = max(int(r["round"]) for r in mine)
        at_last = [r for r in mine if int(r["round"]) == last]
        vals = [sum(float(r[m]) for r in at_last) / len(at_last) for m in args.metrics]
        print(f"{label:<16} {last + 1:>6} " + " ".join(f"{v:>11.4f}" for v in vals))
        print(f"  {trend_sentence(reference_trend(mine, strategy=args.strategy), name=label)}")
    print(f"wrote {args.out.with_suffix('.csv')}, {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
