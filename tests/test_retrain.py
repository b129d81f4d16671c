"""The auto-retrain queue on a real datastore: counting new final labels, one run at a time, restarts.

The launcher here stands in for MONAI Label's background task list (a dict whose ``status`` the
test moves on); the real launch path is covered by tests/test_retrain_server.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from lib.datastore.pants import PanTSDatastore
from pants_tools.phantom import write_pants_tree
from lib.activelearning.retrain import RetrainScheduler, new_final_labels

SHAPE = (12, 12, 8)


class Launcher:
    """Records launches; ``busy`` says whether another client's run is going."""

    def __init__(self) -> None:
        self.tasks: list[dict[str, Any]] = []
        self.other_run = False

    def launch(self, params: dict[str, Any]) -> dict[str, Any] | None:
        if self.other_run:
            return None
        self.tasks.append({"status": "SUBMITTED", "request": params})
        return self.tasks[-1]

    def busy(self) -> bool:
        return self.other_run or any(t["status"] in {"SUBMITTED", "RUNNING"} for t in self.tasks)


@pytest.fixture()
def ds(tmp_path: Path) -> Iterator[PanTSDatastore]:
    write_pants_tree(tmp_path / "PanTS", 4, shape=SHAPE, spacing=(4.0, 4.0, 4.0))
    store = PanTSDatastore(tmp_path / "PanTS")
    yield store
    store.close()


def _save(ds: PanTSDatastore, image_id: str, tag: str = "final") -> None:
    img = nib.load(ds.get_image_uri(image_id))
    lab = np.zeros(img.shape, np.uint8)
    lab[2:6, 2:6, 2:5] = 1
    f = Path(ds.state_dir) / f"upload_{image_id}.nii.gz"
    nib.save(nib.Nifti1Image(lab, img.affine), f)
    ds.save_label(image_id, str(f), tag, {})


def _label(ds: PanTSDatastore, s: RetrainScheduler, image_id: str) -> None:
    """An annotator saves a final label; the server then calls the scheduler and it ticks."""
    _save(ds, image_id)
    s.on_label_saved()
    s.tick()


def _scheduler(ds: PanTSDatastore, path: Path, launcher: Launcher, threshold: int = 2) -> RetrainScheduler:
    return RetrainScheduler(path, threshold, lambda: ds, launcher.launch, launcher.busy)


def test_counts_scans_with_new_final_labels_only(ds) -> None:
    ids = ds.list_images()
    assert new_final_labels(ds, 0)[0] == 0  # the imported PanTS masks are not new final labels
    _save(ds, ids[0])
    _save(ds, ids[0])
    _save(ds, ids[1], tag="original")
    n, mark = new_final_labels(ds, 0)
    assert n == 1
    _save(ds, ids[1])
    assert new_final_labels(ds, mark) == (1, mark + 1)


def test_nth_label_queues_one_run_and_triggers_during_it_give_exactly_one_more(ds, tmp_path) -> None:
    ids, L = ds.list_images(), Launcher()
    s = _scheduler(ds, tmp_path / "state.json", L)
    s.start(thread=False)
    _label(ds, s, ids[0])
    assert not L.tasks and s.state.new_final_labels == 1
    _label(ds, s, ids[1])
    assert len(L.tasks) == 1 and L.tasks[0]["request"] == {"trigger": "auto: 2 new final labels"}
    assert s.state.running and not s.state.pending

    L.tasks[0]["status"] = "RUNNING"
    for i in (2, 3, 0, 1):  # four more scans' labels during the run: two thresholds reached
        _label(ds, s, ids[i])
    assert len(L.tasks) == 1 and s.state.pending
    L.tasks[0]["status"] = "DONE"
    s.tick()
    assert len(L.tasks) == 2 and s.state.runs_started == 2 and not s.state.pending
    L.tasks[1]["status"] = "DONE"
    s.tick()
    s.tick()
    assert len(L.tasks) == 2 and not s.state.running and s.state.last_status == "DONE"


def test_waits_for_another_clients_run(ds, tmp_path) -> None:
    L = Launcher()
    s = _scheduler(ds, tmp_path / "state.json", L, threshold=0)
    s.start(thread=False)
    L.other_run = True
    s.request("on demand")
    s.tick()
    assert not L.tasks and s.state.pending
    L.other_run = False
    s.tick()
    assert len(L.tasks) == 1 and L.tasks[0]["request"] == {"trigger": "auto: on demand"}


def test_threshold_zero_never_starts_by_itself(ds, tmp_path) -> None:
    ids, L = ds.list_images(), Launcher()
    s = _scheduler(ds, tmp_path / "state.json", L, threshold=0)
    s.start(thread=False)
    for i in ids:
        _label(ds, s, i)
    assert not L.tasks and not s.state.pending


def test_pending_and_interrupted_runs_survive_a_restart(ds, tmp_path) -> None:
    ids, state = ds.list_images(), tmp_path / "state.json"
    L = Launcher()
    L.other_run = True
    s = _scheduler(ds, state, L)
    s.start(thread=False)
    _save(ds, ids[0])
    _label(ds, s, ids[1])
    assert s.state.pending and not L.tasks  # the server stops here

    L2 = Launcher()
    s2 = _scheduler(ds, state, L2)
    s2.start(thread=False)
    s2.tick()
    assert len(L2.tasks) == 1 and s2.state.running  # ... and stops again mid-run

    L3 = Launcher()
    s3 = _scheduler(ds, state, L3)
    s3.start(thread=False)
    assert s3.state.pending and s3.state.pending_reason == "the previous run was interrupted by a restart"
    s3.tick()
    assert len(L3.tasks) == 1 and s3.state.runs_started == 2
    # Labels saved while the server was down count at start.
    _save(ds, ids[2])
    _save(ds, ids[3])
    s4 = _scheduler(ds, state, Launcher())
    s4.start(thread=False)
    assert s4.state.pending and s4.state.pending_reason == "2 new final labels"


def test_the_thread_launches_without_a_tick_from_outside(ds, tmp_path) -> None:
    L = Launcher()
    s = RetrainScheduler(tmp_path / "state.json", 0, lambda: ds, L.launch, L.busy, poll_s=0.05)
    s.start()
    try:
        s.request("on demand")
        for _ in range(200):
            if L.tasks:
                break
            time.sleep(0.05)
        assert len(L.tasks) == 1
    finally:
        s.stop()
