"""Access: the server listens on 127.0.0.1 unless told otherwise; behind the nginx front
(``scripts/make_proxy.py``) every endpoint needs a login, over TLS, and annotators cannot train
or delete. Driven with the real ``MONAILabelClient``, logging in as 3D Slicer's module does.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest
import requests
import urllib3

from pants_tools.access import login_client
from lib.server.bind import host_given
from pants_tools.phantom import write_pants_tree
from server import APP_DIR, REPO, free_port, stop_process

urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

IMAGE = "PanTS_00000001"
ADMIN, ANNOTATOR = ("alice", "admin-pw-1"), ("bob", "annot-pw-2")


@pytest.mark.parametrize(
    "argv, given",
    [
        (["monailabel", "start_server", "--app", "a", "--studies", "s"], False),
        (["monailabel", "start_server", "--host", "0.0.0.0"], True),
        (["monailabel", "start_server", "--host=10.0.0.1"], True),
        (["monailabel", "start_server", "-i", "0.0.0.0"], True),
        (["monailabel", "start_server", "-i0.0.0.0"], True),
        (["monailabel", "start_server", "--ho", "0.0.0.0"], True),  # argparse accepts unique prefixes
        (["monailabel", "start_server", "--conf", "hostname", "x"], False),
    ],
)
def test_host_given_reads_the_command_line(argv: list[str], given: bool) -> None:
    assert host_given(argv) is given


class RawServer:
    """``monailabel start_server`` with exactly the given arguments (no ``--host`` unless given)."""

    def __init__(self, studies: Path, log: Path, extra: list[str]) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR), "--studies",
               str(studies), "--port", str(self.port), "--conf", "preset", "fast",
               "--conf", "model_dir", str(log.parent / "model"), *extra]
        self._fh = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, cwd=REPO)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 180
        while time.time() < deadline:
            assert self.proc.poll() is None, log.read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{self.url}/info/", timeout=2).read()
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not start:\n{log.read_text()[-3000:]}")

    def listening(self) -> set[str]:
        conns = psutil.Process(self.proc.pid).net_connections(kind="tcp")
        return {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN and c.laddr.port == self.port}

    def stop(self) -> None:
        stop_process(self.proc)
        self._fh.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("access")
    write_pants_tree(base / "PanTS", 3, shape=(24, 24, 16), spacing=(4.0, 4.0, 5.0), seed=7)
    return base


@pytest.fixture(scope="module")
def default_server(data: Path) -> Iterator[RawServer]:
    """Started like ``monailabel start_server`` is by hand: no --host."""
    srv = RawServer(data / "PanTS", data / "default.log", [])
    try:
        yield srv
    finally:
        srv.stop()


@pytest.mark.server
def test_without_host_the_server_listens_on_loopback_only(default_server: RawServer) -> None:
    assert default_server.listening() == {"127.0.0.1"}


@pytest.mark.server
def test_an_explicit_host_is_honoured(data: Path) -> None:
    srv = RawServer(data / "PanTS", data / "explicit.log", ["--host", "0.0.0.0"])
    try:
        assert srv.listening() == {"0.0.0.0"}
        assert "every client that can reach this port" in (data / "explicit.log").read_text()
    finally:
        srv.stop()


# ---- the authenticating proxy ------------------------------------------------------------------


def _wait_port(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + 30
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text() if log.exists() else "nginx exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError("nginx did not listen")


@pytest.fixture(scope="module")
def proxy(default_server: RawServer, data: Path) -> Iterator[tuple[str, Path]]:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.skip("nginx is not installed (Debian package 'nginx'); the proxy test needs it")
    out = data / "proxy"
    port = free_port()
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_proxy.py"), "--out", str(out), "--upstream",
         f"127.0.0.1:{default_server.port}", "--listen", f"127.0.0.1:{port}", "--server-name", "127.0.0.1",
         "--server-name", "localhost", "--admin", ":".join(ADMIN), "--annotator", ":".join(ANNOTATOR),
         # pytest's folders are private to this user: the nginx workers must be this user too
         *(["--worker-user", getpass.getuser()] if os.geteuid() == 0 else [])],
        check=True, capture_output=True, text=True,
    )
    check = subprocess.run([nginx, "-t", "-p", str(out), "-c", str(out / "nginx.conf")], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen([nginx, "-p", str(out), "-c", str(out / "nginx.conf"), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        _wait_port(port, proc, out / "logs" / "error.log")
        yield f"https://127.0.0.1:{port}", out
    finally:
        proc.terminate()
        proc.wait(10)


#: every route MONAI Label 0.8.5 serves (method, path), including those its own auth leaves open
ENDPOINTS = [
    ("GET", "/"), ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/favicon.ico"),
    ("GET", "/static/favicon.ico"), ("GET", "/ohif/"), ("GET", "/info/"), ("POST", "/reload"),
    ("GET", "/datastore/?output=all"), ("GET", f"/datastore/image?image={IMAGE}"),
    ("HEAD", f"/datastore/image?image={IMAGE}"), ("GET", f"/datastore/image/info?image={IMAGE}"),
    ("PUT", f"/datastore/image/info?image={IMAGE}"), ("PUT", "/datastore/image"), ("DELETE", f"/datastore/image?id={IMAGE}"),
    ("PUT", f"/datastore/label?image={IMAGE}"), ("GET", f"/datastore/label?label={IMAGE}&tag=final"),
    ("DELETE", f"/datastore/label?id={IMAGE}&tag=final"), ("GET", "/datastore/dataset"),
    ("POST", f"/infer/segmentation?image={IMAGE}"), ("POST", "/activelearning/random"),
    ("GET", "/train/"), ("POST", "/train/segmentation"), ("DELETE", "/train/"),
    ("GET", "/scoring/"), ("POST", "/scoring/x"), ("DELETE", "/scoring/"),
    ("GET", "/batch/infer"), ("POST", "/batch/infer/segmentation"), ("DELETE", "/batch/infer"),
    ("GET", "/model/segmentation"), ("PUT", "/model/segmentation"), ("DELETE", "/model/segmentation"),
    ("GET", "/model/segmentation/versions"), ("POST", "/model/segmentation/rollback?version=v1"),
    ("GET", "/logs/"), ("GET", "/session/x"), ("PUT", "/session/"), ("DELETE", "/session/x"),
    ("GET", "/proxy/dicom/qido/studies"), ("GET", "/%69nfo/"), ("GET", "//info/"),
]


@pytest.mark.server
@pytest.mark.parametrize("method, path", ENDPOINTS, ids=[f"{m} {p}" for m, p in ENDPOINTS])
def test_every_endpoint_refuses_a_request_without_login(proxy: tuple[str, Path], method: str, path: str) -> None:
    url, _ = proxy
    r = requests.request(method, url + path, verify=False, timeout=30)
    assert r.status_code == 401, r.text[:200]
    r = requests.request(method, url + path, verify=False, timeout=30, auth=(ADMIN[0], "wrong"))
    assert r.status_code == 401


@pytest.mark.server
def test_tls_with_the_generated_certificate_and_no_plain_http(proxy: tuple[str, Path]) -> None:
    url, out = proxy
    r = requests.get(url + "/info/", auth=ANNOTATOR, verify=str(out / "tls" / "cert.pem"), timeout=30)
    assert r.status_code == 200 and r.json()["name"] == "PanTS Label"
    plain = requests.get(url.replace("https://", "http://") + "/info/", auth=ANNOTATOR, timeout=30)
    assert plain.status_code == 400  # nginx: plain HTTP request sent to the HTTPS port


@pytest.mark.server
def test_annotator_works_through_the_client_but_cannot_train_or_delete(proxy: tuple[str, Path], data: Path,
                                                                        tmp_path: Path) -> None:
    from monailabel.client.client import MONAILabelClientException

    url, _ = proxy
    anon = login_client(url, tmpdir=str(tmp_path))
    assert anon.auth_enabled()  # what tells 3D Slicer to ask for a login
    with pytest.raises(MONAILabelClientException) as err:
        anon.info()
    assert "401" in err.value.msg

    def client(account: tuple[str, str] = ANNOTATOR):  # noqa: ANN202 - a fresh client per request, as Slicer
        return login_client(url, *account, tmpdir=str(tmp_path))

    assert client().info()["name"] == "PanTS Label"
    client().next_sample("random", {})
    label_path, params = client().infer("segmentation", IMAGE, {})
    assert Path(label_path).exists() and params["preset"] == "fast"
    ref = nib.load(data / "PanTS" / "ImageTr" / IMAGE / "ct.nii.gz")
    label = np.zeros(ref.shape, np.uint8)
    label[2:6, 2:6, 2:6] = 5
    nib.save(nib.Nifti1Image(label, ref.affine), tmp_path / "l.nii.gz")
    client().save_label(IMAGE, str(tmp_path / "l.nii.gz"), tag="final")
    assert client().download_label(IMAGE, "final")

    with pytest.raises(MONAILabelClientException) as err:
        client().train_start("segmentation", {"max_epochs": -1})
    assert "401" in err.value.msg
    with pytest.raises(MONAILabelClientException) as err:
        client().train_stop()
    assert "401" in err.value.msg
    for method, path in [("DELETE", f"/datastore/label?id={IMAGE}&tag=final"), ("DELETE", f"/datastore/image?id={IMAGE}"),
                         ("GET", "/logs/"), ("POST", "/reload"), ("GET", "/datastore/dataset"),
                         ("POST", "/model/segmentation/rollback?version=v1"), ("GET", "/model/segmentation/versions")]:
        r = requests.request(method, url + path, auth=ANNOTATOR, verify=False, timeout=30)
        assert r.status_code == 401, (method, path, r.status_code)
    assert requests.get(f"{url}/datastore/label?label={IMAGE}&tag=final", auth=ANNOTATOR, verify=False,
                        timeout=30).status_code == 200  # still there

    # the admin reaches the same endpoints (a training option out of range: refused by the app, not the proxy)
    with pytest.raises(MONAILabelClientException) as err:
        client(ADMIN).train_start("segmentation", {"max_epochs": -1})
    assert "422" in err.value.msg or "max_epochs" in err.value.msg
    r = requests.post(f"{url}/model/segmentation/rollback?version=v1", auth=ADMIN, verify=False, timeout=30)
    assert r.status_code == 404 and "no version is stored yet" in r.json()["detail"]  # reached the app
    assert requests.get(f"{url}/model/segmentation/versions", auth=ADMIN, verify=False, timeout=30).json()["versions"] == []
    r = requests.delete(f"{url}/datastore/label?id={IMAGE}&tag=final", auth=ADMIN, verify=False, timeout=30)
    assert r.status_code == 200
    assert requests.get(f"{url}/datastore/label?label={IMAGE}&tag=final", auth=ADMIN, verify=False,
                        timeout=30).status_code == 404
