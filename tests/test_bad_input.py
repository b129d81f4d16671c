"""Bad input on every endpoint of the real server: each case gets a 4xx with a message, the server
stays up, and nothing is stored.

One table: invalid ``params`` JSON, wrong content types, bodies over ``max_upload_mb``, unknown
model / strategy / scoring method / image, negative or huge numbers. Where MONAI Label 0.8.5 on
its own answered 500 (or 200 and a failing background task), ``lib/guards.py`` answers first.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import requests

from pants_tools.phantom import write_pants_tree
from server import Server

pytestmark = pytest.mark.server

IMAGE = "PanTS_00000001"
MAX_UPLOAD_MB = 1


@dataclass
class Case:
    id: str
    method: str
    path: str
    status: int
    message: str  # must appear in the answer's detail
    data: Any = None
    files: dict[str, Any] | None = None
    json_body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


BIG = b"\0" * ((MAX_UPLOAD_MB << 20) + (200 << 10))  # over the limit, with room for the form framing
LABEL = f"/datastore/label?image={IMAGE}&tag=final"
INFER = f"/infer/segmentation?image={IMAGE}"

CASES = [
    # ---- invalid params JSON
    Case("infer-params-not-json", "POST", INFER, 400, "'params' is not valid JSON", files={"params": (None, "{bad")}),
    Case("infer-params-not-object", "POST", INFER, 400, "must be a JSON object", files={"params": (None, "[1, 2]")}),
    Case("infer-params-nan", "POST", INFER, 400, "NaN", files={"params": (None, '{"x": NaN}')}),
    Case("label-params-not-json", "PUT", LABEL, 400, "'params' is not valid JSON",
         files={"params": (None, "{bad"), "label": ("l.nii.gz", b"x")}),
    Case("image-info-not-json", "PUT", f"/datastore/image/info?image={IMAGE}", 400, "'info' is not valid JSON",
         files={"info": (None, "nope")}),
    Case("label-info-not-object", "PUT", f"/datastore/label/info?label={IMAGE}&tag=final", 400,
         "must be a JSON object", files={"info": (None, '"text"')}),
    Case("next-sample-not-json", "POST", "/activelearning/random", 400, "not valid JSON",
         data=b"{bad", headers={"Content-Type": "application/json"}),
    Case("train-body-not-object", "POST", "/train/segmentation", 400, "must be a JSON object", json_body=[1]),
    Case("scoring-body-not-json", "POST", "/scoring/", 400, "not valid JSON",
         data=b"{", headers={"Content-Type": "application/json"}),
    # ---- wrong content types
    Case("infer-text-plain", "POST", INFER, 415, "multipart/form-data", data=b"hello",
         headers={"Content-Type": "text/plain"}),
    Case("infer-json", "POST", INFER, 415, "multipart/form-data", json_body={"a": 1}),
    Case("label-text-plain", "PUT", LABEL, 415, "multipart/form-data", data=b"x", headers={"Content-Type": "text/plain"}),
    Case("next-sample-text", "POST", "/activelearning/random", 415, "application/json", data=b"x",
         headers={"Content-Type": "text/plain"}),
    Case("train-form", "POST", "/train/segmentation", 415, "application/json", data={"max_epochs": "1"}),
    Case("label-not-a-volume", "PUT", LABEL, 415, "neither NIfTI",
         files={"params": (None, "{}"), "label": ("l.nii.gz", b"this is not an image")}),
    Case("multipart-no-boundary", "PUT", LABEL, 400, "boundary", data=b"x",
         headers={"Content-Type": "multipart/form-data"}),
    # ---- over the size limit
    Case("label-over-limit", "PUT", LABEL, 413, "max_upload_mb",
         files={"params": (None, "{}"), "label": ("l.nii.gz", BIG)}),
    Case("infer-file-over-limit", "POST", "/infer/segmentation", 413, "max_upload_mb",
         files={"params": (None, "{}"), "file": ("i.nii.gz", BIG)}),
    Case("image-upload-over-limit", "PUT", "/datastore/image?image=new1", 413, "max_upload_mb",
         files={"params": (None, "{}"), "file": ("i.nii.gz", BIG)}),
    Case("json-body-over-limit", "POST", "/activelearning/random", 413, "limit 1 MiB",
         json_body={"pad": "x" * (1 << 20)}),
    # ---- unknown names
    Case("infer-unknown-model", "POST", f"/infer/nosuch?image={IMAGE}", 404, "unknown model 'nosuch'"),
    Case("train-unknown-model", "POST", "/train/nosuch", 404, "unknown model 'nosuch'", json_body={}),
    Case("batch-unknown-model", "POST", "/batch/infer/nosuch", 404, "unknown model 'nosuch'", json_body={}),
    Case("unknown-strategy", "POST", "/activelearning/nosuch", 404, "unknown strategy 'nosuch'", json_body={}),
    Case("unknown-scoring", "POST", "/scoring/nosuch", 404, "unknown scoring method 'nosuch'", json_body={}),
    Case("infer-unknown-image", "POST", "/infer/segmentation?image=nosuch", 404, "'nosuch' not found"),
    Case("infer-bad-image-id", "POST", "/infer/segmentation?image=..%2Fetc", 400, "not a valid image id"),
    Case("label-unknown-image", "PUT", "/datastore/label?image=nosuch&tag=final", 404, "not found",
         files={"params": (None, "{}"), "label": ("l.nii.gz", b"x")}),
    Case("label-bad-tag", "PUT", f"/datastore/label?image={IMAGE}&tag=../x", 400, "not a valid label tag",
         files={"params": (None, "{}"), "label": ("l.nii.gz", b"x")}),
    Case("delete-label-none", "DELETE", f"/datastore/label?id={IMAGE}&tag=final", 404, "no 'final' label"),
    # ---- negative or huge numbers
    Case("train-negative-epochs", "POST", "/train/segmentation", 422, "max_epochs", json_body={"max_epochs": -1}),
    Case("train-negative-lr", "POST", "/train/segmentation", 422, "learning_rate", json_body={"learning_rate": -0.1}),
    Case("train-huge-iterations", "POST", "/train/segmentation", 422, "iterations_per_epoch",
         json_body={"iterations_per_epoch": 10**9}),
    Case("train-huge-batch", "POST", "/train/segmentation", 400, "too large", json_body={"batch_size": 10**30}),
    Case("train-all-negative", "POST", "/train/", 422, "max_epochs", json_body={"segmentation": {"max_epochs": 0}}),
    Case("train-infinite", "POST", "/train/segmentation", 400, "not a finite number",
         data=b'{"learning_rate": 1e400}', headers={"Content-Type": "application/json"}),
    Case("train-validation-unlabelled", "POST", "/train/segmentation", 422, "not labelled training scans: PanTS_09999999",
         json_body={"validation_ids": ["PanTS_09999999"]}),
    Case("train-validation-empty", "POST", "/train/segmentation", 422, "validation_ids", json_body={"validation_ids": []}),
    Case("batch-negative-workers", "POST", "/batch/infer/segmentation", 422, "max_workers",
         json_body={"max_workers": -3}),
    Case("infer-negative-timeout", "POST", INFER, 422, "timeout", files={"params": (None, '{"timeout": -1}')}),
    Case("next-sample-huge-number", "POST", "/activelearning/random", 400, "too large", json_body={"n": 1e300}),
    Case("logs-negative-lines", "GET", "/logs/?lines=-5", 422, "lines"),
    Case("logs-huge-lines", "GET", "/logs/?lines=999999999999999999999", 422, "lines"),
    Case("dataset-negative-limit", "GET", "/datastore/dataset?limit_cases=-5", 422, "limit_cases"),
    Case("infer-bad-extension", "POST", INFER, 400, "result_extension",
         files={"params": (None, '{"result_extension": ".exe"}')}),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("bad_input")
    write_pants_tree(base / "PanTS", 2, shape=(24, 24, 16), spacing=(4.0, 4.0, 5.0), seed=5)
    srv = Server(base / "PanTS", base / "server.log",
                 conf={"model_dir": str(base / "model"), "preset": "fast", "max_upload_mb": str(MAX_UPLOAD_MB),
                       "infer_queue": "0"})
    try:
        yield srv
    finally:
        srv.stop()


def _history(server: Server) -> dict[str, Any]:
    """Everything a bad request could have changed: the listing and the training list."""
    listing = requests.get(f"{server.url}/datastore/?output=all", timeout=30).json()["objects"]
    return {"objects": listing, "train": requests.get(f"{server.url}/datastore/?output=train", timeout=30).json()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_with_4xx_and_message(server: Server, case: Case) -> None:
    before = _history(server)
    r = requests.request(case.method, server.url + case.path, data=case.data, files=case.files,
                         json=case.json_body, headers=case.headers, timeout=120)
    assert r.status_code == case.status, f"{case.id}: {r.status_code} {r.text[:300]}"
    detail = r.json().get("detail")
    assert isinstance(detail, str) and case.message in detail, f"{case.id}: {detail!r}"
    assert server.proc.poll() is None, "the server exited"
    assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200
    assert _history(server) == before, f"{case.id} changed the datastore"
    assert requests.get(f"{server.url}/train/?check_if_running=true", timeout=30).status_code == 404, \
        f"{case.id} started a training run"


def test_good_requests_still_pass_the_guards(server: Server, tmp_path: Path) -> None:
    """The same endpoints with valid input answer 200 (the guard replays the body unchanged)."""
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    ref = nib.load(Path(server.root) / "ImageTr" / IMAGE / "ct.nii.gz")
    label = np.zeros(ref.shape, np.uint8)
    label[2:6, 2:6, 2:6] = 3
    path = tmp_path / "l.nii.gz"
    nib.save(nib.Nifti1Image(label, ref.affine), path)
    client.save_label(IMAGE, str(path), tag="final", params={"note": "ok"})
    back = requests.get(f"{server.url}/datastore/label?label={IMAGE}&tag=final", timeout=30)
    assert back.status_code == 200
    info = requests.get(f"{server.url}/datastore/label/info?label={IMAGE}&tag=final", timeout=30).json()
    assert info["note"] == "ok"
    res, _ = client.infer("segmentation", IMAGE, {"timeout": 600})
    assert Path(res).exists()
    r = requests.put(f"{server.url}/datastore/image/info?image={IMAGE}", files={"info": (None, json.dumps({"k": 1}))},
                     timeout=30)
    assert r.status_code == 200, r.text


def test_infers_past_the_queue_get_a_busy_answer_and_the_rest_are_served(server: Server) -> None:
    """infer_queue 0: while one inference runs, others get 503 with a message, not a long wait."""
    from concurrent.futures import ThreadPoolExecutor

    def infer(_: int) -> requests.Response:
        return requests.post(server.url + INFER, files={"params": (None, "{}")}, timeout=300)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(infer, range(8)))
    codes = sorted(r.status_code for r in answers)
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
    busy = next(r for r in answers if r.status_code == 503)
    assert "server busy" in busy.json()["detail"] and "infer_queue" in busy.json()["detail"]
    assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200


@pytest.mark.parametrize("key, value", [("infer_workers", "0"), ("infer_queue", "-1"), ("max_upload_mb", "0")])
def test_limit_settings_are_validated_at_start(key: str, value: str) -> None:
    from lib.core.config_errors import ConfigError
    from lib.core.settings import AppSettings

    with pytest.raises(ConfigError, match=f"--conf {key}"):
        AppSettings.from_conf({key: value})
