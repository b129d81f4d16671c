"""Segmentation and detection metrics as defined in the PanTS paper (appendix B.4).

Pure numpy/scipy; label maps may also be torch tensors (they are converted). The same
functions serve the offline evaluation CLI (``scripts/evaluate.py``) and validation
during training (:func:`mean_dice`).

Conventions (documented here once; the CLI copies them into ``summary.json``):

* **Empty structures.** If a class is absent from both prediction and truth, DSC = NSD = 1
  and the row is flagged ``empty_both``; :func:`summarize` leaves such rows out of means
  and medians but counts them. If exactly one side is empty, DSC = NSD = 0.
* **NSD.** Surfaces are the voxels of a mask removed by one binary erosion with the
  6-connected structuring element (voxels on the volume border count as surface). A surface
  voxel is "within tolerance" if its Euclidean distance in mm (voxel indices times spacing)
  to the nearest voxel of the other surface is strictly below ``tau`` (paper eq. 2 uses
  ``< tau``). Distances come from a k-d tree over surface voxels; ``nsd(..., method="edt")``
  computes the same with scipy's spacing-aware distance transform, as a reference. Per-class
  ``tau`` is ``nsd_tolerance_mm`` in ``configs/labels.yaml``; a composite (``whole_pancreas``)
  uses the smallest tolerance of its members.
* **Detection.** A scan's lesion score defaults to the predicted lesion volume in mL; a scan
  is called positive when ``score > threshold`` (so threshold 0 means "any lesion voxel").
  AUC is the Mann-Whitney statistic with average ranks for ties; it is NaN when only one
  truth class is present, as are sensitivity (no positives) and specificity (no negatives).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.stats import rankdata

from lib.core.errors import unknown

if TYPE_CHECKING:
    from lib.core.labelmap import LabelMap

#: the class whose predicted volume is the default per-scan lesion score
LESION_CLASS = "pancreatic_lesion"
#: crop margin (voxels) around pred ∪ truth; 1 keeps erosion/dilation results identical
#: to the full volume because every voxel outside the crop is background for that class
_MARGIN = 1

Slices = tuple[slice, ...]


# ---------------------------------------------------------------------------------------
# array helpers
# ---------------------------------------------------------------------------------------
def to_numpy(x: Any) -> np.ndarray:
    """Return ``x`` as a numpy array; torch tensors are detached and moved to the CPU."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor / MetaTensor, no torch import
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def as_label_map(x: Any, num_classes: int, name: str = "label") -> np.ndarray:
    """Convert a label map to ``uint8`` and check its values lie in ``0..num_classes``.

    Args:
        x: integer, boolean or integral-valued float array (or torch tensor).
        num_classes: largest valid id.
        name: what to call the array in error messages.

    Raises:
        ValueError: non-integral values or ids outside ``0..num_classes``.
    """
    a = to_numpy(x)
    if a.dtype == np.uint8 and (a.size == 0 or a.max() <= num_classes):
        return a
    if a.dtype == bool:
        return a.view(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        r = np.rint(a)
        if not np.array_equal(r, a):
            raise ValueError(f"{name}: label map has non-integer values (dtype {a.dtype})")
        a = r
    if a.size:
        lo, hi = a.min(), a.max()
        if lo < 0 or hi > num_classes:
            raise ValueError(f"{name}: label values must be in 0..{num_classes}, got range {lo:g}..{hi:g}")
    return a.astype(np.uint8, copy=False)


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    sp = tuple(float(s) for s in spacing)
    if len(sp) != ndim or any(not (s > 0) for s in sp):
        raise ValueError(f"spacing must be {ndim} positive numbers (mm), got {tuple(spacing)}")
    return sp


def _union_box(boxes: Iterable[Slices | None], shape: tuple[int, ...], margin: int = _MARGIN) -> Slices | None:
    """Smallest box holding all given boxes, grown by ``margin`` and clipped to ``shape``."""
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return None
    return tuple(
        slice(max(min(b[d].start for b in boxes) - margin, 0), min(max(b[d].stop for b in boxes) + margin, n))
        for d, n in enumerate(shape)
    )


def _bbox(mask: np.ndarray, margin: int = _MARGIN) -> Slices | None:
    objs = ndimage.find_objects(mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8))
    return _union_box(objs[:1], mask.shape, margin) if objs else None


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: the mask minus its 6-connected erosion (outside the array is background).

    Equal to ``mask & ~binary_erosion(mask, cross, border_value=0)``, done with shifted views
    of a zero-padded copy because that is several times faster than scipy's erosion.
    """
    q = np.pad(mask, 1)
    core = tuple(slice(1, -1) for _ in range(mask.ndim))
    interior = q[core].copy()
    for ax, n in enumerate(mask.shape):
        for start in (0, 2):  # neighbour below / above along this axis
            sl = list(core)
            sl[ax] = slice(start, start + n)
            interior &= q[tuple(sl)]
    return mask & ~interior


def _nsd_cropped(
    p: np.ndarray, t: np.ndarray, spacing: tuple[float, ...], tolerance_mm: float, method: str = "kdtree"
) -> float:
    """NSD of two non-empty boolean masks already cropped with a background margin."""
    sp, st = _surface(p), _surface(t)
    n_p, n_t = int(np.count_nonzero(sp)), int(np.count_nonzero(st))
    if method == "edt":
        # reference: distance (mm) from every voxel of the crop to the other surface
        ok_p = int(np.count_nonzero(ndimage.distance_transform_edt(~st, sampling=spacing)[sp] < tolerance_mm))
        ok_t = int(np.count_nonzero(ndimage.distance_transform_edt(~sp, sampling=spacing)[st] < tolerance_mm))
    else:
        # Same Euclidean distances, but only between surface voxels: ~6x faster than the
        # EDT on organ-sized crops since surfaces are a small fraction of the box.
        xp = np.argwhere(sp) * np.asarray(spacing)
        xt = np.argwhere(st) * np.asarray(spacing)
        # unbalanced trees build ~2x faster and query as fast on these point clouds
        tree_p = cKDTree(xp, balanced_tree=False, compact_nodes=False)
        tree_t = cKDTree(xt, balanced_tree=False, compact_nodes=False)
        d_p, _ = tree_t.query(xp, k=1, distance_upper_bound=tolerance_mm)  # inf beyond the bound
        d_t, _ = tree_p.query(xt, k=1, distance_upper_bound=tolerance_mm)
        ok_p, ok_t = int(np.count_nonzero(d_p < tolerance_mm)), int(np.count_nonzero(d_t < tolerance_mm))
    return (ok_p + ok_t) / (n_p + n_t)


# ---------------------------------------------------------------------------------------
# per-structure metrics
# ---------------------------------------------------------------------------------------
def dice(pred: Any, truth: Any) -> float:
    """Dice similarity coefficient ``2|P∩G| / (|P|+|G|)`` of two binary masks.

    Returns 1.0 when both masks are empty (see module conventions).

    Example:
        >>> a = np.zeros((4, 4), bool); a[:2] = True
        >>> dice(a, a)
        1.0
    """
    p, t = to_numpy(pred).astype(bool, copy=False), to_numpy(truth).astype(bool, copy=False)
    if p.shape != t.shape:
        raise ValueError(f"dice: shapes differ, pred {p.shape} vs truth {t.shape}")
    n = int(np.count_nonzero(p)) + int(np.count_nonzero(t))
    if n == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(p & t)) / n


def nsd(
    pred: Any, truth: Any, spacing: Sequence[float], tolerance_mm: float, method: str = "kdtree"
) -> float:
    """Normalized surface Dice (paper eq. 2) of two binary masks.

    Args:
        pred: predicted mask.
        truth: reference mask of the same shape.
        spacing: voxel size in mm along each array axis.
        tolerance_mm: tolerance ``tau``; surface distances strictly below it count.
        method: ``"kdtree"`` (default, nearest surface voxel by k-d tree) or ``"edt"``
            (scipy's spacing-aware distance transform over the crop); both give the same
            Euclidean distances, the EDT is the slower reference.

    Returns:
        Fraction of both surfaces lying within ``tau`` of the other surface; 1.0 if both masks
        are empty, 0.0 if exactly one is.
    """
    p, t = to_numpy(pred).astype(bool, copy=False), to_numpy(truth).astype(bool, copy=False)
    if p.shape != t.shape:
        raise ValueError(f"nsd: shapes differ, pred {p.shape} vs truth {t.shape}")
    sp = _check_spacing(spacing, p.ndim)
    if not tolerance_mm > 0:
        raise ValueError(f"nsd: tolerance_mm must be > 0, got {tolerance_mm}")
    if method not in ("kdtree", "edt"):
        raise ValueError(f"nsd: method must be 'kdtree' or 'edt', got {method!r}")
    box = _union_box([_bbox(p), _bbox(t)], p.shape)
    if box is None:
        return 1.0
    pc, tc = p[box], t[box]
    if not pc.any() or not tc.any():
        return 0.0
    return _nsd_cropped(pc, tc, sp, tolerance_mm, method)


def _composite_tolerance(labelmap: LabelMap, key: str) -> float:
    members = labelmap.composites[key].members
    by_name = {c.name: c for c in labelmap.classes}
    return min(by_name[m].nsd_tolerance_mm for m in members)


def _resolve_classes(labelmap: LabelMap, classes: Iterable[str | int] | None) -> list[str]:
    """Names to evaluate (class names, ids or composite keys), in label-map order."""
    allowed = labelmap.names + list(labelmap.composites)
    if classes is None:
        return allowed
    wanted: set[str] = set()
    for c in classes:
        name = labelmap.id_to_name.get(c) if isinstance(c, (int, np.integer)) else c
        if name not in allowed:
            raise ValueError(unknown("class", c, allowed, f" (or ids 1..{labelmap.num_classes})", ordered=True))
        wanted.add(name)
    return [n for n in allowed if n in wanted]


def _row(
    name: str, class_id: int | None, tol: float, n_p: int, n_t: int, dsc: float, nsd_: float, vox_ml: float
) -> dict:
    return {
        "class": name,
        "class_id": class_id,
        "dsc": dsc,
        "nsd": nsd_,
        "tolerance_mm": tol,
        "pred_voxels": n_p,
        "truth_voxels": n_t,
        "pred_ml": n_p * vox_ml,
        "truth_ml": n_t * vox_ml,
        "empty_both": n_p == 0 and n_t == 0,
    }


def _score_pair(pc: np.ndarray, tc: np.ndarray, spacing: tuple[float, ...], tol: float) -> tuple[int, int, float, float]:
    """Voxel counts, DSC and NSD of two cropped masks, with the empty-mask conventions."""
    n_p, n_t = int(np.count_nonzero(pc)), int(np.count_nonzero(tc))
    if n_p == 0 and n_t == 0:
        return 0, 0, 1.0, 1.0
    if n_p == 0 or n_t == 0:
        return n_p, n_t, 0.0, 0.0
    dsc = 2.0 * int(np.count_nonzero(pc & tc)) / (n_p + n_t)
    return n_p, n_t, dsc, _nsd_cropped(pc, tc, spacing, tol)


def evaluate_case(
    pred_label: Any,
    truth_label: Any,
    spacing: Sequence[float],
    labelmap: LabelMap,
    classes: Iterable[str | int] | None = None,
) -> list[dict]:
    """DSC and NSD of every class (and composite) of one scan.

    Both label maps are scanned once (``find_objects``); each class is then scored inside
    the bounding box of its prediction ∪ truth, so small structures cost little.

    Args:
        pred_label: predicted label map (ids ``0..N``), numpy array or torch tensor.
        truth_label: reference label map of the same shape.
        spacing: voxel size in mm per axis (from the truth image header).
        labelmap: the loaded label map (``load_labelmap()``).
        classes: class names, ids or composite keys to score; default all classes followed
            by all composites (``whole_pancreas``).

    Returns:
        One dict per class with ``class, class_id, dsc, nsd, tolerance_mm, pred_voxels,
        truth_voxels, pred_ml, truth_ml, empty_both`` (``class_id`` is None for composites).

    Raises:
        ValueError: shape mismatch, bad spacing, label values outside ``0..N`` or unknown classes.
    """
    names = _resolve_classes(labelmap, classes)
    pred = as_label_map(pred_label, labelmap.num_classes, "pred")
    truth = as_label_map(truth_label, labelmap.num_classes, "truth")
    if pred.shape != truth.shape:
        raise ValueError(f"evaluate_case: shapes differ, pred {pred.shape} vs truth {truth.shape}")
    sp = _check_spacing(spacing, pred.ndim)
    vox_ml = float(np.prod(sp)) / 1000.0
    k = labelmap.num_classes
    pbox = ndimage.find_objects(pred, max_label=k)
    tbox = ndimage.find_objects(truth, max_label=k)

    rows = []
    for name in names:
        if name in labelmap.name_to_id:
            cid = labelmap.name_to_id[name]
            tol = labelmap.classes[cid - 1].nsd_tolerance_mm
            box = _union_box([pbox[cid - 1], tbox[cid - 1]], pred.shape)
            if box is None:
                rows.append(_row(name, cid, tol, 0, 0, 1.0, 1.0, vox_ml))
                continue
            pc, tc = pred[box] == cid, truth[box] == cid
        else:  # composite: crop to all its members, then let the label map build the masks
            cid, comp = None, labelmap.composites[name]
            tol = _composite_tolerance(labelmap, name)
            ids = [labelmap.name_to_id[m] for m in comp.members + comp.include_touching]
            box = _union_box([b[i - 1] for b in (pbox, tbox) for i in ids], pred.shape)
            if box is None:
                rows.append(_row(name, cid, tol, 0, 0, 1.0, 1.0, vox_ml))
                continue
            pc, tc = labelmap.composite_mask(pred[box], name), labelmap.composite_mask(truth[box], name)
        n_p, n_t, d, s = _score_pair(pc, tc, sp, tol)
        rows.append(_row(name, cid, tol, n_p, n_t, d, s, vox_ml))
    return rows


def mean_dice(pred_label: Any, truth_label: Any, labelmap: LabelMap) -> dict[str, float]:
    """Cheap per-class Dice for validation during training (no surface distances).

    Args:
        pred_label: predicted label map (numpy or torch, any shape, e.g. ``(1, H, W, D)``).
        truth_label: reference label map of the same shape.
        labelmap: the loaded label map.

    Returns:
        ``{class name: dsc}`` for every class (1.0 when absent from both), ``"whole_pancreas"``
        (each composite) and ``"mean"``: the mean over classes present in the truth
        (NaN if the truth is empty).
    """
    pred = as_label_map(pred_label, labelmap.num_classes, "pred")
    truth = as_label_map(truth_label, labelmap.num_classes, "truth")
    if pred.shape != truth.shape:
        raise ValueError(f"mean_dice: shapes differ, pred {pred.shape} vs truth {truth.shape}")
    k = labelmap.num_classes
    pbox = ndimage.find_objects(pred, max_label=k)
    tbox = ndimage.find_objects(truth, max_label=k)
    out: dict[str, float] = {}
    present: list[float] = []
    for c in labelmap.classes:
        box = _union_box([pbox[c.id - 1], tbox[c.id - 1]], pred.shape, margin=0)
        if box is None:
            out[c.name] = 1.0
            continue
        tc = truth[box] == c.id
        out[c.name] = dice(pred[box] == c.id, tc)
        if tbox[c.id - 1] is not None:
            present.append(out[c.name])
    for key in labelmap.composites:
        comp = labelmap.composites[key]
        ids = [labelmap.name_to_id[m] for m in comp.members + comp.include_touching]
        box = _union_box([b[i - 1] for b in (pbox, tbox) for i in ids], pred.shape)
        out[key] = 1.0 if box is None else dice(
            labelmap.composite_mask(pred[box], key), labelmap.composite_mask(truth[box], key)
        )
    out["mean"] = float(np.mean(present)) if present else math.nan
    return out


# ---------------------------------------------------------------------------------------
# per-scan detection
# ---------------------------------------------------------------------------------------
def lesion_score_from_label(pred_label: Any, spacing: Sequence[float], labelmap: LabelMap) -> float:
    """Default per-scan lesion score: predicted ``pancreatic_lesion`` volume in mL."""
    lab = to_numpy(pred_label)
    sp = _check_spacing(spacing, lab.ndim)
    n = int(np.count_nonzero(lab == labelmap.id_of(LESION_CLASS)))
    return n * float(np.prod(sp)) / 1000.0


def auc_score(scores: Sequence[float], truths: Sequence[bool]) -> float:
    """ROC AUC as the Mann-Whitney U statistic; tied scores count one half.

    Returns NaN when all truths are equal (AUC is undefined with one class).
    """
    s = np.asarray(scores, dtype=float)
    y = np.asarray(truths, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(s)  # average ranks handle ties
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(scores: Sequence[float], truths: Sequence[bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points for every distinct score, from (0, 0) to (1, 1).

    Returns:
        ``(fpr, tpr, thresholds)``; point ``i`` calls ``score >= thresholds[i]`` positive
        (the first threshold is ``+inf``). Rates are NaN where a truth class is absent.
    """
    s = np.asarray(scores, dtype=float)
    y = np.asarray(truths, dtype=bool)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1] if s.size else np.array([], int)
    tp = np.r_[0, np.cumsum(y)[last]]
    fp = np.r_[0, np.cumsum(~y)[last]]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tp / n_pos if n_pos else np.full(tp.shape, np.nan)
        fpr = fp / n_neg if n_neg else np.full(fp.shape, np.nan)
    return fpr, tpr, np.r_[np.inf, s[last]]


def detection_metrics(scores: Sequence[float], truths: Sequence[bool], threshold: float = 0.0) -> dict[str, Any]:
    """Scan-level tumour detection: sensitivity, specificity and AUC (paper eq. 3).

    Args:
        scores: one lesion score per scan (default: predicted lesion mL).
        truths: whether each scan truly has a tumour.
        threshold: a scan is called positive when ``score > threshold``.

    Returns:
        ``tp, fp, tn, fn, n_pos, n_neg, threshold, sensitivity, specificity, auc``; a rate
        whose denominator is zero, and the AUC with a single truth class, are NaN.

    Raises:
        ValueError: lengths differ or a score is NaN.
    """
    s = np.asarray(scores, dtype=float)
    y = np.asarray(truths, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"detection_metrics: need two 1-D sequences of equal length, got {s.shape} and {y.shape}")
    if np.isnan(s).any():
        raise ValueError("detection_metrics: scores contain NaN")
    called = s > threshold
    tp, fn = int(np.sum(called & y)), int(np.sum(~called & y))
    fp, tn = int(np.sum(called & ~y)), int(np.sum(~called & ~y))
    return {
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n_pos": tp + fn,
        "n_neg": tn + fp,
        "threshold": float(threshold),
        "sensitivity": tp / (tp + fn) if tp + fn else math.nan,
        "specificity": tn / (tn + fp) if tn + fp else math.nan,
        "auc": auc_score(s, y),
    }


# ---------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------
def _stats(rows: list[dict], metrics: Sequence[str]) -> dict[str, Any]:
    scored = [r for r in rows if not r.get("empty_both", False)]
    out: dict[str, Any] = {"n_cases": len(rows), "n_empty_both": len(rows) - len(scored)}
    for m in metrics:
        v = np.array([r[m] for r in scored if r.get(m) is not None], dtype=float)
        v = v[~np.isnan(v)]
        out[f"{m}_mean"] = float(v.mean()) if v.size else math.nan
        out[f"{m}_median"] = float(np.median(v)) if v.size else math.nan
        out[f"{m}_std"] = float(v.std()) if v.size else math.nan
    return out


def summarize(rows: Iterable[dict], by: str | None = None, metrics: Sequence[str] = ("dsc", "nsd")) -> dict[str, Any]:
    """Mean, median and standard deviation of each metric per class.

    Rows flagged ``empty_both`` are counted (``n_empty_both``) but left out of the statistics,
    since a perfect score for an absent structure would inflate means; a class with only such
    rows gets NaN statistics.

    Args:
        rows: dicts with at least ``class``, the ``metrics`` keys and ``empty_both``, e.g. from
            :func:`evaluate_case` plus a ``case`` key and metadata fields.
        by: optional row field to group by first (e.g. ``"center"``, ``"contrast_phase"``);
            rows missing it or holding None go to group ``"unknown"``.
        metrics: which row fields to aggregate.

    Returns:
        ``{class: stats}``, or ``{group: {class: stats}}`` when ``by`` is given. Classes and
        groups keep their first-seen order.
    """
    groups: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        g = "_all" if by is None else str(r[by]) if r.get(by) not in (None, "") else "unknown"
        groups.setdefault(g, {}).setdefault(r["class"], []).append(r)
    out = {g: {c: _stats(rs, metrics) for c, rs in per_class.items()} for g, per_class in groups.items()}
    return out.get("_all", {}) if by is None else out


__all__ = [
    "LESION_CLASS",
    "as_label_map",
    "auc_score",
    "detection_metrics",
    "dice",
    "evaluate_case",
    "lesion_score_from_label",
    "mean_dice",
    "nsd",
    "roc_curve",
    "summarize",
    "to_numpy",
]
