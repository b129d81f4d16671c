"""MONAI Label infer task ``deepedit``: click-guided correction of the 28-class label map.

OHIF's MONAI Label panel and 3D Slicer's module drive models of type ``deepedit`` with point
prompts: ``params[<label name>] = [[i, j, k], ...]`` per clicked class and ``params.background``
(image indices). The answer is the whole 28-class map in the image's geometry; only a window
around the clicks is recomputed (:class:`lib.model.clicks.ClickModel`), every voxel outside it is
the current label's, unchanged.

The current label, in this order: a label file the client sends (the ``label`` part); the answer
to this annotator's previous click on this scan (kept in memory, so click after click builds on
the last answer); the scan's latest stored label (``final``, then ``original``, then the imported
masks), when there is no answer yet or the label was saved since; else the segmentation model's result, which its own
infer leaves here for the scan (or which is computed once).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.core.click_config import ClickConfig
from lib.core.errors import unprocessable
from lib.core.identity import reader_of
from lib.core.labelmap import LabelMap
from lib.core.lru import LRU
from lib.imaging.volume_cache import VolumeCache
from lib.imaging.volume_io import Volume, load_volume, write_label_fast
from lib.model.clicks import ClickModel
from lib.model.segmenter import Segmenter
from lib.infers.request_args import answer_file, image_and_suffix
from lib.infers.click_params import ClickRequest, check_click_params

logger = logging.getLogger(__name__)

#: stored label tags the current label is read from, most trusted first
STORED_TAGS = ("final", "original", "pants")
Point = tuple[int, int, int]


@dataclass
class ClickState:
    """The label one scan's clicks build on, and the clicks already applied to it."""

    label: np.ndarray  # uint8, the image's shape, Fortran order (written without a copy)
    source: str
    #: the stored label as it was when this state began (None: not looked at yet); a stored label
    #: that differs from it was saved since, and replaces the state
    stored: tuple | None = None
    # class -> (its positive clicks, the background clicks, its window) as last applied
    done: dict[int, tuple[frozenset, frozenset, tuple]] = field(default_factory=dict)


class ClickStates(LRU[str, ClickState]):
    """Current labels per reader and scan (few: each is a whole label map)."""

    def __init__(self, max_items: int = 4) -> None:
        super().__init__(max_items)


def _key(path: str, request: dict[str, Any] | None) -> str:
    """Click state is per reader and scan: two annotators clicking one scan never build on each
    other's clicks."""
    return f"{reader_of(request or {})}\0{os.path.abspath(path)}"


class PanTSClicks(InferTask):
    """Click-guided correction (``deepedit``) of the 28-class label map."""

    #: the request guard lets a ``label`` file part through to this model (the current label)
    takes_label = True

    def __init__(self, model: ClickModel, labelmap: LabelMap, cfg: ClickConfig, volumes: VolumeCache,
                 states: ClickStates, segmenter: Segmenter | None = None,
                 datastore: Callable[[], Any] | None = None, version: Callable[[], str | None] | None = None) -> None:
        super().__init__(type=InferType.DEEPEDIT, labels=labelmap.labels_dict(), dimension=3, description="")
        self.model, self.labelmap, self.cfg = model, labelmap, cfg
        self.volumes, self.states, self.segmenter = volumes, states, segmenter
        self.datastore, self.version = datastore, version
        self._lock = threading.Lock()  # one click at a time: clicks on one scan build on each other

    def info(self) -> dict[str, Any]:
        info = super().info()
        trained = self.model.trained
        info["description"] = (
            f"Click-guided correction of the 28 classes in a {self.cfg.window_min}-voxel window at "
            f"{self.cfg.spacing_mm:g} mm around the clicks"
            + ("" if trained else " - UNTRAINED: random weights until click weights are trained or placed")
        )
        info["trained"] = trained
        info["max_points"] = self.cfg.max_points
        info["model_version"] = self.version() if self.version else None
        return info

    def is_valid(self) -> bool:
        return True

    def check_params(self, params: dict[str, Any]) -> ClickRequest:
        """The request guard's check of the clicks (no image needed): 400 naming the problem."""
        return check_click_params(params, self.labelmap.names, self.cfg.max_points)

    # ---- the current label
    def remember(self, image_path: str, label: np.ndarray, request: dict[str, Any] | None = None) -> None:
        """The segmentation model's answer for a scan: the start of its reader's clicks (its own
        infer calls this with its request)."""
        # the client now shows this answer, so later clicks build on it (earlier clicks are dropped)
        self.states.put(_key(image_path, request), ClickState(np.asfortranarray(label, dtype=np.uint8), "segmentation"))

    def _stored(self, image_id: str | None) -> tuple[str, int, int] | None:
        """(path, size, mtime) of the scan's latest stored label, most trusted tag first."""
        if not image_id or self.datastore is None:
            return None
        ds = self.datastore()
        try:
            tags = ds.get_labels_by_image_id(image_id)
        except Exception:  # noqa: BLE001 - a datastore without labels for this id
            return None
        for tag in STORED_TAGS:
            if tag in tags:
                uri = ds.get_label_uri(tags[tag], tag)
                if uri and os.path.isfile(uri):
                    st = os.stat(uri)
                    return uri, st.st_size, st.st_mtime_ns
        return None

    def _state(self, request: dict[str, Any], vol: Volume, image_path: str) -> ClickState:
        key = _key(image_path, request)
        if request.get("reset_state") is True:
            self.states.drop(key)
        upload = request.get("label")
        stored = self._stored(request.get("image_id"))
        if isinstance(upload, str) and upload not in self.labelmap.names and upload != "background":
            label = self._read_label(upload, vol, "the label part")
            return self.states.put(key, ClickState(label, "client", stored))
        state = self.states.get(key)
        if state is not None and state.stored is None:
            state.stored = stored  # the segmentation answer came after whatever was stored then
        if stored is not None and (state is None or stored != state.stored):
            label = self._read_label(stored[0], vol, "the stored label")
            return self.states.put(key, ClickState(label, "stored", stored))
        if state is not None:
            return state
        if self.segmenter is None:
            return self.states.put(key, ClickState(np.zeros(vol.array.shape, np.uint8, order="F"), "empty"))
        label, _ = self.segmenter.segment(vol)
        return self.states.put(key, ClickState(np.asfortranarray(label, dtype=np.uint8), "segmentation"))

    def _read_label(self, path: str, vol: Volume, what: str) -> np.ndarray:
        try:
            lab = load_volume(path, dtype=np.uint8)
        except (ValueError, FileNotFoundError) as err:
            raise unprocessable(f"{what}: {err}") from None
        if lab.array.shape != vol.array.shape:
            raise unprocessable(f"{what}: shape {lab.array.shape} differs from the image's {vol.array.shape}")
        if int(lab.array.max(initial=0)) > self.labelmap.num_classes:
            raise unprocessable(f"{what}: values above {self.labelmap.num_classes} (ids 0..{self.labelmap.num_classes})")
        return np.asfortranarray(lab.array)

    # ---- the request
    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        t0 = time.perf_counter()
        image, suffix = image_and_suffix(request)
        clicks = self.check_params({k: v for k, v in request.items() if k != "label" or v in self.labelmap.names})
        lat: dict[str, float] = {}
        with self._lock:
            t = time.perf_counter()
            try:
                vol = self.volumes.get(image)
            except (ValueError, FileNotFoundError) as err:
                raise unprocessable(str(err)) from None
            check_click_params({k: v for k, v in request.items() if k != "label" or v in self.labelmap.names},
                               self.labelmap.names, self.cfg.max_points, vol.array.shape)  # 422 outside the image
            lat["load"] = round(time.perf_counter() - t, 3)
            t = time.perf_counter()
            state = self._state(request, vol, image)
            lat["current_label"] = round(time.perf_counter() - t, 3)
            t = time.perf_counter()
            corrected = self._apply(clicks, vol, state)
            lat["correct"] = round(time.perf_counter() - t, 3)
            t = time.perf_counter()
            out = answer_file(state.label, vol.affine, suffix, "pants_clicks_", write_label_fast)
            lat["write"] = round(time.perf_counter() - t, 3)
        lat["total"] = round(time.perf_counter() - t0, 3)
        logger.info(f"clicks {os.path.basename(image)}: {corrected} from {state.source} {lat}")
        params = {
            "label_names": self.labelmap.labels_dict(),
            "latencies": lat,
            "corrected": corrected,
            "current_label": state.source,
            "trained": self.model.trained,
            "model_version": self.version() if self.version else None,
        }
        return out, params

    def _apply(self, clicks: ClickRequest, vol: Volume, state: ClickState) -> list[dict[str, Any]]:
        """Correct every class whose clicks changed since the last answer; returns what was done."""
        lm = self.labelmap
        label = state.label
        background = list(clicks.background)
        positive = {lm.id_of(n): pts for n, pts in clicks.positive.items()}
        # background clicks correct the class they fall on (and stay negatives for every class)
        todo: dict[int, list[Point]] = {c: list(p) for c, p in positive.items()}
        for p in background:
            c = int(label[p])
            if c:
                todo.setdefault(c, [])
        # a class's negatives: the background clicks and the other classes' clicks
        rank = lm.priority_rank()
        done = []
        for cls in sorted(todo, key=lambda c: -int(rank[c])):  # low priority first: higher ones win
            pos = todo[cls]
            neg = background + [p for c, pts in positive.items() if c != cls for p in pts]
            if self._unchanged(state, cls, pos, background):
                continue  # clients send every click again: only what changed is recomputed
            newest = pos[-1] if pos else (background[-1] if background else None)
            box = self.model.correct(vol.array, label, vol.affine, cls, pos, neg, newest)
            state.done[cls] = (frozenset(pos), frozenset(background), box)
            done.append({"label": lm.id_to_name[cls], "box": [[s.start, s.stop] for s in box]})
        return done

    @staticmethod
    def _unchanged(state: ClickState, cls: int, pos: list[Point], background: list[Point]) -> bool:
        """Same positive clicks as last time, and no new background click in the class's window."""
        last = state.done.get(cls)
        if last is None or last[0] != frozenset(pos):
            return False
        new = [p for p in background if p not in last[1]]
        box = last[2]
        return not any(all(s.start <= c < s.stop for c, s in zip(p, box)) or int(state.label[p]) == cls for p in new)


__all__ = ["ClickState", "ClickStates", "PanTSClicks", "STORED_TAGS"]
