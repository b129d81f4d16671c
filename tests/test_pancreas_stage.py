"""The second stage: the box around the pancreas region, the crop's affine, the merge that lets
stage 2 decide only the pancreas region inside its box, and infer's :class:`SecondStage` with
(random) published weights."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from lib.core.labelmap import load_labelmap
from lib.core.settings import load_segmentation_config
from lib.imaging.volume_io import Volume
from lib.model.model_store import publish
from lib.model.pancreas_stage import SecondStage, crop, merge, region_box, region_ids, write_crop_case
from lib.model.segmenter import Segmenter, build_network

LM = load_labelmap()
HEAD, LESION, LIVER = LM.id_of("pancreas_head"), LM.id_of("pancreatic_lesion"), LM.id_of("liver")


def _label() -> np.ndarray:
    label = np.zeros((40, 30, 20), np.uint8)
    label[10:20, 12:16, 5:9] = HEAD
    label[14:16, 13:15, 6:8] = LESION
    label[0:8, 0:10, 0:20] = LIVER
    return label


def test_region_box_covers_the_pancreas_with_its_margin_and_stays_in_the_array() -> None:
    box = region_box(_label(), LM, (2.0, 2.0, 4.0), margin_mm=8.0)
    assert box == (slice(6, 24), slice(8, 20), slice(3, 11))
    assert region_box(_label(), LM, (2.0, 2.0, 4.0), margin_mm=100.0) == (slice(0, 40), slice(0, 30), slice(0, 20))
    assert region_box(np.full((4, 4, 4), LIVER, np.uint8), LM, (1.0, 1.0, 1.0), 5.0) is None


def test_crop_keeps_world_coordinates() -> None:
    affine = np.diag([2.0, 2.0, 4.0, 1.0])
    affine[:3, 3] = (-40.0, 10.0, 100.0)
    vol = Volume(np.arange(40 * 30 * 20, dtype=np.float32).reshape(40, 30, 20), affine)
    box = (slice(6, 24), slice(8, 20), slice(3, 11))
    part = crop(vol, box)
    assert part.array.shape == (18, 12, 8) and part.array[0, 0, 0] == vol.array[6, 8, 3]
    world = lambda a, ijk: (a @ np.array([*ijk, 1.0]))[:3]  # noqa: E731
    assert np.allclose(world(part.affine, (2, 3, 4)), world(vol.affine, (8, 11, 7)))


def test_merge_lets_stage_two_decide_only_the_pancreas_region_in_its_box() -> None:
    first = _label()
    first[14:16, 13:15, 6:8] = HEAD  # stage 1 missed the lesion
    box = (slice(6, 24), slice(8, 20), slice(3, 11))
    second = np.zeros((18, 12, 8), np.uint8)
    second[8:10, 5:7, 3:5] = LESION  # stage 2 finds it
    second[16:18, 10:12, 6:8] = LIVER  # and says liver in a corner where stage 1 saw background
    merged = merge(first, second, box, LM)
    assert (merged[14:16, 13:15, 6:8] == LESION).all()
    assert (merged[22:24, 18:20, 9:11] == 0).all()  # neither stage saw pancreas there: stage 1's answer stands
    assert (merged[10:14, 12:16, 5:9] == 0).all()  # stage 1's head, not pancreas for stage 2: stage 2 decides
    assert (merged[0:8, 0:10, :] == LIVER).all()  # outside the region, the whole-body model decides
    assert (merged[:6] == first[:6]).all() and (merged[24:] == first[24:]).all()


def test_crop_case_is_a_pants_case_with_one_mask_per_present_structure(tmp_path: Path) -> None:
    vol = Volume(np.full((40, 30, 20), 40.0, np.float32), np.diag([2.0, 2.0, 4.0, 1.0]))
    box = region_box(_label(), LM, vol.spacing, 8.0)
    write_crop_case(vol, _label(), LM, box, tmp_path / "ImageTr" / "c" / "ct.nii.gz", tmp_path / "LabelTr" / "c" / "segmentations")
    masks = sorted(p.name for p in (tmp_path / "LabelTr" / "c" / "segmentations").iterdir())
    assert masks == ["liver.nii.gz", "pancreas_head.nii.gz", "pancreatic_lesion.nii.gz"]  # the liver reaches into the box
    img = nib.load(tmp_path / "ImageTr" / "c" / "ct.nii.gz")
    assert img.shape == (18, 12, 8) and np.allclose(img.affine[:3, 3], (12.0, 16.0, 12.0))


def _stage_two(path: Path) -> SecondStage:
    cfg = load_segmentation_config()
    return SecondStage(Segmenter(cfg, LM, cfg.second_stage.preset, path), cfg.second_stage.margin_mm)


def test_second_stage_waits_for_weights_then_decides_only_the_region_in_its_box(tmp_path: Path) -> None:
    cfg = load_segmentation_config()
    weights = tmp_path / "segresnet_pancreas.pt"
    stage = _stage_two(weights)
    assert not stage.ready()  # infer stays stage 1 alone until weights are published
    torch.manual_seed(0)
    meta = {"labels": LM.names, "preset": "pancreas", "preprocessing": cfg.preprocessing.input_map()}
    publish(build_network(cfg, LM.num_classes).state_dict(), meta, weights)
    assert stage.ready()

    rng = np.random.default_rng(0)
    vol = Volume(rng.normal(0, 200, (64, 48, 40)).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    first = np.zeros(vol.array.shape, np.uint8)
    first[:, :, :] = LIVER
    first[30:36, 20:26, 18:22] = HEAD
    out, lat = stage.refine(vol, first)
    assert out.shape == first.shape and out.dtype == np.uint8 and lat["stage2"] >= 0
    box = region_box(first, LM, (2.0, 2.0, 2.0), cfg.second_stage.margin_mm)
    outside = np.ones(first.shape, bool)
    outside[box] = False
    assert np.array_equal(out[outside], first[outside])  # beyond the box: stage 1, voxel for voxel
    region = np.isin(out, region_ids(LM)) | np.isin(first, region_ids(LM))
    assert np.array_equal(out[~region], first[~region])  # in the box, only the pancreas region changes
    assert not np.array_equal(out, first)  # random weights do decide something there

    no_pancreas = np.full(first.shape, LIVER, np.uint8)
    same, _ = stage.refine(vol, no_pancreas)
    assert np.array_equal(same, no_pancreas)
