#!/usr/bin/env python
"""Precision benchmark: does bfloat16 on the CPU change what the model segments, and how much faster is it?

Segments the learning benchmark's held-out phantoms (``scripts/bench_learning.py`` makes them,
same options) with the same weights (default: the committed demo model, ``fast`` preset) twice,
through the infer code (:class:`lib.model.segmenter.Segmenter`): in float32 and in bfloat16 mixed
precision (``configs/presets.yaml`` ``cpu_bf16``). Prints the learning benchmark's figures for
both (DSC per class, mean, large organs, whole pancreas, lesion, detection AUC, seconds per scan),
the share of voxels whose label differs, and one 28-class network window at the ``full`` preset's
size (144 x 112 x 136) in each precision; ``--out`` gets ``summary.json`` and ``per_class.csv``.

Examples:
    .venv/bin/pants-label bench-precision --out out/bench_precision
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # bench_learning.py lives beside this script

import bench_learning  # noqa: E402
from lib.core.labelmap import load_labelmap  # noqa: E402
from lib.core.settings import CpuPrecision, load_segmentation_config  # noqa: E402
from lib.imaging.volume_io import load_volume  # noqa: E402
from lib.model.precision import autocast, native_cpu_bf16  # noqa: E402
from lib.model.segmenter import Segmenter, build_network  # noqa: E402

DEMO = REPO / "apps" / "pants_label" / "demo_model" / "segresnet_fast.pt"


def build_parser() -> argparse.ArgumentParser:
    p = bench_learning.build_parser()
    p.prog, p.description = "bench_precision.py", __doc__.split("\n\n")[0]
    p.epilog = __doc__.split("\n\n", 1)[1]
    p.add_argument("--weights", type=Path, default=DEMO, help="weights to test (default: the demo model)")
    p.add_argument("--window", type=int, nargs=3, default=(144, 112, 136), help="network window to time")
    return p


def window_seconds(shape: tuple[int, int, int], bf16: bool, repeats: int = 3) -> float:
    """Fastest of ``repeats`` forward passes of the 28-class network on one window (after a warm-up)."""
    cfg, lm = load_segmentation_config(), load_labelmap()
    net = build_network(cfg, lm.num_classes).eval().to(memory_format=torch.channels_last_3d)
    x = torch.randn(1, 1, *shape).to(memory_format=torch.channels_last_3d)
    times = []
    with torch.inference_mode(), autocast(torch.device("cpu"), bf16):
        net(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - t0)
    return min(times)


def label_disagreement(weights: Path, preset: str, root: Path) -> float:
    """Share of voxels (of all test scans) labelled differently in bfloat16 than in float32."""
    cfg, lm = load_segmentation_config(), load_labelmap()
    segs = [Segmenter(cfg.model_copy(update={"cpu_bf16": CpuPrecision(infer=m)}), lm, preset, weights)
            for m in ("off", "on")]
    differ = total = 0
    for case in sorted((root / "ImageTe").iterdir()):
        vol = load_volume(case / "ct.nii.gz")
        a, b = (s.segment(vol)[0] for s in segs)
        differ += int((a != b).sum())
        total += a.size
    return differ / max(total, 1)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    root = bench_learning.make_data(args)
    lm, base = load_labelmap(), load_segmentation_config()
    results = {}
    for mode in ("off", "on"):
        cfg = base.model_copy(update={"cpu_bf16": CpuPrecision(infer=mode)})
        per_class, summary = bench_learning.test(args.weights, cfg, lm, args.preset, root)
        results[mode] = {"per_class": {r["class"]: r["dsc"] for r in per_class}, **summary,
                         "window_s": round(window_seconds(tuple(args.window), mode == "on"), 3)}
    differ = label_disagreement(args.weights, args.preset, root)
    f32, b16 = results["off"], results["on"]
    print(f"\nweights {args.weights.name}, preset {args.preset}, {f32['test_scans']} held-out phantoms; "
          f"CPU has native bfloat16: {native_cpu_bf16()}; torch threads {args.threads}\n")
    print("| figure | float32 | bfloat16 mixed | bf16 / fp32 |")
    print("|---|---|---|---|")
    for key in ("mean", "large_organs", "whole_pancreas", "lesion", "lesion_auc"):
        print(f"| {key} DSC | {f32[key]:.4f} | {b16[key]:.4f} | {b16[key] - f32[key]:+.4f} |"
              if key != "lesion_auc" else f"| lesion AUC | {f32[key]:.3f} | {b16[key]:.3f} | {b16[key] - f32[key]:+.3f} |")
    print(f"| infer s per scan | {f32['infer_s_per_scan']:.2f} | {b16['infer_s_per_scan']:.2f} | "
          f"{b16['infer_s_per_scan'] / f32['infer_s_per_scan']:.2f}x |")
    w = "x".join(map(str, args.window))
    print(f"| one {w} window, s | {f32['window_s']:.2f} | {b16['window_s']:.2f} | {b16['window_s'] / f32['window_s']:.2f}x |")
    print(f"\nvoxels labelled differently: {100 * differ:.4f}%")
    worst = sorted(((abs(b16['per_class'][c] - f32['per_class'][c]), c) for c in f32["per_class"]
                    if not math.isnan(f32["per_class"][c])), reverse=True)[:3]
    print("largest per-class DSC changes: " + ", ".join(f"{c} {d:.4f}" for d, c in worst))
    with open(args.out / "per_class.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["class", "dsc_float32", "dsc_bfloat16"])
        for c in f32["per_class"]:
            out.writerow([c, f32["per_class"][c], b16["per_class"][c]])
    (args.out / "summary.json").write_text(json.dumps({"float32": {k: v for k, v in f32.items() if k != "per_class"},
                                                        "bfloat16": {k: v for k, v in b16.items() if k != "per_class"},
                                                        "voxels_differ": differ, "native_bf16": native_cpu_bf16()},
                                                       indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
