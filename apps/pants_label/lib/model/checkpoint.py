"""A training run's resumable state on disk: written atomically after each epoch, read at start.

One file per run (its name carries the run's identity, see :mod:`lib.trainers.segmentation`): a
run killed at any moment leaves the last complete epoch's state (or none), never a partial file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import torch

from lib.core.atomic import atomic_write

logger = logging.getLogger(__name__)


class Checkpoint:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none (or it cannot be read: start afresh)."""
        if not self.path.exists():
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - an unreadable checkpoint only costs the epochs it held
            logger.warning(f"ignoring unreadable checkpoint {self.path}: {err}")
            return None

    def save(self, state: dict[str, Any]) -> None:
        atomic_write(self.path, lambda tmp: torch.save(state, tmp))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def run_checkpoint(run_dir: Path, facts: dict[str, Any]) -> Checkpoint:
    """The checkpoint of the run these ``facts`` identify (data, options, parent weights...): only a
    run with the same facts resumes from it. Checkpoints that killed runs of other facts left in
    ``run_dir`` are removed."""
    key = hashlib.sha1(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(run_dir) / f"checkpoint-{key}.pt"
    for stale in Path(run_dir).glob("checkpoint-*.pt"):
        if stale != path:
            stale.unlink(missing_ok=True)
    return Checkpoint(path)


def label_stamps(pairs: dict[str, dict[str, Any]], ids: Iterable[str]) -> list[tuple[str, str, int]]:
    """(id, label file, mtime) of each scan: a run's facts change when a reader saves a label."""
    return [(i, pairs[i]["label"], os.stat(pairs[i]["label"]).st_mtime_ns) for i in ids]


__all__ = ["Checkpoint", "label_stamps", "run_checkpoint"]
