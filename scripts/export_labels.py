#!/usr/bin/env python
"""Export the datastore's labels as PanTS per-structure masks (the release format).

For every scan with a label under the chosen tag(s), writes one binary uint8 mask per class of
configs/labels.yaml, all 28 of them (empty ones included), with the image's affine:

    OUT/LabelTr/<id>/segmentations/<structure>.nii.gz     (training / flat / uploaded scans)
    OUT/LabelTe/<id>/segmentations/<structure>.nii.gz     (the ImageTe test split)

A label map stores one class per voxel, so overlaps of the original masks were resolved by the
label map's overlap priority. On export every class is ``label == id`` except ``pancreas``, the
whole gland, recovered as the ``whole_pancreas`` composite: gland + head + body + tail + duct,
plus lesion components touching them. The dataset folder itself is only read.

Examples
  python scripts/export_labels.py --studies /data/PanTS --out /data/PanTS_release
  python scripts/export_labels.py --studies /data/PanTS --out out --tag final --tag pants   # final, else imported
  python scripts/export_labels.py --studies /ro/PanTS --datastore-dir /scratch/pants_state --out out
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


from lib.core.config_errors import ConfigError
from lib.datastore.export import export_labels
from lib.datastore.pants import FINAL_TAG, IMPORTED_TAG, PanTSDatastore


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="export_labels.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--studies", required=True, type=Path, help="the folder the server serves (--studies)")
    p.add_argument("--out", required=True, type=Path, help="output folder (created; PanTS LabelTr/LabelTe layout)")
    p.add_argument(
        "--tag",
        action="append",
        dest="tags",
        metavar="TAG",
        help=f"label tag to export (default {FINAL_TAG!r}); repeat to fall back in order, "
        f"e.g. --tag final --tag {IMPORTED_TAG}",
    )
    p.add_argument(
        "--datastore-dir",
        type=Path,
        default=None,
        help="the datastore's writable folder if it is not STUDIES/.pants_label (read-only dataset)",
    )
    p.add_argument("--ids", nargs="+", metavar="ID", help="export only these scan ids")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    tags = args.tags or [FINAL_TAG]
    try:
        ds = PanTSDatastore(args.studies, state_dir=args.datastore_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.ids:
        unknown = [i for i in args.ids if not ds.get_image_uri(i)]
        if unknown:
            print(f"error: --ids: unknown scan ids {unknown}", file=sys.stderr)
            return 2
    done = export_labels(ds, args.out, tags=tags, image_ids=args.ids, progress=not args.quiet)
    print(f"exported {len(done)} scans ({', '.join(tags)}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
