"""Spatial augmentation of training crops: a random in-plane rotation and isotropic scale.

A lesion is seen in few scans (11% of PanTS); without augmentation the 2 mm stage fits the
training lesions and finds almost none in held-out scans (docs/active_learning_experiments.md,
"Why no model segments the lesion"). Rotation about the body's long axis and a size change keep
every label's meaning (left stays left: no mirroring, which would swap head and tail, left and
right organs).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from lib.core.settings import AugmentConfig


def random_transform(rng: np.random.Generator, aug: AugmentConfig) -> np.ndarray | None:
    """A 3x3 matrix from output to source voxel offsets, or None (this crop is not augmented).

    Axes follow the prepared image (RPS): the rotation turns the first two (the axial plane)."""
    if aug.probability <= 0 or rng.random() >= aug.probability:
        return None
    theta = np.deg2rad(rng.uniform(-aug.rotate_deg, aug.rotate_deg))
    scale = rng.uniform(1.0 - aug.scale, 1.0 + aug.scale)
    c, s = np.cos(theta), np.sin(theta)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return rot * scale  # scale > 1: the source region is larger, so anatomy looks smaller


def transformed_crop(
    image: np.ndarray,
    label: np.ndarray,
    centre: np.ndarray,
    patch: Sequence[int],
    matrix: np.ndarray,
    out: tuple[np.ndarray, np.ndarray],
) -> None:
    """Write into ``out`` the patch around ``centre`` resampled through ``matrix`` (linear for the
    image, nearest for the label); outside the volume: air (-1) and background (0).

    Only the source box the patch's corners map into is read, so the cost follows the patch, not
    the scan (the image may be memory-mapped)."""
    # the patch's voxel p // 2 sits on ``centre``, as in lib.model.training.crop
    half = np.array([p // 2 for p in patch], dtype=np.float64)
    corners = np.array(np.meshgrid(*[[-h, p - 1 - h] for h, p in zip(half, patch)], indexing="ij")).reshape(3, -1)
    reach = np.abs(matrix @ corners).max(axis=1)
    lo = np.floor(np.asarray(centre) - reach).astype(int) - 1
    hi = np.ceil(np.asarray(centre) + reach).astype(int) + 2
    shape = np.asarray(image.shape)
    s0, s1 = np.maximum(lo, 0), np.minimum(hi, shape)
    src = tuple(slice(int(a), int(b)) for a, b in zip(s0, s1))
    if np.any(s1 <= s0):  # the patch lies wholly outside (cannot happen for a centre inside)
        out[0].fill(-1.0)
        out[1].fill(0)
        return
    # output voxel o -> source voxel centre + M (o - half), expressed in the sub-box's coordinates
    offset = np.asarray(centre, dtype=np.float64) - s0 - matrix @ half
    ndimage.affine_transform(np.asarray(image[src], dtype=np.float32), matrix, offset=offset,
                             output_shape=tuple(patch), output=out[0], order=1, mode="constant", cval=-1.0)
    ndimage.affine_transform(np.asarray(label[src]), matrix, offset=offset, output_shape=tuple(patch),
                             output=out[1], order=0, mode="constant", cval=0)
