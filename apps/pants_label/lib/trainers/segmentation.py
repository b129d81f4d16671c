"""MONAI Label train task: fine-tune the preset's SegResNet and publish it only if it is not worse.

MONAI Label runs this in a subprocess (``POST /train/segmentation``); progress goes to a stats JSON
beside the model, which ``/info`` reads as ``train_stats``. The published weights are replaced by
``os.replace`` only after the new model matched or beat the current one on the same fixed,
center-stratified validation set; the infer task reloads them by file mtime, without a restart.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask
from pydantic import BaseModel, ConfigDict, Field

from lib.config_errors import validate_model
from lib.labelmap import LabelMap
from lib.metrics import mean_dice
from lib.model_store import model_path, publish, read_json, write_json_atomic
from lib.segmenter import Segmenter, build_network
from lib.settings import SegmentationConfig
from lib.training import (
    CachedCase,
    CaseCache,
    CropSampler,
    class_weights,
    effective_patch,
    meta_centers,
    split_train_val,
)

logger = logging.getLogger(__name__)


class TrainRequest(BaseModel):
    """Options a client may send with ``POST /train/segmentation`` (defaults from presets.yaml)."""

    model_config = ConfigDict(extra="ignore")  # clients also send model/device/etc.

    max_epochs: int = Field(ge=1, le=10000)
    learning_rate: float = Field(gt=0, le=1)
    batch_size: int = Field(ge=1, le=64)
    iterations_per_epoch: int = Field(ge=0, le=100000)
    from_scratch: bool = False
    val_every: int = Field(1, ge=1)


class PanTSTrain(TrainTask):
    def __init__(
        self, cfg: SegmentationConfig, labelmap: LabelMap, preset_name: str, model_dir: Path, device: str
    ) -> None:
        super().__init__(f"Fine-tune the PanTS SegResNet ('{preset_name}' preset) on the labelled scans")
        self.cfg, self.labelmap, self.preset_name = cfg, labelmap, preset_name
        self.preset = cfg.preset(preset_name)
        self.model_dir = Path(model_dir)
        self.device = device
        self.path = model_path(self.model_dir, preset_name)
        self.stats_path = self.model_dir / f"train_stats_{preset_name}.json"

    def config(self) -> dict[str, Any]:
        t = self.cfg.training
        return {
            "max_epochs": t.max_epochs,
            "learning_rate": t.learning_rate,
            "batch_size": t.batch_size,
            "iterations_per_epoch": t.iterations_per_epoch,
            "from_scratch": False,
        }

    def stats(self) -> dict[str, Any]:
        return read_json(self.stats_path, default={}) or {}

    # ---- the run -------------------------------------------------------------------------
    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        opts = validate_model("train request", TrainRequest, {**self.config(), **request})
        device = torch.device(self.device)
        t = self.cfg.training
        rng_seed = t.seed
        torch.manual_seed(rng_seed)
        stats: dict[str, Any] = {"status": "RUNNING", "preset": self.preset_name, "start_ts": time.time(),
                                 "device": str(device)}
        self._write(stats)
        try:
            result = self._run(opts, datastore, device, stats)
        except Exception as err:
            stats.update(status="FAILED", error=f"{type(err).__name__}: {err}", end_ts=time.time())
            self._write(stats)
            raise
        stats.update(result, status="DONE", end_ts=time.time())
        self._write(stats)
        return stats

    def _write(self, stats: dict[str, Any]) -> None:
        write_json_atomic(self.stats_path, stats)

    def _run(self, opts: TrainRequest, datastore: Datastore, device: torch.device, stats: dict) -> dict[str, Any]:
        pairs = {d["image_id"] if "image_id" in d else Path(d["image"]).name: d for d in datastore.datalist()}
        if len(pairs) < 2:
            raise ValueError(f"training needs at least 2 labelled scans, the datastore has {len(pairs)}")
        train_ids, val_ids = split_train_val(
            list(pairs), meta_centers(datastore, list(pairs)), self.cfg.training.val_fraction, self.cfg.training.seed
        )
        cache = CaseCache(self.model_dir / ".cache" / self.preset_name, self.cfg, self.preset, self.labelmap)
        t0 = time.time()
        train = [cache.get(i, pairs[i]["image"], pairs[i]["label"]) for i in train_ids]
        val = [cache.get(i, pairs[i]["image"], pairs[i]["label"]) for i in val_ids]
        stats.update(train_size=len(train), val_size=len(val), val_ids=val_ids,
                     cache_s=round(time.time() - t0, 2))
        self._write(stats)

        net = build_network(self.cfg, self.labelmap.num_classes)
        current = self.path.exists()
        if current and not opts.from_scratch:
            net.load_state_dict(torch.load(self.path, map_location="cpu", weights_only=True)["state_dict"])
        net.to(device)

        patch = effective_patch(self.cfg.training.patch_size, [c.image.shape for c in train])
        sampler = CropSampler(train, patch, class_weights(self.cfg, self.labelmap),
                              self.cfg.training.crop_background_weight, seed=self.cfg.training.seed)
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
        optim = torch.optim.AdamW(net.parameters(), lr=opts.learning_rate, weight_decay=self.cfg.training.weight_decay)
        iters = opts.iterations_per_epoch or max(1, math.ceil(len(train) / opts.batch_size))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=opts.max_epochs * iters)
        use_amp = device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

        baseline = self._validate(self._published_net(device), val, device) if current else None
        stats.update(baseline_metric=baseline, total_epochs=opts.max_epochs, patch=list(patch))
        best_metric, best_state, best_epoch = -1.0, None, 0
        n_iter, t_train = 0, time.time()
        for epoch in range(1, opts.max_epochs + 1):
            net.train()
            t_epoch, losses = time.time(), []
            for _ in range(iters):
                x, y = sampler.sample(opts.batch_size)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                optim.zero_grad(set_to_none=True)
                with torch.autocast(device.type, enabled=use_amp):
                    loss = loss_fn(net(x), y)
                scaler.scale(loss).backward()
                scaler.step(optim)
                scaler.update()
                sched.step()
                losses.append(float(loss.detach()))
                n_iter += 1
            stats.update(epoch=epoch, loss=round(float(np.mean(losses)), 4),
                         epoch_time_s=round(time.time() - t_epoch, 3),
                         iterations_per_s=round(n_iter / (time.time() - t_train), 3))
            if val and (epoch % opts.val_every == 0 or epoch == opts.max_epochs):
                metric = self._validate(net, val, device)
                if metric >= best_metric:
                    best_metric, best_epoch = metric, epoch
                    best_state = copy.deepcopy({k: v.detach().cpu() for k, v in net.state_dict().items()})
                stats.update(best_metric=round(best_metric, 4), best_epoch=best_epoch, val_metric=round(metric, 4))
            elif not val:
                best_state, best_epoch = {k: v.detach().cpu() for k, v in net.state_dict().items()}, epoch
            self._write(stats)
            logger.info(f"epoch {epoch}/{opts.max_epochs} loss {stats['loss']} val {stats.get('val_metric')}")

        publishable = best_state is not None and (baseline is None or (val and best_metric >= baseline))
        if publishable:
            meta = {
                "labels": self.labelmap.names,
                "preset": self.preset_name,
                "spacing_mm": list(self.preset.spacing_mm),
                "val_metric": best_metric if val else None,
                "val_ids": val_ids,
                "train_size": len(train),
                "epoch": best_epoch,
                "published_ts": time.time(),
                "summary": f"val mean Dice {best_metric:.4f} on {len(val)} scans, {len(train)} training scans",
            }
            publish(best_state, meta, self.path)
            logger.info(f"published {self.path}: {meta['summary']}")
        else:
            logger.info(f"kept the current model: new {best_metric:.4f} < current {baseline:.4f}")
        return {"published": bool(publishable), "best_metric": round(best_metric, 4) if val else None}

    def _published_net(self, device: torch.device) -> torch.nn.Module:
        net = build_network(self.cfg, self.labelmap.num_classes)
        net.load_state_dict(torch.load(self.path, map_location="cpu", weights_only=True)["state_dict"])
        return net.to(device)

    def _validate(self, net: torch.nn.Module, cases: list[CachedCase], device: torch.device) -> float:
        """Mean Dice over validation scans at the network's grid (lib.metrics, as evaluate.py)."""
        if not cases:
            return float("nan")
        seg = Segmenter(self.cfg, self.labelmap, self.preset_name, self.path, str(device))
        net.eval()
        scores = []
        for case in cases:
            x = torch.from_numpy(np.asarray(case.image, dtype=np.float32))[None, None]
            pred = seg.predict_logits(x, net).argmax(dim=1)[0].to(torch.uint8).cpu().numpy()
            m = mean_dice(pred, np.asarray(case.label), self.labelmap)["mean"]
            scores.append(0.0 if np.isnan(m) else m)
        return float(np.mean(scores))
