"""Guards around MONAI Label's HTTP server: a loopback bind by default, request checks before
MONAI Label's endpoints run, and clear 4xx/507 answers where MONAI Label itself would answer 500.

Installed once from :meth:`PanTSLabelApp.on_init_complete`, which MONAI Label's lifespan calls in
the server process before uvicorn binds its socket (training/scoring subprocesses never call it).

What the request guard refuses, before any endpoint code runs (each with a message naming the
field, the value and what is allowed):

* unknown model / strategy / scoring method in the path (404, with the known names);
* a body whose content type the endpoint cannot read (415), a body over the limit (413:
  ``max_upload_mb`` for uploads, 1 MiB for JSON and form fields), a chunked upload (411);
* a ``params``/``info`` form field or JSON body that is not a JSON object (400), numbers that
  are not finite or beyond +-1e12 (400), training options outside their ranges (422);
* negative or huge numeric query parameters (``/logs/?lines``, ``/datastore/dataset?limit_cases``);
* ``/infer/{model}?image=ID`` for an image the datastore does not hold (404).

Inference and label saves then run on worker threads (MONAI Label runs them on the event loop,
where one inference stalls every other request); past ``infer_workers`` + ``infer_queue``
inferences the answer is 503 "server busy".

Exception handlers turn MONAI Label's ``MONAILabelException`` into 400, a full disk (ENOSPC or
SQLite's "database or disk is full") into 507 Insufficient Storage, and a field that is not JSON
into 400.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import errno
import gc
import json
import logging
import math
import re
import sqlite3
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from lib.core.config_errors import ConfigError
from lib.core.errors import ClientError, look_up
from lib.core.identity import REQUEST_IDENTITY, identity_from_headers
from lib.datastore.protocol import PanTSStore

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}

#: largest JSON body or form field (params/info) accepted
MAX_FIELD_BYTES = 1 << 20
#: multipart framing and small fields allowed on top of ``max_upload_mb``
_FORM_OVERHEAD = 64 << 10
#: longest upload file name (MONAI Label names its temp file with the name's suffixes)
MAX_FILENAME_BYTES = 200
#: ``params`` keys the server sets itself: a client must not point them at server files
_SERVER_OWNED_PARAMS = ("image", "label", "session", "model", "datastore")
#: numbers in request JSON beyond this magnitude are refused (no endpoint needs them)
MAX_ABS_NUMBER = 1e12
#: query parameters that are counts: (min, max)
_QUERY_INTS = {
    ("GET", "/logs/"): {"lines": (1, 100_000), "refresh": (0, 3600)},
    ("GET", "/datastore/dataset"): {"limit_cases": (1, 10_000_000)},
}
#: numeric options of MONAI Label's batch inference and infer requests: (min, max)
_BATCH_INTS = {"max_workers": (1, 64), "max_batch_size": (0, 4096)}
_INFER_NUMBERS = {"timeout": (1, 86_400)}

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


# ---- bind ------------------------------------------------------------------------------------


def host_given(argv: Sequence[str]) -> bool:
    """Whether the command line names the host (``--host X``, ``--host=X``, ``-i X``, ``-iX``).

    argparse also accepts unambiguous prefixes (``--ho``), so those count too.
    """
    for arg in argv[1:]:
        if arg == "--":
            break
        if re.match(r"^--ho(s(t)?)?(=|$)", arg) or re.match(r"^-i", arg):
            return True
    return False


def find_uvicorn_config() -> Any | None:
    """The running uvicorn ``Config`` (None when not served by uvicorn, e.g. in a subprocess).

    MONAI Label creates the app inside uvicorn's lifespan task, whose frames lead back to
    ``LifespanOn.main``; its ``self.config`` is the server's config, read before the bind.
    uvicorn offers no supported way for an app to reach the running server's ``Config`` (MONAI
    Label's ``start_server`` builds it and passes the app by import string), hence the frame walk,
    and, when the app is created outside the lifespan, the one ``Config`` alive in the process.
    """
    try:
        from uvicorn.config import Config
        from uvicorn.lifespan.on import LifespanOn
    except ImportError:
        return None
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, LifespanOn):
            return owner.config
        frame = frame.f_back
    configs = [o for o in gc.get_objects() if isinstance(o, Config)]  # e.g. a lifespan run elsewhere
    return configs[0] if len(configs) == 1 else None


def enforce_loopback_bind(argv: Sequence[str] | None = None, config: Any | None = None) -> str | None:
    """Bind to 127.0.0.1 unless the operator passed ``--host`` explicitly.

    ``monailabel start_server`` defaults to ``--host 0.0.0.0`` (every interface). uvicorn runs the
    lifespan, where the app is created, before it creates its socket, so changing the config's
    host here decides the bind. When uvicorn has already bound (``--workers`` > 1) and the host
    was not given, the server refuses to start instead.

    Returns:
        The host the server will listen on, or None when no uvicorn server is running.

    Raises:
        ConfigError: the socket was bound before the app started, on a host nobody asked for.
    """
    argv = sys.argv if argv is None else argv
    config = config if config is not None else find_uvicorn_config()
    if config is None:
        return None
    host = str(config.host)
    if host_given(argv):
        if host not in _LOOPBACK_HOSTS:
            logger.warning(
                "listening on %s (--host given): every client that can reach this port can use the server; "
                "put the authenticating proxy in front (README, Operating)", host,
            )
        return host
    if host in _LOOPBACK_HOSTS:
        return host
    if getattr(config, "workers", 1) > 1 or getattr(config, "should_reload", False):
        raise ConfigError(
            f"--host: the server would listen on {host} (MONAI Label's default) and with --workers/--reload "
            "the socket is bound before the app starts; pass --host 127.0.0.1, or --host explicitly"
        )
    config.host = LOOPBACK
    logger.info("listening on %s only (pass --host explicitly to listen elsewhere)", LOOPBACK)
    return LOOPBACK


# ---- errors ----------------------------------------------------------------------------------


def _json_response(status: int, detail: str) -> tuple[dict[str, Any], bytes]:
    body = json.dumps({"detail": detail}).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    }
    return start, body


def is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(err, sqlite3.OperationalError) and "disk is full" in str(err)


DISK_FULL_DETAIL = (
    "insufficient storage: the server's disk is full ({err}); nothing was saved and earlier labels are intact. "
    "Ask the operator to free space, then save again"
)


# ---- request checks --------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    kind: str  # infer | train | strategy | scoring | batch | upload | form | json-query | none
    name: str | None = None  # model / strategy / method from the path


_FORM_PATHS = {
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
    kind = _FORM_PATHS.get((method, path))
    if kind:
        return Route(kind)
    if (method, path) in _QUERY_INTS:
        return Route("json-query")
    return Route("none")


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def _media_type(scope: Scope) -> str:
    ct = _header(scope, b"content-type") or ""
    return ct.split(";", 1)[0].strip().lower()


def _query_true(scope: Scope, key: str) -> bool:
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


def _monailabel_auth() -> bool:
    """MONAI Label's own (Keycloak) auth serves /auth/ itself when it is on."""
    from monailabel.config import settings

    return bool(settings.MONAI_LABEL_AUTH_ENABLE)


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


class _FormFields:
    """Collects the small fields of a multipart body (``name -> bytes``) and the file field names."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.fields: dict[str, bytes] = {}
        self.files: set[str] = set()
        self._headers: dict[str, str] = {}
        self._hname = b""
        self._hvalue = b""
        self._name: str | None = None
        self._is_file = False
        self._buf = bytearray()

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._add("_hname", d[s:e]),
            "on_header_value": lambda d, s, e: self._add("_hvalue", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self._part_end,
        }

    def _add(self, attr: str, data: bytes) -> None:
        setattr(self, attr, getattr(self, attr) + data)

    def _part_begin(self) -> None:
        self._headers, self._name, self._is_file, self._buf = {}, None, False, bytearray()

    def _header_end(self) -> None:
        self._headers[self._hname.decode("latin-1").lower()] = self._hvalue.decode("latin-1")
        self._hname = self._hvalue = b""

    def _headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, opts = parse_options_header(self._headers.get("content-disposition", ""))
        self._name = opts.get(b"name", b"").decode("utf-8", "replace")
        self._is_file = b"filename" in opts
        if self._name in self.fields or self._name in self.files:
            raise ClientError(400, f"form field {self._name!r} appears more than once; send each field once")
        if self._is_file:
            check_filename(opts[b"filename"], self._name)
            self.files.add(self._name)

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            return
        self._buf += data[start:end]
        if len(self._buf) > self.limit:
            raise ClientError(413, f"form field {self._name!r} is over {self.limit} bytes")

    def _part_end(self) -> None:
        if not self._is_file and self._name is not None:
            self.fields[self._name] = bytes(self._buf)


class RequestGuard:
    """ASGI middleware that checks each request before MONAI Label's endpoints see it.

    Bodies of the endpoints it checks are read first (into a temporary file past 1 MiB), checked,
    then handed on unchanged; so an over-limit or malformed upload is refused before anything
    is written to the datastore.

    Args:
        app: the downstream ASGI app.
        max_upload_bytes: largest upload body (labels, images, model files).
        get_instance: returns the running MONAI Label app (looked up per request, so that
            ``POST /reload`` replacing it is followed).
    """

    def __init__(self, app: Any, max_upload_bytes: int, get_instance: Callable[[], Any], infer_workers: int = 1,
                 infer_queue: int = 32) -> None:
        self.app = app
        self.max_upload_bytes = int(max_upload_bytes)
        self.get_instance = get_instance
        # MONAI Label's infer and save-label endpoints are ``async def`` functions that run the whole
        # (CPU-bound) work on the event loop: one infer would freeze every other request. These
        # requests run on worker threads instead, each with its own event loop.
        self.pools = {
            "infer": ThreadPoolExecutor(max_workers=infer_workers, thread_name_prefix="pants-infer"),
            "upload": ThreadPoolExecutor(max_workers=2, thread_name_prefix="pants-save"),
        }
        self.infer_queue = int(infer_queue)
        self.infer_workers = int(infer_workers)
        self._waiting = {"infer": 0, "upload": 0}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        try:
            if scope.get("method") == "POST" and scope.get("path") == "/auth/token" and not _monailabel_auth():
                await self._basic_token(scope, receive, send)
                return
            self._check_busy(classify(scope.get("method", "GET"), scope.get("path", "/")))  # before reading a body
            receive, route = await self._check(scope, receive)
            pool = {"infer": "infer", "upload": "upload"}.get(route.kind)
        except ClientError as err:
            logger.info("refused %s %s: %d %s", scope.get("method"), scope.get("path"), err.status_code, err.detail)
            start, body = _json_response(err.status_code, str(err.detail))
            await send(start)
            await send({"type": "http.response.body", "body": body})
            return
        except OSError as err:
            if not is_disk_full(err):
                raise
            start, body = _json_response(507, DISK_FULL_DETAIL.format(err=err.strerror))
            await send(start)
            await send({"type": "http.response.body", "body": body})
            return
        REQUEST_IDENTITY.set(identity_from_headers(scope.get("headers", [])))  # this request's task only
        if pool is None:
            await self.app(scope, receive, send)
        else:
            await self._in_thread(pool, scope, receive, send)

    def _check_busy(self, route: "Route") -> None:
        """503 when ``infer_workers`` inferences run and ``infer_queue`` more wait already."""
        if route.kind == "infer" and self._waiting["infer"] >= self.infer_workers + self.infer_queue:
            raise ClientError(
                503,
                f"server busy: {self._waiting['infer']} inference requests are running or queued "
                f"(infer_workers = {self.infer_workers}, infer_queue = {self.infer_queue}); retry in a few seconds",
            )

    async def _in_thread(self, kind: str, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the downstream app for this request on a worker thread with its own event loop.

        ``receive``/``send`` stay on the server's loop; the worker reaches them through
        ``run_coroutine_threadsafe``. Exceptions come back here unchanged.
        """
        loop = asyncio.get_running_loop()

        async def t_receive() -> Message:
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(receive(), loop))

        async def t_send(message: Message) -> None:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(send(message), loop))

        def work() -> None:
            asyncio.run(self.app(scope, t_receive, t_send))

        self._waiting[kind] += 1
        try:
            # the worker runs in this request's context (its identity, see lib.core.identity)
            await loop.run_in_executor(self.pools[kind], contextvars.copy_context().run, work)
        finally:
            self._waiting[kind] -= 1

    async def _basic_token(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /auth/token`` behind the basic-auth proxy: the form's credentials as a Basic token.

        3D Slicer's module fetches a token here and sends ``Authorization: <token_type>
        <access_token>`` with every later request; the proxy checks it each time (README,
        Operating). Nothing is checked or revealed here: the answer holds what the client sent.
        """
        spool, _ = await self._read_body(scope, receive, MAX_FIELD_BYTES, "login form (limit 1 MiB)")
        with spool:
            form = parse_qs(spool.read().decode("utf-8", "replace"))
        user, password = (form.get("username") or [""])[0], (form.get("password") or [""])[0]
        if not user or not password:
            raise ClientError(400, "login form: 'username' and 'password' are required")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        body = json.dumps({"access_token": token, "token_type": "Basic"}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": body})

    # ---- checks
    async def _check(self, scope: Scope, receive: Receive) -> tuple[Receive, Route]:
        method, path = scope.get("method", "GET"), scope.get("path", "/")
        if method == "GET" and path == "/info/":
            await self._reconcile_training()
        route = classify(method, path)
        if route.kind == "none":
            return receive, route
        if route.kind == "json-query":
            check_query_ints(scope, _QUERY_INTS[(method, path)])
            return receive, route
        self._check_name(route)
        if route.kind in ("infer", "upload", "form"):
            return await self._check_form(scope, receive, route), route
        return await self._check_json(scope, receive, route), route

    async def _reconcile_training(self) -> None:
        """A training subprocess that died (OOM kill, crash) is shown as INTERRUPTED, not RUNNING."""
        model_dir = getattr(self.get_instance(), "model_dir", None)
        if model_dir is None:
            return
        from starlette.concurrency import run_in_threadpool

        from lib.datastore.recovery import mark_interrupted_training

        try:
            await run_in_threadpool(mark_interrupted_training, model_dir)
        except OSError as err:  # /info must answer even if the stats cannot be rewritten
            logger.warning("could not update training stats: %s", err)

    def _check_name(self, route: Route) -> None:
        if route.name is None:
            return
        app = self.get_instance()
        known_by_kind = {
            "infer": ("model", getattr(app, "_infers", {})),
            "batch": ("model", getattr(app, "_infers", {})),
            "train": ("model", getattr(app, "_trainers", {})),
            "strategy": ("strategy", getattr(app, "_strategies", {})),
            "scoring": ("scoring method", getattr(app, "_scoring_methods", {})),
        }
        what, known = known_by_kind[route.kind]
        look_up(what, route.name, known, status=404)

    async def _read_body(self, scope: Scope, receive: Receive, limit: int, what: str) -> tuple[Any, int]:
        """The body into a spooled temp file, refusing it past ``limit`` bytes (413)."""
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                raise ClientError(400, f"Content-Length {length[:20]!r} is not a number") from None
            if n > limit:
                raise ClientError(413, f"{what}: the request is {n} bytes, too large")
        elif "chunked" in (_header(scope, b"transfer-encoding") or "").lower() and what.startswith("upload"):
            raise ClientError(411, "uploads need a Content-Length header (chunked uploads are not accepted)")
        spool = tempfile.SpooledTemporaryFile(max_size=1 << 20)
        total = 0
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientError(400, "client disconnected during the upload")
                chunk = message.get("body", b"")
                total += len(chunk)
                if total > limit:
                    raise ClientError(413, f"{what}: the request is over {limit} bytes, too large")
                if chunk:
                    spool.write(chunk)
                if not message.get("more_body", False):
                    break
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return spool, total

    @staticmethod
    def _replay(spool: Any, total: int, receive: Receive) -> Receive:
        sent = 0
        done = False

        async def replay() -> Message:
            nonlocal sent, done
            if done:
                return await receive()
            chunk = spool.read(1 << 20)
            sent += len(chunk)
            more = sent < total
            if not more:
                done = True
                spool.close()
            return {"type": "http.request", "body": chunk, "more_body": more}

        return replay

    async def _check_form(self, scope: Scope, receive: Receive, route: Route) -> Receive:
        media = _media_type(scope)
        body_expected = route.kind != "infer" or media != ""
        if media not in ("multipart/form-data", "application/x-www-form-urlencoded") and body_expected:
            raise ClientError(
                415,
                f"Content-Type {media or '(none)'!r} is not accepted here; send multipart/form-data "
                "(fields 'params' as a JSON object, and the file)",
            )
        if scope.get("path") == "/session/" and _query_true(scope, "uncompress"):
            # MONAI Label unpacks such an archive with shutil.unpack_archive: a tar member named
            # ../../x or a link would write or read outside the session folder
            raise ClientError(400, "uncompress: archives are not unpacked on the server; send the image file itself "
                               "(NIfTI or NRRD)")
        if route.kind in ("upload", "infer"):
            # the file plus room for the multipart framing and the params field
            limit = self.max_upload_bytes + _FORM_OVERHEAD
            what = f"upload (limit max_upload_mb = {self.max_upload_bytes >> 20} MiB)"
        else:
            limit, what = MAX_FIELD_BYTES, "form (limit 1 MiB)"
        spool, total = await self._read_body(scope, receive, limit, what)
        try:
            fields, files = self._parse_form(scope, media, spool)
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        for name in ("params", "info"):
            if name in fields:
                try:
                    parsed = parse_json_object(fields[name], f"form field {name!r}")
                except BaseException:
                    spool.close()
                    raise
                if route.kind == "infer" and parsed:
                    check_range(parsed, _INFER_NUMBERS, "params")
                    owned = [k for k in _SERVER_OWNED_PARAMS if k in parsed]
                    if owned:
                        spool.close()
                        raise ClientError(400, f"params.{owned[0]} is set by the server; send the image id as the "
                                           "'image' query parameter or the image as the 'file' part")
        if route.kind == "infer":
            try:
                self._check_infer_image(scope, files, route)
            except BaseException:
                spool.close()
                raise
        return self._replay(spool, total, receive)

    def _parse_form(self, scope: Scope, media: str, spool: Any) -> tuple[dict[str, bytes], set[str]]:
        if media == "application/x-www-form-urlencoded":
            text = spool.read().decode("utf-8", "replace")
            return {k: v[0].encode() for k, v in parse_qs(text, keep_blank_values=True).items()}, set()
        if media != "multipart/form-data":
            return {}, set()
        from python_multipart.multipart import MultipartParser, parse_options_header

        _, opts = parse_options_header(_header(scope, b"content-type") or "")
        boundary = opts.get(b"boundary")
        if not boundary:
            raise ClientError(400, "multipart/form-data without a boundary in its Content-Type")
        collector = _FormFields(MAX_FIELD_BYTES)
        parser = MultipartParser(boundary, collector.callbacks())
        try:
            while True:
                chunk = spool.read(1 << 20)
                if not chunk:
                    break
                parser.write(chunk)
            parser.finalize()
        except ClientError:
            raise
        except Exception as err:  # python-multipart raises several types for damaged bodies
            raise ClientError(400, f"the multipart/form-data body is malformed ({err})") from None
        return collector.fields, collector.files

    def _check_infer_image(self, scope: Scope, files: set[str], route: Route) -> None:
        """Image ids are checked on every datastore: MONAI Label reads an id that names an
        existing path as that path."""
        if "label" in files and not getattr(getattr(self.get_instance(), "_infers", {}).get(route.name), "takes_label", False):
            raise ClientError(400, f"model {route.name!r} takes no 'label' part; send the image only")
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        image = (query.get("image") or [""])[0]
        if not image or "file" in files or query.get("session_id"):
            return
        from lib.datastore.label_upload import check_image_id

        check_image_id(image)
        datastore = self.get_instance().datastore()
        if not (isinstance(datastore, PanTSStore) and datastore.local_images):
            return  # remote datastores resolve ids themselves (and may download on lookup)
        if not datastore.get_image_uri(image):
            raise ClientError(404, f"image {image!r} not found in the datastore")

    async def _check_json(self, scope: Scope, receive: Receive, route: Route) -> Receive:
        media = _media_type(scope)
        spool, total = await self._read_body(scope, receive, MAX_FIELD_BYTES, "JSON body (limit 1 MiB)")
        raw = spool.read()
        spool.seek(0)
        if raw.strip() and media not in ("application/json", ""):
            spool.close()
            raise ClientError(415, f"Content-Type {media!r} is not accepted here; send application/json (a JSON object)")
        try:
            body = parse_json_object(raw, "request body")
            if body is not None:
                self._check_options(route, body)
        except BaseException:
            spool.close()
            raise
        return self._replay(spool, total, receive)

    def _check_options(self, route: Route, body: dict[str, Any]) -> None:
        if route.kind == "batch":
            check_range(body, _BATCH_INTS, "request body")
        if route.kind != "train":
            return
        app = self.get_instance()
        trainers = getattr(app, "_trainers", {})
        # POST /train/ carries {model: options}; POST /train/{model} the options themselves
        targets = {route.name: body} if route.name else {m: body.get(m) for m in trainers if body.get(m)}
        for model, options in targets.items():
            if not isinstance(options, dict):
                raise ClientError(400, f"request body.{model} must be a JSON object of training options")
            check_train_options(trainers.get(model), options, model)


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


# ---- exception handlers ----------------------------------------------------------------------


def _exception_handlers() -> dict[Any, Callable[..., Awaitable[Any]]]:
    from fastapi.responses import JSONResponse
    from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

    async def monailabel_error(request: Any, exc: MONAILabelException) -> JSONResponse:
        client_side = {MONAILabelError.INVALID_INPUT, MONAILabelError.APP_INIT_ERROR}
        status = 400 if exc.error in client_side else 500
        return JSONResponse({"detail": f"{exc.msg}"}, status_code=status)

    async def disk_full(request: Any, exc: Exception) -> JSONResponse:
        if not is_disk_full(exc):
            logger.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
            return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)
        logger.error("disk full during %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": DISK_FULL_DETAIL.format(err=exc)}, status_code=507)

    async def not_json(request: Any, exc: json.JSONDecodeError) -> JSONResponse:
        return JSONResponse(
            {"detail": f"a request field is not valid JSON ({exc}); 'params' must be a JSON object such as {{}}"},
            status_code=400,
        )

    return {
        MONAILabelException: monailabel_error,
        OSError: disk_full,
        sqlite3.OperationalError: disk_full,
        json.JSONDecodeError: not_json,
    }


def install(fastapi_app: Any, max_upload_bytes: int, get_instance: Callable[[], Any], infer_workers: int = 1,
            infer_queue: int = 32) -> bool:
    """Add :class:`RequestGuard` and the exception handlers to the running FastAPI app.

    The app's middleware stack was built when the lifespan started; it is rebuilt here, before
    the first request, so that the guard and handlers are part of it. Idempotent.

    Returns:
        False when already installed.
    """
    if getattr(fastapi_app.state, "pants_guards", False):
        return False
    from starlette.middleware import Middleware

    fastapi_app.user_middleware.append(
        Middleware(RequestGuard, max_upload_bytes=max_upload_bytes, get_instance=get_instance,
                   infer_workers=infer_workers, infer_queue=infer_queue)
    )
    fastapi_app.exception_handlers.update(_exception_handlers())
    from lib.server.listing import listing_route

    fastapi_app.router.routes.insert(0, listing_route(get_instance))  # matched before MONAI Label's
    from lib.server.review_routes import report_route

    fastapi_app.router.routes.insert(0, report_route(get_instance))
    fastapi_app.middleware_stack = fastapi_app.build_middleware_stack()
    fastapi_app.state.pants_guards = True
    return True


def install_server_guards(max_upload_bytes: int, infer_workers: int = 1, infer_queue: int = 32) -> str | None:
    """In the server process: loopback bind and request guards. Returns the listening host."""
    host = enforce_loopback_bind()
    served = sys.modules.get("monailabel.app")
    if served is not None and hasattr(served, "app"):
        from monailabel.interfaces.utils.app import app_instance

        if install(served.app, max_upload_bytes, app_instance, infer_workers, infer_queue):
            logger.info("request guards installed (upload limit %.0f MiB)", max_upload_bytes / 2**20)
    return host


__all__ = [
    "enforce_loopback_bind",
    "find_uvicorn_config",
    "host_given",
    "install",
    "install_server_guards",
    "RequestGuard",
    "is_disk_full",
]
