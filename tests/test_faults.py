"""Faults on the real server: ``kill -9`` during label saves and during training, a training run
that crashes, and a full disk while saving.

After each: every acknowledged label is in the datastore, no label file is half-written or
unreferenced, the index passes SQLite's integrity check, and the published model is the one
from before, intact and serving.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest
import requests

from lib.core.atomic import TMP_NAME
from lib.core.atomic import tmp_path as atomic_tmp_path
from lib.core.labelmap import load_labelmap
from lib.model.model_store import model_path, publish
from pants_tools.phantom import write_pants_tree
from lib.model.segmenter import build_network
from lib.core.settings import load_segmentation_config
from server import Server

pytestmark = pytest.mark.server

LM = load_labelmap()
SHAPE, SPACING = (40, 40, 32), (2.5, 2.5, 3.0)


# ---- helpers ---------------------------------------------------------------------------------


def kill9_tree(server: Server) -> list[int]:
    """SIGKILL the server and every process it started (training, scoring), as a crash would."""
    parent = psutil.Process(server.proc.pid)
    procs = [parent, *parent.children(recursive=True)]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    server.proc.wait(10)
    server.stop()
    return [p.pid for p in procs]


def label_array(shape: tuple[int, ...], seq: int) -> np.ndarray:
    """A label unique to ``seq``: a small cube whose place and class encode it."""
    out = np.zeros(shape, np.uint8)
    x, y, z = (seq * 3) % (shape[0] - 4), (seq * 7) % (shape[1] - 4), (seq // 5) % (shape[2] - 4)
    out[x : x + 4, y : y + 4, z : z + 4] = 1 + seq % LM.num_classes
    return out


def index_rows(state: Path, tag: str = "final") -> list[tuple]:
    with sqlite3.connect(f"file:{state / 'index.sqlite'}?mode=ro", uri=True) as db:
        return list(db.execute("SELECT image_id, version, path, info FROM labels WHERE tag = ? ORDER BY 1, 2", (tag,)))


def integrity(state: Path) -> str:
    with sqlite3.connect(str(state / "index.sqlite")) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def publish_random_model(model_dir: Path) -> Path:
    """A published model (random weights): what training would have left before the fault."""
    net = build_network(load_segmentation_config(), LM.num_classes)
    path = model_path(model_dir, "fast")
    publish({k: v.detach() for k, v in net.state_dict().items()},
            {"labels": LM.names, "preset": "fast", "summary": "the model in use before the fault"}, path)
    return path


def wait_for(predicate, timeout: float, what: str, every: float = 0.5):  # noqa: ANN001, ANN201
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"waited {timeout} s for {what}")


def train_stats(url: str) -> dict:
    return requests.get(f"{url}/info/", timeout=60).json()["train_stats"].get("segmentation", {})


def infer_params(url: str, image: str) -> dict:
    from monailabel.client import MONAILabelClient

    _, params = MONAILabelClient(url).infer("segmentation", image, {})
    return params


# ---- kill -9 during label saves ----------------------------------------------------------------


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "PanTS"
    write_pants_tree(root, 4, shape=SHAPE, spacing=SPACING, seed=11)
    return root


def test_kill9_during_label_saves_loses_no_acknowledged_label(dataset: Path, tmp_path: Path) -> None:
    from monailabel.client import MONAILabelClient

    conf = {"model_dir": str(tmp_path / "model"), "preset": "fast"}
    images = sorted(p.name for p in (dataset / "ImageTr").iterdir())
    ref = {i: nib.load(dataset / "ImageTr" / i / "ct.nii.gz") for i in images}
    files = {}
    for seq in range(400):
        image = images[seq % len(images)]
        f = tmp_path / "up" / f"{seq}.nii.gz"
        f.parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(label_array(ref[image].shape, seq), ref[image].affine), f)
        files[seq] = (image, f)

    server = Server(dataset, tmp_path / "server1.log", conf=conf)
    acked: set[int] = set()
    sent: set[int] = set()
    stop = threading.Event()
    lock = threading.Lock()
    counter = iter(range(400))

    def annotator() -> None:
        client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
        while not stop.is_set():
            with lock:
                seq = next(counter, None)
            if seq is None:
                return
            image, f = files[seq]
            sent.add(seq)
            try:
                client.save_label(image, str(f), tag="final", params={"seq": seq})
            except Exception:  # noqa: BLE001 - the kill cuts requests off: those are not acknowledged
                return
            acked.add(seq)

    threads = [threading.Thread(target=annotator) for _ in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: len(acked) >= 30, 120, "30 acknowledged saves", every=0.05)
    pids = kill9_tree(server)  # saves are in flight: 4 clients save back to back
    stop.set()
    for t in threads:
        t.join(30)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    in_flight = sent - acked
    assert in_flight, "no save was in flight at the kill"

    state = dataset / ".pants_label"
    # What a kill inside a save leaves at worst: a partial temp file (killed while writing) and a
    # complete file whose index row was never committed (killed between rename and commit).
    folder = state / "labels" / "final" / images[0]
    atomic_tmp_path(folder / "v9998.nii.gz").write_bytes(files[0][1].read_bytes()[:100])
    shutil.copy(files[1][1], folder / "v9999.nii.gz")

    server = Server(dataset, tmp_path / "server2.log", conf=conf)
    try:
        rows = index_rows(state)
        stored = {}
        for image_id, version, path, info in rows:
            seq = json.loads(info)["seq"]
            stored[seq] = (image_id, version, path)
        missing = acked - set(stored)
        assert not missing, f"acknowledged saves lost: {sorted(missing)}"
        assert set(stored) <= sent  # nothing appears that was never sent
        for seq, (image_id, _, path) in stored.items():
            data = np.asarray(nib.load(state / path.removeprefix("@state/")).dataobj)  # reads the whole file
            np.testing.assert_array_equal(data, label_array(ref[image_id].shape, seq))
        on_disk = {p.relative_to(state).as_posix() for p in (state / "labels").rglob("*") if p.is_file()}
        assert on_disk == {p.removeprefix("@state/") for _, _, p, _ in rows}, "half-written or unreferenced files"
        assert (state / "orphans").is_dir() and any((state / "orphans").rglob("v9999-*.nii.gz"))
        assert integrity(state) == "ok"
        # the server serves: the live label is the last stored version, and a new save is the next one
        for image_id in images:
            versions = [r for r in rows if r[0] == image_id]
            if versions:
                info = requests.get(f"{server.url}/datastore/label/info?label={image_id}&tag=final", timeout=30).json()
                assert info["version"] == versions[-1][1]
        client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
        client.save_label(images[0], str(files[0][1]), tag="final", params={"seq": -1})
        after = [r for r in index_rows(state) if r[0] == images[0]]
        assert after[-1][1] == max(r[1] for r in rows if r[0] == images[0]) + 1
    finally:
        server.stop()


# ---- training: a crash, then kill -9 of the whole server ----------------------------------------


def _training_process(server: Server) -> psutil.Process | None:
    for p in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "monailabel.interfaces.utils.app" in cmd and "train" in cmd:
            return p
    return None


def _start_long_training(server: Server) -> None:
    r = requests.post(f"{server.url}/train/segmentation",
                      json={"max_epochs": 1000, "iterations_per_epoch": 2, "batch_size": 1}, timeout=60)
    assert r.status_code == 200, r.text
    # the run has started (its stats say RUNNING) and is preparing data or training
    wait_for(lambda: train_stats(server.url).get("status") == "RUNNING", 300, "training to start")


def test_training_crash_and_kill9_keep_the_published_model(dataset: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    published = publish_random_model(model_dir)
    digest, mtime = sha256(published), published.stat().st_mtime
    conf = {"model_dir": str(model_dir), "preset": "fast"}
    image = "PanTS_00000001"

    server = Server(dataset, tmp_path / "server1.log", conf=conf)
    try:
        assert infer_params(server.url, image)["model_mtime"] == pytest.approx(mtime)
        # 1. the training subprocess crashes (SIGKILL, as the OOM killer does) mid-run
        _start_long_training(server)
        trainer = _training_process(server)
        assert trainer is not None
        trainer.kill()
        trainer.wait(30)
        wait_for(lambda: requests.get(f"{server.url}/train/?check_if_running=true", timeout=30).status_code == 404,
                 60, "MONAI Label to see the run end")
        assert requests.get(f"{server.url}/train/", timeout=30).json()["status"] != "RUNNING"
        assert train_stats(server.url)["status"] == "INTERRUPTED"  # not left at RUNNING
        assert sha256(published) == digest
        params = infer_params(server.url, image)
        assert params["trained"] is True and params["model_mtime"] == pytest.approx(mtime)

        # 2. kill -9 of the whole server while training runs again
        _start_long_training(server)
    finally:
        kill9_tree(server)
    # what a kill inside publish() would leave: a partial temp file beside the model
    atomic_tmp_path(published).write_bytes(published.read_bytes()[:1000])

    server = Server(dataset, tmp_path / "server2.log", conf=conf)
    try:
        assert sha256(published) == digest, "the published model changed"
        assert not [p for p in model_dir.iterdir() if TMP_NAME.match(p.name)], "a partial model file was left"
        assert train_stats(server.url)["status"] == "INTERRUPTED"
        model = requests.get(f"{server.url}/info/", timeout=30).json()["models"]["segmentation"]
        assert model["trained"] is True
        params = infer_params(server.url, image)
        assert params["trained"] is True and params["model_mtime"] == pytest.approx(mtime)
    finally:
        server.stop()


# ---- full disk -------------------------------------------------------------------------------------


@pytest.fixture()
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs (needs root, or CAP_SYS_ADMIN); the test is skipped, saying so, without it."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill ({r.stderr.strip() or r.returncode}); needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(folder: Path) -> Path:
    """Fill the filesystem of ``folder`` to the last byte (unbuffered: every write hits the disk)."""
    filler = folder / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for block in (1 << 16, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * block)
            except OSError:
                pass
    finally:
        os.close(fd)
    assert shutil.disk_usage(folder).free < 4096
    return filler


def test_full_disk_on_save_answers_507_and_loses_nothing(dataset: Path, tmp_path: Path, small_fs: Path) -> None:
    from monailabel.client import MONAILabelClient

    state = small_fs / "state"
    conf = {"model_dir": str(tmp_path / "model"), "preset": "fast", "datastore_dir": str(state)}
    image = "PanTS_00000002"
    ref = nib.load(dataset / "ImageTr" / image / "ct.nii.gz")
    noisy = np.random.default_rng(0).integers(0, 29, ref.shape, dtype=np.uint8)  # compresses badly: fills faster
    first, second = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    nib.save(nib.Nifti1Image(label_array(ref.shape, 5), ref.affine), first)
    nib.save(nib.Nifti1Image(noisy, ref.affine), second)

    server = Server(dataset, tmp_path / "server.log", conf=conf)
    try:
        client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
        client.save_label(image, str(first), tag="final", params={"seq": 1})
        rows_before = index_rows(state)
        filler = _fill(small_fs)

        r = requests.put(f"{server.url}/datastore/label?image={image}&tag=final",
                         files={"params": (None, '{"seq": 2}'), "label": ("b.nii.gz", second.read_bytes())}, timeout=60)
        assert r.status_code == 507, r.text
        assert "disk is full" in r.json()["detail"] and "nothing was saved" in r.json()["detail"]
        assert server.proc.poll() is None
        assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200
        assert index_rows(state) == rows_before
        assert not [p for p in state.rglob(".tmp-*")], "a partial file was left on the full disk"
        back = requests.get(f"{server.url}/datastore/label?label={image}&tag=final", timeout=30)
        assert back.status_code == 200  # the earlier label is still served
        (tmp_path / "back.nii.gz").write_bytes(back.content)
        np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "back.nii.gz").dataobj),
                                      label_array(ref.shape, 5))

        filler.unlink()  # the operator frees space: the same save now works
        client.save_label(image, str(second), tag="final", params={"seq": 2})
        rows = index_rows(state)
        assert [r[1] for r in rows] == [1, 2]
        assert integrity(state) == "ok"
    finally:
        server.stop()
        if os.path.ismount(small_fs):
            shutil.rmtree(state, ignore_errors=True)
