"""Where model weights live and how a new model is published (atomically, never half-written)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def model_path(model_dir: Path, preset: str) -> Path:
    """Weights of one preset: each preset has its own spacing, hence its own model."""
    return Path(model_dir) / f"segresnet_{preset}.pt"


def read_meta(path: Path) -> dict[str, Any] | None:
    """Metadata stored with published weights, or None when no model is published."""
    if not Path(path).exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True).get("meta", {})


def publish(state_dict: dict[str, torch.Tensor], meta: dict[str, Any], path: Path) -> Path:
    """Write weights + meta to a temp file beside ``path``, fsync, then ``os.replace``.

    Readers (infer, scoring) see either the old model or the new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"state_dict": state_dict, "meta": meta}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default
