"""The PanTS-cohort phantom pool: phase, tumour and center proportions, tumour volumes at physical scale."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from lib.core.errors import ConfigError
from pants_tools.cohort import DEFAULT_COHORT, load_cohort
from pants_tools.phantom import case_meta, lesion_volume_mm3, make_case

SEED = 11
N_META = 4000  # metadata only (no volumes): proportions to about +-1 point


@pytest.fixture(scope="module")
def cohort():
    return load_cohort()


def test_spec_holds_the_seed_figures(cohort) -> None:
    assert cohort.phases == {"non-contrast": 0.453, "arterial": 0.247, "venous": 0.292, "delayed": 0.008}
    assert cohort.tumor_prevalence == pytest.approx(0.109)
    v = cohort.tumor_volume_mm3
    assert (v.median, v.q1, v.q3) == (4749, 1658, 11479)
    assert len(cohort.centers) >= 8
    shares = sorted(cohort.shares, reverse=True)
    assert shares[0] >= 3 * shares[-1] and sum(shares[:3]) > 0.5  # a few large, many small
    assert len({c.noise_hu for c in cohort.centers}) >= 6 and len({c.scale for c in cohort.centers}) >= 6


def test_pool_proportions(cohort) -> None:
    metas = [case_meta(i, seed=SEED, cohort=cohort) for i in range(N_META)]
    phases = Counter(m.contrast_phase for m in metas)
    for phase, share in cohort.phases.items():
        assert phases[phase] / N_META == pytest.approx(share, abs=0.025), phase
    assert sum(m.tumor for m in metas) / N_META == pytest.approx(0.109, abs=0.016)
    centers = Counter(m.center for m in metas)
    for c in cohort.centers:
        assert centers[c.name] / N_META == pytest.approx(c.share, abs=0.025), c.name
    # centers differ in phase mix, not only in the spec: the largest site scans far more
    # non-contrast than the second
    def nc(name: str) -> float:
        mine = [m for m in metas if m.center == name]
        return sum(m.contrast_phase == "non-contrast" for m in mine) / len(mine)
    assert nc("site_01") - nc("site_02") > 0.2


def test_tumour_volume_quantiles(cohort) -> None:
    drawn = np.array([lesion_volume_mm3(i, SEED, cohort) for i in range(N_META)])
    q1, med, q3 = np.percentile(drawn, [25, 50, 75])
    assert med == pytest.approx(4749, rel=0.08)
    assert q1 == pytest.approx(1658, rel=0.10) and q3 == pytest.approx(11479, rel=0.10)


def test_lesion_masks_have_the_drawn_physical_volume(cohort) -> None:
    g = cohort.geometry
    voxel = float(np.prod(g.spacing_mm))
    ratios, volumes = [], []
    for i in range(12):
        p = make_case(i, shape=g.shape, spacing=g.spacing_mm, seed=SEED, lesion=True, cohort=cohort)
        real = float(p.masks["pancreatic_lesion"].sum()) * voxel
        ratios.append(real / lesion_volume_mm3(i, SEED, cohort))
        volumes.append(real)
        assert p.meta.center in {c.name for c in cohort.centers}
    # the smallest lesions sit on the 1.5-voxel floor; the middle of the ratios is the volume kept
    assert 0.8 < float(np.median(ratios)) < 1.25, ratios
    assert 1500 < float(np.median(volumes)) < 15000, volumes


def test_bad_spec_is_refused_with_the_key(tmp_path: Path) -> None:
    spec = yaml.safe_load(DEFAULT_COHORT.read_text())
    spec["centers"][0]["phases"] = [0.05, 0.55, 0.40, 0.00]  # the pool would no longer follow PanTS
    bad = tmp_path / "cohort.yaml"
    bad.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="phase mix strays"):
        load_cohort(bad)
    spec = yaml.safe_load(DEFAULT_COHORT.read_text())
    spec["centers"] = spec["centers"][:7]
    bad.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="centers"):
        load_cohort(bad)
