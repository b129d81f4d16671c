"""Synthetic abdominal CT phantoms in the public PanTS layout.

Demo data, tests, benchmarks and active-learning simulations need many labelled CTs
with all 28 PanTS classes. This module draws them from a declarative anatomy table
(:data:`ANATOMY`): each structure is a union of ellipsoids, tubes and columns placed
in a *canonical body frame*, with a Hounsfield value per contrast phase. Every case
jitters positions, sizes, shapes and intensities, draws a center (noise, calibration,
phase mix) and, in about 11% of cases, a hypodense pancreatic lesion.

Canonical body frame (mm): ``u`` toward the patient's left, ``v`` toward posterior,
``w`` toward superior; the origin lies near the pancreatic neck. The frame is scaled
to the field of view (``shape * spacing``): in-plane so that the body ellipse fills
it, along the body axis so that lung bases (top) to proximal femurs (bottom) fit.
Radii are therefore in mm of the canonical adult and any shape or spacing gives the
same anatomy; thin structures are widened to at least about one voxel.

Arrays are indexed ``[i, j, k]``: ``i`` runs from the patient's right to left, ``j``
from anterior to posterior, ``k`` from inferior to superior. The NIfTI affine is
``diag(-sx, -sy, sz, 1)`` into RAS+ world mm, the project's PanTS ("RPS") convention;
nibabel's ``aff2axcodes`` calls it ``('L', 'P', 'S')``, naming the direction in which
each index grows.

Example:
    >>> p = make_case(0, shape=(64, 64, 48))
    >>> p.ct.dtype, len(p.masks), p.meta.case_id
    (dtype('int16'), 28, 'PanTS_00000001')
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from lib.core.atomic import atomic_write
from lib.core.labelmap import LabelMap, load_labelmap
from lib.imaging.metadata import PHASES, CaseMeta, write_metadata

if TYPE_CHECKING:
    from pants_tools.cohort import Cohort

Vec3 = tuple[float, float, float]
#: Hounsfield units by phase: (non-contrast, arterial, venous, delayed)
HU4 = tuple[float, float, float, float]

#: share of tumor-positive scans in PanTS (10.9% train, 10.7% test)
LESION_PREVALENCE = 0.11
#: canonical craniocaudal range shown in the field of view (lung bases .. proximal femurs)
W_RANGE: tuple[float, float] = (-235.0, 165.0)
#: canonical body half-axes (left-right, anterior-posterior) in mm
BODY_RADII: tuple[float, float] = (165.0, 115.0)
_BODY_FILL = 0.9  # share of the in-plane field of view the body spans

# Random streams, one per purpose, so that e.g. forcing a lesion does not move organs and the
# anatomy of a case is the same at every resolution.
_S_META, _S_LESION_DRAW, _S_ANATOMY, _S_LESION, _S_HU, _S_NOISE = range(6)


# ---- centers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Center:
    """An imaging site: noise, intensity calibration and how often it scans each phase.

    Attributes:
        name: value of the ``center`` metadata column.
        noise_hu: standard deviation of the image noise in HU.
        scale: intensity gain applied to HU (scanner calibration).
        offset_hu: intensity offset added after ``scale``.
        phases: relative frequency of ``non-contrast``, ``arterial``, ``venous``, ``delayed``.
        weight: relative share of cases coming from this center.
    """

    name: str
    noise_hu: float
    scale: float = 1.0
    offset_hu: float = 0.0
    phases: tuple[float, float, float, float] = (0.1, 0.2, 0.7, 0.0)
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.noise_hu < 0 or self.scale <= 0 or self.weight <= 0:
            raise ValueError(f"center {self.name!r}: noise_hu >= 0, scale > 0 and weight > 0 required")
        if len(self.phases) != 4 or min(self.phases) < 0 or sum(self.phases) <= 0:
            raise ValueError(f"center {self.name!r}: phases must be 4 non-negative weights for {PHASES}")


DEFAULT_CENTERS: tuple[Center, ...] = (
    Center("center_a", noise_hu=10.0, scale=1.00, offset_hu=0.0, phases=(0.10, 0.20, 0.70, 0.00), weight=3),
    Center("center_b", noise_hu=22.0, scale=0.94, offset_hu=12.0, phases=(0.55, 0.25, 0.20, 0.00), weight=2),
    Center("center_c", noise_hu=7.0, scale=1.06, offset_hu=-8.0, phases=(0.05, 0.60, 0.30, 0.05), weight=2),
    Center("center_d", noise_hu=30.0, scale=1.00, offset_hu=5.0, phases=(0.70, 0.05, 0.25, 0.00), weight=1),
    Center("center_e", noise_hu=15.0, scale=0.90, offset_hu=-20.0, phases=(0.20, 0.20, 0.45, 0.15), weight=1),
)


# ---- anatomy table -------------------------------------------------------------------------


@dataclass(frozen=True)
class Ellipsoid:
    """Ellipsoid with ``radii`` along (u, v, w) before rotating by yaw (about w), pitch (about u)
    and roll (about v), in degrees."""

    center: Vec3
    radii: Vec3
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0


@dataclass(frozen=True)
class Tube:
    """Swept sphere along a polyline; ``radius`` per point or one for all (mm)."""

    points: tuple[Vec3, ...]
    radius: float | tuple[float, ...]


@dataclass(frozen=True)
class Column:
    """Elliptic cylinder along the body axis (body outline, spine), ``w_range`` limits it."""

    center: tuple[float, float]
    radii: tuple[float, float]
    w_range: tuple[float, float] = (-1e4, 1e4)


Shape = Ellipsoid | Tube | Column


@dataclass(frozen=True)
class Structure:
    """One row of the anatomy table.

    Attributes:
        name: PanTS class name, or a context tissue (no mask) for :data:`CONTEXT`.
        shapes: union of primitives in canonical mm; empty for structures derived in code.
        hu: HU by phase (non-contrast, arterial, venous, delayed).
        jitter_mm: standard deviation of the per-case rigid shift.
        vertex_jitter_mm: extra per-vertex shift of tubes (bends them).
        size_jitter: log standard deviation of the per-case size factor.
        lobulation: amplitude of the smooth random shape deformation of ellipsoids.
        gas: up to this share of the lumen (anterior part, the patient lies supine) holds gas.
        follows: inherit this structure's shift (branches stay on their parent); tube
            vertices equal to one of the parent's also share its vertex jitter.
        sex: only present in this sex.
    """

    name: str
    shapes: tuple[Shape, ...]
    hu: HU4
    jitter_mm: float = 4.0
    vertex_jitter_mm: float = 0.0
    size_jitter: float = 0.08
    lobulation: float = 0.05
    gas: float = 0.0
    follows: str | None = None
    sex: Literal["M", "F"] | None = None


def _mirror(shapes: tuple[Shape, ...]) -> tuple[Shape, ...]:
    """Left-right mirror image (u -> -u), for paired organs."""
    out: list[Shape] = []
    for s in shapes:
        if isinstance(s, Ellipsoid):
            out.append(Ellipsoid((-s.center[0], *s.center[1:]), s.radii, -s.yaw, s.pitch, -s.roll))
        elif isinstance(s, Tube):
            out.append(Tube(tuple((-p[0], p[1], p[2]) for p in s.points), s.radius))
        else:
            out.append(Column((-s.center[0], s.center[1]), s.radii, s.w_range))
    return tuple(out)


_ARTERY: HU4 = (42, 300, 170, 110)
_PANCREAS: HU4 = (42, 120, 95, 75)
_FLUID: HU4 = (12, 14, 16, 18)
_MUSCLE: HU4 = (45, 55, 60, 55)
_BONE: HU4 = (480, 480, 480, 480)
_FEMUR: HU4 = (700, 700, 700, 700)
_LUNG: HU4 = (-850, -850, -850, -850)

# Gland centreline from the head (right, low) through the neck and body to the tail
# (left, high, toward the splenic hilum); the duct runs along the same vertices.
_PANCREAS_PATH: tuple[Vec3, ...] = (
    (-42, -2, -26), (-30, -4, -8), (-8, -14, 4), (35, -5, 14), (75, 8, 24), (88, 15, 32),
)
_AMPULLA: Vec3 = (-60, 2, -31)
_FEMUR_L = (Ellipsoid((95, 15, -188), (24, 24, 24)),
            Tube(((95, 15, -188), (118, 12, -212), (126, 8, -262)), (15, 17, 16)))
_LUNG_L = (Ellipsoid((90, 18, 178), (50, 82, 88)), Ellipsoid((88, 68, 140), (44, 32, 70)))
_KIDNEY_L = (Ellipsoid((72, 58, -15), (27, 25, 54), yaw=-25, roll=-15),)
_ADRENAL_L = (Ellipsoid((42, 52, 45), (6, 14, 20), yaw=30),)

#: unlabelled tissue, painted first (everything labelled lies on top)
CONTEXT: tuple[Structure, ...] = (
    Structure("subcutaneous_fat", (Column((0, 0), BODY_RADII),), (-100,) * 4, jitter_mm=3),
    Structure("abdominal_wall", (Column((0, 0), (150, 101)),), _MUSCLE, jitter_mm=3),
    Structure("visceral_fat", (Column((0, 3), (138, 88)),), (-90,) * 4, jitter_mm=3),
    Structure("paraspinal_muscle", (Column((-38, 90), (26, 19)), Column((38, 90), (26, 19))), _MUSCLE, jitter_mm=2),
    Structure("vertebral_arch", (Column((0, 92), (17, 12)),), _BONE, jitter_mm=2, size_jitter=0.04),
    Structure("vertebral_body", (Column((0, 62), (22, 19)),), _BONE, jitter_mm=2, size_jitter=0.04),
    Structure("spinal_canal", (Column((0, 91), (9, 7)),), _FLUID, follows="vertebral_arch", jitter_mm=0),
    Structure("pelvis", (Ellipsoid((100, 48, -140), (12, 45, 50), yaw=30), Ellipsoid((84, 18, -182), (22, 30, 26)),
                         *_mirror((Ellipsoid((100, 48, -140), (12, 45, 50), yaw=30),
                                   Ellipsoid((84, 18, -182), (22, 30, 26)))),
                         Ellipsoid((0, 82, -150), (42, 18, 50))), _BONE, jitter_mm=4),
    Structure("heart", (Ellipsoid((10, -30, 195), (48, 45, 52)),), (40, 250, 140, 110), jitter_mm=5),
    Structure("iliac_arteries", (Tube(((18, 45, -100), (52, 40, -200)), 7), Tube(((18, 45, -100), (-18, 40, -200)), 7)),
              _ARTERY, follows="aorta", jitter_mm=1),
    Structure("small_bowel", tuple(Ellipsoid(c, (20, 15, 17)) for c in (
        (-40, -45, -80), (0, -55, -95), (40, -45, -85), (-25, -30, -120), (25, -30, -125), (0, -40, -55),
        (55, -20, -110))), (35, 45, 55, 45), jitter_mm=10, lobulation=0.1, gas=0.3),
)

#: the 28 PanTS classes; painted in reverse ``overlap_priority`` so the CT shows what the label map says
ANATOMY: tuple[Structure, ...] = (
    Structure("adrenal_gland_left", _ADRENAL_L, (30, 70, 65, 55), jitter_mm=3),
    Structure("adrenal_gland_right", _mirror(_ADRENAL_L), (30, 70, 65, 55), jitter_mm=3),
    Structure("aorta", (Tube(((18, 45, 200), (18, 45, -100)), 12),), _ARTERY, jitter_mm=3, size_jitter=0.1),
    Structure("bladder", (Ellipsoid((0, -40, -168), (42, 34, 32)),), (8, 10, 12, 220), jitter_mm=6, size_jitter=0.15),
    Structure("celiac_artery", (Tube(((18, 40, 26), (18, 12, 30), (21, 2, 34)), 3.5),), _ARTERY,
              follows="aorta", jitter_mm=1.5),
    Structure("colon", (Tube(((-90, -5, -150), (-98, -5, -60), (-95, -15, -10), (-75, -55, 0), (-30, -78, -25),
                              (30, -78, -20), (80, -50, 10), (100, -10, 30), (108, 15, -30), (100, 5, -110),
                              (60, -20, -150), (15, -25, -155)),
                             (26, 22, 22, 20, 20, 20, 20, 20, 18, 18, 16, 14)),),
              (15, 25, 30, 25), jitter_mm=6, vertex_jitter_mm=5, gas=0.45),
    Structure("common_bile_duct", (Tube(((-50, 2, 58), (-48, 10, 25), (-50, 8, 0), (-54, 4, -22), _AMPULLA), 3.5),),
              _FLUID, jitter_mm=2, vertex_jitter_mm=1.5),
    Structure("duodenum", (Tube(((-25, -48, 20), (-55, -28, 12), (-72, -8, -5), (-70, 2, -38), (-45, 18, -55),
                                 (-5, 22, -58), (22, 14, -42)), 12),),
              (30, 50, 60, 50), jitter_mm=3, vertex_jitter_mm=2.5, gas=0.15),
    Structure("femur_left", _FEMUR_L, _FEMUR, jitter_mm=4, size_jitter=0.05, lobulation=0.0),
    Structure("femur_right", _mirror(_FEMUR_L), _FEMUR, jitter_mm=4, size_jitter=0.05, lobulation=0.0),
    Structure("gall_bladder", (Ellipsoid((-68, -52, 18), (16, 18, 34), pitch=25),), (10, 10, 12, 12),
              jitter_mm=5, size_jitter=0.15),
    Structure("kidney_left", _KIDNEY_L, (32, 160, 170, 140), jitter_mm=5),
    Structure("kidney_right", tuple(Ellipsoid((-72, 62, -30), s.radii, -s.yaw, s.pitch, -s.roll) for s in _KIDNEY_L),
              (32, 160, 170, 140), jitter_mm=5),
    Structure("liver", (Ellipsoid((-75, -5, 55), (72, 80, 72), yaw=10),  # right lobe
                        Ellipsoid((-10, -45, 75), (48, 38, 35), yaw=-15)),  # left lobe, across the midline
              (55, 70, 110, 90), jitter_mm=6),
    Structure("lung_left", _LUNG_L, _LUNG, jitter_mm=6),
    Structure("lung_right", tuple(Ellipsoid((-s.center[0], s.center[1], s.center[2] + 8), s.radii) for s in _LUNG_L),
              _LUNG, jitter_mm=6),
    Structure("pancreas", (Tube(_PANCREAS_PATH, (19, 17, 11, 12, 10, 8)),), _PANCREAS,
              jitter_mm=4, vertex_jitter_mm=3, size_jitter=0.1),
    Structure("pancreas_body", (), _PANCREAS),
    Structure("pancreas_head", (), _PANCREAS),
    Structure("pancreas_tail", (), _PANCREAS),
    Structure("pancreatic_duct", (Tube((*reversed(_PANCREAS_PATH), _AMPULLA), 1.6),), _FLUID,
              follows="pancreas", jitter_mm=0),
    Structure("postcava", (Tube(((-25, 40, 200), (-25, 40, 60), (-22, 42, -100)), 11),), (42, 90, 150, 110),
              jitter_mm=3, size_jitter=0.1),
    Structure("prostate", (Ellipsoid((0, -15, -208), (18, 15, 16)),), (40, 70, 80, 70), jitter_mm=4, sex="M"),
    Structure("spleen", (Ellipsoid((100, 55, 55), (24, 45, 55), yaw=-35),), (45, 120, 115, 95),
              jitter_mm=6, size_jitter=0.12),
    Structure("stomach", (Ellipsoid((55, -10, 95), (40, 40, 42)),
                          Tube(((58, -28, 78), (35, -58, 40), (-5, -60, 25), (-25, -48, 20)), (34, 28, 18, 12))),
              (20, 28, 32, 28), jitter_mm=6, gas=0.35),
    Structure("superior_mesenteric_artery", (Tube(((18, 40, 10), (15, 14, 2), (11, 9, -20), (9, 6, -75)), 3.5),),
              _ARTERY, follows="aorta", jitter_mm=1.5),
    # portal vein, splenic vein (behind the gland) and superior mesenteric vein
    Structure("veins", (Tube(((95, 32, 30), (60, 22, 20), (20, 14, 8), (0, 10, 4)), 5.5),
                        Tube(((0, 10, 4), (1, 6, -20), (3, 2, -75)), 6),
                        Tube(((0, 10, 4), (-25, 6, 25), (-50, 4, 50)), 7)),
              (42, 120, 170, 120), jitter_mm=3, vertex_jitter_mm=1.5),
    Structure("pancreatic_lesion", (), (35, 55, 65, 65)),
)

#: lesion HU by phase per diagnosis; PDAC enhances less than the gland, cysts are fluid
LESION_HU: dict[str, HU4] = {"PDAC": (35, 55, 65, 65), "cyst": (12, 14, 15, 15)}
_GAS_HU = -850.0
_MARGIN_MM = 3.0  # how far a lesion may reach past the gland
_GLAND_PARTS = ("pancreas_head", "pancreas_body", "pancreas_tail")
_PANCREAS_FAMILY = ("pancreas", *_GLAND_PARTS, "pancreatic_duct", "pancreatic_lesion")


# ---- case-level draws ----------------------------------------------------------------------


@dataclass
class Phantom:
    """One generated case: int16 HU ``ct``, uint8 0/1 ``masks`` for every class in label-map
    order (all-zero when absent), the NIfTI ``affine`` and the metadata."""

    ct: np.ndarray
    masks: dict[str, np.ndarray]
    affine: np.ndarray
    meta: CaseMeta


def case_id(index: int) -> str:
    """PanTS-style id of the 0-based case ``index``: ``case_id(0) == 'PanTS_00000001'``."""
    if index < 0:
        raise ValueError(f"case index must be >= 0, got {index}")
    return f"PanTS_{index + 1:08d}"


def _rng(seed: int, index: int, stream: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, stream, *extra])


def has_lesion(index: int, seed: int = 0, prevalence: float = LESION_PREVALENCE) -> bool:
    """Whether case ``index`` gets a pancreatic lesion (probability ``prevalence``)."""
    return bool(_rng(seed, index, _S_LESION_DRAW).random() < prevalence)


def lesion_volume_mm3(index: int, seed: int, cohort: Cohort) -> float:
    """The physical tumour volume a cohort case's lesion is drawn with (before voxelization)."""
    return float(cohort.tumor_volume_mm3.draw(_rng(seed, index, _S_LESION, 1)))


def affine_for(spacing: Sequence[float]) -> np.ndarray:
    """NIfTI affine of a phantom: ``diag(-sx, -sy, sz, 1)`` (RAS+ world mm)."""
    sx, sy, sz = (float(s) for s in spacing)
    return np.diag([-sx, -sy, sz, 1.0])


def _check_geometry(
    shape: Sequence[int], spacing: Sequence[float]
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    if len(shape) != 3 or any(int(n) < 8 for n in shape):
        raise ValueError(f"shape must be three sizes >= 8, got {tuple(shape)}")
    if len(spacing) != 3 or any(not float(s) > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive mm values, got {tuple(spacing)}")
    return tuple(int(n) for n in shape), tuple(float(s) for s in spacing)  # type: ignore[return-value]


def case_meta(index: int, *, spacing: Sequence[float] = (0.8, 0.8, 1.25), seed: int = 0,
              centers: Sequence[Center] = DEFAULT_CENTERS, lesion: bool | None = None,
              cohort: Cohort | None = None) -> CaseMeta:
    """Metadata of a case without generating its volumes (what :func:`make_case` puts in ``meta``).

    With a ``cohort`` its centers and tumour prevalence replace ``centers`` and the default.
    """
    prevalence = LESION_PREVALENCE
    if cohort is not None:
        centers, prevalence = cohort.phantom_centers(), cohort.tumor_prevalence
    if not centers:
        raise ValueError("centers: at least one Center is required")
    rng = _rng(seed, index, _S_META)
    w = np.array([c.weight for c in centers], float)
    center = centers[int(rng.choice(len(centers), p=w / w.sum()))]
    p = np.array(center.phases, float)
    phase = PHASES[int(rng.choice(4, p=p / p.sum()))]
    sex = "M" if rng.random() < 0.5 else "F"
    age = float(np.clip(round(rng.normal(61, 13)), 18, 95))
    diag_u = rng.random()
    tumor = has_lesion(index, seed, prevalence) if lesion is None else bool(lesion)
    diagnosis = ("PDAC" if diag_u < 0.75 else "cyst") if tumor else "normal"
    return CaseMeta(case_id=case_id(index), center=center.name, contrast_phase=phase, age=age, sex=sex,
                    spacing=tuple(float(s) for s in spacing), diagnosis=diagnosis, tumor=tumor)


# ---- geometry ------------------------------------------------------------------------------


@dataclass
class _Grid:
    """Canonical coordinates of voxel centres along each axis (increasing with the index)."""

    axes: tuple[np.ndarray, np.ndarray, np.ndarray]
    voxel_mm: np.ndarray  # canonical size of a voxel per axis
    shape: tuple[int, int, int]

    @property
    def rmin(self) -> float:
        return 0.6 * float(self.voxel_mm.max())

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index box covering canonical box ``[lo, hi]``, ``None`` when outside the volume."""
        out = []
        for ax, a, b in zip(self.axes, lo, hi):
            i0, i1 = int(np.searchsorted(ax, a)), int(np.searchsorted(ax, b, side="right"))
            if i0 >= i1:
                return None
            out.append(slice(i0, i1))
        return tuple(out)  # type: ignore[return-value]

    def coords(self, bb: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        u, v, w = (ax[s] for ax, s in zip(self.axes, bb))
        return u[:, None, None], v[None, :, None], w[None, None, :]


def _make_grid(shape: tuple[int, int, int], spacing: tuple[float, float, float], body_scale: float,
               shift: np.ndarray) -> _Grid:
    fov = np.array(shape) * np.array(spacing)
    s_xy = min(fov[0] * _BODY_FILL / (2 * BODY_RADII[0]), fov[1] * _BODY_FILL / (2 * BODY_RADII[1]))
    s_z = fov[2] / (W_RANGE[1] - W_RANGE[0])
    scale = np.array([s_xy, s_xy, s_z]) * body_scale
    centre = np.array([0.0, 0.0, (W_RANGE[0] + W_RANGE[1]) / 2])
    axes = tuple(
        ((np.arange(n) + 0.5 - n / 2) * sp / sc + c + d).astype(np.float32)
        for n, sp, sc, c, d in zip(shape, spacing, scale, centre, shift)
    )
    return _Grid(axes, np.array(spacing) / scale, shape)  # type: ignore[arg-type]


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rotation taking canonical offsets into the ellipsoid's own axes."""
    y, p, r = np.deg2rad([yaw, pitch, roll])
    rz = np.array([[np.cos(y), -np.sin(y), 0], [np.sin(y), np.cos(y), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    ry = np.array([[np.cos(r), 0, np.sin(r)], [0, 1, 0], [-np.sin(r), 0, np.cos(r)]])
    return (rz @ rx @ ry).T


@dataclass
class _PlacedEllipsoid:
    center: np.ndarray
    radii: np.ndarray
    rot: np.ndarray
    lob: np.ndarray  # symmetric 3x3: boundary at rho = 1 + n^T lob n (n = unit direction)


@dataclass
class _PlacedTube:
    points: np.ndarray  # (n, 3)
    radii: np.ndarray  # (n,)


@dataclass
class _PlacedColumn:
    center: np.ndarray  # (2,)
    radii: np.ndarray  # (2,)
    w_range: tuple[float, float]


_Placed = _PlacedEllipsoid | _PlacedTube | _PlacedColumn


@dataclass
class _Placement:
    """A structure's jittered primitives plus the jitter, which ``follows`` children reuse."""

    shapes: list[_Placed]
    shift: np.ndarray
    vertex_offsets: dict[Vec3, np.ndarray] = field(default_factory=dict)


def _place(s: Structure, rng: np.random.Generator, parent: _Placement | None) -> _Placement:
    shift = rng.normal(0, s.jitter_mm, 3) + (parent.shift if parent else 0)
    size = float(np.exp(np.clip(rng.normal(0, s.size_jitter), -2.5 * s.size_jitter, 2.5 * s.size_jitter)))
    offsets: dict[Vec3, np.ndarray] = {}
    shapes: list[_Placed] = []
    for prim in s.shapes:
        if isinstance(prim, Ellipsoid):
            radii = np.array(prim.radii) * size * np.exp(rng.normal(0, 0.05, 3))
            angles = np.array([prim.yaw, prim.pitch, prim.roll]) + rng.normal(0, [8, 5, 5])
            a = rng.normal(0, s.lobulation, (3, 3))
            center = np.array(prim.center, float) + shift
            shapes.append(_PlacedEllipsoid(center, radii, _rotation(*angles), (a + a.T) / 2))
        elif isinstance(prim, Tube):
            pts = np.array(prim.points, float)
            radius = np.broadcast_to(np.asarray(prim.radius, float), (len(pts),))
            own = rng.normal(0, s.vertex_jitter_mm, pts.shape)
            for m, p in enumerate(prim.points):
                key = tuple(float(x) for x in p)
                if parent is not None and key in parent.vertex_offsets:
                    own[m] = parent.vertex_offsets[key]
                offsets[key] = own[m]
            radii = radius * size * np.exp(rng.normal(0, s.size_jitter / 2, len(pts)))
            shapes.append(_PlacedTube(pts + shift + own, radii))
        else:
            radii = np.array(prim.radii) * size
            shapes.append(_PlacedColumn(np.array(prim.center, float) + shift[:2], radii, prim.w_range))
    return _Placement(shapes, shift, offsets)


def _bounds(p: _Placed, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(p, _PlacedEllipsoid):
        r = np.maximum(p.radii, grid.rmin).max() * (1 + np.abs(p.lob).sum())
        return p.center - r, p.center + r
    if isinstance(p, _PlacedTube):
        r = max(float(p.radii.max()), grid.rmin)
        return p.points.min(0) - r, p.points.max(0) + r
    r = np.maximum(p.radii, grid.rmin)
    return (np.array([*(p.center - r), p.w_range[0]]), np.array([*(p.center + r), p.w_range[1]]))


def _union_box(boxes: list[tuple[slice, slice, slice]]) -> tuple[slice, slice, slice]:
    lo = [min(b[a].start for b in boxes) for a in range(3)]
    hi = [max(b[a].stop for b in boxes) for a in range(3)]
    return slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2])


def _sub(inner: tuple[slice, ...], outer: tuple[slice, ...]) -> tuple[slice, ...]:
    """``inner`` expressed relative to ``outer`` (which contains it)."""
    return tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))


def _raster_one(p: _Placed, grid: _Grid, bb: tuple[slice, slice, slice], gas: float,
                grow: float = 0.0) -> tuple[np.ndarray, np.ndarray | None]:
    """Inside mask (and gas sub-mask) of one primitive within box ``bb``."""
    u, v, w = grid.coords(bb)
    rmin = grid.rmin
    if isinstance(p, _PlacedEllipsoid):
        r = np.maximum(p.radii + grow, grid.voxel_mm * 0.6)
        du, dv, dw = u - p.center[0], v - p.center[1], w - p.center[2]
        q = [(p.rot[a, 0] * du + p.rot[a, 1] * dv + p.rot[a, 2] * dw) / r[a] for a in range(3)]
        rho2 = q[0] ** 2 + q[1] ** 2 + q[2] ** 2
        if np.any(p.lob):
            qaq = sum(p.lob[a, b] * q[a] * q[b] for a in range(3) for b in range(3))
            inside = rho2 < (1 + qaq / np.maximum(rho2, 1e-6)) ** 2
        else:
            inside = rho2 < 1
        gas_mask = (inside & (dv / r[1] < 2 * gas - 1)) if gas > 0 else None
        return inside, gas_mask
    if isinstance(p, _PlacedColumn):
        r = np.maximum(p.radii + grow, grid.voxel_mm[:2] * 0.6)
        disk = ((u - p.center[0]) / r[0]) ** 2 + ((v - p.center[1]) / r[1]) ** 2 < 1
        inside = disk & (w >= p.w_range[0]) & (w <= p.w_range[1])
        return inside, None
    inside = np.zeros(tuple(s.stop - s.start for s in bb), bool)
    gas_mask = np.zeros_like(inside) if gas > 0 else None
    for (a, b), (ra, rb) in zip(zip(p.points[:-1], p.points[1:]), zip(p.radii[:-1], p.radii[1:])):
        ra, rb = max(ra + grow, rmin), max(rb + grow, rmin)
        seg_box = grid.box(np.minimum(a, b) - max(ra, rb), np.maximum(a, b) + max(ra, rb))
        if seg_box is None:
            continue
        seg_box = tuple(slice(max(s.start, o.start), min(s.stop, o.stop)) for s, o in zip(seg_box, bb))
        if any(s.start >= s.stop for s in seg_box):
            continue
        su, sv, sw = grid.coords(seg_box)  # type: ignore[arg-type]
        d = b - a
        du, dv, dw = su - a[0], sv - a[1], sw - a[2]
        t = np.clip((du * d[0] + dv * d[1] + dw * d[2]) / max(float(d @ d), 1e-9), 0, 1)
        ru, rv, rw = du - t * d[0], dv - t * d[1], dw - t * d[2]
        rad = ra + t * (rb - ra)
        seg = ru**2 + rv**2 + rw**2 < rad**2
        loc = _sub(seg_box, bb)
        inside[loc] |= seg
        if gas_mask is not None:
            gas_mask[loc] |= seg & (rv < (2 * gas - 1) * rad)
    return inside, gas_mask


@dataclass
class _Raster:
    box: tuple[slice, slice, slice]
    inside: np.ndarray
    gas: np.ndarray | None = None


def _rasterize(shapes: list[_Placed], grid: _Grid, gas: float = 0.0, grow: float = 0.0,
               box: tuple[slice, slice, slice] | None = None) -> _Raster | None:
    """Union of primitives within their joint bounding box (or within ``box``)."""
    boxes = [grid.box(*_bounds(p, grid)) for p in shapes]
    if box is None:
        present = [b for b in boxes if b is not None]
        if not present:
            return None
        box = _union_box(present)
    out = _Raster(box, np.zeros(tuple(s.stop - s.start for s in box), bool),
                  np.zeros(tuple(s.stop - s.start for s in box), bool) if gas > 0 else None)
    for p, pb in zip(shapes, boxes):
        if pb is None:
            continue
        pb = tuple(slice(max(s.start, o.start), min(s.stop, o.stop)) for s, o in zip(pb, box))
        if any(s.start >= s.stop for s in pb):
            continue
        inside, gmask = _raster_one(p, grid, pb, gas, grow)  # type: ignore[arg-type]
        loc = _sub(pb, box)
        out.inside[loc] |= inside
        if gmask is not None and out.gas is not None:
            out.gas[loc] |= gmask
    return out if out.inside.any() else None


# ---- the pancreas family -------------------------------------------------------------------


def _gland_cut(u: np.ndarray, cuts: tuple[float, float], part: str) -> np.ndarray:
    """Head lies right of the superior mesenteric vein, tail left of the aorta's left edge."""
    head_body, body_tail = cuts
    if part == "pancreas_head":
        return u < head_body
    if part == "pancreas_body":
        return (u >= head_body) & (u < body_tail)
    return u >= body_tail


def _place_lesion(gland: _PlacedTube, cuts: tuple[float, float], diagnosis: str, min_radius: float,
                  rng: np.random.Generator, radius: float | None = None) -> tuple[str, _PlacedEllipsoid]:
    """A lesion in the head (60%), body (25%) or tail (15%), centred near the gland's axis.

    Sizes follow PanTS relative to the gland (median ~10 mm radius in an adult), or are the
    given equivalent-sphere ``radius`` (canonical mm; cohort pools draw it from the cohort's
    volume distribution), but never drop below ``min_radius``, so a tumor-positive case
    always shows a lesion at the grid's resolution.
    """
    part = ("pancreas_head", "pancreas_body", "pancreas_tail")[int(rng.choice(3, p=[0.6, 0.25, 0.15]))]
    # Candidate centres along the centreline; keep those inside the chosen part.
    seg = rng.integers(0, len(gland.points) - 1, 256)
    t = rng.random(256)
    pts = gland.points[seg] + t[:, None] * (gland.points[seg + 1] - gland.points[seg])
    rad = gland.radii[seg] + t * (gland.radii[seg + 1] - gland.radii[seg])
    ok = _gland_cut(pts[:, 0], cuts, part)
    k = int(np.flatnonzero(ok)[0]) if ok.any() else 0
    median = 10.0 if diagnosis == "PDAC" else 8.0  # PanTS median tumor volume ~4.7 cm^3 -> r ~ 10 mm
    r = float(np.clip(median * np.exp(rng.normal(0, 0.4)), 4.0, min(22.0, rad[k] + 4)))
    center = pts[k] + rng.normal(0, 0.25 * rad[k], 3)
    a = rng.normal(0, 0.12 if diagnosis == "PDAC" else 0.04, (3, 3))
    axes = rng.normal(0, 0.15, 3)
    if radius is not None:  # the drawn volume: axes vary, their product does not
        r, axes = radius, axes - axes.mean()
    radii = np.maximum(r * np.exp(axes), min_radius)
    return part, _PlacedEllipsoid(center, radii, _rotation(*rng.uniform(-90, 90, 3)), (a + a.T) / 2)


# ---- the case ------------------------------------------------------------------------------


def make_case(
    index: int,
    *,
    shape: Sequence[int] = (96, 96, 64),
    spacing: Sequence[float] = (0.8, 0.8, 1.25),
    seed: int = 0,
    centers: Sequence[Center] = DEFAULT_CENTERS,
    lesion: bool | None = None,
    cohort: Cohort | None = None,
) -> Phantom:
    """Generate one synthetic abdominal CT with its 28 PanTS masks.

    Args:
        index: 0-based case number; the case id is ``case_id(index)``.
        shape: array size (i: right->left, j: anterior->posterior, k: inferior->superior).
        spacing: voxel size in mm (x, y, z).
        seed: dataset seed; the same (seed, index, shape, spacing) gives identical arrays.
        centers: sites to draw from (noise, calibration, phase mix).
        lesion: force a pancreatic lesion on or off; ``None`` draws it (see :func:`has_lesion`).
        cohort: draw centers, tumour prevalence and the tumour's physical volume
            (:func:`lesion_volume_mm3`) from this spec (:mod:`pants_tools.cohort`) instead.

    Returns:
        :class:`Phantom` with int16 HU ``ct``, uint8 ``masks`` for all 28 classes (all-zero
        when absent, e.g. prostate in women), the affine and the metadata.

    Raises:
        ValueError: bad shape, spacing or centers.
    """
    shape_t, spacing_t = _check_geometry(shape, spacing)
    meta = case_meta(index, spacing=spacing_t, seed=seed, centers=centers, lesion=lesion, cohort=cohort)
    if cohort is not None:
        centers = cohort.phantom_centers()
    center = next(c for c in centers if c.name == meta.center)
    lm = load_labelmap()

    # Whole-body jitter: patient size and position in the field of view.
    body_rng = _rng(seed, index, _S_ANATOMY)
    grid = _make_grid(shape_t, spacing_t, float(np.clip(body_rng.normal(1, 0.04), 0.9, 1.08)),
                      body_rng.normal(0, [6, 4, 8]))

    placed: dict[str, _Placement] = {}
    for s in (*CONTEXT, *ANATOMY):
        srng = _rng(seed, index, _S_ANATOMY, zlib.crc32(s.name.encode()))
        placed[s.name] = _place(s, srng, placed.get(s.follows) if s.follows else None)
    gland = placed["pancreas"].shapes[0]
    assert isinstance(gland, _PlacedTube)
    smv = placed["veins"].shapes[1]
    aorta = placed["aorta"].shapes[0]
    assert isinstance(smv, _PlacedTube) and isinstance(aorta, _PlacedTube)
    cuts = (float(smv.points[0, 0]), float(aorta.points[:, 0].mean() + aorta.radii.mean()))
    lesion_grow = _MARGIN_MM
    if meta.tumor:
        min_radius = 1.5 * float(grid.voxel_mm[:2].max())
        radius = None
        if cohort is not None:
            # physical mm per canonical mm, per axis: the drawn volume is the lesion's physical one
            mm_per_canon = float(np.prod(np.array(spacing_t) / grid.voxel_mm)) ** (1 / 3)
            radius = (3 * lesion_volume_mm3(index, seed, cohort) / (4 * np.pi)) ** (1 / 3) / mm_per_canon
            # a large tumour grows out of the gland (PanTS: a lesion may reach past it); clipping it
            # to the gland's 3 mm margin would cut the volume the cohort asks for
            lesion_grow = max(_MARGIN_MM, radius)
        lesion_part, lesion_geo = _place_lesion(gland, cuts, meta.diagnosis or "PDAC", min_radius,
                                                _rng(seed, index, _S_LESION), radius)
        if meta.diagnosis == "PDAC" and lesion_part != "pancreas_tail":
            placed["pancreatic_duct"].shapes[0].radii[:] *= 2.0  # obstructed, dilated upstream duct

    # Tissue map: ids 1..28 are classes, context tissues and gas follow.
    n_cls = lm.num_classes
    ctx_id = {s.name: n_cls + 1 + k for k, s in enumerate(CONTEXT)}
    gas_id = {"stomach": n_cls + len(CONTEXT) + 1, "colon": n_cls + len(CONTEXT) + 2,
              "duodenum": n_cls + len(CONTEXT) + 3, "small_bowel": n_cls + len(CONTEXT) + 4}
    tissue = np.zeros(shape_t, np.uint8)
    spec = {s.name: s for s in (*CONTEXT, *ANATOMY)}

    def paint(name: str, r: _Raster | None, tid: int) -> None:
        if r is None:
            return
        tissue[r.box][r.inside] = tid
        if r.gas is not None:
            tissue[r.box][r.gas] = gas_id[name]

    for s in CONTEXT:
        paint(s.name, _rasterize(placed[s.name].shapes, grid, gas=_gas(s, seed, index)), ctx_id[s.name])

    gland_r = _rasterize([gland], grid)

    def class_raster(name: str) -> _Raster | None:
        s = spec[name]
        if s.sex is not None and meta.sex != s.sex:
            return None
        if name == "pancreas":
            return gland_r
        if name in _GLAND_PARTS:
            if gland_r is None:
                return None
            return _Raster(gland_r.box, gland_r.inside & _gland_cut(grid.coords(gland_r.box)[0], cuts, name))
        if name == "pancreatic_duct":  # runs inside the gland
            return _clip_to_gland(_rasterize(placed[name].shapes, grid), gland, grid)
        if name == "pancreatic_lesion":  # may reach a little past the gland, not into distant organs
            return _clip_to_gland(_rasterize([lesion_geo], grid), gland, grid, lesion_grow) if meta.tumor else None
        return _rasterize(placed[name].shapes, grid, gas=_gas(s, seed, index))

    # Paint classes from lowest to highest overlap priority, as lm.consolidate() does.
    rasters: dict[str, _Raster | None] = {}
    for name in reversed(lm.overlap_priority):
        rasters[name] = r = class_raster(name)
        paint(name, r, lm.name_to_id[name])

    masks = _masks_from_tissue(tissue, rasters, lm, gas_id)
    ct = _render_ct(tissue, meta, center, ctx_id, gas_id, lm, seed, index)
    return Phantom(ct=ct, masks=masks, affine=affine_for(spacing_t), meta=meta)


def _clip_to_gland(r: _Raster | None, gland: _PlacedTube, grid: _Grid, grow: float = 0.0) -> _Raster | None:
    """``r`` restricted to the gland (grown by ``grow`` mm)."""
    if r is None:
        return None
    g = _rasterize([gland], grid, grow=grow, box=r.box)
    if g is None or not (r.inside & g.inside).any():
        return None
    return _Raster(r.box, r.inside & g.inside)


def _gas(s: Structure, seed: int, index: int) -> float:
    """Per-case share of the lumen holding gas."""
    if s.gas <= 0:
        return 0.0
    return float(_rng(seed, index, _S_ANATOMY, zlib.crc32(f"{s.name}:gas".encode())).uniform(0.2, 1.0) * s.gas)


def _masks_from_tissue(tissue: np.ndarray, rasters: dict[str, _Raster | None], lm: LabelMap,
                       gas_id: dict[str, int]) -> dict[str, np.ndarray]:
    """Per-class masks: each shape minus voxels a higher-priority structure took over.

    Within the pancreas family only other structures (vessels, bile duct) carve, so the
    gland keeps its parts, duct and lesion and head/body/tail partition it, as in PanTS.
    Then ``lm.consolidate(masks)`` reproduces the painted label map exactly.
    """
    big = np.iinfo(np.int16).max
    rank = np.full(256, big, np.int16)  # rank of the class owning each tissue id
    rank[: lm.num_classes + 1] = lm.priority_rank()
    for organ, gid in gas_id.items():
        if organ in lm.name_to_id:
            rank[gid] = rank[lm.name_to_id[organ]]
    rank_outside = rank.copy()  # pancreas family members do not carve each other
    for name in _PANCREAS_FAMILY:
        rank_outside[lm.name_to_id[name]] = big

    masks: dict[str, np.ndarray] = {}
    for name in lm.names:
        m = np.zeros(tissue.shape, np.uint8)
        r = rasters.get(name)
        if r is not None:
            table = rank_outside if name in _PANCREAS_FAMILY else rank
            keep = table[tissue[r.box]] >= rank[lm.name_to_id[name]]
            m[r.box] = r.inside & keep
        masks[name] = m
    return masks


def _render_ct(tissue: np.ndarray, meta: CaseMeta, center: Center, ctx_id: dict[str, int],
               gas_id: dict[str, int], lm: LabelMap, seed: int, index: int) -> np.ndarray:
    """HU per tissue for the case's phase, light blur, center calibration and noise -> int16."""
    from scipy import ndimage

    rng = _rng(seed, index, _S_HU)
    ph = PHASES.index(meta.contrast_phase or "venous")
    strength = rng.uniform(0.8, 1.15)  # bolus timing / dose varies scan to scan

    def hu(values: HU4) -> float:
        base = values[0]
        return base + strength * (values[ph] - base) + rng.normal(0, 4)

    lut = np.full(256, -1000.0, np.float32)  # 0 = air around the body
    for s in ANATOMY:
        lut[lm.name_to_id[s.name]] = hu(s.hu)
    gland = lut[lm.name_to_id["pancreas"]]
    for part in ("pancreas_head", "pancreas_body", "pancreas_tail"):
        lut[lm.name_to_id[part]] = gland  # one parenchyma; parts differ only by position
    lesion_hu = LESION_HU.get(meta.diagnosis or "", LESION_HU["PDAC"])
    lut[lm.name_to_id["pancreatic_lesion"]] = hu(lesion_hu) + rng.normal(0, 6)
    for s in CONTEXT:
        lut[ctx_id[s.name]] = hu(s.hu)
    for gid in gas_id.values():
        lut[gid] = _GAS_HU + rng.normal(0, 30)

    ct = lut[tissue]
    # Slight blur: real scanners have a point-spread function, so edges are not step functions.
    ndimage.gaussian_filter(ct, sigma=0.6, output=ct, truncate=2.5)
    noise_sd = center.noise_hu * rng.uniform(0.85, 1.15)
    noise_rng = _rng(seed, index, _S_NOISE)
    slab = max(1, (1 << 22) // (tissue.shape[1] * tissue.shape[2]))  # bound the temporary noise array
    for i0 in range(0, tissue.shape[0], slab):
        part = ct[i0 : i0 + slab]
        part += noise_rng.standard_normal(part.shape, dtype=np.float32) * np.float32(noise_sd)
    ct *= np.float32(center.scale)
    ct += np.float32(center.offset_hu)
    np.clip(np.rint(ct, out=ct), -1024, 3071, out=ct)
    return ct.astype(np.int16)


# ---- writing -------------------------------------------------------------------------------


def _save_nifti(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a NIfTI atomically (temporary file in the same folder, then rename)."""
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    atomic_write(path, lambda tmp: nib.save(img, tmp))


def write_case(phantom: Phantom, image_path: str | os.PathLike, seg_dir: str | os.PathLike) -> None:
    """Write ``ct`` to ``image_path`` and one ``<name>.nii.gz`` per mask into ``seg_dir``.

    Masks are written first and the CT last, so a case whose CT exists is complete.
    """
    seg_dir = Path(seg_dir)
    for name, m in phantom.masks.items():
        _save_nifti(m, phantom.affine, seg_dir / f"{name}.nii.gz")
    _save_nifti(phantom.ct, phantom.affine, Path(image_path))


def _case_paths(root: Path, cid: str, test: bool) -> tuple[Path, Path]:
    img, lab = ("ImageTe", "LabelTe") if test else ("ImageTr", "LabelTr")
    return root / img / cid / "ct.nii.gz", root / lab / cid / "segmentations"


def write_pants_tree(
    root: str | os.PathLike,
    n: int,
    *,
    shape: Sequence[int] = (96, 96, 64),
    spacing: Sequence[float] = (0.8, 0.8, 1.25),
    seed: int = 0,
    n_test: int = 0,
    metadata_format: Literal["csv", "xlsx"] = "csv",
    progress: bool = False,
    lesions: Mapping[int, bool] | None = None,
    cohort: Cohort | None = None,
) -> list[str]:
    """Write ``n`` phantoms in the PanTS layout under ``root``.

    Layout: ``ImageTr/<id>/ct.nii.gz`` and ``LabelTr/<id>/segmentations/<name>.nii.gz``
    (all 28 names); the last ``n_test`` cases go to ``ImageTe/`` and ``LabelTe/``;
    ``metadata.csv`` (or ``.xlsx``; a table of the other format is removed) covers all
    cases. Cases already complete on disk are skipped, so an interrupted run resumes where
    it stopped; the skip does not check that they were made with the same shape or seed.

    Args:
        root: output folder (created).
        n: number of cases, ids ``PanTS_00000001`` .. ``case_id(n - 1)``.
        shape, spacing, seed: as for :func:`make_case`.
        n_test: how many of the cases form the test split.
        metadata_format: ``"csv"`` or ``"xlsx"``.
        progress: show a tqdm progress bar.
        lesions: case index -> force a lesion on (True) or off (False); other cases draw it
            (benchmarks use it to fix the share of lesion scans in each split).
        cohort: draw centers, phases, lesions and lesion volumes from this PanTS cohort spec
            (:mod:`pants_tools.cohort`); shape and spacing stay as given.

    Returns:
        The case ids, in order.

    Raises:
        ValueError: bad ``n``, ``n_test``, ``metadata_format``, shape or spacing.
    """
    if n < 0 or not 0 <= n_test <= n:
        raise ValueError(f"need 0 <= n_test <= n, got n={n}, n_test={n_test}")
    if metadata_format not in ("csv", "xlsx"):
        raise ValueError(f"metadata_format must be 'csv' or 'xlsx', got {metadata_format!r}")
    shape_t, spacing_t = _check_geometry(shape, spacing)
    root = Path(root)
    names = load_labelmap().names
    ids, metas = [], []
    indices = range(n)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="phantoms", unit="case")
    for index in indices:
        cid = case_id(index)
        image, seg_dir = _case_paths(root, cid, test=index >= n - n_test)
        complete = image.is_file() and all((seg_dir / f"{nm}.nii.gz").is_file() for nm in names)
        lesion = (lesions or {}).get(index)
        if complete:
            metas.append(case_meta(index, spacing=spacing_t, seed=seed, lesion=lesion, cohort=cohort))
        else:
            p = make_case(index, shape=shape_t, spacing=spacing_t, seed=seed, lesion=lesion, cohort=cohort)
            write_case(p, image, seg_dir)
            metas.append(p.meta)
        ids.append(cid)
    write_metadata(root / f"metadata.{metadata_format}", metas)
    # A table left from a run in the other format would be stale (and find_metadata
    # prefers .xlsx), so keep exactly one.
    (root / f"metadata.{'xlsx' if metadata_format == 'csv' else 'csv'}").unlink(missing_ok=True)
    return ids


__all__ = [
    "ANATOMY",
    "CONTEXT",
    "Center",
    "Column",
    "DEFAULT_CENTERS",
    "Ellipsoid",
    "LESION_PREVALENCE",
    "Phantom",
    "Structure",
    "Tube",
    "affine_for",
    "case_id",
    "case_meta",
    "has_lesion",
    "lesion_volume_mm3",
    "make_case",
    "write_case",
    "write_pants_tree",
]
