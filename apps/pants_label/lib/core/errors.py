"""The one error type of the app, and the one writer of "unknown X; choose one of ..." messages.

A :class:`ClientError` carries an HTTP status (4xx, 503 when the served model cannot be used, or 5xx
where a remote server failed) and a
message that names the problem; FastAPI answers it as ``{"detail": message}`` and the request
guard answers it the same way before an endpoint runs. :class:`ConfigError` is the same type for
a bad config file or ``--conf`` value: it stops the server at start, or answers 400 if a request
carries it. Code that checks client input raises through :func:`bad_request` (400),
:func:`too_large` (413), :func:`unsupported` (415), :func:`unprocessable` (422) or
:func:`look_up` (an unknown name).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TypeVar

from fastapi import HTTPException

T = TypeVar("T")


class ClientError(HTTPException):
    """A refused request; FastAPI turns it into ``status_code`` with ``detail`` as the message."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(status_code=status_code, detail=detail)

    def __str__(self) -> str:
        return f"{self.status_code}: {self.detail}"


class ConfigError(ClientError, ValueError):
    """A config file or ``--conf`` value is invalid; the message names the file, key and problem."""

    def __init__(self, detail: str, status_code: int = 400) -> None:
        super().__init__(status_code, detail)

    def __str__(self) -> str:
        return str(self.detail)


def bad_request(detail: str) -> ClientError:
    return ClientError(400, detail)


def too_large(detail: str) -> ClientError:
    return ClientError(413, detail)


def unsupported(detail: str) -> ClientError:
    return ClientError(415, detail)


def unprocessable(detail: str) -> ClientError:
    return ClientError(422, detail)


class ModelUnusable(ClientError, ValueError):
    """The served weights cannot be used (another label map or input map, diverged): every request
    that needs them answers 503 with the reason until other weights are served."""

    def __init__(self, detail: str) -> None:
        super().__init__(503, detail)


def unknown(what: str, value: object, choices: Collection[object], note: str = "", ordered: bool = False) -> str:
    """The message for a value that is not one of ``choices``: "unknown X 'v'; choose one of: a, b".

    ``note`` is appended after the choices (" (or ids 1..28)"); choices are sorted unless ``ordered``.
    """
    names = [str(c) for c in choices]
    shown = ", ".join(names if ordered else sorted(names)) or "none"
    return f"unknown {what} {value!r}; choose one of: {shown}{note}"


def look_up(what: str, value: T, choices: Collection[T], status: int = 400, note: str = "") -> T:
    """``value`` if it is one of ``choices``; else a :class:`ClientError` naming all of them.

    In the spirit of ``monai.utils.look_up_option``: every "unknown X" message reads the same.

    Args:
        what: what the value names ("model", "score column").
        value: the value asked for.
        choices: the allowed values (shown sorted).
        status: the HTTP status of the refusal (404 for a name in a URL path).
        note: appended after the choices, e.g. " (or ids 1..28)".

    Example:
        >>> look_up("strategy", "random", ["random", "hybrid"])
        'random'
    """
    if value in choices:
        return value
    raise ClientError(status, unknown(what, value, choices, note))


__all__ = ["ClientError", "ConfigError", "bad_request", "look_up", "too_large", "unknown", "unsupported", "unprocessable"]
