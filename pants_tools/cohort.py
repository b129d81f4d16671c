"""The PanTS cohort a phantom pool follows: one validated spec, ``configs/cohort_pants.yaml``.

:func:`load_cohort` reads it; :func:`pants_tools.phantom.make_case` and
:func:`~pants_tools.phantom.write_pants_tree` take the result as ``cohort=`` and then draw the
center (noise, calibration, phase mix), the tumour (prevalence) and the tumour's physical
volume from it instead of the demo defaults.

Example:
    >>> c = load_cohort()
    >>> len(c.centers) >= 8, round(c.tumor_prevalence, 3)
    (True, 0.109)
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lib.core.config_errors import load_yaml_model
from lib.core.labelmap import REPO_ROOT
from lib.imaging.metadata import PHASES

DEFAULT_COHORT = REPO_ROOT / "configs" / "cohort_pants.yaml"
#: standard normal quantile of the third quartile: the IQR spans +- this many s.d.
_Z_Q3 = 0.6744897501960817
#: how far the share-weighted center phase mix may stray from the cohort's (absolute share)
PHASE_TOLERANCE = 0.015


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TumorVolume(_Frozen):
    """Median and quartiles in mm3; draws follow a two-piece log-normal through all three."""

    median: float = Field(gt=0)
    q1: float = Field(gt=0)
    q3: float = Field(gt=0)
    min_mm3: float = Field(100.0, gt=0)
    max_mm3: float = Field(150_000.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> TumorVolume:
        if not self.min_mm3 < self.q1 < self.median < self.q3 < self.max_mm3:
            raise ValueError("need min_mm3 < q1 < median < q3 < max_mm3")
        return self

    @property
    def sigmas(self) -> tuple[float, float]:
        """Log-scale s.d. below and above the median."""
        return math.log(self.median / self.q1) / _Z_Q3, math.log(self.q3 / self.median) / _Z_Q3

    def draw(self, rng: np.random.Generator, size: int | None = None) -> float | np.ndarray:
        z = rng.standard_normal(size)
        lo, hi = self.sigmas
        v = np.clip(self.median * np.exp(np.where(z < 0, z * lo, z * hi)), self.min_mm3, self.max_mm3)
        return float(v) if size is None else v


class Geometry(_Frozen):
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(n < 8 for n in v):
            raise ValueError(f"each side must be >= 8, got {v}")
        return v

    @field_validator("spacing_mm")
    @classmethod
    def _spacing(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s <= 0 for s in v):
            raise ValueError(f"spacing must be positive, got {v}")
        return v


class CohortCenter(_Frozen):
    name: str = Field(min_length=1)
    share: float = Field(gt=0)
    noise_hu: float = Field(ge=0)
    scale: float = Field(1.0, gt=0)
    offset_hu: float = 0.0
    phases: tuple[float, float, float, float]  # non-contrast, arterial, venous, delayed

    @field_validator("phases")
    @classmethod
    def _phases(cls, v: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        if min(v) < 0 or abs(sum(v) - 1) > 1e-6:
            raise ValueError(f"phases must be 4 non-negative shares summing to 1 ({', '.join(PHASES)}), got {v}")
        return v


class Cohort(_Frozen):
    phases: dict[str, float]
    tumor_prevalence: float = Field(gt=0, lt=1)
    tumor_volume_mm3: TumorVolume
    geometry: Geometry
    centers: tuple[CohortCenter, ...] = Field(min_length=8)

    @field_validator("phases")
    @classmethod
    def _phase_names(cls, v: dict[str, float]) -> dict[str, float]:
        if set(v) != set(PHASES):
            raise ValueError(f"phases must name exactly {list(PHASES)}, got {sorted(v)}")
        if min(v.values()) < 0 or abs(sum(v.values()) - 1) > 1e-3:
            raise ValueError(f"phase shares must be >= 0 and sum to 1, got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Cohort:
        names = [c.name for c in self.centers]
        if len(set(names)) != len(names):
            raise ValueError(f"center names must be unique, got {names}")
        if abs(sum(self.shares) - 1) > 1e-3:
            raise ValueError(f"center shares must sum to 1, got {sum(self.shares):.4f}")
        if max(self.shares) < 3 * min(self.shares):
            raise ValueError("centers must be of unequal size: the largest share >= 3x the smallest")
        mix = self.center_phase_mix()
        off = {p: round(mix[p] - self.phases[p], 4) for p in PHASES if abs(mix[p] - self.phases[p]) > PHASE_TOLERANCE}
        if off:
            raise ValueError(f"share-weighted center phase mix strays from `phases` by more than "
                             f"{PHASE_TOLERANCE}: {off}")
        return self

    @property
    def shares(self) -> list[float]:
        return [c.share for c in self.centers]

    def center_phase_mix(self) -> dict[str, float]:
        """The pool's expected phase shares given the centers."""
        w = np.array(self.shares) / sum(self.shares)
        mix = w @ np.array([c.phases for c in self.centers])
        return {p: float(m) for p, m in zip(PHASES, mix)}

    def phantom_centers(self) -> tuple:
        """The centers as :class:`pants_tools.phantom.Center` (weights = shares)."""
        from pants_tools.phantom import Center

        return tuple(Center(c.name, noise_hu=c.noise_hu, scale=c.scale, offset_hu=c.offset_hu, phases=c.phases,
                            weight=c.share) for c in self.centers)


@functools.lru_cache(maxsize=4)
def load_cohort(path: str | Path = DEFAULT_COHORT) -> Cohort:
    """The cohort spec at ``path``; raises ``ConfigError`` naming the bad key."""
    return load_yaml_model(Path(path), Cohort)


__all__ = ["Cohort", "CohortCenter", "DEFAULT_COHORT", "Geometry", "TumorVolume", "load_cohort"]
