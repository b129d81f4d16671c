"""MONAI Label infer task: 28-class PanTS segmentation of a whole abdominal CT."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import numpy as np

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.core.errors import unprocessable
from lib.core.labelmap import LabelMap
from lib.infers.request_args import answer_file, image_and_suffix
from lib.model.model_store import ModelStore
from lib.model.pancreas_stage import SecondStage
from lib.model.segmenter import Segmenter
from lib.imaging.volume_cache import VolumeCache
from lib.imaging.volume_io import load_volume

logger = logging.getLogger(__name__)


class PanTSSegmentation(InferTask):
    """Runs :class:`lib.model.segmenter.Segmenter` (then the pancreas :class:`SecondStage` once it has
    weights) and writes a uint8 label map in the image's geometry."""

    def __init__(
        self,
        segmenter: Segmenter,
        labelmap: LabelMap,
        models: ModelStore | None = None,
        second: SecondStage | None = None,
        second_models: ModelStore | None = None,
        volumes: VolumeCache | None = None,
        on_result: Callable[[str, np.ndarray, dict[str, Any]], None] | None = None,
    ) -> None:
        """``volumes``: decoded scans shared with the click model; ``on_result(image, label, request)``
        hands each answer on (the click model starts its corrections from it)."""
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=labelmap.labels_dict(),
            dimension=3,
            description="",  # filled per call of info(): it says whether the model is trained
        )
        self.segmenter = segmenter
        self.labelmap = labelmap
        self.models = models
        self.second = second
        self.second_models = second_models
        self.volumes = volumes
        self.on_result = on_result

    # ---- what clients see
    def is_trained(self) -> bool:
        return self.segmenter.model_path.exists()

    def info(self) -> dict[str, Any]:
        info = super().info()
        preset = self.segmenter.preset
        trained = self.is_trained()
        info["description"] = (
            f"PanTS 28-class SegResNet, preset '{self.segmenter.preset_name}' "
            f"({preset.spacing_mm[0]:g} mm)"
            + ("" if trained else " - UNTRAINED: random weights until a model is trained or placed in the model folder")
            + (f", then the pancreas region at {self.second.segmenter.preset.spacing_mm[0]:g} mm"
               if self.second and self.second.ready() else "")
        )
        info["trained"] = trained
        info["preset"] = self.segmenter.preset_name
        info["precision"] = self.segmenter.precision  # float32, or bfloat16/float16 mixed
        info["spacing_mm"] = list(preset.spacing_mm)
        info["model_file"] = os.path.basename(self.segmenter.model_path)
        info["model_version"] = self.models.serving_version() if self.models else None
        info["colors"] = {k: list(v) for k, v in self.labelmap.colors().items()}
        if self.second is not None:
            ready = self.second.ready()
            info["second_stage"] = {
                "preset": self.second.segmenter.preset_name,
                "ready": ready,
                "version": self.second_models.serving_version() if ready and self.second_models else None,
                "model_file": os.path.basename(self.second.segmenter.model_path),
            }
        return info

    def is_valid(self) -> bool:
        # Listed even when untrained, so that /info says so instead of hiding the model.
        return True

    def model_version(self) -> str | None:
        """Version of the weights the last segmentation ran with: named inside the file when the
        store published it, else found by the served file's hash."""
        if not self.segmenter.info.trained:
            return None
        return self.segmenter.info.meta.get("version") or (self.models.serving_version() if self.models else None)

    # ---- the request
    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        t0 = time.perf_counter()
        image, suffix = image_and_suffix(request)

        t = time.perf_counter()
        try:
            vol = self.volumes.get(image) if self.volumes is not None else load_volume(image)
        except (ValueError, FileNotFoundError) as err:
            raise unprocessable(str(err)) from None
        latencies = {"load": round(time.perf_counter() - t, 3)}

        label, stage = self.segmenter.segment(vol)
        latencies.update(stage)
        second_version = None
        if self.second is not None and self.second.ready():
            label, stage = self.second.refine(vol, label)
            latencies.update(stage)
            info = self.second.segmenter.info
            second_version = info.meta.get("version") or (
                self.second_models.serving_version() if self.second_models else None)
        if self.on_result is not None:
            self.on_result(image, label, request)

        t = time.perf_counter()
        out = answer_file(label, vol.affine, suffix, "pants_seg_")
        latencies["write"] = round(time.perf_counter() - t, 3)
        latencies["total"] = round(time.perf_counter() - t0, 3)
        logger.info(f"infer {os.path.basename(image)} {vol.array.shape}: {latencies}")

        params = {
            "label_names": self.labelmap.labels_dict(),
            "latencies": latencies,
            "preset": self.segmenter.preset_name,
            "trained": self.segmenter.info.trained,
            "model_mtime": self.segmenter.info.mtime,
            # the version that produced this label: store it with the label (see README, "Model versions")
            "model_version": self.model_version(),
        }
        if second_version is not None or "stage2" in latencies:
            params["second_stage"] = {"preset": self.second.segmenter.preset_name, "model_version": second_version}
        return out, params
