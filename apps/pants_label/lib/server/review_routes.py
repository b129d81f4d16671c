"""``GET /review/report``: the campaign report as JSON, for dashboards (see :mod:`lib.datastore.campaign`)."""

# No ``from __future__ import annotations``: FastAPI reads these annotations at route creation.
from typing import Any, Callable

from fastapi import Depends
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User

from lib.core.errors import ClientError


def report_route(get_instance: Callable[[], Any]) -> APIRoute:
    """The route for ``GET {API}/review/report``; ``get_instance`` returns the running app."""

    def api_report(user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))) -> Any:
        from lib.datastore.campaign import campaign_report
        from lib.datastore.pants import PanTSDatastore

        store = get_instance().datastore()
        if not isinstance(store, PanTSDatastore):
            raise ClientError(409, "the campaign report needs a PanTS root or NIfTI folder datastore")
        return campaign_report(store)  # a plain def: FastAPI runs it on a worker thread

    return APIRoute(f"{settings.MONAI_LABEL_API_STR}/review/report", api_report, methods=["GET"],
                    summary="Review campaign report (progress, agreement, QA flags, throughput)", tags=["Review"])
