"""Typed, validated settings: ``configs/presets.yaml`` and the server's ``--conf`` pairs.

Both are parsed here, once, at app start. A bad value raises :class:`ConfigError` naming the
key, which stops ``monailabel start_server`` with that message instead of failing later.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from lib.core.config_types import FrozenConfig, NonNegativeWeights
from lib.core.config_errors import ConfigError, load_yaml_model, validate_model
from lib.core.labelmap import REPO_ROOT

DEFAULT_PRESETS = REPO_ROOT / "configs" / "presets.yaml"

Triple = tuple[float, float, float]
IntTriple = tuple[int, int, int]


class Preprocessing(FrozenConfig):
    orientation: Literal["RPS"] = "RPS"
    hu_min: float = -1000.0
    hu_max: float = 1000.0
    # HU range that gets ``soft_tissue_share`` of the network's input range [-1, 1]; the HU below
    # and above it share the rest in proportion to their width. None: one linear map.
    soft_tissue_hu: tuple[float, float] | None = None
    soft_tissue_share: float = Field(0.7, gt=0, lt=1)
    body_threshold_hu: float | None = -500.0  # infer runs inside the box of voxels above this; None: everywhere
    body_margin_mm: float = Field(12.0, ge=0)  # air kept around that box

    @field_validator("hu_max")
    @classmethod
    def _window(cls, v: float, info) -> float:  # noqa: ANN001 - pydantic ValidationInfo
        lo = info.data.get("hu_min")
        if lo is not None and v <= lo:
            raise ValueError(f"must be greater than hu_min ({lo})")
        return v

    @field_validator("soft_tissue_hu")
    @classmethod
    def _inside(cls, v: tuple[float, float] | None, info) -> tuple[float, float] | None:  # noqa: ANN001
        lo, hi = info.data.get("hu_min"), info.data.get("hu_max")
        if v is not None and lo is not None and hi is not None and not lo < v[0] < v[1] < hi:
            raise ValueError(f"must be two HU values with hu_min ({lo}) < low < high < hu_max ({hi}), got {list(v)}")
        return v

    def input_map(self) -> dict[str, object]:
        """The settings that decide what the network sees (not where infer runs it): weights
        trained under one input map do not fit another."""
        return self.model_dump(mode="json", include={"orientation", "hu_min", "hu_max", "soft_tissue_hu",
                                                    "soft_tissue_share"})

    def hu_knots(self) -> tuple[list[float], list[float]]:
        """The input map as knots: HU values and the network input each becomes (linear between)."""
        if self.soft_tissue_hu is None:
            return [self.hu_min, self.hu_max], [-1.0, 1.0]
        lo, hi = self.soft_tissue_hu
        rest = 2.0 * (1.0 - self.soft_tissue_share)
        below = rest * (lo - self.hu_min) / ((lo - self.hu_min) + (self.hu_max - hi))
        y1 = -1.0 + below
        return [self.hu_min, lo, hi, self.hu_max], [-1.0, y1, y1 + 2.0 * self.soft_tissue_share, 1.0]


class NetworkConfig(FrozenConfig):
    init_filters: int = Field(16, ge=4, le=128)
    blocks_down: tuple[int, ...] = (1, 2, 2, 4)
    blocks_up: tuple[int, ...] = (1, 1, 1)
    dropout_prob: float = Field(0.1, ge=0.0, lt=1.0)


class Preset(FrozenConfig):
    spacing_mm: Triple
    roi_size: IntTriple
    sw_batch_size: int = Field(1, ge=1, le=64)
    overlap: float = Field(0.25, ge=0.0, lt=1.0)

    @field_validator("spacing_mm")
    @classmethod
    def _positive(cls, v: Triple) -> Triple:
        if any(s <= 0 for s in v):
            raise ValueError(f"spacing must be positive, got {v}")
        return v

    @field_validator("roi_size")
    @classmethod
    def _divisible(cls, v: IntTriple) -> IntTriple:
        # SegResNet halves the resolution 3 times: each side must divide by 8.
        if any(s < 16 or s % 8 for s in v):
            raise ValueError(f"each side must be a multiple of 8 and >= 16, got {v}")
        return v


def _check_patch(v: IntTriple) -> IntTriple:
    if any(s < 16 or s % 8 for s in v):
        raise ValueError(f"each side must be a multiple of 8 and >= 16, got {v}")
    return v


class CpuTraining(FrozenConfig):
    """``training.cpu``: what changes where there is no GPU (unset keys keep the main values)."""

    patch_size: IntTriple | None = None
    batch_size: int | None = Field(None, ge=1)
    learning_rate: float | None = Field(None, gt=0)
    max_epochs: int | None = Field(None, ge=1)
    iterations_per_epoch: int | None = Field(None, ge=0)
    channels_last_3d: bool | None = None

    @field_validator("patch_size")
    @classmethod
    def _divisible(cls, v: IntTriple | None) -> IntTriple | None:
        return None if v is None else _check_patch(v)


class AugmentConfig(FrozenConfig):
    """``training.augment``: random in-plane rotation and isotropic scale of training crops
    (lib/model/augment.py); no mirroring, which would swap left and right labels."""

    probability: float = Field(0.0, ge=0.0, le=1.0)  # share of crops augmented; 0 = off
    rotate_deg: float = Field(15.0, ge=0.0, le=45.0)  # about the body's long axis, either way
    scale: float = Field(0.15, ge=0.0, lt=0.5)  # size factor drawn from [1 - scale, 1 + scale]


#: largest boundary wobble of a synthetic lesion, share of its radius; the painting box
#: (lib/model/lesion_synthesis.py) reaches 1 + this many radii, so the wobble is never cut flat
MAX_IRREGULARITY = 0.4


class LesionSynthesisConfig(FrozenConfig):
    """``training.lesion_synthesis``: synthetic lesions painted into training crops of lesion-free
    gland (lib/model/lesion_synthesis.py)."""

    probability: float = Field(0.0, ge=0.0, le=1.0)  # share of lesion-free gland crops painted; 0 = off
    host_classes: tuple[str, ...] = ("pancreas", "pancreas_head", "pancreas_body", "pancreas_tail",
                                     "pancreatic_duct")
    contrast_hu: tuple[float, float] = (5.0, 60.0)  # how much darker than the gland, HU, drawn uniformly
    volume_mm3: tuple[float, float] = (500.0, 30000.0)  # drawn log-uniformly
    irregularity: float = Field(0.25, ge=0.0, le=MAX_IRREGULARITY)  # boundary wobble, share of the radius
    edge_blur_voxels: float = Field(0.7, ge=0.0, le=5.0)  # soft edge of the intensity change
    min_host_voxels: int = Field(50, ge=1)  # a crop with less gland than this is left alone
    min_lesion_voxels: int = Field(8, ge=1)  # a lesion smaller than this (clipped by the gland) is dropped

    @field_validator("contrast_hu", "volume_mm3")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"must be [low, high] with 0 < low <= high, got {list(v)}")
        return v

    @field_validator("host_classes")
    @classmethod
    def _hosts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("name at least one class the lesion may sit in")
        return v


class TrainingConfig(FrozenConfig):
    patch_size: IntTriple = (96, 96, 96)
    batch_size: int = Field(2, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    max_epochs: int = Field(50, ge=1)
    iterations_per_epoch: int = Field(0, ge=0)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0
    crop_class_weights: NonNegativeWeights = {}
    crop_background_weight: float = Field(1.0, ge=0)
    # scan_first: scan, then class in it; class_first: class, then a scan holding it (lib/model/training.py)
    crop_order: Literal["scan_first", "class_first"] = "scan_first"
    # Dice term over every foreground class, or only those in the crop (lib/model/training.py dice_ce_loss)
    dice_over: Literal["all_classes", "present_classes"] = "all_classes"
    # cross-entropy weight per class sqrt(background / class voxels), capped here; 1 = unweighted
    ce_weight_cap: float = Field(30.0, ge=1)
    augment: AugmentConfig = AugmentConfig()
    lesion_synthesis: LesionSynthesisConfig = LesionSynthesisConfig()
    keep_refused_versions: int = Field(10, ge=1)  # newest refused runs kept as versions (lib/model/model_store.py)
    cache_dir_name: str = ".cache/preprocessed"
    channels_last_3d: bool = False  # network and batches in channels-last memory format
    cpu: CpuTraining = CpuTraining()

    @field_validator("patch_size")
    @classmethod
    def _divisible(cls, v: IntTriple) -> IntTriple:
        return _check_patch(v)

    def for_device(self, device: str) -> "TrainingConfig":
        """The recipe for ``"cpu"`` (with the ``cpu`` overrides applied) or ``"cuda"`` (as written)."""
        if device != "cpu":
            return self
        return self.model_copy(update=self.cpu.model_dump(exclude_none=True))


class SecondStage(FrozenConfig):
    """``second_stage``: the pancreas region again at a finer preset (lib/model/pancreas_stage.py)."""

    preset: str = "pancreas"
    margin_mm: float = Field(24.0, ge=0.0, le=100.0)


class CpuPrecision(FrozenConfig):
    """``cpu_bf16``: bfloat16 mixed precision on the CPU (lib/model/precision.py); ``auto`` = where
    the CPU computes bfloat16 natively."""

    infer: Literal["auto", "on", "off"] = "auto"
    train: Literal["auto", "on", "off"] = "auto"


class SegmentationConfig(FrozenConfig):
    """Everything in ``configs/presets.yaml``."""

    preprocessing: Preprocessing = Preprocessing()
    network: NetworkConfig = NetworkConfig()
    presets: dict[str, Preset]
    output_slab_slices: int = Field(16, ge=1, le=512)
    training: TrainingConfig = TrainingConfig()
    second_stage: SecondStage = SecondStage()
    cpu_bf16: CpuPrecision = CpuPrecision()

    @model_validator(mode="after")
    def _second_stage_preset(self) -> "SegmentationConfig":
        if self.second_stage.preset not in self.presets:
            raise ValueError(f"second_stage.preset: unknown preset {self.second_stage.preset!r}; "
                             f"choose one of {sorted(self.presets)}")
        return self

    def preset(self, name: str) -> Preset:
        try:
            return self.presets[name]
        except KeyError:
            raise ConfigError(f"preset: unknown preset {name!r}; choose one of {sorted(self.presets)}") from None


@functools.lru_cache(maxsize=8)
def load_segmentation_config(path: str | Path = DEFAULT_PRESETS) -> SegmentationConfig:
    cfg = load_yaml_model(Path(path), SegmentationConfig)
    for required in ("fast", "full"):
        if required not in cfg.presets:
            raise ConfigError(f"{path}: presets.{required}: missing (the app needs 'fast' and 'full')")
    return cfg


# ---- --conf ----------------------------------------------------------------------------------

#: keys MONAI Label itself reads from ``--conf``; passed through untouched.
_MONAILABEL_KEYS = {"server_mode", "auth_token", "zoo_repo", "zoo_source", "models", "preload"}


def _parse_bool(key: str, value: str) -> bool:
    v = str(value).strip().lower()
    if v in {"true", "1", "yes", "on"}:
        return True
    if v in {"false", "0", "no", "off"}:
        return False
    raise ConfigError(f"--conf {key}: expected true or false, got {value!r}")


class AppSettings(FrozenConfig):
    """The app's ``--conf key value`` settings (see README, "Settings")."""

    preset: Literal["auto", "fast", "full"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    hide_imported_labels: bool = False
    serve_test_split: bool = False
    auto_train_after: int = Field(10, ge=0, description="start training after this many new final labels; 0 = off")
    auto_train_clicks: bool = Field(True, description="an automatic retrain of the segmentation model also retrains the click model (deepedit)")
    train_max_epochs: int | None = Field(None, ge=1, description="epochs per run; default presets.yaml training.max_epochs")
    click_train_steps: int | None = Field(None, ge=1, le=1_000_000, description="steps per run of the click model (deepedit); default clicks.yaml training.steps")
    max_upload_mb: int = Field(1024, ge=1)
    infer_workers: int = Field(1, ge=1, le=16, description="inferences run at once (each on its own thread)")
    infer_queue: int = Field(32, ge=0, le=10000, description="inferences waiting beyond those; more get 503 busy")
    model_dir: str | None = Field(None, description="the model store (versions, cards); default <datastore state folder>/models")
    datastore_dir: str | None = Field(None, description="writable index/labels folder; default <studies>/.pants_label")
    al_config: str | None = Field(None, description="active-learning config file; default configs/active_learning.yaml")
    campaign: Literal["annotate", "review"] = "annotate"
    review_config: str | None = Field(None, description="review-campaign config file; default configs/review.yaml")
    front_secret_file: str | None = Field(None, description="the nginx front's secret (make_proxy.py writes it)")

    @classmethod
    def from_conf(cls, conf: dict[str, str] | None) -> "AppSettings":
        conf = dict(conf or {})
        data: dict[str, object] = {}
        for key, value in conf.items():
            if key in _MONAILABEL_KEYS:
                continue
            field = cls.model_fields.get(key)
            if field is None:
                allowed = sorted(set(cls.model_fields) | _MONAILABEL_KEYS)
                raise ConfigError(f"--conf {key}: unknown setting; known settings: {', '.join(allowed)}")
            data[key] = _parse_bool(key, value) if field.annotation is bool else value
        try:
            return validate_model("--conf", cls, data)
        except ConfigError as err:
            raise ConfigError(str(err).replace("invalid settings in --conf:\n  ", "--conf ")) from None

    def resolved_device(self) -> str:
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--conf device: 'cuda' requested but no CUDA device is available")
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_preset(self) -> str:
        """``auto`` picks ``fast`` on CPU and ``full`` on GPU."""
        if self.preset != "auto":
            return self.preset
        return "full" if self.resolved_device() == "cuda" else "fast"


__all__ = [
    "AppSettings",
    "SegmentationConfig",
    "Preset",
    "TrainingConfig",
    "CpuTraining",
    "load_segmentation_config",
    "DEFAULT_PRESETS",
]
