"""OHIF v3 (served by MONAI Label at /ohif/) in headless Chromium, over a real Orthanc.

The viewer reads DICOMweb through the server's /proxy/dicom (Orthanc sends no CORS headers).
Study list -> open the study in the MONAI Label mode -> connect the panel (model and its 28
labels shown) -> run auto-segmentation -> the result is applied. The server serves the committed
demo model on an adult-size phantom, as ``make serve`` does, so the screenshot kept in
``out/ohif_autosegmentation.png`` shows organs.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lib.imaging.dicom_series import stable_uid
from lib.core.labelmap import load_labelmap
from pants_tools.phantom import write_pants_tree
from orthanc import Orthanc, require_orthanc
from server import REPO, Server, free_port

pytestmark = pytest.mark.server

CASE = "PanTS_00000001"
OUT = REPO / "out"


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    require_orthanc()
    from cdp import Browser, require_chromium

    require_chromium()
    base = tmp_path_factory.mktemp("ohif")
    root = base / "PanTS"
    # adult size (370 x 370 x 400 mm, as the demo model's training phantoms) on a coarse grid
    write_pants_tree(root, 1, shape=(80, 80, 56), spacing=(4.6, 4.6, 7.2), seed=7)
    (base / "model").mkdir()
    shutil.copy(REPO / "apps" / "pants_label" / "demo_model" / "segresnet_fast.pt", base / "model")
    orthanc = Orthanc(base / "orthanc", base / "orthanc.log")
    server = browser = None
    try:
        subprocess.run([sys.executable, str(REPO / "scripts" / "load_pacs.py"), "--url", orthanc.dicomweb,
                        "--root", str(root), "--no-labels"], check=True, capture_output=True, timeout=300)
        server = Server(orthanc.dicomweb, base / "server.log",
                        conf={"model_dir": str(base / "model"), "preset": "fast", "datastore_dir": str(base / "state")})
        browser = Browser(base / "chromium.log", free_port())
        # The panel's server URL is a cookie (default: this host on port 8000).
        browser.send("Network.setCookie", name="MONAILABEL_SERVER_URL", value=server.url + "/", url=server.url + "/")
        yield {"browser": browser, "server": server}
    finally:
        if browser is not None:
            OUT.mkdir(exist_ok=True)
            try:
                browser.screenshot(OUT / "ohif_last.png")
            except Exception:
                pass
            browser.close()
        if server is not None:
            server.stop()
        orthanc.stop()


def _includes(text: str) -> str:
    return f"document.body && document.body.innerText.includes({text!r})"


def test_study_list_open_study_connect_and_autosegment(viewer: dict) -> None:
    b, server = viewer["browser"], viewer["server"]
    b.goto(f"{server.url}/ohif/")
    # study list, filled from Orthanc through the server's DICOMweb proxy
    b.wait_for(_includes(CASE), 120, what="the study list to show the phantom study")
    listing = b.text()
    assert "Study List" in listing and "CT" in listing
    b.click_text(CASE)
    b.click_text("MONAI Label", selector="button")
    b.wait_for(f"location.href.includes({stable_uid(CASE, 'study')!r})", 60, what="the viewer to open the study")
    b.wait_for(_includes("CT venous phase") + " || " + _includes("CT arterial phase") + " || "
               + _includes("CT non-contrast") + " || " + _includes("CT delayed phase"), 120, what="the CT series")
    b.wait_for(_includes("Server:"), 60, what="the MONAI Label panel")
    # connect only once the images are in: the panel then builds its labelmap on the volume
    _wait_console(b, "displaySetsToAllImages", 120)
    b.click_selector(".settingsTable button.actionButton")  # connect
    b.wait_for(_includes("Auto-Segmentation"), 60, what="the panel to connect to the server")
    panel = b.text()
    assert "PanTS Label" in panel and "segmentation" in panel
    missing = [n for n in load_labelmap().names if n not in panel]
    assert not missing, f"labels missing from the panel: {missing}"

    b.click_text("Auto-Segmentation")
    b.click_element("[...document.querySelectorAll('label.tab-label')].find(l => l.innerText.trim() === "
                    "'Auto-Segmentation').closest('.tab').querySelector('button')", what="the Auto-Segmentation Run")
    _wait_console(b, "UpdateView", 180)
    b.wait_for(_includes("Running Segmentation - Successful"), 60, what="the success notice")
    errors = [c for c in b.console if "Error Boundary" in c]
    assert not errors, errors
    shot = b.screenshot(OUT / "ohif_autosegmentation.png")
    # the server segmented this study's CT series (fetched over DICOMweb)
    assert f"infer {stable_uid(CASE, 'ct')}.nii.gz" in server.tail(200000)
    _assert_not_blank(shot)


def _wait_console(b, needle: str, timeout: float) -> None:
    """Wait for a console message from the viewer (messages arrive while the page is polled)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(needle in c for c in b.console):
            return
        b.js("1")  # pumps queued console events
        time.sleep(0.5)
    raise AssertionError(f"no console message {needle!r} within {timeout} s; last: {b.console[-10:]}\n{b.text()[:2000]}")


def _assert_not_blank(path: Path) -> None:
    from PIL import Image

    img = Image.open(io.BytesIO(path.read_bytes())).convert("RGB").resize((350, 190))
    colours = len(set(img.getdata()))
    assert colours > 100, f"screenshot {path} looks blank ({colours} colours)"
