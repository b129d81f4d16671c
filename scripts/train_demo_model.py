#!/usr/bin/env python
"""Train the demo model that ``make serve`` serves: the app's own trainer on the demo phantoms.

It makes the demo dataset exactly as ``make demo`` does (12 phantoms, 192x192x128 at
1.6x1.6x2.5 mm, seed 0; 10 for training, 2 held out in ImageTe), trains the ``fast`` preset from
scratch with the app's trainer (the same code ``POST /train/segmentation`` runs, with the options
below), evaluates it on the 2 held-out phantoms with ``lib.metrics``, and writes the weights with
a model card to ``apps/pants_label/demo_model/segresnet_fast.pt``. The card says it is a phantom
model: it segments the synthetic phantoms, not real CT.

Seed 0 on the 2-core CPU box (torch 2.13, 2 threads) takes about the CPU time the last run
printed; README "Demo model" has the figure.

Examples:
    python scripts/train_demo_model.py
    python scripts/train_demo_model.py --iterations 300 --epochs 8 --out /tmp/demo_model
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "pants_label"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lib.datastore.pants import PanTSDatastore  # noqa: E402
from lib.core.labelmap import load_labelmap  # noqa: E402
from lib.model.metrics import mean_dice  # noqa: E402
from lib.model.model_store import model_path, publish  # noqa: E402
from pants_tools.phantom import write_pants_tree  # noqa: E402
from lib.model.segmenter import Segmenter  # noqa: E402
from lib.core.settings import load_segmentation_config  # noqa: E402
from lib.trainers.segmentation import PanTSTrain  # noqa: E402
from lib.imaging.volume_io import load_volume  # noqa: E402

PRESET = "fast"
#: the demo dataset, as the Makefile's ``demo`` target makes it
DEMO = {"n": 12, "n_test": 2, "shape": (192, 192, 128), "spacing": (1.6, 1.6, 2.5), "seed": 0}
DEMO_NOTE = ("phantom model: trained on synthetic PanTS-layout phantoms (scripts/train_demo_model.py); "
             "it shows the app working and is not for real CT")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_demo_model.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO / "data" / "demo", help="demo dataset (made if missing)")
    p.add_argument("--out", type=Path, default=REPO / "apps" / "pants_label" / "demo_model", help="output folder")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: presets.yaml)")
    p.add_argument("--iterations", type=int, default=None, help="iterations per epoch (default: presets.yaml)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: presets.yaml)")
    p.add_argument("--val-every", type=int, default=None, help="validate every N epochs (default: every epoch)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    return p


def evaluate(weights: Path, data: Path) -> dict[str, float]:
    """Mean per-class Dice over the held-out phantoms (classes present in each, averaged)."""
    lm, cfg = load_labelmap(), load_segmentation_config()
    seg = Segmenter(cfg, lm, PRESET, weights, "cpu")
    rows = []
    for case in sorted((data / "ImageTe").iterdir()):
        vol = load_volume(case / "ct.nii.gz")
        pred, _ = seg.segment(vol)
        masks = {p.name.split(".")[0]: np.asarray(load_volume(p, dtype=None).array) > 0
                 for p in (data / "LabelTe" / case.name / "segmentations").glob("*.nii.gz")}
        rows.append(mean_dice(pred, lm.consolidate(masks), lm))
    keys = rows[0].keys()
    return {k: round(float(np.nanmean([r[k] for r in rows])), 4) for k in keys}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if not (args.data / "ImageTr").is_dir():
        print(f"making the demo dataset in {args.data}")
        write_pants_tree(args.data, DEMO["n"], shape=DEMO["shape"], spacing=DEMO["spacing"], seed=DEMO["seed"],
                         n_test=DEMO["n_test"], progress=True)
    lm, cfg = load_labelmap(), load_segmentation_config()
    t0, cpu0 = time.time(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="demo_model_") as tmp:
        work = Path(tmp)
        ds = PanTSDatastore(args.data, state_dir=work / "state", hide_imported_labels=False, labelmap=lm)
        trainer = PanTSTrain(cfg, lm, PRESET, work / "model", "cpu")
        request = {"from_scratch": True, "trigger": "scripts/train_demo_model.py"}
        for key, value in (("max_epochs", args.epochs), ("iterations_per_epoch", args.iterations),
                           ("learning_rate", args.lr), ("val_every", args.val_every)):
            if value is not None:
                request[key] = value
        stats = trainer(request, ds)
        ds.close()
        trained = model_path(work / "model", PRESET)
        if not stats.get("published") or not trained.exists():
            print(f"training did not publish a model: {stats}")
            return 1
        wall, cpu = time.time() - t0, time.process_time() - cpu0
        scores = evaluate(trained, args.data)
        blob = torch.load(trained, map_location="cpu", weights_only=True)
        card = {**blob["meta"], "phantom_model": True, "note": DEMO_NOTE, "demo_dataset": {
            k: list(v) if isinstance(v, tuple) else v for k, v in DEMO.items()},
            "train_request": request, "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1),
            "threads": args.threads, "test_dice": scores, "torch": torch.__version__}
        args.out.mkdir(parents=True, exist_ok=True)
        out = model_path(args.out, PRESET)
        publish(blob["state_dict"], card, out)
        (args.out / "model_card.json").write_text(json.dumps(card, indent=1, default=str) + "\n")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n{'class':<24} test DSC")
    for k, v in scores.items():
        print(f"{k:<24} {v:.3f}")
    print(f"\nwrote {out} ({out.stat().st_size / 2**20:.1f} MiB); wall {wall / 60:.1f} min, "
          f"CPU {cpu / 60:.1f} min, peak RSS {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
