"""``GET /datastore/`` answered from the datastore's cached JSON when ``output=all``.

MONAI Label's endpoint returns ``Datastore.json()`` as a dict, which FastAPI walks through
``jsonable_encoder`` on every request: at 36,390 scans that is over a second for a listing that
3D Slicer asks for on every next sample. This route is placed before MONAI Label's, with the same
role check, and sends :meth:`~lib.datastore.protocol.PanTSStore.json_bytes` as it is. Other
outputs (``stats``, ``train``) go to MONAI Label's own function unchanged.
"""

# No ``from __future__ import annotations``: FastAPI reads these annotations at route creation.
from typing import Any, Callable, Optional

from fastapi import Depends
from fastapi.responses import Response
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.endpoints.datastore import ResultType, datastore
from monailabel.endpoints.user.auth import RBAC, User

from lib.datastore.protocol import PanTSStore


def listing_route(get_instance: Callable[[], Any]) -> APIRoute:
    """The route for ``GET {API}/datastore/``; ``get_instance`` returns the running app."""

    def api_datastore(
        output: Optional[ResultType] = None,
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
    ) -> Any:
        # A plain ``def``: FastAPI runs it on a worker thread, so a rebuild does not stall the loop.
        store = get_instance().datastore()
        if output == ResultType.all and isinstance(store, PanTSStore):
            return Response(store.json_bytes(), media_type="application/json")
        return datastore(output)

    return APIRoute(
        f"{settings.MONAI_LABEL_API_STR}/datastore/", api_datastore, methods=["GET"],
        summary="Get All Images/Labels from datastore", tags=["Datastore"],
    )
