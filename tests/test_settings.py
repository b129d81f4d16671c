"""Settings are validated at start and errors name the key."""

from __future__ import annotations

import pytest

from lib.core.config_errors import ConfigError
from lib.core.settings import AppSettings, SegmentationConfig, load_segmentation_config
from lib.core.config_errors import validate_model


def test_presets_file_is_valid_and_has_both_presets() -> None:
    cfg = load_segmentation_config()
    assert {"fast", "full"} <= set(cfg.presets)
    assert cfg.preset("full").spacing_mm[0] <= 1.5 < cfg.preset("fast").spacing_mm[0]


def test_conf_defaults_choose_fast_on_cpu() -> None:
    s = AppSettings.from_conf({})
    assert s.preset == "auto"
    assert s.resolved_preset() == ("full" if s.resolved_device() == "cuda" else "fast")


@pytest.mark.parametrize(
    "conf, key",
    [
        ({"preset": "turbo"}, "preset"),
        ({"hide_imported_labels": "maybe"}, "hide_imported_labels"),
        ({"auto_train_after": "-1"}, "auto_train_after"),
        ({"max_upload_mb": "lots"}, "max_upload_mb"),
        ({"presett": "fast"}, "presett"),
    ],
)
def test_bad_conf_names_the_key(conf, key) -> None:
    with pytest.raises(ConfigError, match=f"--conf {key}"):
        AppSettings.from_conf(conf)


def test_monailabel_own_keys_pass() -> None:
    assert AppSettings.from_conf({"server_mode": "true", "preset": "full"}).preset == "full"


@pytest.mark.parametrize("keys, value, pattern", [
    (("presets", "fast", "roi_size"), [100, 96, 96], r"presets\.fast\.roi_size"),
    (("preprocessing", "hu_max"), -2000, r"preprocessing\.hu_max"),
    (("second_stage", "preset"), "finer", r"second_stage\.preset.*finer"),
    (("second_stage", "margin_mm"), -1, r"second_stage\.margin_mm"),
    (("cpu_bf16", "infer"), "yes", r"cpu_bf16\.infer"),
    (("training", "crop_order"), "lesion_first", r"training\.crop_order"),
    (("training", "crop_class_weights", "pancreatic_lesion"), -4, r"training\.crop_class_weights\.pancreatic_lesion"),
])
def test_bad_preset_values_name_the_key(keys: tuple[str, ...], value: object, pattern: str) -> None:
    data = load_segmentation_config().model_dump()
    node = data
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    with pytest.raises(ConfigError, match=pattern):
        validate_model("presets.yaml", SegmentationConfig, data)
