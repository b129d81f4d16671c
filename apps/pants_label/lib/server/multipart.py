"""Reading a form body's small fields without keeping its file parts: what the request guard
checks before MONAI Label's endpoint parses the same body."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from lib.core.errors import ClientError
from lib.server.checks import MAX_FIELD_BYTES, check_filename


class FormFields:
    """Collects the small fields of a multipart body (``name -> bytes``) and the file field names."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.fields: dict[str, bytes] = {}
        self.files: set[str] = set()
        self._headers: dict[str, str] = {}
        self._hname = b""
        self._hvalue = b""
        self._name: str | None = None
        self._is_file = False
        self._buf = bytearray()

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._add("_hname", d[s:e]),
            "on_header_value": lambda d, s, e: self._add("_hvalue", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self._part_end,
        }

    def _add(self, attr: str, data: bytes) -> None:
        setattr(self, attr, getattr(self, attr) + data)

    def _part_begin(self) -> None:
        self._headers, self._name, self._is_file, self._buf = {}, None, False, bytearray()

    def _header_end(self) -> None:
        self._headers[self._hname.decode("latin-1").lower()] = self._hvalue.decode("latin-1")
        self._hname = self._hvalue = b""

    def _headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, opts = parse_options_header(self._headers.get("content-disposition", ""))
        self._name = opts.get(b"name", b"").decode("utf-8", "replace")
        self._is_file = b"filename" in opts
        if self._name in self.fields or self._name in self.files:
            raise ClientError(400, f"form field {self._name!r} appears more than once; send each field once")
        if self._is_file:
            check_filename(opts[b"filename"], self._name)
            self.files.add(self._name)

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            return
        self._buf += data[start:end]
        if len(self._buf) > self.limit:
            raise ClientError(413, f"form field {self._name!r} is over {self.limit} bytes")

    def _part_end(self) -> None:
        if not self._is_file and self._name is not None:
            self.fields[self._name] = bytes(self._buf)


def parse_form(content_type: str, media: str, spool: Any) -> tuple[dict[str, bytes], set[str]]:
    """``(small fields, names of file fields)`` of a body in ``spool`` (read to its end)."""
    if media == "application/x-www-form-urlencoded":
        text = spool.read().decode("utf-8", "replace")
        return {k: v[0].encode() for k, v in parse_qs(text, keep_blank_values=True).items()}, set()
    if media != "multipart/form-data":
        return {}, set()
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, opts = parse_options_header(content_type)
    boundary = opts.get(b"boundary")
    if not boundary:
        raise ClientError(400, "multipart/form-data without a boundary in its Content-Type")
    collector = FormFields(MAX_FIELD_BYTES)
    parser = MultipartParser(boundary, collector.callbacks())
    try:
        while True:
            chunk = spool.read(1 << 20)
            if not chunk:
                break
            parser.write(chunk)
        parser.finalize()
    except ClientError:
        raise
    except Exception as err:  # python-multipart raises several types for damaged bodies
        raise ClientError(400, f"the multipart/form-data body is malformed ({err})") from None
    return collector.fields, collector.files


__all__ = ["FormFields", "parse_form"]
