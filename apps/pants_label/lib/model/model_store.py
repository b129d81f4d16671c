"""Where model weights live: immutable versions with a model card each, and the one file served.

One store per dataset and preset (the app puts it in the datastore's state folder unless
``--conf model_dir`` says otherwise)::

    <model_dir>/segresnet_<preset>.pt            the weights infer and scoring load (reloaded by mtime)
    <model_dir>/versions/<preset>/v<N>/model.pt  version N, never changed after it is written
    <model_dir>/versions/<preset>/v<N>/card.json its model card (sha256 of model.pt, time, parent...)
    <model_dir>/versions/<preset>/history.jsonl  every publish, refusal, rollback and pruning, one JSON line each

A run the publish rule refuses is kept as a version too (``published: false`` and ``refused`` in
its card) but not served: every run stays inspectable, and an admin may serve it by rollback.
Only the newest few refused runs are kept (:meth:`ModelStore.prune_refused`).

Serving a version means copying its bytes atomically over the served file, so the served file's
SHA-256 names the version (a rollback is the same copy of an older version). Weights placed in
the folder by hand are recorded as a version the first time the store sees them
(:meth:`ModelStore.adopt_serving`), so every served model has a card.

``write_json_atomic`` is :func:`lib.core.atomic.write_json_atomic`, re-exported for the trainers and scoring.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch

from lib.core.atomic import atomic_write, fsync_dir, fsync_file, tmp_path, write_json_atomic
from lib.core.errors import ClientError, unknown

logger = logging.getLogger(__name__)

_VERSION = re.compile(r"^v([1-9][0-9]{0,8})$")
WEIGHTS, CARD, HISTORY = "model.pt", "card.json", "history.jsonl"


def model_path(model_dir: Path, preset: str) -> Path:
    """Weights of one preset: each preset has its own spacing, hence its own model."""
    return Path(model_dir) / f"segresnet_{preset}.pt"


def read_meta(path: Path) -> dict[str, Any] | None:
    """Metadata stored with published weights, or None when no model is published."""
    if not Path(path).exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True).get("meta", {})


def non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors in ``state`` holding NaN or inf (a diverged run)."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def diverged(state: dict[str, torch.Tensor]) -> str | None:
    """Why these weights must never be served (NaN or inf: their output is meaningless), or None."""
    bad = non_finite(state)
    return f"non-finite weights in {len(bad)} tensors (first: {bad[0]}): training diverged" if bad else None


def publish(state_dict: dict[str, torch.Tensor], meta: dict[str, Any], path: Path) -> Path:
    """Write weights + meta atomically (:mod:`lib.core.atomic`): readers (infer, scoring) see either
    the old model or the new one, never a partial file. Unversioned: use :meth:`ModelStore.publish`."""
    return atomic_write(path, lambda tmp: torch.save({"state_dict": state_dict, "meta": meta}, tmp))


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def version_number(name: str) -> int:
    m = _VERSION.match(name)
    if m is None:
        raise ValueError(name)
    return int(m.group(1))


class ModelStore:
    """The versions of one preset's model in one folder, and which of them is served.

    Thread- and process-safe for what the app does: versions are created by renaming a complete
    folder into place (two publishers never get the same number), the served file is replaced
    atomically, and readers cache by file identity so they see a rollback at their next call.
    """

    def __init__(self, root: Path, preset: str, dataset: str | None = None) -> None:
        """``dataset``: what this server serves (a PanTS root, a DICOMweb URL), recorded in new
        cards and compared with the served card's."""
        self.root = Path(root)
        self.preset = preset
        self.dataset = dataset
        self.serving_path = model_path(self.root, preset)
        self.versions_dir = self.root / "versions" / preset
        self._lock = threading.Lock()
        self._hash_cache: tuple[tuple[int, int, int], str] | None = None
        self._cards_cache: tuple[tuple, dict[str, dict[str, Any]]] | None = None

    # ---- reading ------------------------------------------------------------------------------
    def versions(self) -> list[dict[str, Any]]:
        """Every version's card, oldest first."""
        return [self._cards()[v] for v in sorted(self._cards(), key=version_number)]

    def card(self, version: str) -> dict[str, Any]:
        """The card of ``version``; 404 naming the known versions otherwise."""
        cards = self._cards()
        if version not in cards:
            raise ClientError(404, unknown("model version", version, sorted(cards, key=version_number), ordered=True)
                              if cards else f"unknown model version {version!r}: no version is stored yet")
        return cards[version]

    def serving_sha256(self) -> str | None:
        """SHA-256 of the served file (hashed again only when the file changes), None if none."""
        stamp = _stamp(self.serving_path)
        if stamp is None:
            return None
        with self._lock:
            if self._hash_cache is None or self._hash_cache[0] != stamp:
                self._hash_cache = (stamp, sha256_file(self.serving_path))
            return self._hash_cache[1]

    def version_of(self, sha256: str | None) -> str | None:
        """The version whose weights have this hash (None: not a stored version)."""
        if sha256 is None:
            return None
        for name, card in self._cards().items():
            if card.get("sha256") == sha256:
                return name
        return None

    def serving_version(self) -> str | None:
        """The version served now (``"v3"``), None when no weights or unrecorded weights are served."""
        return self.version_of(self.serving_sha256())

    def serving(self) -> dict[str, Any]:
        """What ``/info`` shows: the served version's card, where it came from, and any mismatch."""
        sha = self.serving_sha256()
        if sha is None:
            return {"path": str(self.serving_path), "trained": False, "version": None,
                    "note": "no trained model: predictions are random"}
        version = self.version_of(sha)
        card = dict(self._cards()[version]) if version else {}
        out: dict[str, Any] = {"path": str(self.serving_path), "trained": True, "version": version, "sha256": sha,
                               "versions": len(self._cards()), **card}
        out["version"], out["path"] = version, str(self.serving_path)
        if version is None:
            out["source"] = "unrecorded weights in the model folder (the server records them at its next start)"
        warning = self.mismatch(card)
        if warning:
            out["warning"] = warning
        return out

    def mismatch(self, card: dict[str, Any]) -> str | None:
        """Why the card's model may not fit what this server serves (None when it does)."""
        if card.get("preset") not in (None, self.preset):
            return f"these weights were trained for preset {card['preset']!r}, this server runs {self.preset!r}"
        trained_on = card.get("dataset")
        if self.dataset and trained_on and trained_on != self.dataset:
            return f"these weights were trained on another dataset ({trained_on}), not on {self.dataset}"
        return None

    def _cards(self) -> dict[str, dict[str, Any]]:
        """``{version: card}``, read again only when the versions folder changes."""
        try:
            names = sorted(n for n in os.listdir(self.versions_dir) if _VERSION.match(n))
            key = (tuple(names), os.stat(self.versions_dir).st_mtime_ns)
        except FileNotFoundError:
            return {}
        with self._lock:
            if self._cards_cache is None or self._cards_cache[0] != key:
                cards = {}
                for n in names:
                    card = read_json(self.versions_dir / n / CARD)
                    if isinstance(card, dict):
                        cards[n] = card
                self._cards_cache = (key, cards)
            return self._cards_cache[1]

    # ---- writing ------------------------------------------------------------------------------
    def publish(self, state_dict: dict[str, torch.Tensor], meta: dict[str, Any], card: dict[str, Any]) -> str:
        """Store the weights as a new version with ``card``, then serve it. Returns the version name.

        ``meta`` goes inside the weights file (what infer checks: labels, preset, preprocessing).
        """
        why = diverged(state_dict)
        if why:  # the trainer keeps such runs with keep(); this guards every other caller
            raise ValueError(f"refusing to publish: {why}")
        version = self._store(state_dict, meta, {**card, "published": True})
        self._serve(version, "publish")
        return version

    def keep(self, state_dict: dict[str, torch.Tensor], meta: dict[str, Any], card: dict[str, Any],
             reason: str) -> str:
        """Store a run's weights that the publish rule refused as a version that is not served.
        Every run stays inspectable (its card has its validation scores and ``refused``, why), and
        an admin may still serve it with :meth:`rollback`. Returns the version name."""
        version = self._store(state_dict, meta, {**card, "published": False, "refused": reason})
        self._log({"event": "refused", "version": version, "reason": reason})
        return version

    def _store(self, state_dict: dict[str, torch.Tensor], meta: dict[str, Any], card: dict[str, Any]) -> str:
        def write(folder: Path, version: str) -> None:
            torch.save({"state_dict": state_dict, "meta": {**meta, "version": version}}, folder / WEIGHTS)

        version = self._new_version(write, card)
        assert version is not None  # None only when adopting a file that changed under it
        return version

    def adopt_serving(self) -> str | None:
        """Record served weights that are no stored version (placed by hand, or from before versions
        existed) as a new version, without touching the served file. Returns that version or None."""
        sha = self.serving_sha256()
        if sha is None or self.version_of(sha) is not None:
            return None
        src = self.serving_path
        meta = read_meta(src) or {}
        keep = ("preset", "summary", "val_metric", "train_size", "published_ts", "phantom_model", "note", "labels",
                "test_dice", "train_cpu_s", "spacing_mm", "dataset")
        card = {k: meta[k] for k in keep if k in meta}
        card["source"] = "weights placed in the model folder"
        version = self._new_version(lambda folder, _v: shutil.copyfile(src, folder / WEIGHTS), card, expect_sha=sha)
        if version is not None:
            self._log({"event": "adopt", "version": version})
            logger.info(f"recorded the served weights {src} as model version {version}")
        return version

    def rollback(self, version: str, by: str | None = None) -> dict[str, Any]:
        """Serve an earlier (or any stored) version again; infer and scoring pick it up by mtime.
        A version whose weights diverged (NaN or inf) is refused with 409: nothing could use it."""
        self.card(version)  # 404 for an unknown version
        state = torch.load(self.versions_dir / version / WEIGHTS, map_location="cpu", weights_only=True)
        why = diverged(state.get("state_dict", {}))
        if why:
            raise ClientError(409, f"version {version} is never served: {why}; choose another version")
        before = self.serving_version()
        self._serve(version, "rollback", by=by, previous=before)
        return {"version": version, "previous": before, "card": self.card(version)}

    def prune_refused(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` (>= 1) refused versions, so that retraining on every
        few labels does not fill the disk with runs nobody served. Published versions, the served
        one and any version an admin ever served stay: rollback and provenance need them. The
        newest version is never deleted, so version numbers are never reused. Returns the deleted."""
        if keep < 1:
            raise ValueError(f"keep {keep}: at least the newest refused version stays")
        served = {h.get("version") for h in self.history() if h.get("event") in ("publish", "rollback", "adopt")}
        served.add(self.serving_version())
        refused = [c["version"] for c in self.versions() if c.get("published") is False and c["version"] not in served]
        doomed = refused[:-keep]
        for version in doomed:
            trash = tmp_path(self.versions_dir / version)
            os.rename(self.versions_dir / version, trash)  # gone from listings at once, even if rmtree stops
            fsync_dir(self.versions_dir)
            shutil.rmtree(trash, ignore_errors=True)
            self._log({"event": "pruned", "version": version})
        if doomed:
            logger.info(f"deleted {len(doomed)} refused model versions ({', '.join(doomed)}); the newest {keep} stay")
        return doomed

    def _serve(self, version: str, event: str, **extra: Any) -> None:
        src = self.versions_dir / version / WEIGHTS
        atomic_write(self.serving_path, lambda tmp: shutil.copyfile(src, tmp))
        self._log({"event": event, "version": version, **{k: v for k, v in extra.items() if v is not None}})

    def _log(self, entry: dict[str, Any]) -> None:
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        with open(self.versions_dir / HISTORY, "a") as f:  # one short line: O_APPEND writes do not interleave
            f.write(json.dumps({"ts": time.time(), **entry}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def history(self) -> list[dict[str, Any]]:
        try:
            lines = (self.versions_dir / HISTORY).read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash: skip it
                continue
        return out

    def _new_version(self, write: Any, card: dict[str, Any], expect_sha: str | None = None) -> str | None:
        """Write a version folder and rename it to the next free ``v<N>`` (retrying on a race)."""
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        while True:
            numbers = [version_number(n) for n in os.listdir(self.versions_dir) if _VERSION.match(n)]
            version = f"v{max(numbers, default=0) + 1}"
            staging = tmp_path(self.versions_dir / version)
            staging.mkdir()
            try:
                write(staging, version)
                sha = sha256_file(staging / WEIGHTS)
                if expect_sha is not None and sha != expect_sha:
                    return None  # the served file changed while it was copied: adopt it next time
                full = {"version": version, "sha256": sha, "created_ts": time.time(),
                        "preset": self.preset, **({"dataset": self.dataset} if self.dataset else {}), **card}
                full["version"], full["sha256"] = version, sha
                (staging / CARD).write_text(json.dumps(full, indent=1, default=str))
                for f in staging.iterdir():
                    fsync_file(f)
                try:
                    os.rename(staging, self.versions_dir / version)  # fails if another writer took N
                except OSError:
                    if (self.versions_dir / version).exists():
                        continue
                    raise
                fsync_dir(self.versions_dir)
                return version
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)




def weights_identity(path: Path, preset: str) -> dict[str, Any]:
    """What names a weights file in an output (batch inference, evaluation): its hash, and its
    version and card summary when it is the served file or a version of a model store."""
    path = Path(path).resolve()
    sha = sha256_file(path)
    root = path.parents[3] if path.name == WEIGHTS and path.parent.parent.parent.name == "versions" else path.parent
    store = ModelStore(root, preset)
    version = store.version_of(sha)
    card = store.card(version) if version else {}
    return {"path": str(path), "sha256": sha, "version": version, "preset": card.get("preset", preset),
            "dataset": card.get("dataset"), "summary": card.get("summary"), "created_ts": card.get("created_ts")}


__all__ = ["ModelStore", "model_path", "read_meta", "publish", "read_json", "sha256_file", "weights_identity",
           "write_json_atomic"]
