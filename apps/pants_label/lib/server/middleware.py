"""The request guard: ASGI middleware that checks each request before MONAI Label's endpoints run.

What it refuses, before any endpoint code runs (each with a message naming the field, the value
and what is allowed; the checks themselves are :mod:`lib.server.checks`):

* unknown model / strategy / scoring method in the path (404, with the known names);
* a body whose content type the endpoint cannot read (415), a body over the limit (413:
  ``max_upload_mb`` for uploads, 1 MiB for JSON and form fields), a chunked upload (411);
* a ``params``/``info`` form field or JSON body that is not a JSON object (400), numbers that
  are not finite or beyond +-1e12 (400), training options outside their ranges (422);
* negative or huge numeric query parameters (``/logs/?lines``, ``/datastore/dataset?limit_cases``);
* ``/infer/{model}?image=ID`` for an image the datastore does not hold (404).

Inference and label saves then run on worker threads (MONAI Label runs them on the event loop,
where one inference stalls every other request); past ``infer_workers`` + ``infer_queue``
inferences the answer is 503 "server busy". Behind the basic-auth front, ``POST /auth/token``
is answered here (3D Slicer's login).
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import json
import logging
import tempfile
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qs

from lib.core.errors import ClientError, look_up
from lib.core.identity import REQUEST_IDENTITY, identity_from_headers
from lib.datastore.protocol import PanTSStore
from lib.server.checks import (
    BATCH_INTS,
    FORM_OVERHEAD,
    INFER_NUMBERS,
    MAX_FIELD_BYTES,
    QUERY_INTS,
    SERVER_OWNED_PARAMS,
    Route,
    check_query_ints,
    check_range,
    check_train_options,
    check_validation_ids,
    classify,
    header,
    media_type,
    parse_json_object,
    query_true,
)
from lib.server.multipart import parse_form
from lib.server.responses import DISK_FULL_DETAIL, is_disk_full, json_response

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def _monailabel_auth() -> bool:
    """MONAI Label's own (Keycloak) auth serves /auth/ itself when it is on."""
    from monailabel.config import settings

    return bool(settings.MONAI_LABEL_AUTH_ENABLE)


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
            start, body = json_response(err.status_code, str(err.detail))
            await send(start)
            await send({"type": "http.response.body", "body": body})
            return
        except OSError as err:
            if not is_disk_full(err):
                raise
            start, body = json_response(507, DISK_FULL_DETAIL.format(err=err.strerror))
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
            check_query_ints(scope, QUERY_INTS[(method, path)])
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
        length = header(scope, b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                raise ClientError(400, f"Content-Length {length[:20]!r} is not a number") from None
            if n > limit:
                raise ClientError(413, f"{what}: the request is {n} bytes, too large")
        elif "chunked" in (header(scope, b"transfer-encoding") or "").lower() and what.startswith("upload"):
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
        media = media_type(scope)
        body_expected = route.kind != "infer" or media != ""
        if media not in ("multipart/form-data", "application/x-www-form-urlencoded") and body_expected:
            raise ClientError(
                415,
                f"Content-Type {media or '(none)'!r} is not accepted here; send multipart/form-data "
                "(fields 'params' as a JSON object, and the file)",
            )
        if scope.get("path") == "/session/" and query_true(scope, "uncompress"):
            # MONAI Label unpacks such an archive with shutil.unpack_archive: a tar member named
            # ../../x or a link would write or read outside the session folder
            raise ClientError(400, "uncompress: archives are not unpacked on the server; send the image file itself "
                               "(NIfTI or NRRD)")
        if route.kind in ("upload", "infer"):
            # the file plus room for the multipart framing and the params field
            limit = self.max_upload_bytes + FORM_OVERHEAD
            what = f"upload (limit max_upload_mb = {self.max_upload_bytes >> 20} MiB)"
        else:
            limit, what = MAX_FIELD_BYTES, "form (limit 1 MiB)"
        spool, total = await self._read_body(scope, receive, limit, what)
        try:
            fields, files = parse_form(header(scope, b"content-type") or "", media, spool)
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
                    check_range(parsed, INFER_NUMBERS, "params")
                    # a model that reads more of params (the click model's points) checks them here,
                    # before the image is read; its params.label names a class (3D Slicer's selected
                    # segment), which its check refuses unless it is one
                    check = getattr(getattr(self.get_instance(), "_infers", {}).get(route.name), "check_params", None)
                    owned = [k for k in SERVER_OWNED_PARAMS if k in parsed and not (k == "label" and check)]
                    if owned:
                        spool.close()
                        raise ClientError(400, f"params.{owned[0]} is set by the server; send the image id as the "
                                           "'image' query parameter or the image as the 'file' part")
                    if check is not None:
                        try:
                            check(parsed)
                        except BaseException:
                            spool.close()
                            raise
        if route.kind == "infer":
            try:
                self._check_infer_image(scope, files, route)
            except BaseException:
                spool.close()
                raise
        return self._replay(spool, total, receive)

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
        media = media_type(scope)
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
            check_range(body, BATCH_INTS, "request body")
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
            check_validation_ids(options, app.datastore() if hasattr(app, "datastore") else None, model)


__all__ = ["RequestGuard"]
