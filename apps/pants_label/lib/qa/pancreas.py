"""The pancreas as appendix C defines it: head, body and tail ordered from the patient's right
to left and touching; the duct inside the gland; a lesion in or at the gland."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from lib.core.review_config import QAConfig
from lib.qa.findings import Finding, LabelView

PARTS = ("pancreas_head", "pancreas_body", "pancreas_tail")
#: what counts as gland for the duct and lesion checks
GLAND = (*PARTS, "pancreas", "pancreatic_lesion")
_BALL = ndimage.generate_binary_structure(3, 3)  # the 26 neighbours
#: structures that lie inside the gland and may separate its parts
_INSIDE = ("pancreatic_duct", "pancreatic_lesion")


def part_order(view: LabelView, cfg: QAConfig) -> list[Finding]:
    """Head right of body, body right of tail (the head lies right of the mesenteric vessels)."""
    out = []
    for a, b in zip(PARTS, PARTS[1:]):
        ca, cb = view.centroid(a), view.centroid(b)
        if ca is None or cb is None:
            continue
        if ca[0] >= cb[0]:
            out.append(Finding(
                "pancreas_order", "error", a,
                f"{a} lies {ca[0] - cb[0]:.0f} mm to the patient's left of {b}; the head, body and tail "
                "run from the patient's right to left (head and tail swapped?)",
            ))
    return out


def parts_touch(view: LabelView, cfg: QAConfig) -> list[Finding]:
    """Neighbouring parts share a border (a gap means a part is misplaced or a slice is missing).

    The duct and a lesion run through the gland and may lie between two parts: the parts touch
    when one connected piece of the two parts, duct and lesion holds both.
    """
    out = []
    for a, b in zip(PARTS, PARTS[1:]):
        if not (view.present(a) and view.present(b)):
            continue
        box = view.union_box([a, b])
        pieces, _ = ndimage.label(view.masks_in([a, b, *_INSIDE], box), _BALL)
        shared = set(np.unique(pieces[view.mask(a, box)])) & set(np.unique(pieces[view.mask(b, box)]))
        if not shared - {0}:
            out.append(Finding("pancreas_parts_touch", "error", a, f"{a} and {b} do not touch"))
    return out


def duct_inside(view: LabelView, cfg: QAConfig) -> list[Finding]:
    """The duct runs inside the gland (grown by one voxel: the duct wall borders parenchyma)."""
    if not view.present("pancreatic_duct"):
        return []
    box = view.union_box(["pancreatic_duct", *GLAND], margin_mm=float(view.spacing.max()))
    duct = view.mask("pancreatic_duct", box)
    gland = ndimage.binary_dilation(view.masks_in(list(GLAND), box), _BALL)
    share = float((duct & gland).sum()) / max(int(duct.sum()), 1)
    if share < cfg.duct_inside_min:
        return [Finding(
            "duct_inside_gland", "error", "pancreatic_duct",
            f"only {share:.0%} of pancreatic_duct lies inside the gland (at least {cfg.duct_inside_min:.0%} expected)",
        )]
    return []


def lesion_near_gland(view: LabelView, cfg: QAConfig) -> list[Finding]:
    """Each lesion piece lies within ``lesion_max_gap_mm`` of the gland (head, body, tail, pancreas)."""
    if not view.present("pancreatic_lesion"):
        return []
    parts = [p for p in (*PARTS, "pancreas") if view.present(p)]
    if not parts:
        return [Finding("lesion_near_gland", "error", "pancreatic_lesion",
                        "pancreatic_lesion is labelled but no pancreas is")]
    box = view.union_box(["pancreatic_lesion", *parts], margin_mm=cfg.lesion_max_gap_mm + float(view.spacing.max()))
    gland = view.masks_in(parts, box)
    dist = ndimage.distance_transform_edt(~gland, sampling=view.spacing)
    pieces, n = ndimage.label(view.mask("pancreatic_lesion", box), _BALL)
    far = ndimage.minimum(dist, pieces, index=np.arange(1, n + 1)) if n else []
    # centre-to-centre distance less one voxel: a piece touching the gland has a gap of 0
    worst = max(float(np.max(far)) - float(view.spacing.max()), 0.0) if n else 0.0
    if worst > cfg.lesion_max_gap_mm:
        return [Finding(
            "lesion_near_gland", "error", "pancreatic_lesion",
            f"a pancreatic_lesion piece lies {worst:.0f} mm from the gland (at most {cfg.lesion_max_gap_mm:g} mm)",
        )]
    return []


CHECKS = [part_order, parts_touch, duct_inside, lesion_near_gland]

__all__ = ["CHECKS", "PARTS", "duct_inside", "lesion_near_gland", "part_order", "parts_touch"]
