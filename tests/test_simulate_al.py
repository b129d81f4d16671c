"""The campaign simulator end to end on a tiny phantom pool: CSV rows, plot, summary, resume."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest
from server import REPO

spec = importlib.util.spec_from_file_location("simulate_al", REPO / "scripts" / "simulate_al.py")
simulate_al = importlib.util.module_from_spec(spec)
spec.loader.exec_module(simulate_al)

ARGS = ["--make-phantoms", "10", "--n-test", "3", "--phantom-seed", "7", "--shape", "24", "24", "16",
        "--spacing", "6", "6", "6", "--init-filters", "8", "--patch", "16", "16", "16", "--epochs", "1", "--iterations", "1",
        "--rounds", "2", "--initial", "3", "--batch", "2", "--mc-samples", "1",
        "--strategies", "hybrid", "--seeds", "0"]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_campaign_rows_plot_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    assert simulate_al.main(["--out", str(out), *ARGS]) == 0
    rows = _rows(out / "al_rounds.csv")
    assert [(r["strategy"], r["labels"]) for r in rows] == [("hybrid", "3"), ("hybrid", "5"), ("full", "7"), ("full", "7")]
    assert len(eval(rows[0]["selected"])) == 2 and rows[1]["selected"] == "[]"
    assert all(0.0 <= float(r["mean_dsc"]) <= 1.0 for r in rows)
    assert (out / "al_curves.png").stat().st_size > 1000
    summary = _rows(out / "al_summary.csv")[0]
    assert summary["strategy"] == "hybrid" and summary["final_labels"] == "5"
    assert float(summary["final_lesion_scans"]) == float(rows[1]["lesion_scans_labelled"])
    stats = json.loads((out / "runs" / "hybrid_s0" / "model" / "train_stats_fast.json").read_text())
    assert stats["patch"] == [16, 16, 16]  # --patch reaches the app's trainer
    # Interrupted after round 0: the rerun keeps that row and redoes only round 1.
    campaign = out / "runs" / "hybrid_s0" / "rounds.csv"
    lines = campaign.read_text().splitlines()
    campaign.write_text("\n".join(lines[:2]) + "\n")
    assert simulate_al.main(["--out", str(out), *ARGS]) == 0
    again = _rows(campaign)
    assert len(again) == 2 and again[0] == _rows(out / "al_rounds.csv")[0]


@pytest.mark.parametrize("option, message", [
    (["--patch", "8", "8", "12"], r"--patch 8 8 12: .*multiple of 8 .*\(training.patch_size\)"),
    (["--mc-samples", "0"], r"--mc-samples 0: .*greater than or equal to 1 \(scoring.mc_samples\)"),
    (["--batch", "0"], r"--batch 0: .*greater than or equal to 1 \(strategies.clasp_labels_per_round\)"),
    (["--init-filters", "2"], r"--init-filters 2: .*greater than or equal to 4 \(network.init_filters\)"),
])
def test_bad_options_are_refused_before_any_work(tmp_path: Path, option: list[str], message: str) -> None:
    out = tmp_path / "sim"
    with pytest.raises(SystemExit, match=message):
        simulate_al.main(["--out", str(out), *ARGS, *option])
    assert not out.exists()


def test_full_pool_reference_is_each_seeds_last_round() -> None:
    from pants_tools.al_campaign import full_pool_reference

    rows = [{"strategy": "full", "seed": str(seed), "round": str(rnd), "mean_dsc": str(v)}
            for seed, rnd, v in [(0, 0, 0.1), (0, 1, 0.5), (1, 1, 0.7), (1, 0, 0.2)]]
    rows.append({"strategy": "random", "seed": "0", "round": "3", "mean_dsc": "0.9"})
    assert full_pool_reference(rows, "mean_dsc") == pytest.approx(0.6)


def test_gain_share_is_paired_by_seed_and_reaches_the_table() -> None:
    from pants_tools.al_campaign import markdown_table, summarize

    def row(strategy: str, seed: int, rnd: int, labels: int, dsc: float) -> dict[str, str]:
        return {"strategy": strategy, "seed": str(seed), "round": str(rnd), "labels": str(labels),
                "mean_dsc": str(dsc), "lesion_dsc": "0.0", "lesion_scans_labelled": "1"}

    # start 0.50; seed 0's full pool gains 0.10, seed 1's 0.02: each campaign is judged by its own seed's
    rows = [row("full", 0, 0, 10, 0.55), row("full", 0, 1, 10, 0.60), row("full", 1, 1, 10, 0.52),
            row("random", 0, 0, 2, 0.50), row("random", 0, 1, 4, 0.55),
            row("random", 1, 0, 2, 0.50), row("random", 1, 1, 4, 0.51)]
    (rec,) = summarize(rows, start={"mean_dsc": 0.50})
    assert rec["gain_share_mean_dsc"] == [0.5, 0.5]
    assert rec["gain_share_mean_mean_dsc"] == pytest.approx(0.5) and rec["gain_share_sd_mean_dsc"] == pytest.approx(0.0)
    assert "| n/a (full-pool value 0.0) | 50% +- 0% | 0.5150 +- 0.0141 | 0 of 4 (2) | 1.0 of 4 " in markdown_table([rec], [0, 1])
    assert "gain share" not in markdown_table(summarize(rows), [0, 1])  # no start model, no column
    # a full pool that gained nothing sets no share
    (flat,) = summarize(rows, start={"mean_dsc": 0.60})
    assert flat["gain_share_mean_dsc"] == [] and "the full pool gained nothing" in markdown_table([flat], [0, 1])


def test_reports_on_a_lesion_no_run_has_stay_quiet(tmp_path: Path) -> None:
    """A test split with no lesion gives NaN lesion DSC everywhere: the table and plots say n/a
    without a "Mean of empty slice" warning per cell."""
    import warnings

    from pants_tools.al_campaign import finite_mean, finite_range, markdown_table, plot_by_round, plot_curves, summarize

    rows = [{"strategy": s, "seed": str(seed), "round": str(rnd), "labels": str(2 + 2 * rnd),
             "mean_dsc": str(0.5 + 0.01 * rnd), "lesion_dsc": "nan", "lesion_auc": "nan", "lesion_scans_labelled": "0"}
            for s in ("full", "random") for seed in (0, 1) for rnd in (0, 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = markdown_table(summarize(rows), [0, 1])
        plot_curves(rows, tmp_path / "curves.png")
        plot_by_round(rows, tmp_path / "by_round.png")
    assert "| random |" in table and (tmp_path / "curves.png").stat().st_size > 1000
    assert finite_mean([0.2, float("nan"), 0.4]) == pytest.approx(0.3) and math.isnan(finite_mean([float("nan")]))
    assert finite_range([0.2, float("nan"), 0.4]) == (0.2, 0.4) and all(map(math.isnan, finite_range([])))


COHORT_ARGS = ["--cohort", "--make-phantoms", "8", "--n-test", "2", "--test-lesions", "1", "--shape", "24", "24", "24",
               "--spacing", "16", "12", "16", "--init-filters", "8", "--patch", "16", "16", "16", "--epochs", "1",
               "--iterations", "1", "--rounds", "2", "--initial", "2", "--batch", "2", "--mc-samples", "1",
               "--strategies", "clasp", "--seed-set", "unseen", "--no-full"]


def test_cohort_pool_clasp_and_seed_set(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    # one seed of the unseen set is enough here: the others would only repeat it
    assert simulate_al.main(["--out", str(out), *COHORT_ARGS[:-3], "--seeds", "3", "--no-full"]) == 0
    rows = _rows(out / "al_rounds.csv")
    assert [(r["strategy"], r["seed"], r["labels"]) for r in rows] == [("clasp", "3", "2"), ("clasp", "3", "4")]
    spec = json.loads((out / "pool" / "pool_spec.json").read_text())
    assert spec["cohort"]["file"].endswith("cohort_pants.yaml") and spec["test_lesions"] == 1
    meta = _rows(out / "pool" / "metadata.csv")
    assert {m["center"] for m in meta} <= {f"site_{k:02d}" for k in range(1, 11)}
    assert "| clasp |" in (out / "al_table.md").read_text()
    # the pool is fixed once made: other settings are refused, not mixed in
    with pytest.raises(SystemExit, match="other settings .*phantom_seed"):
        simulate_al.main(["--out", str(out), *COHORT_ARGS, "--phantom-seed", "1"])
    # the same cohort file in another checkout is the same pool
    spec["cohort"]["file"] = "/another/checkout/configs/cohort_pants.yaml"
    (out / "pool" / "pool_spec.json").write_text(json.dumps(spec))
    assert simulate_al.main(["--out", str(out), *COHORT_ARGS[:-3], "--seeds", "3", "--no-full"]) == 0
    assert simulate_al.SEED_SETS == {"tuning": [0, 1, 2], "unseen": [3, 4, 5]}


def test_campaigns_start_from_one_start_model(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    start = ["--start-model", "4", "--start-epochs", "1", "--start-iterations", "1", "--start-lesion-share", "0.5"]
    args = [*ARGS[:-1], "1", "--rounds", "1", "--no-full", "--crop-order", "class_first", *start]
    assert simulate_al.main(["--out", str(out), *args]) == 0
    folder = out / "start_model"
    spec = json.loads((folder / "start_spec.json").read_text())
    assert spec["n"] == 4 and spec["seed"] == 1000 and spec["training"]["crop_order"] == "class_first"
    assert spec["cohort"].endswith("cohort_public_venous.yaml")
    meta = _rows(folder / "data" / "metadata.csv")
    assert [m["tumor"] for m in meta].count("yes") == 2  # the forced share, spread evenly
    assert {m["contrast_phase"] for m in meta} == {"venous"}
    assert set(json.loads((folder / "start_model.json").read_text())["test"]) >= {"mean_dsc", "lesion_dsc"}
    # round 0 fine-tuned the start weights: the campaign's store has them as its first version
    stats = json.loads((out / "runs" / "hybrid_s1" / "model" / "train_stats_fast.json").read_text())
    assert stats["baseline_metric"] is not None
    # another start set is refused, not mixed in
    with pytest.raises(SystemExit, match="start model was made with other settings .*seed"):
        simulate_al.main(["--out", str(out), *args, "--start-seed", "5"])
    spec["cohort"] = "/another/checkout/configs/cohort_public_venous.yaml"  # the same file elsewhere: it fits
    (folder / "start_spec.json").write_text(json.dumps(spec))
    assert simulate_al.main(["--out", str(out), *args]) == 0


def test_a_round_killed_after_publishing_resumes_from_the_last_finished_round(tmp_path: Path) -> None:
    from pants_tools.al_campaign import _restore_served, _snapshot

    folder = tmp_path / "runs" / "hybrid_s0"
    served = folder / "model" / "segresnet_fast.pt"
    start = tmp_path / "start.pt"
    start.write_bytes(b"start weights")
    served.parent.mkdir(parents=True)
    served.write_bytes(b"round 0 trained, row never written")
    _restore_served(served, start)  # no finished round: back to the start weights
    assert served.read_bytes() == b"start weights"
    _snapshot(folder, 0).write_bytes(b"after round 0")
    served.write_bytes(b"round 1 trained, row never written")
    _restore_served(served, _snapshot(folder, 0))
    assert served.read_bytes() == b"after round 0"
    _restore_served(served, None)  # a campaign from random weights, killed in round 0
    assert not served.exists()


def test_a_bad_start_cohort_is_refused_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    with pytest.raises(SystemExit, match="--start-cohort"):
        simulate_al.main(["--out", str(out), *ARGS, "--start-model", "4", "--start-cohort", str(tmp_path / "none.yaml")])
    assert not out.exists()


def test_pinned_validation_scans_are_shared_by_strategies_and_never_trained_on(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    args = [*ARGS, "--val-scans", "2", "--dice-over", "present_classes"]
    assert simulate_al.main(["--out", str(out), *args]) == 0
    rows = _rows(out / "al_rounds.csv")
    # 7 pool scans, 2 pinned: the campaign counts 3 then 5 labels, the full pool 5
    assert [(r["strategy"], r["labels"]) for r in rows] == [("hybrid", "3"), ("hybrid", "5"), ("full", "5"), ("full", "5")]
    pinned = {}
    for name in ("hybrid_s0", "full_s0"):
        stats = json.loads((out / "runs" / name / "model" / "train_stats_fast.json").read_text())
        pinned[name] = stats["val_ids"]
        assert stats["train_size"] == int(rows[-1 if name == "full_s0" else 1]["labels"])
    assert len(pinned["hybrid_s0"]) == 2 and pinned["hybrid_s0"] == pinned["full_s0"]
    assert not set(pinned["hybrid_s0"]) & set(eval(rows[0]["selected"]))


def test_validation_scans_keep_a_tumour_and_depend_on_the_seed_only() -> None:
    from pants_tools.al_campaign import validation_scans

    pool = [f"s{i:02d}" for i in range(40)]
    lesions = {"s03", "s17", "s30"}
    picked = validation_scans(pool, lesions, 6, seed=4)
    assert len(picked) == len(set(picked)) == 6 and set(picked) <= set(pool)
    assert len(set(picked) & lesions) == 1  # 6 x 3/40 rounds to 0: at least one all the same
    assert validation_scans(pool, lesions, 6, seed=4) == picked
    assert validation_scans(pool, lesions, 6, seed=5) != picked
    assert len(set(validation_scans(pool, lesions, 20, seed=4)) & lesions) == 2  # the pool's share
    assert validation_scans(pool, set(), 3, seed=0) and validation_scans(pool, lesions, 0, seed=0) == []


def test_aubc_is_the_curves_mean_over_the_budget_and_is_paired_with_random() -> None:
    from pants_tools.al_campaign import aubc, markdown_table, summarize

    assert aubc([4, 10, 16], [0.5, 0.6, 0.6]) == pytest.approx((0.55 * 6 + 0.6 * 6) / 12)
    assert aubc([4], [0.5]) == 0.5

    def row(strategy: str, seed: int, labels: int, dsc: float) -> dict[str, str]:
        return {"strategy": strategy, "seed": str(seed), "round": str(labels), "labels": str(labels),
                "mean_dsc": str(dsc), "lesion_dsc": "0.0", "lesion_scans_labelled": "0"}

    # seed 1 is 0.1 easier for everyone: the paired difference does not see it
    rows = [row("full", s, 10, 0.6 + 0.1 * s) for s in (0, 1)]
    rows += [row("random", s, n, v + 0.1 * s) for s in (0, 1) for n, v in ((2, 0.5), (4, 0.5))]
    rows += [row("clasp", s, n, v + 0.1 * s) for s in (0, 1) for n, v in ((2, 0.5), (4, 0.54))]
    recs = {r["strategy"]: r for r in summarize(rows)}
    assert recs["clasp"]["aubc_vs_random_mean_dsc"] == [0.02, 0.02]
    assert recs["clasp"]["aubc_vs_random_sd_mean_dsc"] == pytest.approx(0.0)
    assert recs["clasp"]["aubc_sd_mean_dsc"] == pytest.approx(0.0707, abs=1e-4)
    assert "| 0.5700 +- 0.0707 (+0.0200 +- 0.0000) |" in markdown_table(list(recs.values()), [0, 1])


def test_the_gate_columns_count_served_rounds_and_stalled_campaigns() -> None:
    from pants_tools.al_campaign import summarize

    def row(seed: int, rnd: int, published: bool) -> dict[str, str]:
        return {"strategy": "random", "seed": str(seed), "round": str(rnd), "labels": str(2 + rnd),
                "mean_dsc": "0.5", "lesion_dsc": "0.0", "lesion_scans_labelled": "0", "published": str(published)}

    # seed 0: refused once, then served again; seed 1: never served after its first refusal;
    # seed 2: refused in its last round only (no later round to be served in)
    rows = [row(0, 0, True), row(0, 1, False), row(0, 2, True), row(1, 0, True), row(1, 1, False), row(1, 2, False),
            row(2, 0, True), row(2, 1, True), row(2, 2, False)]
    (rec,) = summarize(rows + [{**row(0, 0, True), "strategy": "full"}])
    assert (rec["rounds_published"], rec["rounds_run"], rec["campaigns_stalled"]) == (5, 9, 1)


def test_serve_every_round_serves_a_refused_fine_tune_and_keeps_the_gates_verdict(tmp_path: Path) -> None:
    from lib.model.model_store import ModelStore

    out = tmp_path / "sim"
    # lr 1.0 wrecks the weights within a round, so the gate refuses one (round 2 with these seeds)
    args = [*ARGS, "--rounds", "3", "--no-full", "--lr", "1.0", "--serve-every-round"]
    assert simulate_al.main(["--out", str(out), *args]) == 0
    rows = _rows(out / "al_rounds.csv")
    assert [r["published"] for r in rows] == ["True", "True", "False"]
    store = ModelStore(out / "runs" / "hybrid_s0" / "model", "fast")
    stats = json.loads((store.root / "train_stats_fast.json").read_text())
    assert stats["published"] is False and store.serving_version() == stats["version"] == "v3"
    assert store.card("v3")["published"] is False  # served, but the card still says the gate refused it
    assert [h["event"] for h in store.history()] == ["publish", "publish", "refused", "rollback"]


def test_the_full_pool_reference_runs_alone(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    strategies = ARGS.index("--strategies")
    args = [*ARGS[:strategies], "--strategies", *ARGS[strategies + 2:]]  # the option with no strategy
    assert simulate_al.main(["--out", str(out), *args]) == 0
    assert [(r["strategy"], r["round"]) for r in _rows(out / "al_rounds.csv")] == [("full", "0"), ("full", "1")]
    assert (out / "al_curves.png").stat().st_size > 1000
    assert "too short to tell whether it flattened" in (out / "al_table.md").read_text()
    with pytest.raises(SystemExit, match="no campaign to run"):
        simulate_al.main(["--out", str(tmp_path / "none"), *args, "--no-full"])


def test_the_table_says_whether_the_full_pool_reference_flattened() -> None:
    from pants_tools.al_campaign import markdown_table, reference_trend, summarize

    def full(seed: int, values: list[float]) -> list[dict[str, str]]:
        return [{"strategy": "full", "seed": str(seed), "round": str(k), "labels": "88", "mean_dsc": str(v),
                 "lesion_dsc": "0", "lesion_scans_labelled": "10", "published": "True"} for k, v in enumerate(values)]

    rising = full(3, [0.50, 0.51, 0.52, 0.53, 0.54, 0.55])  # +0.01 a round to the end
    levelled = full(4, [0.50, 0.55, 0.570, 0.5702, 0.5699, 0.5701])  # the last 4 rounds within 0.0003
    trend = reference_trend(levelled)
    assert trend["flat"] and abs(trend["slope_mean"]) < 1e-3 and trend["rounds"] == 6
    trend = reference_trend(rising + levelled)
    assert trend["slope_by_seed"]["3"] == pytest.approx(0.01) and not trend["flat"]
    table = markdown_table(summarize(rising + levelled), [3, 4], trend)
    assert "Full-pool reference after 6 rounds: still rising." in table
    assert "seed 3 +0.0100" in table and "flat means under 0.001 a round" in table
    assert reference_trend(full(3, [0.5, 0.6, 0.7])) == {}  # 3 rounds: too short to tell


def test_compare_al_runs_puts_references_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pants_tools.al_campaign import FIELDS

    cspec = importlib.util.spec_from_file_location("compare_al_runs", REPO / "scripts" / "compare_al_runs.py")
    compare = importlib.util.module_from_spec(cspec)
    cspec.loader.exec_module(compare)

    def write_run(folder: Path, seed: int, values: list[float]) -> None:
        (folder / "runs" / f"full_s{seed}").mkdir(parents=True)
        with open(folder / "runs" / f"full_s{seed}" / "rounds.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=FIELDS, restval="0")
            w.writeheader()
            w.writerows({"strategy": "full", "seed": seed, "round": k, "labels": 88, "mean_dsc": v,
                         "published": True, "selected": "[]"} for k, v in enumerate(values))

    write_run(tmp_path / "slow", 0, [0.50, 0.51, 0.52, 0.53, 0.54])
    write_run(tmp_path / "slow", 3, [0.9] * 5)  # another seed: left out by --seeds 0
    write_run(tmp_path / "fast", 0, [0.50, 0.60, 0.61, 0.6101, 0.6102, 0.6101])
    out = tmp_path / "cmp" / "lr"
    assert compare.main(["--run", f"lr 3e-4={tmp_path / 'slow'}", "--run", f"lr 1e-3={tmp_path / 'fast'}",
                         "--seeds", "0", "--out", str(out)]) == 0
    rows = _rows(out.with_suffix(".csv"))
    assert [(r["run"], r["round"]) for r in rows][:2] == [("lr 3e-4", "0"), ("lr 3e-4", "1")] and len(rows) == 11
    assert out.with_suffix(".png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "lr 3e-4 after 5 rounds: still rising" in printed and "lr 1e-3 after 6 rounds: flat" in printed
    with pytest.raises(SystemExit, match="expected LABEL=OUT"):
        compare.main(["--run", str(tmp_path / "slow"), "--out", str(out)])
    with pytest.raises(SystemExit, match="no 'full' rows for seeds 5"):
        compare.main(["--run", f"a={tmp_path / 'slow'}", "--seeds", "5", "--out", str(out)])


def test_lesion_weight_reaches_the_campaigns_and_not_the_start_model(tmp_path: Path) -> None:
    args = simulate_al.build_parser().parse_args(["--out", str(tmp_path), *ARGS, "--lesion-weight", "16"])
    args.pool = tmp_path / "pool"
    specs = simulate_al._specs(args)
    assert {s.seg_cfg.training.crop_class_weights["pancreatic_lesion"] for s in specs} == {16.0}
    assert specs[0].seg_cfg.training.crop_class_weights["pancreatic_duct"] == 2.0  # the others as shipped
    start = simulate_al._start_cfg(specs[0].seg_cfg).training
    assert start.crop_class_weights["pancreatic_lesion"] == 4.0 and start.patch_size == (16, 16, 16)
    with pytest.raises(SystemExit, match="--lesion-weight 0.0: must be > 0"):
        simulate_al.main(["--out", str(tmp_path / "bad"), *ARGS, "--lesion-weight", "0"])
    assert not (tmp_path / "bad").exists()


def test_lesion_synthesis_reaches_the_campaigns_and_not_the_start_model(tmp_path: Path) -> None:
    from pants_tools.al_start_model import recorded_training

    args = simulate_al.build_parser().parse_args(["--out", str(tmp_path), *ARGS, "--synth-lesions", "0.5"])
    args.pool = tmp_path / "pool"
    specs = simulate_al._specs(args)
    assert {s.seg_cfg.training.lesion_synthesis.probability for s in specs} == {0.5}
    start = simulate_al._start_cfg(specs[0].seg_cfg).training
    assert start.lesion_synthesis.probability == 0.0 and start.patch_size == (16, 16, 16)
    # off, it is not recorded: start models recorded before it existed still fit; on, it is
    assert "lesion_synthesis" not in recorded_training(start)
    assert recorded_training(specs[0].seg_cfg.training)["lesion_synthesis"]["probability"] == 0.5
    with pytest.raises(SystemExit, match=r"--synth-lesions 1.5: .*less than or equal to 1 \(training.lesion_synthesis.probability\)"):
        simulate_al.main(["--out", str(tmp_path / "bad"), *ARGS, "--synth-lesions", "1.5"])
    assert not (tmp_path / "bad").exists()


def test_recorded_settings_name_the_nested_key_that_differs(tmp_path: Path) -> None:
    from pants_tools.recorded_settings import refuse_other_settings

    path = tmp_path / "spec.json"
    have = {"n": 4, "training": {"patch_size": [32, 32, 32], "crop_order": "class_first"}}
    path.write_text(json.dumps(have))
    assert refuse_other_settings(path, have, "x", "y") is True
    want = {"n": 4, "training": {"patch_size": [32, 32, 32], "crop_order": "scan_first"}, "seed": 1}
    with pytest.raises(SystemExit, match=r"other settings \(seed, training.crop_order\)"):
        refuse_other_settings(path, want, "x", "y")
    assert refuse_other_settings(tmp_path / "none.json", want, "x", "y") is False


def test_a_cohort_file_in_another_checkout_is_the_same_setting(tmp_path: Path) -> None:
    """The pool records the cohort file's path for people and its hash for the comparison."""
    from pants_tools.recorded_settings import refuse_other_settings

    path = tmp_path / "pool_spec.json"
    have = {"n": 4, "cohort": {"file": "/old/clone/configs/cohort_pants.yaml", "sha256": "ab"}}
    path.write_text(json.dumps(have))
    moved = {"n": 4, "cohort": {"file": "/new/clone/configs/cohort_pants.yaml", "sha256": "ab"}}
    assert refuse_other_settings(path, moved, "x", "y", informational={"cohort.file"}) is True
    edited = {"n": 4, "cohort": {"file": "/old/clone/configs/cohort_pants.yaml", "sha256": "cd"}}
    with pytest.raises(SystemExit, match=r"other settings \(cohort.sha256\)"):
        refuse_other_settings(path, edited, "x", "y", informational={"cohort.file"})
    with pytest.raises(SystemExit, match=r"other settings \(cohort.file\)"):
        refuse_other_settings(path, moved, "x", "y")
