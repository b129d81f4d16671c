"""Settings a long simulation records beside what it made (a phantom pool, a start model), so that
a rerun with other settings is refused instead of mixing two designs in one result."""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any


def _differing(have: dict[str, Any], want: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the keys whose values differ, down to the first level that is not a dict."""
    out = []
    for k in sorted(set(have) | set(want)):
        a, b = have.get(k), want.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differing(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def refuse_other_settings(path: Path, want: dict[str, Any], what: str, alternative: str,
                          informational: Collection[str] = ()) -> bool:
    """Whether ``path`` records settings; ``SystemExit`` naming the keys that differ from ``want``.

    ``informational``: dotted keys recorded for people, not compared, such as a file's path whose
    content hash is recorded beside it (the same file in another checkout is the same setting).
    """
    if not path.is_file():
        return False
    have = json.loads(path.read_text())
    diff = [k for k in _differing(have, want) if k not in informational]
    if diff:
        raise SystemExit(f"{what} was made with other settings ({', '.join(diff)}); "
                         f"use {alternative} or the settings in {path.name}")
    return True


__all__ = ["refuse_other_settings"]
