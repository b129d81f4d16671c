"""Request checks as pure functions: which checks a request gets (:func:`classify`), and the
checks themselves on parsed values. No server is needed to test them (``tests/test_request_checks.py``);
:class:`lib.server.middleware.RequestGuard` applies them to each request.

Every refusal is a :class:`~lib.core.errors.ClientError` whose message names the field, the value
and what is allowed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from lib.core.errors import ClientError

#: largest JSON body or form field (params/info) accepted
MAX_FIELD_BYTES = 1 << 20
#: multipart framing and small fields allowed on top of ``max_upload_mb``
FORM_OVERHEAD = 64 << 10
#: longest upload file name (MONAI Label names its temp file with the name's suffixes)
MAX_FILENAME_BYTES = 200
#: ``params`` keys the server sets itself: a client must not point them at server files
SERVER_OWNED_PARAMS = ("image", "label", "session", "model", "datastore")
#: numbers in request JSON beyond this magnitude are refused (no endpoint needs them)
MAX_ABS_NUMBER = 1e12
#: query parameters that are counts: (min, max)
QUERY_INTS = {
    ("GET", "/logs/"): {"lines": (1, 100_000), "refresh": (0, 3600)},
    ("GET", "/datastore/dataset"): {"limit_cases": (1, 10_000_000)},
}
#: numeric options of MONAI Label's batch inference and infer requests: (min, max)
BATCH_INTS = {"max_workers": (1, 64), "max_batch_size": (0, 4096)}
INFER_NUMBERS = {"timeout": (1, 86_400)}

Scope = dict[str, Any]


@dataclass(frozen=True)
class Route:
    kind: str  # infer | train | strategy | scoring | batch | upload | form | json-query | none
    name: str | None = None  # model / strategy / method from the path


FORM_PATHS = {
    ("PUT", "/datastore/label"): "upload",
    ("PUT", "/datastore/image"): "upload",
    ("PUT", "/datastore/"): "upload",
    ("PUT", "/session/"): "upload",
    ("PUT", "/datastore/image/info"): "form",
    ("PUT", "/datastore/label/info"): "form",
    ("PUT", "/datastore/updatelabelinfo"): "form",
}


def classify(method: str, path: str) -> Route:
    """Which checks a request gets, from its method and path."""
    if method == "POST":
        m = re.match(r"^/infer/(?:wsi/|wsi_v2/)?([^/]+)/?$", path)
        if m:
            return Route("infer", m.group(1))
        m = re.match(r"^/(train|scoring|activelearning)/([^/]*)/?$", path)
        if m:
            kind = {"train": "train", "scoring": "scoring", "activelearning": "strategy"}[m.group(1)]
            return Route(kind, m.group(2) or None)
        m = re.match(r"^/batch/infer/([^/]+)/?$", path)
        if m:
            return Route("batch", m.group(1))
    if method == "PUT" and re.match(r"^/model/[^/]+/?$", path):
        return Route("upload")
    kind = FORM_PATHS.get((method, path))
    if kind:
        return Route(kind)
    if (method, path) in QUERY_INTS:
        return Route("json-query")
    return Route("none")


def header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def media_type(scope: Scope) -> str:
    ct = header(scope, b"content-type") or ""
    return ct.split(";", 1)[0].strip().lower()


def query_true(scope: Scope, key: str) -> bool:
    """Whether a boolean query parameter is set the way FastAPI reads it as true."""
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(key, [])
    return any(v.strip().lower() in ("1", "true", "on", "yes", "t", "y") for v in values)


def check_numbers(value: Any, where: str) -> None:
    """Refuse NaN/Infinity and numbers beyond :data:`MAX_ABS_NUMBER` anywhere in a JSON value."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ClientError(400, f"{where}: {value!r} is not a finite number")
        if abs(value) > MAX_ABS_NUMBER:
            raise ClientError(400, f"{where}: {value!r} is too large; numbers must lie within +-{MAX_ABS_NUMBER:g}")
    elif isinstance(value, dict):
        for k, v in value.items():
            check_numbers(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_numbers(v, f"{where}[{i}]")


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not a number JSON allows")


def parse_json_object(raw: bytes | str, where: str, allow_empty: bool = True) -> dict[str, Any] | None:
    """A JSON object from a body or form field; 400 naming ``where`` otherwise."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    if not text.strip():
        if allow_empty:
            return None
        raise ClientError(400, f"{where}: empty; send a JSON object such as {{}}")
    try:
        # int parsing of >4300 digits raises ValueError; NaN/Infinity are refused outright
        value = json.loads(text, parse_constant=_reject_constant)
    except ValueError as err:
        raise ClientError(400, f"{where} is not valid JSON ({err}); send a JSON object such as {{}}") from None
    if value is None and allow_empty:
        return None
    if not isinstance(value, dict):
        raise ClientError(400, f"{where} must be a JSON object, got {type(value).__name__} {text[:60]!r}")
    check_numbers(value, where)
    return value


def check_range(params: dict[str, Any], ranges: dict[str, tuple[float, float]], where: str) -> None:
    for key, (lo, hi) in ranges.items():
        if key not in params or params[key] is None:
            continue
        v = params[key]
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not ok or not lo <= v <= hi:
            raise ClientError(422, f"{where}.{key}: {v!r} is out of range; allowed {lo:g}..{hi:g}")


def check_query_ints(scope: Scope, ranges: dict[str, tuple[int, int]]) -> None:
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    for key, (lo, hi) in ranges.items():
        for raw in query.get(key, []):
            try:
                v = int(raw) if len(raw) < 30 else None
            except ValueError:
                v = None
            if v is None or not lo <= v <= hi:
                raise ClientError(422, f"query parameter {key}={raw[:40]!r}: must be an integer in {lo}..{hi}")


def check_filename(raw: bytes, field: str) -> None:
    """Refuse upload file names that are too long or hold control characters (NUL, newline, ...)."""
    if len(raw) > MAX_FILENAME_BYTES:
        raise ClientError(400, f"file name of form field {field!r} is {len(raw)} bytes long; "
                           f"at most {MAX_FILENAME_BYTES} are accepted")
    bad = sorted({c for c in raw if c < 0x20 or c == 0x7F})
    if bad:
        raise ClientError(400, f"file name of form field {field!r} contains control characters "
                           f"({', '.join(f'0x{c:02x}' for c in bad)}); rename the file")


def check_train_options(trainer: Any, options: dict[str, Any], model: str) -> None:
    """Training options checked against the trainer's own request model, when it has one.

    PanTS trainers describe their options with a pydantic model (``TrainRequest``) that the
    training subprocess validates too; checking it here answers 422 at once instead of a
    training run that fails seconds later.
    """
    request_model = getattr(trainer, "request_model", None)
    if request_model is None:
        from lib.trainers.segmentation import PanTSTrain, TrainRequest

        request_model = TrainRequest if isinstance(trainer, PanTSTrain) else None
    if request_model is None:
        return
    from pydantic import ValidationError

    defaults = trainer.config() if hasattr(trainer, "config") else {}
    try:
        request_model.model_validate({**defaults, **options})
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join(str(p) for p in e["loc"])
        raise ClientError(422, f"training option {key} of model {model!r}: {e['msg']} (got {e.get('input')!r})") from None


def check_validation_ids(options: dict[str, Any], datastore: Any, model: str) -> None:
    """A pinned validation set must name labelled training scans: refused at once (422), not by a
    training run that fails later. Checked per id, so a large datastore is not listed."""
    from lib.datastore.protocol import TRAINING_TAGS

    ids = options.get("validation_ids")
    if not ids or datastore is None:
        return
    split_of = getattr(datastore, "split_of", None)
    bad = [i for i in dict.fromkeys(ids)
           if (split_of is not None and split_of(i) == "test")
           or not any(t in datastore.get_labels_by_image_id(i) for t in TRAINING_TAGS)]
    if bad:
        raise ClientError(422, f"training option validation_ids of model {model!r}: {len(bad)} scan(s) are not "
                               f"labelled training scans: {', '.join(bad[:5])}")


__all__ = [
    "BATCH_INTS", "FORM_OVERHEAD", "INFER_NUMBERS", "MAX_ABS_NUMBER", "MAX_FIELD_BYTES", "MAX_FILENAME_BYTES",
    "QUERY_INTS", "SERVER_OWNED_PARAMS", "Route", "check_filename", "check_numbers", "check_query_ints", "check_range",
    "check_train_options", "check_validation_ids", "classify", "header", "media_type", "parse_json_object", "query_true",
]
