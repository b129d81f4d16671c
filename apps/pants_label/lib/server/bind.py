"""Where the server listens: 127.0.0.1 unless the operator names a host.

``monailabel start_server`` defaults to ``--host 0.0.0.0``; this app changes that to loopback
before uvicorn binds, and says so (README, Operating: put the authenticating front in front).
"""

from __future__ import annotations

import gc
import logging
import re
import sys
from collections.abc import Sequence
from typing import Any

from lib.core.config_errors import ConfigError

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


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


__all__ = ["LOOPBACK", "enforce_loopback_bind", "find_uvicorn_config", "host_given"]
