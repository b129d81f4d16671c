"""The segmentation pipeline's pieces: exact slab-wise upsampling, orientation round trip, outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lib.core.labelmap import load_labelmap
from lib.model.segmenter import Segmenter, normalize_hu, target_shape, upsample_argmax
from lib.core.settings import load_segmentation_config
from lib.model.training import crop, effective_patch, split_train_val
from lib.imaging.volume_io import Volume, canonical_spacing, load_volume, reorientation, write_label
from server import APP_DIR

CFG = load_segmentation_config()
LM = load_labelmap()


def _assert_argmax_of(ref: torch.Tensor, got: np.ndarray) -> None:
    """``got`` is the argmax of ``ref`` (1, C, ...) except at float32 near-ties of the top two."""
    top2 = ref[0].topk(2, dim=0).values
    tie = (top2[0] - top2[1] < 1e-5).numpy()
    want = ref.argmax(1)[0].numpy()
    assert got.dtype == np.uint8 and got.shape == want.shape
    np.testing.assert_array_equal(got[~tie], want[~tie])
    assert tie.mean() < 1e-3


@pytest.mark.parametrize(
    "low, out, slab",
    [((7, 9, 6), (23, 30, 17), 4), ((5, 5, 5), (5, 5, 5), 2), ((4, 6, 3), (31, 13, 11), 16), ((3, 3, 3), (40, 8, 9), 7),
     ((9, 8, 7), (4, 30, 3), 3), ((1, 6, 2), (5, 6, 9), 2)],
)
def test_slabwise_upsample_argmax_equals_full_trilinear(low, out, slab) -> None:
    torch.manual_seed(sum(low))
    logits = torch.randn(1, 5, *low)
    ref = F.interpolate(logits.double(), size=out, mode="trilinear", align_corners=False)
    _assert_argmax_of(ref, upsample_argmax(logits, out, slab=slab))


def test_uniform_cells_skip_interpolation_exactly() -> None:
    """Smooth logits (large regions of one class) take the shortcut; the answer is unchanged."""
    torch.manual_seed(1)
    logits = F.interpolate(torch.randn(1, 6, 3, 3, 3), size=(12, 10, 11), mode="trilinear") * 5
    ref = F.interpolate(logits.double(), size=(50, 41, 37), mode="trilinear", align_corners=False)
    _assert_argmax_of(ref, upsample_argmax(logits, (50, 41, 37), slab=5))


def test_hu_window_maps_to_unit_range() -> None:
    p = CFG.preprocessing
    lo, hi = p.soft_tissue_hu
    x = normalize_hu(np.array([-3000.0, -1000.0, lo, (lo + hi) / 2, hi, 1000.0, 3000.0]), CFG).numpy()
    assert x[0] == x[1] == -1 and x[-1] == x[-2] == 1
    # the soft-tissue window spans its share of [-1, 1], linearly
    np.testing.assert_allclose(x[4] - x[2], 2 * p.soft_tissue_share, rtol=1e-6)
    np.testing.assert_allclose(x[3], (x[2] + x[4]) / 2, atol=1e-6)
    hu = np.linspace(-1200, 1200, 2401)
    assert np.all(np.diff(normalize_hu(hu, CFG).numpy()) >= 0), "the map must be monotonic"
    linear = CFG.model_copy(update={"preprocessing": p.model_copy(update={"soft_tissue_hu": None})})
    np.testing.assert_allclose(normalize_hu(np.array([-3000.0, -1000.0, 0.0, 1000.0]), linear).numpy(),
                               [-1, -1, 0, 1])


def test_target_shape_follows_spacing() -> None:
    assert target_shape((512, 512, 300), (0.8, 0.8, 1.25), (3.0, 3.0, 3.0)) == (137, 137, 125)


@pytest.mark.parametrize("affine", [np.diag([-0.8, -0.8, 1.25, 1]), np.diag([0.8, 0.8, 1.25, 1]),
                                    np.array([[0, 0, 2.0, 0], [-0.7, 0, 0, 0], [0, 0.9, 0, 0], [0, 0, 0, 1]])])
def test_reorientation_round_trip(affine) -> None:
    arr = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    ro = reorientation(affine, "RPS")
    can = ro.to_canonical(arr)
    np.testing.assert_array_equal(ro.from_canonical(can), arr)
    spacing = sorted(np.sqrt((affine[:3, :3] ** 2).sum(0)))
    assert sorted(canonical_spacing(affine, "RPS")) == pytest.approx(spacing)


def test_segment_keeps_shape_and_orientation_of_any_input(tmp_path) -> None:
    seg = Segmenter(CFG, LM, "fast", tmp_path / "none.pt")
    rng = np.random.default_rng(0)
    affine = np.array([[0, 0, 3.0, 5], [-2.5, 0, 0, 7], [0, 2.5, 0, -9], [0, 0, 0, 1]])
    vol = Volume(rng.normal(0, 200, (20, 18, 14)).astype(np.float32), affine)
    label, lat = seg.segment(vol)
    assert label.shape == (20, 18, 14) and label.dtype == np.uint8 and label.max() <= 28
    assert set(lat) == {"pre", "infer", "post"}
    assert seg.info.trained is False
    # Flipping the stored array (and its affine to match) must flip the result the same way.
    flipped_aff = affine.copy()
    flipped_aff[:3, 0] *= -1
    flipped_aff[:3, 3] = affine[:3, 3] + affine[:3, 0] * 19
    label2, _ = seg.segment(Volume(vol.array[::-1].copy(), flipped_aff))
    np.testing.assert_array_equal(label2[::-1], label)


def test_label_written_as_nifti_and_nrrd_with_the_same_geometry(tmp_path) -> None:
    import nrrd

    affine = np.array([[-0.8, 0, 0, 10], [0, -0.8, 0, 20], [0, 0, 1.25, -30], [0, 0, 0, 1]])
    label = np.random.default_rng(1).integers(0, 29, (6, 7, 8)).astype(np.uint8)
    write_label(label, affine, tmp_path / "a.nii.gz")
    write_label(label, affine, tmp_path / "a.nrrd")
    back = load_volume(tmp_path / "a.nii.gz", np.uint8)
    np.testing.assert_array_equal(back.array, label)
    np.testing.assert_allclose(back.affine, affine)
    data, header = nrrd.read(str(tmp_path / "a.nrrd"))
    np.testing.assert_array_equal(data, label)
    via_sitk = load_volume(tmp_path / "a.nrrd", np.uint8)  # SimpleITK reads NRRD as Slicer does
    np.testing.assert_array_equal(via_sitk.array, label)
    np.testing.assert_allclose(via_sitk.affine, affine, atol=1e-6)
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_unreadable_image_is_a_clear_error(tmp_path) -> None:
    bad = tmp_path / "x.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="x.nii.gz"):
        load_volume(bad)


def test_model_for_another_label_map_is_refused(tmp_path) -> None:
    from lib.model.model_store import publish
    from lib.model.segmenter import build_network

    net = build_network(CFG, LM.num_classes)
    publish(net.state_dict(), {"labels": ["a"] * 28}, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="trained for labels"):
        Segmenter(CFG, LM, "fast", tmp_path / "m.pt").network()


def test_model_for_another_input_map_is_refused(tmp_path) -> None:
    from lib.model.model_store import publish
    from lib.model.segmenter import build_network

    net = build_network(CFG, LM.num_classes)
    linear = CFG.preprocessing.model_copy(update={"soft_tissue_hu": None}).input_map()
    publish(net.state_dict(), {"labels": LM.names, "preprocessing": linear}, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="trained with preprocessing"):
        Segmenter(CFG, LM, "fast", tmp_path / "m.pt").network()
    same = {**CFG.preprocessing.model_dump(mode="json"), "body_threshold_hu": None}  # where infer runs: no matter
    publish(net.state_dict(), {"labels": LM.names, "preprocessing": same}, tmp_path / "m.pt")
    assert Segmenter(CFG, LM, "fast", tmp_path / "m.pt").network() is not None


def test_validation_split_is_stable_and_stratified() -> None:
    ids = [f"c{i:03d}" for i in range(40)]
    centers = {i: ("A" if n < 30 else "B") for n, i in enumerate(ids)}
    train, val = split_train_val(ids, centers, 0.2, seed=0)
    assert set(train) | set(val) == set(ids) and not set(train) & set(val)
    assert {centers[v] for v in val} == {"A", "B"}
    # More labels arriving never move an existing scan between the sets.
    more = ids + [f"d{i:03d}" for i in range(20)]
    centers.update({i: "A" for i in more[40:]})
    train2, val2 = split_train_val(more, centers, 0.2, seed=0)
    assert set(val) <= set(val2) and set(train) <= set(train2)
    assert split_train_val(["only"], {}, 0.2, 0) == (["only"], [])


def test_crop_pads_outside_the_volume() -> None:
    img = np.ones((10, 10, 10), np.float16)
    lab = np.full((10, 10, 10), 3, np.uint8)
    i, l = crop(img, lab, np.array([0, 5, 9]), (8, 8, 8))
    assert i.shape == (8, 8, 8) and (i[:4] == -1).all() and (i[4:, :, :5] == 1).all()
    assert (l[:4] == 0).all() and (l[4:, :, :5] == 3).all()
    assert effective_patch((96, 96, 96), [(13, 20, 9), (30, 10, 9)]) == (32, 24, 16)


@pytest.mark.parametrize("sparse_below", [0.0, 1.1])
def test_dense_and_voxelwise_paths_agree_with_trilinear_under_crop_and_flips(sparse_below) -> None:
    """Both interpolation paths, on a crop of the logits, with flipped and permuted output axes."""
    from lib.model.segmenter import AxisMap, labels_from_logits

    torch.manual_seed(3)
    full = torch.randn(1, 4, 9, 8, 10)
    out = (33, 21, 29)  # canonical output shape
    ref = F.interpolate(full.double(), size=out, mode="trilinear", align_corners=False)[0]
    box = (slice(2, 8), slice(1, 8), slice(0, 10))
    crop = full[(slice(None), slice(None), *box)]
    # Output memory order: canonical axes 2 (flipped), 0, 1 (flipped).
    spec = ((2, True), (0, False), (1, True))
    axes = tuple(AxisMap.build(c, out[c], full.shape[2 + c], box[c], flip) for c, flip in spec)
    got = labels_from_logits(crop, axes, slab=5, sparse_below=sparse_below)
    want = ref.flip(3).flip(2).permute(0, 3, 1, 2)  # (C, W, D, H) with W and H flipped
    valid = tuple(a.valid for a in axes)
    assert all(v.stop - v.start > 0 for v in valid)
    _assert_argmax_of(want[(slice(None), *valid)][None], got[valid])
    outside = np.ones(got.shape, bool)
    outside[valid] = False
    assert outside.any() and (got[outside] == 0).all()


def test_body_crop_keeps_the_body_and_leaves_air_background(tmp_path) -> None:
    """The network runs on the body's box only; outside it the label is background.

    Cropping may change the answer inside the body through GroupNorm alone (its statistics are
    over the whole window, which no longer holds the air around the body). With the committed
    demo model on an adult-size phantom, 0.965 of body voxels keep their label.
    """
    from pants_tools.phantom import make_case

    demo = APP_DIR / "demo_model" / "segresnet_fast.pt"
    ph = make_case(0, shape=(112, 112, 80), spacing=(3.3, 3.3, 5.0), seed=3)
    vol = Volume(ph.ct.astype(np.float32), ph.affine)
    nocrop = CFG.model_copy(update={"preprocessing": CFG.preprocessing.model_copy(update={"body_threshold_hu": None})})
    cropped, _ = Segmenter(CFG, LM, "fast", demo).segment(vol)
    whole, _ = Segmenter(nocrop, LM, "fast", demo).segment(vol)
    body = vol.array > CFG.preprocessing.body_threshold_hu
    agree = (cropped[body] == whole[body]).mean()
    assert agree >= 0.95, agree
    # Outside the body's box plus margin: background.
    idx = [np.nonzero(body.any(axis=tuple(a for a in range(3) if a != ax)))[0] for ax in range(3)]
    margin = [int(np.ceil(CFG.preprocessing.body_margin_mm / s)) + 1 for s in vol.spacing]
    near = np.zeros(body.shape, bool)
    near[tuple(slice(max(i[0] - m, 0), i[-1] + 1 + m) for i, m in zip(idx, margin))] = True
    assert (~near).any() and (cropped[~near] == 0).all()
