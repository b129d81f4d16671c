"""OHIF's "Next Sample" from two browser sessions over a real Orthanc: each annotator is handed
a different study, because the server leases what it serves over DICOMweb as it does for a
PanTS folder. Each session is its own headless Chromium with its own profile (own cookies)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from lib.imaging.dicom_series import stable_uid
from orthanc import Orthanc, require_orthanc
from pants_tools.phantom import write_pants_tree
from server import REPO, Server, free_port

pytestmark = pytest.mark.server

OUT = REPO / "out"
CASES = ("PanTS_00000001", "PanTS_00000002", "PanTS_00000003")


@pytest.fixture(scope="module")
def pacs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    require_orthanc()
    from cdp import require_chromium

    require_chromium()
    base = tmp_path_factory.mktemp("ohif_next")
    root = base / "PanTS"
    write_pants_tree(root, len(CASES), shape=(48, 48, 32), spacing=(4.0, 4.0, 5.0), seed=3)
    orthanc = Orthanc(base / "orthanc", base / "orthanc.log")
    server = None
    try:
        subprocess.run([sys.executable, str(REPO / "scripts" / "load_pacs.py"), "--url", orthanc.dicomweb,
                        "--root", str(root), "--no-labels"], check=True, capture_output=True, timeout=300)
        server = Server(orthanc.dicomweb, base / "server.log",
                        conf={"model_dir": str(base / "model"), "preset": "fast", "datastore_dir": str(base / "state")})
        yield server
    finally:
        if server is not None:
            server.stop()
        orthanc.stop()


def _includes(text: str) -> str:
    return f"document.body && document.body.innerText.includes({text!r})"


def _next_sample_in_a_new_session(server: Server, base: Path, name: str) -> str:
    """Open the first study in OHIF's MONAI Label mode, connect, press Next Sample; the
    StudyInstanceUID the dialog shows."""
    from cdp import Browser

    b = Browser(base / f"chromium_{name}.log", free_port())
    try:
        b.send("Network.setCookie", name="MONAILABEL_SERVER_URL", value=server.url + "/", url=server.url + "/")
        b.goto(f"{server.url}/ohif/")
        b.wait_for(_includes(CASES[0]), 120, what="the study list")
        b.click_text(CASES[0])
        b.click_text("MONAI Label", selector="button")
        b.wait_for(f"location.href.includes({stable_uid(CASES[0], 'study')!r})", 60, what="the viewer")
        b.wait_for(_includes("Server:"), 120, what="the MONAI Label panel")
        deadline = time.time() + 120
        while not any("displaySetsToAllImages" in c for c in b.console) and time.time() < deadline:
            b.js("1")  # pumps console events: connect only once the images are in
            time.sleep(0.5)
        b.click_selector(".settingsTable button.actionButton")  # connect
        b.wait_for(_includes("Next Sample"), 60, what="the Active Learning tab")
        b.click_element("[...document.querySelectorAll('button')].find(e => e.innerText.trim() === 'Next Sample')",
                        what="the Next Sample button")
        b.wait_for(_includes("Active Learning - Next Sample") + " && " + _includes("Study Instance UID"), 60,
                   what="the Next Sample dialog")
        b.screenshot(OUT / f"ohif_next_sample_{name}.png")
        text = b.text()
        found = re.search(r"Study Instance UID\s+([0-9.]+)", text)
        assert found, text[-2000:]
        return found.group(1)
    finally:
        b.close()


def test_two_ohif_annotators_get_different_studies(pacs_server: Server, tmp_path: Path) -> None:
    first = _next_sample_in_a_new_session(pacs_server, tmp_path, "a")
    second = _next_sample_in_a_new_session(pacs_server, tmp_path, "b")
    studies = {stable_uid(c, "study") for c in CASES}
    assert first in studies and second in studies
    assert first != second
    info = json.loads(urllib.request.urlopen(f"{pacs_server.url}/info/", timeout=30).read())
    assert info["active_learning"]["leases"] == 2
