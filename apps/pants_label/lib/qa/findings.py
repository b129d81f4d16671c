"""The finding type, the label map as the checks see it, and the runner."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from lib.core.labelmap import LabelMap
from lib.core.review_config import QAConfig

SEVERITIES = ("error", "warning")


@dataclass(frozen=True)
class Finding:
    """One failed check: its name, ``error`` or ``warning``, the structure it is about, and a
    message a reader can act on."""

    check: str
    severity: str
    structure: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


class LabelView:
    """A label map with the per-class facts the checks share, each computed once.

    Positions are in patient millimetres: ``left`` grows toward the patient's left, ``posterior``
    toward the back, ``superior`` toward the head, whatever the array's orientation.

    Args:
        label: canonical label map (ids 0..N).
        affine: voxel -> RAS+ world mm (the image's NIfTI affine).
        labelmap: the label map (names <-> ids).
    """

    def __init__(self, label: np.ndarray, affine: np.ndarray, labelmap: LabelMap) -> None:
        self.label = np.asarray(label)
        self.affine = np.asarray(affine, dtype=np.float64)
        self.lm = labelmap
        self.spacing = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        self.voxel_ml = float(np.prod(self.spacing)) / 1000.0
        # one pass over the volume: the bounding box of every id present
        top = max(labelmap.num_classes, int(self.label.max()) if self.label.size else 0)
        self._boxes = ndimage.find_objects(self.label.astype(np.int32, copy=False), max_label=top)
        self._masks: dict[str, np.ndarray] = {}
        self._centroids: dict[str, np.ndarray | None] = {}

    def box(self, name: str) -> tuple[slice, slice, slice] | None:
        i = self.lm.name_to_id[name]
        return self._boxes[i - 1] if i - 1 < len(self._boxes) else None

    def present(self, name: str) -> bool:
        return self.box(name) is not None

    def mask(self, name: str, box: tuple[slice, slice, slice] | None = None) -> np.ndarray:
        """Boolean mask of one class inside ``box`` (default: its own bounding box, cached)."""
        if box is not None:
            return self.label[box] == self.lm.name_to_id[name]
        if name not in self._masks:
            own = self.box(name)
            self._masks[name] = np.zeros((0, 0, 0), bool) if own is None else self.label[own] == self.lm.name_to_id[name]
        return self._masks[name]

    def voxels(self, name: str) -> int:
        return int(self.mask(name).sum())

    def volume_ml(self, name: str) -> float:
        return self.voxels(name) * self.voxel_ml

    def centroid(self, name: str) -> np.ndarray | None:
        """``(left, posterior, superior)`` mm of the class's centre, None when absent."""
        if name not in self._centroids:
            box = self.box(name)
            if box is None:
                self._centroids[name] = None
            else:
                idx = np.argwhere(self.mask(name)).mean(axis=0) + [s.start for s in box]
                ras = self.affine[:3, :3] @ idx + self.affine[:3, 3]
                self._centroids[name] = np.array([-ras[0], -ras[1], ras[2]])
        return self._centroids[name]

    def union_box(self, names: list[str], margin_mm: float = 0.0) -> tuple[slice, slice, slice] | None:
        """The bounding box of several classes, grown by ``margin_mm`` (clipped to the volume)."""
        boxes = [b for b in (self.box(n) for n in names) if b is not None]
        if not boxes:
            return None
        grow = np.ceil(margin_mm / self.spacing).astype(int)
        return tuple(
            slice(max(0, min(b[a].start for b in boxes) - grow[a]), min(self.label.shape[a], max(b[a].stop for b in boxes) + grow[a]))
            for a in range(3)
        )  # type: ignore[return-value]

    def masks_in(self, names: list[str], box: tuple[slice, slice, slice]) -> np.ndarray:
        """Union of several classes inside ``box``."""
        ids = [self.lm.name_to_id[n] for n in names]
        return np.isin(self.label[box], ids)


Check = Callable[[LabelView, QAConfig], list[Finding]]


def _checks() -> list[Check]:
    from lib.qa import laterality, morphology, pancreas

    return [*laterality.CHECKS, *pancreas.CHECKS, *morphology.CHECKS]


def run_checks(label: np.ndarray, affine: np.ndarray, labelmap: LabelMap, cfg: QAConfig) -> list[Finding]:
    """Every check on one label map; errors first, then warnings."""
    view = LabelView(label, affine, labelmap)
    found: list[Finding] = []
    for check in _checks():
        found.extend(check(view, cfg))
    return sorted(found, key=lambda f: SEVERITIES.index(f.severity))


def summary(findings: list[Finding], label: str) -> dict[str, Any]:
    """What image info stores under ``qa``: counts, which checks failed, and each finding."""
    return {
        "label": label,
        "errors": sum(f.severity == "error" for f in findings),
        "warnings": sum(f.severity == "warning" for f in findings),
        "failed": sorted({f.check for f in findings}),
        "findings": [f.as_dict() for f in findings],
    }


def qa_info(label: np.ndarray, affine: np.ndarray, labelmap: LabelMap, cfg: QAConfig, what: str, now: float) -> dict[str, Any]:
    """Image info ``qa`` of one stored label (both datastores write it on every save)."""
    return {**summary(run_checks(label, affine, labelmap, cfg), what), "ts": int(now)}


__all__ = ["Finding", "LabelView", "SEVERITIES", "qa_info", "run_checks", "summary"]
