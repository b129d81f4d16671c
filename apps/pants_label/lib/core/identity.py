"""Who sent the current request: the nginx front's authenticated user, trusted only from the front.

The server listens on loopback; anything on the machine could reach it and set an
``X-Remote-User`` header. So that header (and ``X-Remote-Role``) counts only when the request
also carries the front's shared secret in ``X-PanTS-Front``: ``scripts/make_proxy.py`` writes
the secret into the nginx site (which overwrites these headers on every request it forwards)
and into ``front.secret``, which the server reads (``--conf front_secret_file``). Without the
secret, or with a wrong one, the request has no trusted identity and callers fall back to the
client's own ``client_id`` (3D Slicer sends one), marked as such.

The request guard sets :data:`REQUEST_IDENTITY` for each request; code that stores labels
reads it with :func:`current_identity`.
"""

from __future__ import annotations

import contextvars
import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib.core.errors import ConfigError

USER_HEADER = b"x-remote-user"
ROLE_HEADER = b"x-remote-role"
FRONT_HEADER = b"x-pants-front"
#: roles the front can give (make_proxy.py --admin / --reviewer / --annotator)
ROLES = ("annotator", "reviewer", "admin")
REVIEWER_ROLES = ("reviewer", "admin")


@dataclass(frozen=True)
class Identity:
    """A user the front authenticated: ``name`` and ``role`` (one of :data:`ROLES`)."""

    name: str
    role: str

    @property
    def reviews(self) -> bool:
        """May resolve flagged scans (senior review)."""
        return self.role in REVIEWER_ROLES


REQUEST_IDENTITY: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("pants_identity", default=None)
_front_secret: bytes | None = None


def load_front_secret(path: str | Path | None) -> None:
    """Trust front headers carrying the secret in ``path`` (None: trust none).

    Raises:
        ConfigError: the file is missing, unreadable or holds fewer than 16 characters.
    """
    global _front_secret
    if path is None:
        _front_secret = None
        return
    try:
        secret = Path(path).read_text().strip()
    except OSError as err:
        raise ConfigError(f"--conf front_secret_file {str(path)!r}: cannot read it ({err.strerror})") from None
    if len(secret) < 16:
        raise ConfigError(f"--conf front_secret_file {str(path)!r}: the secret must have at least 16 characters")
    _front_secret = secret.encode()


def identity_from_headers(headers: list[tuple[bytes, bytes]] | tuple) -> Identity | None:
    """The front's user and role, when the request carries the front's secret; else None."""
    if _front_secret is None:
        return None
    found: dict[bytes, bytes] = {}
    for k, v in headers:
        k = k.lower()
        if k in (USER_HEADER, ROLE_HEADER, FRONT_HEADER):
            found[k] = v
    given = found.get(FRONT_HEADER)
    if given is None or not hmac.compare_digest(given, _front_secret):
        return None
    name = found.get(USER_HEADER, b"").decode("utf-8", "replace").strip()
    role = found.get(ROLE_HEADER, b"annotator").decode("latin-1").strip()
    if not name:
        return None
    return Identity(name[:64], role if role in ROLES else "annotator")


def current_identity() -> Identity | None:
    """The trusted identity of the request being served (None outside a request or without a front)."""
    return REQUEST_IDENTITY.get()


def reader_of(request: dict[str, Any]) -> str:
    """Who sent ``request``: the front's trusted user, else the client's ``client_id`` (as 3D Slicer
    sends it), else ``anonymous``."""
    who = current_identity()
    if who is not None:
        return who.name
    client = request.get("client_id")
    return client.strip()[:64] if isinstance(client, str) and client.strip() else "anonymous"


__all__ = ["Identity", "REQUEST_IDENTITY", "ROLES", "current_identity", "identity_from_headers", "load_front_secret",
           "reader_of"]
