"""What every PanTS infer task does the same way: read the image and the answer's format from the
request, and write the answer file."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import numpy as np

from lib.core.errors import bad_request
from lib.imaging.volume_io import result_suffix, write_label


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


def answer_file(label: np.ndarray, affine: np.ndarray, suffix: str, prefix: str,
                write: Callable[[np.ndarray, np.ndarray, str], Any] = write_label) -> str:
    """A new temporary file (MONAI Label sends it, then deletes it) holding ``label`` as ``suffix``."""
    fd, out = tempfile.mkstemp(suffix=suffix, prefix=prefix)
    os.close(fd)
    write(label, affine, out)
    return out


__all__ = ["answer_file", "image_and_suffix"]
