#!/usr/bin/env python
"""Measure the active-learning scoring cost per scan on a full-size CT (512x512x300 by default).

Writes (once, reused) a phantom CT of the given shape and spacing, then scores it ``--reps`` times
with the app's scorer (``lib.activelearning.scoring``, settings from ``configs/active_learning.yaml``) and the
preset's network (random weights: the cost does not depend on them). Prints a table of the stage
medians (load, pre, localize, uncertainty, total), the CPU time and the load average, and writes
OUT/bench_scoring.csv.

With ``--dicomweb`` the CT is first stored as a CT series in a local Orthanc (started here, on a
loopback port) and each run starts from an empty state folder: the cost per series is then
retrieval (WADO-RS into the state folder), conversion to NIfTI (with the case metadata read from
the headers) and scoring, as the server pays it once per PACS series. MONAI Label's own DICOMweb
datastore retrieves and converts the same series in the same run, for the ratio.

Examples
  .venv/bin/pants-label bench-scoring --out /tmp/bench_scoring
  .venv/bin/pants-label bench-scoring --out /tmp/bench_scoring --dicomweb
  .venv/bin/pants-label bench-scoring --out /tmp/bench_scoring --device cuda --preset full
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import time
from pathlib import Path



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the phantom CT and the CSV")
    ap.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300))
    ap.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 1.25))
    ap.add_argument("--preset", default="fast", help="segmentation preset (fast on CPU, full on GPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--config", type=Path, default=None, help="active-learning config (default: configs/active_learning.yaml)")
    ap.add_argument("--dicomweb", action="store_true", help="retrieve the CT from a local Orthanc first (see above)")
    args = ap.parse_args(argv)

    import torch

    from lib.core.al_config import load_al_config
    from lib.core.labelmap import load_labelmap
    from pants_tools.phantom import make_case, write_case
    from lib.activelearning.scoring import ScanScorer, load_for_scoring
    from lib.model.segmenter import Segmenter, default_threads
    from lib.core.settings import load_segmentation_config

    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        default_threads()
    out: Path = args.out
    ct = out / f"ct_{'x'.join(map(str, args.shape))}.nii.gz"
    if not ct.is_file():
        print(f"writing a {tuple(args.shape)} phantom CT to {ct} (once)")
        p = make_case(0, shape=args.shape, spacing=args.spacing, seed=0, lesion=True)
        write_case(p, ct, out / "segmentations")
    cfg, lm = load_segmentation_config(), load_labelmap()
    al = load_al_config(args.config) if args.config else load_al_config()
    seg = Segmenter(cfg, lm, args.preset, out / "no_model.pt", args.device)  # random weights
    scorer = ScanScorer(seg, al.scoring)
    net = seg.network()
    pacs = PacsSource(out, ct) if args.dicomweb else None
    rows = []
    try:
        for rep in range(args.reps + 1):  # the first run warms up (allocator, kernels) and is not counted
            t0, c0 = time.perf_counter(), time.process_time()
            fetched = pacs.fetch(rep) if pacs else {"path": ct}
            t1 = time.perf_counter()
            vol = load_for_scoring(fetched["path"])
            t_load = time.perf_counter() - t1
            s = scorer.score_volume(vol, net)
            total, cpu = time.perf_counter() - t0, time.process_time() - c0
            peer = pacs.peer_fetch(rep) if pacs else {}
            if rep:
                rows.append({**{k: v for k, v in fetched.items() if k != "path"}, "load": t_load, **s.seconds,
                             "total": total, "cpu": cpu, "loadavg": os.getloadavg()[0], **peer})
            print(f"run {rep}{' (warm-up)' if not rep else ''}: {total:.2f} s {s.seconds} crop {s.crop_shape}"
                  + (f"; retrieve {fetched['retrieve']:.2f} s, convert {fetched['convert']:.2f} s" if pacs else ""))
    finally:
        if pacs:
            pacs.close()
    keys = (["retrieve", "convert"] if pacs else []) + ["load", "pre", "localize", "uncertainty", "total", "cpu", "loadavg"]
    if pacs:
        keys += ["peer_retrieve_convert"]
    med = {k: statistics.median(r[k] for r in rows) for k in keys}
    print()
    print(f"scoring cost per scan, {tuple(args.shape)} CT at {tuple(args.spacing)} mm, preset {args.preset}, "
          f"{args.device}, {torch.get_num_threads()} threads, {al.scoring.mc_samples} stochastic passes, "
          f"localize at {al.scoring.localize_spacing_mm} mm, crop <= {al.scoring.max_crop_voxels}; median of {len(rows)}")
    print(f"{'stage':<12} {'seconds':>8}")
    for k in keys[: keys.index("total") + 1]:
        print(f"{k:<12} {med[k]:>8.2f}")
    if pacs:
        ours = med["retrieve"] + med["convert"]
        print(f"retrieve + convert: {ours:.2f} s here; MONAI Label's DICOMweb datastore "
              f"{med['peer_retrieve_convert']:.2f} s ({med['peer_retrieve_convert'] / ours:.2f}x)")
    # Wall time depends on what else runs on the machine; CPU time (all threads) hardly does.
    print(f"CPU time {med['cpu']:.2f} s over {torch.get_num_threads()} threads; "
          f"1-min load average {med['loadavg']:.2f} on {os.cpu_count()} cores")
    budget = al.scoring.cost_budget_s
    print(f"budget {budget:.1f} s: {'met' if med['total'] <= budget else 'NOT met'}")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_scoring.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: round(r[k], 3) for k in keys})  # per run
    return 0


class PacsSource:
    """The benchmark CT as a series in a local Orthanc, fetched from an empty state folder per run."""

    def __init__(self, out: Path, ct: Path) -> None:
        import nibabel as nib
        import numpy as np

        from lib.datastore.dicomweb import make_client, store
        from lib.imaging.dicom_series import CTStudy, ct_series, stable_uid
        from pants_tools.orthanc import Orthanc

        shutil.rmtree(out / "orthanc", ignore_errors=True)
        self.out = out
        self.orthanc = Orthanc(out / "orthanc", out / "orthanc.log")
        img = nib.load(str(ct))
        study = CTStudy(patient_id="BENCH", study_uid=stable_uid("BENCH", "study"), series_uid=stable_uid("BENCH", "ct"),
                        institution="center_a", contrast_phase="venous")
        datasets = ct_series(np.asarray(img.dataobj, dtype=np.float32), img.affine, study)
        client = make_client(self.orthanc.dicomweb)
        print(f"storing {len(datasets)} CT instances in Orthanc at {self.orthanc.dicomweb} (once)")
        for k in range(0, len(datasets), 64):
            store(client, datasets[k : k + 64])
        self.series = study.series_uid

    def fetch(self, rep: int) -> dict:
        """Retrieve and convert the series through the app's DICOMweb datastore, from nothing."""
        from lib.datastore.dicomweb import DICOMwebDatastore

        state = self.out / "state"
        shutil.rmtree(state, ignore_errors=True)
        ds = DICOMwebDatastore(self.orthanc.dicomweb, state_dir=state)
        t0 = time.perf_counter()
        ds.series_geometry(self.series)  # WADO-RS: every instance into the state folder
        t1 = time.perf_counter()
        path = ds.get_image_uri(self.series)  # pixels -> NIfTI, metadata from the headers
        t2 = time.perf_counter()
        ds.close()
        return {"path": path, "retrieve": t1 - t0, "convert": t2 - t1}

    def peer_fetch(self, rep: int) -> dict:
        """The same through MONAI Label's DICOMWebDatastore (download, then SimpleITK to NIfTI)."""
        from monailabel.datastore.dicom import DICOMWebDatastore

        from lib.datastore.dicomweb import make_client

        # a new folder per run: the peer's file watcher fails when its folder is deleted under it
        cache = self.out / f"peer_cache_{rep}"
        shutil.rmtree(cache, ignore_errors=True)
        peer = DICOMWebDatastore(make_client(self.orthanc.dicomweb), {"Modality": "CT"}, cache_path=str(cache))
        t0 = time.perf_counter()
        peer.get_image_uri(self.series)
        return {"peer_retrieve_convert": time.perf_counter() - t0}

    def close(self) -> None:
        self.orthanc.stop()
        for cache in self.out.glob("peer_cache_*"):
            shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
