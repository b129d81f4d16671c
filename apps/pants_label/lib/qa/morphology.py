"""Per-structure shape checks: connected pieces, plausible volumes, required structures present."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from lib.core.review_config import QAConfig
from lib.qa.findings import Finding, LabelView

_BALL = ndimage.generate_binary_structure(3, 3)
#: structures that may lie inside another one's label and cut it: the gland parts are counted
#: together with them (a lesion across the head does not make the head two pieces)
_INCLUSIONS = {part: ("pancreatic_lesion", "pancreatic_duct") for part in ("pancreas_head", "pancreas_body",
                                                                          "pancreas_tail", "pancreas")}


def pieces(view: LabelView, cfg: QAConfig) -> list[Finding]:
    """No more connected pieces than anatomy allows (pieces under ``min_piece_ml`` are ignored)."""
    out = []
    for name, allowed in cfg.max_pieces.items():
        if not view.present(name):
            continue
        own = view.mask(name)
        labelled, n = ndimage.label(own, _BALL)
        if n <= allowed:
            continue
        if name in _INCLUSIONS:
            box = view.union_box([name, *_INCLUSIONS[name]])
            own = view.mask(name, box)
            labelled, n = ndimage.label(own | view.masks_in(list(_INCLUSIONS[name]), box), _BALL)
            labelled[~own] = 0  # count only the pieces that hold the structure itself
        sizes = np.bincount(labelled.ravel(), minlength=n + 1)[1:] * view.voxel_ml
        big = int((sizes >= cfg.min_piece_ml).sum())
        if big > allowed:
            out.append(Finding(
                "connected_pieces", "error", name,
                f"{name} is in {big} pieces of at least {cfg.min_piece_ml:g} ml; anatomy allows {allowed}",
            ))
    return out


def volumes(view: LabelView, cfg: QAConfig) -> list[Finding]:
    """Volumes inside plausible adult ranges (a warning: small patients and resections exist)."""
    out = []
    for name, (lo, hi) in cfg.volume_ml.items():
        if not view.present(name):
            continue
        ml = view.volume_ml(name)
        if not lo <= ml <= hi:
            out.append(Finding(
                "volume", "warning", name, f"{name} measures {ml:.0f} ml; plausible range {lo:g}-{hi:g} ml",
            ))
    return out


def required(view: LabelView, cfg: QAConfig) -> list[Finding]:
    """Structures every PanTS scan shows (abdominal CT centred on the pancreas) are labelled."""
    return [
        Finding("required_present", "error", name, f"{name} is not labelled; every PanTS scan shows it")
        for name in cfg.required
        if not view.present(name)
    ]


CHECKS = [pieces, volumes, required]

__all__ = ["CHECKS", "pieces", "required", "volumes"]
