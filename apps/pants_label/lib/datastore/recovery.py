"""Start-up recovery after a crash (``kill -9``, power loss, OOM kill).

Every write of the app goes through :mod:`lib.core.atomic` (temporary name, fsync, rename) and every
label is committed to the datastore's SQLite index only after its file is complete, so a crash can
leave only:

* temporary files and folders, named as :data:`lib.atomic.TMP_NAME` says (labels, images, model
  weights, a half-downloaded DICOM series, a half-built training cache): never referenced by
  anything; removed here;
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

from lib.core.atomic import TMP_NAME

logger = logging.getLogger(__name__)

_LABEL_FILE = re.compile(r"^v(\d+)\.nii\.gz$")
#: state sub-folders walked for temporary files, and those (large) where only the top level is
_WALKED = ("labels", "images", "cache")
_TOP_LEVEL = ("dicom", "segs", "")


def _is_tmp(name: str) -> bool:
    return bool(TMP_NAME.match(name))


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


def remove_tmp(folder: Path, report: RecoveryReport, recursive: bool = True) -> None:
    """Delete leftover temporary files and folders below ``folder`` (or in it only)."""
    if not folder.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in list(dirnames):
            if _is_tmp(name):
                shutil.rmtree(os.path.join(dirpath, name), ignore_errors=True)
                report.removed_tmp.append(os.path.join(dirpath, name))
                dirnames.remove(name)
        for name in filenames:
            if _is_tmp(name):
                path = os.path.join(dirpath, name)
                try:
                    os.unlink(path)
                    report.removed_tmp.append(path)
                except OSError as err:
                    logger.warning("could not remove %s: %s", path, err)
        if not recursive:
            break


def quarantine_orphan_labels(state_dir: Path, referenced: set[Path], report: RecoveryReport) -> None:
    """Move label files that no index row references to ``state_dir/orphans``."""
    labels = state_dir / "labels"
    if not labels.is_dir():
        return
    referenced = {Path(p).resolve() for p in referenced}
    for path in sorted(labels.glob("*/*/v*.nii.gz")):
        if not _LABEL_FILE.match(path.name) or path.resolve() in referenced:
            continue
        name = f"{path.name.split('.')[0]}-{int(time.time())}.nii.gz"  # v3.nii.gz -> v3-<time>.nii.gz
        dest = state_dir / "orphans" / path.relative_to(labels).parent / name
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


def training_running_elsewhere(model_dir: Path) -> bool:
    """Whether a live MONAI Label training subprocess writes to ``model_dir``.

    The subprocess inherits the server's ``MONAI_LABEL_APP_CONF`` (holding ``model_dir``) and
    ``MONAI_LABEL_APP_DIR``; a process whose environment cannot be read counts as a match.
    """
    import psutil

    target = Path(model_dir).resolve()
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if proc.info["pid"] == me or "monailabel.interfaces.utils.app" not in cmd or "train" not in cmd:
            continue
        try:
            env = proc.environ()
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            return True
        try:
            conf = json.loads(env.get("MONAI_LABEL_APP_CONF") or "{}")
        except ValueError:
            conf = {}
        theirs = conf.get("model_dir")
        if not theirs or Path(theirs).resolve() == target:  # no model_dir: the dataset's own store, maybe this one
            return True
    return False


def mark_interrupted_training(model_dir: Path, report: RecoveryReport | None = None) -> list[str]:
    """A stats file left at RUNNING by a run that no longer lives says INTERRUPTED (``/info`` shows it).

    Called at start-up, and on ``GET /info/`` while a server runs (a training subprocess killed
    by the OOM killer leaves RUNNING behind). Returns the stats files it changed.
    """
    stale = [p for p in sorted(Path(model_dir).glob("train_stats*.json")) if _status(p) == "RUNNING"]
    if not stale or training_running_elsewhere(model_dir):
        return []
    from lib.core.atomic import write_json_atomic

    changed = []
    for path in stale:
        stats = _read(path)
        if stats is None or stats.get("status") != "RUNNING":  # re-read: it may have finished meanwhile
            continue
        stats.update(status="INTERRUPTED", end_ts=time.time(),
                     error="the training process ended without finishing (stopped, killed or crashed); "
                           "the published model was not changed")
        write_json_atomic(path, stats)
        changed.append(path.name)
        logger.warning("training run of %s ended without finishing; marked INTERRUPTED", path.name)
    if report is not None:
        report.interrupted_training.extend(changed)
    return changed


def _read(path: Path) -> dict[str, Any] | None:
    try:
        stats = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stats if isinstance(stats, dict) else None


def _status(path: Path) -> str | None:
    stats = _read(path)
    return None if stats is None else stats.get("status")


def recover(datastore: Any, model_dir: Path, index_name: str = "index.sqlite") -> RecoveryReport:
    """Run every step; each is safe to repeat and touches no committed label or published model.

    Args:
        datastore: the app's datastore; its ``state_dir`` is cleaned, and the label files its
            ``stored_label_files()`` names are kept (without that method nothing is moved).
        model_dir: the folder of published weights and training stats.
    """
    report = RecoveryReport()
    state_dir = getattr(datastore, "state_dir", None)
    if state_dir is not None:
        state_dir = Path(state_dir)
        for sub in _WALKED:
            remove_tmp(state_dir / sub, report)
        for sub in _TOP_LEVEL:
            remove_tmp(state_dir / sub, report, recursive=False)
        stored = getattr(datastore, "stored_label_files", None)
        if stored is not None:
            quarantine_orphan_labels(state_dir, stored(), report)
        check_index(state_dir / index_name, report)
    if model_dir.is_dir() and not training_running_elsewhere(model_dir):  # a live trainer owns its temp files
        remove_tmp(model_dir, report, recursive=False)
        remove_tmp(model_dir / ".cache", report)
        remove_tmp(model_dir / ".train", report)
        remove_tmp(model_dir / "versions", report)
        mark_interrupted_training(model_dir, report)
    if report.removed_tmp or report.orphans or report.interrupted_training:
        logger.warning("recovered after an unclean stop: %s", report.as_dict())
    return report


__all__ = ["recover", "RecoveryReport"]
