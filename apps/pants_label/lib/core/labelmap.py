"""The PanTS label map, loaded once from ``configs/labels.yaml`` into a checked object.

Every other module (network channels, task labels, overlap consolidation, DICOM SEG
segments, evaluation, CLI choices) derives its classes from :func:`load_labelmap`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lib.core.config_errors import load_yaml_model

#: repository root (apps/pants_label/lib/core/labelmap.py -> repo)
REPO_ROOT = Path(__file__).resolve().parents[4]
DEFAULT_LABELMAP = REPO_ROOT / "configs" / "labels.yaml"

Group = Literal["pancreas", "vessels", "organs", "bones", "thorax"]


class LabelClass(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int = Field(ge=1, le=255)
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    group: Group
    color: tuple[int, int, int]
    nsd_tolerance_mm: float = Field(gt=0)

    @field_validator("color")
    @classmethod
    def _rgb(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= c <= 255 for c in v):
            raise ValueError(f"colour components must be 0..255, got {v}")
        return v


class Composite(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    members: list[str]
    include_touching: list[str] = []


class LabelMap(BaseModel):
    """Validated label map. ``classes`` are ordered by id, ids run 1..N without gaps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    classes: list[LabelClass]
    overlap_priority: list[str]
    composites: dict[str, Composite] = {}

    @model_validator(mode="after")
    def _check(self) -> "LabelMap":
        ids = [c.id for c in self.classes]
        if ids != list(range(1, len(ids) + 1)):
            raise ValueError(f"classes: ids must run 1..{len(ids)} in order without gaps, got {ids}")
        names = [c.name for c in self.classes]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"classes: duplicate names {dup}")
        if sorted(self.overlap_priority) != sorted(names):
            missing = sorted(set(names) - set(self.overlap_priority))
            extra = sorted(set(self.overlap_priority) - set(names))
            raise ValueError(
                f"overlap_priority: must list every class exactly once (missing {missing}, unknown {extra})"
            )
        for key, comp in self.composites.items():
            unknown = sorted(set(comp.members + comp.include_touching) - set(names))
            if unknown:
                raise ValueError(f"composites.{key}: unknown class names {unknown}")
        return self

    # ---- accessors -------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def num_classes(self) -> int:
        """Foreground classes (28 for PanTS); networks output ``num_classes + 1`` channels."""
        return len(self.classes)

    @functools.cached_property
    def name_to_id(self) -> dict[str, int]:
        return {c.name: c.id for c in self.classes}

    @functools.cached_property
    def id_to_name(self) -> dict[int, str]:
        return {c.id: c.name for c in self.classes}

    def id_of(self, name: str) -> int:
        try:
            return self.name_to_id[name]
        except KeyError:
            raise KeyError(f"unknown label name {name!r}; known: {', '.join(self.names)}") from None

    def ids_in_group(self, group: str) -> list[int]:
        return [c.id for c in self.classes if c.group == group]

    def labels_dict(self) -> dict[str, int]:
        """``{name: id}`` in id order, the form MONAI Label's ``/info`` and clients use."""
        return dict(self.name_to_id)

    def colors(self) -> dict[str, tuple[int, int, int]]:
        return {c.name: c.color for c in self.classes}

    def priority_rank(self) -> np.ndarray:
        """Rank per id (index = id, 0 = background); a lower rank wins a shared voxel."""
        rank = np.full(self.num_classes + 1, np.iinfo(np.int16).max, dtype=np.int16)
        for r, name in enumerate(self.overlap_priority):
            rank[self.name_to_id[name]] = r
        return rank

    # ---- label-map operations --------------------------------------------------------------
    def consolidate(self, masks: dict[str, np.ndarray]) -> np.ndarray:
        """Merge per-structure binary masks into one uint8 label map by ``overlap_priority``.

        Args:
            masks: ``{class name: boolean-like array}``, all of one shape. Missing classes are empty.

        Returns:
            uint8 array where each voxel holds the id of the highest-priority mask covering it.

        Raises:
            KeyError: a mask name that the label map does not know.
            ValueError: masks of different shapes.
        """
        if not masks:
            raise ValueError("consolidate: no masks given")
        shapes = {tuple(m.shape) for m in masks.values()}
        if len(shapes) != 1:
            raise ValueError(f"consolidate: masks differ in shape: {sorted(shapes)}")
        for name in masks:
            self.id_of(name)
        out = np.zeros(next(iter(shapes)), dtype=np.uint8)
        # Paint lowest priority first so that higher priorities overwrite.
        for name in reversed(self.overlap_priority):
            m = masks.get(name)
            if m is not None:
                out[np.asarray(m).astype(bool, copy=False)] = self.name_to_id[name]
        return out

    def composite_mask(self, label: np.ndarray, key: str = "whole_pancreas") -> np.ndarray:
        """Boolean mask of a composite structure (e.g. whole pancreas) recovered from a label map."""
        from scipy import ndimage

        comp = self.composites[key]
        mask = np.isin(label, [self.name_to_id[n] for n in comp.members])
        for name in comp.include_touching:
            extra = label == self.name_to_id[name]
            if not extra.any() or not mask.any():
                continue
            cc, n = ndimage.label(extra)
            touching = ndimage.binary_dilation(mask) & extra
            keep = np.unique(cc[touching])
            keep = keep[keep > 0]
            if keep.size:
                mask |= np.isin(cc, keep)
        return mask


@functools.lru_cache(maxsize=8)
def load_labelmap(path: str | Path = DEFAULT_LABELMAP) -> LabelMap:
    """Load and validate the label map; a bad value raises ``ConfigError`` naming the key."""
    return load_yaml_model(Path(path), LabelMap)


def check_class_names(source: str, used: dict[str, Iterable[str]], labelmap: LabelMap) -> None:
    """Every class a config file names exists in the label map; else a ConfigError naming the
    file, the key and the unknown names (the config loaders stop the server with it)."""
    from lib.core.config_errors import ConfigError

    for key, names in used.items():
        unknown = sorted(set(names) - set(labelmap.names))
        if unknown:
            raise ConfigError(f"{source}: {key}: unknown class names {unknown}; known: {', '.join(labelmap.names)}")


__all__ = ["LabelMap", "LabelClass", "Composite", "check_class_names", "load_labelmap", "DEFAULT_LABELMAP", "REPO_ROOT"]
