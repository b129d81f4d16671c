"""What the rest of the app may ask of a datastore, written once for both backends.

:class:`PanTSStore` is MONAI Label's ``Datastore`` plus what this app adds (a state folder, a
cached listing, metadata, random unlabeled sampling, recent final labels). Both backends
(:class:`~lib.datastore.pants.PanTSDatastore`, :class:`~lib.datastore.dicomweb.DICOMwebDatastore`)
subclass it. :class:`ScoredStore` adds what active learning needs beyond that (stored scores,
leases, the references counter); both backends keep those (:mod:`lib.datastore.indexed`). Callers choose with
``isinstance``, never by probing attributes.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag

FINAL_TAG = DefaultLabelTag.FINAL.value
#: the PanTS release's per-structure masks, shown as a label tag of their own
IMPORTED_TAG = "pants"
#: tags that make a scan "labeled", in the order training prefers them
TRAINING_TAGS: tuple[str, ...] = (FINAL_TAG, IMPORTED_TAG)


class PanTSStore(Datastore, abc.ABC):
    """A datastore this app can serve: MONAI Label's interface plus the app's additions."""

    #: the folder that holds the backend's own state (index, caches, status files)
    state_dir: Path
    #: True when image ids are local files that the server can check before an inference
    local_images: bool = False

    def json_bytes(self) -> bytes:
        """:meth:`json` as UTF-8 JSON (``GET /datastore/?output=all``); backends may cache it."""
        return json.dumps(self.json(), ensure_ascii=False, separators=(",", ":")).encode()

    def get_metadata(self, image_id: str) -> dict[str, Any]:
        """Per-scan metadata (center, phase, ...); none unless the backend keeps a table."""
        return {}

    @abc.abstractmethod
    def sample_random_unlabeled(self, **kwargs: Any) -> str | None:
        """A random unlabeled served scan (weighted as the backend documents), or None."""

    @abc.abstractmethod
    def final_labels_since(self, mark: int) -> tuple[int, int]:
        """``(scans with a final label saved after cursor mark, new cursor)`` for auto-retrain."""


class ScoredStore(PanTSStore):
    """A datastore that keeps active-learning scores and leases."""

    @abc.abstractmethod
    def store_scores(self, rows: Sequence[dict[str, Any]], info_key: str) -> list[str]: ...

    @abc.abstractmethod
    def scoring_todo(self, model_version: str) -> list[str]: ...

    @abc.abstractmethod
    def lease(self, image_id: str, client_id: str, strategy: str, seconds: float, now: float | None = None) -> bool: ...

    @abc.abstractmethod
    def active_leases(self, now: float | None = None) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    def references_version(self) -> tuple[str, int]: ...

    @abc.abstractmethod
    def count_scores(self) -> int: ...

    @abc.abstractmethod
    def class_score_table(self) -> list[tuple[str, float, bytes | None]]:
        """``(id, uncertainty, per-class scores as float32 bytes or None)`` of scored unlabeled scans."""

    @abc.abstractmethod
    def count_labelled(self) -> int:
        """Served scans with a live training label."""
