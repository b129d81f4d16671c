"""Scoring: class-stratified uncertainty, lesion probability, incremental rescoring, config checks."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from lib.core.al_config import ActiveLearningConfig, ScoringConfig, load_al_config
from lib.core.config_errors import ConfigError
from lib.datastore.pants import PanTSDatastore
from lib.core.labelmap import load_labelmap
from lib.model.model_store import model_path, publish
from pants_tools.phantom import write_pants_tree
from lib.activelearning.scoring import INFO_KEY, ModelWatcher, PanTSScoring, ScanScorer, model_version, run_scoring
from lib.model.segmenter import Segmenter, build_network
from lib.core.settings import load_segmentation_config

LM = load_labelmap()
CFG = load_segmentation_config()
# small and quick: localize at the model's spacing, two stochastic passes
AL = ActiveLearningConfig(scoring=ScoringConfig(localize_spacing_mm=None, mc_samples=2,
                                                class_weights={"pancreatic_lesion": 4.0}))


def _publish(path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    publish(build_network(CFG, LM.num_classes).state_dict(), {"labels": LM.names}, path)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("score") / "PanTS"
    write_pants_tree(root, 4, shape=(24, 24, 16), spacing=(4.0, 4.0, 4.0), seed=2)
    return root


def test_summary_weights_classes_not_voxels() -> None:
    seg = Segmenter(CFG, LM, "fast", Path("/nonexistent.pt"))
    c = LM.num_classes + 1
    lid = LM.id_of("pancreatic_lesion")
    p = torch.zeros(c, 10, 10, 10, dtype=torch.float64)
    p[0] = 1.0  # confident background everywhere ...
    p[:, :2, :2, :2] = 0.0
    p[0, :2, :2, :2] = 0.5  # ... except 8 lesion voxels the model is unsure about
    p[lid, :2, :2, :2] = 0.5
    weighted = ScanScorer(seg, ScoringConfig(class_weights={"pancreatic_lesion": 4.0}))._summarize(p)
    volume_mean = float((-(p * torch.log(p.clamp_min(1e-12))).sum(0) / torch.log(torch.tensor(float(c)))).mean())
    score, per_class, lesion_prob, class_scores = weighted
    # the lesion's entropy counts fully, not diluted by 992 certain background voxels
    assert score > 10 * volume_mean
    assert per_class["pancreatic_lesion"] > 0.15
    assert lesion_prob == pytest.approx(0.5)
    # per class (clasp): entropy weighted by the class probability, summed over voxels
    h = float(torch.log(torch.tensor(2.0)) / torch.log(torch.tensor(float(c))))
    assert class_scores.shape == (LM.num_classes,)
    assert class_scores[lid - 1] == pytest.approx(8 * 0.5 * h, rel=1e-4)
    assert class_scores[LM.id_of("liver") - 1] == 0.0


def test_scores_a_scan_within_bounds(pool: Path, tmp_path: Path) -> None:
    mp = model_path(tmp_path, "fast")
    _publish(mp, 0)
    seg = Segmenter(CFG, LM, "fast", mp)
    from lib.imaging.volume_io import load_volume

    s = ScanScorer(seg, AL.scoring).score_volume(load_volume(pool / "ImageTr" / "PanTS_00000001" / "ct.nii.gz"))
    assert 0.0 <= s.uncertainty <= 1.0 and 0.0 <= s.lesion_prob <= 1.0
    assert float((s.embedding**2).sum()) == pytest.approx(1.0, abs=1e-4)
    assert set(s.seconds) >= {"pre", "localize", "uncertainty"}
    # MC dropout / flip passes are stochastic, but the net is left in eval mode afterwards
    assert not any(m.training for m in seg.network().modules())


def test_coarse_grid_from_stored_integers_matches_normalise_then_area() -> None:
    """The subsample-first preprocessing keeps the meaning: HU window, then area averaging."""
    import numpy as np

    from lib.model.segmenter import normalize_hu, resample_image

    # One linear HU map, so that the bound below is in HU (40 HU); the soft-tissue window would
    # scale the same subsampling error by its slope (4x).
    cfg = CFG.model_copy(update={"preprocessing": CFG.preprocessing.model_copy(update={"soft_tissue_hu": None})})
    seg = Segmenter(cfg, LM, "fast", Path("/nonexistent.pt"))
    scorer = ScanScorer(seg, AL.scoring)
    rng = np.random.default_rng(0)
    # smooth anatomy beyond the HU window on both sides, plus scanner noise
    i, j, k = np.meshgrid(np.arange(40), np.arange(40), np.arange(24), indexing="ij")
    raw = 1400 * np.sin(i / 12.0) * np.cos(j / 16.0) + 200 * np.sin(k / 4.0) + rng.normal(0, 30, (40, 40, 24))
    raw = raw.astype(np.int16)
    spacing = (1.0, 1.0, 2.0)
    exact = resample_image(normalize_hu(raw, cfg)[None, None], (10, 10, 12))
    fast = scorer._coarse(raw, spacing, (4.0, 4.0, 4.0))  # reads every 2nd voxel in x and y
    assert fast.shape == exact.shape
    # the same local means from a quarter of the samples, on a grid moved by half a source voxel
    assert float((fast - exact).abs().mean()) < 0.04
    assert float(fast.min()) >= -1.0 and float(fast.max()) <= 1.0
    same = scorer._coarse(raw, spacing, (1.0, 1.0, 2.0))  # no shrink: exactly the normalised scan
    assert torch.equal(same, normalize_hu(raw, cfg)[None, None])


def test_localize_sees_only_the_body() -> None:
    seg = Segmenter(CFG, LM, "fast", Path("/nonexistent.pt"))
    x = torch.full((1, 1, 60, 50, 40), -1.0)  # air
    x[0, 0, 10:40, 20:45, 5:35] = 0.0  # the patient (0 HU)
    box = ScanScorer(seg, AL.scoring)._body_box(x)
    assert box == (slice(9, 41), slice(19, 46), slice(4, 36))
    whole = ScanScorer(seg, ScoringConfig(localize_body_hu=None))._body_box(x)
    assert whole == (slice(0, 60), slice(0, 50), slice(0, 40))


def test_incremental_only_stale_unlabelled_scans_are_rescored(pool: Path, tmp_path: Path) -> None:
    mp = model_path(tmp_path / "model", "fast")
    ds = PanTSDatastore(pool, state_dir=tmp_path / "state", hide_imported_labels=True)
    method = PanTSScoring(Segmenter(CFG, LM, "fast", mp), AL)
    assert run_scoring(method, ds)["scored"] == 0  # no trained model: nothing to score
    _publish(mp, 0)
    v1 = model_version(mp)
    assert run_scoring(method, ds)["scored"] == 4
    info = ds.get_image_info("PanTS_00000002")[INFO_KEY]
    assert info["model_version"] == v1 and 0 <= info["uncertainty"] <= 1 and "lesion_prob" in info
    assert run_scoring(method, ds)["scored"] == 0  # nothing stale
    ds.reveal_imported("PanTS_00000001")  # labelled now: never rescored
    time.sleep(0.05)
    _publish(mp, 1)
    os.utime(mp, (time.time() + 5, time.time() + 5))  # a distinct mtime even on coarse clocks
    v2 = model_version(mp)
    assert v2 != v1
    assert ds.scoring_todo(v2) == ["PanTS_00000002", "PanTS_00000003", "PanTS_00000004"]
    assert run_scoring(method, ds)["scored"] == 3
    assert ds.get_image_info("PanTS_00000001")[INFO_KEY]["model_version"] == v1
    assert ds.get_image_info("PanTS_00000004")[INFO_KEY]["model_version"] == v2
    status = method and (tmp_path / "state" / "scoring_status.json").read_text()
    assert '"state": "done"' in status
    ds.close()


def test_watcher_retries_until_it_can_act(tmp_path: Path) -> None:
    mp = tmp_path / "m.pt"
    calls: list = []
    answers = iter([False, True])
    w = ModelWatcher(mp, 1.0, lambda v: calls.append(v) or next(answers, True))
    w.tick()  # start: refused (e.g. scoring busy) ...
    w.tick()  # ... so it tries again
    w.tick()  # acted: no change, no call
    mp.write_bytes(b"x")
    w.tick()  # a new model
    assert calls == [None, None, model_version(mp)]


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    assert load_al_config().scoring.mc_samples >= 1
    bad = tmp_path / "al.yaml"
    bad.write_text("scoring:\n  max_crop_voxels: [50, 48, 40]\n")
    with pytest.raises(ConfigError, match="scoring.max_crop_voxels"):
        load_al_config(bad)
    bad.write_text("strategies:\n  leases_minutes: 5\n")
    with pytest.raises(ConfigError, match="strategies.leases_minutes"):
        load_al_config(bad)
    with pytest.raises(ConfigError, match="pancreas_tale"):
        ActiveLearningConfig(scoring=ScoringConfig(class_weights={"pancreas_tale": 1.0})).check_labels(LM)


def _poison(state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        next(v for v in state.values() if v.is_floating_point()).view(-1)[0] = float("nan")


def test_diverged_served_weights_stop_scoring_with_the_reason_and_keep_the_scores(pool: Path, tmp_path: Path) -> None:
    mp = model_path(tmp_path / "model", "fast")
    ds = PanTSDatastore(pool, state_dir=tmp_path / "state", hide_imported_labels=True)
    method = PanTSScoring(Segmenter(CFG, LM, "fast", mp), AL)
    _publish(mp, 0)
    assert run_scoring(method, ds)["scored"] == 4
    before = ds.get_image_info("PanTS_00000003")[INFO_KEY]
    torch.manual_seed(1)
    state = build_network(CFG, LM.num_classes).state_dict()
    _poison(state)
    publish(state, {"labels": LM.names}, mp)
    os.utime(mp, (time.time() + 5, time.time() + 5))  # a new version, even on coarse clocks
    out = run_scoring(method, ds)  # returns instead of raising: the server's watcher thread lives on
    assert out["scored"] == 0 and "non-finite weights" in out["error"] and "rollback" in out["error"], out
    status = json.loads((tmp_path / "state" / "scoring_status.json").read_text())
    assert status["state"] == "error" and status["reason"] == out["error"]
    assert ds.get_image_info("PanTS_00000003")[INFO_KEY] == before  # earlier scores still rank
    ds.close()


def test_a_scan_whose_scores_are_not_finite_fails_alone(pool: Path, tmp_path: Path) -> None:
    mp = model_path(tmp_path / "model", "fast")
    ds = PanTSDatastore(pool, state_dir=tmp_path / "state", hide_imported_labels=True)
    method = PanTSScoring(Segmenter(CFG, LM, "fast", mp), AL)
    _publish(mp, 0)
    net = method.seg.network()  # finite on disk, NaN in its output (as an overflow would give)
    _poison(dict(net.named_parameters()))
    out = run_scoring(method, ds)
    assert out["scored"] == 0 and out["failed"] == 4, out
    status = json.loads((tmp_path / "state" / "scoring_status.json").read_text())
    assert status["state"] == "done" and status["failed"] == 4
    assert ds.scoring_todo(model_version(mp)) == [f"PanTS_0000000{i}" for i in range(1, 5)]  # none stored
    ds.close()
