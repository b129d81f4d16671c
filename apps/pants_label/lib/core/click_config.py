"""Typed, validated settings of click-guided correction from ``configs/clicks.yaml``."""

from __future__ import annotations

import functools
from pathlib import Path

from pydantic import Field, model_validator

from lib.core.config_types import FrozenConfig, NonNegativeWeights
from lib.core.config_errors import load_yaml_model
from lib.core.labelmap import REPO_ROOT, LabelMap, check_class_names

DEFAULT_CLICK_CONFIG = REPO_ROOT / "configs" / "clicks.yaml"
#: the group of every class that ``groups`` does not name
OTHER_GROUP = "other"


class ClickNetwork(FrozenConfig):
    init_filters: int = Field(16, ge=4, le=64)
    blocks_down: tuple[int, ...] = (1, 2, 2)
    blocks_up: tuple[int, ...] = (1, 1)


class ClickTraining(FrozenConfig):
    crop: int = Field(40, ge=16, le=256, multiple_of=8)
    batch_size: int = Field(6, ge=1, le=256)
    learning_rate: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    rounds: int = Field(3, ge=0, le=20)
    class_weights: NonNegativeWeights = {}
    other_weight: float = Field(1.0, ge=0)
    # the server's train task (POST /train/deepedit)
    steps: int = Field(300, ge=1, le=1_000_000)
    max_scans: int = Field(24, ge=2, le=100_000)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    val_samples: int = Field(24, ge=1, le=10_000)
    start_erase: float = Field(0.35, ge=0, le=1)
    start_shrink: float = Field(0.2, ge=0, le=1)
    start_grow: float = Field(0.2, ge=0, le=1)
    start_shift: float = Field(0.15, ge=0, le=1)
    seed: int = 0


class ClickConfig(FrozenConfig):
    spacing_mm: float = Field(2.0, gt=0)
    window_min: int = Field(48, ge=16, multiple_of=8)
    window_margin: int = Field(16, ge=0)
    window_max: int = Field(96, ge=16, multiple_of=8)
    click_sigma: float = Field(1.5, gt=0)
    max_points: int = Field(64, ge=1, le=10_000)
    groups: dict[str, list[str]] = {}
    network: ClickNetwork = ClickNetwork()
    training: ClickTraining = ClickTraining()

    @model_validator(mode="after")
    def _sizes(self) -> "ClickConfig":
        if self.window_max < self.window_min:
            raise ValueError(f"window_max ({self.window_max}) must be at least window_min ({self.window_min})")
        if OTHER_GROUP in self.groups:
            raise ValueError(f"groups: {OTHER_GROUP!r} is implicit (every class not listed)")
        return self

    @property
    def group_names(self) -> list[str]:
        """Input channels of the class group, in order (the implicit ``other`` last)."""
        return [*self.groups, OTHER_GROUP]

    def group_of(self, name: str) -> int:
        for i, members in enumerate(self.groups.values()):
            if name in members:
                return i
        return len(self.groups)

    def check_labels(self, lm: LabelMap) -> "ClickConfig":
        """Every class named in the file exists in the label map (else ConfigError naming it)."""
        check_class_names(str(DEFAULT_CLICK_CONFIG), {
            "groups": [n for members in self.groups.values() for n in members],
            "training.class_weights": self.training.class_weights,
        }, lm)
        return self


@functools.lru_cache(maxsize=4)
def load_click_config(path: str | Path = DEFAULT_CLICK_CONFIG) -> ClickConfig:
    return load_yaml_model(Path(path), ClickConfig)


__all__ = ["ClickConfig", "DEFAULT_CLICK_CONFIG", "OTHER_GROUP", "load_click_config"]
