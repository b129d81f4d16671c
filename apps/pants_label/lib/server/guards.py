"""Guards around MONAI Label's HTTP server, installed once: a loopback bind by default
(:mod:`lib.server.bind`), the request guard (:mod:`lib.server.middleware`, checks in
:mod:`lib.server.checks`), the app's own routes, and exception handlers that answer 4xx/507
where MONAI Label itself would answer 500 (:mod:`lib.server.responses`).

Installed from :meth:`PanTSLabelApp.on_init_complete`, which MONAI Label's lifespan calls in the
server process before uvicorn binds its socket (training/scoring subprocesses never call it).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from lib.server.bind import enforce_loopback_bind
from lib.server.middleware import RequestGuard
from lib.server.responses import exception_handlers

logger = logging.getLogger(__name__)


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
    fastapi_app.exception_handlers.update(exception_handlers())
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


__all__ = ["install", "install_server_guards"]
