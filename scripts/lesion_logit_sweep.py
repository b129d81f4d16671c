#!/usr/bin/env python
"""How far is a model from drawing the lesion? Lesion Dice as the lesion's logit is raised.

A model whose argmax never picks ``pancreatic_lesion`` may still rank lesion voxels above their
surroundings (it is underfit: more training, or a lesion prior, would show them) or not at all (it
has not learnt where lesions are). Each scan's logits are computed once; then the lesion logit is
raised by each ``--bias`` (in log-odds: +2 multiplies the lesion's odds by e^2, about 7.4) and the
argmax taken again. Printed per bias: mean lesion DSC over tumour scans, mean predicted lesion mL
on tumour scans and on clean scans, how many scans of each kind get any lesion voxel, and how many
separate blobs the drawn lesion is in (a scatter of small false blobs, or a few large ones); then
the highest lesion probability in a scan, for each kind. A model
that has learnt the lesion but is too shy gains DSC at a small bias with little drawn on clean
scans; one that has not draws as much on clean scans as on tumour scans.

With ``--box-margin MM`` each scan is first cut to the box around its *true* pancreas region plus
that margin (how the pancreas stage is trained, ``lib/model/pancreas_stage.py``); without it the
model sees the whole scan (the ``fast`` preset). Reference labels come from the PanTS layout.

Examples:
    .venv/bin/pants-label lesion-logit-sweep --images data/bench_learning_128x128x112_2.9x2.9x3.6_s0_tl20 \\
        --model out/bench_two_stage_tl20_present/model/segresnet_pancreas.pt --preset pancreas --box-margin 16
    .venv/bin/pants-label lesion-logit-sweep --images out/lesion_probe/pool --split test \\
        --model out/al_cohort_v4/runs/full_s3/model_after_round_5.pt --preset fast --csv /tmp/sweep.csv
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # bench_two_stage.py lives beside this script

from lib.core.labelmap import LabelMap, load_labelmap  # noqa: E402
from lib.core.settings import load_segmentation_config  # noqa: E402
from lib.datastore.folder_scan import PANTS_SPLITS, read_mask_folder  # noqa: E402
from lib.imaging.volume_io import Volume, load_volume  # noqa: E402
from lib.model.metrics import LESION_CLASS  # noqa: E402
from lib.model.pancreas_stage import crop, region_box  # noqa: E402
from lib.model.segmenter import Segmenter, labels_in_volume  # noqa: E402


@dataclass(frozen=True)
class ScanResult:
    case: str
    tumour: bool
    truth_ml: float
    pred_ml: tuple[float, ...]  # per bias
    dsc: tuple[float, ...]  # per bias; NaN on clean scans
    pieces: tuple[int, ...]  # per bias: separate lesion blobs drawn (26-connected)
    max_prob: float  # the highest lesion probability anywhere in the scan (network grid, no raise)


def lesion_logit_maps(seg: Segmenter, vol: Volume, lesion_id: int,
                      biases: list[float]) -> tuple[list[np.ndarray], float]:
    """The label map (volume grid) for each lesion-logit bias, from one network pass, and the
    highest lesion probability of that pass."""
    logits, prep, box = seg.body_logits(vol)
    top = float(torch.softmax(logits, dim=1)[:, lesion_id].max())
    out = []
    for b in biases:
        raised = logits.clone()
        raised[:, lesion_id] += b
        out.append(labels_in_volume(raised, prep, box, seg.cfg.output_slab_slices))
    return out, top


def sweep_scan(seg: Segmenter, lm: LabelMap, image: Path, seg_dir: Path, biases: list[float],
               margin: float | None) -> ScanResult:
    from scipy import ndimage

    lid = lm.id_of(LESION_CLASS)
    vol = load_volume(image)
    if not any(seg_dir.glob("*.nii.gz")):
        raise SystemExit(f"{seg_dir}: no masks")
    truth = read_mask_folder(seg_dir, lm)
    if margin is not None:
        box = region_box(truth, lm, vol.spacing, margin)
        if box is None:
            raise SystemExit(f"{seg_dir}: no pancreas region to cut a box around (--box-margin)")
        vol, truth = crop(vol, box), truth[box]
    t = truth == lid
    ml = float(np.prod(vol.spacing)) / 1000.0
    preds, dscs, pieces = [], [], []
    labels, top = lesion_logit_maps(seg, vol, lid, biases)
    for label in labels:
        p = label == lid
        preds.append(float(p.sum()) * ml)
        pieces.append(int(ndimage.label(p, structure=np.ones((3, 3, 3), bool))[1]))
        dscs.append(2.0 * float((p & t).sum()) / float(p.sum() + t.sum()) if t.any() else float("nan"))
    return ScanResult(image.parent.name, bool(t.any()), float(t.sum()) * ml, tuple(preds), tuple(dscs),
                      tuple(pieces), top)


def table(results: list[ScanResult], biases: list[float]) -> str:
    pos = [r for r in results if r.tumour]
    neg = [r for r in results if not r.tumour]

    def mean(xs: list[float], digits: int = 3) -> str:
        return f"{np.mean(xs):.{digits}f}" if xs else "-"

    lines = [f"| lesion logit + | lesion DSC, tumour scans ({len(pos)}) | lesion mL per tumour scan "
             f"| lesion mL per clean scan ({len(neg)}) | tumour scans with any lesion | clean scans with any lesion "
             "| lesion pieces per tumour / clean scan |",
             "|---|---|---|---|---|---|---|"]
    for i, b in enumerate(biases):
        lines.append(f"| {b:g} | {mean([r.dsc[i] for r in pos])} | {mean([r.pred_ml[i] for r in pos])} "
                     f"| {mean([r.pred_ml[i] for r in neg])} | {sum(r.pred_ml[i] > 0 for r in pos)}/{len(pos)} "
                     f"| {sum(r.pred_ml[i] > 0 for r in neg)}/{len(neg)} "
                     f"| {mean([r.pieces[i] for r in pos], 1)} / {mean([r.pieces[i] for r in neg], 1)} |")

    def spread(rs: list[ScanResult]) -> str:
        tops = [r.max_prob for r in rs]
        return f"{np.median(tops):.3f} ({min(tops):.3f}-{max(tops):.3f})" if tops else "-"

    lines.append(f"\nhighest lesion probability in a scan, median (range): tumour scans {spread(pos)}, "
                 f"clean scans {spread(neg)}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lesion_logit_sweep.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, required=True, help="a PanTS root with labels (ImageTr/LabelTr, ImageTe/LabelTe)")
    p.add_argument("--model", type=Path, required=True, help="weights file of the preset")
    p.add_argument("--preset", default="fast", help="configs/presets.yaml preset the weights are for (default fast)")
    p.add_argument("--split", choices=sorted(PANTS_SPLITS), default="train", help="which split's scans (default train)")
    p.add_argument("--box-margin", type=float, default=None, metavar="MM",
                   help="cut each scan to its true pancreas region plus MM first (the pancreas stage)")
    p.add_argument("--biases", type=float, nargs="+", default=[0, 1, 2, 3, 4], help="lesion logit raises to try")
    p.add_argument("--limit", type=int, default=None, help="only the first N scans (by id)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--csv", type=Path, default=None, help="also write one row per scan and bias")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    lm = load_labelmap()
    cfg = load_segmentation_config()
    if args.preset not in cfg.presets:
        raise SystemExit(f"--preset {args.preset}: not in configs/presets.yaml ({', '.join(cfg.presets)})")
    if not args.model.is_file():
        raise SystemExit(f"--model {args.model}: no such file")
    image_dir, label_dir = (args.images / d for d in PANTS_SPLITS[args.split])
    if not image_dir.is_dir():
        raise SystemExit(f"--images {args.images}: no {image_dir.name}/ for --split {args.split}")
    cases = sorted(p for p in image_dir.iterdir() if (p / "ct.nii.gz").is_file())[: args.limit]
    seg = Segmenter(cfg, lm, args.preset, args.model, args.device)
    with torch.inference_mode():  # scoped: main() also runs inside test processes that train
        results = [sweep_scan(seg, lm, c / "ct.nii.gz", label_dir / c.name / "segmentations", args.biases,
                              args.box_margin) for c in tqdm(cases, desc="scans", unit="scan")]
    print(table(results, args.biases), flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["case", "tumour", "truth_ml", "max_lesion_prob", "bias", "pred_ml", "dsc", "pieces"])
            for r in results:
                for i, b in enumerate(args.biases):
                    w.writerow([r.case, r.tumour, round(r.truth_ml, 3), round(r.max_prob, 4), b, round(r.pred_ml[i], 3),
                                "" if np.isnan(r.dsc[i]) else round(r.dsc[i], 4), r.pieces[i]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
