"""Training pieces of the click model that it shares with the segmentation model: the disk cache
(:class:`lib.model.click_training.ClickCaseCache`), the optimisation engine with resumable
checkpoints (:func:`lib.model.click_training.fit_clicks`), and the publish rule."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from lib.core.click_config import load_click_config
from lib.core.labelmap import load_labelmap
from lib.core.settings import load_segmentation_config
from lib.imaging.volume_io import Volume
from lib.model.checkpoint import Checkpoint
from lib.model.click_training import ClickCaseCache, fit_clicks, prepare_case
from lib.model.engine import publishable
from lib.model.training import build_cache
from pants_tools.phantom import make_case

LM = load_labelmap()
CFG = load_click_config()
SEG = load_segmentation_config()


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """A phantom with a lesion at physical scale, written as image and consolidated label files."""
    folder = tmp_path_factory.mktemp("clickscan")
    p = make_case(2, shape=(128, 128, 72), spacing=(2.5, 2.5, 4.0), seed=31, lesion=True)
    label = LM.consolidate(p.masks)
    nib.save(nib.Nifti1Image(p.ct.astype(np.int16), p.affine), folder / "ct.nii.gz")
    nib.save(nib.Nifti1Image(label.astype(np.uint8), p.affine), folder / "label.nii.gz")
    return folder / "ct.nii.gz", folder / "label.nii.gz", p.ct.astype(np.float32), label


def _cache(root: Path, seg_model: Path) -> ClickCaseCache:
    return ClickCaseCache(root, CFG, SEG, LM, "fast", seg_model)


def test_cache_holds_the_prepared_case_and_is_reused(scan, tmp_path: Path) -> None:
    image, label, ct, truth = scan
    cache = _cache(tmp_path / "cache", tmp_path / "no_model.pt")
    items = [("a", str(image), str(label))]
    assert build_cache(cache, items) == 1
    assert build_cache(cache, items) == 0  # the second run prepares nothing
    case = cache.get("a", str(image), str(label))
    direct = prepare_case(Volume(ct, nib.load(image).affine), truth, None, LM, SEG, CFG)
    assert case is not None and direct is not None and case.start is None
    assert isinstance(case.image, np.memmap) and isinstance(case.label, np.memmap)
    np.testing.assert_allclose(case.image, direct.image, atol=1e-6)
    np.testing.assert_array_equal(case.label, direct.label)
    assert case.orient.perm == direct.orient.perm and case.orient.flip == direct.orient.flip
    # sent to cache worker processes: the loaded segmentation network stays behind
    assert pickle.loads(pickle.dumps(cache)).root == cache.root


def test_a_new_segmentation_model_or_label_makes_new_entries(scan, tmp_path: Path) -> None:
    image, label, _, truth = scan
    seg_model = tmp_path / "segresnet_fast.pt"
    cache = _cache(tmp_path / "cache", seg_model)
    build_cache(cache, [("a", str(image), str(label))])
    # start labels come from the served segmentation model: new weights, new entries
    from lib.model.model_store import publish
    from lib.model.segmenter import build_network

    publish(build_network(SEG, LM.num_classes).state_dict(), {"labels": LM.names, "preset": "fast"}, seg_model)
    assert not cache.has(str(image), str(label))
    case = cache.get("a", str(image), str(label))
    assert case is not None and case.start is not None and case.start.shape == case.label.shape
    # a label edited by a reader is a new entry too
    edited = tmp_path / "edited.nii.gz"
    nib.save(nib.Nifti1Image(truth.astype(np.uint8), nib.load(label).affine), edited)
    assert not cache.has(str(image), str(edited))


def test_a_scan_with_no_pancreas_is_remembered_as_nothing_to_click(scan, tmp_path: Path) -> None:
    image, label, _, truth = scan
    empty = tmp_path / "liver_only.nii.gz"
    only_liver = np.where(truth == LM.id_of("liver"), truth, 0).astype(np.uint8)
    nib.save(nib.Nifti1Image(only_liver, nib.load(label).affine), empty)
    cache = _cache(tmp_path / "cache", tmp_path / "no_model.pt")
    assert cache.get("b", str(image), str(empty)) is None
    assert cache.has(str(image), str(empty))
    done = next((tmp_path / "cache").glob("*/done"))
    assert json.loads(done.read_text())["empty"] is True


def test_a_killed_click_run_goes_on_from_its_checkpoint(scan, tmp_path: Path) -> None:
    image, label, _, _ = scan
    cache = _cache(tmp_path / "cache", tmp_path / "no_model.pt")
    case = cache.get("a", str(image), str(label))
    assert case is not None
    ckpt = Checkpoint(tmp_path / "checkpoint.pt")

    class Killed(Exception):
        pass

    seen: list[float] = []

    def kill_at_3(step: int, losses: list[float], timing: dict[str, float]) -> None:
        seen[:] = losses
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        fit_clicks([case], LM, CFG, 4, seed=0, checkpoint=ckpt, checkpoint_every=2, on_step=kill_at_3)
    saved = ckpt.load()
    assert saved is not None and saved["step"] == 2
    steps_run: list[int] = []
    state, losses = fit_clicks([case], LM, CFG, 4, seed=0, checkpoint=ckpt, checkpoint_every=2,
                               on_step=lambda step, *_: steps_run.append(step))
    assert steps_run == [3, 4]  # steps 1-2 were not run again
    assert len(losses) == 4 and losses[:2] == seen[:2]
    assert all(torch.isfinite(v).all() for v in state.values())


def test_fit_clicks_is_reproducible_from_its_seed(scan, tmp_path: Path) -> None:
    """The demo click weights are made by one command with a seed: the engine must not add noise."""
    image, label, _, _ = scan
    case = _cache(tmp_path / "cache", tmp_path / "no_model.pt").get("a", str(image), str(label))
    a, la = fit_clicks([case], LM, CFG, 2, seed=3)
    b, lb = fit_clicks([case], LM, CFG, 2, seed=3)
    assert la == lb and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("new, served, expected", [
    (0.1, None, True),   # nothing served yet: anything trained is better than nothing
    (0.5, 0.5, True),    # as good: the newer labels win
    (0.49, 0.5, False),  # worse: never published
    (None, 0.5, False),  # no score: never published over a served model
])
def test_one_publish_rule_for_every_trainer(new, served, expected) -> None:
    assert publishable(new, served) is expected
