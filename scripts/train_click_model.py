#!/usr/bin/env python
"""Train the demo click model (the ``deepedit`` infer model's weights) on phantoms, with simulated clicks.

What it does, with the defaults (one command, reproducible):

* draws ``--n-train`` adult-size phantoms (pants_tools/phantom.py, data seed ``--data-seed``; 60%
  with a lesion) at physical scale: a 410 x 410 x 375 mm field of view at a random spacing of
  1.0-1.6 mm in-plane and 1.25-2.5 mm between slices;
* runs the committed demo segmentation model (``apps/pants_label/demo_model/segresnet_fast.pt``)
  on each, for the start labels the clicks correct (as in use: clicks follow auto-segmentation);
* trains the click network (configs/clicks.yaml: recipe, window, classes) for ``--steps``
  batches with simulated clicks (lib/model/click_training.py), training seed ``--seed``;
* writes ``<--out>/segresnet_clicks.pt`` with its card (``clicks_card.json`` beside it).

CPU time, defaults (16 phantoms, 300 steps), 2-core box shared with another training run (torch 2.13,
2 threads, nice 19): 48.6 CPU-minutes, 56 min wall; the committed weights are that run's (README
"Click-guided correction"). The defaults were cut from 24 phantoms and 1,200 steps to fit an hour. ``make serve`` copies the file into
the demo dataset's model store.

Examples:
    .venv/bin/python scripts/train_click_model.py
    .venv/bin/python scripts/train_click_model.py --steps 100 --n-train 4 --out /tmp/clicks
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "pants_label"))
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lib.core.click_config import load_click_config  # noqa: E402
from lib.core.labelmap import load_labelmap  # noqa: E402
from lib.core.settings import load_segmentation_config  # noqa: E402
from lib.imaging.volume_io import Volume  # noqa: E402
from lib.model.click_training import fit_clicks, prepare_case  # noqa: E402
from lib.model.model_store import publish  # noqa: E402
from lib.model.segmenter import Segmenter  # noqa: E402
from pants_tools.phantom import make_case  # noqa: E402

DEMO_SEG = REPO / "apps" / "pants_label" / "demo_model" / "segresnet_fast.pt"
FOV_MM = (410.0, 410.0, 375.0)  # 512 x 512 x 300 at 0.8 x 0.8 x 1.25 mm


def phantom_volume(index: int, data_seed: int, lesion: bool) -> tuple[Volume, np.ndarray]:
    """A phantom at physical scale and a spacing drawn from the case's own random stream."""
    rng = np.random.default_rng([data_seed, index, 99])
    xy, z = float(rng.uniform(1.0, 1.6)), float(rng.uniform(1.25, 2.5))
    spacing = (xy, xy, z)
    shape = tuple(int(round(f / s)) for f, s in zip(FOV_MM, spacing))
    p = make_case(index, shape=shape, spacing=spacing, seed=data_seed, lesion=lesion)
    return Volume(p.ct.astype(np.float32), p.affine), load_labelmap().consolidate(p.masks)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", type=Path, default=REPO / "apps" / "pants_label" / "demo_model")
    ap.add_argument("--n-train", type=int, default=16)
    ap.add_argument("--data-seed", type=int, default=100, help="phantom seed (the benchmark holds out seed 200)")
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seg-model", type=Path, default=DEMO_SEG, help="segmentation weights for the start labels")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    lm, cfg, seg_cfg = load_labelmap(), load_click_config(), load_segmentation_config()
    cfg.check_labels(lm)
    segmenter = Segmenter(seg_cfg, lm, "fast", args.seg_model) if args.seg_model.exists() else None
    t0, c0 = time.time(), cpu_seconds()
    cases = []
    from tqdm import tqdm

    for i in tqdm(range(args.n_train), desc="phantoms", unit="case"):
        vol, label = phantom_volume(i, args.data_seed, lesion=(i % 5) < 3)
        start = segmenter.segment(vol)[0] if segmenter is not None else None
        case = prepare_case(vol, label, start, lm, seg_cfg, cfg)
        if case is not None:
            cases.append(case)
    prep_cpu = cpu_seconds() - c0
    state, losses = fit_clicks(cases, lm, cfg, args.steps, args.seed, progress=True)
    cpu = cpu_seconds() - c0
    command = "python scripts/train_click_model.py " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = (f"phantom click model: {len(cases)} phantoms (data seed {args.data_seed}), {args.steps} steps, "
               f"seed {args.seed}, final loss {np.mean(losses[-50:]):.3f}")
    meta = {
        "labels": lm.names, "summary": summary, "phantom_model": True, "spacing_mm": [cfg.spacing_mm] * 3,
        "train_cpu_s": round(cpu, 1), "prep_cpu_s": round(prep_cpu, 1), "wall_s": round(time.time() - t0, 1),
        "steps": args.steps, "seed": args.seed, "data_seed": args.data_seed, "train_size": len(cases),
        "note": "trained on synthetic phantoms only: not for real CT", "command": command.strip(),
        "click_config": cfg.model_dump(mode="json"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = publish(state, meta, args.out / "segresnet_clicks.pt")
    (args.out / "clicks_card.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "labels"}, indent=1))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {summary}; {cpu / 60:.1f} CPU-min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
