#!/usr/bin/env python
"""Train the PanTS model offline on a labelled root, on CPUs, GPUs or nodes; resumable; publishes a version.

The same plan and training loop as the server's train task (lib/trainers/segmentation.py): the
same labels (a scan's `final` label over its imported PanTS masks), the same fixed validation
split, the same rule (a model worse than the served one is never published). What it adds for
runs over thousands of scans:
  * torchrun: one process per GPU (NCCL) or per CPU share (gloo), on one or several machines;
  * preprocessing spread over --workers processes per rank, cached on disk (never all in RAM);
  * a checkpoint after every epoch: the same command started again after a kill goes on from there;
  * progress on the console and in <model dir>/train_stats_<preset>.json (the server's /info shows it);
  * the result is published into the dataset's model store as a new version with its model card.

Models go to the dataset's store (<root>/.pants_label/models, the folder the server uses for it)
unless --model-dir names another.

Examples
  # one process (CPU or one GPU)
  pants-label train --studies data/demo --epochs 2
  # one machine, 8 GPUs
  torchrun --standalone --nproc_per_node 8 scripts/train.py --studies /data/PanTS --epochs 300 --workers 4
  # two machines (the PanTS root and the model folder on a shared filesystem), run on each
  torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29400 \\
      scripts/train.py --studies /shared/PanTS --epochs 300
  # CPU, 2 processes over gloo
  torchrun --standalone --nproc_per_node 2 scripts/train.py --studies data/demo --device cpu
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lib.core.labelmap import load_labelmap
from lib.core.settings import DEFAULT_PRESETS, load_segmentation_config
from lib.model.store_location import dataset_identity, model_dir_for
from lib.trainers.segmentation import FitPlan, PanTSTrain, build_cache, fit

log = logging.getLogger("train")


def init_distributed(device: str, timeout_h: float) -> tuple[int, int, str]:
    """Rank, world size and device kind ("cpu"/"cuda"); joins the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if device == "cpu":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))  # ranks share the cores
    if world > 1:
        # long timeout: ranks wait at the first collective while rank 0 indexes the dataset and
        # every rank preprocesses its share (hours for PanTS on a cold cache)
        dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=timeout_h))
    return rank, world, device


def request_of(args: argparse.Namespace) -> dict[str, Any]:
    """The train task's options (TrainRequest) from the command line; unset ones keep presets.yaml's."""
    req: dict[str, Any] = {"trigger": "scripts/train.py", "from_scratch": args.from_scratch,
                           "cache_workers": args.workers, "val_every": args.val_every}
    for key, value in (("max_epochs", args.epochs), ("learning_rate", args.lr), ("batch_size", args.batch_size),
                       ("iterations_per_epoch", args.iterations_per_epoch)):
        if value is not None:
            req[key] = value
    return req


def _consolidate(root: str, state_dir: str, ids: list[str]) -> int:
    """A worker process: merge the PanTS masks of ``ids`` into their cached 28-class maps."""
    from lib.datastore.pants import PanTSDatastore

    ds = PanTSDatastore(root, state_dir=state_dir)
    try:
        return sum(ds.consolidate_imported(i) is not None for i in ids)
    finally:
        ds.close()


def consolidate_imported(ds: Any, workers: int) -> None:
    """Merge the PanTS masks of every training scan without a final label, over ``workers`` processes
    (the datastore would otherwise do it one scan at a time when the training list is read)."""
    import multiprocessing
    import time
    from concurrent.futures import ProcessPoolExecutor

    ids = [i for i in ds.list_images() if ds.split_of(i) in ds.training_splits
           and set(ds.get_labels_by_image_id(i)) == {"pants"}]
    if workers <= 1 or len(ids) < 2 * workers:
        return  # few: the training list builds them as it goes
    t0 = time.time()
    chunks = [ids[k::workers * 4] for k in range(workers * 4)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = sum(pool.map(_consolidate, [str(ds.root)] * len(chunks), [str(ds.state_dir)] * len(chunks), chunks))
    log.info(f"PanTS masks of {done} scans merged by {workers} processes in {time.time() - t0:.0f} s")


def make_plan(args: argparse.Namespace, trainer_args: dict[str, Any], world: int, device: str) -> FitPlan:
    """Rank 0: open the datastore, pick the data and the card's facts (as the server's train task)."""
    from lib.datastore.pants import PanTSDatastore

    ds = PanTSDatastore(args.studies, state_dir=args.datastore_dir, hide_imported_labels=args.hide_imported_labels,
                        labelmap=trainer_args["labelmap"])
    try:
        model_dir = model_dir_for(str(args.model_dir) if args.model_dir else None, ds)
        trainer = PanTSTrain(**trainer_args, model_dir=model_dir, device=device, dataset=dataset_identity(ds))
        opts = trainer.options(request_of(args))
        stats = trainer.start_stats(opts, device, world)
        log.info(f"{args.studies}: models in {model_dir}")
        if not args.hide_imported_labels:
            consolidate_imported(ds, args.workers)
        return trainer.plan(opts, ds, device, world, stats)
    finally:
        ds.close()


def run(args: argparse.Namespace) -> int:
    rank, world, device = init_distributed(args.device, args.timeout_hours)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S")
    cfg = load_segmentation_config(args.presets)
    preset = args.preset if args.preset != "auto" else ("full" if device == "cuda" else "fast")
    trainer_args = {"cfg": cfg, "labelmap": load_labelmap(), "preset_name": preset}
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = make_plan(args, trainer_args, world, device)
        except Exception as err:  # noqa: BLE001 - told to every rank, which then stop too
            box[0] = f"{type(err).__name__}: {err}"
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise SystemExit(f"train: {box[0]}")
    plan: FitPlan = box[0]
    trainer = PanTSTrain(**trainer_args, model_dir=plan.store_root, device=device, dataset=plan.dataset)
    try:
        build_cache(plan, max(1, plan.opts.cache_workers), rank, world)
        if world > 1:
            dist.barrier()  # every rank's share is on disk
        result = fit(plan, rank, world)
    except Exception as err:
        if rank == 0:
            trainer.failed(err, plan.stats)
        raise
    finally:
        if world > 1:
            dist.destroy_process_group()
    if rank == 0:
        stats = trainer.finish(result)
        if stats.get("published"):
            log.info(f"published model version {stats['version']} "
                     f"(card: {plan.store_root / 'versions' / preset / stats['version'] / 'card.json'})")
        else:
            log.info(f"not published: validation mean Dice {stats.get('best_metric')} is below the served "
                     f"model's {stats.get('baseline_metric')}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", type=Path, required=True, metavar="DIR",
                   help="a PanTS root (ImageTr/, LabelTr/) or a flat folder the server serves")
    p.add_argument("--datastore-dir", type=Path, metavar="DIR",
                   help="the datastore's state folder if not <studies>/.pants_label (as --conf datastore_dir)")
    p.add_argument("--model-dir", type=Path, metavar="DIR",
                   help="model store (as --conf model_dir); default: the dataset's own, <state folder>/models")
    p.add_argument("--preset", choices=("auto", "fast", "full"), default="auto", help="auto: full on GPU, fast on CPU")
    p.add_argument("--presets", type=Path, default=DEFAULT_PRESETS, help="presets file (default configs/presets.yaml)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--epochs", type=int, help="default presets.yaml training.max_epochs")
    p.add_argument("--iterations-per-epoch", type=int, help="per epoch over all ranks; 0 = one pass over the scans")
    p.add_argument("--batch-size", type=int, help="per rank")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--val-every", type=int, default=1, metavar="N", help="validate every N epochs (default 1)")
    p.add_argument("--from-scratch", action="store_true", help="do not start from the served model's weights")
    p.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                   help="preprocessing processes per rank (default: half the cores, at most 8)")
    p.add_argument("--hide-imported-labels", action="store_true",
                   help="train on final labels only (default: PanTS masks where a scan has no final label)")
    p.add_argument("--timeout-hours", type=float, default=12.0, help="how long ranks wait for each other")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run(parse_args()))
