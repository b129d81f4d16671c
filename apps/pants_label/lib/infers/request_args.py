"""The request fields every PanTS infer task reads the same way: the image and the answer's format."""

from __future__ import annotations

from typing import Any

from lib.core.errors import bad_request
from lib.imaging.volume_io import result_suffix


def image_and_suffix(request: dict[str, Any]) -> tuple[str, str]:
    """``(image, result file suffix)`` of an infer request; 400 naming the field otherwise.

    Only uint8 answers are produced (the 28 classes fit), so ``result_dtype`` may only ask for that.
    """
    image = request.get("image")
    if not isinstance(image, str) or not image:
        raise bad_request("image: a datastore image id or a file is required")
    try:
        suffix = result_suffix(request.get("result_extension"))
    except ValueError as err:
        raise bad_request(str(err)) from None
    dtype = str(request.get("result_dtype", "uint8"))
    if dtype != "uint8":
        raise bad_request(f"result_dtype: only 'uint8' is produced (28 classes fit), got {dtype!r}")
    return image, suffix


__all__ = ["image_and_suffix"]
