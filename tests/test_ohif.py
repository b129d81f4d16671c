"""OHIF v3 (served by MONAI Label at /ohif/) in headless Chromium, over a real Orthanc.

The viewer reads DICOMweb through the server's /proxy/dicom (Orthanc sends no CORS headers).
Study list -> open the study in the MONAI Label mode -> connect the panel (model and its 28
labels shown) -> run auto-segmentation -> the result is applied -> place a point on the lesion with
the ``deepedit`` click model (Point Prompts) -> the corrected result is applied. The server serves the
committed demo models on an adult-size phantom, as ``make serve`` does, so the screenshots kept in
``out/ohif_autosegmentation.png`` and ``out/ohif_clicks.png`` show organs.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
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
    write_pants_tree(root, 1, shape=(80, 80, 56), spacing=(4.6, 4.6, 7.2), seed=7, lesions={0: True})
    (base / "model").mkdir()
    for weights in ("segresnet_fast.pt", "segresnet_clicks.pt"):
        shutil.copy(REPO / "apps" / "pants_label" / "demo_model" / weights, base / "model")
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
        yield {"browser": browser, "server": server, "root": root}
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


def _open_study_and_connect(b, server) -> None:
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


def test_study_list_open_study_connect_and_autosegment(viewer: dict) -> None:
    b, server = viewer["browser"], viewer["server"]
    _open_study_and_connect(b, server)

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


#: the active viewport (cornerstone3D, through OHIF's services) brought to the slice holding the
#: world point (LPS mm); answers the point's page coordinates
_SHOW_POINT = """(() => {
  const w = %s;
  const {viewportGridService, cornerstoneViewportService} = window.services;
  const vp = cornerstoneViewportService.getCornerstoneViewport(viewportGridService.getState().activeViewportId);
  const cam = vp.getCamera(), n = cam.viewPlaneNormal;
  const d = n.reduce((s, v, i) => s + v * (w[i] - cam.focalPoint[i]), 0);
  vp.setCamera({focalPoint: cam.focalPoint.map((v, i) => v + d * n[i]), position: cam.position.map((v, i) => v + d * n[i])});
  vp.render();
  const c = vp.worldToCanvas(w), r = vp.element.getBoundingClientRect();
  return [r.left + c[0], r.top + c[1]];
})()"""
#: the viewer's labelmap at voxels [[i, j, k], ...] (its index space is the image's, as sent to the server)
_LABELMAP_AT = """(() => {
  const pts = %s;
  const vol = window.services.segmentationService.getLabelmapVolume('1');
  const data = vol.voxelManager.getCompleteScalarDataArray(), [nx, ny] = vol.dimensions;
  return pts.map(([i, j, k]) => data[i + nx * (j + ny * k)]);
})()"""
_LESION_VOXELS = """(() => {
  const seg = window.services.segmentationService;
  const vol = seg.getLabelmapVolume('1');
  const data = vol.voxelManager.getCompleteScalarDataArray();
  const s = Object.values(seg.getSegmentation('1').segments).find(s => s && s.label === 'pancreatic_lesion');
  if (!s) return -1;
  let n = 0;
  for (let i = 0; i < data.length; i++) if (data[i] === s.segmentIndex) n++;
  return n;
})()"""
_PROBES = ("(() => { const a = window.cornerstoneTools.annotation.state.getAnnotationManager()"
           ".saveAnnotations(null, 'ProbeMONAILabel'); return Object.values(a || {}).reduce((n, t) => "
           "n + ((t.ProbeMONAILabel || []).length), 0); })()")


def test_point_prompt_on_the_lesion_corrects_the_result(viewer: dict) -> None:
    """Point Prompts with the ``deepedit`` model after auto-segmentation: a click on the missed
    lesion is sent as ``params.pancreatic_lesion = [[i, j, k]]`` and the viewer draws more lesion."""
    b, server, root = viewer["browser"], viewer["server"], viewer["root"]
    if "Running Segmentation - Successful" not in b.text() and not any("UpdateView" in c for c in b.console):
        test_study_list_open_study_connect_and_autosegment(viewer)  # run alone: segment first
    mask = nib.load(root / "LabelTr" / CASE / "segmentations" / "pancreatic_lesion.nii.gz")
    idx = np.argwhere(np.asarray(mask.dataobj) > 0)
    assert len(idx), "the phantom has no lesion"
    idx = idx[np.argsort(((idx - idx.mean(axis=0)) ** 2).sum(axis=1))]  # lesion voxels, centre first
    # click where the viewer shows no label yet (the panel redraws only voxels that are
    # unlabelled or of the clicked class), as near the lesion's centre as there is one
    shown = b.js(_LABELMAP_AT % json.dumps(idx.tolist()))
    free = [n for n, v in enumerate(shown) if v == 0]
    assert free, "auto-segmentation labelled the whole lesion: nothing for a click to add"
    ijk = idx[free[0]]
    ras = mask.affine @ np.array([*ijk, 1.0])
    world = [-ras[0], -ras[1], ras[2]]  # DICOM's patient coordinates are LPS
    lesion_before = b.js(_LESION_VOXELS)

    if "Confirm and Hide" in b.text():
        b.click_text("Confirm and Hide")  # the banner covers the end of the label list
    b.click_text("Point Prompts")
    b.wait_for(_includes("deepedit"), 30, what="the click model in Point Prompts")
    row = "[...document.querySelectorAll('tr.clickable-row')].find(r => r.innerText.trim() === 'pancreatic_lesion')"
    for attempt in range(4):  # a notice of the last run may still cover the list for a few seconds
        b.click_element(row, what="the pancreatic_lesion row")
        try:
            b.wait_for(f"{row}.style.backgroundColor === 'darkblue'", 3, what="pancreatic_lesion to be selected")
            break
        except AssertionError:
            if attempt == 3:
                raise
            time.sleep(2)
    x, y = b.wait_for(_SHOW_POINT % json.dumps(world), 30, what="the lesion slice")
    time.sleep(1)
    before = b.screenshot(OUT / "ohif_clicks_before.png")
    for attempt in range(3):  # a click that lands while the viewport still renders places nothing
        b.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        b.click(x, y)  # the ProbeMONAILabel tool places the point
        try:
            b.wait_for(_PROBES, 10, what="the point to be placed")
            break
        except AssertionError:
            if attempt == 2:
                raise
            x, y = b.js(_SHOW_POINT % json.dumps(world))
            time.sleep(1)
    assert b.js(_PROBES) == 1, "one point, not more"
    b.click_element("[...document.querySelectorAll('label.tab-label')].find(l => l.innerText.trim() === "
                    "'Point Prompts').closest('.tab').querySelector('button')", what="the Point Prompts Run")
    _wait_console(b, "Target Labels to update", 180)
    _wait_console(b, "updated the segmentation's scalar data", 60)
    b.js(_SHOW_POINT % json.dumps(world))
    time.sleep(1)
    shot = b.screenshot(OUT / "ohif_clicks.png")
    _assert_not_blank(shot)
    errors = [c for c in b.console if "Error Boundary" in c]
    assert not errors, errors

    # what OHIF sent: the clicked voxel in the image's own index space
    log = server.tail(400000)
    sent = re.findall(r"'pancreatic_lesion': \[\[(\d+), (\d+), (\d+)\]\]", log)
    assert sent, "no point prompt for pancreatic_lesion in the server log"
    point = np.array([int(v) for v in sent[-1]])
    assert np.abs(point - ijk).max() <= 1, f"OHIF sent {point.tolist()}, the lesion voxel is {ijk.tolist()}"
    assert re.search(r"clicks \S+: \[\{'label': 'pancreatic_lesion'", log), "the server corrected no lesion"
    # the viewer now shows lesion where the click was, and more lesion than before
    assert b.js(_LABELMAP_AT % json.dumps([point.tolist()]))[0] != 0
    lesion_after = b.js(_LESION_VOXELS)
    assert lesion_after > max(lesion_before, 0), (lesion_before, lesion_after)
    assert _changed_near(before, shot, x, y), "the viewer shows no change at the clicked point"


def _changed_near(a: Path, b: Path, x: float, y: float, r: int = 6) -> bool:
    from PIL import Image

    pa = np.asarray(Image.open(a).convert("RGB"), dtype=int)
    pb = np.asarray(Image.open(b).convert("RGB"), dtype=int)
    box = (slice(int(y) - r, int(y) + r + 1), slice(int(x) - r, int(x) + r + 1))
    return bool(np.abs(pa[box] - pb[box]).sum(axis=2).max() > 30)


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
