"""Synthetic lesions in training crops (lib/model/lesion_synthesis.py) and their place in the sampler."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import ndimage

from lib.core.config_errors import ConfigError
from lib.core.labelmap import load_labelmap
from lib.core.settings import LesionSynthesisConfig, TrainingConfig, load_segmentation_config
from lib.model.lesion_synthesis import LesionSynthesizer
from lib.model.training import CachedCase, CropSampler

LM = load_labelmap()
HEAD, LIVER, LESION = LM.id_of("pancreas_head"), LM.id_of("liver"), LM.id_of("pancreatic_lesion")
GLAND = (slice(8, 36), slice(10, 30), slice(12, 28))


def _synth(**update: object) -> LesionSynthesizer:
    cfg = LesionSynthesisConfig(**{"probability": 1.0, **update})
    synth = LesionSynthesizer.build(cfg, (2.0, 2.0, 2.0), LM, load_segmentation_config().preprocessing)
    assert synth is not None
    return synth


def _crop(rng: np.random.Generator, gland_hu: float = 100.0) -> tuple[np.ndarray, np.ndarray]:
    """A 44³ crop in network units: liver around a block of pancreatic head, 10 HU noise."""
    s = _synth()
    label = np.full((44, 44, 44), LIVER, np.int64)
    label[GLAND] = HEAD
    hu = np.where(label == HEAD, gland_hu, 60.0) + rng.normal(0, 10, label.shape)
    return np.interp(hu, s.hu, s.units).astype(np.float32), label


def test_a_lesion_is_painted_inside_the_gland_darker_by_the_drawn_contrast() -> None:
    rng = np.random.default_rng(0)
    synth = _synth(contrast_hu=(40.0, 40.0))
    gland_or_rim = np.zeros((44, 44, 44), bool)
    gland_or_rim[tuple(slice(s.start - 1, s.stop + 1) for s in GLAND)] = True
    for _ in range(20):
        image, label = _crop(rng)
        before = image.copy()
        assert synth.paint(rng, image, label)
        lesion = label == LESION
        assert lesion.sum() >= synth.cfg.min_lesion_voxels
        assert not (lesion & ~gland_or_rim).any()  # in the gland, or one voxel past it
        drop = np.interp(before, synth.units, synth.hu) - np.interp(image, synth.units, synth.hu)
        assert 20.0 <= drop[lesion].mean() <= 40.5  # labelled voxels keep at least half the contrast
        far = ~ndimage.binary_dilation(lesion, iterations=4)
        assert not drop[far].any()  # nothing changes away from the lesion
        assert set(np.unique(label)) == {HEAD, LIVER, LESION}


def test_volumes_follow_the_configured_range() -> None:
    rng = np.random.default_rng(1)
    synth = _synth(volume_mm3=(800.0, 800.0), irregularity=0.0)
    sizes = []
    for _ in range(10):
        image, label = _crop(rng)
        synth.paint(rng, image, label)
        sizes.append((label == LESION).sum() * 8.0)  # 2 mm voxels
    assert 500 <= np.median(sizes) <= 1100  # a sphere of 800 mm³, rasterised at 2 mm


def test_crops_with_a_real_lesion_or_without_gland_are_left_alone() -> None:
    rng = np.random.default_rng(2)
    synth = _synth()
    image, label = _crop(rng)
    label[20:24, 20:24, 20:24] = LESION  # a real one: kept as it is
    before = image.copy(), label.copy()
    assert not synth.paint(rng, image, label)
    assert np.array_equal(image, before[0]) and np.array_equal(label, before[1])
    label = np.full((44, 44, 44), LIVER, np.int64)
    assert not synth.paint(rng, image, label)
    assert not (label == LESION).any()


def test_probability_zero_is_no_synthesizer_and_the_sampler_is_unchanged_draw_for_draw() -> None:
    cfg = load_segmentation_config()
    assert LesionSynthesizer.build(LesionSynthesisConfig(), (2.0, 2.0, 2.0), LM, cfg.preprocessing) is None
    image, label = _crop(np.random.default_rng(3))
    label = label.astype(np.uint8)
    centres = {int(c): np.argwhere(label == c).astype(np.int16) for c in np.unique(label)}
    cases = [CachedCase("case0", image.astype(np.float16), label, centres)]

    def batches(synth: LesionSynthesizer | None) -> list:
        sampler = CropSampler(cases, (24, 24, 24), {HEAD: 1.0}, background_weight=0.0, seed=5, synthesizer=synth)
        out = [sampler.sample(2) for _ in range(4)]
        return [*out, sampler.painted]

    *plain, none_painted = batches(None)
    *a, painted_a = batches(_synth())
    *b, painted_b = batches(_synth())
    assert none_painted == 0 and painted_a == painted_b > 0
    for (xa, ya), (xb, yb) in zip(a, b):  # the same seed gives the same crops
        assert np.array_equal(xa.numpy(), xb.numpy()) and np.array_equal(ya.numpy(), yb.numpy())
    assert sum(int((y == LESION).sum()) for _, y in a) > 0
    assert sum(int((y == LESION).sum()) for _, y in plain) == 0


def test_bad_settings_are_refused_naming_the_key() -> None:
    with pytest.raises(ValidationError, match="contrast_hu"):
        TrainingConfig(lesion_synthesis={"probability": 0.5, "contrast_hu": [30, 10]})
    with pytest.raises(ValidationError, match="volume_mm3"):
        TrainingConfig(lesion_synthesis={"volume_mm3": [0, 100]})
    with pytest.raises(ValidationError, match="probability"):
        TrainingConfig(lesion_synthesis={"probability": 2})
    with pytest.raises(ValidationError, match="irregularity"):  # the painting box holds 1.4 radii
        TrainingConfig(lesion_synthesis={"irregularity": 0.5})
    pre = load_segmentation_config().preprocessing
    with pytest.raises(ConfigError, match="host_classes: unknown label name 'pancreaz'"):
        LesionSynthesizer.build(LesionSynthesisConfig(probability=0.5, host_classes=("pancreaz",)), (2, 2, 2), LM, pre)
    with pytest.raises(ConfigError, match="host_classes: pancreatic_lesion cannot host"):
        LesionSynthesizer.build(LesionSynthesisConfig(probability=0.5, host_classes=("pancreatic_lesion",)),
                                (2, 2, 2), LM, pre)
