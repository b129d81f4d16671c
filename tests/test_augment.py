"""Spatial augmentation of training crops (lib/model/augment.py) and its place in the crop sampler."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from lib.core.settings import AugmentConfig, TrainingConfig
from lib.model.augment import random_transform, transformed_crop
from lib.model.training import CachedCase, CropSampler, crop


def _volume() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(40, 36, 30)).astype(np.float16)  # the cache stores float16
    label = np.zeros(image.shape, np.uint8)
    label[20:30, 16:20, 10:20] = 3  # a bar along the first axis, off centre
    return image, label


def _out(patch: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    return np.empty(patch, np.float32), np.empty(patch, np.int64)


@pytest.mark.parametrize("centre", [(20, 18, 15), (1, 2, 0), (39, 35, 29)])
def test_the_identity_transform_is_the_plain_crop_padding_included(centre: tuple[int, int, int]) -> None:
    image, label = _volume()
    patch = (16, 20, 12)
    plain = crop(image, label, np.array(centre), patch)
    got = _out(patch)
    transformed_crop(image, label, np.array(centre), patch, np.eye(3), got)
    np.testing.assert_array_equal(got[0], plain[0])
    np.testing.assert_array_equal(got[1], plain[1])


def test_a_quarter_turn_turns_the_axial_plane_and_keeps_the_long_axis() -> None:
    image, label = _volume()
    turn = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    got = _out((40, 40, 30))
    transformed_crop(image, label, np.array([20, 18, 15]), (40, 40, 30), turn, got)
    bar = np.argwhere(got[1] == 3)
    extent = bar.max(axis=0) - bar.min(axis=0) + 1
    assert (got[1] == 3).sum() == (label == 3).sum()  # a quarter turn loses no voxel
    assert tuple(extent) == (4, 10, 10)  # the bar's 10 x 4 in-plane footprint is now 4 x 10


def test_a_larger_source_region_makes_anatomy_smaller() -> None:
    image, label = _volume()
    got = _out((24, 24, 24))
    transformed_crop(image, label, np.array([25, 18, 15]), (24, 24, 24), 2.0 * np.eye(3), got)
    assert (got[1] == 3).sum() == pytest.approx((label == 3).sum() / 8, rel=0.3)
    assert set(np.unique(got[1])) <= {0, 3}  # nearest neighbour: no blended label ids


def test_random_transforms_follow_the_config() -> None:
    rng = np.random.default_rng(1)
    assert random_transform(rng, AugmentConfig(probability=0.0)) is None
    mats = [random_transform(rng, AugmentConfig(probability=1.0, rotate_deg=20, scale=0.1)) for _ in range(200)]
    scales = [float(np.cbrt(np.linalg.det(m))) for m in mats]
    angles = [float(np.degrees(np.arctan2(m[1, 0], m[0, 0]))) for m in mats]
    assert 0.9 <= min(scales) and max(scales) <= 1.1 and np.std(scales) > 0.03
    assert -20 <= min(angles) and max(angles) <= 20 and np.std(angles) > 5
    assert all(m[2, 2] == pytest.approx(s) and m[2, 0] == m[2, 1] == 0 for m, s in zip(mats, scales))
    half = [random_transform(rng, AugmentConfig(probability=0.5)) is None for _ in range(400)]
    assert 0.4 < np.mean(half) < 0.6


def test_out_of_range_augment_values_are_refused_naming_the_key() -> None:
    with pytest.raises(ValidationError, match="rotate_deg"):
        TrainingConfig(augment={"probability": 0.5, "rotate_deg": 90})
    with pytest.raises(ValidationError, match="probability"):
        TrainingConfig(augment={"probability": 1.5})


def test_the_sampler_augments_crops_and_stays_reproducible_for_a_seed() -> None:
    image, label = _volume()
    centres = {int(c): np.argwhere(label == c).astype(np.int16) for c in np.unique(label)}
    cases = [CachedCase("case0", image, label, centres)]
    aug = AugmentConfig(probability=1.0, rotate_deg=30, scale=0.2)

    def batches(augment: AugmentConfig | None) -> list:
        sampler = CropSampler(cases, (24, 24, 24), {3: 4.0}, background_weight=0.0, seed=5, augment=augment)
        return [sampler.sample(2) for _ in range(3)]

    a, b, plain = batches(aug), batches(aug), batches(None)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert np.array_equal(xa.numpy(), xb.numpy()) and np.array_equal(ya.numpy(), yb.numpy())
    assert not all(np.array_equal(ya.numpy(), yp.numpy()) for (_, ya), (_, yp) in zip(a, plain))
    assert all(int((y == 3).sum()) > 0 for _, y in a)  # centred on the bar: it stays in the crop
    # probability 0 is the plain sampler, draw for draw
    for (xo, yo), (xp, yp) in zip(batches(AugmentConfig(probability=0.0)), plain):
        assert np.array_equal(xo.numpy(), xp.numpy()) and np.array_equal(yo.numpy(), yp.numpy())
