#!/usr/bin/env python
"""Training speed: the bare network step beside the app's training iteration, in one run.

On synthetic phantoms (the demo's size by default), this times, with the batch shape the train
task uses on this device (presets.yaml ``training``, with ``training.cpu`` on a CPU):

1. bare: network forward, backward of a fixed gradient and an AdamW step, in the trainer's memory
   format, on one batch already in memory (nothing else: no sampling, no loss, no logging);
2. app: the real train task (lib/trainers/segmentation.py: memory-mapped cache, class-weighted
   crops prepared on a background thread, Dice+CE loss, progress writes), iterations after the
   first, validation excluded (its time is printed apart);
3. bare again, so that a change of machine load during the run shows as a spread, not as overhead.

The overhead is app / mean(bare) - 1, and fastest app iteration / fastest bare step - 1 (on a busy
machine other processes only ever slow a step down, so the fastest is the least disturbed); the
goal is <= 15%. ``--reference`` also times the bare step
in the other memory format. Record ``cat /proc/loadavg`` beside the figures: ratios measured in one
run are robust to load, absolute times are not.

Example
  python scripts/bench_train.py --out /tmp/bench_train --iters 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "pants_label"))

import torch  # noqa: E402

from lib.datastore.pants import PanTSDatastore  # noqa: E402
from lib.core.labelmap import LabelMap, load_labelmap  # noqa: E402
from pants_tools.phantom import write_pants_tree  # noqa: E402
from lib.model.segmenter import build_network, default_threads  # noqa: E402
from lib.core.settings import SegmentationConfig, load_segmentation_config  # noqa: E402
from lib.trainers.segmentation import PanTSTrain  # noqa: E402
from lib.model.training import CaseCache, CropSampler, class_weights, effective_patch  # noqa: E402
from lib.model.precision import autocast, describe, resolve_cpu_bf16  # noqa: E402


def bare_step_times(
    cfg: SegmentationConfig, lm: LabelMap, x: torch.Tensor, device: torch.device,
    channels_last: bool, iters: int, cpu_bf16: bool = False,
) -> list[float]:
    """Seconds per forward + backward + AdamW step of the bare network (after one warm-up step)."""
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    net = build_network(cfg, lm.num_classes).to(device, memory_format=fmt).train()
    optim = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = x.to(device, memory_format=fmt)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    grad = None
    times = []
    for i in range(iters + 1):
        t = time.perf_counter()
        optim.zero_grad(set_to_none=True)
        with autocast(device, cpu_bf16):  # the trainer's precision (lib/model/precision.py)
            out = net(x)
        if grad is None:  # a dense gradient like a loss's (a stride-0 one would take a slow path)
            grad = torch.randn_like(out) * 1e-6
        scaler.scale(out).backward(grad)
        scaler.step(optim)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first step allocates and, with cudnn.benchmark, picks kernels
            times.append(time.perf_counter() - t)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/bench_train"), help="work folder (phantoms, model, cache)")
    p.add_argument("--n", type=int, default=5, help="phantom scans (one goes to validation)")
    p.add_argument("--shape", type=int, nargs=3, default=(224, 224, 160), help="phantom voxels (demo: 224 224 160)")
    p.add_argument("--spacing", type=float, nargs=3, default=(1.65, 1.65, 2.5), help="phantom spacing in mm (demo: 1.65 1.65 2.5)")
    p.add_argument("--preset", choices=("fast", "full"), default="fast")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--patch", type=int, nargs=3, help="patch size (default: presets.yaml for this device)")
    p.add_argument("--batch", type=int, help="batch size (default: presets.yaml for this device)")
    p.add_argument("--iters", type=int, default=3, help="timed iterations of each kind (after one warm-up)")
    p.add_argument("--reference", action="store_true", help="also time the bare step in the other memory format")
    args = p.parse_args()

    default_threads()
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cfg0, lm = load_segmentation_config(), load_labelmap()
    training = cfg0.training.for_device(device.type)
    training = training.model_copy(update={
        "patch_size": tuple(args.patch) if args.patch else training.patch_size,
        "batch_size": args.batch or training.batch_size,
        "cpu": type(training.cpu)(),  # already applied
    })
    cfg = cfg0.model_copy(update={"training": training})
    batch = training.batch_size

    root = args.out / "PanTS"
    t0 = time.time()
    write_pants_tree(root, args.n, shape=args.shape, spacing=args.spacing)
    print(f"phantoms: {args.n} x {tuple(args.shape)} at {tuple(args.spacing)} mm ({time.time() - t0:.1f} s)", flush=True)
    ds = PanTSDatastore(root)
    model_dir = args.out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    for f in model_dir.glob("segresnet_*.pt"):
        f.unlink()  # no current model: no baseline validation

    # The bare step's batch: a crop from the same cache the train task reads.
    pairs = {d["image_id"]: d for d in ds.datalist()}
    cache = CaseCache(model_dir / ".cache" / args.preset, cfg, cfg.preset(args.preset), lm)
    cases = [cache.get(i, d["image"], d["label"]) for i, d in pairs.items()]
    patch = effective_patch(training.patch_size, [c.image.shape for c in cases])
    x, _ = CropSampler(cases, patch, class_weights(cfg, lm), 1.0, seed=0).sample(batch)
    fmt = training.channels_last_3d
    fmt_name = "channels_last_3d" if fmt else "contiguous"

    load0 = os.getloadavg()[0]
    bf16 = resolve_cpu_bf16(cfg.cpu_bf16.train, training=True) and device.type == "cpu"
    precision = describe(device, bf16)
    bare = bare_step_times(cfg, lm, x, device, fmt, args.iters, bf16)
    print(f"bare ({fmt_name}): {[round(t, 2) for t in bare]} s", flush=True)
    trainer = PanTSTrain(cfg, lm, args.preset, model_dir, device.type)
    t = time.time()
    s = trainer({"max_epochs": 1, "iterations_per_epoch": args.iters + 1, "batch_size": batch}, ds)
    run_s = time.time() - t
    app = (s["loop_s"] - s["first_iteration_s"]) / (s["iterations"] - 1)
    print(f"app: first iteration {s['first_iteration_s']} s, then {app:.2f} s each; validation {s['val_time_s']} s", flush=True)
    bare += bare_step_times(cfg, lm, x, device, fmt, args.iters, bf16)
    print(f"bare again: {[round(t, 2) for t in bare[args.iters:]]} s", flush=True)
    ref = bare_step_times(cfg, lm, x, device, not fmt, args.iters, bf16) if args.reference else []
    fp32 = bare_step_times(cfg, lm, x, device, fmt, args.iters, False) if bf16 else []
    load1 = os.getloadavg()[0]

    mean_bare = statistics.mean(bare)
    spread = (max(bare) - min(bare)) / mean_bare
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nTraining step, preset '{args.preset}', patch {'x'.join(map(str, s['patch']))}, batch {batch}, "
          f"{dev}, {precision}, torch {torch.__version__}, {platform.machine()}, load average {load0:.2f} -> {load1:.2f}")
    print(f"{'what':<44} {'s/iteration':>12} {'vs bare':>8}")
    print(f"{'bare fwd+bwd+AdamW step (' + fmt_name + ')':<44} {mean_bare:>12.3f} {'':>8}")
    if ref:
        other = "contiguous" if fmt else "channels_last_3d"
        r = statistics.mean(ref)
        print(f"{'bare fwd+bwd+AdamW step (' + other + ')':<44} {r:>12.3f} {r / mean_bare - 1:>+8.1%}")
    if fp32:
        r = statistics.mean(fp32)
        print(f"{'bare step in float32 (cpu_bf16 train: off)':<44} {r:>12.3f} {r / mean_bare - 1:>+8.1%}")
    print(f"{'app training iteration (PanTSTrain.fit)':<44} {app:>12.3f} {app / mean_bare - 1:>+8.1%}")
    fastest = s["fastest_iteration_s"]
    print(f"{'bare, fastest step':<44} {min(bare):>12.3f} {'':>8}")
    print(f"{'app, fastest iteration':<44} {fastest:>12.3f} {fastest / min(bare) - 1:>+8.1%}")
    print(f"\nloop overhead {app / mean_bare - 1:+.1%} (goal <= +15%); bare spread over the run {spread:.0%}; "
          f"validation of {s['val_size']} scans {s['val_time_s']} s; whole train task {run_s:.1f} s "
          f"(cache {s['cache_s']} s)")


if __name__ == "__main__":
    main()
