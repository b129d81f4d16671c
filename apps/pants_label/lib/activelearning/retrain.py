"""Auto-retrain: start training by itself after N new ``final`` labels, one run at a time, no trigger lost.

MONAI Label trains only when a client asks. The :class:`RetrainScheduler` lives in the server
process: every saved label (``on_save_label``) counts the scans that got a new ``final`` label
since the last trigger, and at ``auto_train_after`` it marks a run as *pending*. A small thread
launches a pending run through MONAI Label's own path (``AsyncTask.run("train")``: a subprocess,
listed by ``GET /train/``) as soon as no training runs, whoever started that one.

The queue is one persisted flag, not a list: triggers that arrive while a run is going set it
again and cause exactly one more run afterwards, which sees all labels saved so far. The state
(``retrain_<preset>.json`` beside the model) is written atomically on every change, so a restart
keeps a pending trigger, and a run that a restart interrupted is started again.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from lib.datastore.protocol import FINAL_TAG, PanTSStore
from lib.model.model_store import read_json, write_json_atomic

logger = logging.getLogger(__name__)

#: MONAI Label background-task states of a run that is not over
_ACTIVE = {"SUBMITTED", "RUNNING"}


class RetrainState(BaseModel):
    """What the scheduler persists (and ``/info`` shows under ``train_stats.*.auto_retrain``)."""

    auto_train_after: int = 0
    pending: bool = False
    pending_reason: str | None = None
    running: bool = False
    #: labels (datastore history rows) up to this mark have been counted by a trigger
    label_mark: int = 0
    new_final_labels: int = 0
    runs_started: int = 0
    last_trigger_ts: float | None = None
    last_start_ts: float | None = None
    last_end_ts: float | None = None
    last_status: str | None = None


def new_final_labels(datastore: Any, mark: int) -> tuple[int, int]:
    """Scans with a ``final`` label saved after history row ``mark``, and the newest row.

    Label history is append-only in the PanTS datastore (every save is a new row), so a row id
    is a monotonic cursor: nothing is counted twice and nothing saved while the server was down
    is missed. Other datastores fall back to the number of scans with a ``final`` label.
    """
    if isinstance(datastore, PanTSStore):
        return datastore.final_labels_since(mark)
    total = len(datastore.get_labeled_images(FINAL_TAG))
    return max(0, total - mark), total


class RetrainScheduler:
    """Counts new ``final`` labels, keeps one pending run, and launches it when training is idle.

    Args:
        state_path: the persisted JSON state.
        threshold: new ``final`` labels (scans) that trigger a run; 0 turns counting off (on-demand
            runs through :meth:`request` still queue).
        datastore: returns the datastore (counting new labels).
        launch: starts one run with a request dict; returns MONAI Label's task dict (its
            ``status`` is updated in place), or None when training is busy.
        busy: whether any training task is queued or running (also ones a client started).
        poll_s: how often the launcher thread looks at a running task.
    """

    def __init__(
        self,
        state_path: Path,
        threshold: int,
        datastore: Callable[[], Any],
        launch: Callable[[dict[str, Any]], dict[str, Any] | None],
        busy: Callable[[], bool],
        poll_s: float = 2.0,
    ) -> None:
        self.state_path = Path(state_path)
        self.threshold = threshold
        self._datastore, self._launch, self._busy = datastore, launch, busy
        self.poll_s = poll_s
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._task: dict[str, Any] | None = None
        self._thread: threading.Thread | None = None
        self.state = RetrainState.model_validate(read_json(self.state_path, default={}) or {})
        self.state.auto_train_after = threshold

    # ---- events ------------------------------------------------------------------------------
    def start(self, thread: bool = True) -> None:
        """Resume after a restart (an interrupted run runs again), count labels saved meanwhile, start the thread."""
        with self._lock:
            if self.state.running:
                self.state.running = False
                self._set_pending("the previous run was interrupted by a restart")
            self._save()
        self.on_label_saved()
        if not thread:
            return
        self._thread = threading.Thread(target=self._loop, name="auto-retrain", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def on_label_saved(self) -> None:
        """A label was saved: trigger a run once ``threshold`` scans have new ``final`` labels."""
        if self.threshold <= 0:
            return
        with self._lock:
            n, top = new_final_labels(self._datastore(), self.state.label_mark)
            self.state.new_final_labels = n
            if n >= self.threshold:
                self.state.label_mark = top
                self.state.new_final_labels = 0
                self._set_pending(f"{n} new final labels")
            self._save()
        self._wake.set()

    def request(self, reason: str = "on demand") -> None:
        """Queue a run (merged with any run already pending)."""
        with self._lock:
            self._set_pending(reason)
            self._save()
        self._wake.set()

    # ---- the launcher ------------------------------------------------------------------------
    def _set_pending(self, reason: str) -> None:
        self.state.pending = True
        self.state.pending_reason = reason
        self.state.last_trigger_ts = time.time()
        logger.info(f"auto-retrain: run queued ({reason})")

    def _save(self) -> None:
        write_json_atomic(self.state_path, self.state.model_dump())

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the thread must outlive one bad tick
                logger.exception("auto-retrain: tick failed")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def tick(self) -> None:
        """Note the end of our run; launch the pending one when training is idle."""
        with self._lock:
            if self._task is not None:
                status = self._task.get("status")
                if status in _ACTIVE:
                    return
                self._task = None
                self.state.running = False
                self.state.last_status = status
                self.state.last_end_ts = time.time()
                self._save()
                logger.info(f"auto-retrain: run ended ({status})")
            if not self.state.pending or self._busy():
                return
            reason = self.state.pending_reason or "pending"
            task = self._launch({"trigger": f"auto: {reason}"})
            if task is None:  # someone else's run started first; try again when it ends
                return
            self._task = task
            self.state.pending, self.state.pending_reason = False, None
            self.state.running = True
            self.state.runs_started += 1
            self.state.last_start_ts = time.time()
            self.state.last_status = task.get("status")
            self._save()
            logger.info(f"auto-retrain: run {self.state.runs_started} started ({reason})")


def monailabel_launcher(model: str) -> tuple[Callable[[dict[str, Any]], dict[str, Any] | None], Callable[[], bool]]:
    """``launch`` and ``busy`` over MONAI Label's background tasks (what ``POST /train/{model}`` uses)."""
    from monailabel.utils.async_tasks.task import AsyncTask
    from monailabel.utils.async_tasks.utils import processes, tasks

    def launch(params: dict[str, Any]) -> dict[str, Any] | None:
        task, detail = AsyncTask.run("train", request={"model": model, **params}, enqueue=False)
        if task is None:
            logger.info(f"auto-retrain: not started yet: {detail}")
        return task

    def busy() -> bool:
        return bool(processes("train")) or any(t.get("status") in _ACTIVE for t in tasks("train"))

    return launch, busy
