"""Case metadata (center, contrast phase, age, sex, spacing) from DICOM attributes.

The same keys as a PanTS metadata row (:class:`lib.imaging.metadata.CaseMeta`), so a PACS-backed
campaign balances centers and phases exactly as a PanTS folder does. Center is InstitutionName;
the phase comes from SeriesDescription (PanTS's loader writes ``CT venous phase``; hospitals write
things like ``ABD PORTAL VENOUS 2.5mm``), and a series with no phase word counts as non-contrast
only when it names no ContrastBolusAgent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from lib.imaging.metadata import normalize_phase

#: phase words searched for in SeriesDescription, most specific first
_PHASE_WORDS: tuple[tuple[str, str], ...] = (
    (r"non[- ]?contrast|noncon|unenhanced|plain|native|pre[- ]?contrast|w/o", "non-contrast"),
    (r"delay|excret", "delayed"),
    (r"portal|venous|\bpv\b|\bven\b", "venous"),
    (r"arterial|\bart\b|pancreatic phase", "arterial"),
)


def phase_from_dicom(description: str | None, contrast_agent: str | None) -> str | None:
    """A PanTS contrast phase from SeriesDescription and ContrastBolusAgent (None if unknown)."""
    text = (description or "").strip().lower()
    for pattern, phase in _PHASE_WORDS:
        if re.search(pattern, text):
            return phase
    if text:
        guess = normalize_phase(re.sub(r"^ct\s+|\s+phase$", "", text))
        if guess in ("non-contrast", "arterial", "venous", "delayed"):
            return guess
    return None if (contrast_agent or "").strip() else ("non-contrast" if text else None)


def age_from_dicom(value: str | None) -> float | None:
    """PatientAge (``058Y``, ``006M``, ``010W``, ``020D``) in years."""
    m = re.fullmatch(r"\s*(\d{1,3})\s*([DWMY]?)\s*", value or "")
    if not m:
        return None
    n, unit = int(m.group(1)), m.group(2) or "Y"
    return round(n / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[unit], 2)


def case_from_dicom(fields: Mapping[str, Any], spacing: tuple[float, float, float] | None = None) -> dict[str, Any]:
    """Case metadata from DICOM attributes by keyword (a QIDO answer or a header's)."""

    def text(key: str) -> str | None:
        v = fields.get(key)
        v = str(v).strip() if v is not None else ""
        return v or None

    sex = (text("PatientSex") or "").upper()
    out: dict[str, Any] = {
        "center": text("InstitutionName"),
        "contrast_phase": phase_from_dicom(text("SeriesDescription"), text("ContrastBolusAgent")),
        "age": age_from_dicom(text("PatientAge")),
        "sex": sex if sex in ("M", "F") else None,
    }
    if spacing is not None:
        out["spacing"] = [round(float(s), 4) for s in spacing]
    return {k: v for k, v in out.items() if v is not None}


__all__ = ["case_from_dicom", "phase_from_dicom", "age_from_dicom"]
