"""Answers the server writes itself: a JSON error body, and exception handlers that turn MONAI
Label's ``MONAILabelException`` into 400, a full disk (ENOSPC or SQLite's "database or disk is
full") into 507 Insufficient Storage, and a field that is not JSON into 400, where MONAI Label
would answer 500."""

from __future__ import annotations

import errno
import json
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)


def json_response(status: int, detail: str) -> tuple[dict[str, Any], bytes]:
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


def exception_handlers() -> dict[Any, Callable[..., Awaitable[Any]]]:
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


__all__ = ["DISK_FULL_DETAIL", "exception_handlers", "is_disk_full", "json_response"]
