#!/usr/bin/env python
"""Segment a large pool of CTs with the PanTS model, sharded over processes, GPUs and machines.

Each rank takes every N-th scan still to do; a scan is done when both its label map and its score
file exist, so an interrupted run started again does only what is left. Every file is written to a
temporary name and renamed. Rank 0 shows the progress of all ranks and, at the end, merges the
per-scan scores into one CSV and one JSON.

Inputs
  --images DIR   a PanTS root (ImageTr/<id>/ct.nii.gz, ImageTe/...) or a flat folder of <id>.nii[.gz]

Outputs in --out
  model.json           the model: weights file, SHA-256, version and card summary from its model store
  labels/<id>.nii.gz   uint8 label map in the CT's own grid (ids of configs/labels.yaml)
  scores/<id>.json     per scan: score (highest pancreatic_lesion probability), lesion_ml, timings, model_version
  errors/<id>.txt      scans that failed (tried again on the next run)
  scores.csv, scores.json   all scans merged; scores.csv feeds ``scripts/evaluate.py --scores``

Examples
  # one machine, 4 GPUs (NCCL); the same command on a CPU box uses gloo
  torchrun --standalone --nproc_per_node 4 scripts/batch_infer.py --images /data/PanTS --out runs/pred
  # two machines: run on each, with --node_rank 0 / 1
  torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29400 \\
      scripts/batch_infer.py --images /shared/PanTS --out /shared/pred
  # without torchrun: one process
  python scripts/batch_infer.py --images data/demo --out runs/pred --preset fast

The weights are the dataset's served model (<images>/.pants_label/models/segresnet_<preset>.pt, the
server's default store for that dataset) unless --model names a file (a served file or a version's
model.pt in any model store). An --out that holds predictions of another model is refused. As in
the server's infer, the pancreas second stage runs when its weights (segresnet_pancreas.pt, the
``second_stage`` preset of configs/presets.yaml) are beside the first stage's; --no-second-stage
turns it off.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

import numpy as np
import torch
import torch.distributed as dist

from lib.core.atomic import write_bytes_atomic
from lib.core.labelmap import LabelMap, load_labelmap
from lib.model.metrics import LESION_CLASS, lesion_score_from_label
from lib.datastore.pants import STATE_DIRNAME
from lib.model.model_store import ModelStore, model_path, read_json, weights_identity, write_json_atomic
from lib.model.store_location import MODELS_DIRNAME
from lib.model.pancreas_stage import SecondStage
from lib.model.segmenter import Segmenter, prepare, upsample_argmax
from lib.core.settings import load_segmentation_config
from lib.imaging.volume_io import load_volume, write_label

log = logging.getLogger("batch_infer")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
SCORE_FIELDS = ("case", "score", "lesion_ml", "lesion_max_prob", "shape", "seconds", "rank", "model_version")


# ---- what to segment ------------------------------------------------------------------------------


def list_scans(images: Path, split: str = "all") -> dict[str, Path]:
    """Scan id -> CT file, sorted by id: PanTS layout (by split) or a flat folder of NIfTI files."""
    images = Path(images)
    if not images.is_dir():
        raise SystemExit(f"--images {images}: not a folder")
    splits = {"train": ["ImageTr"], "test": ["ImageTe"], "all": ["ImageTr", "ImageTe"]}[split]
    out: dict[str, Path] = {}
    if any((images / s).is_dir() for s in ("ImageTr", "ImageTe")):
        for s in splits:
            folder = images / s
            for case in sorted(folder.iterdir()) if folder.is_dir() else []:
                ct = case / "ct.nii.gz"
                if ct.is_file():
                    out[case.name] = ct
    else:
        for f in sorted(images.iterdir()):
            for suffix in NIFTI_SUFFIXES:
                if f.is_file() and f.name.endswith(suffix) and not f.name.startswith("."):
                    out[f.name[: -len(suffix)]] = f
                    break
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class Outputs:
    root: Path

    def label(self, case: str) -> Path:
        return self.root / "labels" / f"{case}.nii.gz"

    def score(self, case: str) -> Path:
        return self.root / "scores" / f"{case}.json"

    def error(self, case: str) -> Path:
        return self.root / "errors" / f"{case}.txt"

    def done(self, case: str) -> bool:
        # the score file is written after the label map: it marks the scan as complete
        return self.score(case).is_file() and self.label(case).is_file()


# ---- one scan ---------------------------------------------------------------------------------------


def lesion_max_probability(logits: torch.Tensor, channel: int, slab: int = 16) -> float:
    """Highest softmax probability of ``channel`` over (1, C, d, h, w) logits, slab by slab (bounded memory)."""
    best = 0.0
    for a in range(0, logits.shape[2], slab):
        p = torch.softmax(logits[:, :, a : a + slab].float(), dim=1)[:, channel]
        best = max(best, float(p.max()))
    return best


def segment_scan(seg: Segmenter, ct: Path, labelmap: LabelMap, second: SecondStage | None = None
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Label map, affine and lesion scores of one CT (the infer task's pipeline, plus lesion probability)."""
    t0 = time.perf_counter()
    vol = load_volume(ct)
    prep = prepare(vol, seg.cfg, seg.preset)
    logits = seg.predict_logits(prep.image)
    prob = lesion_max_probability(logits, labelmap.id_of(LESION_CLASS))
    label = upsample_argmax(logits, prep.canonical_shape, seg.cfg.output_slab_slices)
    del logits
    label = np.ascontiguousarray(prep.reorient.from_canonical(label))  # type: ignore[attr-defined]
    if second is not None:
        label, _ = second.refine(vol, label)
    spacing = tuple(float(s) for s in np.linalg.norm(vol.affine[:3, :3], axis=0))
    ml = lesion_score_from_label(label, spacing, labelmap)
    info = {"score": round(prob, 6), "lesion_ml": round(ml, 4), "lesion_max_prob": round(prob, 6),
            "shape": list(label.shape), "seconds": round(time.perf_counter() - t0, 3)}
    return label, vol.affine, info


# ---- the run --------------------------------------------------------------------------------------


def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """Rank, world size and this rank's device; joins the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        dev = torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))  # ranks share the cores
    if world > 1:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return rank, world, dev


def shared_todo(cases: list[str], out: Outputs, rank: int, world: int) -> list[str]:
    """Scans not done yet, as seen by rank 0 (so that every rank shards the same list)."""
    todo = [c for c in cases if not out.done(c)] if rank == 0 else []
    if world > 1:
        box = [todo]
        dist.broadcast_object_list(box, src=0)
        todo = box[0]
    return todo


def merge_scores(out: Outputs, cases: list[str]) -> list[dict[str, Any]]:
    """All per-scan score files into scores.csv and scores.json (atomically)."""
    rows = []
    for c in cases:
        if out.done(c):
            rows.append(json.loads(out.score(c).read_text()))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SCORE_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "shape": "x".join(str(s) for s in r.get("shape", []))})
    write_bytes_atomic(out.root / "scores.csv", buf.getvalue().encode())
    write_json_atomic(out.root / "scores.json", rows)
    return rows


def record_model(out: Outputs, weights: Path, preset: str, images: Path, second: SecondStage | None = None
                 ) -> dict[str, Any]:
    """Write ``model.json`` (which weights, which version, the second stage's too); refuse an --out
    made by another model."""
    if not weights.is_file():
        model: dict[str, Any] = {"path": str(weights), "sha256": None, "version": None, "note": "untrained (random weights)"}
    else:
        model = weights_identity(weights, preset)
        warning = ModelStore(weights.parent, preset, str(images.resolve())).mismatch(model)
        if warning:
            log.warning(warning)
            model["warning"] = warning
    if second is not None:
        model["second_stage"] = weights_identity(second.segmenter.model_path, second.segmenter.preset_name)
    before = read_json(out.root / "model.json")
    stage2 = (before or {}).get("second_stage", {}).get("sha256"), model.get("second_stage", {}).get("sha256")
    if before and (before.get("sha256") != model["sha256"] or stage2[0] != stage2[1]) \
            and any(out.root.joinpath("scores").iterdir()):
        raise SystemExit(f"--out {out.root}: holds predictions of another model ({before.get('version') or before.get('sha256')}); "
                         "use a new --out folder")
    write_json_atomic(out.root / "model.json", model)
    log.info(f"model: version {model['version'] or 'unrecorded'} ({weights}, sha256 {str(model['sha256'])[:12]})")
    return model


def run(args: argparse.Namespace) -> int:
    rank, world, device = init_distributed(args.device)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(levelname)s %(message)s")
    cfg = load_segmentation_config()
    labelmap = load_labelmap()
    preset = args.preset if args.preset != "auto" else ("full" if device.type == "cuda" else "fast")
    weights = Path(args.model) if args.model else model_path(Path(args.images) / STATE_DIRNAME / MODELS_DIRNAME, preset)
    if not weights.is_file() and not args.allow_untrained:
        raise SystemExit(f"--model {weights}: no weights there (train first, or --allow-untrained for a dry run)")
    seg = Segmenter(cfg, labelmap, preset, weights, str(device))
    seg.network()  # load once, before the first scan
    stage2 = model_path(weights.parent, cfg.second_stage.preset)
    second = None
    if stage2.is_file() and not args.no_second_stage:
        second = SecondStage(Segmenter(cfg, labelmap, cfg.second_stage.preset, stage2, str(device)),
                             cfg.second_stage.margin_mm)
        second.segmenter.network()

    out = Outputs(Path(args.out))
    for sub in ("labels", "scores", "errors"):
        (out.root / sub).mkdir(parents=True, exist_ok=True)
    model = record_model(out, weights, preset, Path(args.images), second) if rank == 0 else {}
    if world > 1:
        box = [model]
        dist.broadcast_object_list(box, src=0)
        model = box[0]
    scans = list_scans(Path(args.images), args.split)
    cases = list(scans)[: args.limit] if args.limit else list(scans)
    todo = shared_todo(cases, out, rank, world)
    mine = todo[rank::world]
    if rank == 0:
        log.info(f"{len(cases)} scans, {len(cases) - len(todo)} already done, {len(todo)} to do "
                 f"on {world} process(es) ({device}, preset '{preset}', weights {weights})")
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="scan", desc="batch infer")
    todo_set, failed = set(todo), 0
    for case in mine:
        try:
            label, affine, info = segment_scan(seg, scans[case], labelmap, second)
            write_label(label, affine, out.label(case))
            write_json_atomic(out.score(case), {"case": case, **info, "rank": rank, "image": str(scans[case]),
                                                "model_mtime": seg.info.mtime, "preset": preset,
                                                "model_version": model.get("version"),
                                                "model_sha256": model.get("sha256")})
            out.error(case).unlink(missing_ok=True)
        except Exception as err:  # noqa: BLE001 - one bad scan must not stop a pool of thousands
            failed += 1
            out.error(case).write_text(f"{type(err).__name__}: {err}\n")
            logging.getLogger("batch_infer").error(f"{case}: {type(err).__name__}: {err}")
        if bar is not None:  # every rank's finished scans, counted from the files
            bar.n = sum(1 for f in os.listdir(out.root / "scores") if f[:-5] in todo_set)
            bar.refresh()
    if world > 1:
        counts = torch.tensor([failed], dtype=torch.int64)
        dist.all_reduce(counts)  # also waits for every rank
        failed = int(counts[0])
    if rank == 0:
        if bar is not None:
            bar.n = len(todo) - failed
            bar.close()
        rows = merge_scores(out, cases)
        log.info(f"{len(rows)} of {len(cases)} scans done; {failed} failed (see {out.root / 'errors'}); "
                 f"scores in {out.root / 'scores.csv'}")
    if world > 1:
        dist.destroy_process_group()
    return 1 if failed else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, required=True, metavar="DIR", help="PanTS root or flat folder of NIfTI CTs")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (created; done scans are kept)")
    p.add_argument("--preset", choices=("auto", "fast", "full"), default="auto",
                   help="configs/presets.yaml preset; auto: full on GPU, fast on CPU")
    p.add_argument("--model", type=Path, metavar="FILE",
                   help="weights (default: the dataset's served model, <images>/.pants_label/models/segresnet_<preset>.pt)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--split", choices=("all", "train", "test"), default="all", help="PanTS split(s) to segment")
    p.add_argument("--limit", type=int, default=0, metavar="N", help="only the first N scans (by id)")
    p.add_argument("--allow-untrained", action="store_true", help="run with random weights when no model exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-second-stage", action="store_true", help="stage 1 alone, even with pancreas-stage weights")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run(parse_args()))
