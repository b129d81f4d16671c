"""Next-sample strategies, all lease-aware: concurrent annotators never get the same scan.

A served scan is *leased* to the asking client for ``lease_minutes``; other requests skip it
until the lease expires or a ``final`` label is saved for it. Selection and lease happen under
one lock per process, and the lease itself is an atomic insert in the index, so two server
threads (or processes) cannot hand out the same scan.

Strategies and their fallback order when scores are missing (documented in README):

``random``       an unlabelled scan, weighted by time since this strategy last served it
                 (MONAI Label's Random, answered by one index query).
``random_fg``    foreground-aware random: with probability ``fg_fraction`` a draw from the
                 ``fg_pool`` scans with the highest predicted lesion probability, weighted by it;
                 otherwise (or with no scores) ``random``.
``uncertainty``  the scan with the highest class-aware uncertainty; with no scores, ``random_fg``.
``hybrid``       (default) among the top ``candidates`` by priority (uncertainty raised by lesion
                 probability), the best sum of uncertainty, diversity (distance to the nearest
                 labelled or leased scan in embedding space, k-center) and center/phase balance;
                 with no scores, ``random_fg``.
``clasp``        class-stratified scheduled power predictive entropy (after ClaSP PE): about two
                 thirds of the requests go to a foreground class in (weighted) round-robin and get
                 the scan with the most entropy weighted by that class's probability, the rest the
                 highest overall uncertainty; Gumbel noise on the log score that decays per round
                 (explore early, exploit late). Scans scored before per-class scores existed rank
                 overall only; with no scores, ``random_fg``.

Scores from an older model still rank scans until the background scorer refreshes them.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from lib.core.al_config import StrategyConfig
from lib.core.labelmap import LabelMap, load_labelmap
from lib.datastore.protocol import ScoredStore
from lib.datastore.rows import ScoreRef, ScoreRow

logger = logging.getLogger(__name__)

#: one selection + lease at a time in this process (the lease insert is atomic across processes)
_SELECT_LOCK = threading.Lock()


def _embedding(blob: bytes | None) -> np.ndarray | None:
    return None if blob is None else np.frombuffer(blob, dtype=np.float16).astype(np.float32)


@dataclass(frozen=True)
class References:
    """Labelled/leased scans as arrays: what the diversity and balance terms compare against.

    ``emb`` has one row per scan (embeddings of the most common length, float32); ``valid``
    marks the rows that hold one. Scans without an embedding count for balance only.
    """

    ids: tuple[str, ...]
    groups: tuple[str | None, ...]
    emb: np.ndarray  # (n, dim) float32
    valid: np.ndarray  # (n,) bool

    @classmethod
    def from_rows(cls, rows: Sequence[ScoreRef]) -> References:
        """From ``(id, grp, embedding blob)`` rows; the blobs are decoded in one pass."""
        sizes = Counter(len(r.embedding) for r in rows if r.embedding)
        size = sizes.most_common(1)[0][0] if sizes else 0
        valid = np.array([bool(r.embedding) and len(r.embedding) == size for r in rows], dtype=bool)
        emb = np.zeros((len(rows), size // 2), np.float32)
        if valid.any():
            blob = b"".join(r.embedding for r, v in zip(rows, valid) if v)
            emb[valid] = np.frombuffer(blob, dtype=np.float16).reshape(int(valid.sum()), -1)
        return cls(tuple(r.id for r in rows), tuple(r.grp for r in rows), emb, valid)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.emb.shape[1]) if self.valid.any() else 0

    def then(self, other: References, limit: int) -> References:
        """These scans, then ``other``'s not already here, at most ``limit`` in all."""
        a, b = self, other
        if a.dim and b.dim and a.dim != b.dim:  # scores of two models mid-rescore: keep the larger
            a, b = (a, b._without_embeddings(a.dim)) if a.valid.sum() >= b.valid.sum() else (a._without_embeddings(b.dim), b)
        dim = a.dim or b.dim
        a, b = (x if x.dim == dim else x._without_embeddings(dim) for x in (a, b))
        have = set(a.ids)
        keep = np.array([i not in have for i in b.ids], dtype=bool)
        ids = (a.ids + tuple(i for i, k in zip(b.ids, keep) if k))[:limit]
        groups = (a.groups + tuple(g for g, k in zip(b.groups, keep) if k))[:limit]
        emb = np.concatenate([a.emb, b.emb[keep]])[:limit]
        valid = np.concatenate([a.valid, b.valid[keep]])[:limit]
        return References(ids, groups, emb, valid)

    def _without_embeddings(self, dim: int) -> References:
        n = len(self.ids)
        return References(self.ids, self.groups, np.zeros((n, dim), np.float32), np.zeros(n, bool))


class LeasingStrategy(Strategy):
    """Base class: picks with :meth:`select`, then leases the pick to the client."""

    name = "base"

    def __init__(self, description: str, cfg: StrategyConfig | None = None, seed: int | None = None) -> None:
        super().__init__(description)
        self.cfg = cfg or StrategyConfig()
        self.rng = np.random.default_rng(seed)

    def select(self, datastore: Any, now: float, name: str) -> tuple[str | None, str, dict[str, Any]]:
        """``(scan id or None, how it was chosen, extra answer fields)``; leased scans excluded."""
        raise NotImplementedError

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        name = request.get("strategy") or self.name
        if not isinstance(datastore, ScoredStore):
            raise TypeError(f"{type(datastore).__name__} keeps no leases; next-sample strategies need one that does")
        client = str(request.get("client_id") or "anonymous")
        seconds = self.cfg.lease_minutes * 60.0
        with _SELECT_LOCK:
            for _ in range(16):
                now = time.time()
                pick, how, extra = self.select(datastore, now, name)
                if pick is None:
                    logger.info("%s: no unlabelled, unleased scan left", name)
                    return {}
                if datastore.lease(pick, client, name, seconds, now=now):
                    break
                # another process leased it between the query and the insert: choose again
            else:
                return {}
        return {"id": pick, "strategy": name, "selected_by": how, "lease_expires": int(now + seconds), **extra}


class RandomUnlabeled(LeasingStrategy):
    """A random unlabelled scan, favouring those this strategy has not served recently."""

    name = "random"

    def __init__(self, cfg: StrategyConfig | None = None, seed: int | None = None) -> None:
        super().__init__("Random unlabelled scan (least recently served first, weighted)", cfg, seed)

    def select(self, datastore: Any, now: float, name: str) -> tuple[str | None, str, dict[str, Any]]:
        hit = datastore.sample_random_unlabeled(strategy=name, rng=self.rng, unleased_at=now)
        if not hit:
            return None, "random", {}
        return hit["id"], "random", {"weight": hit["weight"]}


class ForegroundRandom(LeasingStrategy):
    """Foreground-aware random: favours scans the model thinks hold a lesion (nnActive's baseline)."""

    name = "random_fg"

    def __init__(self, cfg: StrategyConfig | None = None, seed: int | None = None) -> None:
        super().__init__(
            "Foreground-aware random: part of the draws among scans with high predicted lesion probability",
            cfg, seed,
        )
        self.random = RandomUnlabeled(cfg, seed)
        self.random.rng = self.rng

    def select(self, datastore: Any, now: float, name: str) -> tuple[str | None, str, dict[str, Any]]:
        if self.rng.random() < self.cfg.fg_fraction:
            rows = datastore.top_scored("lesion_prob", now, self.cfg.fg_pool)
            if rows:
                w = np.array([max(r.lesion_prob, 0.0) for r in rows], dtype=np.float64) + 1e-6
                k = int(self.rng.choice(len(rows), p=w / w.sum()))
                return rows[k].image_id, "foreground", {"lesion_prob": round(float(rows[k].lesion_prob), 4)}
        return self.random.select(datastore, now, name)


class UncertaintyStrategy(LeasingStrategy):
    """The unlabelled scan with the highest class-aware uncertainty."""

    name = "uncertainty"

    def __init__(self, cfg: StrategyConfig | None = None, seed: int | None = None) -> None:
        super().__init__("Highest class-stratified uncertainty (falls back to random_fg without scores)", cfg, seed)
        self.fallback = ForegroundRandom(cfg, seed)
        self.fallback.rng = self.fallback.random.rng = self.rng

    def select(self, datastore: Any, now: float, name: str) -> tuple[str | None, str, dict[str, Any]]:
        rows = datastore.top_scored("uncertainty", now, 1)
        if rows:
            r = rows[0]
            return r.image_id, "uncertainty", {"uncertainty": round(float(r.uncertainty), 5), "model_version": r.model_version}
        return self.fallback.select(datastore, now, name)


class HybridStrategy(LeasingStrategy):
    """Class-aware uncertainty + diversity (k-center in embedding space) + center/phase balance."""

    name = "hybrid"

    def __init__(self, cfg: StrategyConfig | None = None, seed: int | None = None) -> None:
        super().__init__(
            "Default: class-aware uncertainty and lesion probability, diversity (k-center) and "
            "balance across centers and contrast phases",
            cfg, seed,
        )
        self.fallback = ForegroundRandom(cfg, seed)
        self.fallback.rng = self.fallback.random.rng = self.rng
        # Labelled scans' references and the pool's center/phase mix, kept until the index's
        # change counter moves (a label saved, masks revealed, scores stored): re-reading and
        # decoding ~1,000 embeddings per request cost more than the rest of the answer.
        self._cached: tuple[Any, References, dict[str | None, int]] | None = None

    def _references(self, datastore: Any, now: float) -> tuple[References, dict[str | None, int]]:
        if not isinstance(datastore, ScoredStore):  # a datastore without the counter
            refs = References.from_rows(datastore.reference_scores(now, self.cfg.max_reference))
            return refs, datastore.score_groups()
        version = datastore.references_version()
        if self._cached is None or self._cached[0] != version:
            labelled = References.from_rows(datastore.labelled_scores(self.cfg.max_reference))
            self._cached = (version, labelled, datastore.score_groups())
        _, labelled, groups = self._cached
        # Leases change on every request: read live (a handful of rows), ahead of the labelled.
        leased = References.from_rows(datastore.leased_scores(now))
        return leased.then(labelled, self.cfg.max_reference), groups

    def select(self, datastore: Any, now: float, name: str) -> tuple[str | None, str, dict[str, Any]]:
        rows = datastore.top_scored("priority", now, self.cfg.candidates)
        if not rows:
            return self.fallback.select(datastore, now, name)
        refs, groups = self._references(datastore, now)
        k, parts = hybrid_choice(rows, refs, groups, self.cfg)
        return rows[k].image_id, "hybrid", {"components": parts, "model_version": rows[k].model_version}


def hybrid_choice(
    rows: list[ScoreRow], refs: References | Sequence[ScoreRef], pool_groups: dict[str | None, int], cfg: StrategyConfig
) -> tuple[int, dict[str, float]]:
    """Index of the best candidate and its score components.

    Args:
        rows: candidates, best first by priority.
        refs: labelled/leased scans, as :class:`References` or their rows.
        pool_groups: scored scans per group (the pool's center/phase mix).
    """
    if not isinstance(refs, References):
        refs = References.from_rows(list(refs))
    prio = np.array([r.priority for r in rows], dtype=np.float64)
    u = prio / prio.max() if prio.max() > 0 else np.ones(len(rows))

    dim = refs.dim
    has = [r.embedding is not None and len(r.embedding) == 2 * dim for r in rows]  # float16 blobs
    d = np.zeros(len(rows))
    if dim and any(has):
        cand = np.zeros((len(rows), dim), np.float32)  # a candidate without one: the origin
        for k, r in enumerate(rows):
            if has[k]:
                cand[k] = np.frombuffer(r.embedding, dtype=np.float16)
        ref = refs.emb[refs.valid]
        # squared distance via dot products: (n_cand x n_ref) stays small (candidates x max_reference)
        d2 = (cand**2).sum(1)[:, None] + (ref**2).sum(1)[None, :] - 2.0 * cand @ ref.T
        d = np.sqrt(np.clip(d2.min(axis=1), 0, None))
        d = d / d.max() if d.max() > 0 else np.zeros(len(rows))

    total = sum(pool_groups.values()) or 1
    ref_groups = Counter(refs.groups)
    n_ref = len(refs)
    deficit = np.array(
        [pool_groups.get(r.grp, 0) / total - (ref_groups.get(r.grp, 0) / n_ref if n_ref else 0.0) for r in rows]
    )
    scale = np.abs(deficit).max()
    b = deficit / scale if scale > 0 else np.zeros(len(rows))

    total_score = cfg.uncertainty_weight * u + cfg.diversity_weight * d + cfg.balance_weight * b
    k = int(np.argmax(total_score))
    return k, {
        "uncertainty": round(float(u[k]), 4),
        "diversity": round(float(d[k]), 4),
        "balance": round(float(b[k]), 4),
        "total": round(float(total_score[k]), 4),
    }


@dataclass(frozen=True)
class ClassTable:
    """Scored unlabelled scans as arrays (leased ones included; they are dropped per request).

    ``classes`` is (n, C) with NaN rows where a scan has no per-class scores (an older scorer).
    """

    ids: tuple[str, ...]
    overall: np.ndarray  # (n,) class-stratified predictive entropy
    classes: np.ndarray  # (n, C) float32
    labelled: int  # scans with a live training label: the noise schedule's clock

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[str, float, bytes | None]], n_classes: int, labelled: int) -> ClassTable:
        mat = np.full((len(rows), n_classes), np.nan, np.float32)
        for k, (_, _, blob) in enumerate(rows):
            if blob is not None and len(blob) == 4 * n_classes:
                mat[k] = np.frombuffer(blob, dtype=np.float32)
        return cls(tuple(r[0] for r in rows), np.array([float(r[1]) for r in rows], np.float64), mat, labelled)


def power_pick(scores: np.ndarray, ok: np.ndarray, noise: float, rng: np.random.Generator) -> int | None:
    """Index of the best ``log(score) + noise x Gumbel`` among ``ok`` (None when none is).

    With ``noise`` 1 this draws in proportion to the score (power sampling with exponent 1);
    at 0 it is the plain argmax.
    """
    idx = np.flatnonzero(ok)
    if not len(idx):
        return None
    key = np.log(np.clip(scores[idx], 1e-12, None))
    if noise > 0:
        key = key + noise * rng.gumbel(size=len(idx))
    return int(idx[int(np.argmax(key))])


class ClassStratifiedStrategy(LeasingStrategy):
    """ClaSP-PE-style: class-stratified, scheduled power predictive entropy (see module docstring)."""

    name = "clasp"

    def __init__(self, cfg: StrategyConfig | None = None, seed: int | None = None,
                 labelmap: LabelMap | None = None) -> None:
        super().__init__(
            "Class-stratified power predictive entropy: per-class round-robin (two thirds) and overall "
            "uncertainty, with Gumbel noise that decays over the rounds",
            cfg, seed,
        )
        self.names = (labelmap or load_labelmap()).names
        self.class_weights = np.array(
            [self.cfg.clasp_class_weights.get(n, self.cfg.clasp_other_weight) for n in self.names], np.float64)
        self.fallback = ForegroundRandom(cfg, seed)
        self.fallback.rng = self.fallback.random.rng = self.rng
        self._credit = np.zeros(len(self.names))  # smooth weighted round-robin over classes
        self._served = 0  # requests answered: splits the budget between class and overall picks
        # the table is re-read only when the index's change counter moves (labels, reveals, scores)
        self._cached: tuple[Any, ClassTable] | None = None

    def noise(self, labelled: int) -> float:
        """Gumbel scale at ``labelled`` labelled scans: ``clasp_noise`` decayed once per round."""
        rounds = labelled / self.cfg.clasp_labels_per_round
        return float(self.cfg.clasp_noise * self.cfg.clasp_noise_decay**rounds)

    def _table(self, datastore: Any) -> ClassTable:
        version = datastore.references_version()
        if self._cached is None or self._cached[0] != version:
            table = ClassTable.from_rows(datastore.class_score_table(), len(self.names), datastore.count_labelled())
            self._cached = (version, table)
        return self._cached[1]

    def next_class(self) -> int | None:
        """The next foreground class in smooth weighted round-robin (None when all weights are 0)."""
        total = self.class_weights.sum()
        if total <= 0:
            return None
        self._credit += self.class_weights
        c = int(np.argmax(self._credit))
        self._credit[c] -= total
        return c

    def _class_turn(self) -> bool:
        """Whether this request is one of the ``clasp_class_share`` that go to a class (the
        first of each cycle does: with 2/3, class, class, overall, class, class, overall, ...)."""
        k, share = self._served, self.cfg.clasp_class_share
        self._served += 1
        lead = 1 - 1e-9
        return math.floor((k + 1) * share + lead) > math.floor(k * share + lead)

    def select(self, datastore: Any, now: float, name: str) -> tuple[str | None, str, dict[str, Any]]:
        table = self._table(datastore)
        if not table.ids:
            return self.fallback.select(datastore, now, name)
        leased = {x["id"] for x in datastore.active_leases(now)}
        free = np.array([i not in leased for i in table.ids], dtype=bool)
        if not free.any():
            return self.fallback.select(datastore, now, name)
        noise = self.noise(table.labelled)
        extra: dict[str, Any] = {"noise": round(noise, 4)}
        has_classes = ~np.isnan(table.classes[:, 0])
        if self._class_turn() and (free & has_classes).any():
            for _ in range(len(self.names)):  # a class nobody is predicted to hold gives its turn on
                c = self.next_class()
                if c is None:
                    break
                col = np.nan_to_num(table.classes[:, c], nan=0.0)
                k = power_pick(col, free & has_classes & (col > 0), noise, self.rng)
                if k is not None:
                    extra.update({"class": self.names[c], "class_score": round(float(col[k]), 5)})
                    return table.ids[k], f"clasp:{self.names[c]}", extra
        k = power_pick(table.overall, free, noise, self.rng)
        if k is None:
            return self.fallback.select(datastore, now, name)
        extra["uncertainty"] = round(float(table.overall[k]), 5)
        return table.ids[k], "clasp:overall", extra


def make_strategies(cfg: StrategyConfig, seed: int | None = None) -> dict[str, LeasingStrategy]:
    """All strategies, the default (``strategies.default``) first."""
    built: dict[str, LeasingStrategy] = {
        "hybrid": HybridStrategy(cfg, seed),
        "random": RandomUnlabeled(cfg, seed),
        "random_fg": ForegroundRandom(cfg, seed),
        "uncertainty": UncertaintyStrategy(cfg, seed),
        "clasp": ClassStratifiedStrategy(cfg, seed),
    }
    return {cfg.default: built.pop(cfg.default), **built}


__all__ = [
    "ClassStratifiedStrategy",
    "ClassTable",
    "ForegroundRandom",
    "HybridStrategy",
    "LeasingStrategy",
    "RandomUnlabeled",
    "References",
    "UncertaintyStrategy",
    "hybrid_choice",
    "make_strategies",
    "power_pick",
]
