"""Class-aware uncertainty scoring of unlabelled scans for active learning.

Per scan, two passes of the app's own network (:class:`lib.model.segmenter.Segmenter`):

1. *Localize*: the body's bounding box (``scoring.localize_body_hu``) of the whole CT, once,
   deterministic, at a coarse spacing (``scoring.localize_spacing_mm``), to find the predicted
   pancreas region (pancreas, its parts, duct, lesion).
2. *Uncertainty*: a crop around that region at the model's own spacing, ``mc_samples``
   stochastic passes in one batch (MC dropout; every other pass mirrored left-right with
   ``flip_tta``).

From the mean softmax of pass 2 come: the class-stratified predictive entropy (per class, the
entropy averaged over the voxels the class softly covers; then a weighted mean over classes, so
the tiny lesion and duct count as much as their weights say, not by their volume), the predicted
lesion probability (mean of the top-k lesion voxel probabilities) and a cheap embedding (the
network's bottleneck features, averaged) for diversity.

:class:`PanTSScoring` is the MONAI Label scoring method: it scores, one scan at a time and
committing each, the unlabelled scans that have no score from the current model (never-scored
first), so an interrupted run resumes and a new model only costs a rescore of stale scans.
Progress goes to ``<state_dir>/scoring_status.json`` (shown in ``/info``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from lib.core.al_config import ActiveLearningConfig, ScoringConfig
from lib.core.errors import ModelUnusable
from lib.datastore.protocol import PanTSStore, ScoredStore
from lib.model.model_store import read_json, write_json_atomic
from lib.model.segmenter import Segmenter, normalize_hu, resample_image, target_shape
from lib.imaging.volume_io import Volume, canonical_spacing, load_volume, reorientation

logger = logging.getLogger(__name__)

#: image-info key of the stored scores
INFO_KEY = "al_scores"
STATUS_NAME = "scoring_status.json"
LESION = "pancreatic_lesion"


@dataclass
class ScanScore:
    uncertainty: float
    lesion_prob: float
    class_uncertainty: dict[str, float]
    embedding: np.ndarray  # float32 unit vector
    crop_shape: tuple[int, int, int]
    found_pancreas: bool
    seconds: dict[str, float] = field(default_factory=dict)
    #: per foreground class (ids 1..N): predictive entropy weighted by the class probability,
    #: summed over the crop's voxels on the model grid (the clasp strategy's per-class ranking)
    class_scores: np.ndarray | None = None


def model_version(path: Path) -> str | None:
    """Identity of the published weights (mtime), None when none are published."""
    try:
        return f"{Path(path).stat().st_mtime:.6f}"
    except FileNotFoundError:
        return None


def _ceil8(n: float) -> int:
    return int(math.ceil(n / 8) * 8)


class ScanScorer:
    """Scores one CT with a :class:`Segmenter`'s network (see module docstring)."""

    def __init__(self, segmenter: Segmenter, cfg: ScoringConfig) -> None:
        self.seg, self.cfg = segmenter, cfg
        lm = segmenter.labelmap
        self.names = lm.names
        self.weights = torch.tensor([0.0, *cfg.weight_vector(lm)], dtype=torch.float64)
        self.region_ids = lm.ids_in_group("pancreas")
        self.lesion_id = lm.id_of(LESION)
        self.reported = [n for n in lm.names if n in cfg.class_weights]

    # -- geometry
    def _crop_box(
        self, region: np.ndarray | None, loc_shape: tuple[int, ...], full_shape: tuple[int, ...], spacing: tuple[float, ...]
    ) -> tuple[slice, ...]:
        """Canonical full-resolution box around the predicted region, capped at max_crop_voxels (model grid)."""
        model_sp = self.seg.preset.spacing_mm
        scale = [f / l for f, l in zip(full_shape, loc_shape)]
        box = []
        for ax in range(3):
            vox_per_model = model_sp[ax] / spacing[ax]  # full-res voxels per model voxel
            cap = self.cfg.max_crop_voxels[ax] * vox_per_model
            if region is not None:
                idx = np.nonzero(region.any(axis=tuple(a for a in range(3) if a != ax)))[0]
                lo, hi = idx[0] * scale[ax], (idx[-1] + 1) * scale[ax]
                margin = self.cfg.crop_margin_mm / spacing[ax]
                size = min(cap, (hi - lo) + 2 * margin)
                centre = (lo + hi) / 2
            else:  # nothing predicted: the middle of the scan
                size, centre = cap, full_shape[ax] / 2
            size = max(size, min(32 * vox_per_model, full_shape[ax]))
            size = min(size, full_shape[ax])
            a = int(round(centre - size / 2))
            a = min(max(a, 0), full_shape[ax] - int(round(size)))
            box.append(slice(a, a + int(round(size))))
        return tuple(box)

    # -- the passes
    def _localize(self, x: torch.Tensor, net: torch.nn.Module) -> np.ndarray | None:
        """Predicted pancreas region on the coarse grid of ``x`` (None when nothing is predicted).

        The network sees only the body's bounding box (voxels above ``localize_body_hu``; air
        around the patient fills ~half of a CT's field of view), padded back with "no region".
        """
        box = self._body_box(x)
        logits = self.seg.predict_logits(x[(slice(None), slice(None), *box)].contiguous(), net)
        pred = logits.argmax(dim=1)[0].cpu().numpy()
        region = np.zeros(tuple(x.shape[2:]), dtype=bool)
        region[box] = np.isin(pred, self.region_ids)
        return region if region.any() else None

    def _body_box(self, x: torch.Tensor) -> tuple[slice, ...]:
        shape = tuple(x.shape[2:])
        hu = self.cfg.localize_body_hu
        if hu is None:
            return tuple(slice(0, n) for n in shape)
        body = (x[0, 0] > normalize_hu(np.array([hu], np.float32), self.seg.cfg).item()).numpy()
        if not body.any():
            return tuple(slice(0, n) for n in shape)
        box = []
        for ax in range(3):
            idx = np.nonzero(body.any(axis=tuple(a for a in range(3) if a != ax)))[0]
            lo, hi = max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, shape[ax])  # one voxel of margin
            if hi - lo < 16:  # the network needs 16 voxels a side: grow around the centre
                c = (lo + hi) // 2
                lo = max(0, min(c - 8, shape[ax] - 16))
                hi = min(shape[ax], lo + 16)
            box.append(slice(lo, hi))
        return tuple(box)

    def _stochastic(self, crop: torch.Tensor, net: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean softmax (C, d, h, w) over the stochastic passes, and the mean bottleneck features."""
        t = self.cfg.mc_samples
        shape = tuple(crop.shape[2:])
        padded = tuple(max(16, _ceil8(s)) for s in shape)
        pad = [p for s, q in zip(reversed(shape), reversed(padded)) for p in (0, q - s)]
        x = F.pad(crop, pad, value=-1.0)  # air
        batch = x.repeat(t, 1, 1, 1, 1)
        flipped = torch.tensor([k for k in range(t) if self.cfg.flip_tta and k % 2 == 1], dtype=torch.long)
        if len(flipped):
            batch[flipped] = batch[flipped].flip(2)  # canonical axis 0: right -> left
        feats: list[torch.Tensor] = []
        hook = net.down_layers[-1].register_forward_hook(lambda m, i, o: feats.append(o.float().mean(dim=(0, 2, 3, 4))))
        drop = [m for m in net.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
        device = next(net.parameters()).device
        use_amp = device.type == "cuda"
        try:
            for m in drop:
                m.train()  # MC dropout: dropout on, normalisation layers stay in eval mode
            with torch.inference_mode():
                with torch.autocast(device.type, enabled=use_amp):
                    out = net(batch.to(device)).float()
                if len(flipped):
                    out[flipped] = out[flipped].flip(2)
                out = out[:, :, : shape[0], : shape[1], : shape[2]]
                probs = torch.softmax(out, dim=1).mean(dim=0).double().cpu()
                feat = feats[0].cpu().clone()
        finally:
            for m in drop:
                m.eval()
            hook.remove()
        return probs, feat

    def _summarize(self, p: torch.Tensor) -> tuple[float, dict[str, float], float, np.ndarray]:
        c = p.shape[0]
        ent = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=0) / math.log(c)  # in [0, 1]
        flat_p, flat_h = p.reshape(c, -1), ent.reshape(-1)
        mass = flat_p.sum(dim=1)
        weighted = flat_p @ flat_h  # per class: entropy weighted by the class probability, summed
        per_class = weighted / mass.clamp_min(1e-12)
        present = mass >= self.cfg.min_class_voxels
        present[0] = False
        w = self.weights * present
        if w.sum() > 0:
            score = float((w * per_class).sum() / w.sum())
        else:
            score = float(flat_h.mean())
        cls = {n: round(float(per_class[self.names.index(n) + 1]), 5) for n in self.reported
               if present[self.names.index(n) + 1]}
        lesion = flat_p[self.lesion_id]
        k = min(self.cfg.lesion_topk_voxels, lesion.numel())
        lesion_prob = float(lesion.topk(k).values.mean())
        return score, cls, lesion_prob, weighted[1:].numpy().astype(np.float32)

    def _coarse(self, arr: np.ndarray, spacing: tuple[float, ...], target_mm: tuple[float, ...]) -> torch.Tensor:
        """``arr`` (raw HU, any layout) normalised on a grid of ``target_mm``, area-averaged.

        Every ``step``-th voxel is read first (step = half the shrink factor, so each output
        voxel still averages >= 2 samples a side): normalising a ~5 M voxel subsample instead
        of the whole 78 M voxel CT is what keeps the preprocessing at ~0.1 s. The grid moves by
        at most half a source voxel (0.4 mm on a 0.8 mm CT), far below the 6 mm output voxel.
        """
        step = tuple(max(1, int((t / s) // 2)) for t, s in zip(target_mm, spacing))
        # start inside each step so a sample sits at (odd step) or half a source voxel from
        # (even step) the centre of the source voxels it stands for
        sub = np.ascontiguousarray(arr[tuple(slice((k - 1) // 2, None, k) for k in step)])
        x = normalize_hu(sub, self.seg.cfg)[None, None]
        return resample_image(x, target_shape(tuple(arr.shape), spacing, target_mm))

    def score_volume(self, vol: Volume, net: torch.nn.Module | None = None) -> ScanScore:
        net = net or self.seg.network()
        sec: dict[str, float] = {}
        t0 = time.perf_counter()
        axcodes = self.seg.cfg.preprocessing.orientation
        arr = reorientation(vol.affine, axcodes).to_canonical(vol.array)  # flips/transposes: a view
        spacing = canonical_spacing(vol.affine, axcodes)
        small = self._coarse(arr, spacing, self.cfg.localize_spacing_mm or self.seg.preset.spacing_mm)
        sec["pre"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        region = self._localize(small, net)
        sec["localize"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        box = self._crop_box(region, tuple(small.shape[2:]), tuple(arr.shape), spacing)
        # only the crop is read at full resolution
        crop = self._coarse(arr[box], spacing, self.seg.preset.spacing_mm)
        probs, feat = self._stochastic(crop.contiguous(), net)
        score, cls, lesion_prob, class_scores = self._summarize(probs)
        if not (math.isfinite(score) and math.isfinite(lesion_prob)):
            raise ValueError(f"the model's output is not finite (uncertainty {score}, lesion probability "
                             f"{lesion_prob}); the scan keeps its earlier score")
        emb = feat.numpy().astype(np.float32)
        emb /= max(float(np.linalg.norm(emb)), 1e-12)
        sec["uncertainty"] = time.perf_counter() - t2
        sec = {k: round(v, 3) for k, v in sec.items()}
        return ScanScore(score, lesion_prob, cls, emb, tuple(crop.shape[2:]), region is not None, sec,  # type: ignore[arg-type]
                         class_scores)


def load_for_scoring(path: str | Path) -> Volume:
    """A scan as stored: integer voxels stay integers when the file has no scaling.

    The float32 copy of a whole CT (~0.7 s at 512x512x300) is not needed: scoring converts
    only the subsample and the crop it reads.
    """
    return load_volume(path, dtype=None)


def priority(uncertainty: float, lesion_prob: float, lesion_weight: float) -> float:
    """The hybrid strategy's base ranking: uncertainty, raised for scans likely to hold a lesion."""
    return float(uncertainty) * (1.0 + lesion_weight * float(lesion_prob))


def balance_group(meta: dict[str, Any]) -> str:
    return f"{meta.get('center') or 'unknown'}|{meta.get('contrast_phase') or 'unknown'}"


def score_row(image_id: str, s: ScanScore, version: str, meta: dict[str, Any], lesion_weight: float, cost_s: float) -> dict[str, Any]:
    """A row for :meth:`PanTSDatastore.store_scores` (ranking table + image-info summary).

    ``class_scores`` (float32 bytes, one value per foreground class) is absent from rows of
    older scorers; the index stores NULL and the clasp strategy ranks those scans overall only.
    """
    prio = priority(s.uncertainty, s.lesion_prob, lesion_weight)
    now = time.time()
    return {
        "image_id": image_id,
        "model_version": version,
        "uncertainty": s.uncertainty,
        "lesion_prob": s.lesion_prob,
        "priority": prio,
        "grp": balance_group(meta),
        "embedding": s.embedding.astype(np.float16).tobytes(),
        "class_scores": None if s.class_scores is None else np.asarray(s.class_scores, np.float32).tobytes(),
        "ts": now,
        "info": {
            "model_version": version,
            "uncertainty": round(s.uncertainty, 6),
            "lesion_prob": round(s.lesion_prob, 6),
            "priority": round(prio, 6),
            "class_uncertainty": s.class_uncertainty,
            "found_pancreas": s.found_pancreas,
            "cost_s": round(cost_s, 3),
            "ts": int(now),
        },
    }


class StatusFile:
    """Scoring progress in a JSON file beside the index, written atomically (read by ``/info``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.state: dict[str, Any] = {}

    def update(self, **kw: Any) -> None:
        self.state.update(kw)
        write_json_atomic(self.path, self.state)

    def read(self) -> dict[str, Any]:
        return read_json(self.path, default={}) or {}


class PanTSScoring(ScoringMethod):
    """MONAI Label scoring method: class-aware uncertainty of unlabelled scans, incremental."""

    def __init__(self, segmenter: Segmenter, cfg: ActiveLearningConfig) -> None:
        super().__init__(
            "Class-stratified MC-dropout/flip uncertainty around the predicted pancreas, lesion probability "
            "and embedding per unlabelled scan; rescoring only scans scored by an older model"
        )
        self.seg, self.cfg = segmenter, cfg
        self.scorer = ScanScorer(segmenter, cfg.scoring)

    def info(self) -> dict[str, Any]:
        s = self.cfg.scoring
        return {
            "description": self.description,
            "config": {
                "localize_spacing_mm": list(s.localize_spacing_mm or self.seg.preset.spacing_mm),
                "localize_body_hu": s.localize_body_hu,
                "model_spacing_mm": list(self.seg.preset.spacing_mm),
                "mc_samples": s.mc_samples,
                "flip_tta": s.flip_tta,
                "class_weights": dict(s.class_weights),
            },
        }

    def current_version(self) -> str | None:
        v = model_version(self.seg.model_path)
        if v is None and self.cfg.scoring.score_untrained:
            return "untrained"
        return v

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        if not isinstance(datastore, ScoredStore):
            return {"skipped": "this datastore cannot store scores"}
        if self.cfg.scoring.threads:
            torch.set_num_threads(self.cfg.scoring.threads)
        status = StatusFile(Path(datastore.state_dir) / STATUS_NAME)
        limit = int(request.get("limit") or 0)  # score at most this many scans (0 = all)
        return run_scoring(self, datastore, status, limit=limit)


def run_scoring(
    method: PanTSScoring,
    datastore: Any,
    status: StatusFile | None = None,
    limit: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Score stale/unscored unlabelled scans until none is left (or ``limit`` were scored)."""
    status = status or StatusFile(Path(datastore.state_dir) / STATUS_NAME)
    started = time.time()
    scored, failed, costs = 0, {}, []
    while True:
        version = method.current_version()
        if version is None:
            status.update(state="idle", reason="no trained model yet; strategies fall back to random",
                          ts=time.time(), done=0, total=0)
            return {"scored": 0, "skipped": "no trained model"}
        todo = [i for i in datastore.scoring_todo(version) if i not in failed]
        if limit:
            todo = todo[: max(limit - scored, 0)]
        if not todo:
            summary = {"scored": scored, "failed": len(failed), "model_version": version,
                       "mean_cost_s": round(float(np.mean(costs)), 3) if costs else None}
            status.update(state="done", ts=time.time(), elapsed_s=round(time.time() - started, 1),
                          done=scored, total=scored, remaining=0, **summary)
            return summary
        try:
            net = method.seg.network()
        except ModelUnusable as err:  # served weights nothing can use: say so and wait for another model
            reason = str(err.detail)
            logger.error("scoring stopped: %s", reason)
            status.update(state="error", reason=reason, ts=time.time(), done=scored, total=0)
            return {"scored": scored, "failed": len(failed), "error": reason}
        if method.seg.info.trained:
            version = f"{method.seg.info.mtime:.6f}"
        status.update(state="running", model_version=version, started=started, done=0, total=len(todo),
                      remaining=len(todo), failed=len(failed))
        for k, image_id in enumerate(todo):
            if method.current_version() != version:
                logger.info("a new model was published: rescoring with it")
                break
            t0 = time.perf_counter()
            try:
                vol = load_for_scoring(datastore.get_image_uri(image_id))
                t_load = time.perf_counter() - t0
                s = method.scorer.score_volume(vol, net)
                s.seconds["load"] = round(t_load, 3)
            except Exception as err:  # noqa: BLE001 - one bad scan must not stop the pool
                logger.warning("scoring %s failed: %s", image_id, err)
                failed[image_id] = f"{type(err).__name__}: {err}"
                continue
            cost = time.perf_counter() - t0
            costs.append(cost)
            if cost > method.cfg.scoring.cost_budget_s:
                logger.warning("scoring %s took %.1f s (budget %.1f s): %s", image_id, cost,
                               method.cfg.scoring.cost_budget_s, s.seconds)
            meta = datastore.get_metadata(image_id) if isinstance(datastore, PanTSStore) else {}
            row = score_row(image_id, s, version, meta, method.cfg.strategies.lesion_weight, cost)
            datastore.store_scores([row], INFO_KEY)
            scored += 1
            mean = float(np.mean(costs))
            status.update(done=k + 1, remaining=len(todo) - k - 1, mean_cost_s=round(mean, 3),
                          eta_s=round(mean * (len(todo) - k - 1), 1), last=image_id, ts=time.time(),
                          failed=len(failed), last_error=failed.get(image_id))
            if progress:
                progress(k + 1, len(todo))


class ModelWatcher:
    """Calls ``on_change`` at start and whenever the published model file changes.

    ``on_change`` returns False when it could not act (e.g. scoring already running); the watcher
    then tries again at the next tick, so a model published mid-run is never missed.
    """

    def __init__(self, path: Path, interval_s: float, on_change: Callable[[str | None], bool]) -> None:
        self.path, self.interval_s, self.on_change = Path(path), interval_s, on_change
        self._seen: str | None = "<start>"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pants-model-watcher", daemon=True)

    def start(self) -> "ModelWatcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def tick(self) -> None:
        v = model_version(self.path)
        if v != self._seen:
            try:
                acted = self.on_change(v)
            except Exception as err:  # noqa: BLE001 - the watcher must survive
                logger.warning("model watcher: %s", err)
                acted = False
            if acted:
                self._seen = v

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(self.interval_s)


__all__ = [
    "INFO_KEY",
    "ModelWatcher",
    "PanTSScoring",
    "ScanScore",
    "ScanScorer",
    "StatusFile",
    "balance_group",
    "load_for_scoring",
    "model_version",
    "priority",
    "run_scoring",
    "score_row",
]
