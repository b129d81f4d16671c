"""The ``deepedit`` click model behind the real server, driven by ``MONAILabelClient`` (as 3D Slicer's
point tool and OHIF's point prompts drive it).

The scan is a phantom at physical scale (1.6 x 1.6 x 2.5 mm), cut to the pancreas region so that
the test stays small. The served click weights are the committed demo weights.

* A click on a missed lesion adds lesion voxels near the click; nothing outside the recomputed
  window changes, voxel for voxel.
* A background click on a false lesion removes it.
* Clicks build on the previous answer (clients send every click again).
* Bad clicks get a 4xx naming the problem.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lib.core.click_config import load_click_config
from lib.core.labelmap import load_labelmap
from lib.imaging.metadata import write_metadata
from pants_tools.phantom import case_id, make_case, write_case
from server import REPO, Server

pytestmark = pytest.mark.server

LM = load_labelmap()
CFG = load_click_config()
LESION, HEAD = LM.id_of("pancreatic_lesion"), LM.id_of("pancreas_head")
DEMO_CLICKS = REPO / "apps" / "pants_label" / "demo_model" / "segresnet_clicks.pt"
SPACING = (1.6, 1.6, 2.5)
IMAGE = case_id(0)


def _phantom_crop(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """One phantom with a lesion at physical scale (410 x 410 x 375 mm), cut to 128 x 128 x 64 voxels (205 x 205 x 160 mm, more than a click window)
    around its lesion; written in the PanTS layout. Returns (truth label map, affine)."""
    p = make_case(0, shape=(256, 256, 150), spacing=SPACING, seed=5, lesion=True)
    centre = np.argwhere(p.masks["pancreatic_lesion"]).mean(axis=0).round().astype(int)
    size = np.array([128, 128, 64])
    lo = centre - size // 2
    box = tuple(slice(int(a), int(a + n)) for a, n in zip(lo, size))
    affine = p.affine.copy()
    affine[:3, 3] = (p.affine @ np.array([*lo, 1.0]))[:3]
    crop = type(p)(p.ct[box].copy(), {k: m[box].copy() for k, m in p.masks.items()}, affine, p.meta)
    write_case(crop, root / "ImageTr" / IMAGE / "ct.nii.gz", root / "LabelTr" / IMAGE / "segmentations")
    write_metadata(root / "metadata.csv", [p.meta])
    return LM.consolidate(crop.masks), affine


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path, np.ndarray, np.ndarray]]:
    base = tmp_path_factory.mktemp("clicks")
    root = base / "PanTS"
    truth, affine = _phantom_crop(root)
    model_dir = base / "model"
    model_dir.mkdir()
    shutil.copy(DEMO_CLICKS, model_dir / "segresnet_clicks.pt")
    server = Server(root, base / "server.log", conf={"model_dir": str(model_dir), "preset": "fast"})
    try:
        yield server, base, truth, affine
    finally:
        server.stop()


@pytest.fixture()
def client(app):
    from monailabel.client import MONAILabelClient

    return MONAILabelClient(app[0].url, tmpdir=str(app[1]))


def _label_file(path: Path, label: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), path)
    return str(path)


def _click(client, params: dict, label_in: str | None = None) -> tuple[np.ndarray, dict]:
    out, res = client.infer("deepedit", IMAGE, params, label_in=label_in)
    return np.asarray(nib.load(out).dataobj), res


def _outside(box: list[list[int]], shape: tuple[int, ...]) -> np.ndarray:
    keep = np.ones(shape, bool)
    keep[tuple(slice(a, b) for a, b in box)] = False
    return keep


def _centre(mask: np.ndarray) -> list[int]:
    """The voxel of ``mask`` nearest its centroid (inside the mask)."""
    idx = np.argwhere(mask)
    return [int(v) for v in idx[np.argmin(((idx - idx.mean(axis=0)) ** 2).sum(axis=1))]]


def _missed_lesion(truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(the lesion mask, a label map where the model took the lesion for pancreas head, a click at
    the lesion's centre)."""
    lesion = truth == LESION
    missed = truth.copy()
    missed[lesion] = HEAD
    return lesion, missed, _centre(lesion)


def _window_bound() -> np.ndarray:
    """Most scan voxels a window may span per axis (window_max at spacing_mm, plus rounding)."""
    return np.ceil(CFG.window_max * CFG.spacing_mm / np.array(SPACING)).astype(int) + 1


def test_info_lists_the_click_model_as_deepedit(client) -> None:
    model = client.info()["models"]["deepedit"]
    assert model["type"] == "deepedit"  # the type OHIF's point prompts and Slicer's point tool drive
    assert model["labels"] == LM.labels_dict()
    assert model["trained"] is True and model["max_points"] == CFG.max_points


def test_click_on_missed_lesion_adds_lesion_near_it_and_nothing_far(app, client, tmp_path: Path) -> None:
    truth, affine = app[2], app[3]
    lesion, missed, click = _missed_lesion(truth)
    got, res = _click(client, {"pancreatic_lesion": [click]}, _label_file(tmp_path / "cur.nii.gz", missed, affine))

    assert got.shape == truth.shape and got.dtype == np.uint8
    assert got[tuple(click)] == LESION
    [done] = res["corrected"]
    assert done["label"] == "pancreatic_lesion"
    box = done["box"]
    assert all(a <= c < b for c, (a, b) in zip(click, box))
    assert np.all(np.array([b - a for a, b in box]) <= _window_bound())
    # locality: outside the window, every voxel is the current label's
    outside = _outside(box, got.shape)
    np.testing.assert_array_equal(got[outside], missed[outside])
    # the trained click model finds the lesion from one click: most of it, little else
    added = got == LESION
    dice = 2 * (added & lesion).sum() / (added.sum() + lesion.sum())
    assert (added & lesion).sum() >= 0.5 * lesion.sum(), f"lesion DSC {dice:.2f} after one click"
    assert dice >= 0.5, f"lesion DSC {dice:.2f} after one click"
    assert res["latencies"]["total"] < 30


def test_background_click_removes_a_false_lesion(app, client, tmp_path: Path) -> None:
    truth, affine = app[2], app[3]
    lesion = truth == LESION
    # a false lesion: the true one moved away from itself, into pancreas and neighbours
    false = np.roll(lesion, (12, 0, 0), axis=(0, 1, 2)) & ~lesion
    assert false.sum() > 100
    current = truth.copy()
    current[false] = LESION
    click = _centre(false)
    got, res = _click(client, {"background": [click]}, _label_file(tmp_path / "cur.nii.gz", current, affine))

    assert got[tuple(click)] != LESION
    [done] = res["corrected"]
    assert done["label"] == "pancreatic_lesion"
    outside = _outside(done["box"], got.shape)
    np.testing.assert_array_equal(got[outside], current[outside])
    left = (got == LESION) & false
    assert left.sum() <= 0.2 * false.sum(), f"{left.sum()} of {false.sum()} false lesion voxels left"
    # voxels the lesion gives back take the neighbouring classes, not a hole of background
    freed = false & (got != LESION)
    assert (got[freed] != 0).mean() > 0.5


def test_clicks_build_on_the_previous_answer(app, client, tmp_path: Path) -> None:
    """Clients send every click again: the second request starts from the first answer and
    recomputes only what its new click changed."""
    truth, affine = app[2], app[3]
    lesion, missed, click = _missed_lesion(truth)
    first, _ = _click(client, {"pancreatic_lesion": [click], "reset_state": True},
                      _label_file(tmp_path / "cur.nii.gz", missed, affine))
    # no label part now: the server's state is the first answer
    far = [2, 2, 2]
    assert first[tuple(far)] != LESION
    second, res = _click(client, {"pancreatic_lesion": [click], "background": [far]})
    assert res["current_label"] == "client"
    for done in res["corrected"]:
        assert done["label"] != "pancreatic_lesion"  # its clicks did not change: not recomputed
    assert (second == LESION).sum() == (first == LESION).sum()
    if not res["corrected"]:
        np.testing.assert_array_equal(second, first)
    else:
        outside = np.ones(second.shape, bool)
        for done in res["corrected"]:
            outside &= _outside(done["box"], second.shape)
        np.testing.assert_array_equal(second[outside], first[outside])


def test_each_reader_builds_on_their_own_clicks(app, tmp_path: Path) -> None:
    """Two annotators on one scan (3D Slicer sends its client_id): reader B never starts from
    reader A's answer, and A's state survives B's clicks."""
    from monailabel.client import MONAILabelClient

    server, root, truth, affine = app
    a = MONAILabelClient(server.url, tmpdir=str(root), client_id="reader-a")
    b = MONAILabelClient(server.url, tmpdir=str(root), client_id="reader-b")
    lesion, missed, click = _missed_lesion(truth)
    _, res = _click(a, {"pancreatic_lesion": [click], "reset_state": True},
                    _label_file(tmp_path / "a.nii.gz", missed, affine))
    assert res["current_label"] == "client"
    _, res = _click(b, {"background": [[2, 2, 2]]})
    assert res["current_label"] != "client", res  # not A's label
    _, res = _click(a, {"pancreatic_lesion": [click]})
    assert res["current_label"] == "client" and not res["corrected"], res  # A's own answer, unchanged clicks


def _status(client, params: dict | str) -> tuple[int, str]:
    """(HTTP status, body) of a click request whose params may be raw JSON text."""
    from monailabel.client.client import MONAILabelUtils

    fields = {"params": params if isinstance(params, str) else json.dumps(params)}
    status, form, _, _ = MONAILabelUtils.http_multipart(
        "POST", client._server_url, f"/infer/deepedit?image={IMAGE}", fields, {})
    if isinstance(form, bytes):
        form = form.decode("utf-8", "replace")
    return status, form if isinstance(form, str) else json.dumps(form)


@pytest.mark.parametrize(
    "params, code, words",
    [
        ({"pancreatic_lesion": [[999, 1, 1]]}, 422, ["outside the image", "params.pancreatic_lesion[0]"]),
        ({"pancreatic_lesion": [[1, -1, 1]]}, 422, ["outside the image"]),
        ({"tumour": [[1, 2, 3]]}, 400, ["params.tumour", "label name"]),
        ({"label": "tumour", "foreground": [[1, 2, 3]]}, 400, ["params.label", "tumour"]),
        ({"liver": [[1, 1, 1]] * (CFG.max_points + 1)}, 400, ["too many points", str(CFG.max_points)]),
        ({"liver": [[1.5, 2, 3]]}, 400, ["params.liver[0]", "not an integer"]),
        ('{"liver": [[NaN, 2, 3]]}', 400, ["NaN", "not a number"]),
        ('{"liver": [[1e999, 2, 3]]}', 400, ["inf", "not a finite number"]),
        ({"liver": [["1", 2, 3]]}, 400, ["params.liver[0]", "not a number"]),
        ({"liver": [1, 2, 3]}, 400, ["params.liver[0]", "[i, j, k]"]),
        ({"liver": [[1, 2]]}, 400, ["params.liver[0]", "three voxel indices"]),
        ({"liver": "1,2,3"}, 400, ["params.liver", "list of points"]),
        ({"background": {"i": 1}}, 400, ["params.background", "list of points"]),
        ({"foreground": [[1, 2, 3]]}, 400, ["params.foreground", "params.label"]),
        ({"null": [[1, 2, 3]]}, 400, ["params.null", "select the label"]),
        ({}, 400, ["no clicks"]),
    ],
    ids=["outside", "negative", "unknown-label", "unknown-selected-label", "too-many", "non-integer", "nan",
         "infinite", "string-coordinate", "flat-list", "two-coordinates", "not-a-list", "dict", "foreground-no-label",
         "no-label-selected", "no-clicks"],
)
def test_bad_clicks_get_a_4xx_naming_the_problem(client, params, code: int, words: list[str]) -> None:
    status, body = _status(client, params)
    assert status == code, body
    for w in words:
        assert w in body, body
