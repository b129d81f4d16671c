"""The one error type for refused client requests.

A :class:`ClientError` carries an HTTP status (4xx, or 5xx where a remote server failed) and a
message that names the problem; FastAPI answers it as ``{"detail": message}``. Code that checks
client input raises it through :func:`bad_request` (400), :func:`too_large` (413),
:func:`unsupported` (415) or :func:`unprocessable` (422).
"""

from __future__ import annotations

from fastapi import HTTPException


class ClientError(HTTPException):
    """A refused request; FastAPI turns it into ``status_code`` with ``detail`` as the message."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(status_code=status_code, detail=detail)

    def __str__(self) -> str:
        return f"{self.status_code}: {self.detail}"


def bad_request(detail: str) -> ClientError:
    return ClientError(400, detail)


def too_large(detail: str) -> ClientError:
    return ClientError(413, detail)


def unsupported(detail: str) -> ClientError:
    return ClientError(415, detail)


def unprocessable(detail: str) -> ClientError:
    return ClientError(422, detail)


__all__ = ["ClientError", "bad_request", "too_large", "unsupported", "unprocessable"]
