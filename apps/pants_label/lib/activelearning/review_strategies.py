"""Next-sample strategies of a review campaign (``--conf campaign review``), lease-aware like the others.

``review``         a labelled scan whose current label has no review yet, or one waiting for its
                   second reading by someone other than its first reader; QA-flagged scans first.
``senior_review``  a scan flagged for senior review (its two readings disagree); only for users
                   the nginx front gives the ``reviewer`` (or ``admin``) role.

The reader is the front's authenticated user when there is one, else the client's ``client_id``
(what :mod:`lib.datastore.provenance` records for the saved label, so the two match).
"""

from __future__ import annotations

import contextvars
from typing import Any

from lib.activelearning.strategies import LeasingStrategy
from lib.core.al_config import StrategyConfig
from lib.core.errors import ClientError
from lib.core.identity import current_identity, reader_of
from lib.datastore.pants import PanTSDatastore

_READER: contextvars.ContextVar[str] = contextvars.ContextVar("pants_reader", default="anonymous")


def _review_store(datastore: Any, name: str) -> PanTSDatastore:
    if not isinstance(datastore, PanTSDatastore) or not datastore.review.reviewing:
        raise ClientError(409, f"strategy {name!r} needs a review campaign over a PanTS root (--conf campaign review)")
    return datastore


class ReviewStrategy(LeasingStrategy):
    """Labelled scans for review and second readings (QA-flagged first)."""

    name = "review"

    def __init__(self, cfg: StrategyConfig | None = None, seed: int | None = None) -> None:
        super().__init__("Review campaign: labelled scans not yet reviewed (QA-flagged first) and second readings",
                         cfg, seed)

    def __call__(self, request: dict[str, Any], datastore: Any) -> dict[str, Any]:
        _review_store(datastore, self.name)
        request = {**request, "client_id": reader_of(request)}  # the lease is the reader's
        token = _READER.set(request["client_id"])
        try:
            return super().__call__(request, datastore)
        finally:
            _READER.reset(token)

    def select(self, datastore: Any, now: float, name: str) -> tuple[str | None, str, dict[str, Any]]:
        hit = datastore.review.next_to_review(_READER.get(), now)
        return (hit[0], hit[1], {}) if hit else (None, "review", {})


class SeniorReviewStrategy(LeasingStrategy):
    """Flagged scans, for reviewers only; their saved label becomes the scan's final."""

    name = "senior_review"

    def __init__(self, cfg: StrategyConfig | None = None, seed: int | None = None) -> None:
        super().__init__("Senior review: scans whose two readings disagree (reviewer role only)", cfg, seed)

    def __call__(self, request: dict[str, Any], datastore: Any) -> dict[str, Any]:
        who = current_identity()
        if who is None or not who.reviews:
            raise ClientError(
                403,
                "strategy 'senior_review' needs the reviewer role: log in through the nginx front with an "
                "account made by make_proxy.py --reviewer",
            )
        _review_store(datastore, self.name)
        return super().__call__({**request, "client_id": who.name}, datastore)

    def select(self, datastore: Any, now: float, name: str) -> tuple[str | None, str, dict[str, Any]]:
        pick = datastore.review.next_flagged(now)
        return pick, "flagged for senior review", {}


def review_strategies(cfg: StrategyConfig, seed: int | None = None) -> dict[str, LeasingStrategy]:
    return {"review": ReviewStrategy(cfg, seed), "senior_review": SeniorReviewStrategy(cfg, seed)}


__all__ = ["ReviewStrategy", "SeniorReviewStrategy", "review_strategies"]
