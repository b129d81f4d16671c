"""Replay an annotation campaign on a labelled pool with the app's own train, scoring and strategies.

One campaign = one (strategy, seed): start from ``k`` random seed scans, then rounds of
train (:class:`lib.trainers.segmentation.PanTSTrain`) -> evaluate on the held-out test split ->
score the unlabelled pool (:func:`lib.activelearning.scoring.run_scoring`) -> select ``b`` scans with the
strategy (:mod:`lib.activelearning.strategies`, through leases as the server does) -> reveal their labels
(:meth:`PanTSDatastore.reveal_imported_many`, the "annotation").

Each campaign lives in its own folder (datastore state, model, ``rounds.csv``). A finished round
is a CSV row; an interrupted campaign resumes after its last finished round (the revealed set is
rebuilt from the rows; the round in progress is redone from the model published so far).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lib.core.al_config import ActiveLearningConfig
from lib.core.atomic import atomic_write
from lib.core.errors import ClientError
from lib.datastore.pants import PanTSDatastore
from lib.core.labelmap import LabelMap, load_labelmap
from lib.model.metrics import auc_score, lesion_score_from_label, mean_dice
from lib.model.model_store import model_path
from lib.activelearning.scoring import PanTSScoring, run_scoring
from lib.model.segmenter import Segmenter
from lib.core.settings import SegmentationConfig
from lib.activelearning.strategies import make_strategies
from lib.trainers.segmentation import PanTSTrain
from lib.imaging.metadata import find_metadata, read_metadata
from lib.imaging.volume_io import load_volume

logger = logging.getLogger(__name__)

LESION = "pancreatic_lesion"
FIELDS = [
    "strategy", "seed", "round", "labels", "mean_dsc", "whole_pancreas_dsc", "lesion_dsc", "lesion_auc",
    "lesion_scans_labelled", "published", "train_s", "score_s", "select_s", "selected",
]


def finite_mean(values: Any) -> float:
    """Mean of the finite values; NaN when there are none (a lesion DSC no seed has), silently:
    ``np.nanmean`` warns "Mean of empty slice" on every such cell of a report."""
    a = np.asarray(values, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else math.nan


def finite_range(values: Any) -> tuple[float, float]:
    """(min, max) of the finite values; (NaN, NaN) when there are none."""
    a = np.asarray(values, dtype=np.float64)
    a = a[np.isfinite(a)]
    return (float(a.min()), float(a.max())) if a.size else (math.nan, math.nan)


@dataclass(frozen=True)
class CampaignSpec:
    pool: Path
    out: Path
    strategy: str  # a name from lib.activelearning.strategies.make_strategies, or "full" (every pool label from round 0)
    seed: int
    initial: int
    batch: int
    rounds: int
    preset: str
    seg_cfg: SegmentationConfig
    al_cfg: ActiveLearningConfig
    train_request: dict[str, Any]
    device: str = "cpu"
    start_weights: Path | None = None  # served before round 0 (pants_tools.al_start_model); None: random
    # Scans pinned as every round's validation set (the publish gate), the same for every strategy
    # of a seed and never trained on; 0: each run splits its own labelled scans (the product default).
    val_scans: int = 0
    # Serve every round's fine-tune, even one the publish gate refused (the row still records the
    # gate's verdict): the curves then measure what the labels taught, not the gate's noise.
    serve_every_round: bool = False

    @property
    def folder(self) -> Path:
        return self.out / "runs" / f"{self.strategy}_s{self.seed}"


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _append_row(path: Path, row: dict[str, Any]) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)
        fh.flush()


def evaluate(ds: PanTSDatastore, seg: Segmenter, lm: LabelMap) -> dict[str, float]:
    """Test-split DSC (mean over classes, whole pancreas, lesion on lesion scans) and lesion AUC."""
    means, pancreas, lesion, scores, truths = [], [], [], [], []
    lid = lm.id_of(LESION)
    for image_id in ds.test_images():
        vol = load_volume(ds.get_image_uri(image_id))
        truth = load_volume(ds.get_label_uri(image_id, "pants"), dtype=np.uint8).array
        pred, _ = seg.segment(vol)
        d = mean_dice(pred, truth, lm)
        means.append(d["mean"])
        pancreas.append(d["whole_pancreas"])
        positive = bool((truth == lid).any())
        if positive:
            lesion.append(d[LESION])
        scores.append(lesion_score_from_label(pred, vol.spacing, lm))
        truths.append(positive)
    return {
        "mean_dsc": finite_mean(means),
        "whole_pancreas_dsc": float(np.mean(pancreas)),
        "lesion_dsc": float(np.mean(lesion)) if lesion else math.nan,
        "lesion_auc": auc_score(scores, truths),
    }


def lesion_scans(pool: Path) -> set[str]:
    """Tumour-positive scans by the pool's metadata file, read once (the simulator's ground truth:
    the datastore's copy of the metadata may lag a pool written moments before)."""
    path = find_metadata(pool)
    return {cid for cid, m in read_metadata(path).items() if m.tumor} if path else set()


def validation_scans(pool: list[str], lesions: set[str], k: int, seed: int) -> list[str]:
    """``k`` pool scans pinned for validation, drawn by seed alone (not by strategy). At least one
    is tumour-positive when the pool has any, so the gate sees the lesion; otherwise the pool's
    share, rounded."""
    if k <= 0:
        return []
    rng = np.random.default_rng(10_000 + seed)
    pos = sorted(set(pool) & lesions)
    neg = sorted(set(pool) - lesions)
    n_pos = min(len(pos), max(1 if pos else 0, round(k * len(pos) / max(1, len(pool)))))
    picked = [pos[i] for i in rng.choice(len(pos), size=n_pos, replace=False)] if n_pos else []
    n_neg = min(len(neg), k - n_pos)
    picked += [neg[i] for i in rng.choice(len(neg), size=n_neg, replace=False)] if n_neg else []
    return sorted(picked)


def _snapshot(folder: Path, rnd: int) -> Path:
    """The served weights as round ``rnd`` left them."""
    return folder / f"model_after_round_{rnd}.pt"


def _copy_atomic(src: Path, dst: Path) -> None:
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def _restore_served(served: Path, weights: Path | None) -> None:
    """Serve ``weights`` (None: nothing, the campaign starts from random weights)."""
    if weights is None:
        served.unlink(missing_ok=True)
    elif not Path(weights).is_file():  # a run from before snapshots were kept: go on as it was
        logger.warning("no %s: resuming with the served model as it is", weights)
    elif not served.exists() or served.read_bytes() != Path(weights).read_bytes():
        _copy_atomic(Path(weights), served)


def run_campaign(spec: CampaignSpec, on_round: Callable[[], None] | None = None) -> list[dict[str, str]]:
    """Run (or resume) one campaign; returns its rows."""
    folder = spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    rows_path = folder / "rounds.csv"
    rows = read_rows(rows_path)
    lm = load_labelmap()
    lesion_ids = lesion_scans(spec.pool)
    ds = PanTSDatastore(spec.pool, state_dir=folder / "state", hide_imported_labels=True, labelmap=lm)
    rng = np.random.default_rng(spec.seed)
    train_split = sorted(ds.images_in_split("train"))
    val_ids = validation_scans(train_split, lesion_ids, spec.val_scans, spec.seed)
    pinned = set(val_ids)
    pool = [i for i in train_split if i not in pinned]
    seed_ids = [pool[i] for i in rng.choice(len(pool), size=min(spec.initial, len(pool)), replace=False)]
    if spec.strategy == "full":
        seed_ids = pool
    # Rebuild the revealed set from the finished rounds (resume).
    revealed = val_ids + list(seed_ids) + [i for r in rows for i in json.loads(r["selected"] or "[]")]
    ds.reset_revealed()
    ds.reveal_imported_many(revealed)
    for lease in ds.active_leases():
        ds.release_lease(lease["id"])

    cfg = spec.seg_cfg.model_copy(update={"training": spec.seg_cfg.training.model_copy(update={"seed": spec.seed})})
    model_dir = folder / "model"
    served = model_path(model_dir, spec.preset)
    # A run killed after a round's training but before its row would otherwise go on from that
    # round's model: serve what the last finished round left (or the start), as if never killed.
    _restore_served(served, _snapshot(folder, len(rows) - 1) if rows else spec.start_weights)
    trainer = PanTSTrain(cfg, lm, spec.preset, model_dir, spec.device)
    seg = Segmenter(cfg, lm, spec.preset, served, spec.device)
    scorer = PanTSScoring(Segmenter(cfg, lm, spec.preset, served, spec.device), spec.al_cfg)
    strategy = None if spec.strategy == "full" else make_strategies(spec.al_cfg.strategies, seed=spec.seed)[spec.strategy]
    # "full" follows the campaigns' schedule round for round (same warm-started fine-tunes), so its
    # last round differs from theirs only in the labels; one long run instead trained worse.
    for rnd in range(len(rows), spec.rounds):
        torch.manual_seed(spec.seed * 1000 + rnd)
        labelled = sorted(set(ds.revealed_images()) - pinned)  # the pinned set is not the campaign's
        t0 = time.time()
        res = trainer({**spec.train_request, **({"validation_ids": val_ids} if val_ids else {})}, ds)
        train_s = time.time() - t0
        if spec.serve_every_round and not res.get("published") and res.get("version"):
            try:
                trainer.store.rollback(res["version"], by="simulator")  # the refused run, kept unserved
            except ClientError as err:  # a diverged run is never served: the campaign keeps its model
                logger.warning("%s round %d: %s", spec.folder.name, rnd, err.detail)
        metrics = evaluate(ds, seg, lm)
        selected: list[str] = []
        score_s = select_s = 0.0
        if strategy is not None and rnd < spec.rounds - 1:
            if spec.strategy != "random":  # random needs no scores
                t1 = time.time()
                run_scoring(scorer, ds)
                score_s = time.time() - t1
            t2 = time.time()
            for _ in range(spec.batch):
                hit = strategy({"strategy": spec.strategy, "client_id": "simulator"}, ds)
                if hit.get("id"):
                    selected.append(hit["id"])
            select_s = time.time() - t2
        row = {
            "strategy": spec.strategy, "seed": spec.seed, "round": rnd, "labels": len(labelled),
            **{k: round(v, 5) for k, v in metrics.items()},
            "lesion_scans_labelled": len(lesion_ids.intersection(labelled)),
            "published": bool(res.get("published")),
            "train_s": round(train_s, 1), "score_s": round(score_s, 1), "select_s": round(select_s, 3),
            "selected": json.dumps(selected),
        }
        ds.reveal_imported_many(selected)
        _copy_atomic(served, _snapshot(folder, rnd))  # before the row: a finished round always has one
        _append_row(rows_path, row)
        _snapshot(folder, rnd - 1).unlink(missing_ok=True)
        rows.append({k: str(v) for k, v in row.items()})
        if on_round:
            on_round()
    ds.close()
    return rows


# ---- summary -------------------------------------------------------------------------------------


def labels_to_reach(labels: list[float], values: list[float], target: float) -> float:
    """Labels at which the curve first reaches ``target`` (linear between rounds); inf if never,
    NaN when there is no target (``target`` NaN)."""
    if math.isnan(target):
        return math.nan
    for k, (n, v) in enumerate(zip(labels, values)):
        if v >= target:
            if k == 0:
                return float(n)
            n0, v0 = labels[k - 1], values[k - 1]
            return float(n0 + (target - v0) / (v - v0) * (n - n0)) if v != v0 else float(n)
    return math.inf


def full_pool_by_seed(rows: list[dict[str, str]], metric: str) -> dict[str, float]:
    """Each seed's full-pool value: its last "full" round."""
    last: dict[str, dict[str, str]] = {}
    for r in rows:
        if r["strategy"] == "full" and int(r["round"]) >= int(last.get(r["seed"], {"round": -1})["round"]):
            last[r["seed"]] = r
    return {seed: float(r[metric]) for seed, r in last.items()}


def full_pool_reference(rows: list[dict[str, str]], metric: str) -> float:
    """The full-pool value: each seed's last "full" round (same schedule as the campaigns), averaged."""
    by_seed = full_pool_by_seed(rows, metric)
    return finite_mean(list(by_seed.values()))


#: the full-pool reference counts as flat when its test mean DSC gains less than this a round
#: (least-squares slope over its last PLATEAU_WINDOW rounds): the issue asks for a reference that flattens
PLATEAU_GAIN_PER_ROUND = 0.001
PLATEAU_WINDOW = 4


def reference_trend(rows: list[dict[str, str]], metric: str = "mean_dsc", window: int = PLATEAU_WINDOW,
                    tol: float = PLATEAU_GAIN_PER_ROUND, strategy: str = "full") -> dict[str, Any]:
    """Is the full-pool reference (or ``strategy``) still rising? Per seed, the least-squares slope of
    ``metric`` over its last ``window`` rounds; flat when the seeds' mean slope is below ``tol`` a round.
    Empty when no seed has ``window`` rounds (too short to tell)."""
    curves = _curves_by_seed([r for r in rows if r["strategy"] == strategy], order="round")
    slopes: dict[str, float] = {}
    for seed, rs in curves.items():
        if len(rs) >= window:
            x = np.array([int(r["round"]) for r in rs[-window:]], dtype=float)
            y = np.array([float(r[metric]) for r in rs[-window:]], dtype=float)
            slopes[seed] = float(np.polyfit(x, y, 1)[0])
    if not slopes:
        return {}
    mean = float(np.mean(list(slopes.values())))
    return {"metric": metric, "window": window, "tol": tol, "slope_by_seed": slopes, "slope_mean": mean,
            "flat": mean < tol, "rounds": max(len(rs) for rs in curves.values())}


def trend_sentence(trend: dict[str, Any], name: str = "Full-pool reference") -> str:
    """The table's line on whether the reference (``name``) flattened."""
    if not trend:
        return f"{name}: fewer than {PLATEAU_WINDOW} rounds, too short to tell whether it flattened."
    seeds = ", ".join(f"seed {k} {v:+.4f}" for k, v in trend["slope_by_seed"].items())
    verdict = "flat" if trend["flat"] else "still rising"
    return (f"{name} after {trend['rounds']} rounds: {verdict}. Its {trend['metric']} gains "
            f"{trend['slope_mean']:+.4f} a round over its last {trend['window']} rounds ({seeds}); "
            f"flat means under {trend['tol']:.3f} a round.")


def gain_shares(campaign: list[dict[str, str]], full_rows: list[dict[str, str]], metric: str,
                start: float) -> list[float]:
    """Per seed: the campaign's gain over the start model at its last round, as a share of the same
    seed's full-pool gain. Paired by seed, so the seeds' common noise cancels; NaN where the full pool
    gained nothing (no gain to share)."""
    full = full_pool_by_seed(full_rows, metric)
    shares = []
    for seed in sorted({r["seed"] for r in campaign} & set(full)):
        last = max((r for r in campaign if r["seed"] == seed), key=lambda r: int(r["round"]))
        gain = full[seed] - start
        shares.append((float(last[metric]) - start) / gain if gain > 0 else math.nan)
    return shares


def aubc(labels: list[float], values: list[float]) -> float:
    """Area under the budget curve (nnActive, 2025): the trapezoid area under ``values`` over the
    label budget, divided by the budget, i.e. the curve's mean over the labels spent. Unlike
    "labels to reach a target" it uses every round, so one early jump does not decide it."""
    if len(labels) < 2 or labels[-1] == labels[0]:
        return float(values[-1]) if values else math.nan
    x, y = np.asarray(labels, dtype=float), np.asarray(values, dtype=float)
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))


def _curves_by_seed(rows: list[dict[str, str]], order: str = "labels") -> dict[str, list[dict[str, str]]]:
    """Each seed's rows in ``order`` ("labels" or "round"; one campaign's curve)."""
    return {seed: sorted((r for r in rows if r["seed"] == seed), key=lambda r: int(r[order]))
            for seed in sorted({r["seed"] for r in rows})}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    v = [x for x in values if math.isfinite(x)]
    return (float(np.mean(v)) if v else math.nan, float(np.std(v, ddof=1)) if len(v) > 1 else math.nan)


def summarize(rows: list[dict[str, str]], metrics: tuple[str, ...] = ("mean_dsc", "lesion_dsc"),
              start: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Per strategy: labels to reach 95% of the full-pool value, per metric (mean over seeds' curves).
    With ``start`` (the start model's test values): each seed's gain at the last round as a share of
    its full pool's gain, the measure that still separates strategies when the start model is
    already within 95% of the full pool."""
    out = []
    refs = {m: full_pool_reference(rows, m) for m in metrics}
    prevalence = pool_lesion_share(rows)
    strategies = sorted({r["strategy"] for r in rows} - {"full"})
    for s in strategies:
        mine = [r for r in rows if r["strategy"] == s]
        curves = _curves_by_seed(mine)
        rec: dict[str, Any] = {"strategy": s, "seeds": len({r["seed"] for r in mine})}
        for m in metrics:
            ref = refs[m]
            by_labels: dict[int, list[float]] = {}
            for r in mine:
                by_labels.setdefault(int(r["labels"]), []).append(float(r[m]))
            labels = sorted(by_labels)
            curve = [finite_mean(by_labels[n]) for n in labels]
            # a full-pool model that never segments it (lesion DSC 0) sets no target: every curve
            # would "reach" 0 at once
            target = 0.95 * ref if ref > 0 else math.nan
            rec[f"full_pool_{m}"] = round(float(ref), 4)
            rec[f"labels_to_95pct_{m}"] = labels_to_reach(labels, curve, target)
            rec[f"final_{m}"] = round(curve[-1], 4) if curve else math.nan
            # per-seed values, to show the spread
            per_seed = [labels_to_reach([int(r["labels"]) for r in rs], [float(r[m]) for r in rs], target)
                        for rs in curves.values()]
            rec[f"per_seed_{m}"] = per_seed
            reached = [v for v in per_seed if math.isfinite(v)]  # NaN (no target) and inf (never) left out
            rec[f"seeds_reaching_{m}"] = len(reached)
            rec[f"seed_mean_{m}"] = float(np.mean(reached)) if reached else math.inf
            rec[f"seed_sd_{m}"] = float(np.std(reached, ddof=1)) if len(reached) > 1 else math.nan
            if start is not None and m in start:
                shares = gain_shares(mine, rows, m, start[m])
                shares = [v for v in shares if math.isfinite(v)]
                rec[f"gain_share_{m}"] = [round(v, 3) for v in shares]
                rec[f"gain_share_mean_{m}"] = float(np.mean(shares)) if shares else math.nan
                rec[f"gain_share_sd_{m}"] = float(np.std(shares, ddof=1)) if len(shares) > 1 else math.nan
        # the publish gate: rounds whose fine-tune it passed, and campaigns where, once it refused a round
        # before the last, it never passed one again (the served model's validation score is the best seen
        # on those scans so far, which later fine-tunes seldom match). With serve_every_round these are
        # the gate's verdicts only: every fine-tune was served.
        rec["rounds_published"] = sum(r.get("published") == "True" for r in mine)
        rec["rounds_run"] = len(mine)
        stalled = 0
        for rs in curves.values():
            pub = [r.get("published") == "True" for r in rs]
            first = pub.index(False) if False in pub else len(pub)
            stalled += int(first < len(pub) - 1 and not any(pub[first:]))  # a refusal in the last round is no stall
        rec["campaigns_stalled"] = stalled
        by_seed = {seed: aubc([int(r["labels"]) for r in rs], [float(r["mean_dsc"]) for r in rs])
                   for seed, rs in curves.items()}
        rec["aubc_by_seed_mean_dsc"] = by_seed
        rec["aubc_mean_mean_dsc"], rec["aubc_sd_mean_dsc"] = _mean_sd(list(by_seed.values()))
        # what the strategy served, whatever the model learnt: lesion scans among the labelled
        last = max(int(r["labels"]) for r in mine)
        rec["final_labels"] = last
        rec["final_lesion_scans"] = round(float(np.mean(
            [int(r["lesion_scans_labelled"]) for r in mine if int(r["labels"]) == last])), 2)
        # what random labelling would have served: the pool's lesion share (from the full runs) x labels
        rec["expected_lesion_scans"] = round(last * prevalence, 2) if math.isfinite(prevalence) else math.nan
        out.append(rec)
    # AUBC against random's, paired by seed: the seeds' common noise (test split, start) cancels
    rnd = next((r["aubc_by_seed_mean_dsc"] for r in out if r["strategy"] == "random"), {})
    for rec in out:
        diffs = [v - rnd[seed] for seed, v in rec["aubc_by_seed_mean_dsc"].items() if seed in rnd]
        rec["aubc_vs_random_mean_dsc"] = [round(d, 5) for d in diffs]
        rec["aubc_vs_random_mean_mean_dsc"], rec["aubc_vs_random_sd_mean_dsc"] = _mean_sd(diffs)
    return out


def pool_lesion_share(rows: list[dict[str, str]]) -> float:
    """Lesion scans among the pool's scans, from a "full" run (which labels every pool scan)."""
    full = [r for r in rows if r["strategy"] == "full" and int(r["labels"]) > 0]
    if not full:
        return math.nan
    r = full[0]
    return int(r["lesion_scans_labelled"]) / int(r["labels"])


def markdown_table(summary: list[dict[str, Any]], seeds: list[int], trend: dict[str, Any] | None = None) -> str:
    """The README table: labels to 95% of the full-pool value (mean +- s.d. over seeds, share of
    random's) per metric, and lesion scans served against the number expected at random; with
    ``trend`` (:func:`reference_trend`), a closing line on whether the full-pool reference flattened."""
    rnd = next((r for r in summary if r["strategy"] == "random"), None)

    def cell(r: dict[str, Any], m: str) -> str:
        mean, sd, n = r[f"seed_mean_{m}"], r[f"seed_sd_{m}"], r[f"seeds_reaching_{m}"]
        if not r[f"full_pool_{m}"] > 0:
            return f"n/a (full-pool value {r[f'full_pool_{m}']})"
        if not n:
            return "never"
        txt = f"{mean:.1f}" + (f" +- {sd:.1f}" if math.isfinite(sd) else "")
        if n < r["seeds"]:
            txt += f" ({n} of {r['seeds']} seeds)"
        base = rnd[f"seed_mean_{m}"] if rnd else math.nan
        if math.isfinite(base) and base > 0:
            txt += f" ({mean / base:.0%})"
        return txt

    def gain(r: dict[str, Any]) -> str:
        mean, sd = r.get("gain_share_mean_mean_dsc", math.nan), r.get("gain_share_sd_mean_dsc", math.nan)
        if not math.isfinite(mean):
            return "n/a (the full pool gained nothing)"
        return f"{mean:.0%}" + (f" +- {sd:.0%}" if math.isfinite(sd) else "")

    def area(r: dict[str, Any]) -> str:
        mean, sd = r.get("aubc_mean_mean_dsc", math.nan), r.get("aubc_sd_mean_dsc", math.nan)
        if not math.isfinite(mean):
            return "n/a"
        txt = f"{mean:.4f}" + (f" +- {sd:.4f}" if math.isfinite(sd) else "")
        d, dsd = r.get("aubc_vs_random_mean_mean_dsc", math.nan), r.get("aubc_vs_random_sd_mean_dsc", math.nan)
        if math.isfinite(d) and r["strategy"] != "random":
            txt += f" ({d:+.4f}" + (f" +- {dsd:.4f}" if math.isfinite(dsd) else "") + ")"
        return txt

    with_gain = any("gain_share_mean_mean_dsc" in r for r in summary)
    last = max((r["final_labels"] for r in summary), default=0)
    lines = [
        f"Seeds {', '.join(map(str, seeds))}. Labels needed to reach 95% of the full-pool value "
        "(mean +- s.d. over the seeds that reach it; share of random's in brackets)"
        + (f"; mean-DSC gain over the start model at {last} labels as a share of the same seed's "
           "full-pool gain (mean +- s.d. over seeds)" if with_gain else "")
        + "; AUBC: the mean-DSC curve's area over the label budget, divided by the budget (mean +- s.d. "
          "over seeds; in brackets the difference from random's, paired by seed).",
        "",
        "| strategy | mean DSC | lesion DSC |" + (" gain share |" if with_gain else "")
        + " AUBC, mean DSC | rounds the gate passed (campaigns it never passed again after a refusal) |"
        + " lesion scans served (expected at random) |",
        "| --- | --- | --- |" + (" --- |" if with_gain else "") + " --- | --- | --- |",
    ]
    for r in summary:
        lines.append(f"| {r['strategy']} | {cell(r, 'mean_dsc')} | {cell(r, 'lesion_dsc')} | "
                     + (f"{gain(r)} | " if with_gain else "") + f"{area(r)} | "
                     + f"{r['rounds_published']} of {r['rounds_run']} ({r['campaigns_stalled']}) | "
                     + f"{r['final_lesion_scans']:.1f} of {r['final_labels']} ({r['expected_lesion_scans']:.1f}) |")
    if trend is not None:
        lines += ["", trend_sentence(trend)]
    return "\n".join(lines) + "\n"


TITLES = {"mean_dsc": "test DSC, mean over classes", "lesion_dsc": "test lesion DSC",
          "lesion_auc": "lesion detection AUC", "whole_pancreas_dsc": "whole pancreas DSC"}


def plot_curves(rows: list[dict[str, str]], path: Path, metrics: tuple[str, ...] = ("mean_dsc", "lesion_dsc", "lesion_auc"),
                start: dict[str, float] | None = None) -> Path:
    """Learning curves per strategy: mean over seeds, band = min..max over seeds; full pool dashed;
    ``start``: the start model's test values (grey), where campaigns began."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_full = any(r["strategy"] == "full" for r in rows)
    strategies = sorted({r["strategy"] for r in rows} - {"full"})
    if not strategies:  # the full-pool reference alone: its labels never change, so plot by round
        return plot_by_round(rows, path, metrics, start)
    n = len(metrics) + int(has_full)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for s in strategies:
            by = _by(rows, s, "labels", m)
            x = sorted(by)
            y = np.array([finite_mean(by[n]) for n in x])
            lo, hi = (np.array(v) for v in zip(*(finite_range(by[n]) for n in x)))
            (line,) = ax.plot(x, y, marker="o", label=s)
            ax.fill_between(x, lo, hi, alpha=0.2, color=line.get_color())
        if has_full:
            ref = full_pool_reference(rows, m)
            ax.axhline(ref, ls="--", color="k", lw=1, label="full pool")
            if m != "lesion_auc":
                ax.axhline(0.95 * ref, ls=":", color="k", lw=1, label="95% of full pool")
        if start and m in start and math.isfinite(start[m]):
            ax.axhline(start[m], ls="-.", color="0.5", lw=1, label="start model")
        ax.set_title(TITLES.get(m, m))
        ax.set_xlabel("labelled scans")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if has_full:  # by round: a full-pool curve that tracks the campaigns means training, not labels, limits
        ax = axes[0][-1]
        for s in [*strategies, "full"]:
            by = _by(rows, s, "round", "mean_dsc")
            x = sorted(by)
            ax.plot(x, [finite_mean(by[k]) for k in x], marker="o", ls="--" if s == "full" else "-",
                    color="k" if s == "full" else None, label=s)
        ax.set_title("test DSC, mean over classes, by round")
        ax.set_xlabel("round (same training per round)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _by(rows: list[dict[str, str]], strategy: str, x: str, metric: str) -> dict[int, list[float]]:
    """One strategy's ``metric`` values grouped by ``x`` ("labels" or "round"), over seeds."""
    by: dict[int, list[float]] = {}
    for r in rows:
        if r["strategy"] == strategy:
            by.setdefault(int(r[x]), []).append(float(r[metric]))
    return by


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_by_round(rows: list[dict[str, str]], path: Path, metrics: tuple[str, ...] = ("mean_dsc", "lesion_dsc", "lesion_auc"),
                  start: dict[str, float] | None = None, groups: dict[str, str] | None = None) -> Path:
    """Each metric by round (mean over seeds, band = min..max) for each ``groups`` entry (legend ->
    the rows' "strategy"; default the full-pool reference alone): does more training on the same
    labels still pay, and under which setting does it pay sooner?"""
    import matplotlib.pyplot as plt

    groups = groups or {"full pool": "full"}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for label, strategy in groups.items():
            by = _by(rows, strategy, "round", m)
            x = sorted(by)
            style = {"color": "k", "ls": "--"} if len(groups) == 1 else {}
            (line,) = ax.plot(x, [finite_mean(by[k]) for k in x], marker="o", label=label, **style)
            lo, hi = zip(*(finite_range(by[k]) for k in x))
            ax.fill_between(x, lo, hi,
                            color=line.get_color(), alpha=0.15)
        if start and m in start and math.isfinite(start[m]):
            ax.axhline(start[m], ls="-.", color="0.5", lw=1, label="start model")
        ax.set_title(TITLES.get(m, m) + ", by round")
        ax.set_xlabel("round (same training per round)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


__all__ = ["CampaignSpec", "FIELDS", "evaluate", "full_pool_by_seed", "full_pool_reference", "gain_shares",
           "labels_to_reach", "markdown_table", "plot_by_round", "plot_curves", "pool_lesion_share", "read_rows",
           "reference_trend", "run_campaign", "summarize", "trend_sentence"]
