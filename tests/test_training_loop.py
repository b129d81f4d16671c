"""Pieces of the training loop: the background crop sampler and the one-hot-free Dice+CE loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss, DiceLoss

from lib.core.settings import CpuTraining, TrainingConfig
from lib.model.training import CachedCase, CropSampler, PrefetchSampler, ce_class_weights, crop, dice_ce_loss

PATCH = (16, 24, 16)


def _cases(n: int = 3, seed: int = 0) -> list[CachedCase]:
    rng = np.random.default_rng(seed)
    cases = []
    for k in range(n):
        shape = (20 + 3 * k, 30, 18)
        image = rng.uniform(-1, 1, shape).astype(np.float16)
        label = np.zeros(shape, dtype=np.uint8)
        label[5:12, 8:20, 4:10] = 1 + k
        label[9:10, 10:12, 5:7] = 27  # a tiny lesion-like class
        centres = {int(c): np.argwhere(label == c).astype(np.int16) for c in np.unique(label)}
        cases.append(CachedCase(f"case{k}", image, label, centres))
    return cases


def _sampler(seed: int) -> CropSampler:
    return CropSampler(_cases(), PATCH, {27: 4.0}, background_weight=1.0, seed=seed)


def test_prefetched_batches_equal_serial_sampling_for_a_seed() -> None:
    serial = _sampler(7)
    expected = [serial.sample(2) for _ in range(5)]
    with PrefetchSampler(_sampler(7), 2, depth=2) as pre:
        got = [pre.next() for _ in range(5)]
    for (xe, ye), (xg, yg) in zip(expected, got):
        assert xg.shape == (2, 1, *PATCH) and xg.dtype == torch.float32
        assert yg.shape == (2, 1, *PATCH) and yg.dtype == torch.int64
        torch.testing.assert_close(xg, xe, rtol=0, atol=0)
        torch.testing.assert_close(yg, ye, rtol=0, atol=0)
    with PrefetchSampler(_sampler(8), 2) as other:  # another seed, other crops
        assert not torch.equal(other.next()[0], expected[0][0])


def test_batches_hold_the_volume_crop_with_jitter_and_padding() -> None:
    cases = _cases(1)
    sampler = CropSampler(cases, (32, 32, 32), {}, background_weight=1.0, seed=3)
    x, y = sampler.sample(1)
    # The patch is bigger than the volume: every label voxel is inside, the rest is background.
    assert int((y > 0).sum()) == int((cases[0].label > 0).sum())
    # Image voxels are an affine function (the jitter) of the cropped volume.
    img, lab = crop(cases[0].image, cases[0].label, np.array([10, 10, 10]), (8, 8, 8))
    assert img.dtype == np.float32 and lab.dtype == np.uint8 and img.shape == (8, 8, 8)
    np.testing.assert_array_equal(img, cases[0].image[6:14, 6:14, 6:14].astype(np.float32))


def test_a_failing_crop_is_raised_in_the_training_loop() -> None:
    sampler = _sampler(0)
    sampler.cases = []  # nothing to draw from: the producer fails
    with PrefetchSampler(sampler, 1) as pre, pytest.raises(RuntimeError, match="training batch"):
        pre.next()


@pytest.mark.parametrize("channels_last", [False, True])
def test_dice_ce_loss_equals_monai_dicece(channels_last: bool) -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 8, 10, 12, dtype=torch.float64)
    target = torch.randint(0, 6, (2, 1, 8, 10, 12))
    target[1][target[1] == 4] = 0  # a class absent from one item
    if channels_last:
        logits = logits.contiguous(memory_format=torch.channels_last_3d)
    ref_in = logits.detach().clone().requires_grad_()
    got_in = logits.detach().clone().requires_grad_()
    ref = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)(ref_in, target)
    got = dice_ce_loss(got_in, target)
    ref.backward()
    got.backward()
    torch.testing.assert_close(got, ref.to(got.dtype), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_in.grad, ref_in.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("channels_last", [False, True])
def test_class_weighted_ce_is_torch_weighted_cross_entropy(channels_last: bool) -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 6, 7, 8, dtype=torch.float64)
    target = torch.randint(0, 5, (2, 1, 6, 7, 8))
    weight = torch.tensor([1.0, 2.0, 30.0, 1.5, 4.0], dtype=torch.float64)
    if channels_last:
        logits = logits.contiguous(memory_format=torch.channels_last_3d)
    dice_only = dice_ce_loss(logits, target) - torch.nn.functional.cross_entropy(logits, target[:, 0])
    want = dice_only + torch.nn.functional.cross_entropy(logits, target[:, 0], weight=weight)
    torch.testing.assert_close(dice_ce_loss(logits, target, ce_weight=weight), want)
    ones = torch.ones(5, dtype=torch.float64)
    torch.testing.assert_close(dice_ce_loss(logits, target, ce_weight=ones), dice_ce_loss(logits, target))


@pytest.mark.parametrize("channels_last", [False, True])
def test_dice_over_present_classes_skips_classes_absent_from_an_item(channels_last: bool) -> None:
    torch.manual_seed(2)
    logits = torch.randn(2, 6, 8, 10, 12, dtype=torch.float64)
    target = torch.randint(0, 6, (2, 1, 8, 10, 12))
    target[1][(target[1] == 4) | (target[1] == 5)] = 0  # classes 4 and 5 absent from item 1
    if channels_last:
        logits = logits.contiguous(memory_format=torch.channels_last_3d)
    per_class = DiceLoss(to_onehot_y=True, softmax=True, include_background=False, reduction="none")(logits, target)
    per_class = per_class.reshape(2, 5)
    present = torch.tensor([[True] * 5, [True, True, True, False, False]])
    ce = torch.nn.functional.cross_entropy(logits, target[:, 0])
    want = per_class[present].mean() + ce
    torch.testing.assert_close(dice_ce_loss(logits, target, dice_over="present_classes"), want)
    # the stock loss scores the absent pairs too (best when they are predicted nowhere)
    torch.testing.assert_close(dice_ce_loss(logits, target), per_class.mean() + ce)
    with_items_full = torch.randint(1, 6, (2, 1, 8, 10, 12))  # every class in every item: no difference
    with_items_full[:, :, 0, 0, :5] = torch.arange(1, 6)[None, None, :]
    torch.testing.assert_close(dice_ce_loss(logits, with_items_full, dice_over="present_classes"),
                               dice_ce_loss(logits, with_items_full))


def test_ce_class_weights_favour_rare_classes() -> None:
    label = np.zeros((10, 10, 10), np.uint8)
    label[:2] = 1  # 200 voxels
    label[5, 5, :2] = 2  # 2 voxels
    case = CachedCase("c", np.zeros(label.shape, np.float16), label, {})
    w = ce_class_weights([case], 4, cap=20.0).numpy()  # counts (+1): 799, 201, 3, 1
    assert w[0] == 1.0 and w[1] == pytest.approx(np.sqrt(799 / 201)) and w[2] == pytest.approx(np.sqrt(799 / 3))
    assert w[3] == 20.0  # absent everywhere: the cap
    assert ce_class_weights([case], 4, cap=1.0).eq(1.0).all()


def test_cpu_overrides_apply_on_cpu_only() -> None:
    t = TrainingConfig(learning_rate=2e-4, cpu=CpuTraining(learning_rate=3e-3, patch_size=(64, 64, 64)))
    assert t.for_device("cpu").learning_rate == 3e-3 and t.for_device("cpu").patch_size == (64, 64, 64)
    assert t.for_device("cpu").batch_size == t.batch_size  # unset keys keep the main value
    assert t.for_device("cuda").learning_rate == 2e-4
    with pytest.raises(ValueError, match="multiple of 8"):
        CpuTraining(patch_size=(60, 64, 64))


def _rare_lesion_cases(n: int = 10) -> list[CachedCase]:
    """n scans with one organ (class 1); only the first holds a lesion (class 27)."""
    cases = []
    for k in range(n):
        label = np.zeros((20, 20, 20), dtype=np.uint8)
        label[2:18, 2:18, 2:18] = 1
        if k == 0:
            label[9:11, 9:11, 9:11] = 27
        centres = {int(c): np.argwhere(label == c).astype(np.int16) for c in np.unique(label)}
        cases.append(CachedCase(f"case{k}", np.zeros(label.shape, np.float16), label, centres))
    return cases


@pytest.mark.parametrize("order, lo, hi", [("scan_first", 0.0, 0.12), ("class_first", 0.35, 0.45)])
def test_crop_order_sets_how_often_a_rare_class_is_centred(order: str, lo: float, hi: float) -> None:
    # Weights organ 1, lesion 1, background 0.5. scan_first: the lesion scan is drawn 1 time in 10
    # and then its lesion 1 time in 2.5 (4%); class_first: the lesion 1 time in 2.5 (40%).
    sampler = CropSampler(_rare_lesion_cases(), (2, 2, 2), {27: 1.0}, background_weight=0.5, seed=0, order=order)
    hits = 0
    for _ in range(2000):
        case, centre = sampler._draw()
        hits += int(case.label[tuple(centre)] == 27)
    assert lo <= hits / 2000 <= hi


def test_an_unknown_crop_order_is_refused() -> None:
    with pytest.raises(ValueError, match="crop order 'lesion_first'"):
        CropSampler(_rare_lesion_cases(2), (2, 2, 2), {}, background_weight=1.0, order="lesion_first")
