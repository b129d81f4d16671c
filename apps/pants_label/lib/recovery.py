"""Start-up recovery after a crash (``kill -9``, power loss, OOM kill).

Every write of the app is temp-file + ``os.replace`` and every label is committed to the SQLite
index (WAL) only after its file is complete, so a crash can leave only:

* temporary files (``.tmp-*`` labels/images, ``.segresnet_*.pt.*.tmp`` model, a half-built
  training cache folder): never referenced by anything; removed here;
* a complete label file whose index row was never committed (killed between the rename and the
  commit): the client never got an answer for it, so it is not a saved label; it is moved to
  ``<state>/orphans/`` (kept for inspection) so that the next save of that version cannot clash;
* a training stats file still saying RUNNING: marked INTERRUPTED when no training process lives.

SQLite recovers its own WAL on open; ``PRAGMA quick_check`` confirms the index is sound.
Runs in the server process only, before the server accepts requests.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_TMP_FILE = re.compile(r"^\.tmp-|^\..*\.tmp$|\.tmp\d+$")
_LABEL_FILE = re.compile(r"^v(\d+)\.nii\.gz$")


@dataclass
class RecoveryReport:
    removed_tmp: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    interrupted_training: list[str] = field(default_factory=list)
    index_check: str = "not run"

    def as_dict(self) -> dict[str, Any]:
        return {
            "removed_tmp": len(self.removed_tmp),
            "orphan_labels": len(self.orphans),
            "interrupted_training": self.interrupted_training,
            "index_check": self.index_check,
        }


def remove_tmp(folder: Path, report: RecoveryReport) -> None:
    """Delete leftover temporary files and folders below ``folder``."""
    if not folder.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in list(dirnames):
            if _TMP_FILE.search(name):
                shutil.rmtree(os.path.join(dirpath, name), ignore_errors=True)
                report.removed_tmp.append(os.path.join(dirpath, name))
                dirnames.remove(name)
        for name in filenames:
            if _TMP_FILE.search(name):
                path = os.path.join(dirpath, name)
                try:
                    os.unlink(path)
                    report.removed_tmp.append(path)
                except OSError as err:
                    logger.warning("could not remove %s: %s", path, err)


def quarantine_orphan_labels(state_dir: Path, index_path: Path, report: RecoveryReport) -> None:
    """Move label files that no index row references to ``state_dir/orphans``."""
    labels = state_dir / "labels"
    if not labels.is_dir() or not index_path.exists():
        return
    with sqlite3.connect(str(index_path), timeout=60) as db:
        known = {r[0] for r in db.execute("SELECT path FROM labels WHERE path IS NOT NULL")}
    for path in sorted(labels.glob("*/*/v*.nii.gz")):
        if not _LABEL_FILE.match(path.name):
            continue
        rel = "@state/" + path.relative_to(state_dir).as_posix()
        if rel in known:
            continue
        dest = state_dir / "orphans" / path.relative_to(labels).parent / f"{path.stem.split('.')[0]}-{int(time.time())}.nii.gz"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)
        report.orphans.append(str(path))


def check_index(index_path: Path, report: RecoveryReport) -> None:
    if not index_path.exists():
        return
    with sqlite3.connect(str(index_path), timeout=60) as db:
        report.index_check = str(db.execute("PRAGMA quick_check").fetchone()[0])
    if report.index_check != "ok":
        logger.error("datastore index %s failed its check: %s; restore it from the backup", index_path,
                     report.index_check)


def training_running_elsewhere() -> bool:
    """Whether a MONAI Label training subprocess (of any server) is alive on this machine."""
    import psutil

    me = os.getpid()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if proc.info["pid"] != me and "monailabel.interfaces.utils.app" in cmd and "train" in cmd:
            return True
    return False


def mark_interrupted_training(model_dir: Path, report: RecoveryReport) -> None:
    """A stats file left at RUNNING by a killed run says INTERRUPTED (``/info`` shows it)."""
    stale = []
    for path in sorted(model_dir.glob("train_stats*.json")):
        try:
            stats = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(stats, dict) and stats.get("status") == "RUNNING":
            stale.append((path, stats))
    if not stale:
        return
    from lib.model_store import write_json_atomic

    for path, stats in stale:
        stats.update(status="INTERRUPTED", end_ts=time.time(),
                     error="the server stopped during this run; the published model was not changed")
        write_json_atomic(path, stats)
        report.interrupted_training.append(path.name)


def recover(state_dir: Path | None, model_dir: Path, index_name: str = "index.sqlite") -> RecoveryReport:
    """Run every step; each is safe to repeat and touches no committed label or published model."""
    report = RecoveryReport()
    if state_dir is not None:
        for sub in ("labels", "images", "cache"):
            remove_tmp(state_dir / sub, report)
        quarantine_orphan_labels(state_dir, state_dir / index_name, report)
        check_index(state_dir / index_name, report)
    if model_dir.is_dir() and not training_running_elsewhere():  # a live trainer owns its temp files
        for name in os.listdir(model_dir):
            if _TMP_FILE.search(name) and (model_dir / name).is_file():
                (model_dir / name).unlink(missing_ok=True)
                report.removed_tmp.append(str(model_dir / name))
        remove_tmp(model_dir / ".cache", report)
        mark_interrupted_training(model_dir, report)
    if report.removed_tmp or report.orphans or report.interrupted_training:
        logger.warning("recovered after an unclean stop: %s", report.as_dict())
    return report


__all__ = ["recover", "RecoveryReport"]
