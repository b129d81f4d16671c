"""Model versions over HTTP: the list with cards, and rollback (admin).

    GET  /model/{model}/versions                 every version's card, the served one, the history
    POST /model/{model}/rollback?version=v2      serve v2 again (atomically; infer and scoring reload it)

Both sit under ``/model/``, which the nginx front (``scripts/make_proxy.py``) gives to admins only;
with MONAI Label's own auth on, they need its admin role too. Annotators see the served
version's card in ``/info`` (``model_card``).
"""

# No ``from __future__ import annotations``: FastAPI reads these annotations at route creation.
import logging
import sys
from typing import Any, Optional

from fastapi import Depends, Request
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User

from lib.core.errors import ClientError, look_up
from lib.model.model_store import ModelStore

logger = logging.getLogger(__name__)


def _store(model: str) -> ModelStore:
    from monailabel.interfaces.utils.app import app_instance

    app = app_instance()
    look_up("model", model, list(getattr(app, "_infers", {})), status=404)
    store = getattr(app, "models", None)
    if store is None:
        raise ClientError(404, "this app keeps no model versions")
    return store


def versions_route() -> APIRoute:
    def api_versions(model: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))) -> Any:
        store = _store(model)
        return {"serving": store.serving_version(), "versions": store.versions(), "history": store.history()}

    return APIRoute(f"{settings.MONAI_LABEL_API_STR}/model/{{model}}/versions", api_versions, methods=["GET"],
                    summary="Model versions with their cards", tags=["Model"])


def rollback_route() -> APIRoute:
    def api_rollback(request: Request, model: str, version: Optional[str] = None,
                     user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))) -> Any:
        if not version:
            raise ClientError(400, "version: give the version to serve, e.g. ?version=v1 (GET /model/"
                                   f"{model}/versions lists them)")
        store = _store(model)
        by = request.headers.get("x-remote-user") or getattr(user, "username", None)
        result = store.rollback(version, by=by)
        logger.warning(f"model {model}: rolled back to {version} (was {result['previous']}) by {by or 'unknown'}")
        return result

    return APIRoute(f"{settings.MONAI_LABEL_API_STR}/model/{{model}}/rollback", api_rollback, methods=["POST"],
                    summary="Serve an earlier model version again (admin)", tags=["Model"])


def install_model_routes() -> bool:
    """Add the routes to the running server (before MONAI Label's own ``/model/{model}``)."""
    served = sys.modules.get("monailabel.app")
    if served is None or not hasattr(served, "app"):
        return False
    fastapi_app = served.app
    if getattr(fastapi_app.state, "pants_model_routes", False):
        return False
    fastapi_app.router.routes[0:0] = [versions_route(), rollback_route()]
    fastapi_app.state.pants_model_routes = True
    return True


__all__ = ["install_model_routes"]
