"""Import -> export round trip: PanTS masks consolidated by the datastore and written back as
per-structure masks reproduce the input wherever the overlap priority kept the information."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lib.datastore.export import export_labels
from lib.datastore.pants import IMPORTED_TAG, PanTSDatastore
from lib.core.labelmap import load_labelmap
from pants_tools.phantom import make_case, write_case, write_pants_tree

REPO = Path(__file__).resolve().parents[1]
LM = load_labelmap()
SHAPE = (32, 32, 24)
PANCREAS_FAMILY = {"pancreas", "pancreas_head", "pancreas_body", "pancreas_tail", "pancreatic_duct"}


def read_masks(folder: Path) -> dict[str, np.ndarray]:
    return {n: np.asarray(nib.load(folder / f"{n}.nii.gz").dataobj).astype(bool) for n in LM.names}


def higher_than(name: str, masks: dict[str, np.ndarray]) -> np.ndarray:
    """Voxels some mask of higher overlap priority than ``name`` covers."""
    out = np.zeros(next(iter(masks.values())).shape, bool)
    for other in LM.overlap_priority[: LM.overlap_priority.index(name)]:
        out |= masks[other]
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export_src")
    write_pants_tree(root, 3, shape=SHAPE, n_test=1)
    lesion = make_case(7, shape=SHAPE, lesion=True)  # a scan with a pancreatic lesion
    write_case(lesion, root / "ImageTr" / "PanTS_00000008" / "ct.nii.gz",
               root / "LabelTr" / "PanTS_00000008" / "segmentations")
    return root


def test_round_trip_reproduces_masks_where_priority_kept_them(tree: Path, tmp_path: Path) -> None:
    ds = PanTSDatastore(tree, state_dir=tmp_path / "state")
    out = tmp_path / "release"
    done = export_labels(ds, out, tags=[IMPORTED_TAG])
    assert sorted(done) == ["PanTS_00000001", "PanTS_00000002", "PanTS_00000003", "PanTS_00000008"]
    assert (out / "LabelTe" / "PanTS_00000003" / "segmentations").is_dir()  # test split -> LabelTe
    lesion_seen = False
    for image_id in done:
        split = "Te" if ds.split_of(image_id) == "test" else "Tr"
        src = read_masks(tree / f"Label{split}" / image_id / "segmentations")
        exp_dir = out / f"Label{split}" / image_id / "segmentations"
        assert sorted(p.name for p in exp_dir.iterdir()) == sorted(f"{n}.nii.gz" for n in LM.names)
        exp = read_masks(exp_dir)
        affine = nib.load(tree / f"Image{split}" / image_id / "ct.nii.gz").affine
        np.testing.assert_allclose(nib.load(exp_dir / "liver.nii.gz").affine, affine)
        lesion_seen |= bool(src["pancreatic_lesion"].any())
        for name in LM.names:
            if name == "pancreas":
                continue
            # exact wherever no higher-priority structure shares the voxel
            np.testing.assert_array_equal(exp[name], src[name] & ~higher_than(name, src), err_msg=name)
        # whole gland: kept except where a non-pancreas structure of higher priority (vessel,
        # bile duct, lesion) covers it; it gains parts/duct and touching lesion beyond the gland
        others = np.zeros(SHAPE, bool)
        for name in LM.overlap_priority[: LM.overlap_priority.index("pancreas")]:
            if name not in PANCREAS_FAMILY and name != "pancreatic_lesion":
                others |= src[name]
        lost = src["pancreas"] & ~exp["pancreas"]
        assert not (lost & ~others & ~src["pancreatic_lesion"]).any()
        family = np.logical_or.reduce([src[n] for n in PANCREAS_FAMILY])
        assert not (exp["pancreas"] & ~family & ~src["pancreatic_lesion"]).any()
    assert lesion_seen


def test_pancreas_composite_on_a_hand_made_case(tmp_path: Path) -> None:
    """The documented losses, one by one, on a case built for them."""
    root = tmp_path / "PanTS"
    image_id = "PanTS_00000001"
    seg = root / "LabelTr" / image_id / "segmentations"
    seg.mkdir(parents=True)
    (root / "ImageTr" / image_id).mkdir(parents=True)
    affine = np.diag([-0.8, -0.8, 1.25, 1.0])
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.int16), affine), root / "ImageTr" / image_id / "ct.nii.gz")
    m = {n: np.zeros(SHAPE, np.uint8) for n in LM.names}
    m["pancreas"][8:24, 8:16, 8:16] = 1
    m["pancreas_head"][8:14, 8:16, 8:16] = 1
    m["pancreas_tail"][18:26, 8:16, 8:16] = 1  # sticks out of the gland by two slices
    m["veins"][10:12, 6:18, 10:12] = 1  # a vein crossing the head
    m["pancreatic_lesion"][20:28, 10:14, 10:14] = 1  # in the tail and beyond the gland
    m["pancreatic_lesion"][2:4, 28:30, 2:4] = 1  # a far lesion, not touching the gland
    m["liver"][0:8, 0:8, 0:8] = 1
    m["liver"][8:10, 8:10, 8:10] = 1  # overlaps the gland: the gland wins there
    for n, a in m.items():
        nib.save(nib.Nifti1Image(a, affine), seg / f"{n}.nii.gz")
    ds = PanTSDatastore(root)
    export_labels(ds, tmp_path / "out", tags=[IMPORTED_TAG])
    exp = read_masks(tmp_path / "out" / "LabelTr" / image_id / "segmentations")
    src = {n: a.astype(bool) for n, a in m.items()}

    gland = exp["pancreas"]
    assert not gland[10:12, 8:16, 10:12].any()  # vein voxels are lost from the gland and the head
    assert not exp["pancreas_head"][10:12, 8:16, 10:12].any()
    assert gland[24:26, 8:16, 8:16].all()  # tail beyond the gland joins the gland
    assert gland[24:28, 10:14, 10:14].all()  # touching lesion joins the gland, even outside it
    assert not gland[2:4, 28:30, 2:4].any()  # a far lesion does not
    assert exp["pancreatic_lesion"][2:4, 28:30, 2:4].all()
    assert not exp["pancreas_tail"][20:24, 10:14, 10:14].any()  # lesion wins over the tail
    assert not exp["liver"][8:10, 8:10, 8:10].any() and exp["liver"][0:8, 0:8, 0:8].all()
    # everything else of the gland is kept
    kept = src["pancreas"] & ~src["veins"]
    assert (gland | ~kept).all()


def test_final_labels_exported_and_cli(tree: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    ds = PanTSDatastore(tree, state_dir=state)
    image_id = "PanTS_00000002"
    label = np.zeros(SHAPE, np.uint8)
    label[2:6] = LM.name_to_id["spleen"]
    label[10:12] = LM.name_to_id["pancreas_body"]
    affine = nib.load(tree / "ImageTr" / image_id / "ct.nii.gz").affine
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "l.nii.gz")
    ds.save_label(image_id, str(tmp_path / "l.nii.gz"), "final", {})
    ds.close()

    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "scripts" / "export_labels.py"), "--studies", str(tree), "--out", str(out),
           "--datastore-dir", str(state), "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "exported 1 scans" in res.stdout
    exp = read_masks(out / "LabelTr" / image_id / "segmentations")
    assert (exp["spleen"] == (label == LM.name_to_id["spleen"])).all()
    assert exp["pancreas"][10:12].all() and exp["pancreas_body"][10:12].all()  # body is part of the gland
    assert not exp["liver"].any()

    res = subprocess.run(cmd + ["--tag", "final", "--tag", IMPORTED_TAG, "--out", str(tmp_path / "o2")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "exported 4 scans" in res.stdout, res.stderr
    res = subprocess.run(cmd + ["--ids", "PanTS_12345678"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unknown scan ids" in res.stderr
    helptext = subprocess.run([sys.executable, str(REPO / "scripts" / "export_labels.py"), "--help"],
                              capture_output=True, text=True, timeout=120).stdout
    assert "--studies" in helptext and "LabelTr" in helptext
