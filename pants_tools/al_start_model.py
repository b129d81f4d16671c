"""The model an active-learning campaign starts from: the app's shipped model, simulated.

A site that adopts PanTS Label does not start from random weights: it fine-tunes the model the
app ships, trained elsewhere. The simulator plays that part with a model trained once on a
separate phantom set. It differs from the campaign pool the way a public dataset differs from a
site's own scans:
- other anatomy (another phantom seed);
- other scanners and phases: its own cohort file (default ``configs/cohort_public_venous.yaml``:
  portal-venous only, like the public pancreas sets, where PanTS is 45% non-contrast);
- more tumours: a fixed share of its scans hold one, as in public tumour sets (MSD pancreas: all).

Every campaign and the full-pool reference of a simulation start from these weights, so they
differ only in the labels they add. The set, the training and the weights' test score on the
pool's test split are recorded in ``FOLDER/start_spec.json`` and ``FOLDER/start_model.json``; a
rerun with other settings is refused.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lib.core.labelmap import load_labelmap
from lib.core.settings import SegmentationConfig, TrainingConfig
from lib.datastore.pants import PanTSDatastore
from lib.model.model_store import model_path, write_json_atomic
from lib.model.segmenter import Segmenter
from lib.trainers.segmentation import PanTSTrain
from pants_tools.cohort import load_cohort
from pants_tools.recorded_settings import refuse_other_settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StartModelSpec:
    n: int  # phantoms it is trained on
    seed: int  # phantom seed (the pool's is another)
    lesion_share: float  # share of its scans forced to hold a tumour
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    epochs: int
    iterations: int
    lr: float
    cohort: str  # cohort spec file of its phantoms
    cohort_sha256: str

    def lesions(self) -> dict[int, bool]:
        """Case index -> tumour, spread evenly: every k-th scan holds one."""
        k = round(self.lesion_share * self.n)
        return {i: (i * k) // self.n != ((i + 1) * k) // self.n for i in range(self.n)}


def _check_spec(path: Path, spec: StartModelSpec, recipe: dict[str, Any]) -> None:
    want = json.loads(json.dumps({**asdict(spec), **recipe}))
    # the cohort file is its hash: the same file in another checkout is the same start model
    if not refuse_other_settings(path, want, f"{path.parent}: the start model", "another --out",
                                 informational={"cohort"}):
        write_json_atomic(path, want)


# training keys added after start models were recorded that do not shape the weights: such a start
# model still fits (keys recorded from the start stay, so recorded specs keep matching)
NOT_RECIPE = {"keep_refused_versions"}


def recorded_training(training: TrainingConfig) -> dict:
    """The training recipe a start model records. Lesion synthesis (added later) is recorded only
    when it is on: off, it does not shape the weights, so earlier start models still fit."""
    dump = training.model_dump(exclude=NOT_RECIPE)
    if training.lesion_synthesis.probability <= 0:
        dump.pop("lesion_synthesis")
    return dump


def train_start_model(folder: Path, spec: StartModelSpec, seg_cfg: SegmentationConfig, preset: str,
                      test_pool: Path, device: str = "cpu", threads: int | None = None) -> Path:
    """Make the phantom set, train the start model once, score it on ``test_pool``'s test split;
    return its weights. Resumable: finished steps are kept. ``threads``: torch threads to use."""
    if threads:
        torch.set_num_threads(threads)
    from pants_tools.al_campaign import evaluate
    from pants_tools.phantom import write_pants_tree

    folder = Path(folder)
    _check_spec(folder / "start_spec.json", spec, {"preset": preset, "network": seg_cfg.network.model_dump(),
                                                   "training": recorded_training(seg_cfg.training)})
    weights = model_path(folder / "model", preset)
    summary = folder / "start_model.json"
    if summary.is_file() and weights.is_file():
        return weights
    data = folder / "data"
    write_pants_tree(data, spec.n, shape=spec.shape, spacing=spec.spacing_mm, seed=spec.seed, n_test=0,
                     progress=True, lesions=spec.lesions(), cohort=load_cohort(spec.cohort))
    lm = load_labelmap()
    cfg = seg_cfg.model_copy(update={"training": seg_cfg.training.model_copy(update={"seed": spec.seed})})
    ds = PanTSDatastore(data, state_dir=folder / "state", labelmap=lm)
    try:
        res = PanTSTrain(cfg, lm, preset, folder / "model", device)(
            {"max_epochs": spec.epochs, "iterations_per_epoch": spec.iterations, "learning_rate": spec.lr,
             "batch_size": 2, "val_every": 1}, ds)
    finally:
        ds.close()
    if not weights.is_file():
        raise SystemExit(f"training the start model published nothing: {res}")
    test = PanTSDatastore(test_pool, state_dir=folder / "test_state", labelmap=lm)
    try:
        metrics = evaluate(test, Segmenter(cfg, lm, preset, weights, device), lm)
    finally:
        test.close()
    write_json_atomic(summary, {"test": {k: round(v, 5) for k, v in metrics.items()},
                                "val_metric": res.get("best_metric"), "train_size": res.get("train_size")})
    return weights


def start_model_summary(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / "start_model.json"
    return json.loads(path.read_text()) if path.is_file() else None


__all__ = ["StartModelSpec", "start_model_summary", "train_start_model"]
