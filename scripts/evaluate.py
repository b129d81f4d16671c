#!/usr/bin/env python
"""Score predicted label maps against reference ones the way the PanTS paper does.

Per class (the 28 PanTS structures plus ``whole_pancreas``): Dice (DSC) and normalized
surface Dice (NSD, per-class tolerance from configs/labels.yaml). Per scan: tumour detection
from a lesion score (default: predicted pancreatic_lesion volume in mL) giving sensitivity,
specificity and ROC AUC. Metric conventions are those of ``lib/metrics.py`` and are repeated
in ``summary.json``.

Inputs
  --pred DIR   one label map per case, ``<case>.nii.gz`` or ``<case>.nii`` (ids 0..28)
  --truth DIR  the same names; or PanTS layout ``[LabelTr/]<case>/segmentations/<structure>.nii.gz``
               (per-structure masks, merged with the label map's overlap priority)

Outputs in --out
  metrics.csv     one row per case and class: case, class, class_id, dsc, nsd, tolerance_mm, ...
                  (+ center, contrast_phase with --metadata)
  detection.csv   per case: lesion score, tumour truth, whether called positive
  summary.json    the model that made the predictions (``model``), per-class mean/median DSC
                  and NSD, detection metrics, breakdowns by center and contrast phase (with --metadata)
  *.png           DSC box plot per class, ROC curve, mean DSC per center / phase

Model: read from ``model.json`` in --pred or its parent folder (``scripts/batch_infer.py`` writes
it: weights, SHA-256, version); ``--model-version`` names it when the predictions came from elsewhere.

Tumour truth: lesion voxels in the reference label map (``--tumor-truth mask``, default), or the
metadata ``tumor`` column (``--tumor-truth metadata``; cases where it is blank fall back to the
mask). Disagreements between the two are counted in summary.json whenever metadata is given.

Examples
  python scripts/evaluate.py --pred runs/pred --truth PanTS/LabelTr --out runs/eval \\
      --metadata PanTS/metadata.xlsx --workers 4
  python scripts/evaluate.py --pred p --truth t --out e --classes pancreas pancreatic_lesion whole_pancreas
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


import numpy as np

from lib.core.jsonsafe import json_safe
from lib.datastore.folder_scan import mask_files, read_mask_folder
from lib.model import metrics as M
from lib.core.labelmap import LabelMap, load_labelmap

log = logging.getLogger("evaluate")

NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: label maps are compared voxel by voxel, so their grids must agree to this many mm
AFFINE_ATOL_MM = 1e-3
GROUP_FIELDS = ("center", "contrast_phase")


class EvaluationError(Exception):
    """Bad input (missing cases, mismatched grids, ...); the message names the case and problem."""


# ---------------------------------------------------------------------------------------
# finding and loading cases
# ---------------------------------------------------------------------------------------
def case_name(path: Path) -> str:
    """``<case>`` of ``<case>.nii.gz`` / ``<case>.nii``."""
    for suf in NIFTI_SUFFIXES:
        if path.name.endswith(suf):
            return path.name[: -len(suf)]
    return path.name


def discover(root: Path) -> dict[str, Path]:
    """Cases under ``root``: ``<case>.nii[.gz]`` label maps or PanTS ``<case>/segmentations/`` folders.

    A ``LabelTr`` sub-folder (the PanTS release root) is entered automatically.

    Raises:
        EvaluationError: ``root`` is not a folder, or a case appears twice.
    """
    if not root.is_dir():
        raise EvaluationError(f"not a folder: {root}")
    if (root / "LabelTr").is_dir():
        root = root / "LabelTr"
    found: dict[str, Path] = {}
    for p in sorted(root.iterdir()):
        if p.is_file() and p.name.endswith(NIFTI_SUFFIXES):
            name, src = case_name(p), p
        elif p.is_dir() and (p / "segmentations").is_dir():
            name, src = p.name, p / "segmentations"
        else:
            continue
        if name in found:
            raise EvaluationError(f"{root}: case {name!r} appears twice ({found[name].name} and {src.name})")
        found[name] = src
    return found


def _header_of(src: Path) -> tuple[tuple[int, ...], np.ndarray, tuple[float, ...]]:
    """Shape, affine and spacing from a NIfTI header (first mask for a PanTS folder); no voxel data."""
    import nibabel as nib

    path = src
    if src.is_dir():
        files = mask_files(src)
        if not files:
            raise EvaluationError(f"{src}: no structure masks (*.nii.gz) in this folder")
        path = files[min(files)]
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises many types for unreadable files
        raise EvaluationError(f"{path}: not a readable NIfTI file ({err})") from None
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    return shape, np.asarray(img.affine, float), tuple(float(z) for z in img.header.get_zooms()[:3])


def _read_array(path: Path) -> np.ndarray:
    import nibabel as nib

    arr = np.asanyarray(nib.load(str(path)).dataobj)
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise EvaluationError(f"{path}: expected a 3-D label map, got shape {arr.shape}")
    return arr


def load_label(src: Path, lm: LabelMap) -> np.ndarray:
    """Read a label map file, or merge a PanTS ``segmentations/`` folder into one.

    A folder goes through :func:`lib.datastore.folder_scan.read_mask_folder`: masks merged by the
    label map's overlap rule, read one at a time, unknown structures skipped with a warning.
    """
    if not src.is_dir():
        try:
            return M.as_label_map(_read_array(src), lm.num_classes, str(src))
        except ValueError as err:
            raise EvaluationError(str(err)) from None
    try:
        return read_mask_folder(src, lm)
    except ValueError as err:
        raise EvaluationError(str(err)) from None


@dataclass(frozen=True)
class Job:
    """One case to score; ``pred`` is None for a missing prediction (``--allow-missing``)."""

    case: str
    pred: Path | None
    truth: Path
    classes: tuple[str, ...] | None


@dataclass
class CaseResult:
    case: str
    rows: list[dict] = field(default_factory=list)
    pred_lesion_ml: float = 0.0
    truth_lesion_ml: float = 0.0
    error: str | None = None


def evaluate_job(job: Job) -> CaseResult:
    """Score one case (runs in worker processes; errors are returned, not raised)."""
    lm = load_labelmap()
    try:
        _, _, spacing = _header_of(job.truth)
        truth = load_label(job.truth, lm)
        pred = np.zeros_like(truth) if job.pred is None else load_label(job.pred, lm)
        if pred.shape != truth.shape:  # also checked from headers up front; data may still differ
            raise EvaluationError(f"prediction shape {pred.shape} != truth shape {truth.shape}")
        rows = M.evaluate_case(pred, truth, spacing, lm, classes=job.classes)
        return CaseResult(
            case=job.case,
            rows=rows,
            pred_lesion_ml=M.lesion_score_from_label(pred, spacing, lm),
            truth_lesion_ml=M.lesion_score_from_label(truth, spacing, lm),
        )
    except (EvaluationError, ValueError) as err:
        return CaseResult(case=job.case, error=str(err))
    except Exception as err:  # e.g. a truncated .nii.gz; report it with the case rather than crash the pool
        return CaseResult(case=job.case, error=f"{type(err).__name__}: {err}")


def pair_cases(
    pred_dir: Path, truth_dir: Path, allow_missing: bool
) -> tuple[list[tuple[str, Path | None, Path]], list[str]]:
    """Match predictions to references by case name and check that their grids agree.

    Returns:
        ``[(case, pred or None, truth)]`` sorted by case, and the cases without a prediction.

    Raises:
        EvaluationError: no references, missing predictions (unless ``allow_missing``), or
            shape / affine mismatches (all offending cases are listed).
    """
    truth = discover(truth_dir)
    if not truth:
        raise EvaluationError(f"{truth_dir}: no reference label maps (*.nii.gz, *.nii or <case>/segmentations/)")
    pred = discover(pred_dir)
    missing = sorted(set(truth) - set(pred))
    if missing and not allow_missing:
        shown = ", ".join(missing[:20]) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
        raise EvaluationError(
            f"{len(missing)} case(s) in {truth_dir} have no prediction in {pred_dir}: {shown}. "
            "Pass --allow-missing to score them as empty predictions."
        )
    extra = sorted(set(pred) - set(truth))
    if extra:
        log.warning("%d prediction(s) without a reference are ignored: %s", len(extra), ", ".join(extra[:10]))

    problems = []
    for case in sorted(truth):
        if case not in pred:
            continue
        p_shape, p_aff, _ = _header_of(pred[case])
        t_shape, t_aff, _ = _header_of(truth[case])
        if p_shape != t_shape:
            problems.append(f"{case}: prediction shape {p_shape} != truth shape {t_shape}")
        elif not np.allclose(p_aff, t_aff, rtol=0, atol=AFFINE_ATOL_MM):
            diff = float(np.abs(p_aff - t_aff).max())
            problems.append(f"{case}: prediction affine differs from the truth affine (max difference {diff:.4g})")
    if problems:
        raise EvaluationError("prediction and truth grids differ:\n  " + "\n  ".join(problems))
    return [(c, pred.get(c), truth[c]) for c in sorted(truth)], missing


# ---------------------------------------------------------------------------------------
# side inputs: metadata and external scores
# ---------------------------------------------------------------------------------------
def load_metadata(path: Path | None) -> dict[str, Any]:
    """``{case: CaseMeta}`` from a table, or a folder holding ``metadata.xlsx`` / ``.csv``."""
    if path is None:
        return {}
    from lib.imaging.metadata import find_metadata, read_metadata  # lazy: only needed with --metadata

    if path.is_dir():
        found = find_metadata(path)
        if found is None:
            raise EvaluationError(f"--metadata {path}: folder has no metadata.xlsx or metadata.csv")
        path = found
    try:
        return read_metadata(path)
    except (ValueError, FileNotFoundError) as err:
        raise EvaluationError(f"--metadata: {err}") from None


def load_scores(path: Path, cases: Sequence[str]) -> dict[str, float]:
    """Per-case lesion scores from a CSV with columns ``case`` and ``score``."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"case", "score"} <= set(reader.fieldnames):
                raise EvaluationError(f"--scores {path}: need columns 'case' and 'score', got {reader.fieldnames}")
            scores = {}
            for i, row in enumerate(reader, start=2):
                try:
                    scores[row["case"].strip()] = float(row["score"])
                except (TypeError, ValueError):
                    raise EvaluationError(f"--scores {path}: row {i}: score {row['score']!r} is not a number") from None
    except FileNotFoundError:
        raise EvaluationError(f"--scores: file not found: {path}") from None
    missing = [c for c in cases if c not in scores]
    if missing:
        raise EvaluationError(f"--scores {path}: no score for {len(missing)} case(s): {', '.join(missing[:20])}")
    return scores


# ---------------------------------------------------------------------------------------
# writing results
# ---------------------------------------------------------------------------------------
def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return v


def write_csv(path: Path, rows: list[dict], columns: Sequence[str]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        for r in rows:
            w.writerow([_cell(r.get(c)) for c in columns])


def _mean_over_classes(per_class: dict[str, dict], names: Iterable[str]) -> dict[str, float]:
    out = {}
    for m in ("dsc", "nsd"):
        v = [per_class[n][f"{m}_mean"] for n in names if n in per_class and not math.isnan(per_class[n][f"{m}_mean"])]
        out[m] = float(np.mean(v)) if v else math.nan
    return out


def make_plots(
    out: Path, rows: list[dict], det: list[dict], det_metrics: dict, threshold: float, with_groups: bool
) -> list[Path]:
    """DSC box plot per class, ROC curve and, with metadata, mean DSC per center / phase."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    written = []
    classes = list(dict.fromkeys(r["class"] for r in rows))
    data = [[r["dsc"] for r in rows if r["class"] == c and not r["empty_both"]] for c in classes]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(classes) + 1.5))
    ax.boxplot([d if d else [math.nan] for d in data], orientation="horizontal")
    ax.set_yticks(range(1, len(classes) + 1), [f"{c} (n={len(d)})" for c, d in zip(classes, data)], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("DSC (cases where the class is absent from both are left out)")
    fig.tight_layout()
    written.append(out / "dsc_boxplot.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    scores, truths = [d["score"] for d in det], [d["truth_tumor"] for d in det]
    if math.isnan(det_metrics["auc"]):
        log.warning("ROC curve not drawn: the cases are all tumour-positive or all negative")
    else:
        fpr, tpr, _ = M.roc_curve(scores, truths)
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.plot(fpr, tpr, drawstyle="default", label=f"AUC = {det_metrics['auc']:.3f}")
        ax.plot([0, 1], [0, 1], ls=":", c="grey")
        ax.plot(1 - det_metrics["specificity"], det_metrics["sensitivity"], "o", label=f"score > {threshold:g}")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.set_title(f"Tumour detection (n={len(det)}, {det_metrics['n_pos']} positive)")
        ax.legend(loc="lower right")
        fig.tight_layout()
        written.append(out / "roc.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    if with_groups:
        for by in GROUP_FIELDS:
            groups = M.summarize(rows, by=by)
            names = list(groups)
            show = [c for c in ("whole_pancreas", M.LESION_CLASS) if c in classes]
            fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(names) + 2), 4))
            width = 0.8 / (len(show) + 1)
            x = np.arange(len(names))
            means = [_mean_over_classes(groups[g], [c for c in classes if c != "whole_pancreas"])["dsc"] for g in names]
            ax.bar(x, means, width, label="mean over classes")
            for i, c in enumerate(show, start=1):
                ax.bar(x + i * width, [groups[g].get(c, {}).get("dsc_mean", math.nan) for g in names], width, label=c)
            ax.set_xticks(x + width * len(show) / 2, names, rotation=45, ha="right", fontsize=8)
            ax.set_ylim(0, 1)
            ax.set_ylabel("mean DSC")
            ax.set_title(f"DSC by {by.replace('_', ' ')}")
            ax.legend(fontsize=7)
            fig.tight_layout()
            written.append(out / f"dsc_by_{by}.png")
            fig.savefig(written[-1], dpi=120)
            plt.close(fig)
    return written


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------
def build_parser(lm: LabelMap) -> argparse.ArgumentParser:
    choices = lm.names + list(lm.composites)
    p = argparse.ArgumentParser(
        prog="evaluate.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pred", type=Path, metavar="DIR", help="folder of predicted label maps, <case>.nii.gz")
    p.add_argument("--truth", type=Path, metavar="DIR", help="folder of reference label maps with the same names, or PanTS LabelTr")
    p.add_argument("--out", type=Path, metavar="DIR", help="output folder (created; files in it are overwritten)")
    p.add_argument("--metadata", type=Path, metavar="FILE", help="metadata .xlsx/.csv (or a folder holding metadata.xlsx) "
                   "for center / contrast-phase breakdowns and, with --tumor-truth metadata, tumour truth")
    p.add_argument("--scores", type=Path, metavar="CSV", help="CSV with columns case,score: per-scan lesion scores to use "
                   "instead of the predicted lesion volume (e.g. a classifier's probability)")
    p.add_argument("--threshold", type=float, default=0.0, metavar="T", help="a scan is called tumour-positive when its "
                   "score > THRESHOLD; mL of predicted lesion by default (default: 0, any lesion voxel)")
    p.add_argument("--tumor-truth", choices=("mask", "metadata"), default="mask",
                   help="tumour presence from lesion voxels in the reference (default) or the metadata "
                   "'tumor' column (blank cells fall back to the mask)")
    p.add_argument("--classes", nargs="+", choices=choices, metavar="CLASS",
                   help="score only these classes (default: all 28 and whole_pancreas); see --list-classes")
    p.add_argument("--allow-missing", action="store_true",
                   help="score cases without a prediction as empty predictions instead of stopping")
    p.add_argument("--model-version", metavar="VERSION",
                   help="the model version that made --pred, when no model.json from batch_infer.py is there")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="processes scoring cases in parallel (default 1)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--print-by", choices=GROUP_FIELDS, metavar="FIELD",
                   help="also print a Markdown table of mean DSC per class and tumour detection, overall and "
                   f"per value of this metadata field ({', '.join(GROUP_FIELDS)}); needs --metadata")
    p.add_argument("--list-classes", action="store_true", help="print the class ids, names and NSD tolerances and exit")
    return p


def score_cases(jobs: list[Job], workers: int) -> list[CaseResult]:
    """Run :func:`evaluate_job` on every job, in ``workers`` processes, with a progress bar.

    Raises:
        EvaluationError: listing every case that could not be scored.
    """
    from tqdm import tqdm

    bar = {"total": len(jobs), "desc": "evaluating", "unit": "case", "disable": None}  # hidden when not a TTY
    if workers == 1 or len(jobs) == 1:
        results = [evaluate_job(j) for j in tqdm(jobs, **bar)]
    else:
        import multiprocessing as mp

        with mp.Pool(min(workers, len(jobs))) as pool:
            results = list(tqdm(pool.imap_unordered(evaluate_job, jobs, chunksize=1), **bar))
        results.sort(key=lambda r: r.case)
    errors = [f"{r.case}: {r.error}" for r in results if r.error]
    if errors:
        raise EvaluationError(f"{len(errors)} case(s) could not be scored:\n  " + "\n  ".join(errors))
    return results


def detection_table(
    results: list[CaseResult], meta: dict[str, Any], scores: dict[str, float] | None, threshold: float, tumor_truth: str
) -> tuple[list[dict], dict[str, int]]:
    """Per-scan lesion score and tumour truth.

    Returns:
        The rows of detection.csv and counts ``n_metadata_fallback_to_mask`` (``tumor_truth ==
        "metadata"`` but the cell is blank) and ``n_mask_metadata_disagree``.
    """
    det: list[dict] = []
    counts = {"n_metadata_fallback_to_mask": 0, "n_mask_metadata_disagree": 0}
    for r in results:
        m = meta.get(r.case)
        in_mask = r.truth_lesion_ml > 0
        in_meta = getattr(m, "tumor", None)
        counts["n_mask_metadata_disagree"] += in_meta is not None and in_meta != in_mask
        truth = in_mask
        if tumor_truth == "metadata":
            if in_meta is None:
                counts["n_metadata_fallback_to_mask"] += 1
            else:
                truth = in_meta
        score = scores[r.case] if scores is not None else r.pred_lesion_ml
        d = {"case": r.case, "score": score, "truth_tumor": truth, "called_positive": score > threshold,
             "tumor_in_mask": in_mask, "truth_lesion_ml": r.truth_lesion_ml, "pred_lesion_ml": r.pred_lesion_ml}
        if meta:
            d.update({"tumor_in_metadata": in_meta, **{f: getattr(m, f, None) for f in GROUP_FIELDS}})
        det.append(d)
    return det, counts


def _group_key(v: Any) -> str:
    """Group name of a metadata value, as :func:`lib.model.metrics.summarize` forms it."""
    return "unknown" if v in (None, "") else str(v)


CONVENTIONS = {
    "empty_both": "class absent from prediction and truth: DSC = NSD = 1, counted in n_empty_both, "
                  "left out of means and medians",
    "one_empty": "class absent from exactly one side: DSC = NSD = 0",
    "nsd": "boundary voxels (6-connected erosion); a boundary voxel counts if its Euclidean "
           "distance in mm to the other boundary is < tolerance_mm",
    "whole_pancreas": "labels.yaml composite: gland, parts and duct plus lesions touching them; "
                      "tolerance = smallest member tolerance",
    "detection": "positive when score > threshold; AUC = Mann-Whitney with ties as 1/2, "
                 "null when only one truth class is present",
    "mean_over_classes": "mean of per-class means over the 28 classes (whole_pancreas excluded)",
}


def prediction_model(pred: Path, version: str | None) -> dict[str, Any]:
    """Which model made the predictions: ``model.json`` beside them (batch_infer.py), or ``--model-version``."""
    for folder in (pred, pred.parent):
        f = folder / "model.json"
        if f.is_file():
            try:
                model = json.loads(f.read_text())
            except json.JSONDecodeError as err:
                raise EvaluationError(f"{f}: not valid JSON ({err})") from None
            if version and model.get("version") != version:
                raise EvaluationError(f"--model-version {version}: {f} says the predictions come from "
                                      f"{model.get('version') or 'an unrecorded model'}")
            return {**model, "from": str(f)}
    if version:
        return {"version": version, "from": "--model-version"}
    return {"version": None, "note": f"unknown: no model.json in {pred} or its parent, no --model-version"}


def _detected(d: dict[str, Any]) -> str:
    """Tumour scans called positive, and clean scans called negative, as counts."""
    parts = [f"{d['tp']}/{d['n_pos']} found"] if d["n_pos"] else []
    parts += [f"{d['tn']}/{d['n_neg']} clean"] if d["n_neg"] else []
    return ", ".join(parts) or "-"


def group_table(summary: dict[str, Any], by: str) -> str:
    """Mean DSC per scored class and tumour detection, overall and per value of ``by``, in Markdown."""
    groups = summary[f"by_{by}"]
    names = sorted(groups["classes"])
    head = ["class", f"all ({summary['n_cases']})"]
    head += [f"{g} ({max(c['n_cases'] for c in groups['classes'][g].values())})" for g in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def dsc(stats: dict[str, Any] | None) -> str:  # "-": the class is in no truth and no prediction there
        v = stats["dsc_mean"] if stats else None
        return "-" if v is None or math.isnan(v) else f"{v:.3f}"

    for cls, stats in summary["classes"].items():
        cells = [cls, dsc(stats)] + [dsc(groups["classes"][g].get(cls)) for g in names]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["tumour scans", _detected(summary["detection"])] + [_detected(groups["detection"][g]) for g in names]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace, lm: LabelMap) -> dict[str, Any]:
    """Evaluate and write every output; returns the summary dict."""
    if args.workers < 1:
        raise EvaluationError(f"--workers must be >= 1, got {args.workers}")
    if args.print_by and not args.metadata:
        raise EvaluationError(f"--print-by {args.print_by} needs --metadata")
    pairs, missing = pair_cases(args.pred, args.truth, args.allow_missing)
    cases = [c for c, _, _ in pairs]
    meta = load_metadata(args.metadata)
    no_meta = [c for c in cases if meta and c not in meta]
    if no_meta:
        log.warning("%d case(s) have no metadata row (grouped as 'unknown'): %s",
                    len(no_meta), ", ".join(no_meta[:10]))
    if args.tumor_truth == "metadata" and not meta:
        raise EvaluationError("--tumor-truth metadata needs --metadata")
    scores = load_scores(args.scores, cases) if args.scores else None
    if missing:
        log.warning("%d case(s) have no prediction and are scored as empty: %s", len(missing), ", ".join(missing[:10]))

    classes = tuple(args.classes) if args.classes else None
    results = score_cases([Job(c, p, t, classes) for c, p, t in pairs], args.workers)

    rows: list[dict] = []
    for r in results:
        fields = {f: getattr(meta.get(r.case), f, None) for f in GROUP_FIELDS} if meta else {}
        rows.extend({"case": r.case, **row, "pred_missing": r.case in missing, **fields} for row in r.rows)
    det, det_counts = detection_table(results, meta, scores, args.threshold, args.tumor_truth)
    det_metrics = M.detection_metrics([d["score"] for d in det], [d["truth_tumor"] for d in det], args.threshold)

    per_class = M.summarize(rows)
    summary: dict[str, Any] = {
        "model": prediction_model(args.pred, args.model_version),
        "n_cases": len(results),
        "cases_missing_prediction": missing,
        "classes": per_class,
        "mean_over_classes": _mean_over_classes(per_class, lm.names),
        "detection": {
            **det_metrics,
            "score": f"column 'score' of {args.scores}" if scores else "predicted pancreatic_lesion volume (mL)",
            "tumor_truth": args.tumor_truth,
            **det_counts,
        },
        "conventions": CONVENTIONS,
    }
    if not meta:
        summary["detection"]["n_mask_metadata_disagree"] = None
    for by in GROUP_FIELDS if meta else ():
        groups = M.summarize(rows, by=by)
        det_by = {}
        for g in groups:
            sel = [d for d in det if _group_key(d[by]) == g]
            det_by[g] = M.detection_metrics([d["score"] for d in sel], [d["truth_tumor"] for d in sel], args.threshold)
        summary[f"by_{by}"] = {
            "classes": groups,
            "mean_over_classes": {g: _mean_over_classes(groups[g], lm.names) for g in groups},
            "detection": det_by,
        }

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    extra = list(GROUP_FIELDS) if meta else []
    write_csv(out / "metrics.csv", rows, ["case", "class", "class_id", "dsc", "nsd", "tolerance_mm", "pred_voxels",
                                          "truth_voxels", "pred_ml", "truth_ml", "empty_both", "pred_missing", *extra])
    write_csv(out / "detection.csv", det, ["case", "score", "truth_tumor", "called_positive", "tumor_in_mask",
                                           *(["tumor_in_metadata"] if meta else []), "truth_lesion_ml",
                                           "pred_lesion_ml", *extra])
    (out / "summary.json").write_text(json.dumps(json_safe(summary), indent=2) + "\n")
    if not args.no_plots:
        make_plots(out, rows, det, det_metrics, args.threshold, with_groups=bool(meta))
    mo = summary["mean_over_classes"]
    log.info("%d cases, model %s: mean DSC %.4f, mean NSD %.4f over classes; tumour AUC %.4f -> %s",
             len(results), summary["model"].get("version") or "unknown", mo["dsc"], mo["nsd"], det_metrics["auc"], out)
    if args.print_by:
        print(group_table(summary, args.print_by), flush=True)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for bad input)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    lm = load_labelmap()
    parser = build_parser(lm)
    args = parser.parse_args(argv)
    if args.list_classes:
        for c in lm.classes:
            print(f"{c.id:3d}  {c.name:28s} nsd_tolerance {c.nsd_tolerance_mm:g} mm")
        for key in lm.composites:
            print(f"  -  {key:28s} composite of {', '.join(lm.composites[key].members)}")
        return 0
    for opt in ("pred", "truth", "out"):
        if getattr(args, opt) is None:
            parser.error(f"--{opt} is required")
    try:
        run(args, lm)
    except EvaluationError as err:
        log.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
