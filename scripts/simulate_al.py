#!/usr/bin/env python
"""Active-learning campaign simulator: which strategy needs the fewest labelled scans?

Replays annotation campaigns on any labelled pool in the PanTS layout (a real PanTS root or
phantoms; ImageTr = the pool whose labels are hidden until "annotated", ImageTe = the held-out
test split) with the app's own training (PanTSTrain), scoring (lib.activelearning.scoring) and strategies
(lib.activelearning.strategies). Per strategy and seed: k seed scans, then rounds of train -> evaluate -> score
-> select b -> reveal. A "full" run per seed has every pool label from round 0 and the same
rounds of training; its last round is the reference for "95% of full-pool DSC".

Writes under OUT: runs/<strategy>_s<seed>/rounds.csv (one row per round, resumable: run the same
command again after an interruption), al_rounds.csv (all rows), al_summary.csv (labels needed to
reach 95% of the full-pool DSC, mean over classes and lesion), al_table.md (the README table:
mean +- s.d. over seeds, share of random's, lesion scans served against random's expectation),
al_curves.png (learning curves, seeds as min-max bands). With --seed-set the four summary files
carry its name (al_summary_unseen.csv, ...), so tuning and unseen seeds share one OUT.

--cohort makes the phantom pool follow the PanTS cohort (configs/cohort_pants.yaml: phases,
tumour prevalence and volume, ten unequal centers, physical scale); the pool's settings are
recorded in POOL/pool_spec.json and a rerun with other settings is refused.

--start-model N trains one model on N other phantoms first (another seed, other centers, more
tumours) and starts every campaign from it, as a site starts from the app's shipped model
(pants_tools/al_start_model.py); the PanTS-cohort comparison in README uses it.

Example (the small-pool run in docs/active_learning_experiments.md; about 65 min on 2 CPU cores):
  python scripts/simulate_al.py --out out/al_sim --make-phantoms 88 --n-test 24 --shape 40 40 32 \\
      --spacing 3 3 3 --init-filters 8 --patch 32 32 32 --epochs 2 --iterations 120 --lr 3e-3 \\
      --rounds 6 --initial 4 --batch 4 --strategies hybrid random random_fg --seeds 0 1 2 --jobs 2
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

DEFAULT_COHORT_ARG = Path("configs/cohort_pants.yaml")

STRATEGIES = ("hybrid", "random", "random_fg", "uncertainty", "clasp")
#: strategies are designed and tuned on the first seeds only; the others are reported as unseen
SEED_SETS = {"tuning": [0, 1, 2], "unseen": [3, 4, 5]}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="results folder (re-run the same command to resume)")
    ap.add_argument("--pool", type=Path, help="PanTS-layout root with labels (default OUT/pool, made with --make-phantoms)")
    ap.add_argument("--make-phantoms", type=int, default=0, metavar="N", help="write N phantoms to the pool if it is missing")
    ap.add_argument("--n-test", type=int, default=16, help="phantoms held out as the test split (ImageTe)")
    ap.add_argument("--cohort", type=Path, nargs="?", const=DEFAULT_COHORT_ARG, default=None, metavar="YAML",
                    help="phantoms follow a PanTS cohort spec (default configs/cohort_pants.yaml); "
                         "its geometry unless --shape/--spacing are given")
    ap.add_argument("--test-lesions", type=int, default=None, metavar="K",
                    help="force K lesion-positive scans into the test split, the rest negative (the pool "
                         "keeps the cohort's prevalence); default: drawn like the pool")
    ap.add_argument("--shape", type=int, nargs=3, default=None, help="phantom array shape (default 40 40 32)")
    ap.add_argument("--spacing", type=float, nargs=3, default=None, help="phantom voxel size, mm (default 3 3 3)")
    ap.add_argument("--phantom-seed", type=int, default=0)
    ap.add_argument("--strategies", nargs="*", default=["hybrid", "random", "random_fg"], choices=STRATEGIES,
                    help="strategies to compare; none (the option alone): only the full-pool reference, e.g. "
                         "to see how many steps a round it needs to flatten")
    seeds = ap.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, nargs="+", default=None, help="campaign seeds (default 0 1 2)")
    seeds.add_argument("--seed-set", choices=sorted(SEED_SETS),
                       help="tuning = seeds 0 1 2 (design and tune here), unseen = 3 4 5 (report only)")
    ap.add_argument("--initial", type=int, default=4, help="seed scans labelled before round 0")
    ap.add_argument("--batch", type=int, default=4, help="scans selected per round")
    ap.add_argument("--rounds", type=int, default=6, help="rounds (training + evaluation) per campaign")
    ap.add_argument("--epochs", type=int, default=4, help="training epochs per round")
    ap.add_argument("--iterations", type=int, default=10, help="iterations per epoch")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--mc-samples", type=int, default=2, help="stochastic passes per scan when scoring")
    ap.add_argument("--init-filters", type=int, default=0,
                    help="network width for the simulation (0: presets.yaml); smaller is faster")
    ap.add_argument("--patch", type=int, nargs=3, default=None,
                    help="training patch for the simulation (default: presets.yaml, capped at the image)")
    ap.add_argument("--start-model", type=int, default=0, metavar="N",
                    help="campaigns start from a model trained once on N other phantoms (--start-seed, "
                         "--start-cohort, --start-lesion-share with a tumour), as a site starts from the "
                         "app's shipped model; 0: from random weights")
    ap.add_argument("--start-seed", type=int, default=1000, help="phantom seed of the start model's set")
    ap.add_argument("--start-cohort", type=Path, default=Path("configs/cohort_public_venous.yaml"), metavar="YAML",
                    help="cohort spec of the start model's phantoms (centers, phases, tumour volume)")
    ap.add_argument("--start-lesion-share", type=float, default=0.5, help="share of its scans with a tumour")
    ap.add_argument("--start-epochs", type=int, default=8)
    ap.add_argument("--start-iterations", type=int, default=300)
    ap.add_argument("--start-lr", type=float, default=3e-3, help="its learning rate (campaigns fine-tune with --lr)")
    ap.add_argument("--crop-order", choices=["scan_first", "class_first"], default=None,
                    help="training crops: a scan then a class in it, or a class then a scan holding it "
                         "(default: presets.yaml)")
    ap.add_argument("--lesion-weight", type=float, default=None, metavar="W",
                    help="the campaigns' crop-centre weight of the lesion class (default: presets.yaml); "
                         "the start model keeps the shipped weights")
    ap.add_argument("--val-scans", type=int, default=0, metavar="K",
                    help="pin K pool scans (drawn by seed, at least one with a tumour) as every round's "
                         "validation set, the same for every strategy and never trained on; labels are "
                         "counted without them. 0: each run splits its own labelled scans")
    ap.add_argument("--dice-over", choices=["all_classes", "present_classes"], default=None,
                    help="the campaigns' Dice term: every class, or only those in the crop (default: "
                         "presets.yaml); the start model keeps the shipped recipe")
    ap.add_argument("--synth-lesions", type=float, default=None, metavar="P",
                    help="the campaigns' share of lesion-free gland crops given a synthetic lesion "
                         "(presets.yaml training.lesion_synthesis); the start model keeps the shipped recipe")
    ap.add_argument("--serve-every-round", action="store_true",
                    help="serve each round's fine-tune even when the publish gate refuses it (the rows "
                         "keep the gate's verdict): the curves measure the labels, not the gate's noise")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", type=int, default=1, help="campaigns run in parallel (torch threads split between them)")
    ap.add_argument("--no-full", action="store_true", help="skip the full-pool reference runs")
    return ap


def _specs(args: argparse.Namespace) -> list:
    from pants_tools.al_campaign import CampaignSpec
    from pants_tools.training_options import with_option, with_recipe_options
    from lib.core.al_config import load_al_config
    from lib.core.settings import load_segmentation_config

    al = load_al_config()
    # Phantoms are small: localize at the model's own spacing (exact, and cheap at this size).
    al = with_option(al, f"--mc-samples {args.mc_samples}",
                     {"scoring": {"localize_spacing_mm": None, "mc_samples": args.mc_samples}}, prefix="")
    # one simulated round = one batch: clasp's noise decays once per round
    al = with_option(al, f"--batch {args.batch}", {"strategies": {"clasp_labels_per_round": args.batch}}, prefix="")
    request = {"max_epochs": args.epochs, "iterations_per_epoch": args.iterations, "learning_rate": args.lr,
               "batch_size": 2, "val_every": args.epochs}
    seg_cfg = load_segmentation_config()
    if args.init_filters:
        network = with_option(seg_cfg.network, f"--init-filters {args.init_filters}",
                              {"init_filters": args.init_filters}, prefix="network")
        seg_cfg = seg_cfg.model_copy(update={"network": network})
    if args.lesion_weight is not None and args.lesion_weight <= 0:
        # 0 is a valid config (never centre a lesion), not a useful campaign
        raise SystemExit(f"--lesion-weight {args.lesion_weight}: must be > 0")
    # the campaigns' recipe; the start model keeps the shipped one (_start_cfg)
    seg_cfg = seg_cfg.model_copy(update={"training": with_recipe_options(seg_cfg.training, args)})
    common = dict(pool=args.pool, out=args.out, initial=args.initial, batch=args.batch, rounds=args.rounds,
                  preset=args.preset, seg_cfg=seg_cfg, al_cfg=al, train_request=request,
                  device=args.device, val_scans=args.val_scans, serve_every_round=args.serve_every_round,
                  start_weights=_start_weights_path(args) if args.start_model else None)
    names = list(args.strategies) + ([] if args.no_full else ["full"])
    if not names:
        raise SystemExit("simulate-al: no campaign to run: name --strategies or drop --no-full")
    # seeds outermost: partial results cover every strategy early
    return [CampaignSpec(strategy=s, seed=seed, **common) for seed in args.seeds for s in names]


def _start_spec(args: argparse.Namespace):
    import hashlib

    from lib.core.errors import ConfigError
    from pants_tools.al_start_model import StartModelSpec
    from pants_tools.cohort import REPO_ROOT, load_cohort

    # the default is named from the checkout, so the command works from any folder
    path = (args.start_cohort if args.start_cohort.is_file() else REPO_ROOT / args.start_cohort).resolve()
    try:
        load_cohort(path)
    except (ConfigError, OSError) as err:
        raise SystemExit(f"--start-cohort: {err}") from None
    return StartModelSpec(cohort=str(path), cohort_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                          n=args.start_model, seed=args.start_seed, lesion_share=args.start_lesion_share,
                          shape=tuple(args.shape), spacing_mm=tuple(args.spacing), epochs=args.start_epochs,
                          iterations=args.start_iterations, lr=args.start_lr)


def _start_cfg(seg_cfg):
    """The start model's recipe: the campaigns' (network, patch, crop order), with the shipped loss,
    crop weights and lesion synthesis."""
    from lib.core.settings import TrainingConfig, load_segmentation_config

    shipped_training = load_segmentation_config().training
    shipped = {"dice_over": TrainingConfig.model_fields["dice_over"].default,
               "crop_class_weights": shipped_training.crop_class_weights,
               "lesion_synthesis": shipped_training.lesion_synthesis}
    return seg_cfg.model_copy(update={"training": seg_cfg.training.model_copy(update=shipped)})


def _start_dir(args: argparse.Namespace) -> Path:
    return args.out / "start_model"


def _start_weights_path(args: argparse.Namespace) -> Path:
    from lib.model.model_store import model_path

    return model_path(_start_dir(args) / "model", args.preset)


def _run_one(spec, threads: int) -> int:
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(threads)
    from pants_tools.al_campaign import run_campaign

    return len(run_campaign(spec))


def _count_rows(specs: list) -> int:
    from pants_tools.al_campaign import read_rows

    return sum(len(read_rows(s.folder / "rounds.csv")) for s in specs)


def _run_parallel(specs: list, jobs: int, threads: int, bar) -> None:
    with ProcessPoolExecutor(max_workers=jobs) as ex:
        futures = [ex.submit(_run_one, s, threads) for s in specs]
        while not all(f.done() for f in futures):
            time.sleep(2)
            bar.n = _count_rows(specs)
            bar.refresh()
        for f in futures:
            f.result()  # re-raise a campaign's error


def _cohort(args: argparse.Namespace):
    """The cohort spec (None without --cohort); fills --shape/--spacing from its geometry."""
    cohort = None
    if args.cohort is not None:
        from lib.core.errors import ConfigError
        from pants_tools.cohort import DEFAULT_COHORT, load_cohort

        path = DEFAULT_COHORT if args.cohort == DEFAULT_COHORT_ARG else args.cohort
        try:
            cohort = load_cohort(path.resolve())
        except ConfigError as err:
            raise SystemExit(f"--cohort: {err}") from None
        args.cohort = path.resolve()
    args.shape = tuple(args.shape or (cohort.geometry.shape if cohort else (40, 40, 32)))
    args.spacing = tuple(args.spacing or (cohort.geometry.spacing_mm if cohort else (3.0, 3.0, 3.0)))
    return cohort


def _make_pool(args: argparse.Namespace, cohort) -> None:
    """Write the phantom pool once; its settings go to pool_spec.json and must match on reruns."""
    import hashlib

    from pants_tools.recorded_settings import refuse_other_settings

    want = {"n": args.make_phantoms, "n_test": args.n_test, "shape": list(args.shape),
            "spacing_mm": list(args.spacing), "phantom_seed": args.phantom_seed,
            "test_lesions": args.test_lesions,
            "cohort": None if cohort is None else {"file": str(args.cohort),
                                                   "sha256": hashlib.sha256(args.cohort.read_bytes()).hexdigest()}}
    spec_file = args.pool / "pool_spec.json"
    if (args.pool / "ImageTr").is_dir():
        if args.make_phantoms:
            refuse_other_settings(spec_file, want, f"--pool {args.pool}", "another --out/--pool",
                                  informational={"cohort.file"})  # the file is its sha256
        if not spec_file.is_file() or not args.make_phantoms:
            return
    if not args.make_phantoms:
        raise SystemExit(f"--pool {args.pool}: no ImageTr/ there; pass --make-phantoms N to create phantoms")
    if args.test_lesions is not None and not 0 <= args.test_lesions <= args.n_test:
        raise SystemExit(f"--test-lesions {args.test_lesions}: must be between 0 and --n-test {args.n_test}")
    from lib.model.model_store import write_json_atomic
    from pants_tools.phantom import write_pants_tree

    first_test = args.make_phantoms - args.n_test
    lesions = None if args.test_lesions is None else {
        i: i - first_test < args.test_lesions for i in range(first_test, args.make_phantoms)}
    args.pool.mkdir(parents=True, exist_ok=True)
    write_json_atomic(spec_file, want)  # first: a half-written pool is resumed with the same settings
    write_pants_tree(args.pool, args.make_phantoms, shape=args.shape, spacing=args.spacing,
                     seed=args.phantom_seed, n_test=args.n_test, progress=True, lesions=lesions, cohort=cohort)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    args.pool = args.pool or args.out / "pool"
    args.seeds = args.seeds or SEED_SETS.get(args.seed_set or "", [0, 1, 2])
    suffix = f"_{args.seed_set}" if args.seed_set else ""
    cohort = _cohort(args)
    specs = _specs(args)  # settings errors stop the run before anything is written
    start_spec = _start_spec(args) if args.start_model else None
    args.out.mkdir(parents=True, exist_ok=True)
    _make_pool(args, cohort)
    if start_spec is not None:
        print(f"start model: {args.start_model} phantoms (seed {args.start_seed}), "
              f"{args.start_epochs} x {args.start_iterations} steps", flush=True)
        import multiprocessing

        from pants_tools.al_start_model import train_start_model

        # In a fresh (spawned) process: torch's thread pool must not exist in this one when it forks
        # the campaigns, and a fork of a process that has one can hang.
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as ex:
            ex.submit(train_start_model, _start_dir(args), start_spec, _start_cfg(specs[0].seg_cfg), args.preset,
                      args.pool, args.device, threads=os.cpu_count() or 1).result()
    total = sum(s.rounds for s in specs)
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    bar = tqdm(total=total, desc="rounds", unit="round", initial=_count_rows(specs))
    t0 = time.time()
    if args.jobs <= 1:  # in this process: the bar moves per round
        import torch

        from pants_tools.al_campaign import run_campaign

        torch.set_num_threads(threads)
        for s in specs:
            run_campaign(s, on_round=lambda: bar.update(1))
    else:
        _run_parallel(specs, args.jobs, threads, bar)
    bar.n = _count_rows(specs)
    bar.close()

    from pants_tools.al_campaign import (FIELDS, markdown_table, plot_curves, read_rows, reference_trend, summarize,
                                         trend_sentence)

    rows = [r for s in specs for r in read_rows(s.folder / "rounds.csv")]
    with open(args.out / f"al_rounds{suffix}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    from pants_tools.al_start_model import start_model_summary

    start = start_model_summary(_start_dir(args)) if args.start_model else None
    summary = summarize(rows, start=(start or {}).get("test"))
    keys = ["strategy", "seeds", "full_pool_mean_dsc", "labels_to_95pct_mean_dsc", "final_mean_dsc",
            "full_pool_lesion_dsc", "labels_to_95pct_lesion_dsc", "final_lesion_dsc",
            "final_labels", "final_lesion_scans", "expected_lesion_scans", "per_seed_mean_dsc", "per_seed_lesion_dsc",
            "seed_mean_mean_dsc", "seed_sd_mean_dsc", "seeds_reaching_mean_dsc",
            "seed_mean_lesion_dsc", "seed_sd_lesion_dsc", "seeds_reaching_lesion_dsc",
            "gain_share_mean_dsc", "gain_share_mean_mean_dsc", "gain_share_sd_mean_dsc",
            "aubc_mean_mean_dsc", "aubc_sd_mean_dsc", "aubc_vs_random_mean_dsc", "aubc_vs_random_mean_mean_dsc",
            "aubc_vs_random_sd_mean_dsc", "rounds_published", "rounds_run", "campaigns_stalled"]
    with open(args.out / f"al_summary{suffix}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(summary)
    trend = reference_trend(rows)
    (args.out / f"al_table{suffix}.md").write_text(markdown_table(summary, args.seeds, trend))
    plot_curves(rows, args.out / f"al_curves{suffix}.png", start=(start or {}).get("test"))
    if start:
        print(f"start model on the test split: {start['test']}")
    rnd = next((r for r in summary if r["strategy"] == "random"), None)

    def fmt(v: float) -> str:
        return "n/a" if math.isnan(v) else "never" if math.isinf(v) else f"{v:.1f}"

    def share(v: float) -> str:
        return "n/a" if math.isnan(v) else f"{v:.0%}"

    print(f"\n{len(specs)} campaigns in {time.time() - t0:.0f} s; labels to reach 95% of the full-pool value "
          "(mean of seeds' curves)")
    print(f"{'strategy':<12} {'mean DSC':>9} {'vs random':>10} {'lesion DSC':>11} {'vs random':>10} {'lesion scans':>13}"
          + (f" {'gain share':>11}" if start else "") + f" {'AUBC':>7} {'vs random':>10}")
    for r in summary:
        ratio = []
        for m in ("mean_dsc", "lesion_dsc"):
            a = r[f"labels_to_95pct_{m}"]
            b = rnd[f"labels_to_95pct_{m}"] if rnd else math.nan
            ratio.append(f"{a / b:.0%}" if rnd and math.isfinite(a) and math.isfinite(b) and b else "-")
        print(f"{r['strategy']:<12} {fmt(r['labels_to_95pct_mean_dsc']):>9} {ratio[0]:>10} "
              f"{fmt(r['labels_to_95pct_lesion_dsc']):>11} {ratio[1]:>10} "
              f"{r['final_lesion_scans']:>6.2f} of {r['final_labels']}"
              + (f" {share(r.get('gain_share_mean_mean_dsc', math.nan)):>11}" if start else "")
              + f" {r['aubc_mean_mean_dsc']:>7.4f} {r['aubc_vs_random_mean_mean_dsc']:>+10.4f}")
    print(trend_sentence(trend))
    print(f"wrote {', '.join(str(args.out / f'{n}{suffix}.{e}') for n, e in (('al_rounds', 'csv'), ('al_summary', 'csv'), ('al_table', 'md'), ('al_curves', 'png')))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
