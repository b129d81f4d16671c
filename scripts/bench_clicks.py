#!/usr/bin/env python
"""Click benchmark: a simulated annotator corrects the segmentation model's answer with clicks.

Held-out phantoms at physical scale (a 410 x 410 x 375 mm field of view at a random spacing of
1.0-1.6 mm in-plane and 1.25-2.5 mm between slices, data seed ``--data-seed``; the click weights
were trained on seed 100), each with a lesion. For each phantom the committed demo segmentation
model answers first (0 clicks: the segmentation model alone). Then, for each of the lesion,
pancreas head, body and tail and the duct, starting again from that answer, a simulated annotator
clicks ``--clicks`` times, each time at the centre of the largest error of that class
(:func:`lib.model.clicks.simulate_click`: a positive click in a miss, a background click in a
false region), and the click model corrects it in process (:meth:`ClickModel.correct`, what the
``deepedit`` infer task runs).

Printed and written to ``--out``: mean DSC after 0, 1, 3, 5 and 10 clicks per class
(``dsc_by_clicks.csv``, every click count; ``dsc_by_clicks.png``), clicks to reach 0.85 lesion DSC
per phantom, the in-process time of one correction, and ``summary.json``.

With ``--server`` (default on), a 512 x 512 x 300 phantom at 0.8 x 0.8 x 1.25 mm is served by the
real ``monailabel start_server`` with the demo weights; the client runs the segmentation model,
then clicks on the lesion (``--server-clicks`` requests, each sending every click so far, as OHIF
and 3D Slicer do). Per click: the time from request to answer saved by ``MONAILabelClient``, the
server's stage latencies, and the server's peak RSS (``VmHWM``) during the clicks (reset after the
segmentation request) and overall.

Examples:
    .venv/bin/python scripts/bench_clicks.py --out out/bench_clicks
    .venv/bin/python scripts/bench_clicks.py --out /tmp/bc --n-test 2 --clicks 5 --no-server
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "pants_label"))
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lib.core.click_config import load_click_config  # noqa: E402
from lib.core.labelmap import load_labelmap  # noqa: E402
from lib.core.settings import load_segmentation_config  # noqa: E402
from lib.model.clicks import ClickModel, simulate_click  # noqa: E402
from lib.model.metrics import dice  # noqa: E402
from pants_tools.processes import peak_rss_gb  # noqa: E402
from lib.model.segmenter import Segmenter  # noqa: E402
from train_click_model import phantom_volume  # noqa: E402

DEMO = REPO / "apps" / "pants_label" / "demo_model"
CLASSES = ("pancreatic_lesion", "pancreas_head", "pancreas_body", "pancreas_tail", "pancreatic_duct")
REPORT_AT = (0, 1, 3, 5, 10)
TARGET = 0.85


def _box(mask: np.ndarray, pad: int = 2) -> tuple[slice, ...] | None:
    idx = np.nonzero(mask.any(axis=(1, 2)))[0], np.nonzero(mask.any(axis=(0, 2)))[0], np.nonzero(mask.any(axis=(0, 1)))[0]
    if any(len(i) == 0 for i in idx):
        return None
    return tuple(slice(max(int(i[0]) - pad, 0), min(int(i[-1]) + pad + 1, n)) for i, n in zip(idx, mask.shape))


def next_click(truth: np.ndarray, cur: np.ndarray) -> tuple[tuple[int, int, int], bool] | None:
    """:func:`simulate_click` on the box that holds both masks (the errors lie inside it)."""
    box = _box(truth | cur)
    if box is None:
        return None
    c = simulate_click(truth[box], cur[box])
    if c is None:
        return None
    return tuple(int(p + s.start) for p, s in zip(c[0], box)), c[1]  # type: ignore[return-value]


def run_class(model: ClickModel, image: np.ndarray, start: np.ndarray, affine: np.ndarray, truth_lab: np.ndarray,
              cls: int, n_clicks: int) -> tuple[list[float], list[float]]:
    """DSC of class ``cls`` after 0..n clicks, and the time of each correction."""
    cur = start.copy(order="F")
    truth = truth_lab == cls
    pos: list = []
    neg: list = []
    dsc = [dice(truth, cur == cls)]
    times: list[float] = []
    for _ in range(n_clicks):
        c = next_click(truth, cur == cls)
        if c is None:
            dsc.append(dsc[-1])
            continue
        (pos if c[1] else neg).append(c[0])
        t = time.perf_counter()
        model.correct(image, cur, affine, cls, pos, neg, newest=c[0])
        times.append(time.perf_counter() - t)
        dsc.append(dice(truth, cur == cls))
    return dsc, times


def bench_inprocess(args: argparse.Namespace) -> dict:
    lm, cfg, seg_cfg = load_labelmap(), load_click_config(), load_segmentation_config()
    segmenter = Segmenter(seg_cfg, lm, "fast", args.seg_model)
    model = ClickModel(cfg, seg_cfg, lm, args.weights)
    curves: dict[str, list[list[float]]] = {n: [] for n in CLASSES}
    times: list[float] = []
    shapes = []
    for i in range(args.n_test):
        vol, truth = phantom_volume(i, args.data_seed, lesion=True)
        shapes.append([list(vol.array.shape), [round(float(s), 2) for s in np.sqrt((vol.affine[:3, :3] ** 2).sum(0))]])
        start, _ = segmenter.segment(vol)
        for name in CLASSES:
            d, t = run_class(model, vol.array, start, vol.affine, truth, lm.id_of(name), args.clicks)
            curves[name].append(d)
            times += t
        print(f"phantom {i + 1}/{args.n_test} {vol.array.shape}: lesion DSC "
              + " -> ".join(f"{curves['pancreatic_lesion'][-1][k]:.2f}" for k in REPORT_AT if k <= args.clicks), flush=True)
    to_target = []
    for d in curves["pancreatic_lesion"]:
        k = next((k for k, v in enumerate(d) if v >= TARGET), None)
        to_target.append(k)
    return {"curves": curves, "times": times, "to_target": to_target, "shapes": shapes,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}


def bench_server(args: argparse.Namespace, work: Path) -> dict:
    """Clicks through the real server on a 512 x 512 x 300 phantom."""
    from monailabel.client import MONAILabelClient
    import nibabel as nib

    from lib.imaging.volume_io import atomic_write
    from pants_tools.phantom import make_case
    from server import Server

    lm = load_labelmap()
    studies, model_dir = work / "studies", work / "model"
    studies.mkdir(parents=True, exist_ok=True)
    model_dir.mkdir(parents=True, exist_ok=True)
    t = time.time()
    ph = make_case(0, shape=tuple(args.server_shape), spacing=(0.8, 0.8, 1.25), seed=args.data_seed + 1, lesion=True)
    img = nib.Nifti1Image(ph.ct, ph.affine)
    img.set_qform(ph.affine, code=1)
    img.set_sform(ph.affine, code=1)
    atomic_write(studies / "ct_full.nii.gz", lambda tmp: nib.save(img, tmp))
    truth = ph.masks["pancreatic_lesion"].astype(bool)
    del ph
    print(f"server phantom {tuple(args.server_shape)} made in {time.time() - t:.0f} s", flush=True)
    shutil.copy(args.seg_model, model_dir / "segresnet_fast.pt")
    shutil.copy(args.weights, model_dir / "segresnet_clicks.pt")
    server = Server(studies, work / "server.log", conf={"model_dir": str(model_dir), "preset": "fast"})
    try:
        client = MONAILabelClient(server.url, tmpdir=str(work))
        t = time.perf_counter()
        out, res = client.infer("segmentation", "ct_full", {})
        seg_s = time.perf_counter() - t
        cur = np.asarray(nib.load(out).dataobj) == lm.id_of("pancreatic_lesion")
        os.unlink(out)
        seg_hwm = peak_rss_gb(server.proc.pid)
        Path(f"/proc/{server.proc.pid}/clear_refs").write_text("5")  # peak RSS from here on: the clicks'
        lesion, background, rows = [], [], []
        for k in range(args.server_clicks):
            c = next_click(truth, cur)
            if c is None:
                break
            (lesion if c[1] else background).append(list(c[0]))
            params = {"pancreatic_lesion": lesion, "result_extension": ".nii.gz"}
            if background:
                params["background"] = background
            t = time.perf_counter()
            out, res = client.infer("deepedit", "ct_full", params)
            wall = time.perf_counter() - t
            cur = np.asarray(nib.load(out).dataobj) == lm.id_of("pancreatic_lesion")
            os.unlink(out)
            rows.append({"click": k + 1, "request_s": round(wall, 3), **{f"server_{n}": v for n, v in res["latencies"].items()},
                         "lesion_dsc": round(dice(truth, cur), 3), "positive": c[1],
                         "corrected": res.get("corrected")})
            print(f"  click {k + 1}: {wall:.2f} s request to answer, server {res['latencies']}, "
                  f"lesion DSC {rows[-1]['lesion_dsc']:.2f}", flush=True)
        return {"segmentation_s": round(seg_s, 2), "hwm_after_segmentation_gb": round(seg_hwm, 2),
                "clicks_peak_rss_gb": round(peak_rss_gb(server.proc.pid), 2), "clicks": rows,
                "shape": list(args.server_shape)}
    finally:
        server.stop()


def plot(curves: dict[str, list[list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in curves.items():
        m = np.mean(np.asarray(runs), axis=0)
        ax.plot(range(len(m)), m, marker="o", ms=3, label=name)
    ax.axhline(TARGET, color="grey", ls=":", lw=1)
    ax.set_xlabel("clicks")
    ax.set_ylabel("mean DSC (held-out phantoms)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_clicks.py", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench_clicks")
    ap.add_argument("--n-test", type=int, default=3, help="held-out phantoms (each with a lesion)")
    ap.add_argument("--clicks", type=int, default=10)
    ap.add_argument("--data-seed", type=int, default=200, help="phantom seed (training used 100)")
    ap.add_argument("--weights", type=Path, default=DEMO / "segresnet_clicks.pt")
    ap.add_argument("--seg-model", type=Path, default=DEMO / "segresnet_fast.pt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--server", action=argparse.BooleanOptionalAction, default=True,
                    help="also click through the real server on a full-size scan")
    ap.add_argument("--server-shape", type=int, nargs=3, default=(512, 512, 300))
    ap.add_argument("--server-clicks", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    t0 = time.time()
    res = bench_inprocess(args)
    curves = res["curves"]
    with open(args.out / "dsc_by_clicks.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["class", "clicks", "mean_dsc", *[f"phantom_{i + 1}" for i in range(args.n_test)]])
        for name, runs in curves.items():
            for k in range(args.clicks + 1):
                vals = [r[k] for r in runs]
                w.writerow([name, k, round(float(np.mean(vals)), 4), *[round(v, 4) for v in vals]])
    plot(curves, args.out / "dsc_by_clicks.png")
    at = [k for k in REPORT_AT if k <= args.clicks]
    print(f"\nmean DSC after k clicks ({args.n_test} held-out phantoms, data seed {args.data_seed})")
    print("| class | " + " | ".join(f"{k} clicks" for k in at) + " |")
    print("|---|" + "---|" * len(at))
    table = {}
    for name, runs in curves.items():
        m = np.mean(np.asarray(runs), axis=0)
        table[name] = {k: round(float(m[k]), 3) for k in at}
        print(f"| {name} | " + " | ".join(f"{m[k]:.2f}" for k in at) + " |")
    t = np.asarray(res["times"])
    reach = ", ".join("never" if k is None else str(k) for k in res["to_target"])
    print(f"\nclicks to lesion DSC {TARGET} per phantom (0 = the segmentation model alone; 'never' = not within "
          f"{args.clicks}): {reach}")
    print(f"in-process correction: median {np.median(t):.3f} s, p95 {np.percentile(t, 95):.3f} s, max {t.max():.3f} s "
          f"({len(t)} corrections); bench process peak RSS {res['peak_rss_gb']:.2f} GB")
    summary = {
        "command": "python scripts/bench_clicks.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}",
        "load_avg_start": [round(x, 2) for x in load], "weights": str(args.weights), "n_test": args.n_test,
        "data_seed": args.data_seed, "phantoms": res["shapes"], "table": table, "clicks_to_target": res["to_target"],
        "target": TARGET, "correct_s": {"median": round(float(np.median(t)), 3), "p95": round(float(np.percentile(t, 95)), 3),
                                        "max": round(float(t.max()), 3), "n": int(len(t))},
        "bench_peak_rss_gb": round(res["peak_rss_gb"], 2),
    }
    if args.server:
        with tempfile.TemporaryDirectory(prefix="bench_clicks_") as work:
            summary["server"] = bench_server(args, Path(work))
        s = summary["server"]
        warm = [r["request_s"] for r in s["clicks"]]
        print(f"\nserver, {tuple(args.server_shape)}: segmentation {s['segmentation_s']} s; per click request to answer "
              + ", ".join(f"{x:.2f}" for x in warm) + f" s; server peak RSS {s['hwm_after_segmentation_gb']} GB "
              f"(segmentation), {s['clicks_peak_rss_gb']} GB during the clicks")
    summary["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    summary["wall_s"] = round(time.time() - t0, 1)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nwrote {args.out}/dsc_by_clicks.csv, dsc_by_clicks.png, summary.json ({summary['wall_s']:.0f} s wall, "
          f"load {summary['load_avg_start'][0]:.1f} -> {summary['load_avg_end'][0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
