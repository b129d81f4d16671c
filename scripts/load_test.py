#!/usr/bin/env python
"""Load test: concurrent annotators against a PanTS Label server on 127.0.0.1 while training runs.

Starts its own server on a free loopback port (traffic never leaves the machine), then for
--minutes runs --clients annotators, each a MONAILabelClient (3D Slicer's client) looping
next sample -> infer -> save label (the inferred label, marked so that every save is unique).
Beside them training runs back to back, and every scoring method /info lists is run in turn.
Models, strategies and scoring methods are read from /info, so whatever the app offers is used.

Afterwards every acknowledged save is looked up in the datastore index and its file decoded and
compared voxel for voxel with what was sent ("lost" = acknowledged but missing or different).

Answers counted as "busy" (documented; the client retries): 429 (a training/scoring run is
already going) and 503. Any other error counts as an error. Exit status 1 if anything was lost
or any error occurred.

Writes to --out: latency.csv (one row per request), rss.csv and rss.png (server and subprocess
memory over time), summary.json, and prints the p50/p95 table.

Examples:
    python scripts/load_test.py --out out/load --phantoms 24 --minutes 10
    python scripts/load_test.py --out out/load_quick --phantoms 6 --minutes 1 --clients 4
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "pants_label"

BUSY = {429, 503}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Recorder:
    """Thread-safe request log: (t, endpoint, seconds, outcome)."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.rows: list[tuple[float, str, float, str]] = []
        self.lock = threading.Lock()

    def add(self, endpoint: str, seconds: float, outcome: str) -> None:
        with self.lock:
            self.rows.append((round(time.time() - self.t0, 3), endpoint, round(seconds, 4), outcome))

    def call(self, endpoint: str, fn, *args, **kwargs):  # noqa: ANN001, ANN201
        """Run one client call; returns (result, outcome) where outcome is ok | busy | error:<status>."""
        from monailabel.client.client import MONAILabelClientException

        t = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
            outcome = "ok"
        except MONAILabelClientException as err:
            result = None
            status = err.status_code or _status_of(err.msg)
            outcome = "busy" if status in BUSY else f"error:{status}:{str(err.msg)[:160]}"
        except Exception as err:  # noqa: BLE001 - connection errors etc. count as errors
            result = None
            outcome = f"error:{type(err).__name__}:{str(err)[:160]}"
        self.add(endpoint, time.perf_counter() - t, outcome)
        return result, outcome


def _status_of(msg: str) -> int | None:
    # MONAILabelClientException often carries the status only in its message: "Status: 429; ..."
    if isinstance(msg, str) and msg.startswith("Status: "):
        try:
            return int(msg.split(";", 1)[0].split()[1])
        except (IndexError, ValueError):
            return None
    return None


# ---- the server ------------------------------------------------------------------------------------


def start_server(studies: Path, out: Path, conf: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR), "--studies", str(studies),
           "--host", "127.0.0.1", "--port", str(port)]
    for k, v in conf.items():
        cmd += ["--conf", k, v]
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    log = open(out / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{(out / 'server.log').read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"{url}/info/", timeout=2).read()
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# ---- workers -------------------------------------------------------------------------------------


class Saves:
    """What each acknowledged save sent: load id -> (image, sha1 of the canonical voxels)."""

    def __init__(self) -> None:
        self.acked: dict[str, tuple[str, str]] = {}
        self.lock = threading.Lock()

    def add(self, load_id: str, image: str, digest: str) -> None:
        with self.lock:
            self.acked[load_id] = (image, digest)


def _digest(array: Any) -> str:
    import hashlib

    import numpy as np

    return hashlib.sha1(np.ascontiguousarray(array, dtype=np.uint8).tobytes()).hexdigest()


def annotator(k: int, url: str, rec: Recorder, saves: Saves, info: dict, images: list[str], deadline: float,
              tmp: Path) -> None:
    import nibabel as nib
    import numpy as np
    from monailabel.client import MONAILabelClient

    rng = random.Random(k)
    client = MONAILabelClient(url, tmpdir=str(tmp / f"c{k}"), client_id=f"annotator-{k}")
    (tmp / f"c{k}").mkdir(parents=True, exist_ok=True)
    strategies = sorted(info.get("strategies", {})) or [None]
    models = [m for m, v in info.get("models", {}).items() if v.get("type") == "segmentation"] or sorted(info["models"])
    n_classes = len(info["labels"])
    while time.time() < deadline:
        strategy = rng.choice(strategies)
        image = None
        if strategy:
            res, outcome = rec.call(f"next_sample[{strategy}]", client.next_sample, strategy, {})
            image = (res or {}).get("id")
        image = image or rng.choice(images)  # every scan labelled already: annotators revise
        model = rng.choice(models)
        res, outcome = rec.call(f"infer[{model}]", client.infer, model, image, {})
        if outcome == "busy":
            time.sleep(1)
            continue
        if res is None:
            continue
        path = res[0]
        img = nib.load(path)
        label = np.asarray(img.dataobj, dtype=np.uint8)
        # the annotator's edit: a small cube of one class at a random place makes every save unique
        x, y, z = (rng.randrange(max(1, s - 4)) for s in label.shape)
        label[x : x + 4, y : y + 4, z : z + 4] = rng.randrange(1, n_classes + 1)
        load_id = uuid.uuid4().hex
        out = tmp / f"c{k}" / f"{load_id}.nii.gz"
        nib.save(nib.Nifti1Image(label, img.affine), out)
        os.unlink(path)
        _, outcome = rec.call("save_label", client.save_label, image, str(out), "final", {"load_id": load_id})
        if outcome == "ok":
            saves.add(load_id, image, _digest(label))
        out.unlink(missing_ok=True)


def trainer(url: str, rec: Recorder, info: dict, deadline: float, options: dict, runs: list, saves: Saves) -> None:
    """Training back to back (each run a few epochs) until the deadline, once 4 labels are saved."""
    import requests
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(url)
    models = sorted(info.get("trainers", {}))
    if not models:
        return
    while time.time() < deadline:
        if len(saves.acked) < 4:
            time.sleep(2)
            continue
        t = time.perf_counter()
        r = requests.get(f"{url}/train/?check_if_running=true", timeout=120)  # 200 running, 404 not
        rec.add("train_status", time.perf_counter() - t, "ok" if r.status_code in (200, 404) else f"error:{r.status_code}")
        if r.status_code == 200:
            time.sleep(5)
            continue
        res, outcome = rec.call(f"train_start[{models[0]}]", client.train_start, models[0], options)
        if outcome == "ok":
            runs.append({"t": round(time.time() - rec.t0, 1), "id": (res or {}).get("id")})
        time.sleep(10 if outcome == "ok" else 30)  # too few labels yet: the run fails fast; try later


def scorer(url: str, rec: Recorder, info: dict, deadline: float) -> None:
    import requests

    methods = sorted(info.get("scoring", {}))
    while methods and time.time() < deadline:
        for m in methods:
            t = time.perf_counter()
            try:
                r = requests.post(f"{url}/scoring/{m}", json={}, timeout=120)
                outcome = "ok" if r.status_code == 200 else ("busy" if r.status_code in BUSY else f"error:{r.status_code}")
            except Exception as err:  # noqa: BLE001
                outcome = f"error:{type(err).__name__}"
            rec.add(f"scoring[{m}]", time.perf_counter() - t, outcome)
            time.sleep(30)


def monitor(pid: int, t0: float, stop: threading.Event, rows: list) -> None:
    import psutil

    proc = psutil.Process(pid)
    while not stop.is_set():
        try:
            server = proc.memory_info().rss
            kids = 0
            n = 0
            for c in proc.children(recursive=True):
                try:
                    kids += c.memory_info().rss
                    n += 1
                except psutil.NoSuchProcess:
                    pass
            rows.append((round(time.time() - t0, 1), round(server / 2**20, 1), round(kids / 2**20, 1), n))
        except psutil.NoSuchProcess:
            return
        stop.wait(1.0)


# ---- verification and report ---------------------------------------------------------------------


def verify(state: Path, saves: Saves) -> dict[str, Any]:
    """Every acknowledged save: present in the index with a file whose voxels are what was sent."""
    import nibabel as nib
    import numpy as np

    with sqlite3.connect(f"file:{state / 'index.sqlite'}?mode=ro", uri=True) as db:
        rows = list(db.execute("SELECT image_id, version, path, info FROM labels WHERE tag = 'final'"))
    by_id = {}
    for image_id, version, path, info in rows:
        load_id = json.loads(info).get("load_id")
        if load_id:
            by_id[load_id] = (image_id, path)
    lost, different = [], []
    for load_id, (image, digest) in saves.acked.items():
        hit = by_id.get(load_id)
        if hit is None or hit[0] != image:
            lost.append(load_id)
            continue
        data = np.asarray(nib.load(state / hit[1].removeprefix("@state/")).dataobj, dtype=np.uint8)
        if _digest(data) != digest:
            different.append(load_id)
    return {"acknowledged": len(saves.acked), "in_index": len(by_id), "lost": len(lost), "different": len(different),
            "lost_ids": lost[:20], "different_ids": different[:20]}


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def report(rec: Recorder, out: Path) -> list[dict[str, Any]]:
    by_ep: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for _, ep, s, outcome in rec.rows:
        by_ep[ep].append((s, outcome))
    table = []
    for ep in sorted(by_ep):
        ok = [s for s, o in by_ep[ep] if o == "ok"]
        table.append({
            "endpoint": ep, "requests": len(by_ep[ep]), "ok": len(ok),
            "busy": sum(o == "busy" for _, o in by_ep[ep]),
            "errors": sum(o.startswith("error") for _, o in by_ep[ep]),
            "p50_s": round(percentile(ok, 50), 3), "p95_s": round(percentile(ok, 95), 3),
            "max_s": round(max(ok), 3) if ok else float("nan"),
        })
    with open(out / "latency.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_s", "endpoint", "seconds", "outcome"])
        w.writerows(rec.rows)
    return table


def plot_rss(rows: list, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out / "rss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_s", "server_rss_mb", "subprocesses_rss_mb", "subprocesses"])
        w.writerows(rows)
    if not rows:
        return
    t = [r[0] / 60 for r in rows]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(t, [r[1] for r in rows], label="server process")
    ax.plot(t, [r[1] + r[2] for r in rows], label="server + training/scoring subprocesses", alpha=0.8)
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("PanTS Label server memory under load")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "rss.png", dpi=120)
    plt.close(fig)


def print_table(table: list[dict[str, Any]]) -> None:
    print("| endpoint | requests | ok | busy | errors | p50 s | p95 s | max s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in table:
        print(f"| {r['endpoint']} | {r['requests']} | {r['ok']} | {r['busy']} | {r['errors']} | "
              f"{r['p50_s']:.3f} | {r['p95_s']:.3f} | {r['max_s']:.3f} |")


# ---- main ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="load_test.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for results (and the phantoms, server state)")
    p.add_argument("--studies", type=Path, help="dataset to serve (default: phantoms made in OUT/data)")
    p.add_argument("--phantoms", type=int, default=24, help="phantoms to make when --studies is not given (default 24)")
    p.add_argument("--shape", type=int, nargs=3, default=[128, 128, 80], help="phantom voxels (default 128 128 80)")
    p.add_argument("--spacing", type=float, nargs=3, default=[1.2, 1.2, 2.5], help="phantom mm (default 1.2 1.2 2.5)")
    p.add_argument("--minutes", type=float, default=10.0, help="duration of the load (default 10)")
    p.add_argument("--clients", type=int, default=8, help="concurrent annotators (default 8)")
    p.add_argument("--train-epochs", type=int, default=4, help="epochs per training run (default 4)")
    p.add_argument("--train-iterations", type=int, default=8, help="iterations per epoch (default 8)")
    p.add_argument("--no-training", action="store_true", help="annotators only")
    p.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="extra server --conf pairs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.clients <= 64 or not 0 < args.minutes <= 120:
        print("load_test.py: --clients must be 1..64 and --minutes 0..120 (bounded load)", file=sys.stderr)
        return 2
    from tqdm import tqdm

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    studies = args.studies
    if studies is None:
        from pants_tools.phantom import write_pants_tree

        studies = out / "data"
        if not (studies / "ImageTr").is_dir():
            print(f"making {args.phantoms} phantoms {args.shape} at {args.spacing} mm in {studies}")
            write_pants_tree(studies, args.phantoms, shape=tuple(args.shape), spacing=tuple(args.spacing), seed=1)
    state = out / "state"
    conf = {"preset": "fast", "hide_imported_labels": "true", "model_dir": str(out / "model"),
            "datastore_dir": str(state), **dict(args.conf)}
    proc, url = start_server(studies, out, conf)
    import requests

    info = requests.get(f"{url}/info/", timeout=60).json()
    images = sorted(requests.get(f"{url}/datastore/?output=all", timeout=60).json()["objects"])
    print(f"server {url} (pid {proc.pid}): models {sorted(info['models'])}, strategies {sorted(info['strategies'])}, "
          f"scoring {sorted(info.get('scoring', {}))}, trainers {sorted(info.get('trainers', {}))}; {len(images)} scans")

    t0 = time.time()
    deadline = t0 + args.minutes * 60
    rec, saves, rss_rows, runs = Recorder(t0), Saves(), [], []
    stop = threading.Event()
    tmp = out / "client_tmp"
    threads = [threading.Thread(target=monitor, args=(proc.pid, t0, stop, rss_rows), daemon=True)]
    threads += [threading.Thread(target=annotator, args=(k, url, rec, saves, info, images, deadline, tmp))
                for k in range(args.clients)]
    if not args.no_training:
        options = {"max_epochs": args.train_epochs, "iterations_per_epoch": args.train_iterations, "batch_size": 1}
        threads.append(threading.Thread(target=trainer, args=(url, rec, info, deadline, options, runs, saves)))
        threads.append(threading.Thread(target=scorer, args=(url, rec, info, deadline)))
    for t in threads:
        t.start()
    with tqdm(total=int(args.minutes * 60), unit="s", desc="load") as bar:
        while time.time() < deadline:
            time.sleep(2)
            bar.n = min(int(time.time() - t0), bar.total)
            bar.set_postfix(saves=len(saves.acked), requests=len(rec.rows))
            bar.refresh()
    for t in threads[1:]:
        t.join()
    # let a training run still going finish its epoch budget? no: stop it, the load is over
    requests.delete(f"{url}/train/", timeout=60)
    train_stats = requests.get(f"{url}/info/", timeout=60).json().get("train_stats", {})
    train_tasks = requests.get(f"{url}/train/?all=true", timeout=60)
    stop.set()
    stop_server(proc)

    verdict = verify(state, saves)
    table = report(rec, out)
    plot_rss(rss_rows, out)
    errors = [r for r in rec.rows if r[3].startswith("error")]
    tasks = train_tasks.json() if train_tasks.status_code == 200 else []
    summary = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "minutes": args.minutes, "clients": args.clients, "scans": len(images),
        "phantom_shape": args.shape if args.studies is None else None,
        "saves": verdict, "endpoints": table,
        "errors": len(errors), "error_samples": [r[3] for r in errors[:10]],
        "training_runs_started": len(runs),
        "training_runs": [{"status": t.get("status"), "start": t.get("start_ts"), "end": t.get("end_ts")}
                          for t in (tasks if isinstance(tasks, list) else [])],
        "train_stats": train_stats,
        "rss_mb": {"server_max": max((r[1] for r in rss_rows), default=None),
                   "server_end": rss_rows[-1][1] if rss_rows else None,
                   "total_max": max((r[1] + r[2] for r in rss_rows), default=None)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print_table(table)
    print(f"saves acknowledged {verdict['acknowledged']}, lost {verdict['lost']}, different {verdict['different']}; "
          f"errors {len(errors)}; training runs started {len(runs)}; RSS server max {summary['rss_mb']['server_max']} MiB, "
          f"with subprocesses {summary['rss_mb']['total_max']} MiB")
    for r in errors[:10]:
        print("  error:", r)
    return 1 if verdict["lost"] or verdict["different"] or errors else 0


if __name__ == "__main__":
    sys.exit(main())
