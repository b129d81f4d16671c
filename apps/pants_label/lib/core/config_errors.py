"""Loading declarative config files into pydantic models with errors that name the key.

:class:`ConfigError` itself lives in :mod:`lib.core.errors` (the one error type) and is
re-exported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from lib.core.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def format_validation_error(source: str, err: ValidationError) -> str:
    lines = [f"invalid settings in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        value = e.get("input")
        shown = "" if isinstance(value, (dict, list)) else f" (got {value!r})"
        lines.append(f"  {key}: {e['msg']}{shown}")
    return "\n".join(lines)


def validate_model(source: str, model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err)) from None


def load_yaml_model(path: Path, model: type[M]) -> M:
    """Read YAML at ``path`` and validate it as ``model``; raises ``ConfigError`` on any problem."""
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return validate_model(str(path), model, data)
