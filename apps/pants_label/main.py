"""PanTS Label: a MONAI Label app serving the 28-class PanTS label set.

Start with ``monailabel start_server --app apps/pants_label --studies DIR`` (see README).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

# MONAI Label imports this file by path; make ``lib`` importable in the server and its
# training/scoring subprocesses alike.
_APP_DIR = os.path.dirname(os.path.abspath(__file__))
if _APP_DIR not in sys.path:
    sys.path.insert(0, _APP_DIR)

from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.datastore import Datastore  # noqa: E402
from monailabel.interfaces.tasks.infer_v2 import InferTask  # noqa: E402
from monailabel.interfaces.tasks.strategy import Strategy  # noqa: E402
from monailabel.interfaces.tasks.train import TrainTask  # noqa: E402

from lib.infers.segmentation import PanTSSegmentation  # noqa: E402
from lib.labelmap import load_labelmap  # noqa: E402
from lib.model_store import model_path  # noqa: E402
from lib.segmenter import Segmenter, default_threads  # noqa: E402
from lib.settings import AppSettings, load_segmentation_config  # noqa: E402
from lib.strategies import RandomUnlabeled  # noqa: E402
from lib.trainers.segmentation import PanTSTrain  # noqa: E402

logger = logging.getLogger(__name__)

MODEL = "segmentation"


class PanTSLabelApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        # Every setting is validated here, before anything starts: a bad value stops the
        # server with a ConfigError naming the key.
        self.settings = AppSettings.from_conf(conf)
        self.labelmap = load_labelmap()
        self.seg_config = load_segmentation_config()
        self.device = self.settings.resolved_device()
        self.preset = self.settings.resolved_preset()
        self.model_dir = Path(self.settings.model_dir or os.path.join(app_dir, "model")).resolve()
        self.model_dir.mkdir(parents=True, exist_ok=True)
        default_threads()
        logger.info(f"PanTS Label: preset '{self.preset}' on {self.device}; models in {self.model_dir}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="PanTS Label",
            description="28-class pancreatic CT annotation (PanTS label set)",
            version="1.0",
            labels=self.labelmap.labels_dict(),
        )

    def init_datastore(self) -> Datastore:
        # A PanTS root (ImageTr/...) or a flat NIfTI folder, read in place; the index, stored
        # labels and caches go to <studies>/.pants_label or to --conf datastore_dir (read-only data).
        from lib.datastore import PanTSDatastore

        return PanTSDatastore(
            self.studies,
            state_dir=self.settings.datastore_dir,
            hide_imported_labels=self.settings.hide_imported_labels,
            serve_test_split=self.settings.serve_test_split,
            labelmap=self.labelmap,
            max_upload_bytes=self.settings.max_upload_mb << 20,
        )

    def init_infers(self) -> dict[str, InferTask]:
        segmenter = Segmenter(
            self.seg_config, self.labelmap, self.preset, model_path(self.model_dir, self.preset), self.device
        )
        return {MODEL: PanTSSegmentation(segmenter, self.labelmap)}

    def init_trainers(self) -> dict[str, TrainTask]:
        return {MODEL: PanTSTrain(self.seg_config, self.labelmap, self.preset, self.model_dir, self.device)}

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": RandomUnlabeled()}

    def on_init_complete(self) -> None:
        # Server process only, before uvicorn binds: crash leftovers, loopback bind, request guards.
        from lib.guards import install_server_guards
        from lib.recovery import recover

        recover(getattr(self.datastore(), "state_dir", None), self.model_dir)
        s = self.settings
        install_server_guards(s.max_upload_mb << 20, s.infer_workers, s.infer_queue)
        super().on_init_complete()

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["preset"] = self.preset
        info["device"] = self.device
        info["label_colors"] = {k: list(v) for k, v in self.labelmap.colors().items()}
        return info
