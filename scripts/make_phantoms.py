#!/usr/bin/env python
"""Write synthetic abdominal CT phantoms in the public PanTS layout.

Each case gets ``ImageTr/PanTS_XXXXXXXX/ct.nii.gz`` (int16 HU) and one binary mask per
PanTS class in ``LabelTr/PanTS_XXXXXXXX/segmentations/<name>.nii.gz``; the last
``--n-test`` cases go to ``ImageTe/`` and ``LabelTe/``. ``metadata.csv`` (or ``.xlsx``)
lists center, contrast phase, age, sex, spacing, diagnosis and tumor for every case.
About 11% of cases carry a pancreatic lesion (``--lesions all``/``none`` forces it on or off;
``--cohort`` draws centers, phases, lesions and their volumes from a PanTS cohort spec).
Re-running the same command skips cases that are already complete, so an interrupted run can
simply be started again.

Examples:
    python scripts/make_phantoms.py --out data/phantoms --n 20
    python scripts/make_phantoms.py --out /tmp/big --n 4 --shape 512 512 300 --metadata xlsx
    # 24 tumour scans that follow the PanTS cohort (configs/cohort_pants.yaml), all in the test split
    python scripts/make_phantoms.py --out /tmp/lesions --n 24 --n-test 24 --cohort --lesions all --seed 77
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path


from lib.core.errors import ConfigError
from lib.imaging.metadata import read_metadata
from pants_tools.cohort import DEFAULT_COHORT, load_cohort
from pants_tools.phantom import write_pants_tree


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="make_phantoms.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--out", required=True, type=Path, metavar="DIR", help="dataset folder to create or complete")
    add("--n", type=_positive_int, default=20, help="number of cases in total (default: 20)")
    add("--shape", type=_positive_int, nargs=3, default=None, metavar=("X", "Y", "Z"),
        help="voxels per axis: right->left, anterior->posterior, inferior->superior "
             "(default: 96 96 64, or the cohort's)")
    add("--spacing", type=_positive_float, nargs=3, default=None, metavar=("SX", "SY", "SZ"),
        help="voxel size in mm (default: 0.8 0.8 1.25, or the cohort's); the anatomy is scaled to the field of view")
    add("--cohort", type=Path, nargs="?", const=DEFAULT_COHORT, default=None, metavar="YAML",
        help="draw centers, phases, tumours and tumour volumes from a PanTS cohort spec "
             "(default configs/cohort_pants.yaml), at its geometry unless --shape/--spacing are given")
    add("--lesions", choices=("drawn", "all", "none"), default="drawn",
        help="pancreatic lesions: drawn at the prevalence (default), in every case, or in none")
    add("--seed", type=int, default=0,
        help="dataset seed; the same seed, shape and spacing give identical files (default: 0)")
    add("--n-test", type=int, default=0, metavar="N",
        help="put the last N cases in ImageTe/LabelTe as a test split (default: 0)")
    add("--metadata", choices=("csv", "xlsx"), default="csv", help="metadata file format (default: csv)")
    add("--no-progress", action="store_true", help="do not show a progress bar")
    return parser


def _disk_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.n_test <= args.n:
        parser.error(f"--n-test must be between 0 and --n ({args.n}), got {args.n_test}")
    cohort = None
    if args.cohort is not None:
        try:
            cohort = load_cohort(args.cohort.resolve())
        except (ConfigError, OSError) as err:
            parser.error(f"--cohort: {err}")
    shape = args.shape or (cohort.geometry.shape if cohort else (96, 96, 64))
    spacing = args.spacing or (cohort.geometry.spacing_mm if cohort else (0.8, 0.8, 1.25))
    forced = {"drawn": None, "all": True, "none": False}[args.lesions]
    try:
        ids = write_pants_tree(
            args.out,
            args.n,
            shape=tuple(shape),
            spacing=tuple(spacing),
            seed=args.seed,
            n_test=args.n_test,
            metadata_format=args.metadata,
            progress=not args.no_progress,
            lesions=None if forced is None else {i: forced for i in range(args.n)},
            cohort=cohort,
        )
    except ValueError as err:  # bad geometry: report like any other bad option
        parser.error(str(err))
    meta_path = args.out / f"metadata.{args.metadata}"
    meta = read_metadata(meta_path)
    rows = [meta[i] for i in ids if i in meta]
    tumors = sum(bool(m.tumor) for m in rows)
    centers = Counter(m.center for m in rows)
    phases = Counter(m.contrast_phase for m in rows)
    print(f"wrote {len(ids)} cases to {args.out} ({len(ids) - args.n_test} train, {args.n_test} test)")
    print(f"  tumor-positive: {tumors} ({100 * tumors / max(len(ids), 1):.1f}%)")
    print(f"  centers: {', '.join(f'{c}={k}' for c, k in sorted(centers.items()))}")
    print(f"  phases:  {', '.join(f'{p}={k}' for p, k in sorted(phases.items()))}")
    print(f"  metadata: {meta_path}")
    print(f"  disk size: {_disk_size(args.out) / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
