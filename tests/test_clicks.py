"""Pieces of click-guided correction (lib/model/clicks.py): the window, the merge, the simulated
annotator, the locality of a correction, and the fast label writer its answers use."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from lib.core.click_config import load_click_config
from lib.core.labelmap import load_labelmap
from lib.core.settings import load_segmentation_config
from lib.imaging.volume_io import reorientation, write_label_fast
from lib.model.clicks import (ClickModel, Orienter, keep_clicked_parts, merge_window, simulate_click,
                              window_for)

LM = load_labelmap()
CFG = load_click_config()
SEG = load_segmentation_config()


def test_window_holds_the_clicks_in_multiples_of_8_and_stays_in_the_scan() -> None:
    shape, spacing = (200, 180, 90), (0.8, 0.8, 2.5)
    w = window_for([(5, 100, 45), (30, 110, 50)], shape, spacing, CFG)
    for (lo, hi), p, q in zip(((s.start, s.stop) for s in w.box), (5, 100, 45), (30, 110, 50)):
        assert lo <= min(p, q) and max(p, q) < hi
    assert all(s.start >= 0 and s.stop <= n for s, n in zip(w.box, shape))
    assert all(g % 8 == 0 for g in w.grid)
    # at least window_min network voxels a side (unless the scan is smaller)
    assert w.size[1] * spacing[1] >= CFG.window_min * CFG.spacing_mm - spacing[1]
    # near the edge the window is shifted inside, not cut
    assert w.box[0].start == 0 and w.size[0] == round(CFG.window_min * CFG.spacing_mm / spacing[0])
    # the network grid is the window at spacing_mm, not one multiple of 8 more
    assert w.grid == (CFG.window_min,) * 3


def test_window_of_far_apart_clicks_is_capped_and_centred_on_the_newest() -> None:
    shape, spacing = (500, 500, 300), (1.0, 1.0, 1.0)
    newest = (450, 250, 150)
    w = window_for([(10, 250, 150), newest], shape, spacing, CFG, newest=newest)
    assert np.all(w.size <= CFG.window_max * CFG.spacing_mm + 1)
    assert w.box[0].start <= newest[0] < w.box[0].stop
    assert not w.box[0].start <= 10 < w.box[0].stop


def test_merge_forces_the_clicks_and_gives_lost_voxels_to_the_neighbours() -> None:
    lesion, head, body = LM.id_of("pancreatic_lesion"), LM.id_of("pancreas_head"), LM.id_of("pancreas_body")
    win = np.zeros((20, 20, 20), np.uint8)
    win[:, :10] = head
    win[:, 10:] = body
    win[4:8, 4:8, 4:8] = lesion  # a false lesion inside the head
    mask = np.zeros_like(win, bool)
    mask[12:15, 12:15, 12:15] = True  # the network's answer: a lesion in the body
    out = merge_window(win, lesion, mask, positive=[(16, 16, 16)], negative=[(13, 13, 13)], start=np.zeros(3, int))
    assert out[16, 16, 16] == lesion  # a positive click always gets the class
    assert out[13, 13, 13] == body  # a background click never keeps it
    assert (out[12:15, 12:15, 12:15] == lesion).sum() == 26
    assert np.all(out[4:8, 4:8, 4:8] == head)  # the lost lesion goes back to the head around it
    assert np.all(out[(win != lesion) & ~mask & (out != lesion)] == win[(win != lesion) & ~mask & (out != lesion)])


def test_keep_clicked_parts_drops_blobs_unrelated_to_the_clicks() -> None:
    mask = np.zeros((30, 30, 30), bool)
    mask[2:5, 2:5, 2:5] = True  # holds the click
    mask[10:13, 10:13, 10:13] = True  # overlaps the class as it was
    mask[20:23, 20:23, 20:23] = True  # neither: dropped
    before = np.zeros_like(mask)
    before[11, 11, 11] = True
    kept = keep_clicked_parts(mask, before, [(3, 3, 3)], np.zeros(3, int))
    assert kept[3, 3, 3] and kept[11, 11, 11] and not kept[21:22, 21:22, 21:22].any()
    assert kept.sum() == 54


def test_simulated_annotator_clicks_the_centre_of_the_largest_error() -> None:
    truth = np.zeros((40, 40, 40), bool)
    truth[5:25, 5:25, 5:25] = True
    pred = truth.copy()
    pred[5:15, 5:25, 5:25] = False  # a big miss: 10 x 20 x 20
    pred[30:34, 30:34, 30:34] = True  # a small false blob
    (p, positive) = simulate_click(truth, pred)
    miss = truth & ~pred
    assert positive and miss[p]
    # the deepest voxel of the miss: 5 voxels from its border (its thin side is 10)
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(np.pad(miss, 1))[1:-1, 1:-1, 1:-1]
    assert depth[p] == depth.max() == 5
    fixed = truth.copy()
    fixed[30:34, 30:34, 30:34] = True
    (q, positive) = simulate_click(truth, fixed)
    assert not positive and all(30 <= c < 34 for c in q)
    assert simulate_click(truth, truth) is None
    assert simulate_click(truth, fixed, exclude=fixed & ~truth) is None


def test_orienter_round_trip() -> None:
    affine = np.array([[0, 0, -2.5, 0], [-0.8, 0, 0, 0], [0, 0.8, 0, 0], [0, 0, 0, 1.0]])
    o = Orienter(reorientation(affine, SEG.preprocessing.orientation))
    t = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    assert torch.equal(o.from_canonical(o.to_canonical(t)), t)
    assert o.to_canonical(t).shape != t.shape  # the axes were really permuted


def test_a_correction_changes_nothing_outside_its_window(tmp_path: Path) -> None:
    """Whatever the weights (here untrained), voxels outside the window keep their labels."""
    rng = np.random.default_rng(0)
    shape = (120, 110, 50)
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    image = rng.normal(40, 30, shape).astype(np.float32)
    label = rng.integers(0, 29, shape).astype(np.uint8)
    before = label.copy()
    model = ClickModel(CFG, SEG, LM, tmp_path / "none.pt")
    lesion = LM.id_of("pancreatic_lesion")
    box = model.correct(image, label, affine, lesion, [(60, 55, 25)], [(70, 50, 25)], newest=(60, 55, 25))
    outside = np.ones(shape, bool)
    outside[box] = False
    assert outside.any() and np.array_equal(label[outside], before[outside])
    assert label[60, 55, 25] == lesion and label[70, 50, 25] != lesion
    assert not model.trained


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
def test_fast_label_writer_reads_back_with_the_image_geometry(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(1)
    label = np.asfortranarray(rng.integers(0, 29, (17, 13, 7)).astype(np.uint8))
    affine = np.array([[-0.8, 0, 0, 10.0], [0, -0.8, 0, -20.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])
    path = write_label_fast(label, affine, tmp_path / f"out{suffix}")
    if suffix == ".nrrd":
        import nrrd

        data, header = nrrd.read(str(path))
        np.testing.assert_allclose(np.asarray(header["space directions"]).T, np.diag([-1.0, -1, 1]) @ affine[:3, :3])
        np.testing.assert_allclose(header["space origin"], np.diag([-1.0, -1, 1]) @ affine[:3, 3])
    else:
        img = nib.load(path)
        data = np.asarray(img.dataobj)
        np.testing.assert_allclose(img.affine, affine)
    assert data.dtype == np.uint8
    np.testing.assert_array_equal(data, label)


def test_demo_click_weights_are_small_load_and_say_they_are_phantom_weights() -> None:
    path = Path(__file__).resolve().parents[1] / "apps" / "pants_label" / "demo_model" / "segresnet_clicks.pt"
    assert path.stat().st_size < 10 << 20
    model = ClickModel(CFG, SEG, LM, path)
    model.network()  # loads: the network of configs/clicks.yaml, trained for this label map
    assert model.trained and model.meta["labels"] == LM.names
    assert model.meta["phantom_model"] is True and "phantoms" in model.meta["note"]
    card = (path.parent / "clicks_card.json").read_text()
    assert "train_cpu_s" in card and "command" in card


def test_train_task_score_ranks_the_demo_weights_above_random_ones(tmp_path: Path) -> None:
    """The publish rule of POST /train/deepedit compares scores: on a held-out phantom at physical
    scale the trained demo weights must score above random ones, or the rule could not tell."""
    from lib.imaging.volume_io import Volume
    from lib.model.click_training import prepare_case
    from lib.model.model_store import ModelStore
    from lib.trainers.clicks import PanTSClickTrain
    from pants_tools.phantom import make_case

    p = make_case(1, shape=(200, 200, 120), spacing=(2.0, 2.0, 3.0), seed=200, lesion=True)
    case = prepare_case(Volume(p.ct.astype(np.float32), p.affine), LM.consolidate(p.masks), None, LM, SEG, CFG)
    assert case is not None
    task = PanTSClickTrain(CFG, SEG, LM, ModelStore(tmp_path, "clicks"))
    path = Path(__file__).resolve().parents[1] / "apps" / "pants_label" / "demo_model" / "segresnet_clicks.pt"
    demo = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    trained, random = task.score(demo, [case]), task.score(None, [case])
    assert trained > random + 0.2, (trained, random)
