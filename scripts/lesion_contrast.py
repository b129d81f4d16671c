#!/usr/bin/env python
"""How visible are the lesions of a PanTS-layout set? Their contrast, and the best a threshold does.

For each scan with a lesion: its contrast phase and diagnosis (``metadata.xlsx``/``.csv``, where present), the
lesion's volume, the mean and s.d. of HU in the lesion and in the rest of the pancreas region, and
the best lesion DSC that any single threshold "HU below the gland's median" reaches inside the
*true* pancreas region, after smoothing with a Gaussian of ``--sigma`` voxels taken over the region
only. That rule is told where the pancreas is and picks its threshold per scan after seeing the
answer: a model that reads intensity alone cannot beat it on average, so it says how hard the
lesions are before any model is blamed. PDAC and cysts are darker than the enhancing gland, hence
thresholds below it. Printed: one row per scan, then the mean by contrast phase.

Examples:
    .venv/bin/pants-label lesion-contrast --images data/bench_learning_128x128x112_2.9x2.9x3.6_s0_tl20
    .venv/bin/pants-label lesion-contrast --images out/lesion_probe/pool --split test --csv /tmp/contrast.csv
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # bench_two_stage.py lives beside this script

from lib.core.labelmap import load_labelmap  # noqa: E402
from lib.datastore.folder_scan import PANTS_SPLITS, read_mask_folder  # noqa: E402
from lib.imaging.metadata import CaseMeta, find_metadata, read_metadata  # noqa: E402
from lib.imaging.volume_io import load_volume  # noqa: E402
from lib.model.metrics import LESION_CLASS  # noqa: E402
THRESHOLDS_HU = np.arange(-100.0, 0.1, 2.0)  # below the gland's median


def best_threshold_dsc(ct: np.ndarray, region: np.ndarray, lesion: np.ndarray, sigma: float) -> tuple[float, float]:
    """(best DSC, its threshold in HU below the gland's median) of ``region & (smoothed HU < t)``."""
    if sigma > 0:  # normalised convolution: HU outside the region does not leak in
        w = ndimage.gaussian_filter(region.astype(np.float32), sigma)
        hu = ndimage.gaussian_filter(np.where(region, ct, 0).astype(np.float32), sigma) / np.maximum(w, 1e-3)
    else:
        hu = ct.astype(np.float32)
    gland = region & ~lesion
    rel = hu - float(np.median(hu[gland])) if gland.any() else hu
    size = float(lesion.sum())
    best, at = 0.0, float("nan")
    for t in THRESHOLDS_HU:
        pred = region & (rel < t)
        d = 2.0 * float((pred & lesion).sum()) / max(1.0, float(pred.sum()) + size)
        if d > best:
            best, at = d, float(t)
    return best, at


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lesion_contrast.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, required=True, help="PanTS-layout root (ImageTr/, LabelTr/, metadata.csv)")
    p.add_argument("--split", choices=sorted(PANTS_SPLITS), default="train")
    p.add_argument("--sigma", type=float, default=1.0, help="Gaussian smoothing, voxels (0: none)")
    p.add_argument("--csv", type=Path, default=None, help="write the per-scan rows here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.sigma < 0:
        raise SystemExit(f"--sigma {args.sigma}: must be 0 or more")
    img_dir, lab_dir = (args.images / d for d in PANTS_SPLITS[args.split])
    if not img_dir.is_dir():
        raise SystemExit(f"{args.images}: no {img_dir.name}/ for --split {args.split}")
    table_path = find_metadata(args.images)
    meta: dict[str, CaseMeta] = read_metadata(table_path) if table_path else {}
    lm = load_labelmap()
    lid = lm.id_of(LESION_CLASS)
    region_ids = [c.id for c in lm.classes if c.group == "pancreas"]
    rows = []
    for case in tqdm(sorted(p for p in img_dir.iterdir() if p.is_dir()), desc="scans", unit="scan"):
        truth = read_mask_folder(lab_dir / case.name / "segmentations", lm)
        lesion = truth == lid
        if not lesion.any():
            continue
        vol = load_volume(case / "ct.nii.gz")
        ct = np.asarray(vol.array, dtype=np.float32)
        region = np.isin(truth, region_ids)
        gland = region & ~lesion
        dsc, at = best_threshold_dsc(ct, region, lesion, args.sigma)
        m = meta.get(case.name)
        rows.append({"case": case.name, "contrast_phase": (m and m.contrast_phase) or "",
                     "diagnosis": (m and m.diagnosis) or "",
                     "lesion_ml": float(lesion.sum()) * float(np.prod(vol.spacing)) / 1000.0,
                     "lesion_hu": float(ct[lesion].mean()), "lesion_hu_sd": float(ct[lesion].std()),
                     "gland_hu": float(ct[gland].mean()) if gland.any() else float("nan"),
                     "gland_hu_sd": float(ct[gland].std()) if gland.any() else float("nan"),
                     "best_dsc": dsc, "threshold_hu": at})
    if not rows:
        raise SystemExit(f"{img_dir}: no scan with a {LESION_CLASS} mask")
    print(f"\n| scan | phase | diagnosis | lesion mL | lesion HU | gland HU | best threshold DSC (σ {args.sigma:g}) | at HU below gland |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['contrast_phase']} | {r['diagnosis']} | {r['lesion_ml']:.1f} | "
              f"{r['lesion_hu']:.0f} ± {r['lesion_hu_sd']:.0f} | {r['gland_hu']:.0f} ± {r['gland_hu_sd']:.0f} | "
              f"{r['best_dsc']:.2f} | {r['threshold_hu']:g} |")
    print("\n| phase | scans | mean lesion − gland HU | mean best threshold DSC |\n|---|---|---|---|")
    for phase in sorted({r["contrast_phase"] for r in rows}) + ["all"]:
        sel = [r for r in rows if phase == "all" or r["contrast_phase"] == phase]
        print(f"| {phase or 'unknown'} | {len(sel)} | {np.nanmean([r['lesion_hu'] - r['gland_hu'] for r in sel]):.0f} | "
              f"{np.mean([r['best_dsc'] for r in sel]):.3f} |")
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
