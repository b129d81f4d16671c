"""Next-sample strategies. ``random`` matches MONAI Label's Random, answered by one index query."""

from __future__ import annotations

import logging
import time
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

logger = logging.getLogger(__name__)


class RandomUnlabeled(Strategy):
    """A random unlabelled scan, favouring those this strategy has not served recently."""

    def __init__(self) -> None:
        super().__init__("Random unlabelled scan (least recently served first, weighted)")

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        name = request.get("strategy", "random")
        pick = getattr(datastore, "sample_random_unlabeled", None)
        if pick is not None:
            hit = pick(strategy=name)
        else:  # a datastore without the fast path (e.g. DICOMweb): MONAI Label's own Random
            from monailabel.tasks.activelearning.random import Random

            return Random()(request, datastore)
        if not hit:
            logger.info("no unlabelled scans left")
            return {}
        datastore.update_image_info(hit["id"], {"strategy": {name: {"ts": int(time.time()), "client_id": request.get("client_id", "user-xyz")}}})
        return {"id": hit["id"], "weight": hit["weight"]}
