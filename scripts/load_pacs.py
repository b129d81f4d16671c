#!/usr/bin/env python
"""Load PanTS NIfTI scans (or phantoms) into a DICOMweb server (Orthanc, a PACS).

Each case becomes a study with one CT series (exact geometry; center as InstitutionName,
contrast phase in SeriesDescription/ContrastBolusAgent, patient age and sex from the metadata
table) and, unless ``--no-labels``, its masks as one DICOM SEG with the 28 PanTS segments.
UIDs derive from the case id: loading a case again replaces it instead of duplicating it.
A case whose files are unreadable or whose masks do not fit its CT is skipped with the reason, and
the rest still load; the exit status is then 1 and the last line names the cases to load again.

Examples:
    python scripts/load_pacs.py --url http://127.0.0.1:8042/dicom-web --root data/demo
    python scripts/load_pacs.py --url http://127.0.0.1:8042/dicom-web --root /data/PanTS \\
        --cases PanTS_00000001 PanTS_00000002 --no-labels
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from lib.datastore.dicomweb import make_client
from pants_tools.pacs_load import Skipped, find_cases, load_cases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    ap.add_argument("--root", required=True, type=Path, help="PanTS root (ImageTr/...) or a flat NIfTI folder")
    ap.add_argument("--cases", nargs="+", metavar="ID", help="only these case ids (default: all)")
    ap.add_argument("--limit", type=int, default=0, help="load at most this many cases (0: all)")
    ap.add_argument("--no-labels", action="store_true", help="load the CTs only, not their masks as SEG")
    ap.add_argument("--username", default="", help="HTTP basic auth user of the server")
    ap.add_argument("--password", default="", help="HTTP basic auth password of the server")
    args = ap.parse_args(argv)
    try:
        cases = find_cases(args.root, args.cases)
    except (FileNotFoundError, ValueError) as err:
        ap.error(str(err))
    if args.limit > 0:
        cases = cases[: args.limit]
    if not cases:
        ap.error(f"no cases found under {args.root}")
    client = make_client(args.url, args.username, args.password)
    t0 = time.perf_counter()
    n_seg = n_slices = 0
    loaded: list[str] = []
    skipped: list[Skipped] = []
    try:
        for done in load_cases(client, cases, with_labels=not args.no_labels, progress=True):
            if isinstance(done, Skipped):  # the case's own files: say so, and go on with the rest
                skipped.append(done)
                tqdm.write(f"skipped {done.reason}", file=sys.stderr)
                continue
            loaded.append(done.case_id)
            n_seg += done.seg_uid is not None
            n_slices += done.slices
    except Exception as err:  # network / server refusal: every later case would fail too
        print(f"error: loading into {args.url} failed after {len(loaded)} case(s): {err}", file=sys.stderr)
        return 1
    dt = time.perf_counter() - t0
    print(f"loaded {len(loaded)} case(s), {n_slices} CT slices, {n_seg} SEG into {args.url} in {dt:.1f} s")
    if skipped:
        print(f"skipped {len(skipped)} case(s) whose files are bad (nothing of them was stored); after fixing "
              f"them, load them with --cases {' '.join(s.case_id for s in skipped)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
