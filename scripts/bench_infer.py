#!/usr/bin/env python
"""Benchmark whole-CT inference through the real server: PanTS Label (fast, full) vs the
MONAI Label radiology app's ``segmentation`` model, side by side in one run.

Each configuration runs in its own ``monailabel start_server`` process on loopback; one infer
request per CT goes through ``MONAILabelClient`` (what 3D Slicer uses). Reported per run: wall
time of the request, the server's stage latencies, and the server's peak RSS (``VmHWM``, sampled
after each request; CTs run smallest first so each figure is that CT's peak). The peer is
stopped when its RSS passes ``--peer-rss-cap-gb`` (it needs >24 GB at 512x512x300) or after
``--peer-timeout`` seconds, and that is reported instead of a time.

The radiology app downloads pretrained weights at start; here it gets random weights of the
same network instead (``use_pretrained_model false`` + a saved state dict): timings and memory
do not depend on the weights.

Example::

    python scripts/bench_infer.py --out out/bench_infer
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "pants_label"))
sys.path.insert(0, str(REPO / "tests"))

import psutil  # noqa: E402

from server import Server  # noqa: E402
from pants_tools.processes import peak_rss_gb  # noqa: E402

SIZES = {"full": ((512, 512, 300), (0.8, 0.8, 1.25)), "half": ((256, 256, 150), (1.6, 1.6, 2.5))}


def make_ct(root: Path, size: str) -> str:
    """One phantom CT of the given size, in a flat folder the servers read (id = file stem)."""
    from pants_tools.phantom import make_case, write_case

    shape, spacing = SIZES[size]
    target = root / f"ct_{size}.nii.gz"
    if not target.exists():
        ph = make_case(0, shape=shape, spacing=spacing, seed=7, lesion=True)
        tmp = root / ".tmp_case"
        write_case(ph, tmp / "ct.nii.gz", tmp / "seg")
        shutil.move(str(tmp / "ct.nii.gz"), target)
        shutil.rmtree(tmp)
    return f"ct_{size}"


def peer_app(work: Path) -> tuple[Path, Path]:
    """A copy of monailabel's radiology sample app with random weights for ``segmentation``."""
    import monailabel
    import torch

    src = Path(monailabel.__file__).resolve().parents[3] / "monailabel" / "sample-apps" / "radiology"
    if not src.exists():  # pip puts sample-apps under <venv>/monailabel
        src = Path(sys.prefix) / "monailabel" / "sample-apps" / "radiology"
    app = work / "radiology"
    if not app.exists():
        shutil.copytree(src, app)
    from monai.networks.nets import SegResNet

    net = SegResNet(spatial_dims=3, in_channels=1, out_channels=26, init_filters=32,
                    blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1), dropout_prob=0.2)
    (app / "model").mkdir(exist_ok=True)
    torch.save(net.state_dict(), app / "model" / "segmentation.pt")
    # monailabel.transform.post imports torchvision.utils at module level, and PyPI's torchvision
    # does not load beside the CPU torch 2.13 wheel. Segmentation never calls those two functions,
    # so the peer gets a module that only defines their names.
    shim = work / "peer_shim"
    (shim / "torchvision").mkdir(parents=True, exist_ok=True)
    (shim / "torchvision" / "__init__.py").write_text("")
    (shim / "torchvision" / "utils.py").write_text(
        "def make_grid(*a, **k):\n    raise NotImplementedError('torchvision is not installed')\n\n"
        "save_image = make_grid\n"
    )
    return app, shim


def run_one(server: Server, image: str, model: str, params: dict, cap_gb: float, timeout: float) -> dict:
    """One infer request; watches the server's RSS and stops it past ``cap_gb``."""
    from monailabel.client import MONAILabelClient

    # A folder of the client's own: the server names its answer after its temp file in the shared
    # /tmp and removes that file once sent, which would remove the client's copy of the same name.
    client = MONAILabelClient(server.url, tmpdir=tempfile.mkdtemp(prefix="bench_infer_client_"))
    proc = psutil.Process(server.proc.pid)
    result: dict = {}
    done = threading.Event()

    def request() -> None:
        try:
            path, out = client.infer(model, image, params)
            result["params"] = out
            os.remove(path)
        except Exception as err:  # noqa: BLE001 - reported in the table
            result["error"] = f"{type(err).__name__}: {str(err)[:120]}"
        finally:
            done.set()

    t0 = time.perf_counter()
    threading.Thread(target=request, daemon=True).start()
    peak = 0.0
    while not done.wait(0.2):
        try:
            rss = proc.memory_info().rss / 1024**3
        except psutil.NoSuchProcess:
            break
        peak = max(peak, rss)
        if rss > cap_gb:
            server.proc.kill()
            result["error"] = f"stopped: server RSS passed {cap_gb:g} GB after {time.perf_counter() - t0:.0f} s"
            break
        if time.perf_counter() - t0 > timeout:
            server.proc.kill()
            result["error"] = f"stopped: no answer after {timeout:g} s"
            break
    wall = time.perf_counter() - t0
    hwm = peak_rss_gb(server.proc.pid) if server.proc.poll() is None else peak
    if hwm != hwm:  # nan: a process just killed has no VmHWM left; the sampled peak stands
        hwm = peak
    lat = (result.get("params") or {}).get("latencies", {})
    return {"wall_s": round(wall, 1), "peak_rss_gb": round(max(hwm, peak), 2), "latencies": lat,
            "error": result.get("error", "")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench_infer", help="work folder and results")
    ap.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["half", "full"])
    ap.add_argument("--runs", nargs="+", default=["fast", "full", "peer"], choices=["fast", "full", "peer"],
                    help="what to serve; leave out 'peer' for a quick run (the radiology app takes >15 min)")
    ap.add_argument("--weights", type=Path, default=None,
                    help="serve these weights (a segresnet_<preset>.pt, e.g. the demo model) instead of random ones")
    ap.add_argument("--peer-rss-cap-gb", type=float, default=16.0, help="stop the peer past this RSS")
    ap.add_argument("--peer-timeout", type=float, default=900.0, help="stop the peer after this many seconds")
    args = ap.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    studies = args.out / "studies"
    studies.mkdir(exist_ok=True)
    sizes = sorted(args.sizes, key=lambda s: SIZES[s][0][0])  # smallest first (VmHWM is cumulative)
    if args.weights:  # post-processing is cheaper for a trained model (fewer undecided cells)
        (args.out / "model").mkdir(exist_ok=True)
        shutil.copy(args.weights, args.out / "model" / args.weights.name)
    print("making CTs ...", flush=True)
    images = {s: make_ct(studies, s) for s in sizes}

    rows = []
    for run in args.runs:
        log = args.out / f"server_{run}.log"
        if run == "peer":
            app, shim = peer_app(args.out)
            conf = {"models": "segmentation", "use_pretrained_model": "false", "sam2": "false"}
            server = Server(studies, log, conf=conf, app_dir=app, extra_env={"PYTHONPATH": str(shim)})
            model, params, cap, timeout = "segmentation", {}, args.peer_rss_cap_gb, args.peer_timeout
        else:
            conf = {"preset": run, "model_dir": str(args.out / "model"),
                    "datastore_dir": str(args.out / f"state_{run}")}
            server = Server(studies, log, conf=conf)
            model, params, cap, timeout = "segmentation", {}, 1e9, 3600.0
        try:
            for size in sizes:
                print(f"{run:>5} on {size} CT {SIZES[size][0]} ...", flush=True)
                r = run_one(server, images[size], model, params, cap, timeout)
                r.update(run=run, size=size, shape="x".join(map(str, SIZES[size][0])))
                rows.append(r)
                load = os.getloadavg()[0]
                print(f"      {r['wall_s']} s, peak RSS {r['peak_rss_gb']} GB, load {load:.2f} {r['error']}", flush=True)
                if r["error"]:
                    break
        finally:
            server.stop()

    write_results(rows, args.out)


def write_results(rows: list[dict], out: Path) -> None:
    import platform

    machine = f"{platform.node()}: {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 1024**3:.0f} GB RAM, CPU"
    machine += f"; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min) at the end"
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "size", "shape", "wall_s", "peak_rss_gb", "latencies", "error"])
        for r in rows:
            w.writerow([r["run"], r["size"], r["shape"], r["wall_s"], r["peak_rss_gb"], json.dumps(r["latencies"]), r["error"]])
    peer = {r["size"]: r for r in rows if r["run"] == "peer"}
    print(f"\nmachine: {machine}")
    print("| CT | run | wall s | peak RSS GB | stages (s) | peer time / ours | peer RSS / ours |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        p = peer.get(r["size"])
        stages = ", ".join(f"{k} {v}" for k, v in r["latencies"].items() if k != "total") or "-"
        if r["run"] != "peer" and p and not p["error"]:
            rt, rm = f"{p['wall_s'] / r['wall_s']:.1f}x", f"{p['peak_rss_gb'] / r['peak_rss_gb']:.1f}x"
        elif r["run"] != "peer" and p:
            rt = rm = "peer failed"
        else:
            rt = rm = "-"
        wall = r["error"] or r["wall_s"]
        print(f"| {r['shape']} | {r['run']} | {wall} | {r['peak_rss_gb']} | {stages} | {rt} | {rm} |")
    print(f"\nCSV: {out / 'results.csv'}")


if __name__ == "__main__":
    main()
