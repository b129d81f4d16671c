"""A MONAI Label datastore over a DICOMweb server (Orthanc, a PACS): ``--studies http://.../dicom-web``.

Images are CT series (image id = SeriesInstanceUID). Labels are DICOM SEG series in the same
server, written here by highdicom (no converter downloaded at run time) with the 28 PanTS
segments' names, colours and SNOMED CT codes, referencing their CT series. A SEG's
ContentLabel gives its tag: ``PANTS`` for masks loaded from PanTS (``scripts/load_pacs.py``),
anything else (``FINAL`` from this server, or a viewer's own) is a ``final`` label.

The index is the same as a PanTS folder's (:mod:`lib.datastore.pacs_index`): series are its
images, so scores, leases, label versions and the next-sample strategies are shared code
(:class:`~lib.datastore.indexed.IndexedStore`), and a series' center, phase, age, sex and
spacing come from its DICOM attributes (:mod:`lib.imaging.dicom_meta`).

Everything this datastore keeps lives in one writable folder (``--conf datastore_dir``, default
``~/.cache/pants_label/dicomweb/<hash of the URL>``), so image ids, image info, scores, leases
and label history survive a restart::

    pacs_index.sqlite                     series, their info and metadata, scores, leases, label
                                          versions; SEG series and the CT series they reference
    dicom/<series>/<sop>.dcm              downloaded CT instances (headers are the SEG's source)
    images/<series>.nii.gz                the CT as NIfTI (what infer, scoring and clients read)
    labels/<tag>/<series>/v<N>.nii.gz     every label version saved through the API
    segs/<seg series>.nii.gz              SEG series decoded to the 28-class label map
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from dicomweb_client import DICOMwebClient
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom.dataset import Dataset

from lib.core.atomic import staged_dir
from lib.datastore import provenance
from lib.datastore.index import loads
from lib.datastore.indexed import IndexedStore
from lib.datastore.pacs_index import PACS_SPLIT, PacsIndex, migrate_v1
from lib.datastore.protocol import FINAL_TAG, IMPORTED_TAG
from lib.datastore.rows import LabelRow
from lib.imaging.dicom_seg import check_seg_size, label_to_seg, seg_to_label
from lib.imaging.dicom_series import CTStudy, SeriesGeometry, ct_series, read_volume, series_geometry
from lib.datastore.label_upload import (
    DatastoreError,
    bad_request,
    check_image_id,
    check_label,
    check_save_target,
    check_tag,
    read_geometry,
)
from lib.core.labelmap import LabelMap, load_labelmap
from lib.core.review_config import QAConfig, load_review_config
from lib.imaging.dicom_meta import case_from_dicom
from lib.qa import qa_info
from lib.imaging.volume_decode import check_client_image
from lib.imaging.volume_io import write_label, write_volume

logger = logging.getLogger(__name__)

#: SEG ContentLabel -> tag; any other ContentLabel counts as ``final``
CONTENT_LABEL_TAGS = {"PANTS": IMPORTED_TAG}
#: QIDO fields kept as image info (and returned by next sample: OHIF needs StudyInstanceUID)
SERIES_FIELDS = (
    "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "Modality", "SeriesDescription", "SeriesNumber",
    "StudyDate", "SeriesDate", "SeriesTime", "InstitutionName", "ContentLabel",
    "PatientSex", "PatientAge", "ContrastBolusAgent",
)
#: the index file (version 1 kept another schema in ``index.sqlite``; migrated at start)
INDEX_NAME = "pacs_index.sqlite"


def make_client(url: str, username: str = "", password: str = "") -> DICOMwebClient:
    """A DICOMweb client for ``url``; monailabel's subclass tolerates servers that label
    multipart answers loosely."""
    from monailabel.datastore.dicom import DICOMwebClientX

    session = None
    if username and password:
        from dicomweb_client.session_utils import create_session_from_user_pass

        session = create_session_from_user_pass(username, password)
    return DICOMwebClientX(url=url.rstrip("/"), session=session)


def default_state_dir(url: str) -> Path:
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return Path.home() / ".cache" / "pants_label" / "dicomweb" / digest


def _value(item: dict[str, Any], keyword: str) -> str | None:
    """A QIDO JSON attribute's first value as text (PersonName -> Alphabetic)."""
    tag = pydicom.datadict.tag_for_keyword(keyword)
    entry = item.get(f"{tag:08X}") if tag is not None else None
    values = (entry or {}).get("Value") or []
    if not values:
        return None
    v = values[0]
    return str(v.get("Alphabetic", "")) if isinstance(v, dict) else str(v)


def store(client: DICOMwebClient, datasets: Sequence[Dataset]) -> None:
    """STOW-RS ``datasets``; raises ``RuntimeError`` if the server refuses any instance."""
    result = client.store_instances(list(datasets))
    failed = getattr(result, "FailedSOPSequence", None)
    if failed:
        reasons = sorted({str(getattr(f, "FailureReason", "?")) for f in failed})
        raise RuntimeError(f"the DICOMweb server refused {len(failed)} instance(s) (failure reasons {reasons})")


class DICOMwebDatastore(IndexedStore):
    """MONAI Label ``Datastore`` over a DICOMweb server, with DICOM SEG labels.

    Args:
        url: the DICOMweb root (``http://host:port/dicom-web``).
        state_dir: writable folder for the index and caches (see module docstring).
        labelmap: the label map; default ``configs/labels.yaml``.
        max_upload_bytes: largest label upload accepted.
        client: a ready client (tests, authenticated sessions); default :func:`make_client`.
        search_filter: QIDO filter of the CT series served.
        refresh_interval_s: how long a listing of the server is reused before asking again.
        qa: the annotation-standard checks run on every save (``configs/review.yaml``).
    """

    served_splits = (PACS_SPLIT,)

    def __init__(
        self,
        url: str,
        *,
        state_dir: str | os.PathLike | None = None,
        labelmap: LabelMap | None = None,
        max_upload_bytes: int = 1 << 30,
        client: DICOMwebClient | None = None,
        search_filter: dict[str, str] | None = None,
        refresh_interval_s: float = 10.0,
        qa: QAConfig | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.qa = qa or load_review_config().qa
        self.client = client or make_client(self.url)
        self.lm = labelmap or load_labelmap()
        self.max_upload_bytes = max_upload_bytes
        self.search_filter = dict(search_filter or {"Modality": "CT"})
        self.refresh_interval_s = refresh_interval_s
        self.state_dir = Path(state_dir or default_state_dir(self.url)).expanduser().resolve()
        for sub in ("dicom", "images", "labels", "segs"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        migrate_v1(self.state_dir / "index.sqlite", self.state_dir / INDEX_NAME, self._stored_image_path)
        self.index = PacsIndex(self.state_dir / INDEX_NAME)
        if self.index.get_meta("url") is None:
            self.index.set_meta("url", self.url)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._last_refresh = 0.0
        self._name = "DICOMweb: " + self.url
        self._description = f"CT series and DICOM SEG labels in {self.url}"
        logger.info(f"DICOMweb datastore {self.url}; state in {self.state_dir}")

    # ---- locks ----------------------------------------------------------------------------------
    def _lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    # ---- listing the server ----------------------------------------------------------------------
    def sync(self) -> None:
        self.refresh(force=False)

    def refresh(self, force: bool = True) -> None:
        """List the CT and SEG series on the server (at most every ``refresh_interval_s`` unless forced)."""
        with self._refresh_lock:
            if not force and time.monotonic() - self._last_refresh < self.refresh_interval_s:
                return
            try:
                cts = self.client.search_for_series(search_filters=self.search_filter, fields=list(SERIES_FIELDS))
                segs = self.client.search_for_series(search_filters={"Modality": "SEG"}, fields=list(SERIES_FIELDS))
            except Exception as err:  # server down: keep serving what the index knows
                logger.warning(f"DICOMweb listing of {self.url} failed: {err}")
                return
            rows = []
            for item in cts:
                sid, study = _value(item, "SeriesInstanceUID"), _value(item, "StudyInstanceUID")
                if sid and study:
                    qido = {k: _value(item, k) for k in SERIES_FIELDS if k != "ContentLabel"}
                    rows.append((sid, {"study": study, "qido": qido, "case": case_from_dicom(qido)}))
            self.index.upsert_series(rows, self._stored_image_path, time.time())
            known = self.index.seg_ids()
            for item in segs:
                sid, study = _value(item, "SeriesInstanceUID"), _value(item, "StudyInstanceUID")
                if sid and study and sid not in known:
                    self._index_seg(sid, study)
            self._last_refresh = time.monotonic()

    def _index_seg(self, seg_uid: str, study: str) -> None:
        """Record which CT series a SEG references (one metadata request per new SEG, ever)."""
        try:
            meta = Dataset.from_json(self.client.retrieve_series_metadata(study, seg_uid)[0])
        except Exception as err:
            logger.warning(f"SEG {seg_uid}: metadata not readable ({err}); ignored")
            return
        ref = None
        if meta.get("ReferencedSeriesSequence"):
            ref = str(meta.ReferencedSeriesSequence[0].SeriesInstanceUID)
        label = str(meta.get("ContentLabel", "") or "").upper()
        created = f"{meta.get('SeriesDate', '') or ''}{meta.get('SeriesTime', '') or ''}"
        self.index.put_seg(seg_uid, study, ref, CONTENT_LABEL_TAGS.get(label, FINAL_TAG), created)

    # ---- identity -----------------------------------------------------------------------------
    def name(self) -> str:
        return self._name

    def set_name(self, name: str) -> None:
        self._name = name

    def description(self) -> str:
        return self._description

    def set_description(self, description: str) -> None:
        self._description = description

    # ---- images -----------------------------------------------------------------------------------
    def list_images(self) -> list[str]:
        self.sync()
        return self.index.image_ids(self.served_splits)

    def _series(self, image_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(meta, info)`` of a CT series; unknown ids are looked up on the server once."""
        check_image_id(image_id)
        row = self.index.image_row(image_id)
        if row is None:
            self.refresh(force=True)
            row = self.index.image_row(image_id)
        if row is None or row.split != PACS_SPLIT:
            raise DatastoreError(404, f"image {image_id!r}: no such CT series in {self.url}")
        return loads(row.meta), loads(row.info)

    def _study(self, image_id: str) -> str:
        return str(self._series(image_id)[0]["study"])

    @staticmethod
    def _stored_image_path(image_id: str) -> str:
        return f"@state/images/{image_id}.nii.gz"

    def _series_dir(self, image_id: str) -> Path:
        return self.state_dir / "dicom" / image_id

    def _image_path(self, image_id: str) -> Path:
        return self.state_dir / "images" / f"{image_id}.nii.gz"

    def _download_series(self, study: str, series: str, folder: Path) -> None:
        with staged_dir(folder) as tmp:
            for ds in self.client.retrieve_series(study, series):
                ds.save_as(str(tmp / f"{ds.SOPInstanceUID}.dcm"), write_like_original=False)

    def series_geometry(self, image_id: str, with_pixels: bool = False) -> SeriesGeometry:
        """The CT series' instances (downloaded once) sorted into a volume grid."""
        study = self._study(image_id)
        folder = self._series_dir(image_id)
        with self._lock(f"dicom:{image_id}"):
            if not folder.is_dir():
                self._download_series(study, image_id, folder)
        datasets = [pydicom.dcmread(str(f), stop_before_pixels=not with_pixels) for f in sorted(folder.glob("*.dcm"))]
        return series_geometry(datasets)

    def get_image_uri(self, image_id: str) -> str:
        """The CT as NIfTI, downloaded and converted on first use (then served from the cache).

        The conversion also reads the case metadata from the series' own headers (age, sex,
        phase, spacing), which a QIDO answer may leave out.
        """
        path = self._image_path(image_id)
        if path.is_file():
            return str(path)
        self._series(image_id)
        with self._lock(f"image:{image_id}"):
            if not path.is_file():
                t = time.perf_counter()
                geom = self.series_geometry(image_id, with_pixels=True)
                write_volume(read_volume(geom), geom.affine, path)
                first = geom.datasets[0]
                spacing = tuple(float(v) for v in np.linalg.norm(geom.affine[:3, :3], axis=0))
                fields = {k: first.get(k) for k in SERIES_FIELDS}
                self.index.set_header_metadata(image_id, case_from_dicom(fields, spacing))
                logger.info(f"image {image_id}: {geom.shape} from DICOMweb in {time.perf_counter() - t:.2f} s")
        return str(path)

    def get_image(self, image_id: str, params: Any = None) -> Any:
        return Path(self.get_image_uri(image_id)).read_bytes()

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        try:
            meta, info = self._series(image_id)
        except DatastoreError:
            return {}
        out = {**meta.get("qido", {}), **self._case(meta), **info,
               "StudyInstanceUID": meta["study"], "SeriesInstanceUID": image_id}
        path = self._image_path(image_id)
        if path.is_file():
            out["path"] = str(path)
        return out

    @staticmethod
    def _case(meta: dict[str, Any]) -> dict[str, Any]:
        """Case metadata: the headers' where the series was downloaded, else the QIDO fields'."""
        return {**meta.get("case", {}), **meta.get("headers", {})}

    def get_metadata(self, image_id: str) -> dict[str, Any]:
        """Center, contrast phase, age, sex (and spacing once downloaded) from DICOM attributes."""
        try:
            return self._case(self._series(image_id)[0])
        except DatastoreError:
            return {}

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        self._series(image_id)
        if self.index.update_info({image_id: dict(info)}):
            raise DatastoreError(404, f"image {image_id!r}: no such CT series in {self.url}")

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """Store an uploaded NIfTI CT in the server as a new CT series; returns its SeriesInstanceUID."""
        from lib.imaging.dicom_series import stable_uid
        from lib.imaging.volume_io import load_volume

        check_client_image(image_filename, "uploaded image")
        try:
            vol = load_volume(image_filename)
        except ValueError as err:
            raise DatastoreError(422, str(err)) from None
        patient = check_image_id(image_id or Path(image_filename).name.split(".")[0])
        study = CTStudy(patient_id=patient, study_uid=stable_uid(patient, "study"),
                        series_uid=stable_uid(patient, "ct", str(time.time())))
        store(self.client, ct_series(vol.array, vol.affine, study))
        self.refresh(force=True)
        if image_info:
            self.update_image_info(study.series_uid, dict(image_info))
        return study.series_uid

    def remove_image(self, image_id: str) -> None:
        raise bad_request("images live in the PACS: remove the series there (the next listing drops it)")

    # ---- labels: reading ------------------------------------------------------------------------
    def _latest_local(self, image_id: str, tag: str) -> LabelRow | None:
        """The newest version saved here, or None."""
        return self.index.current_label(image_id, tag)

    def _decode_seg(self, image_id: str, seg_uid: str) -> Path:
        """The SEG series as a label map on the CT's grid (decoded once per SEG)."""
        out = self.state_dir / "segs" / f"{seg_uid}.nii.gz"
        if out.is_file():
            return out
        with self._lock(f"seg:{seg_uid}"):
            if not out.is_file():
                study = self._study(image_id)
                geom = self.series_geometry(image_id)
                try:  # sizes from the metadata first: the pixel data is fetched only if they fit
                    check_seg_size(Dataset.from_json(self.client.retrieve_series_metadata(study, seg_uid)[0]), geom)
                except ValueError as err:
                    raise DatastoreError(422, f"SEG series {seg_uid}: {err}") from None
                seg_ds = self.client.retrieve_series(study, seg_uid)
                if len(seg_ds) != 1:
                    raise DatastoreError(502, f"SEG series {seg_uid} holds {len(seg_ds)} instances; expected 1")
                try:
                    label = seg_to_label(seg_ds[0], geom, self.lm)
                except ValueError as err:
                    raise DatastoreError(422, f"SEG series {seg_uid}: {err}") from None
                write_label(label, geom.affine, out)
        return out

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """The newest label of ``label_tag`` for image ``label_id``: a SEG in the server or,
        for tags kept only here (``original``), the newest local version. '' if none."""
        image_id = check_image_id(label_id, "label")
        tag = check_tag(label_tag or FINAL_TAG)
        local = self._latest_local(image_id, tag)
        if tag in (FINAL_TAG, IMPORTED_TAG):
            self.sync()
            seg = self.index.latest_seg(image_id, tag)
            if seg and not (local is not None and self._local_is_newer(local, seg)):
                return str(self._decode_seg(image_id, seg))
        return str(self.state_dir / local.path) if local else ""

    def _local_is_newer(self, local: LabelRow, seg_uid: str) -> bool:
        """A version saved here whose SEG the server refused (502) is newer than every SEG made
        before it: it is served from here until a newer SEG appears."""
        if loads(local.info).get("seg"):  # its SEG was stored: the SEG listing serves it (or a newer one)
            return False
        created = self.index.seg_created(seg_uid)
        saved = time.strftime("%Y%m%d%H%M%S", time.localtime(float(local.ts)))
        return created is None or str(created)[:14] <= saved

    def get_label(self, label_id: str, label_tag: str, params: Any = None) -> Any:
        uri = self.get_label_uri(label_id, label_tag)
        return Path(uri).read_bytes() if uri else None

    def get_labels_by_image_id(self, image_id: str) -> dict[str, str]:
        out = {}
        for tag in (FINAL_TAG, IMPORTED_TAG, DefaultLabelTag.ORIGINAL.value):
            uri = self.get_label_uri(image_id, tag)
            if uri:
                out[tag] = image_id
        return out

    def get_label_by_image_id(self, image_id: str, tag: str) -> str:
        return image_id if self.get_label_uri(image_id, tag) else ""

    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]:
        tag = check_tag(label_tag or FINAL_TAG)
        local = self._latest_local(check_image_id(label_id, "label"), tag)
        info = {**loads(local.info), "version": local.version, "ts": local.ts} if local else {}
        info.pop("seg", None)
        prov = provenance.of_version(self.index.conn(), label_id, tag, local.version) if local else None
        if prov is not None:
            info["provenance"] = prov.as_info()
        seg = self.index.latest_seg(label_id, tag) if tag in (FINAL_TAG, IMPORTED_TAG) else None
        if seg:
            info["SeriesInstanceUID"] = seg
        return info

    def stored_label_files(self) -> set[Path]:
        """Every label file a row of the index points at (start-up recovery keeps these)."""
        return {self.state_dir / p for p in self.index.label_paths()}

    # ---- labels: writing -------------------------------------------------------------------------
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Check an uploaded label, keep it as a new local version and, for ``final``, store it
        in the server as a DICOM SEG over the image's CT series.

        Refusals raise :class:`DatastoreError` (HTTP 4xx naming the problem) and store nothing.
        If the server refuses the SEG (HTTP 502), the checked label stays here as a version.
        A ``final`` label ends the scan's lease.
        """
        image_id, tag = check_save_target(image_id, label_tag)
        params = dict(label_info or {})
        image = read_geometry(self.get_image_uri(image_id))
        checked = check_label(label_filename, image, self.lm, params.get("label_info"), self.max_upload_bytes)
        prov = provenance.for_upload(tag, params)  # refuses a bad time_spent_s before any write
        with self._lock(f"label:{image_id}:{tag}"):
            with self.index.read() as db:
                version = self.index.next_version(db, image_id, tag)
            rel = Path("labels") / tag / image_id / f"v{version}.nii.gz"
            write_label(checked.array, image.affine, self.state_dir / rel)
            info = {**params, "counts": checked.counts, "named_by": checked.source}
            seg_uid, error = None, None
            if tag == FINAL_TAG:
                try:
                    seg_uid = self._store_seg(image_id, checked.array, image.affine, prov.reader)
                    info["seg"] = seg_uid
                except Exception as err:
                    error = f"{type(err).__name__}: {err}"
                    info["pacs_error"] = error
            now = time.time()
            with self.index.write() as db:
                self.index.insert_label(db, image_id, tag, version, str(rel), "upload", now, info)
                provenance.record(db, image_id, tag, version, prov, now)
                if tag == FINAL_TAG:
                    self.index.release_leases([image_id], db)
        try:  # the annotation standard's checks, as on a PanTS folder (image info ``qa``)
            self.index.update_info({image_id: {"qa": qa_info(checked.array, image.affine, self.lm,
                                                              self.qa, f"{tag} v{version}", time.time())}})
        except Exception:  # noqa: BLE001 - the label is stored; a failed check must not fail the upload
            logger.exception("QA of %s %s v%d failed", image_id, tag, version)
        if error:
            raise DatastoreError(502, f"label kept here as version {version}, but the DICOMweb server did "
                                      f"not store its SEG: {error}")
        logger.info(f"saved {tag} label v{version} for {image_id}" + (f" as SEG {seg_uid}" if seg_uid else ""))
        return image_id

    def _store_seg(self, image_id: str, label: np.ndarray, affine: np.ndarray, reader: str | None) -> str:
        geom = self.series_geometry(image_id)
        creator = reader  # the front's user when there is one, else the client's id (provenance)
        seg = label_to_seg(label, affine, geom, lm=self.lm, content_label="FINAL",
                           description="PanTS final label (MONAI Label)",
                           creator=f"{creator}^" if creator and "^" not in creator else creator)
        store(self.client, [seg])
        # Record it now: the next listing would find it, but next sample must see it at once.
        self.index.put_seg(str(seg.SeriesInstanceUID), self._study(image_id), image_id, FINAL_TAG,
                           f"{seg.SeriesDate}{seg.SeriesTime}")
        return str(seg.SeriesInstanceUID)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        raise bad_request("labels are DICOM SEG series in the PACS: remove the SEG series there")

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        tag = check_tag(label_tag or FINAL_TAG)
        if not self.index.update_label_info(check_image_id(label_id, "label"), tag, dict(info)):
            raise DatastoreError(404, f"no {tag!r} label saved here for image {label_id!r}")

    # ---- lists for training and clients --------------------------------------------------------
    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        """Labeled images for training (``final`` preferred over ``pants``); downloads what it needs."""
        out = []
        final = set(self.get_labeled_images(FINAL_TAG))
        for image_id in self.get_labeled_images():
            tag = FINAL_TAG if image_id in final else IMPORTED_TAG
            label = self.get_label_uri(image_id, tag)
            if label:
                out.append({"image": self.get_image_uri(image_id), "label": label})
        return out

    def status(self) -> dict[str, Any]:
        tags = {t: len(self.get_labeled_images(t)) for t in (FINAL_TAG, IMPORTED_TAG)}
        return {"total": len(self.list_images()), "completed": len(self.get_labeled_images()), "label_tags": tags}

    def json(self) -> dict[str, Any]:
        self.sync()
        labeled: dict[str, dict[str, Any]] = {}
        for ref, tag in self.index.seg_tags():
            labeled.setdefault(ref, {})[tag] = {"info": {}}
        for image_id, tag in self.index.current_tag_pairs():
            labeled.setdefault(image_id, {}).setdefault(tag, {"info": {}})
        objects = {}
        for sid, meta, info in self.index.series_rows():
            m = loads(meta)
            objects[sid] = {
                "image": {"info": {**m.get("qido", {}), **self._case(m), **loads(info), "StudyInstanceUID": m["study"]}},
                "labels": labeled.get(sid, {}),
            }
        return {"name": self._name, "description": self._description, "objects": objects}

    def get_dataset_archive(self, limit_cases: int | None) -> str:
        raise DatastoreError(501, "dataset archives are not built over DICOMweb; export from the PACS")

    def close(self) -> None:
        self.index.close()


__all__ = ["DICOMwebDatastore", "make_client", "store", "default_state_dir", "IMPORTED_TAG", "FINAL_TAG"]
