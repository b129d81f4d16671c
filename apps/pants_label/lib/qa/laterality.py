"""Left/right organs on the patient's correct side.

Paired organs are compared with each other (the left one must lie to the patient's left of
the right one); the liver must lie to the right of the spleen. Positions are centroids in
patient millimetres (:class:`~lib.qa.findings.LabelView`), so the array's orientation does not
matter.
"""

from __future__ import annotations

from lib.core.review_config import QAConfig
from lib.qa.findings import Finding, LabelView

#: (structure expected on the patient's left, structure expected on the right)
PAIRS: tuple[tuple[str, str], ...] = (
    ("kidney_left", "kidney_right"),
    ("adrenal_gland_left", "adrenal_gland_right"),
    ("lung_left", "lung_right"),
    ("femur_left", "femur_right"),
    ("spleen", "liver"),
)


def side(view: LabelView, cfg: QAConfig) -> list[Finding]:
    out = []
    for left, right in PAIRS:
        a, b = view.centroid(left), view.centroid(right)
        if a is None or b is None:
            continue
        if a[0] <= b[0]:
            out.append(Finding(
                "laterality", "error", left,
                f"{left} lies {b[0] - a[0]:.0f} mm to the patient's right of {right}; "
                f"expected on the left (labels swapped?)",
            ))
    return out


CHECKS = [side]

__all__ = ["CHECKS", "PAIRS", "side"]
