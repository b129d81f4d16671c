"""Export stored labels in the PanTS layout: one binary mask per structure, per scan."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from lib.datastore.label_upload import atomic_write_nifti, read_geometry, split_label_map
from lib.datastore.pants import PanTSDatastore
from lib.datastore.protocol import FINAL_TAG


def export_labels(
    ds: PanTSDatastore,
    out_dir: str | os.PathLike,
    tags: Sequence[str] = (FINAL_TAG,),
    image_ids: Iterable[str] | None = None,
    progress: bool = False,
) -> list[str]:
    """Write labels as PanTS per-structure masks: ``out/LabelTr/<id>/segmentations/<name>.nii.gz``.

    All classes of the label map are written (empty ones as all-zero masks), as uint8 with the
    image's affine; test-split scans go to ``LabelTe``. Each scan takes its first live label in
    ``tags`` order; scans with none are skipped. ``pancreas`` is the whole gland, recovered as the
    label map's ``whole_pancreas`` composite.

    Returns:
        The exported scan ids.
    """
    out = Path(out_dir)
    ids = list(image_ids) if image_ids is not None else sorted(
        set(ds.index.image_ids(("train", "flat", "added", "test")))
    )
    it: Iterable[str] = ids
    if progress:
        from tqdm import tqdm

        it = tqdm(ids, desc="export", unit="scan")
    done = []
    for image_id in it:
        uri = next((u for u in (ds.get_label_uri(image_id, t) for t in tags) if u), "")
        if not uri:
            continue
        image = read_geometry(ds.get_image_uri(image_id))
        label = np.asarray(nib.load(uri).dataobj, dtype=np.uint8)
        split_dir = "LabelTe" if ds.split_of(image_id) == "test" else "LabelTr"
        folder = out / split_dir / image_id / "segmentations"
        for name, mask in split_label_map(label, ds.lm).items():
            atomic_write_nifti(mask.astype(np.uint8), image.affine, folder / f"{name}.nii.gz")
        done.append(image_id)
    return done


__all__ = ["export_labels"]
