"""Typed, validated review-campaign settings from ``configs/review.yaml``."""

from __future__ import annotations

import functools
from pathlib import Path

from pydantic import Field, field_validator

from lib.core.config_types import FrozenConfig, PositiveCounts
from lib.core.config_errors import load_yaml_model
from lib.core.labelmap import REPO_ROOT, LabelMap, check_class_names

DEFAULT_REVIEW_CONFIG = REPO_ROOT / "configs" / "review.yaml"


class DoubleReading(FrozenConfig):
    tumour_positive: bool = True
    other_fraction: float = Field(0.05, ge=0, le=1)


class Agreement(FrozenConfig):
    flag_classes: tuple[str, ...] = ("pancreatic_lesion",)
    flag_below_dsc: float = Field(0.20, ge=0, le=1)


class QAConfig(FrozenConfig):
    run_on_import: bool = True
    lesion_max_gap_mm: float = Field(5.0, ge=0)
    duct_inside_min: float = Field(0.9, ge=0, le=1)
    min_piece_ml: float = Field(0.5, ge=0)
    max_pieces: PositiveCounts = {}
    volume_ml: dict[str, tuple[float, float]] = {}
    required: tuple[str, ...] = ()


    @field_validator("volume_ml")
    @classmethod
    def _ranges(cls, v: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        bad = {k: r for k, r in v.items() if not 0 <= r[0] < r[1]}
        if bad:
            raise ValueError(f"each range must be [min, max] with 0 <= min < max, got {bad}")
        return v


class ReviewConfig(FrozenConfig):
    double_reading: DoubleReading = DoubleReading()
    agreement: Agreement = Agreement()
    qa: QAConfig = QAConfig()

    def check_labels(self, labelmap: LabelMap, source: str = "review.yaml") -> "ReviewConfig":
        """Every class name used here must be in the label map."""
        used = {
            "agreement.flag_classes": set(self.agreement.flag_classes),
            "qa.max_pieces": set(self.qa.max_pieces),
            "qa.volume_ml": set(self.qa.volume_ml),
            "qa.required": set(self.qa.required),
        }
        check_class_names(source, used, labelmap)
        return self


@functools.lru_cache(maxsize=8)
def load_review_config(path: str | Path = DEFAULT_REVIEW_CONFIG) -> ReviewConfig:
    return load_yaml_model(Path(path), ReviewConfig)


__all__ = ["ReviewConfig", "QAConfig", "DEFAULT_REVIEW_CONFIG", "load_review_config"]
