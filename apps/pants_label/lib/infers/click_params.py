"""The clicks of a ``deepedit`` request, checked: what OHIF's Point Prompts and 3D Slicer's point
tool send. Pure functions; the request guard runs them (through the infer task's ``check_params``)
before the image is read."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lib.core.errors import ClientError, unknown

#: the key of background clicks, as OHIF's and 3D Slicer's point tools send them
BACKGROUND = "background"
#: keys that carry points without naming a class: deepgrow-style clicks for ``params.label``
FOREGROUND = "foreground"


@dataclass(frozen=True)
class ClickRequest:
    """Clicks of one request, as image indices (i, j, k) of the scan as stored."""

    positive: dict[str, list[tuple[int, int, int]]]  # class name -> its clicks, in the order sent
    background: list[tuple[int, int, int]]
    label: str | None = None  # ``params.label``: the segment the client has selected

    @property
    def count(self) -> int:
        return len(self.background) + sum(len(v) for v in self.positive.values())


def _point(value: Any, where: str) -> tuple[int, int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ClientError(400, f"{where}: a point is a list of three voxel indices [i, j, k], got {value!r:.60}")
    out = []
    for axis, v in zip("ijk", value):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ClientError(400, f"{where}: {axis} = {v!r:.40} is not a number; points are voxel indices [i, j, k]")
        if isinstance(v, float) and not math.isfinite(v):
            raise ClientError(400, f"{where}: {axis} = {v!r} is not a finite number")
        if v != int(v):
            raise ClientError(400, f"{where}: {axis} = {v!r} is not an integer; points are voxel indices [i, j, k]")
        out.append(int(v))
    return out[0], out[1], out[2]


def check_click_params(params: dict[str, Any], label_names: list[str], max_points: int,
                       shape: tuple[int, ...] | None = None) -> ClickRequest:
    """The clicks of a ``deepedit`` request, checked: what OHIF's and 3D Slicer's point tools send.

    ``params[<label name>] = [[i, j, k], ...]`` per clicked class, ``params.background`` likewise,
    optionally ``params.label`` (the selected class) with ``params.foreground`` for it. Every
    other list-valued key is refused as an unknown label name.

    Args:
        params: the request's params (a JSON object).
        label_names: the label map's class names.
        max_points: most points accepted in one request (all keys together).
        shape: the image's array shape; given, every point must lie inside it (422 otherwise).

    Raises:
        ClientError: 400 naming the key and the problem (unknown label, malformed list, non-integer
            or non-finite coordinate, too many points, no clicks); 422 for a point outside the image.
    """
    known = set(label_names)
    label = params.get("label")
    if label is not None and (not isinstance(label, str) or label not in known):
        if not (isinstance(label, str) and label == BACKGROUND):
            raise ClientError(400, "params.label: " + unknown("label name", label, label_names, ordered=True))
    positive: dict[str, list[tuple[int, int, int]]] = {}
    background: list[tuple[int, int, int]] = []
    total = 0
    for key, value in params.items():
        is_points = isinstance(value, list)
        if key not in known and key not in (BACKGROUND, FOREGROUND):
            if is_points and value and key in ("null", "undefined", ""):
                # OHIF's point tool sends the points under the selected label's name, "null" if none
                raise ClientError(400, f"params.{key}: points without a label: select the label the points "
                                       "belong to (e.g. pancreatic_lesion) before placing them")
            if is_points and (not value or isinstance(value[0], (list, tuple))):
                raise ClientError(400, f"params.{key}: " + unknown("label name", key, [*label_names, BACKGROUND],
                                                                   ordered=True))
            continue
        if value is None:
            continue
        if not is_points:
            raise ClientError(400, f"params.{key}: expected a list of points [[i, j, k], ...], got {value!r:.60}")
        total += len(value)
        if total > max_points:
            raise ClientError(400, f"params.{key}: too many points: more than {max_points} in one request "
                                   "(clicks.yaml max_points)")
        pts = [_point(v, f"params.{key}[{n}]") for n, v in enumerate(value)]
        if shape is not None:
            for n, p in enumerate(pts):
                if any(not 0 <= c < s for c, s in zip(p, shape)):
                    raise ClientError(422, f"params.{key}[{n}]: point {list(p)} lies outside the image "
                                           f"(voxel indices 0..{shape[0] - 1}, 0..{shape[1] - 1}, 0..{shape[2] - 1})")
        if key == BACKGROUND:
            background += pts
        elif key == FOREGROUND:
            if pts and (label is None or label == BACKGROUND):
                raise ClientError(400, "params.foreground: needs params.label naming the class the points belong to")
            if pts:
                positive.setdefault(label, []).extend(pts)
        elif pts:
            positive.setdefault(key, []).extend(pts)
    if not positive and not background:
        raise ClientError(400, "no clicks: send params[<label name>] = [[i, j, k], ...] and/or params.background")
    return ClickRequest(positive, background, label if label in known else None)


__all__ = ["BACKGROUND", "ClickRequest", "FOREGROUND", "check_click_params"]
