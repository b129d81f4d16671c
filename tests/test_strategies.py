"""Next-sample strategies over a datastore with known scores: which scan each picks, leases, fallbacks."""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lib.datastore.rows import ScoreRef, ScoreRow
from lib.core.al_config import StrategyConfig
from lib.datastore.pants import PanTSDatastore
from pants_tools.phantom import write_pants_tree
from lib.activelearning.scoring import INFO_KEY
from lib.activelearning.strategies import (
    ClassStratifiedStrategy,
    ClassTable,
    ForegroundRandom,
    HybridStrategy,
    RandomUnlabeled,
    References,
    UncertaintyStrategy,
    hybrid_choice,
    make_strategies,
    power_pick,
)

N = 8


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("al") / "PanTS"
    write_pants_tree(root, N, shape=(16, 16, 12), spacing=(3.0, 3.0, 3.0), seed=5)
    return root


@pytest.fixture()
def ds(pool: Path, tmp_path: Path) -> PanTSDatastore:
    d = PanTSDatastore(pool, state_dir=tmp_path / "state", hide_imported_labels=True)
    yield d
    d.close()


def ids(ds: PanTSDatastore) -> list[str]:
    return sorted(ds.images_in_split("train"))


def emb(*v: float) -> bytes:
    a = np.asarray(v, dtype=np.float32)
    return (a / np.linalg.norm(a)).astype(np.float16).tobytes()


def put(ds: PanTSDatastore, image_id: str, u: float, lesion: float = 0.0, prio: float | None = None,
        grp: str = "A|venous", e: bytes | None = None, version: str = "v1",
        classes: dict[str, float] | None = None) -> None:
    row = {
        "image_id": image_id, "model_version": version, "uncertainty": u, "lesion_prob": lesion,
        "priority": u if prio is None else prio, "grp": grp, "embedding": e or emb(1, 0, 0), "ts": time.time(),
        "info": {"uncertainty": u, "model_version": version},
    }
    if classes is not None:  # per-class scores (clasp); rows without them are what older scorers stored
        vec = np.zeros(ds.lm.num_classes, np.float32)
        for name, v in classes.items():
            vec[ds.lm.id_of(name) - 1] = v
        row["class_scores"] = vec.tobytes()
    ds.store_scores([row], INFO_KEY)


def ask(strategy, ds: PanTSDatastore, client: str = "c1") -> dict:
    return strategy({"strategy": strategy.name, "client_id": client}, ds)


def test_uncertainty_picks_highest_then_next_while_leased(ds: PanTSDatastore) -> None:
    a, b, c = ids(ds)[:3]
    put(ds, a, 0.2)
    put(ds, b, 0.9)
    put(ds, c, 0.5)
    s = UncertaintyStrategy(seed=0)
    first, second = ask(s, ds, "ann1"), ask(s, ds, "ann2")
    assert (first["id"], second["id"]) == (b, c)
    assert first["selected_by"] == "uncertainty"
    assert {x["id"] for x in ds.active_leases()} == {b, c}


def test_scores_are_in_image_info(ds: PanTSDatastore) -> None:
    a = ids(ds)[0]
    put(ds, a, 0.7, version="model-42")
    assert ds.get_image_info(a)[INFO_KEY] == {"uncertainty": 0.7, "model_version": "model-42"}


def test_every_strategy_falls_back_without_scores(ds: PanTSDatastore) -> None:
    served = set()
    for name, s in make_strategies(StrategyConfig(), seed=1).items():
        res = ask(s, ds, name)
        assert res["id"] in ids(ds), name
        assert res["selected_by"] == "random", name  # no scores: the documented fallback ends at random
        served.add(res["id"])
    assert len(served) == len(make_strategies(StrategyConfig()))  # leased scans are never served twice


def test_leases_run_out_then_expire(ds: PanTSDatastore) -> None:
    s = RandomUnlabeled(StrategyConfig(lease_minutes=1), seed=0)
    got = [ask(s, ds, f"c{k}")["id"] for k in range(N)]
    assert sorted(got) == ids(ds)
    assert ask(s, ds, "late") == {}  # all leased: nothing to hand out
    # A lease that expired frees its scan.
    now = time.time()
    assert not ds.lease(got[0], "other", "random", 60, now=now)
    assert ds.lease(got[0], "other", "random", 60, now=now + 61)


def test_final_label_and_reveal_end_the_lease(ds: PanTSDatastore, tmp_path: Path) -> None:
    a, b = ids(ds)[:2]
    assert ds.lease(a, "c1", "hybrid", 600) and ds.lease(b, "c2", "hybrid", 600)
    img = nib.load(ds.get_image_uri(a))
    label = np.zeros(img.shape, np.uint8)
    label[4:8, 4:8, 3:6] = 14
    f = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(label, img.affine), f)
    ds.save_label(a, str(f), "final", {})
    ds.reveal_imported_many([b])
    assert ds.active_leases() == []


def test_foreground_random_draws_among_likely_lesions(ds: PanTSDatastore) -> None:
    a, b, *rest = ids(ds)
    put(ds, a, 0.1, lesion=0.9)
    put(ds, b, 0.1, lesion=0.0)
    s = ForegroundRandom(StrategyConfig(fg_fraction=1.0, fg_pool=1), seed=0)
    res = ask(s, ds)
    assert res["id"] == a and res["selected_by"] == "foreground"


def test_hybrid_prefers_the_scan_unlike_the_labelled_ones(ds: PanTSDatastore) -> None:
    a, b, c = ids(ds)[:3]
    put(ds, a, 0.5, e=emb(1, 0, 0))          # labelled below
    put(ds, b, 0.8, e=emb(1, 0.01, 0))       # most uncertain, but a near-copy of a
    put(ds, c, 0.7, e=emb(0, 1, 0))          # a little less uncertain, and new
    ds.reveal_imported_many([a])
    s = HybridStrategy(StrategyConfig(diversity_weight=0.5, balance_weight=0.0), seed=0)
    res = ask(s, ds)
    assert res["id"] == c
    assert res["components"]["diversity"] == pytest.approx(1.0)
    # Without diversity the most uncertain wins.
    s = HybridStrategy(StrategyConfig(diversity_weight=0.0, balance_weight=0.0), seed=0)
    assert ask(s, ds, "c2")["id"] == b


def test_hybrid_sees_a_label_saved_after_its_references_were_cached(ds: PanTSDatastore) -> None:
    a, b, c = ids(ds)[:3]
    put(ds, a, 0.5, e=emb(1, 0, 0))
    put(ds, b, 0.8, e=emb(1, 0.01, 0))
    put(ds, c, 0.7, e=emb(0, 1, 0))
    s = HybridStrategy(StrategyConfig(diversity_weight=0.5, balance_weight=0.0), seed=0)
    before = ds.references_version()
    assert ask(s, ds)["id"] == b  # nothing labelled yet: the most uncertain (references now cached)
    assert ds.references_version() == before  # a lease is read live, it does not move the counter
    assert ds.release_lease(b)
    ds.reveal_imported_many([a])  # a labelled: b is now a near-copy of it
    assert ds.references_version() != before
    assert ask(s, ds, "c2")["id"] == c


def test_references_merge_leased_first_without_duplicates() -> None:
    leased = References.from_rows([ScoreRef("x", "A", emb(1, 0)), ScoreRef("y", "B", None)])
    labelled = References.from_rows(
        [ScoreRef("y", "B", emb(0, 1)), ScoreRef("z", "A", emb(0, 1)), ScoreRef("w", "B", emb(1, 1))])
    both = leased.then(labelled, limit=3)
    assert both.ids == ("x", "y", "z") and both.groups == ("A", "B", "A")
    assert both.valid.tolist() == [True, False, True] and both.dim == 2
    # embeddings of another length (a rescore by a new model half done): the larger set is kept
    other = References.from_rows([ScoreRef("v", "A", emb(1, 0, 0))])
    mixed = other.then(labelled, limit=10)
    assert mixed.dim == 2 and mixed.valid.tolist() == [False, True, True, True]


def test_hybrid_balance_favours_under_represented_centers() -> None:
    rows = [ScoreRow("x", "v", 0.5, 0.0, 0.5, "A|venous", None), ScoreRow("y", "v", 0.5, 0.0, 0.5, "B|arterial", None)]
    refs = [ScoreRef("l1", "A|venous", None), ScoreRef("l2", "A|venous", None)]
    k, parts = hybrid_choice(rows, refs, {"A|venous": 5, "B|arterial": 5}, StrategyConfig())
    assert rows[k][0] == "y" and parts["balance"] > 0


def test_stale_scores_still_rank(ds: PanTSDatastore) -> None:
    a, b = ids(ds)[:2]
    put(ds, a, 0.3, version="old")
    put(ds, b, 0.6, version="new")
    assert ask(UncertaintyStrategy(seed=0), ds)["id"] == b
    assert ds.scoring_todo("new")[-1] == a  # stale: rescored after the never-scored ones


# ---- clasp ----------------------------------------------------------------------------------


def test_power_pick_is_argmax_without_noise_and_proportional_with() -> None:
    scores = np.array([1.0, 3.0, 0.5, 2.0])
    ok = np.array([True, False, True, True])
    rng = np.random.default_rng(0)
    assert power_pick(scores, ok, 0.0, rng) == 3  # the best allowed one
    assert power_pick(scores, np.zeros(4, bool), 1.0, rng) is None
    picks = np.bincount([power_pick(scores, ok, 1.0, rng) for _ in range(6000)], minlength=4) / 6000
    assert picks[1] == 0 and picks[[0, 2, 3]] == pytest.approx([1 / 3.5, 0.5 / 3.5, 2 / 3.5], abs=0.03)


def test_clasp_noise_decays_per_round() -> None:
    s = ClassStratifiedStrategy(StrategyConfig(clasp_noise=1.0, clasp_noise_decay=0.5, clasp_labels_per_round=4))
    assert [s.noise(n) for n in (0, 4, 8)] == pytest.approx([1.0, 0.5, 0.25])


def test_clasp_round_robin_and_budget_split() -> None:
    cfg = StrategyConfig(clasp_class_weights={"pancreatic_lesion": 3.0}, clasp_other_weight=0.0, clasp_class_share=0.67)
    s = ClassStratifiedStrategy(cfg)
    assert {s.next_class() for _ in range(5)} == {s.names.index("pancreatic_lesion")}
    turns = [s._class_turn() for _ in range(300)]
    assert sum(turns) == 201  # two thirds of the requests go to a class
    plain = ClassStratifiedStrategy(StrategyConfig())
    assert sorted(plain.next_class() for _ in range(len(plain.names))) == list(range(len(plain.names)))


def test_clasp_serves_each_class_its_best_scan_then_overall(ds: PanTSDatastore) -> None:
    a, b, c, d = ids(ds)[:4]
    put(ds, a, 0.9, classes={"liver": 5.0})                       # most uncertain overall
    put(ds, b, 0.2, classes={"pancreatic_lesion": 4.0, "liver": 0.1})
    put(ds, c, 0.3, classes={"pancreatic_lesion": 1.0, "pancreatic_duct": 2.0})
    put(ds, d, 0.1)                                               # an older scorer's row: no class scores
    cfg = StrategyConfig(clasp_noise=0.0, clasp_class_share=2 / 3, clasp_other_weight=0.0,
                         clasp_class_weights={"pancreatic_lesion": 1.0, "pancreatic_duct": 1.0})
    s = ClassStratifiedStrategy(cfg, seed=0)
    first, second, third = (ask(s, ds, f"ann{k}") for k in range(3))
    # equal weights: classes in label-map order (duct 21 before lesion 28)
    assert (first["id"], first["selected_by"]) == (c, "clasp:pancreatic_duct")
    assert (second["id"], second["selected_by"]) == (b, "clasp:pancreatic_lesion")
    # the third request is the overall third: the highest uncertainty left
    assert (third["id"], third["selected_by"]) == (a, "clasp:overall")
    # the duct's turn again; b and c are leased, so no free scan holds the duct or the lesion,
    # and the request goes overall (d, with no class scores, still ranks)
    assert ask(s, ds, "ann3")["id"] == d
    assert ask(s, ds, "ann4")["id"] not in {a, b, c, d}  # everything scored is leased: random_fg
    assert len({x["id"] for x in ds.active_leases()}) == 5


def test_clasp_sees_a_label_saved_after_its_table_was_cached(ds: PanTSDatastore) -> None:
    a, b = ids(ds)[:2]
    put(ds, a, 0.5, classes={"pancreatic_lesion": 3.0})
    put(ds, b, 0.4, classes={"pancreatic_lesion": 2.0})
    cfg = StrategyConfig(clasp_noise=0.0, clasp_class_share=1.0, clasp_other_weight=0.0,
                         clasp_class_weights={"pancreatic_lesion": 1.0})
    s = ClassStratifiedStrategy(cfg, seed=0)
    assert s._table(ds).labelled == 0
    ds.reveal_imported_many([a])  # a labelled: the cached table must not serve it
    res = ask(s, ds)
    assert res["id"] == b and res["noise"] == 0.0
    assert s._table(ds).labelled == 1


def test_class_table_tolerates_rows_without_class_scores() -> None:
    t = ClassTable.from_rows([("x", 0.5, np.ones(3, np.float32).tobytes()), ("y", 0.2, None), ("z", 0.1, b"short")], 3, 7)
    assert t.ids == ("x", "y", "z") and t.labelled == 7
    assert not np.isnan(t.classes[0]).any() and np.isnan(t.classes[1:]).all()


def test_an_index_from_before_class_scores_upgrades_in_place(pool: Path, tmp_path: Path) -> None:
    import sqlite3

    state = tmp_path / "old"
    d = PanTSDatastore(pool, state_dir=state, hide_imported_labels=True)
    a, b = ids(d)[:2]
    put(d, a, 0.4)
    path = d.index.path
    d.close()
    with sqlite3.connect(path) as db:  # what a version-2 index looks like: no class_scores column
        db.execute("ALTER TABLE scores DROP COLUMN class_scores")
        db.execute("PRAGMA user_version = 2")
    d = PanTSDatastore(pool, state_dir=state, hide_imported_labels=True)
    try:
        assert d.count_scores() == 1  # kept
        put(d, b, 0.3, classes={"pancreatic_lesion": 1.0})
        table = {r[0]: r[2] for r in d.class_score_table()}
        assert table[a] is None and len(table[b]) == 4 * d.lm.num_classes
        res = ask(ClassStratifiedStrategy(StrategyConfig(clasp_noise=0.0, clasp_class_share=0.0), seed=0), d)
        assert res["id"] == a and res["selected_by"] == "clasp:overall"  # the old row still ranks
    finally:
        d.close()


def test_the_configured_default_strategy_comes_first_and_every_name_is_built() -> None:
    from lib.core.al_config import STRATEGY_NAMES, StrategyConfig

    assert sorted(make_strategies(StrategyConfig())) == sorted(STRATEGY_NAMES)
    for name in STRATEGY_NAMES:
        assert list(make_strategies(StrategyConfig(default=name)))[0] == name
    with pytest.raises(ValueError, match="default"):
        StrategyConfig(default="nosuch")
