"""Typed, validated active-learning settings from ``configs/active_learning.yaml``."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, field_validator

from lib.core.config_types import FrozenConfig, NonNegativeWeights
from lib.core.config_errors import load_yaml_model
from lib.core.labelmap import REPO_ROOT, LabelMap, check_class_names

DEFAULT_AL_CONFIG = REPO_ROOT / "configs" / "active_learning.yaml"


class ScoringConfig(FrozenConfig):
    localize_spacing_mm: tuple[float, float, float] | None = (6.0, 6.0, 6.0)
    localize_body_hu: float | None = -500.0
    crop_margin_mm: float = Field(20.0, ge=0)
    max_crop_voxels: tuple[int, int, int] = (48, 48, 40)
    mc_samples: int = Field(2, ge=1, le=64)
    flip_tta: bool = True
    class_weights: NonNegativeWeights = {}
    other_weight: float = Field(0.25, ge=0)
    min_class_voxels: float = Field(2.0, ge=0)
    lesion_topk_voxels: int = Field(8, ge=1)
    score_untrained: bool = False
    threads: int = Field(0, ge=0)
    cost_budget_s: float = Field(10.0, gt=0)
    watch_interval_s: float = Field(10.0, gt=0)

    @field_validator("localize_spacing_mm")
    @classmethod
    def _positive(cls, v: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if v is not None and any(s <= 0 for s in v):
            raise ValueError(f"spacing must be positive, got {v}")
        return v

    @field_validator("max_crop_voxels")
    @classmethod
    def _crop(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        # SegResNet halves the resolution 3 times: each side must divide by 8.
        if any(s < 16 or s % 8 for s in v):
            raise ValueError(f"each side must be a multiple of 8 and >= 16, got {v}")
        return v


    def weight_vector(self, labelmap: LabelMap) -> list[float]:
        """Weight per class id 1..N (index 0 = class 1)."""
        return [self.class_weights.get(n, self.other_weight) for n in labelmap.names]


#: every next-scan strategy lib.activelearning.strategies.make_strategies builds (a test keeps them equal)
StrategyName = Literal["hybrid", "random", "random_fg", "uncertainty", "clasp"]
STRATEGY_NAMES: tuple[str, ...] = get_args(StrategyName)


class StrategyConfig(FrozenConfig):
    # listed first, so 3D Slicer and OHIF offer it by default
    default: StrategyName = "clasp"
    lease_minutes: float = Field(120.0, gt=0)
    fg_fraction: float = Field(0.5, ge=0, le=1)
    fg_pool: int = Field(256, ge=1)
    candidates: int = Field(32, ge=1, le=4096)
    lesion_weight: float = Field(2.0, ge=0)
    uncertainty_weight: float = Field(1.0, ge=0)
    diversity_weight: float = Field(0.5, ge=0)
    balance_weight: float = Field(0.25, ge=0)
    max_reference: int = Field(2000, ge=1)
    # clasp (class-stratified, scheduled power predictive entropy)
    clasp_class_share: float = Field(0.67, ge=0, le=1)
    clasp_class_weights: NonNegativeWeights = {}
    clasp_other_weight: float = Field(1.0, ge=0)
    clasp_noise: float = Field(1.0, ge=0)
    clasp_noise_decay: float = Field(0.7, gt=0, le=1)
    clasp_labels_per_round: int = Field(20, ge=1)



class ActiveLearningConfig(FrozenConfig):
    scoring: ScoringConfig = ScoringConfig()
    strategies: StrategyConfig = StrategyConfig()

    def check_labels(self, labelmap: LabelMap) -> "ActiveLearningConfig":
        check_class_names("active_learning.yaml", {
            "scoring.class_weights": self.scoring.class_weights,
            "strategies.clasp_class_weights": self.strategies.clasp_class_weights,
        }, labelmap)
        return self


@functools.lru_cache(maxsize=8)
def load_al_config(path: str | Path = DEFAULT_AL_CONFIG) -> ActiveLearningConfig:
    return load_yaml_model(Path(path), ActiveLearningConfig)


__all__ = ["STRATEGY_NAMES", "StrategyName", "ActiveLearningConfig", "ScoringConfig", "StrategyConfig", "load_al_config", "DEFAULT_AL_CONFIG"]
