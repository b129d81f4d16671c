"""Where a server's model store lives, and what names its dataset (duck-typed on the datastore).

Each dataset gets its own models: ``<datastore state folder>/models`` (``ROOT/.pants_label/models``
for a PanTS root), so serving another dataset never picks up weights trained here. ``--conf
model_dir`` puts them elsewhere; the cards then say which dataset each version was trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODELS_DIRNAME = "models"


def model_dir_for(setting: str | None, datastore: Any) -> Path:
    """``--conf model_dir`` if given, else the datastore's state folder's ``models``; created."""
    if setting:
        folder = Path(setting).expanduser()
    else:
        state = getattr(datastore, "state_dir", None)
        if state is None:
            raise ValueError(f"{type(datastore).__name__} has no state folder: give --conf model_dir")
        folder = Path(state) / MODELS_DIRNAME
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def dataset_identity(datastore: Any) -> str | None:
    """The dataset a model is trained on or served for: a PanTS root's path, a DICOMweb URL."""
    for attr in ("root", "url"):
        value = getattr(datastore, attr, None)
        if value:
            return str(value)
    return None


__all__ = ["MODELS_DIRNAME", "model_dir_for", "dataset_identity"]
