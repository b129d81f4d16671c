"""Where model weights live and how a new model is published (atomically, never half-written).

``write_json_atomic`` is :func:`lib.atomic.write_json_atomic`, re-exported for the trainers and scoring.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lib.core.atomic import atomic_write, write_json_atomic


def model_path(model_dir: Path, preset: str) -> Path:
    """Weights of one preset: each preset has its own spacing, hence its own model."""
    return Path(model_dir) / f"segresnet_{preset}.pt"


def read_meta(path: Path) -> dict[str, Any] | None:
    """Metadata stored with published weights, or None when no model is published."""
    if not Path(path).exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True).get("meta", {})


def publish(state_dict: dict[str, torch.Tensor], meta: dict[str, Any], path: Path) -> Path:
    """Write weights + meta atomically (:mod:`lib.core.atomic`): readers (infer, scoring) see either
    the old model or the new one, never a partial file."""
    return atomic_write(path, lambda tmp: torch.save({"state_dict": state_dict, "meta": meta}, tmp))


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


__all__ = ["model_path", "read_meta", "publish", "read_json", "write_json_atomic"]
