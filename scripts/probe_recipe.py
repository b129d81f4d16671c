#!/usr/bin/env python
"""Quick recipe probe: a few hundred training steps with one change, scored on held-out phantoms.

For comparing a recipe change in minutes before a full ``bench-learning`` run. It uses the app's
own pieces (preprocessing cache, class-weighted crops, SegResNet, ``dice_ce_loss``, metrics) in a
plain loop: no train task, no validation split logic, no publishing. The first ``--train`` scans of
the phantom set train, the next ``--val`` score (mean Dice over the classes present, at the
network's grid) every ``steps / 6`` steps. Variants:

  dice      Dice + cross-entropy, unweighted
  wce+dice  Dice + class-weighted cross-entropy (sqrt inverse frequency, capped at 30)
  ce        cross-entropy only

Example (the phantom set is made by ``pants-label bench-learning`` first):
    .venv/bin/pants-label probe-recipe --variant wce+dice --steps 120 --spacing 6 \\
        --data data/bench_learning_128x128x112_2.9x2.9x3.6_s0
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from lib.core.labelmap import load_labelmap
from lib.datastore.folder_scan import read_mask_folder
from lib.core.settings import load_segmentation_config
from lib.model.metrics import mean_dice
from lib.model.segmenter import build_network
from lib.model.training import CaseCache, CropSampler, ce_class_weights, class_weights, dice_ce_loss


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="probe_recipe.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a phantom set in the PanTS layout")
    p.add_argument("--variant", choices=("dice", "wce+dice", "ce"), default="wce+dice")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--spacing", type=float, default=6.0, help="isotropic training grid, mm")
    p.add_argument("--train", type=int, default=20)
    p.add_argument("--val", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    lm, cfg = load_labelmap(), load_segmentation_config()
    preset = cfg.preset("fast").model_copy(update={"spacing_mm": (args.spacing,) * 3})
    ids = sorted(q.name for q in (args.data / "ImageTr").iterdir())[: args.train + args.val]
    with tempfile.TemporaryDirectory(prefix="probe_") as tmp:
        cache = CaseCache(Path(tmp) / "cache", cfg, preset, lm)
        cases = []
        for i in ids:  # one label map per scan from its per-class masks
            label = Path(tmp) / f"{i}.nii.gz"
            ct = args.data / "ImageTr" / i / "ct.nii.gz"
            truth = read_mask_folder(args.data / "LabelTr" / i / "segmentations", lm)
            nib.save(nib.Nifti1Image(truth, nib.load(ct).affine), label)
            cases.append(cache.get(i, str(ct), str(label)))
        train, val = cases[: args.train], cases[args.train:]
        patch = tuple(min(96, int(math.ceil(s / 8)) * 8) for s in np.max([c.image.shape for c in cases], axis=0))
        torch.manual_seed(0)
        fmt = torch.channels_last_3d
        net = build_network(cfg, lm.num_classes).to(memory_format=fmt)
        opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-5)
        sampler = CropSampler(train, patch, class_weights(cfg, lm), 1.0, seed=0)
        weight = ce_class_weights(train, lm.num_classes + 1, 30.0)
        t0, losses = time.time(), []
        print(f"{'step':>6} {'loss':>7} {'val Dice':>9} {'s':>6}   ({args.variant}, {args.spacing:g} mm, lr {args.lr:g}, patch {patch})")
        for step in range(1, args.steps + 1):
            x, y = sampler.sample(1)
            out = net(x.contiguous(memory_format=fmt))
            if args.variant == "ce":
                loss = torch.nn.functional.cross_entropy(out, y[:, 0])
            else:
                loss = dice_ce_loss(out, y, ce_weight=weight if args.variant == "wce+dice" else None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if step % max(1, args.steps // 6) == 0 or step == args.steps:
                print(f"{step:>6} {np.mean(losses[-20:]):>7.3f} {score(net, val, lm, fmt):>9.3f} {time.time() - t0:>6.0f}", flush=True)
    return 0


def score(net: torch.nn.Module, cases: list, lm, fmt: torch.memory_format) -> float:
    """Mean Dice over the classes present, per scan (whole scan in one pass, padded to 8)."""
    net.eval()
    out = []
    with torch.no_grad():
        for c in cases:
            x = torch.from_numpy(np.asarray(c.image, dtype=np.float32))[None, None]
            pad = [(-s) % 8 for s in x.shape[2:]]
            xp = torch.nn.functional.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]), value=-1.0)
            lg = net(xp.contiguous(memory_format=fmt))[:, :, : x.shape[2], : x.shape[3], : x.shape[4]]
            out.append(mean_dice(lg.argmax(1)[0].numpy().astype(np.uint8), np.asarray(c.label), lm)["mean"])
    net.train()
    return float(np.mean(out))


if __name__ == "__main__":
    sys.exit(main())
