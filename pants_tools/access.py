"""Client side of the authenticating proxy: log in the way 3D Slicer's MONAI Label module does.

The proxy (``scripts/make_proxy.py``, README "Operating") answers ``GET /auth/`` with
``enabled: true``; ``POST /auth/token`` turns a user name and password into a Basic token; the
client sends it as ``Authorization`` on every request and nginx checks it against htpasswd.

``MONAILabelClient`` adds ``content-type``/``content-length`` of each request to its stored
headers once ``update_auth`` has set them, so a second request with the same client object sends
a stale ``content-length`` and hangs (measured with monailabel 0.8.5). 3D Slicer creates a new
client for every request (``MONAILabelLogic._client``); :func:`login_client` does the same.
"""

from __future__ import annotations

from typing import Any


def login_client(url: str, username: str | None = None, password: str | None = None, tmpdir: str | None = None,
                 client_id: str | None = None) -> Any:
    """A fresh ``MONAILabelClient`` for one request, logged in as 3D Slicer's module does.

    Raises:
        MONAILabelClientException: the server refused the login form.
    """
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(url, tmpdir=tmpdir, client_id=client_id)
    if username is not None and client.auth_enabled():
        token = client.auth_token(username, password or "")
        client.update_auth(token)
    return client


__all__ = ["login_client"]
