"""MONAI Label train task: fine-tune the preset's SegResNet and publish it only if it is not worse.

MONAI Label runs this in a subprocess (``POST /train/segmentation``, or the auto-retrain scheduler
of :mod:`lib.retrain`); ``scripts/train.py`` runs the same plan and loop under ``torchrun`` for
large offline runs. Progress goes to a stats JSON beside the model, which ``/info`` reads as
``train_stats``. A new model is published, as a new version of the model store with its card
(:mod:`lib.model.model_store`, :mod:`lib.model.model_card`), only after it matched or beat the
served one on the same fixed, center-stratified validation set; the infer task reloads it by file
mtime, without a restart. A refused run is stored as a version that is not served (its card says
why), so an admin can still inspect or serve it. Each epoch ends with a checkpoint: a killed run
started again with the same data and options goes on from its last epoch.

Devices: one CUDA GPU with mixed precision; several GPUs with torch DDP (one process per GPU,
NCCL; MONAI Label's ``multi_gpu`` request key, on by default); the CPU otherwise. DDP also runs on
the CPU over gloo with ``cpu_processes > 1`` (how the DDP path is tested without a GPU).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.distributed as dist
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask
from pydantic import BaseModel, ConfigDict, Field

from lib.core.config_errors import validate_model
from lib.core.labelmap import LabelMap
from lib.model.checkpoint import Checkpoint, label_stamps, run_checkpoint
from lib.model.engine import Engine, plain_state, publishable, refusal
from lib.model.lesion_synthesis import LesionSynthesizer
from lib.model.precision import resolve_cpu_bf16
from lib.model.metrics import evaluate_case, mean_dice
from lib.model.model_card import code_version, device_description, per_class, training_scans
from lib.model.model_store import ModelStore, diverged, model_path, read_json, write_json_atomic
from lib.model.segmenter import Segmenter, build_network
from lib.core.settings import SegmentationConfig
from lib.model.training import (
    CachedCase,
    CaseCache,
    build_cache as build_case_cache,
    CropSampler,
    PrefetchSampler,
    auto_cache_workers,
    ce_class_weights,
    class_weights,
    dice_ce_loss,
    effective_patch,
    meta_centers,
    split_train_val,
)

logger = logging.getLogger(__name__)

#: seconds between progress writes inside an epoch (an epoch over thousands of scans is long)
_STATS_EVERY_S = 10.0
#: training keys the model card records as the run's recipe
RECIPE_KEYS = {"patch_size", "batch_size", "crop_class_weights", "crop_background_weight", "crop_order",
               "dice_over", "ce_weight_cap", "augment", "lesion_synthesis"}


class TrainRequest(BaseModel):
    """Options a client may send with ``POST /train/segmentation`` (defaults from presets.yaml)."""

    model_config = ConfigDict(extra="ignore")  # clients also send model/device/etc.

    max_epochs: int = Field(ge=1, le=10000)
    learning_rate: float = Field(gt=0, le=1)
    batch_size: int = Field(ge=1, le=64)
    iterations_per_epoch: int = Field(ge=0, le=100000)
    from_scratch: bool = False
    val_every: int = Field(1, ge=1)
    multi_gpu: bool = True  # MONAI Label's key: DDP over every visible GPU when there are several
    cpu_processes: int = Field(1, ge=1, le=64)  # DDP over gloo on the CPU (no GPU)
    cache_workers: int = Field(0, ge=0, le=256)  # processes preprocessing scans into the cache; 0 = auto
    trigger: str = "on demand"  # who started the run (the auto-retrain scheduler says why)
    # Scans to validate (and gate publishing) on, kept out of training; None: the seeded split by
    # center (val_fraction). A site pins a reader-agreed set so every run is judged alike.
    validation_ids: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(None, min_length=1,
                                                                                               max_length=5000)


@dataclass
class FitPlan:
    """Everything one training process needs; picklable, so DDP workers receive it whole."""

    cfg: SegmentationConfig
    labelmap: LabelMap
    preset_name: str
    model_path: Path
    stats_path: Path
    cache_root: Path
    train: list[tuple[str, str, str]]  # (image id, image file, label file)
    val: list[tuple[str, str, str]]
    opts: TrainRequest
    device: str  # "cpu" or "cuda"
    stats: dict[str, Any]
    store_root: Path  # the model store's folder (publish target)
    dataset: str | None  # what the data is (recorded in the card)
    card: dict[str, Any]  # the card's facts known before training (scans, labels, parent, trigger)
    checkpoint_path: Path  # resumable state of this run, removed when it ends


class PanTSTrain(TrainTask):
    def __init__(
        self,
        cfg: SegmentationConfig,
        labelmap: LabelMap,
        preset_name: str,
        model_dir: Path,
        device: str,
        max_epochs: int | None = None,
        dataset: str | None = None,
    ) -> None:
        super().__init__(f"Fine-tune the PanTS SegResNet ('{preset_name}' preset) on the labelled scans")
        # presets.yaml training.cpu overrides the recipe where there is no GPU to train on
        on_gpu = device == "cuda" and torch.cuda.is_available()
        cfg = cfg.model_copy(update={"training": cfg.training.for_device("cuda" if on_gpu else "cpu")})
        self.cfg, self.labelmap, self.preset_name = cfg, labelmap, preset_name
        self.preset = cfg.preset(preset_name)
        self.model_dir = Path(model_dir)
        self.device = device
        self.max_epochs = max_epochs or cfg.training.max_epochs
        self.path = model_path(self.model_dir, preset_name)
        self.stats_path = self.model_dir / f"train_stats_{preset_name}.json"
        self.retrain_state_path = self.model_dir / f"retrain_{preset_name}.json"
        self.dataset = dataset
        self.store = ModelStore(self.model_dir, preset_name, dataset)
        # host class names are checked against the label map now, not at the first train request
        LesionSynthesizer.build(cfg.training.lesion_synthesis, self.preset.spacing_mm, labelmap, cfg.preprocessing)

    def config(self) -> dict[str, Any]:
        t = self.cfg.training
        return {
            "max_epochs": self.max_epochs,
            "learning_rate": t.learning_rate,
            "batch_size": t.batch_size,
            "iterations_per_epoch": t.iterations_per_epoch,
            "from_scratch": False,
            "multi_gpu": True,
        }

    def stats(self) -> dict[str, Any]:
        """The last run's progress and result, plus the auto-retrain queue (``/info`` train_stats)."""
        stats = read_json(self.stats_path, default={}) or {}
        auto = read_json(self.retrain_state_path, default=None)
        if auto is not None:
            stats["auto_retrain"] = auto
        return stats

    # ---- the run -------------------------------------------------------------------------
    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        opts = self.options(request)
        world, device = self._world(opts)
        stats = self.start_stats(opts, device, world)
        try:
            plan = self.plan(opts, datastore, device, world, stats)
            build_cache(plan, auto_cache_workers(opts.cache_workers, len(plan.train) + len(plan.val)))
            self._write(plan.stats)
            if world > 1:
                port = _free_port()
                logger.info(f"DDP over {world} processes ({'nccl' if device == 'cuda' else 'gloo'})")
                torch.multiprocessing.spawn(_fit_worker, args=(world, port, plan), nprocs=world, join=True)
                result = read_json(self.stats_path, default={}) or {}
                if "published" not in result:
                    raise RuntimeError("DDP training ended without a result from rank 0")
            else:
                result = fit(plan)
        except Exception as err:
            self.failed(err, stats)
            raise
        return self.finish(result)

    def finish(self, result: dict[str, Any]) -> dict[str, Any]:
        """The run's final stats (DONE), as ``/info`` shows them."""
        stats = {**result, "status": "DONE", "end_ts": time.time(), "progress": 1.0}
        self._write(stats)
        return stats

    def failed(self, err: BaseException, stats: dict[str, Any]) -> None:
        stats = {**(read_json(self.stats_path, default={}) or stats)}
        stats.update(status="FAILED", error=f"{type(err).__name__}: {err}", end_ts=time.time())
        self._write(stats)

    def options(self, request: dict[str, Any]) -> TrainRequest:
        return validate_model("train request", TrainRequest, {**self.config(), **request})

    def start_stats(self, opts: TrainRequest, device: str, world: int) -> dict[str, Any]:
        stats: dict[str, Any] = {"status": "RUNNING", "preset": self.preset_name, "start_ts": time.time(),
                                 "device": device, "processes": world, "trigger": opts.trigger, "progress": 0.0}
        self._write(stats)
        return stats

    def _world(self, opts: TrainRequest) -> tuple[int, str]:
        """How many training processes, on which device type."""
        if self.device == "cuda" and torch.cuda.is_available():
            return (torch.cuda.device_count() if opts.multi_gpu else 1), "cuda"
        return opts.cpu_processes, "cpu"

    def _write(self, stats: dict[str, Any]) -> None:
        write_json_atomic(self.stats_path, stats)

    def split(self, opts: TrainRequest, pairs: dict[str, Any], datastore: Datastore) -> tuple[list[str], list[str]]:
        """Training and validation ids: the pinned ``validation_ids``, or the seeded split by center."""
        if opts.validation_ids is None:
            return split_train_val(list(pairs), meta_centers(datastore, list(pairs)), self.cfg.training.val_fraction,
                                   self.cfg.training.seed)
        val = sorted(set(opts.validation_ids))
        missing = [i for i in val if i not in pairs]
        if missing:
            raise ValueError(f"validation_ids: {len(missing)} scan(s) have no training label: {', '.join(missing[:5])}")
        pinned = set(val)
        train = sorted(i for i in pairs if i not in pinned)
        if not train:
            raise ValueError("validation_ids names every labelled scan; at least one must stay for training")
        return train, val

    def plan(self, opts: TrainRequest, datastore: Datastore, device: str, world: int, stats: dict) -> FitPlan:
        """Pick the training pairs (a ``final`` label over the imported PanTS masks), split them,
        and gather the card's facts; the disk cache is built next (:func:`build_cache`)."""
        pairs = {d["image_id"] if "image_id" in d else Path(d["image"]).name: d for d in datastore.datalist()}
        if len(pairs) < 2:
            raise ValueError(f"training needs at least 2 labelled scans, the datastore has {len(pairs)}")
        train_ids, val_ids = self.split(opts, pairs, datastore)
        self.store.adopt_serving()  # weights placed by hand get a version: the parent is always named
        parent = self.store.serving_version()
        table = getattr(datastore, "metadata_table", None)
        metadata = table() if table else {}
        card = {
            "training_scans": training_scans([(i, pairs[i].get("tag", "final")) for i in train_ids], metadata),
            "validation_scans": len(val_ids),
            "parent": parent,
            "initialised_from": None if opts.from_scratch or parent is None else parent,
            "trigger": opts.trigger,
            "code_version": code_version(),
            "device": device_description(device, world),
        }
        facts = {"labels": label_stamps(pairs, train_ids + val_ids), "val": val_ids, "opts": opts.model_dump(exclude={"trigger", "cache_workers"}),
                 "parent": self.store.serving_sha256(), "world": world, "preset": self.preset_name}
        stats.update(train_size=len(train_ids), val_size=len(val_ids), val_ids=val_ids, parent_version=parent,
                     label_tags=card["training_scans"]["label_tags"])
        self._write(stats)
        triple = lambda i: (i, pairs[i]["image"], pairs[i]["label"])  # noqa: E731
        checkpoint = run_checkpoint(self.model_dir / ".train" / self.preset_name, facts).path
        return FitPlan(
            cfg=self.cfg, labelmap=self.labelmap, preset_name=self.preset_name, model_path=self.path,
            stats_path=self.stats_path, cache_root=self.model_dir / ".cache" / self.preset_name,
            train=[triple(i) for i in train_ids], val=[triple(i) for i in val_ids], opts=opts, device=device,
            stats=stats, store_root=self.model_dir, dataset=self.dataset, card=card,
            checkpoint_path=checkpoint,
        )


def build_cache(plan: FitPlan, workers: int, rank: int = 0, world: int = 1) -> None:
    """Preprocess this rank's share of the plan's scans into the disk cache (``workers`` processes)."""
    cache = CaseCache(plan.cache_root, plan.cfg, plan.cfg.preset(plan.preset_name), plan.labelmap)
    items = (plan.train + plan.val)[rank::world]
    t0 = time.time()

    def progress(done: int, total: int) -> None:
        if rank == 0 and (done == total or done % max(1, total // 20) == 0):
            logger.info(f"preprocessing: {done}/{total} scans ({time.time() - t0:.0f} s)")

    built = build_case_cache(cache, items, workers, progress)
    plan.stats.update(cache_s=round(time.time() - t0, 2), cache_built=built, cache_workers=workers)


# ---- the training loop (one process, or one DDP rank) -----------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fit_worker(rank: int, world: int, port: int, plan: FitPlan) -> None:
    """A DDP rank: joins the process group, trains its share; rank 0 validates and publishes."""
    backend = "nccl" if plan.device == "cuda" else "gloo"
    if plan.device == "cpu":
        # ranks share the cores instead of each grabbing all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fit(plan, rank, world)
    finally:
        dist.destroy_process_group()


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def fit(plan: FitPlan, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Fine-tune, validate each ``val_every`` epochs on rank 0, and publish the best model if not worse.

    Resumes from ``plan.checkpoint_path`` when a run with the same identity left one (every rank
    reads it; rank 0 writes it after each epoch). Under DDP the process group is already set up
    (:func:`_fit_worker`, or ``torchrun`` in ``scripts/train.py``).

    Returns:
        On rank 0, the stats (``published``, ``version``, ``best_metric``, ``baseline_metric``,
        speed...); the same dict is written to ``plan.stats_path``. Other ranks return ``{}``.
    """
    opts, cfg, stats = plan.opts, plan.cfg, dict(plan.stats)
    lead = rank == 0
    local = int(os.environ.get("LOCAL_RANK", rank))  # GPU index on this node (torchrun sets it)
    device = torch.device(f"cuda:{local}" if plan.device == "cuda" and world > 1 else plan.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed patch shape: pick the fastest kernels once
    memory_format = _memory_format(cfg, device)
    torch.manual_seed(cfg.training.seed)  # same initial weights on every rank (from_scratch)
    write = (lambda: write_json_atomic(plan.stats_path, stats)) if lead else (lambda: None)

    preset = cfg.preset(plan.preset_name)
    cache = CaseCache(plan.cache_root, cfg, preset, plan.labelmap)
    train = [cache.get(*t) for t in plan.train]
    val = [cache.get(*t) for t in plan.val] if lead else []

    checkpoint = Checkpoint(plan.checkpoint_path)
    saved = checkpoint.load()
    net = build_network(cfg, plan.labelmap.num_classes)
    current = plan.model_path.exists()
    if saved is not None:
        net.load_state_dict(saved["net"])
    elif current and not opts.from_scratch:
        net.load_state_dict(_load_state(plan.model_path))
    net.to(device, memory_format=memory_format)
    model: torch.nn.Module = net
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    start = 1 if saved is None else int(saved["epoch"]) + 1
    patch = effective_patch(cfg.training.patch_size, [c.image.shape for c in train])
    # Each rank draws its own crops; DDP averages the gradients (effective batch = batch x ranks).
    # A resumed run draws from a new seed (the killed run's random state is gone).
    sampler = CropSampler(train, patch, class_weights(cfg, plan.labelmap), cfg.training.crop_background_weight,
                          seed=cfg.training.seed + rank + 1000 * (start - 1), order=cfg.training.crop_order,
                          augment=cfg.training.augment,
                          synthesizer=LesionSynthesizer.build(cfg.training.lesion_synthesis, preset.spacing_mm,
                                                              plan.labelmap, cfg.preprocessing))
    ce_weight = ce_class_weights(train, plan.labelmap.num_classes + 1, cfg.training.ce_weight_cap).to(device)
    optim = torch.optim.AdamW(net.parameters(), lr=opts.learning_rate, weight_decay=cfg.training.weight_decay)
    iters = opts.iterations_per_epoch or max(1, math.ceil(len(plan.train) / opts.batch_size))
    iters = max(1, math.ceil(iters / world))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=opts.max_epochs * iters)
    engine = Engine(net, optim, sched, device, memory_format, model,
                    cpu_bf16=resolve_cpu_bf16(cfg.cpu_bf16.train, training=True))
    loss_fn = lambda logits, target: dice_ce_loss(logits, target, ce_weight=ce_weight,  # noqa: E731
                                                    dice_over=cfg.training.dice_over)

    best_metric, best_state, best_epoch = -1.0, None, 0
    n_iter, val_s, prior_s = 0, 0.0, 0.0
    if saved is None:
        baseline = None
        if lead and current and val:
            baseline = validate(_published_net(plan, device, memory_format), val, plan, device)
    else:
        engine.load_state_dict(saved)
        baseline, best_metric, best_epoch = saved["baseline"], saved["best_metric"], saved["best_epoch"]
        best_state, n_iter, val_s, prior_s = saved["best_state"], saved["n_iter"], saved["val_s"], saved["train_s"]
        stats.update({k: v for k, v in saved["stats"].items() if k not in ("status", "processes", "device")})
        stats["resumed_from_epoch"] = start - 1
        logger.info(f"resuming from the checkpoint of epoch {start - 1}/{opts.max_epochs} ({plan.checkpoint_path})")
    stats.update(baseline_metric=None if baseline is None else round(baseline, 4), total_epochs=opts.max_epochs,
                 iterations_per_epoch=iters, patch=list(patch), batch_size=opts.batch_size * world,
                 precision=engine.precision)
    write()
    t_train, t_written = time.time() - prior_s, time.time()  # train time counts the killed run's epochs too
    engine.timing.restart()
    total_iters = opts.max_epochs * iters
    batches = PrefetchSampler(sampler, opts.batch_size, pin_memory=device.type == "cuda")
    try:
        for epoch in range(start, opts.max_epochs + 1):
            t_epoch = time.time()
            loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per step
            for i in range(iters):
                x, y = batches.next()
                loss_sum += engine.step(x, y, loss_fn)
                n_iter += 1
                stats.update(engine.timing.stats())
                if lead and time.time() - t_written > _STATS_EVERY_S:
                    stats.update(epoch=epoch - 1, progress=round(n_iter / total_iters, 4),
                                 loss=round(float(loss_sum) / (i + 1), 4), synthetic_lesions=sampler.painted)
                    write()
                    t_written = time.time()
                    logger.info(f"epoch {epoch}/{opts.max_epochs}: step {i + 1}/{iters}, loss {stats['loss']}")
            loop_s = time.time() - t_train - val_s
            stats.update(epoch=epoch, progress=round(n_iter / total_iters, 4), loss=round(float(loss_sum) / iters, 4),
                         epoch_time_s=round(time.time() - t_epoch, 3),
                         iterations_per_s=round(n_iter / max(1e-9, time.time() - t_train), 3),
                         iterations=n_iter, loop_s=round(loop_s, 3), synthetic_lesions=sampler.painted)
            if lead:
                t_val = time.time()
                if val and (epoch % opts.val_every == 0 or epoch == opts.max_epochs):
                    metric = validate(net, val, plan, device)
                    if metric >= best_metric:
                        best_metric, best_epoch = metric, epoch
                        best_state = plain_state(net)
                    stats.update(best_metric=round(best_metric, 4), best_epoch=best_epoch, val_metric=round(metric, 4))
                elif not val:
                    best_state, best_epoch = plain_state(net), epoch
                val_s += time.time() - t_val
                stats.update(val_time_s=round(val_s, 3))
                checkpoint.save({
                    "epoch": epoch, "net": plain_state(net), **engine.state_dict(), "baseline": baseline,
                    "best_metric": best_metric, "best_epoch": best_epoch, "best_state": best_state, "n_iter": n_iter, "val_s": val_s,
                    "train_s": time.time() - t_train, "stats": json.loads(json.dumps(stats, default=str)),
                })
                engine.timing.restart()
                write()
                t_written = time.time()
                left = (time.time() - t_train) / max(1, epoch - start + 1) * (opts.max_epochs - epoch)
                logger.info(f"epoch {epoch}/{opts.max_epochs} loss {stats['loss']} val {stats.get('val_metric')} "
                            f"({stats['epoch_time_s']:.1f} s/epoch, about {left:.0f} s left)")
    finally:
        batches.close()
    if not lead:
        return {}

    divergence = diverged(best_state) if best_state is not None else None
    publish = best_state is not None and not divergence and publishable(best_metric if val else None, baseline)
    train_time = time.time() - t_train
    version = None
    if best_state is not None:  # published, or kept as an unserved version that says why not
        meta = {
            "labels": plan.labelmap.names,
            "preset": plan.preset_name,
            "spacing_mm": list(preset.spacing_mm),
            "preprocessing": cfg.preprocessing.input_map(),  # weights only fit this input map
            "val_metric": best_metric if val else None,
            "val_ids": [v[0] for v in plan.val],
            "train_size": len(plan.train),
            "epoch": best_epoch,
            "published_ts": time.time(),
            "dataset": plan.dataset,
            "summary": f"val mean Dice {best_metric:.4f} on {len(val)} scans, {len(plan.train)} training scans",
        }
        card = {
            **plan.card,
            "summary": meta["summary"],
            "network": {"name": "SegResNet", **cfg.network.model_dump(mode="json")},
            "spacing_mm": list(preset.spacing_mm),
            # how the crops and loss were made: runs differ in these, and the weights alone do not say
            "recipe": cfg.training.model_dump(mode="json", include=RECIPE_KEYS),
            "classes": plan.labelmap.names,
            "validation": validation_report(best_state, val, plan, device, memory_format),  # type: ignore[arg-type]
            "baseline": {"version": plan.card.get("parent"),
                         "mean_dice": None if baseline is None else round(baseline, 4)},
            "epochs": {"best": best_epoch, "total": opts.max_epochs, "iterations": n_iter,
                       "resumed_from": stats.get("resumed_from_epoch")},
            "training_time_s": round(train_time, 1),
            "precision": engine.precision,
        }
        store = ModelStore(plan.store_root, plan.preset_name, plan.dataset)
        if publish:
            version = store.publish(best_state, meta, card)  # type: ignore[arg-type]
            logger.info(f"published model version {version} ({plan.model_path}): {meta['summary']}")
        else:
            reason = divergence or refusal("val mean Dice", best_metric, baseline, len(val))  # type: ignore[arg-type]
            version = store.keep(best_state, meta, {**card, "summary": f"refused: {reason}"}, reason)  # type: ignore[arg-type]
            store.prune_refused(cfg.training.keep_refused_versions)
            logger.info(f"kept the current model; this run is stored as {version}, not served: {reason}")
    checkpoint.remove()
    stats.update(published=bool(publish), version=version, best_metric=round(best_metric, 4) if val else None,
                 train_time_s=round(train_time, 2))
    write()
    return stats


def validation_report(state: dict[str, torch.Tensor], val: list[CachedCase], plan: FitPlan, device: torch.device,
                      memory_format: torch.memory_format) -> dict[str, Any]:
    """Per-class DSC and NSD of the published weights on the validation scans (the card's numbers),
    at the network's grid and spacing."""
    if not val:
        return {"scans": 0}
    net = build_network(plan.cfg, plan.labelmap.num_classes)
    net.load_state_dict(state)
    net.to(device, memory_format=memory_format).eval()
    seg = Segmenter(plan.cfg, plan.labelmap, plan.preset_name, plan.model_path, str(device))
    spacing = plan.cfg.preset(plan.preset_name).spacing_mm
    rows: list[dict[str, Any]] = []
    means = []
    for case in val:
        x = torch.from_numpy(np.asarray(case.image, dtype=np.float32))[None, None]
        pred = seg.predict_logits(x, net).argmax(dim=1)[0].to(torch.uint8).cpu().numpy()
        truth = np.asarray(case.label)
        rows += evaluate_case(pred, truth, spacing, plan.labelmap)
        m = mean_dice(pred, truth, plan.labelmap)["mean"]
        means.append(0.0 if np.isnan(m) else m)
    return {"scans": len(val), "mean_dice": round(float(np.mean(means)), 4), "spacing_mm": list(spacing),
            "per_class": per_class(rows)}


def _published_net(plan: FitPlan, device: torch.device, memory_format: torch.memory_format) -> torch.nn.Module:
    net = build_network(plan.cfg, plan.labelmap.num_classes)
    net.load_state_dict(_load_state(plan.model_path))
    return net.to(device, memory_format=memory_format)


def _memory_format(cfg: SegmentationConfig, device: torch.device) -> torch.memory_format:
    """``channels_last_3d`` where presets.yaml asks for it (on the CPU, 3-D convolutions run faster)."""
    return torch.channels_last_3d if cfg.training.channels_last_3d else torch.contiguous_format


def validate(net: torch.nn.Module, cases: list[CachedCase], plan: FitPlan, device: torch.device) -> float:
    """Mean Dice over validation scans at the network's grid (lib.metrics, as evaluate.py)."""
    if not cases:
        return float("nan")
    seg = Segmenter(plan.cfg, plan.labelmap, plan.preset_name, plan.model_path, str(device))
    net.eval()
    scores = []
    for case in cases:
        x = torch.from_numpy(np.asarray(case.image, dtype=np.float32))[None, None]
        pred = seg.predict_logits(x, net).argmax(dim=1)[0].to(torch.uint8).cpu().numpy()
        m = mean_dice(pred, np.asarray(case.label), plan.labelmap)["mean"]
        scores.append(0.0 if np.isnan(m) else m)
    return float(np.mean(scores))
