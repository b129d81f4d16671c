"""A MONAI Label datastore over a PanTS folder in place (or a flat folder of NIfTI images).

PanTS layout (the public release), read in place and never modified::

    ROOT/ImageTr/<id>/ct.nii.gz                     training scans (served for annotation)
    ROOT/LabelTr/<id>/segmentations/<name>.nii.gz   one binary mask per structure (28 names)
    ROOT/ImageTe/..., ROOT/LabelTe/...              test split: indexed, served only if asked
    ROOT/metadata.xlsx (or metadata.csv)            per-scan metadata

Flat layout (MONAI Label's convention): ``ROOT/<id>.nii.gz`` with existing labels in
``ROOT/labels/<tag>/<id>.nii.gz`` (imported as version 0 of that tag).

Everything the datastore writes lives in one writable folder, ``ROOT/.pants_label/`` unless
another is configured (``datastore_dir``, for read-only data)::

    index.sqlite                       the index (WAL): images, label versions, info, metadata
    labels/<tag>/<id>/v<N>.nii.gz      every stored label version (history is never overwritten)
    cache/pants/<id>.nii.gz            PanTS masks consolidated into one 28-class map
    images/<id>.nii.gz                 images uploaded through the API

Tags: ``final`` (an annotator's label), ``original`` (inference), and ``pants``: the PanTS masks
consolidated by the label map's overlap priority, built on first request and rebuilt when a
mask file changes. A scan counts as *labeled* when it has a ``final`` or a visible ``pants``
label. With ``hide_imported_labels`` the ``pants`` labels of the served splits start hidden and
:meth:`PanTSDatastore.reveal_imported` shows chosen scans' masks (the active-learning simulator
"annotating" them).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib

from lib.core.atomic import atomic_write, commit, staged
from lib.core.config_errors import ConfigError
from lib.datastore.folder_scan import (
    ROOT,
    STATE,
    detect_layout,
    diff,
    flat_label_files,
    mask_files,
    scan_folder,
    strip_ext,
)
from lib.datastore.index import Index, dumps, loads
from lib.datastore.rows import ImageRow
from lib.datastore.indexed import IndexedStore
from lib.datastore.protocol import FINAL_TAG, IMPORTED_TAG, TRAINING_TAGS
from lib.datastore import provenance
from lib.datastore.review import MODEL_TAG, ReviewLayer
from lib.core.review_config import ReviewConfig, load_review_config
from lib.datastore.label_upload import (
    DatastoreError,
    atomic_write_nifti,
    bad_request,
    check_image_id,
    check_label,
    check_save_target,
    check_tag,
    read_geometry,
    write_label_gz,
)
from lib.core.labelmap import LabelMap, load_labelmap
from lib.imaging.volume_decode import check_client_image

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector while building a large tree of acyclic objects."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()

STATE_DIRNAME = ".pants_label"
INDEX_NAME = "index.sqlite"

class PanTSDatastore(IndexedStore):
    """MONAI Label ``Datastore`` over a PanTS root or a flat NIfTI folder, indexed in SQLite.

    Args:
        root: the ``--studies`` folder.
        state_dir: writable folder for the index, labels and caches; default ``root/.pants_label``.
        hide_imported_labels: start with the PanTS masks of served scans hidden (see
            :meth:`reveal_imported`).
        serve_test_split: also serve ``ImageTe`` scans for annotation (they never enter
            :meth:`datalist`, the training list).
        labelmap: the label map; default ``configs/labels.yaml``.
        max_upload_bytes: largest label upload accepted (compressed and decompressed).
        extensions: image file patterns of the flat layout.
        review: review-campaign settings (``configs/review.yaml``); campaign: ``annotate`` or
            ``review`` (serve labelled scans for review, see :mod:`lib.datastore.review`).

    Raises:
        ConfigError: ``root`` missing, or no writable ``state_dir``, or a bad metadata file.
    """

    local_images = True  # image ids are files on this machine

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        state_dir: str | os.PathLike | None = None,
        hide_imported_labels: bool = False,
        serve_test_split: bool = False,
        labelmap: LabelMap | None = None,
        max_upload_bytes: int = 1 << 30,
        extensions: Sequence[str] = ("*.nii.gz", "*.nii"),
        review: ReviewConfig | None = None,
        campaign: str = "annotate",
    ) -> None:
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise ConfigError(f"--studies {str(root)!r}: not a folder")
        self.layout = detect_layout(self.root)
        self.lm = labelmap or load_labelmap()
        self.hide_imported = bool(hide_imported_labels)
        self.serve_test_split = bool(serve_test_split)
        self.max_upload_bytes = int(max_upload_bytes)
        self._exts = tuple(e.lstrip("*") for e in extensions)
        self.state_dir = self._init_state_dir(state_dir)
        self._root_str, self._state_str = str(self.root).rstrip("/"), str(self.state_dir).rstrip("/")
        self.index = Index(self.state_dir / INDEX_NAME)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._listing_cache: tuple[int, bytes] | None = None  # (index 'listing' count, JSON)
        self._listing_lock = threading.Lock()
        self._lm_fingerprint = hashlib.sha1(
            dumps([self.lm.names, self.lm.overlap_priority]).encode()
        ).hexdigest()[:12]
        self._check_root_matches(state_dir)
        self.review = ReviewLayer(self, review or load_review_config(), campaign)  # provenance, QA, readings
        self.refresh()

    # ---- setup -------------------------------------------------------------------------------
    def _init_state_dir(self, state_dir: str | os.PathLike | None) -> Path:
        path = Path(state_dir).expanduser().resolve() if state_dir else self.root / STATE_DIRNAME
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            hint = (
                "the studies folder is not writable; pass --conf datastore_dir <a writable folder>"
                if not state_dir
                else "choose a writable folder"
            )
            raise ConfigError(f"datastore_dir {str(path)!r}: cannot write there ({err.strerror}); {hint}") from None
        return path

    def _check_root_matches(self, state_dir: str | os.PathLike | None) -> None:
        known = self.index.get_meta("root")
        if known is None:
            self.index.set_meta_many({
                "root": str(self.root), "layout": self.layout, "name": self.root.name or "PanTS",
                "description": f"{self.layout} datastore over {self.root}",
            })
        elif known != str(self.root) and state_dir:
            raise ConfigError(
                f"datastore_dir {str(self.state_dir)!r} already indexes {known!r}; "
                f"use a separate folder for {str(self.root)!r}"
            )
        elif known != str(self.root):  # the dataset folder was moved: relative paths still hold
            self.index.set_meta("root", str(self.root))

    # ---- paths -------------------------------------------------------------------------------
    def _abs(self, stored: str) -> Path:
        return Path(self._abs_str(stored))

    def _abs_str(self, stored: str) -> str:
        # plain string joins: pathlib costs ~5 us a call, which adds up over 36k scans
        if stored.startswith(STATE):
            return f"{self._state_str}/{stored[len(STATE):]}"
        return f"{self._root_str}/{stored[len(ROOT):]}"

    def _state_rel(self, path: Path) -> str:
        return STATE + path.relative_to(self.state_dir).as_posix()

    @property
    def served_splits(self) -> tuple[str, ...]:
        base = ("train", "flat", "added")
        return (*base, "test") if self.serve_test_split else base

    @property
    def training_splits(self) -> tuple[str, ...]:
        return ("train", "flat", "added")

    def _lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    # ---- scanning ----------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read the folder: add new scans, mark vanished ones missing, re-read changed metadata.

        Existing scans cost one directory entry each (no stat), so re-opening 36k scans is fast.
        Scans that vanish keep their row (info, scores, label history) and come back if they return.
        """
        t0 = time.perf_counter()
        known = self.index.scan_state(self._managed_splits)
        scanned = scan_folder(self.root, self.layout, self._exts, known)
        changes = diff(scanned, known)
        if changes.new or changes.moved or changes.missing or changes.back:
            self.index.apply_scan(changes, time.time())
        if self.layout == "flat":
            self._refresh_flat_labels()
        self._refresh_metadata(force=bool(changes.new))
        logger.info(
            "datastore %s (%s): %d scans indexed (%d new, %d missing) in %.2f s",
            self.root, self.layout, len(scanned), len(changes.new), len(changes.missing), time.perf_counter() - t0,
        )

    @property
    def _managed_splits(self) -> tuple[str, ...]:
        """Splits that mirror the dataset folder (``added`` images are the datastore's own)."""
        return ("train", "test") if self.layout == "pants" else ("flat",)

    def _refresh_flat_labels(self) -> None:
        """Existing ``labels/<tag>/<id>.nii.gz`` become version 0 of that tag (read in place)."""
        found = flat_label_files(self.root, self._exts)
        have = self.index.imported_label_files()
        images = set(self.index.image_ids(("flat",)))
        add = [(k, p) for k, p in found.items() if k not in have and k[0] in images]
        gone = [k for k, p in have.items() if p and p.startswith(ROOT) and k not in found]
        if not add and not gone:
            return
        now = time.time()
        with self.index.write() as db:
            for (image_id, tag), path in add:
                if self.index.next_version(db, image_id, tag) != 1:
                    continue  # newer versions exist: the imported file only fills an empty history
                self.index.insert_label(
                    db, image_id, tag, 0, path, "import", now, {"name": Path(path).name, "source": "imported file"}
                )
            self.index.drop_imported_label_files(db, gone)

    def _refresh_metadata(self, force: bool) -> None:
        from lib.imaging.metadata import find_metadata, read_metadata

        path = find_metadata(self.root)
        if path is None:
            return
        st = path.stat()
        sig = f"{path.name}:{st.st_size}:{st.st_mtime_ns}"
        if not force and self.index.get_meta("metadata_signature") == sig:
            return
        t0 = time.perf_counter()
        try:
            table = read_metadata(path)
        except ValueError as err:
            raise ConfigError(f"metadata file: {err}") from None
        ids = self.index.all_image_ids()
        rows = {cid: m.info() for cid, m in table.items() if cid in ids}
        self.index.set_metadata(rows, sig)
        logger.info("metadata %s: %d rows, %d matched scans (%.2f s)", path, len(table), len(rows),
                    time.perf_counter() - t0)

    # ---- name / description ------------------------------------------------------------------
    def name(self) -> str:
        return self.index.get_meta("name", self.root.name) or ""

    def set_name(self, name: str) -> None:
        self.index.set_meta("name", str(name))

    def description(self) -> str:
        return self.index.get_meta("description", "") or ""

    def set_description(self, description: str) -> None:
        self.index.set_meta("description", str(description))

    # ---- images ------------------------------------------------------------------------------
    def _row(self, image_id: str) -> ImageRow | None:
        if not isinstance(image_id, str):
            return None
        row = self.index.image_row(image_id)
        return row if row is not None and row.removed == 0 else None

    def _require(self, image_id: str) -> ImageRow:
        check_image_id(image_id)
        row = self._row(image_id)
        if row is None:
            raise DatastoreError(404, f"image {image_id!r} not found in the datastore")
        return row

    def _imported_visible(self, row: ImageRow) -> bool:
        return row.mask_dir is not None and (not self.hide_imported or bool(row.revealed) or row.split == "test")

    def _compose_info(self, row: ImageRow, with_path: bool = True) -> dict[str, Any]:
        image_id, split, path, mask_dir, _, revealed, meta, info, added_ts = row
        ext = ".nii.gz" if path.endswith(".nii.gz") else Path(path).suffix
        out: dict[str, Any] = {"name": f"{image_id}{ext}", "split": split, "ts": int(added_ts)}
        if with_path:
            out["path"] = self._abs_str(path)
        if meta:
            out.update(loads(meta))
        if mask_dir is not None:
            out["imported_labels"] = "visible" if self._imported_visible(row) else "hidden"
        if info != "{}":  # most scans have none; skipping the parse halves json() at 36k scans
            out.update(loads(info))
        return out

    def list_images(self) -> list[str]:
        """Served scans: the training split (and the test split with ``serve_test_split``)."""
        return self.index.image_ids(self.served_splits)

    def images_in_split(self, split: str) -> list[str]:
        """Scan ids of one split: ``train``/``test`` (PanTS), ``flat``, or ``added`` (uploaded)."""
        return self.index.image_ids((split,))

    def test_images(self) -> list[str]:
        """The held-out test split (``ImageTe``), whether or not it is served."""
        return self.images_in_split("test")

    def split_of(self, image_id: str) -> str | None:
        row = self._row(image_id)
        return row.split if row else None

    def get_image(self, image_id: str, params: Any = None) -> Any:
        uri = self.get_image_uri(image_id)
        return io.BytesIO(Path(uri).read_bytes()) if uri else None

    def get_image_uri(self, image_id: str) -> str:
        row = self._row(image_id)
        return self._abs_str(row.path) if row else ""

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        """Name, path, split, metadata (center, contrast_phase, age, sex, spacing, diagnosis, tumor),
        then everything stored by :meth:`update_image_info` (scores, strategy timestamps)."""
        row = self._row(image_id)
        if row is None:
            return {}
        info = self._compose_info(row)
        review = self.review.row(image_id)
        if review is not None:
            info["review"] = review.as_info()
        return info

    def get_metadata(self, image_id: str) -> dict[str, Any]:
        """The metadata file's row for a scan (empty when it has none)."""
        row = self._row(image_id)
        return loads(row.meta) if row else {}

    def metadata_table(self, split: str | None = None) -> dict[str, dict[str, Any]]:
        """``{id: metadata}`` for all served scans (or one split), one query."""
        return self.index.metadata_rows((split,) if split else self.served_splits)

    def get_images_info(self, image_ids: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """Image info of many scans in one query (``None``: all served scans)."""
        if image_ids is None:
            rows = self.index.image_rows(self.served_splits)
        else:
            rows = [r for r in (self._row(i) for i in image_ids) if r is not None]
        return {r.id: self._compose_info(r) for r in rows}

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        """Merge ``info`` into the scan's stored info (atomic across threads and processes)."""
        check_image_id(image_id)
        if self.index.update_info({image_id: dict(info)}):
            raise DatastoreError(404, f"image {image_id!r} not found in the datastore")

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """Copy an uploaded image into ``state_dir/images`` (the dataset folder is never written)."""
        src = Path(image_filename)
        parsed = strip_ext(src.name, self._exts) or (src.stem, "".join(src.suffixes))
        image_id = check_image_id(image_id or parsed[0])
        existing = self.index.image_row(image_id)
        if existing is not None and existing[4] != 1:
            raise DatastoreError(409, f"image {image_id!r} already exists; remove it first or use another id")
        hdr = check_client_image(src, "uploaded image")
        if hdr.kind != "nifti":
            raise DatastoreError(415, "uploaded image is not a NIfTI file; send a .nii or .nii.gz")
        ext = ".nii" if hdr.gzip_from is None else ".nii.gz"
        dest = self.state_dir / "images" / f"{image_id}{ext}"
        atomic_write(dest, lambda tmp: shutil.copyfile(src, tmp))
        self.index.add_uploaded_image(image_id, self._state_rel(dest), time.time(), dict(image_info or {}))
        return image_id

    def remove_image(self, image_id: str) -> None:
        """Hide a scan from the datastore. Dataset files are never deleted; labels stay in history."""
        row = self._require(image_id)
        self.index.mark_removed(image_id)
        if row.split == "added":
            self._abs(row.path).unlink(missing_ok=True)

    # ---- labels ----------------------------------------------------------------------------
    def get_labels_by_image_id(self, image_id: str) -> dict[str, str]:
        row = self._row(image_id)
        if row is None:
            return {}
        out = {tag: image_id for tag in self.index.current_tags(image_id)}
        if self._imported_visible(row):
            out[IMPORTED_TAG] = image_id
        return out

    def get_label_by_image_id(self, image_id: str, tag: str) -> str:
        return self.get_labels_by_image_id(image_id).get(tag, "")

    def get_label(self, label_id: str, label_tag: str, params: Any = None) -> Any:
        uri = self.get_label_uri(label_id, label_tag)
        return io.BytesIO(Path(uri).read_bytes()) if uri else None

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        """Path of the live canonical label map (``""`` if none); ``pants`` is consolidated on demand."""
        row = self._row(label_id)
        if row is None:
            return ""
        served = self.review.served_original_uri(label_id) if label_tag == MODEL_TAG else None
        if served is not None:  # a review campaign serves the best current label as 'original'
            return served
        if label_tag == IMPORTED_TAG:
            if not self._imported_visible(row):
                return ""
            path = self.consolidate_imported(label_id)
            return str(path) if path else ""
        cur = self.index.current_label(label_id, label_tag)
        return self._abs_str(cur.path) if cur else ""

    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]:
        row = self._row(label_id)
        if row is None:
            return {}
        served = self.review.served_original_info(label_id) if label_tag == MODEL_TAG else None
        if served is not None:
            return served
        if label_tag == IMPORTED_TAG:
            if not self._imported_visible(row):
                return {}
            imp = self.index.imported_row(label_id)
            info = {"source": "PanTS per-structure masks", "mask_dir": str(self._abs(row.mask_dir))}
            if imp:
                info.update(loads(imp.info))
                if imp.ts:
                    info["ts"] = int(imp.ts)
            return info
        cur = self.index.current_label(label_id, label_tag)
        if cur is None:
            return {}
        info = loads(cur.info)
        info.update({"version": cur.version, "ts": int(cur.ts), "origin": cur.origin})
        prov = provenance.of_version(self.index.conn(), label_id, label_tag, cur.version)
        if prov is not None:
            info["provenance"] = prov.as_info()
        return info

    def label_versions(self, image_id: str, tag: str = FINAL_TAG) -> list[dict[str, Any]]:
        """History of a scan's labels under ``tag``, oldest first; a removal has ``path`` None."""
        return [
            {"version": r.version, "path": str(self._abs(r.path)) if r.path else None, "origin": r.origin,
             "ts": r.ts, "info": loads(r.info)}
            for r in self.index.label_versions(image_id, tag)
        ]

    def stored_label_files(self) -> set[Path]:
        """Every label file a row of the index points at (start-up recovery keeps these)."""
        return {self._abs(p) for p in self.index.label_paths()}

    def get_label_version_uri(self, image_id: str, tag: str, version: int) -> str:
        for v in self.label_versions(image_id, tag):
            if v["version"] == int(version):
                return v["path"] or ""
        return ""

    # ---- labels: writes ----------------------------------------------------------------------
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Check an uploaded label, map it to canonical ids and store it as a new version.

        ``label_info`` is the request's params; ``label_info["label_info"]`` (3D Slicer's segment
        list ``[{"name", "idx"}]``) names the voxel values. Refusals raise :class:`DatastoreError`
        (HTTP 4xx, message naming the problem) and leave disk and index untouched.

        Returns:
            The label id (the image id, as MONAI Label's clients expect).
        """
        image_id, tag = check_save_target(image_id, label_tag)
        params = dict(label_info or {})
        row = self._require(image_id)
        image = read_geometry(self._abs(row.path))
        checked = check_label(label_filename, image, self.lm, params.get("label_info"), self.max_upload_bytes)
        plan = self.review.before_save(image_id, tag, params, checked.array)  # who; refusals before any write

        folder = self.state_dir / "labels" / tag / image_id
        with staged(folder / "label.nii.gz") as tmp:
            write_label_gz(checked.array, image.affine, tmp)
        try:
            now = time.time()
            with self.index.write() as db:  # holds the write lock: version numbers cannot collide
                version = self.index.next_version(db, image_id, tag)
                dest = folder / f"v{version}.nii.gz"
                info = {
                    **params,
                    "ts": int(now),
                    "name": dest.name,
                    "version": version,
                    "counts": checked.counts,
                    "named_by": checked.source,
                }
                if checked.mapping and any(k != v for k, v in checked.mapping.items()):
                    info["mapping"] = {str(k): v for k, v in checked.mapping.items()}
                commit(tmp, dest)
                self.index.insert_label(db, image_id, tag, version, self._state_rel(dest), "upload", now, info)
                self.review.record(db, plan, version, now)
                if tag == FINAL_TAG:  # a final label ends the scan's lease (active learning)
                    self.index.release_leases([image_id], db)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        logger.info("saved label %s tag=%s v%d (%s)", image_id, tag, version, checked.counts)
        try:
            self.review.after_save(plan, version, checked.array, image.affine)
        except Exception:  # noqa: BLE001 - the label is stored; a failed check must not fail the upload
            logger.exception("QA of %s %s v%d failed", image_id, tag, version)
        return image_id

    def remove_label(self, label_id: str, label_tag: str) -> None:
        """Remove the live label (a new history entry; earlier versions stay on disk)."""
        check_image_id(label_id, "label")
        tag = check_tag(label_tag)
        if tag == IMPORTED_TAG:
            raise bad_request("the imported PanTS labels are read-only; start with hide_imported_labels instead")
        self._require(label_id)
        if not self.index.remove_current_label(label_id, tag, time.time()):
            raise DatastoreError(404, f"no {tag!r} label for image {label_id!r}")

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        row = self._require(label_id)
        if label_tag == IMPORTED_TAG:
            if not self._imported_visible(row):
                raise DatastoreError(404, f"no {label_tag!r} label for image {label_id!r}")
            self.index.update_imported_info(label_id, dict(info))
            return
        if not self.index.update_label_info(label_id, label_tag, dict(info)):
            raise DatastoreError(404, f"no {label_tag!r} label for image {label_id!r}")

    # ---- imported PanTS masks ----------------------------------------------------------------
    def _mask_files(self, mask_dir: str) -> dict[str, Path]:
        return mask_files(self._abs(mask_dir))

    def _mask_signature(self, masks: dict[str, Path]) -> str:
        h = hashlib.sha1(self._lm_fingerprint.encode())
        for name in sorted(masks):
            st = masks[name].stat()
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()

    def consolidate_imported(self, image_id: str) -> Path | None:
        """The cached 28-class map of a scan's PanTS masks, (re)built when a mask changed.

        Masks are merged by the label map's overlap priority (:meth:`LabelMap.consolidate`),
        loading one mask at a time. Names the label map does not know are skipped.

        Raises:
            DatastoreError: 422 when a mask's shape differs from the image's.
        """
        row = self._row(image_id)
        if row is None or row.mask_dir is None:
            return None
        dest = self.state_dir / "cache" / IMPORTED_TAG / f"{image_id}.nii.gz"
        with self._lock(image_id):
            masks = self._mask_files(row.mask_dir)
            unknown = sorted(set(masks) - set(self.lm.names))
            for name in unknown:
                masks.pop(name)
            if not masks:
                return None
            sig = self._mask_signature(masks)
            cached = self.index.imported_row(image_id)
            if cached and cached.signature == sig and dest.is_file():
                return dest
            t0 = time.perf_counter()
            image = read_geometry(self._abs(row.path))
            proxies = {}
            for name, path in masks.items():
                proxy = nib.load(str(path)).dataobj  # lazy: consolidate loads one mask at a time
                if tuple(proxy.shape[:3]) != image.shape or len(proxy.shape) != 3:
                    raise DatastoreError(
                        422, f"mask {path} has shape {tuple(proxy.shape)}, the image {image.shape}"
                    )
                proxies[name] = proxy
            label = self.lm.consolidate(proxies)
            atomic_write_nifti(label, image.affine, dest)
            self.index.set_imported_cache(image_id, sig, self._state_rel(dest), time.time())
            logger.info(
                "consolidated %d masks of %s in %.2f s%s", len(masks), image_id, time.perf_counter() - t0,
                f" (skipped unknown {unknown})" if unknown else "",
            )
            return dest

    def reveal_imported(self, image_id: str) -> None:
        """Show a scan's PanTS masks while ``hide_imported_labels`` is on (persists in the index)."""
        row = self._require(image_id)
        if row.mask_dir is None:
            raise DatastoreError(404, f"image {image_id!r} has no imported PanTS masks to reveal")
        self.index.set_revealed([image_id], True)
        self.index.release_leases([image_id])

    def reveal_imported_many(self, image_ids: Iterable[str]) -> int:
        """Reveal many scans in one transaction (their leases end too); returns how many rows changed."""
        ids = list(image_ids)
        self.index.release_leases(ids)
        return self.index.set_revealed(ids, True)

    def revealed_images(self) -> list[str]:
        return self.index.revealed_ids()

    def reset_revealed(self) -> None:
        """Hide every revealed scan again (a new simulated campaign)."""
        self.index.set_revealed(self.index.revealed_ids(), False)

    def has_imported_labels(self, image_id: str) -> bool:
        """Whether a scan has PanTS masks at all (visible or hidden)."""
        row = self._row(image_id)
        return bool(row and row.mask_dir is not None)

    # ---- training list, status, listing -------------------------------------------------------
    def datalist(self, full_path: bool = True, tags: Sequence[str] = TRAINING_TAGS) -> list[dict[str, Any]]:
        """Training pairs ``{"image", "label", "image_id", "tag"}`` of the training splits.

        Each scan takes its first live label in ``tags`` order (an annotator's ``final`` over the
        imported ``pants`` masks). The test split is never included.
        """
        ids = self.index.labeled_ids(self.training_splits, tuple(tags), IMPORTED_TAG, self.hide_imported, True)
        out = []
        for image_id in ids:
            for tag in tags:
                uri = self.get_label_uri(image_id, tag)
                if uri:
                    image = self.get_image_uri(image_id)
                    if not full_path:
                        image, uri = self._short(image), self._short(uri)
                    out.append({"image": image, "label": uri, "image_id": image_id, "tag": tag})
                    break
        return out

    def _short(self, path: str) -> str:
        for base in (self.state_dir, self.root):
            try:
                return str(Path(path).relative_to(base))
            except ValueError:
                continue
        return path

    def status(self) -> dict[str, Any]:
        splits = self.served_splits
        per_split = self.index.count_per_split(splits)
        return {
            "total": sum(per_split.values()),
            "completed": self.index.count_labeled_ids(splits, TRAINING_TAGS, IMPORTED_TAG, self.hide_imported),
            "label_tags": self.index.count_labeled(splits, IMPORTED_TAG, self.hide_imported),
            "splits": per_split,
            "test_split": len(self.test_images()),
            "hide_imported_labels": self.hide_imported,
        }

    def json(self) -> dict[str, Any]:
        """LocalDatastore-shaped listing: ``objects[id] = {image: {ext, info}, labels: {tag: {ext, info}}}``.

        Image info here is lean (name, split, ts and what :meth:`update_image_info` stored: scores,
        strategy timestamps); 3D Slicer fetches this listing on every next sample, so metadata and
        paths are left to :meth:`get_image_info` and :meth:`metadata_table`.
        """
        with _gc_paused():  # 36k scans = ~150k small dicts: cyclic GC passes would double the time
            return self._listing()[1]

    def json_bytes(self) -> bytes:
        """:meth:`json` as UTF-8 JSON, cached until the index's ``listing`` change count moves.

        3D Slicer asks for the listing on every next sample; at 36k scans building it takes
        hundreds of ms, reading the counter well under one. The counter is read in the same
        snapshot as the rows, and every commit that changes the listing (from any process)
        bumps it, so a cached body is never older than the last save.
        """
        cached = self._listing_cache
        if cached is not None and cached[0] == self.index.change_count("listing"):
            return cached[1]
        with self._listing_lock:  # one rebuild at a time; the others then find it fresh
            cached = self._listing_cache
            if cached is not None and cached[0] == self.index.change_count("listing"):
                return cached[1]
            with _gc_paused():
                changes, listing = self._listing()
            body = json.dumps(listing, ensure_ascii=False, separators=(",", ":")).encode()
            self._listing_cache = (changes, body)
            return body

    def _listing(self) -> tuple[int, dict[str, Any]]:
        changes, images, labels = self.index.listing(self.served_splits)
        by_image: dict[str, dict[str, Any]] = {}
        for image_id, tag, version, ts, info in labels:
            d = loads(info)
            d.update({"version": version, "ts": int(ts)})
            by_image.setdefault(image_id, {})[tag] = {"ext": ".nii.gz", "info": d}
        objects = {}
        for row in images:
            image_id = row.id
            labs = by_image.get(image_id, {})
            if self._imported_visible(row):
                labs[IMPORTED_TAG] = {"ext": ".nii.gz", "info": {"source": "PanTS per-structure masks"}}
            info = self._compose_info(row, with_path=False)
            objects[image_id] = {"image": {"ext": info["name"][len(image_id):], "info": info}, "labels": labs}
        self.review.decorate(objects)
        return changes, {
            "name": self.name(),
            "description": self.description(),
            "root": str(self.root),
            "layout": self.layout,
            "state_dir": str(self.state_dir),
            "objects": objects,
        }

    def get_dataset_archive(self, limit_cases: int | None) -> str:
        """ZIP of the training pairs (image + label) and the index listing."""
        dl = self.datalist()
        if not dl:
            raise DatastoreError(404, "no labeled scans to archive")
        if limit_cases and 0 < limit_cases < len(dl):
            dl = dl[:limit_cases]
        fd, path = tempfile.mkstemp(suffix=".zip")
        os.close(fd)
        with zipfile.ZipFile(path, mode="w") as archive:
            for d in dl:
                archive.write(d["image"], arcname=f"image/{d['image_id']}.nii.gz")
                archive.write(d["label"], arcname=f"label/{d['image_id']}.nii.gz")
            archive.writestr("metadata.json", dumps(self.json()))
        return path

    def close(self) -> None:
        self.index.close()


# ---- export ----------------------------------------------------------------------------------


__all__ = [
    "PanTSDatastore",
    "detect_layout",
    "FINAL_TAG",
    "IMPORTED_TAG",
    "TRAINING_TAGS",
    "STATE_DIRNAME",
]
