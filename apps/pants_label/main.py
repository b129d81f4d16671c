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
from monailabel.interfaces.tasks.scoring import ScoringMethod  # noqa: E402
from monailabel.interfaces.tasks.infer_v2 import InferTask  # noqa: E402
from monailabel.interfaces.tasks.strategy import Strategy  # noqa: E402
from monailabel.interfaces.tasks.train import TrainTask  # noqa: E402

from lib.core.jsonsafe import json_safe
from lib.core.al_config import DEFAULT_AL_CONFIG, load_al_config  # noqa: E402
from lib.infers.segmentation import PanTSSegmentation  # noqa: E402
from lib.infers.clicks import ClickStates, PanTSClicks  # noqa: E402
from lib.core.click_config import load_click_config  # noqa: E402
from lib.imaging.volume_cache import VolumeCache  # noqa: E402
from lib.model.clicks import ClickModel  # noqa: E402
from lib.core.labelmap import load_labelmap  # noqa: E402
from lib.datastore.protocol import ScoredStore  # noqa: E402
from lib.model.model_store import ModelStore, model_path  # noqa: E402
from lib.activelearning.retrain import RetrainScheduler, monailabel_launcher  # noqa: E402
from lib.model.segmenter import Segmenter, default_threads  # noqa: E402
from lib.model.pancreas_stage import SecondStage  # noqa: E402
from lib.core.settings import AppSettings, load_segmentation_config  # noqa: E402
from lib.activelearning.scoring import STATUS_NAME, ModelWatcher, PanTSScoring, StatusFile  # noqa: E402
from lib.activelearning.strategies import make_strategies  # noqa: E402
from lib.activelearning.review_strategies import review_strategies  # noqa: E402
from lib.core.identity import load_front_secret  # noqa: E402
from lib.core.review_config import DEFAULT_REVIEW_CONFIG, load_review_config  # noqa: E402
from lib.datastore.pants import PanTSDatastore  # noqa: E402
from lib.trainers.clicks import PanTSClickTrain  # noqa: E402
from lib.trainers.segmentation import PanTSTrain  # noqa: E402

logger = logging.getLogger(__name__)

MODEL = "segmentation"
#: the click model: type ``deepedit``, the one OHIF's point prompts and 3D Slicer's point tool drive
CLICK_MODEL = "deepedit"
#: the click model's weights and versions live in the model store as this "preset"
CLICK_PRESET = "clicks"
SCORING = "pants_uncertainty"


class PanTSLabelApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        # Every setting is validated here, before anything starts: a bad value stops the
        # server with a ConfigError naming the key.
        self.settings = AppSettings.from_conf(conf)
        self.labelmap = load_labelmap()
        self.seg_config = load_segmentation_config()
        self.click_config = load_click_config().check_labels(self.labelmap)
        self.al_config = load_al_config(self.settings.al_config or DEFAULT_AL_CONFIG).check_labels(self.labelmap)
        self.review_config = load_review_config(self.settings.review_config or DEFAULT_REVIEW_CONFIG)
        load_front_secret(self.settings.front_secret_file)  # X-Remote-User is trusted only with it
        self.device = self.settings.resolved_device()
        self.preset = self.settings.resolved_preset()
        default_threads()
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="PanTS Label",
            description="28-class pancreatic CT annotation (PanTS label set)",
            version="1.0",
            labels=self.labelmap.labels_dict(),
        )
        # Scoring runs at start and when a new model is published (ModelWatcher), not after
        # every next-sample request as MONAI Label's default would (a subprocess per request).
        self._auto_update_scoring = False
        self._watcher: ModelWatcher | None = None

    def init_datastore(self) -> Datastore:
        datastore = self._open_datastore()
        # One model store per dataset: in its state folder unless --conf model_dir names one.
        from lib.model.store_location import dataset_identity, model_dir_for

        self.model_dir = model_dir_for(self.settings.model_dir, datastore)
        self.models = ModelStore(self.model_dir, self.preset, dataset_identity(datastore))
        # infer's pancreas stage and the click model: their own presets' versions in the same store
        self.second_models = ModelStore(self.model_dir, self.seg_config.second_stage.preset, self.models.dataset)
        self.click_models = ModelStore(self.model_dir, CLICK_PRESET, self.models.dataset)
        logger.info(f"PanTS Label: preset '{self.preset}' on {self.device}; models in {self.model_dir}")
        return datastore

    def _open_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            # A DICOMweb server (Orthanc, a PACS): CT series in, DICOM SEG labels out, written
            # in-process (MONAI Label's own path would download a converter at start).
            from monailabel.config import settings as ml_settings

            from lib.datastore.dicomweb import DICOMwebDatastore, make_client

            if self.settings.campaign == "review":
                from lib.core.errors import ConfigError

                raise ConfigError("--conf campaign: 'review' needs a PanTS root or NIfTI folder, not a DICOMweb server")
            url = self.studies.rstrip("/")
            client = make_client(url, ml_settings.MONAI_LABEL_DICOMWEB_USERNAME, ml_settings.MONAI_LABEL_DICOMWEB_PASSWORD)
            return DICOMwebDatastore(
                url,
                client=client,
                state_dir=self.settings.datastore_dir,
                labelmap=self.labelmap,
                max_upload_bytes=self.settings.max_upload_mb << 20,
                qa=self.review_config.qa,
            )
        # A PanTS root (ImageTr/...) or a flat NIfTI folder, read in place; the index, stored
        # labels and caches go to <studies>/.pants_label or to --conf datastore_dir (read-only data).
        return PanTSDatastore(
            self.studies,
            state_dir=self.settings.datastore_dir,
            hide_imported_labels=self.settings.hide_imported_labels,
            serve_test_split=self.settings.serve_test_split,
            labelmap=self.labelmap,
            max_upload_bytes=self.settings.max_upload_mb << 20,
            review=self.review_config,
            campaign=self.settings.campaign,
        )

    def init_infers(self) -> dict[str, InferTask]:
        segmenter = Segmenter(
            self.seg_config, self.labelmap, self.preset, model_path(self.model_dir, self.preset), self.device
        )
        stage = self.seg_config.second_stage
        second = SecondStage(
            Segmenter(self.seg_config, self.labelmap, stage.preset, model_path(self.model_dir, stage.preset), self.device),
            stage.margin_mm,
        )
        # Decoded scans and current labels are shared: a click right after auto-segmentation
        # starts from that result without decoding the scan again.
        volumes = VolumeCache(2)
        click_model = ClickModel(self.click_config, self.seg_config, self.labelmap,
                                 self.click_models.serving_path, self.device)
        clicks = PanTSClicks(click_model, self.labelmap, self.click_config, volumes, ClickStates(), segmenter,
                             self.datastore, self.click_models.serving_version)
        segmentation = PanTSSegmentation(segmenter, self.labelmap, self.models, second, self.second_models,
                                         volumes, clicks.remember)
        return {MODEL: segmentation, CLICK_MODEL: clicks}

    def init_trainers(self) -> dict[str, TrainTask]:
        return {
            MODEL: PanTSTrain(
                self.seg_config, self.labelmap, self.preset, self.model_dir, self.device,
                max_epochs=self.settings.train_max_epochs, dataset=self.models.dataset,
            ),
            # the click model learns on the same labels; its clicks correct the served segmentation
            CLICK_MODEL: PanTSClickTrain(
                self.click_config, self.seg_config, self.labelmap, self.click_models, self.preset,
                model_path(self.model_dir, self.preset), self.device, steps=self.settings.click_train_steps,
            ),
        }

    def train(self, request: dict[str, Any]) -> dict[str, Any]:
        """MONAI Label's train, then (auto-retrain only) the click model on the same labels: its
        clicks correct the segmentation model's answers, so it follows that model's versions."""
        result = super().train(request)
        trigger = str(request.get("trigger", ""))
        if request.get("model") == MODEL and trigger.startswith("auto:") and self.settings.auto_train_clicks:
            try:
                clicks = super().train({"model": CLICK_MODEL, "trigger": trigger})
                logger.info(f"auto-retrain of the click model: {clicks.get('val_metric')} "
                            f"(published: {clicks.get('published')})")
            except Exception:  # noqa: BLE001 - the segmentation run's result stands on its own
                logger.exception("auto-retrain of the click model failed")
        return result

    def init_strategies(self) -> dict[str, Strategy]:
        strategies = dict(make_strategies(self.al_config.strategies))
        if self.settings.campaign == "review":  # review first: the default strategy of the clients
            strategies = {**review_strategies(self.al_config.strategies), **strategies}
        return strategies

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        segmenter = Segmenter(
            self.seg_config, self.labelmap, self.preset, model_path(self.model_dir, self.preset), self.device
        )
        return {SCORING: PanTSScoring(segmenter, self.al_config)}

    def on_init_complete(self) -> None:
        # Server process only (training/scoring subprocesses never get here), before uvicorn
        # binds: crash leftovers, loopback bind, request guards; then background scoring on each
        # new model, and the auto-retrain scheduler.
        from lib.server.guards import install_server_guards
        from lib.datastore.recovery import recover

        recover(self.datastore(), self.model_dir)
        self.models.adopt_serving()  # weights placed by hand become a version with a card
        self.second_models.adopt_serving()
        self.click_models.adopt_serving()
        s = self.settings
        install_server_guards(s.max_upload_mb << 20, s.infer_workers, s.infer_queue)
        from lib.server.model_routes import install_model_routes

        install_model_routes()
        super().on_init_complete()
        path = model_path(self.model_dir, self.preset)
        self._watcher = ModelWatcher(path, self.al_config.scoring.watch_interval_s, self._start_scoring).start()
        launch, busy = monailabel_launcher(MODEL)
        trainer: PanTSTrain = self._trainers[MODEL]  # type: ignore[assignment]
        self.retrain = RetrainScheduler(
            trainer.retrain_state_path, self.settings.auto_train_after, self.datastore, launch, busy
        )
        self.retrain.start()
        ds = self.datastore()
        if isinstance(ds, PanTSDatastore):
            ds.review.start_import_checks()  # QA of the imported masks (review campaign), in the background

    def _start_scoring(self, version: str | None) -> bool:
        """Background scoring (a MONAI Label scoring task); False if one is already running."""
        if not isinstance(self.datastore(), ScoredStore):
            return True  # this datastore keeps no scores: nothing to do
        if version is None and not self.al_config.scoring.score_untrained:
            return True  # nothing to score with yet; act again when a model appears
        from monailabel.utils.async_tasks.task import AsyncTask

        res, detail = AsyncTask.run("scoring", request={"method": SCORING}, enqueue=False)
        if res is None:
            logger.info(f"scoring not started: {detail}")
        return res is not None

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """MONAI Label's infer, with a client's uploaded or session image checked first.

        MONAI Label passes an uploaded file (or a session's image) as an absolute path; image ids
        never are one (the request guard refuses ids that could be paths). Such a file is checked
        like every other client file (:func:`lib.volume_decode.check_client_image`) before any
        reader sees it.
        """
        image = request.get("image")
        if isinstance(image, str) and os.path.isabs(image) and os.path.exists(image):
            from lib.imaging.volume_decode import check_client_image

            check_client_image(image, "uploaded image")
            request = {**request, "image_id": None}
        else:
            request = {**request, "image_id": image}  # set here, never by the client: the click model's stored label
        return super().infer(request, datastore)

    def on_save_label(self, image_id: str, label_id: str) -> dict[str, Any]:
        super().on_save_label(image_id, label_id)
        scheduler: RetrainScheduler | None = getattr(self, "retrain", None)
        if scheduler is not None:
            try:
                scheduler.on_label_saved()
            except Exception:  # noqa: BLE001 - the label is stored; counting must not fail the upload
                logger.exception("auto-retrain: could not count the new label")
        return {}

    def info(self) -> dict[str, Any]:
        info = super().info()
        # Top-level labels as names in id order, MONAI Label's own form: OHIF's panel appends to
        # this list (a dict breaks it); Slicer iterates either. Ids: models[*].labels.
        info["labels"] = self.labelmap.names
        info["preset"] = self.preset
        info["device"] = self.device
        info["label_colors"] = {k: list(v) for k, v in self.labelmap.colors().items()}
        info["active_learning"] = self._al_status()
        info["campaign"] = self.settings.campaign
        info["model_card"] = self._model_card()
        return info

    def _model_card(self) -> dict[str, Any]:
        """The served version's card, where the weights came from, and any mismatch (lib.model.model_store)."""
        return json_safe(self.models.serving())

    def _al_status(self) -> dict[str, Any]:
        ds = self.datastore()
        if not isinstance(ds, ScoredStore):
            return {}
        return {
            "scoring": StatusFile(Path(ds.state_dir) / STATUS_NAME).read(),
            "scored": ds.count_scores(),
            "leases": len(ds.active_leases()),
            "lease_minutes": self.al_config.strategies.lease_minutes,
        }
