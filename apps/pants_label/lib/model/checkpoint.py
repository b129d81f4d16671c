"""A training run's resumable state on disk: written atomically after each epoch, read at start.

One file per run (its name carries the run's identity, see :mod:`lib.trainers.segmentation`): a
run killed at any moment leaves the last complete epoch's state (or none), never a partial file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

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


__all__ = ["Checkpoint"]
