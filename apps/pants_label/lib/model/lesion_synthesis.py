"""Synthetic pancreatic lesions painted into training crops of lesion-free gland.

A lesion is in about 11% of PanTS scans, so a site's first hundred labels hold about ten: the 2 mm
stage memorises them and finds few in held-out scans (docs/active_learning_experiments.md, "Why no
model segments the lesion").
Tumour synthesis (Hu et al., CVPR 2023, "Label-free liver tumor segmentation"; Chen et al.,
CVPR 2024, "Towards generalizable tumor synthesis") gives the network as many distinct lesions as
it has steps: a crop holding gland and no lesion gets an irregular ellipsoid inside the gland,
darker than the gland by a drawn contrast, its voxels labelled lesion.

The lesion's look comes from published PDAC attenuation, not from the data it is tested on: a
hypo-attenuating mass, a few to tens of HU below the parenchyma (barely any in non-contrast CT,
most in the pancreatic phase), with the scan's own noise and texture kept (the intensity is shifted,
not replaced), and a volume drawn log-uniformly between the configured bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lib.core.config_errors import ConfigError
from lib.core.labelmap import LabelMap
from lib.core.settings import MAX_IRREGULARITY, LesionSynthesisConfig, Preprocessing
from lib.model.metrics import LESION_CLASS


@dataclass(frozen=True)
class LesionSynthesizer:
    """Paints a synthetic lesion into one crop (image in network units, label in class ids)."""

    cfg: LesionSynthesisConfig
    spacing_mm: tuple[float, float, float]
    lesion_id: int
    host_ids: tuple[int, ...]
    hu: np.ndarray  # the input map's knots: HU ...
    units: np.ndarray  # ... and the network input each becomes (monotonic)

    @classmethod
    def build(cls, cfg: LesionSynthesisConfig, spacing_mm: tuple[float, float, float], lm: LabelMap,
              preprocessing: Preprocessing) -> "LesionSynthesizer | None":
        """None when synthesis is off. Unknown host classes stop with the key's name."""
        if cfg.probability <= 0:
            return None
        try:
            hosts = tuple(lm.id_of(n) for n in cfg.host_classes)
        except KeyError as err:
            raise ConfigError(f"training.lesion_synthesis.host_classes: {err.args[0]}") from None
        lesion_id = lm.id_of(LESION_CLASS)
        if lesion_id in hosts:
            raise ConfigError(f"training.lesion_synthesis.host_classes: {LESION_CLASS} cannot host a synthetic lesion")
        hu, units = preprocessing.hu_knots()
        return cls(cfg, tuple(float(s) for s in spacing_mm), lesion_id, hosts,  # type: ignore[arg-type]
                   np.asarray(hu, np.float64), np.asarray(units, np.float64))

    def paint(self, rng: np.random.Generator, image: np.ndarray, label: np.ndarray) -> bool:
        """With the configured probability, paint a lesion into a crop that holds host gland and no
        lesion (in place). Returns whether one was painted.

        The generator is drawn from only when synthesis is attempted, in a fixed order, so a seed
        gives the same crops."""
        if rng.random() >= self.cfg.probability:
            return False
        if (label == self.lesion_id).any():
            return False  # a real lesion is left as it is
        host = np.isin(label, self.host_ids)
        candidates = np.argwhere(host)
        if len(candidates) < self.cfg.min_host_voxels:
            return False
        centre = candidates[rng.integers(len(candidates))]
        lo_v, hi_v = self.cfg.volume_mm3
        volume = float(np.exp(rng.uniform(np.log(lo_v), np.log(hi_v))))
        aspect = rng.uniform(0.7, 1.4, size=3)
        radii = (3.0 * volume / (4.0 * np.pi)) ** (1 / 3) * aspect / np.prod(aspect) ** (1 / 3)  # mm; volume kept
        rotation = _random_rotation(rng)
        contrast = rng.uniform(*self.cfg.contrast_hu)
        roughness = rng.standard_normal(3 * (9,))  # low-frequency boundary wobble, resized below

        sp = np.asarray(self.spacing_mm)
        # the wobble pushes the boundary out to (1 + irregularity) radii at most
        reach = np.ceil((1.0 + MAX_IRREGULARITY) * radii.max() / sp).astype(int) + 2
        lo = np.maximum(centre - reach, 0)
        hi = np.minimum(centre + reach + 1, label.shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        grid = np.stack(np.meshgrid(*[(np.arange(a, b) - c) * s for a, b, c, s in zip(lo, hi, centre, sp)],
                                    indexing="ij"), axis=-1)  # mm from the centre
        local = grid @ rotation.T / radii
        dist = np.sqrt((local ** 2).sum(axis=-1))
        wobble = ndimage.zoom(ndimage.gaussian_filter(roughness, 1.5), np.divide(dist.shape, roughness.shape),
                              order=1)[tuple(slice(0, n) for n in dist.shape)]
        wobble /= max(float(np.abs(wobble).max()), 1e-6)
        blob = dist <= 1.0 + self.cfg.irregularity * wobble
        # a pancreatic lesion sits in the gland; it may bulge one voxel past its outline
        lesion = blob & ndimage.binary_dilation(host[box], iterations=1)
        if lesion.sum() < self.cfg.min_lesion_voxels:
            return False
        weight = ndimage.gaussian_filter(lesion.astype(np.float32), self.cfg.edge_blur_voxels)
        weight[lesion] = np.maximum(weight[lesion], 0.5)  # labelled voxels keep at least half the contrast
        touched = weight > 1e-3  # elsewhere the crop stays bit for bit as it was
        sub = image[box]
        hu = np.interp(sub[touched], self.units, self.hu) - contrast * weight[touched]
        sub[touched] = np.interp(hu, self.hu, self.units)
        label[box][lesion] = self.lesion_id
        return True


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3-D rotation (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q
