#!/usr/bin/env python
"""Benchmark the PanTS datastore against MONAI Label's LocalDatastore at PanTS scale.

Builds (once, reused) a PanTS tree of N scans under OUT/pants: every ImageTr/<id>/ct.nii.gz and
mask is a hard link to a few tiny files, so 36,390 scans cost little disk. The same images are
linked flat under OUT/flat for LocalDatastore, which cannot read the nested layout. Each
datastore is then measured in its own fresh process (so peak memory is its own):

  first open       index built from nothing (ours: SQLite; Local: datastore_v2.json)
  re-open          opening again with the index present (median of --reopen-reps)
  next sample      a "random" next sample as the server serves it: Local runs MONAI's Random
                   strategy (unlabeled query + get_image_info per scan); ours answers the same
                   weighted choice in one query (sample_random_unlabeled)
  unlabeled query  get_unlabeled_images() alone (MONAI Random's datastore query), + random pick
  Random (stock)   MONAI's Random strategy class run on our datastore too, for reference
  save label       save_label of a small label file (tag final)
  update info      update_image_info with a score
  listing json     json() built afresh (what GET /datastore/?output=all holds)
  listing cached   json_bytes(): the serialized listing from the cache (index unchanged)
  listing server   GET /datastore/?output=all through a real server on the same tree (ours);
                   Local's column repeats its json(), the dict MONAI Label's endpoint returns
  listing server after save   the first GET after a label save (the cache rebuilt)
  list_images      list_images()

Ours runs with hide_imported_labels on, so both stores start with every scan unlabeled.
Prints a table with medians and Local/ours ratios and writes OUT/bench_results.csv.

Examples
  python scripts/bench_datastore.py --n 2000 --out /tmp/bench          # quick
  python scripts/bench_datastore.py --n 36390 --out /tmp/bench         # PanTS scale (minutes)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


SHAPE = (16, 16, 12)
#: metric -> (median limit in s, least Local/ours ratio)
TARGETS = {"re-open": (5.0, 20), "next sample": (0.050, 20), "save label": (0.050, 20),
           "listing server": (0.050, 3)}


# ---- building the tree -----------------------------------------------------------------------


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        os.symlink(src, dst)


def build_tree(out: Path, n: int, labeled: int, seed: int = 0) -> tuple[Path, Path, Path]:
    """PanTS tree (``out/pants``) and flat mirror (``out/flat``) of ``n`` scans; reused if complete."""
    import nibabel as nib
    import numpy as np
    from tqdm import tqdm

    from lib.core.labelmap import load_labelmap

    lm = load_labelmap()
    pants, flat, proto = out / "pants", out / "flat", out / "proto"
    stamp = out / "tree.json"
    want = {"n": n, "labeled": labeled, "shape": SHAPE}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return pants, flat, proto / "label.nii.gz"
    for d in (pants, flat, proto):
        shutil.rmtree(d, ignore_errors=True)
    proto.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    affine = np.diag([0.8, 0.8, 1.25, 1.0])
    nib.save(nib.Nifti1Image(rng.integers(-1000, 1000, SHAPE).astype(np.int16), affine), proto / "ct.nii.gz")
    masks = {}
    for c in lm.classes:
        m = np.zeros(SHAPE, np.uint8)
        x, y, z = (int(rng.integers(0, s - 4)) for s in SHAPE)
        m[x : x + 4, y : y + 4, z : z + 3] = 1
        masks[c.name] = proto / f"{c.name}.nii.gz"
        nib.save(nib.Nifti1Image(m, affine), masks[c.name])
    label = np.zeros(SHAPE, np.uint8)
    label[2:6, 2:6, 2:5] = lm.name_to_id["pancreas"]
    label[8:12, 8:12, 4:8] = lm.name_to_id["liver"]
    nib.save(nib.Nifti1Image(label, affine), proto / "label.nii.gz")

    centers = [f"center_{i:03d}" for i in range(145)]
    phases = ["non-contrast", "arterial", "venous", "delayed"]
    (pants / "ImageTr").mkdir(parents=True)
    (pants / "LabelTr").mkdir(parents=True)
    flat.mkdir(parents=True)
    with open(pants / "metadata.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["PanTS ID", "center", "contrast phase", "age", "sex", "spacing", "diagnosis", "tumor"])
        for i in tqdm(range(1, n + 1), desc="building PanTS tree", unit="scan"):
            cid = f"PanTS_{i:08d}"
            d = pants / "ImageTr" / cid
            d.mkdir()
            _link(proto / "ct.nii.gz", d / "ct.nii.gz")
            _link(proto / "ct.nii.gz", flat / f"{cid}.nii.gz")
            if i <= labeled:
                seg = pants / "LabelTr" / cid / "segmentations"
                seg.mkdir(parents=True)
                for name, src in masks.items():
                    _link(src, seg / f"{name}.nii.gz")
            tumor = rng.random() < 0.3
            w.writerow([cid, centers[i % len(centers)], phases[i % 4], int(rng.integers(20, 90)),
                        "MF"[i % 2], "0.8x0.8x1.25", "PDAC" if tumor else "normal", "yes" if tumor else "no"])
    stamp.write_text(json.dumps(want))
    return pants, flat, proto / "label.nii.gz"


# ---- measuring (in a worker process per datastore) --------------------------------------------


def _times(fn: Callable[[], Any], reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def run_worker(which: str, tree: Path, label: Path, reps: int, reopen_reps: int, slow_reps: int) -> dict[str, Any]:
    from monailabel.tasks.activelearning.random import Random

    rnd = random.Random(0)
    res: dict[str, list[float]] = {}
    strategy = Random()

    if which == "ours":
        from lib.datastore.pants import PanTSDatastore

        shutil.rmtree(tree / ".pants_label", ignore_errors=True)

        def open_ds() -> Any:
            return PanTSDatastore(tree, hide_imported_labels=True)

    else:
        import logging

        from monailabel.datastore.local import LocalDatastore

        logging.getLogger("monailabel").setLevel(logging.WARNING)
        (tree / "datastore_v2.json").unlink(missing_ok=True)
        shutil.rmtree(tree / "labels", ignore_errors=True)

        def open_ds() -> Any:
            return LocalDatastore(str(tree), extensions=("*.nii.gz", "*.nii"), auto_reload=False)

    t = time.perf_counter()
    ds = open_ds()
    res["first open"] = [time.perf_counter() - t]
    res["re-open"] = _times(open_ds, reopen_reps)
    ids = ds.list_images()

    if which == "ours":
        res["next sample"] = _times(lambda: ds.sample_random_unlabeled(), reps)
        res["Random (stock MONAI)"] = _times(lambda: strategy({"strategy": "random"}, ds), slow_reps)
    else:
        res["next sample"] = _times(lambda: strategy({"strategy": "random"}, ds), slow_reps)
        res["Random (stock MONAI)"] = res["next sample"]
    res["unlabeled query"] = _times(lambda: rnd.choice(ds.get_unlabeled_images()), reps)
    save_reps = reps if which == "ours" else slow_reps
    res["save label"] = _times(lambda: ds.save_label(rnd.choice(ids), str(label), "final", {}), save_reps)
    res["update info"] = _times(
        lambda: ds.update_image_info(rnd.choice(ids), {"epistemic_entropy": rnd.random()}), save_reps
    )
    res["listing json"] = _times(ds.json, slow_reps)
    if which == "ours":
        res["listing cached"] = _times(ds.json_bytes, reps)
    res["list_images"] = _times(ds.list_images, reps)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"times": res, "n_images": len(ids), "peak_rss_mb": rss_mb}


def run_server(tree: Path, label: Path, reps: int, out: Path) -> dict[str, Any]:
    """``GET /datastore/?output=all`` through a real PanTS Label server on the tree."""
    import urllib.request

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from server import Server

    from lib.core.labelmap import load_labelmap

    url_for = lambda server: f"{server.url}/datastore/?output=all"  # noqa: E731
    server = Server(tree, out / "server.log", conf={"hide_imported_labels": "true", "model_dir": str(out / "model")},
                    timeout=600)
    try:
        def get() -> int:
            return len(urllib.request.urlopen(url_for(server), timeout=120).read())

        first = _times(get, 1)
        warm = _times(get, reps)
        after_save = []
        lm = load_labelmap()
        info = json.dumps({"label_info": [{"name": lm.id_to_name[i], "idx": i} for i in (c.id for c in lm.classes)]})
        image_ids = sorted(json.loads(urllib.request.urlopen(url_for(server), timeout=120).read())["objects"])[:3]
        for image_id in image_ids:
            boundary = "benchboundary"
            body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\n\r\n{info}\r\n"
                    f"--{boundary}\r\nContent-Disposition: form-data; name=\"label\"; filename=\"label.nii.gz\"\r\n"
                    "Content-Type: application/octet-stream\r\n\r\n").encode() + label.read_bytes() + \
                f"\r\n--{boundary}--\r\n".encode()
            req = urllib.request.Request(f"{server.url}/datastore/label?image={image_id}&tag=final", data=body,
                                         method="PUT", headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
            urllib.request.urlopen(req, timeout=120).read()
            after_save += _times(get, 1)
            listing = json.loads(urllib.request.urlopen(url_for(server), timeout=120).read())
            if "final" not in listing["objects"][image_id]["labels"]:
                raise RuntimeError(f"listing after saving {image_id} does not show the label")
    finally:
        server.stop()
    return {"listing server": warm, "listing server first": first, "listing server after save": after_save}


# ---- report ----------------------------------------------------------------------------------


def report(ours: dict[str, Any], local: dict[str, Any] | None, out: Path, n: int) -> list[dict[str, Any]]:
    rows = []
    for metric, t in ours["times"].items():
        o = statistics.median(t)
        loc = statistics.median(local["times"][metric]) if local and metric in local["times"] else None
        target, least = TARGETS.get(metric, (None, None))
        ratio = (loc / o) if (loc is not None and o > 0) else None
        met = None
        if target is not None:
            met = o <= target and (ratio is None or ratio >= least)
        rows.append({
            "metric": metric,
            "ours_median_s": round(o, 5),
            "local_median_s": round(loc, 5) if loc is not None else "",
            "local_over_ours": round(ratio, 1) if ratio is not None else "",
            "reps_ours": len(t),
            "reps_local": len(local["times"][metric]) if local and metric in local["times"] else 0,
            "target": f"<= {target * 1000:g} ms & >= {least}x" if target and target < 1 else (
                f"<= {target:g} s & >= {least}x" if target else ""),
            "met": "" if met is None else ("yes" if met else "NO"),
        })
    with open(out / "bench_results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    def fmt(s: Any) -> str:
        if s == "" or s is None:
            return "-"
        return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"

    print(f"\n{n} scans; median times (ours: PanTSDatastore, Local: monailabel LocalDatastore)\n")
    print(f"| {'operation':22} | {'ours':>10} | {'Local':>10} | {'Local/ours':>10} | target |")
    print(f"|{'-' * 24}|{'-' * 12}|{'-' * 12}|{'-' * 12}|--------|")
    for r in rows:
        ratio = f"{r['local_over_ours']}x" if r["local_over_ours"] != "" else "-"
        print(f"| {r['metric']:22} | {fmt(r['ours_median_s']):>10} | {fmt(r['local_median_s']):>10} | "
              f"{ratio:>10} | {r['met'] or '':6} |")
    print(f"\npeak RSS: ours {ours['peak_rss_mb']:.0f} MB" +
          (f", Local {local['peak_rss_mb']:.0f} MB" if local else ""))
    print(f"results: {out / 'bench_results.csv'}")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bench_datastore.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--n", type=int, default=36390, help="number of scans (PanTS: 36390)")
    p.add_argument("--out", type=Path, required=True, help="working folder (tree, indexes, results CSV)")
    p.add_argument("--labeled", type=int, default=None, help="scans with PanTS masks (default min(n, 9901))")
    p.add_argument("--reps", type=int, default=20, help="repetitions of the fast operations")
    p.add_argument("--slow-reps", type=int, default=5, help="repetitions of LocalDatastore's slow operations")
    p.add_argument("--reopen-reps", type=int, default=3, help="repetitions of re-open")
    p.add_argument("--skip-local", action="store_true", help="measure only the PanTS datastore")
    p.add_argument("--skip-server", action="store_true", help="leave out the listing through a real server")
    p.add_argument("--worker", choices=["ours", "local"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    labeled = min(args.n, 9901) if args.labeled is None else args.labeled
    args.out.mkdir(parents=True, exist_ok=True)

    if args.worker:
        tree = args.out / ("pants" if args.worker == "ours" else "flat")
        res = run_worker(args.worker, tree, args.out / "proto" / "label.nii.gz", args.reps, args.reopen_reps,
                         args.slow_reps)
        (args.out / f"result_{args.worker}.json").write_text(json.dumps(res))
        return 0

    build_tree(args.out, args.n, labeled)
    results = {}
    for which in ("ours",) if args.skip_local else ("ours", "local"):
        print(f"measuring {which} ...", flush=True)
        cmd = [sys.executable, __file__, "--worker", which, "--n", str(args.n), "--out", str(args.out),
               "--reps", str(args.reps), "--slow-reps", str(args.slow_reps), "--reopen-reps", str(args.reopen_reps),
               "--labeled", str(labeled)]
        subprocess.run(cmd, check=True)
        results[which] = json.loads((args.out / f"result_{which}.json").read_text())
    if not args.skip_server:
        print("measuring the listing through the server ...", flush=True)
        results["ours"]["times"].update(run_server(args.out / "pants", args.out / "proto" / "label.nii.gz", args.reps,
                                                   args.out))
    if "local" in results:  # the server's listing is compared with what LocalDatastore builds
        results["local"]["times"]["listing server"] = results["local"]["times"]["listing json"]
    print(f"load average: {Path('/proc/loadavg').read_text().strip()}")
    report(results["ours"], results.get("local"), args.out, args.n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
