"""MONAI Label train task ``deepedit``: the click model, retrained from the labelled scans.

What it shares with the segmentation model's train task:

* the data: a reader's ``final`` over the imported PanTS masks (:meth:`Datastore.datalist`), split
  by the same fixed, center-stratified rule (:func:`lib.model.training.split_train_val`);
* the disk cache, built by the same parallel builder (:class:`lib.model.click_training.ClickCaseCache`,
  :func:`lib.model.training.build_cache`): a second run on the same labels and segmentation model
  prepares nothing again;
* the optimisation step (:class:`lib.model.engine.Engine`: device, mixed precision on a GPU, timing),
  checkpoints that let a killed run go on, progress in ``/info``;
* the model store, versions and cards, and the publish rule (:func:`lib.model.engine.publishable`):
  a run starts from the served click weights and publishes only when nothing is served yet or it
  scores at least as well on the held-out scans; a refused run is kept as a version that is not served.

The score is the Dice of the answer to simulated clicks on ``val_samples`` windows drawn with a
fixed seed (each network runs its own simulated rounds, as in use).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask
from pydantic import BaseModel, ConfigDict, Field

from lib.core.click_config import ClickConfig
from lib.core.config_errors import validate_model
from lib.core.labelmap import LabelMap
from lib.core.settings import SegmentationConfig
from lib.model.checkpoint import Checkpoint, label_stamps, run_checkpoint
from lib.model.click_training import ClickCase, ClickCaseCache, fit_clicks, make_sample
from lib.model.clicks import build_click_network
from lib.model.engine import publishable, refusal
from lib.model.metrics import dice
from lib.model.precision import describe as describe_precision, resolve_cpu_bf16
from lib.model.model_card import code_version, device_description
from lib.model.model_store import ModelStore, diverged, read_json, write_json_atomic
from lib.model.training import auto_cache_workers, build_cache, meta_centers, split_train_val

#: seconds between progress writes (``/info`` train_stats)
_STATS_EVERY_S = 10.0

logger = logging.getLogger(__name__)


class ClickTrainRequest(BaseModel):
    """Options a client may send with ``POST /train/deepedit`` (defaults from clicks.yaml)."""

    model_config = ConfigDict(extra="ignore")  # clients also send model/device/etc.

    steps: int = Field(ge=1, le=1_000_000)
    max_scans: int = Field(ge=2, le=100_000)
    from_scratch: bool = False
    cache_workers: int = Field(0, ge=0, le=256)  # processes preparing scans into the cache; 0 = auto
    trigger: str = "on demand"


class PanTSClickTrain(TrainTask):
    #: the options a client may send (the request guard answers 422 for a bad one before a run starts)
    request_model = ClickTrainRequest

    def __init__(self, cfg: ClickConfig, seg_cfg: SegmentationConfig, labelmap: LabelMap, store: ModelStore,
                 seg_preset: str | None = None, seg_model: Path | None = None, device: str = "cpu",
                 steps: int | None = None) -> None:
        """``seg_preset``/``seg_model``: the served segmentation model, whose answers are the start
        labels that clicks correct (none: the truth, corrupted). ``steps``: per run, else clicks.yaml's."""
        super().__init__("Train the click model (deepedit) with simulated clicks on the labelled scans")
        self.cfg, self.seg_cfg, self.labelmap, self.store = cfg, seg_cfg, labelmap, store
        self.seg_model = Path(seg_model) if seg_model is not None else None
        self.device = device if device == "cpu" or torch.cuda.is_available() else "cpu"
        self.steps = steps or cfg.training.steps
        self.cpu_bf16 = resolve_cpu_bf16(seg_cfg.cpu_bf16.train, training=True)
        self.stats_path = store.root / f"train_stats_{store.preset}.json"
        self.cache = ClickCaseCache(store.root / ".cache" / store.preset, cfg, seg_cfg, labelmap, seg_preset,
                                    self.seg_model)

    def config(self) -> dict[str, Any]:
        return {"steps": self.steps, "max_scans": self.cfg.training.max_scans, "from_scratch": False}

    def stats(self) -> dict[str, Any]:
        return read_json(self.stats_path, default={}) or {}

    def _write(self, stats: dict[str, Any]) -> None:
        write_json_atomic(self.stats_path, stats)

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        opts = validate_model("train request", ClickTrainRequest, {**self.config(), **request})
        t0, cpu0 = time.time(), time.process_time()
        stats: dict[str, Any] = {"status": "RUNNING", "preset": self.store.preset, "start_ts": t0,
                                 "trigger": opts.trigger, "progress": 0.0}
        self._write(stats)
        try:
            result = self._run(opts, datastore, stats)
        except Exception as err:
            stats.update(status="FAILED", error=f"{type(err).__name__}: {err}", end_ts=time.time())
            self._write(stats)
            raise
        result.update(status="DONE", end_ts=time.time(), progress=1.0, train_wall_s=round(time.time() - t0, 1),
                      train_cpu_s=round(time.process_time() - cpu0, 1))
        self._write(result)
        return result

    # ---- the run -------------------------------------------------------------------------------
    def _run(self, opts: ClickTrainRequest, datastore: Datastore, stats: dict[str, Any]) -> dict[str, Any]:
        t = self.cfg.training
        pairs = {d["image_id"] if "image_id" in d else Path(d["image"]).name: d for d in datastore.datalist()}
        if len(pairs) < 2:
            raise ValueError(f"training needs at least 2 labelled scans, the datastore has {len(pairs)}")
        train_ids, val_ids = split_train_val(list(pairs), meta_centers(datastore, list(pairs)), t.val_fraction, t.seed)
        rng = np.random.default_rng(t.seed)
        if len(train_ids) > opts.max_scans:  # a seeded draw, so reruns on the same data agree
            train_ids = sorted(rng.choice(train_ids, opts.max_scans, replace=False).tolist())
        self.store.adopt_serving()
        parent = self.store.serving_version()
        stats.update(train_size=len(train_ids), val_size=len(val_ids), val_ids=val_ids, parent_version=parent,
                     device=self.device)
        self._write(stats)

        triple = lambda i: (i, pairs[i]["image"], pairs[i]["label"])  # noqa: E731
        t_cache = time.time()
        items = [triple(i) for i in train_ids + val_ids]
        built = build_cache(self.cache, items, auto_cache_workers(opts.cache_workers, len(items)))
        stats.update(cache_s=round(time.time() - t_cache, 2), cache_built=built)
        train = [c for c in (self.cache.get(*triple(i)) for i in train_ids) if c is not None]
        val = [c for c in (self.cache.get(*triple(i)) for i in val_ids) if c is not None]
        if not train or not val:
            raise ValueError("no labelled scan holds a pancreas region to click in (training and validation need one each)")
        served = self._served_state()
        start = None if opts.from_scratch or served is None else served
        checkpoint = self._checkpoint(opts, pairs, train_ids, val_ids)
        written = [time.time()]

        def on_step(step: int, losses: list[float], timing: dict[str, float]) -> None:
            if time.time() - written[0] > _STATS_EVERY_S or step == opts.steps:
                stats.update(progress=round(0.95 * step / opts.steps, 4), step=step,
                             loss=round(float(np.mean(losses[-50:])), 4), **timing)
                self._write(stats)
                written[0] = time.time()

        state, losses = fit_clicks(train, self.labelmap, self.cfg, opts.steps, t.seed, state=start,
                                   device=self.device, checkpoint=checkpoint, on_step=on_step,
                                   cpu_bf16=self.cpu_bf16)
        new_score = self.score(state, val)
        baseline = self.score(served, val) if served is not None else None
        divergence = diverged(state)
        publish = not divergence and publishable(new_score, baseline)
        result = {**stats, "loss": round(float(np.mean(losses[-50:])), 4), "val_metric": round(new_score, 4),
                  "baseline_metric": None if baseline is None else round(baseline, 4), "steps": opts.steps}
        checkpoint.remove()
        card = {
            "preset": self.store.preset, "network": "ClickNet (SegResNet on 2x2x2 blocks)",
            "training_scans": {"count": len(train), "ids": train_ids[:50]}, "validation_scans": len(val),
            "val_metric": round(new_score, 4), "metric": "Dice after simulated clicks (held-out scans)",
            "baseline": {"version": parent, "val_metric": None if baseline is None else round(baseline, 4)},
            "parent": parent, "initialised_from": None if start is None else parent, "trigger": opts.trigger,
            "steps": opts.steps, "code_version": code_version(), "device": device_description(self.device, 1),
            "precision": describe_precision(torch.device(self.device), self.cpu_bf16),
        }
        meta = {"labels": self.labelmap.names, "summary": f"click model: val Dice {new_score:.3f} on {len(val)} scans",
                "click_config": self.cfg.model_dump(mode="json")}
        if not publish:
            reason = divergence or refusal("val Dice", new_score, baseline, len(val))  # type: ignore[arg-type]
            version = self.store.keep(state, meta, {**card, "summary": f"refused click model: {reason}"}, reason)
            self.store.prune_refused(self.seg_cfg.training.keep_refused_versions)
            logger.info(f"click model: not published, stored as {version}: {reason}")
            result.update(published=False, version=version)
            return result
        version = self.store.publish(state, meta, card)
        logger.info(f"click model {version} published: val {new_score:.4f} (served: {baseline})")
        result.update(published=True, version=version)
        return result

    def _checkpoint(self, opts: ClickTrainRequest, pairs: dict[str, dict[str, Any]], train_ids: list[str],
                    val_ids: list[str]) -> Checkpoint:
        """This run's checkpoint: resumed only by a run with the same labels, options, served click
        weights and segmentation model."""
        seg = self.seg_model
        facts = {"labels": label_stamps(pairs, train_ids + val_ids), "val": val_ids,
                 "opts": opts.model_dump(exclude={"trigger", "cache_workers"}), "parent": self.store.serving_sha256(),
                 "segmentation": os.stat(seg).st_mtime_ns if seg is not None and seg.exists() else None,
                 "device": self.device}
        return run_checkpoint(self.store.root / ".train" / self.store.preset, facts)

    def _served_state(self) -> dict[str, torch.Tensor] | None:
        path = self.store.serving_path
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]

    def score(self, state: dict[str, torch.Tensor] | None, cases: list[ClickCase]) -> float:
        """Mean Dice of the network's answer on ``val_samples`` simulated-click windows of ``cases``
        (fixed seed: the same draws for every network; random weights for ``state=None``). On the CPU,
        so that the served and the new weights are scored alike wherever they were trained."""
        torch.manual_seed(self.cfg.training.seed)
        net = build_click_network(self.cfg)
        if state is not None:
            net.load_state_dict(state)
        net.eval()
        rng = np.random.default_rng(self.cfg.training.seed + 1)
        dices = []
        tries = 0
        while len(dices) < self.cfg.training.val_samples and tries < 10 * self.cfg.training.val_samples:
            tries += 1
            sample = make_sample(cases[len(dices) % len(cases)], self.labelmap, self.cfg, rng, net)
            if sample is None:
                continue
            x, y = sample
            with torch.no_grad():
                pred = net(x[None])[0] > 0
            dices.append(dice(pred.numpy(), y.numpy() > 0))
        return float(np.mean(dices)) if dices else 0.0


__all__ = ["ClickTrainRequest", "PanTSClickTrain"]
