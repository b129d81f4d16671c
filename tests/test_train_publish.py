"""The publish rule of the train task, on the real trainer, datastore and segmenter (no server).

A current model is published, and every labelled scan gets a ``final`` label equal to that model's
own prediction (saved through the datastore, as an annotator's upload would be): on the fixed
validation split the current model scores a mean Dice close to 1, which a short run cannot match.
That run must leave the weights file byte-identical and the infer side serving it; a run that
changes nothing (a learning rate below float precision) ties and is published. The same data
also drives a DDP run over 2 gloo processes on the CPU.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from lib.core.atomic import TMP_NAME
from lib.datastore.pants import PanTSDatastore
from lib.core.labelmap import load_labelmap
from lib.model.model_store import ModelStore, publish
from pants_tools.phantom import write_pants_tree
from lib.model.segmenter import Segmenter, build_network
from lib.core.settings import NetworkConfig, load_segmentation_config
from lib.trainers.segmentation import PanTSTrain
from lib.imaging.volume_io import load_volume

LM = load_labelmap()
# A narrow network and 24x24x16 voxels on the fast preset's own grid keep each step well under a
# second; on its grid, validation sees exactly what infer saved as the labels.
CFG = load_segmentation_config().model_copy(update={"network": NetworkConfig(init_filters=8)})
SHAPE, SPACING = (24, 24, 16), CFG.preset("fast").spacing_mm
RUN = {"max_epochs": 1, "iterations_per_epoch": 1, "batch_size": 1}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PanTSDatastore, Path]]:
    """4 phantoms, a published (random, seed 1) model, and its predictions stored as final labels."""
    base = tmp_path_factory.mktemp("publish")
    ids = write_pants_tree(base / "PanTS", 4, shape=SHAPE, spacing=SPACING, seed=5)
    ds = PanTSDatastore(base / "PanTS")
    model_dir = base / "model"
    torch.manual_seed(1)
    net = build_network(CFG, LM.num_classes)
    publish(net.state_dict(), {"labels": LM.names, "preset": "fast", "summary": "current"}, model_dir / "segresnet_fast.pt")
    seg = Segmenter(CFG, LM, "fast", model_dir / "segresnet_fast.pt")
    for i in ids:
        vol = load_volume(ds.get_image_uri(i))
        label, _ = seg.segment(vol)
        f = base / f"{i}_final.nii.gz"
        nib.save(nib.Nifti1Image(label, vol.affine), f)
        ds.save_label(i, str(f), "final", {})
    yield ds, model_dir
    ds.close()


def test_a_worse_model_is_never_published(pool) -> None:
    ds, model_dir = pool
    current = model_dir / "segresnet_fast.pt"
    digest, mtime = _digest(current), current.stat().st_mtime_ns
    infer = Segmenter(CFG, LM, "fast", current)  # what the infer task holds
    image = load_volume(ds.get_image_uri(ds.list_images()[0]))
    served_before, _ = infer.segment(image)

    trainer = PanTSTrain(CFG, LM, "fast", model_dir, "cpu")
    # From scratch (another initialisation), one step: it cannot reproduce the current model.
    stats = trainer({**RUN, "from_scratch": True}, ds)

    assert stats["status"] == "DONE" and stats["val_size"] >= 1
    assert stats["baseline_metric"] > 0.8, stats  # the current model fits its own labels
    assert stats["best_metric"] < stats["baseline_metric"]
    assert stats["published"] is False
    assert _digest(current) == digest and current.stat().st_mtime_ns == mtime
    assert not [p for p in model_dir.iterdir() if TMP_NAME.match(p.name)]  # no half-written file left
    served_after, _ = infer.segment(image)
    np.testing.assert_array_equal(served_after, served_before)
    assert infer.info.meta["summary"] == "current"
    assert trainer.stats()["published"] is False
    # the refused run is kept, unserved, as a version whose card says why
    card = ModelStore(model_dir, "fast").card(stats["version"])
    assert card["published"] is False and card["summary"].startswith("refused: val mean Dice")
    assert f"{stats['best_metric']:.4f} < served {stats['baseline_metric']:.4f}" in card["refused"]
    assert ModelStore(model_dir, "fast").serving_version() != stats["version"]


def test_a_model_as_good_as_the_current_one_is_published(pool) -> None:
    ds, model_dir = pool
    current = model_dir / "segresnet_fast.pt"
    digest = _digest(current)
    # Fine-tuning with a step far below float32 precision leaves the weights as they are: a tie.
    stats = PanTSTrain(CFG, LM, "fast", model_dir, "cpu")({**RUN, "learning_rate": 1e-12}, ds)
    assert stats["published"] is True, stats
    assert stats["best_metric"] == stats["baseline_metric"]
    assert _digest(current) != digest  # new file (new metadata), same predictions
    meta = torch.load(current, weights_only=True)["meta"]
    assert meta["val_ids"] == stats["val_ids"] and meta["labels"] == LM.names


def test_ddp_on_cpu_with_two_gloo_processes(pool, tmp_path: Path) -> None:
    ds, _ = pool
    model_dir = tmp_path / "ddp_model"  # no current model: the run publishes
    trainer = PanTSTrain(CFG, LM, "fast", model_dir, "cpu")
    stats = trainer({**RUN, "iterations_per_epoch": 2, "cpu_processes": 2}, ds)
    assert stats["processes"] == 2 and stats["status"] == "DONE"
    assert stats["iterations_per_epoch"] == 1  # 2 iterations shared by 2 ranks
    assert stats["batch_size"] == 2  # 1 per rank
    assert stats["published"] is True
    state = torch.load(model_dir / "segresnet_fast.pt", weights_only=True)["state_dict"]
    assert not any(k.startswith("module.") for k in state)  # plain weights, loadable by infer
    Segmenter(CFG, LM, "fast", model_dir / "segresnet_fast.pt").network()


def test_pinned_validation_scans_gate_the_run_and_stay_out_of_training(pool) -> None:
    ds, model_dir = pool
    labelled = sorted(d["image_id"] for d in ds.datalist())
    pinned = labelled[-2:]
    trainer = PanTSTrain(CFG, LM, "fast", model_dir, "cpu")
    stats = trainer({**RUN, "learning_rate": 1e-12, "validation_ids": list(reversed(pinned))}, ds)
    assert stats["val_ids"] == pinned and stats["train_size"] == len(labelled) - 2, stats
    assert stats["published"] is True  # a tie on the pinned scans
    assert torch.load(model_dir / "segresnet_fast.pt", weights_only=True)["meta"]["val_ids"] == pinned
    with pytest.raises(ValueError, match="no training label: PanTS_09999999"):
        trainer({**RUN, "validation_ids": ["PanTS_09999999", pinned[0]]}, ds)
    with pytest.raises(ValueError, match="at least one must stay for training"):
        trainer({**RUN, "validation_ids": labelled}, ds)


def test_a_diverged_run_is_kept_unserved_and_says_why(pool, tmp_path: Path) -> None:
    ds, _ = pool
    # A served model whose weights hold a NaN scores 0 on validation; fine-tuning it keeps the NaN
    # and also scores 0, a tie the metric gate alone would publish. Non-finite weights never are.
    net = build_network(CFG, LM.num_classes)
    state = net.state_dict()
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first].view(-1)[0] = float("nan")
    current = tmp_path / "segresnet_fast.pt"
    publish(state, {"labels": LM.names, "preset": "fast", "summary": "poisoned"}, current)
    digest = _digest(current)
    stats = PanTSTrain(CFG, LM, "fast", tmp_path, "cpu")(RUN, ds)
    assert stats["published"] is False and _digest(current) == digest, stats
    card = ModelStore(tmp_path, "fast").card(stats["version"])
    assert "non-finite weights in" in card["refused"] and "training diverged" in card["refused"], card["refused"]


def test_non_finite_names_the_tensors_holding_nan_or_inf() -> None:
    from lib.model.model_store import non_finite

    state = {"a": torch.zeros(3), "b": torch.tensor([1.0, float("nan")]), "c": torch.tensor([float("inf")]),
             "steps": torch.tensor([7])}
    assert non_finite(state) == ["b", "c"]
    assert non_finite({"a": torch.ones(2)}) == []


def test_lesion_synthesis_paints_training_crops_and_the_card_records_it(pool, tmp_path: Path) -> None:
    from lib.core.config_errors import ConfigError
    from lib.core.settings import LesionSynthesisConfig

    ds, _ = pool
    synth = LesionSynthesisConfig(probability=1.0, volume_mm3=(1000.0, 4000.0), min_host_voxels=1,
                                  min_lesion_voxels=1)  # 6 mm voxels: a few voxels of gland per crop
    cfg = CFG.model_copy(update={"training": CFG.training.model_copy(update={"lesion_synthesis": synth})})
    stats = PanTSTrain(cfg, LM, "fast", tmp_path, "cpu")({**RUN, "iterations_per_epoch": 3, "from_scratch": True}, ds)
    assert stats["status"] == "DONE" and stats["synthetic_lesions"] >= 1, stats
    card = ModelStore(tmp_path, "fast").card(stats["version"])
    assert card["recipe"]["lesion_synthesis"]["probability"] == 1.0
    bad = cfg.model_copy(update={"training": cfg.training.model_copy(
        update={"lesion_synthesis": synth.model_copy(update={"host_classes": ("pancreaz",)})})})
    with pytest.raises(ConfigError, match="training.lesion_synthesis.host_classes: unknown label name 'pancreaz'"):
        PanTSTrain(bad, LM, "fast", tmp_path / "bad", "cpu")  # refused when the app starts, not at the first run
