"""A real Orthanc for tests (:class:`pants_tools.orthanc.Orthanc`), skipped where it is not installed."""

from __future__ import annotations

import json
import os

import pytest

from pants_tools.orthanc import CONFIG, ORTHANC, Orthanc


def require_orthanc() -> None:
    """Skip when Orthanc is not installed, except in CI (``CI`` set), where that is a failure."""
    plugin = json.loads(CONFIG.read_text())["Plugins"][0]
    missing = [p for p in (ORTHANC, plugin) if not os.path.exists(p)]
    if missing:
        msg = f"Orthanc not installed ({', '.join(missing)} missing): apt-get install orthanc orthanc-dicomweb"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)

__all__ = ["Orthanc", "require_orthanc"]
