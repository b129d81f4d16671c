"""The facts a model card records, gathered where each is known.

A card (JSON, one per version, :class:`lib.model.model_store.ModelStore`) says: preset and
network; the training scans by center, contrast phase and tumour status; which labels trained
it (``final`` or imported ``pants``) and how many; per-class validation DSC and NSD; the baseline
it beat; training time and device; the code version; the parent version.
"""

from __future__ import annotations

import functools
import subprocess
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from lib.core.labelmap import REPO_ROOT as _REPO



def training_scans(entries: Sequence[tuple[str, str]], metadata: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Counts of the training scans by center, phase, tumour status and label source.

    Args:
        entries: ``(image id, label tag)`` of every scan the run trained on.
        metadata: ``{image id: metadata row}`` (missing rows count as unknown).
    """
    def count(key: str, fmt: Any = str) -> dict[str, int]:
        c: Counter[str] = Counter()
        for image_id, _tag in entries:
            v = (metadata.get(image_id) or {}).get(key)
            c["unknown" if v is None else fmt(v)] += 1
        return dict(sorted(c.items()))

    return {
        "scans": len(entries),
        "by_center": count("center"),
        "by_phase": count("contrast_phase"),
        "by_tumor": count("tumor", lambda v: "tumor" if v else "no tumor"),
        "label_tags": dict(sorted(Counter(tag for _i, tag in entries).items())),
    }


def per_class(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Mean DSC and NSD per class over validation scans (rows of :func:`lib.model.metrics.evaluate_case`).

    Classes absent from both prediction and truth on a scan are left out of that class's mean
    (they would count as a perfect 1.0 and hide misses elsewhere).
    """
    acc: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        if r.get("empty_both"):
            acc.setdefault(r["class"], {"dsc": [], "nsd": []})
            continue
        a = acc.setdefault(r["class"], {"dsc": [], "nsd": []})
        a["dsc"].append(float(r["dsc"]))
        a["nsd"].append(float(r["nsd"]))
    return {c: {k: (round(float(np.mean(v)), 4) if v else None) for k, v in a.items()} | {"scans": len(a["dsc"])}
            for c, a in acc.items()}


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of this checkout (``+dirty`` with local changes), else the package version."""
    try:
        head = subprocess.run(["git", "-C", str(_REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(_REPO), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return f"pants-label {version('pants-label')}"
    except Exception:  # noqa: BLE001 - no git, no installed metadata
        return "unknown"


def device_description(device: str, world: int) -> str:
    """``"cpu x2 (gloo)"``, ``"cuda NVIDIA H200 x8 (nccl)"``, ``"cpu"``."""
    if device == "cuda":
        import torch

        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cuda"
        return f"cuda {name}" + (f" x{world} (nccl)" if world > 1 else "")
    return "cpu" + (f" x{world} (gloo)" if world > 1 else "")


__all__ = ["training_scans", "per_class", "code_version", "device_description"]
