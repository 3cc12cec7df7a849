"""The synthetic phantom without DICOM: findings are where the labels say, twins share everything else."""

from __future__ import annotations

import numpy as np
import pytest

from synth import (
    CT_RATE_COLUMNS,
    FINDING_NAMES,
    FINDING_TASKS,
    Grid,
    Phantom,
    render_volume,
)
from synth.findings import FindingPlacementError, phantom_from_seed, plant
from synth.tasks import labels_for, normalise_finding_name
from synth.tissues import T

CT_RATE_ORDER = [
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
]


def coarse_grid(ph: Phantom, n: int = 128, ps: float = 3.0, slices: int = 64, dz: float = 5.0) -> Grid:
    return Grid.axial(n, n, ps, slices, dz, ph.base_anatomy.scan_centre_z)


# ----- tasks and labels ---------------------------------------------------------------------------------
def test_ct_rate_columns_and_finding_tasks() -> None:
    assert list(CT_RATE_COLUMNS) == CT_RATE_ORDER
    assert set(FINDING_NAMES) == set(FINDING_TASKS)
    assert len(FINDING_NAMES) == 12
    for cols in FINDING_TASKS.values():
        assert set(cols) <= set(CT_RATE_COLUMNS)
    row = labels_for(["consolidation"])
    assert row["Consolidation"] == 1 and row["Lung opacity"] == 1  # consolidation is an opacity too
    assert sum(row.values()) == 2
    assert normalise_finding_name("Lung nodule") == "lung_nodule"
    with pytest.raises(ValueError, match="valid:"):
        normalise_finding_name("broken_bone")


# ----- determinism and the twin property -------------------------------------------------------------------
def test_same_seed_same_phantom_and_volume() -> None:
    a = phantom_from_seed(11, ["lung_nodule", "emphysema"])
    b = phantom_from_seed(11, ["lung_nodule", "emphysema"])
    assert [f.to_json() for f in a.findings] == [f.to_json() for f in b.findings]
    g = coarse_grid(a, 64, 6.0, 8, 30.0)
    assert np.array_equal(render_volume(a, g).hu, render_volume(b, g).hu)


def test_positive_and_negative_twin_differ_only_inside_the_finding() -> None:
    pos = phantom_from_seed(3, ["lung_nodule", "lung_opacity"])
    neg = pos.without_findings()
    assert neg.base_anatomy == pos.base_anatomy and not neg.findings
    g = coarse_grid(pos)
    vp, vn = render_volume(pos, g), render_volume(neg, g, masks=False)
    inside = np.zeros(vp.hu.shape, dtype=bool)
    for m in vp.masks.values():
        assert m.any()
        inside |= m
    assert np.array_equal(vp.hu[~inside], vn.hu[~inside])  # same body, same noise
    assert not np.array_equal(vp.hu[inside], vn.hu[inside])


def test_finding_streams_are_independent() -> None:
    """Adding an unrelated finding does not move the others (one random stream per finding name)."""
    a = phantom_from_seed(5, ["coronary_artery_wall_calcification"])
    b = phantom_from_seed(5, ["coronary_artery_wall_calcification", "medical_material"])
    ca = next(f for f in a.findings if f.name.startswith("coronary"))
    cb = next(f for f in b.findings if f.name.startswith("coronary"))
    assert ca.to_json() == cb.to_json()


# ----- each finding is where the labels say --------------------------------------------------------------
def test_pleural_effusion_is_water_in_the_dependent_lung_base() -> None:
    pos = phantom_from_seed(4, ["pleural_effusion"])
    neg = pos.without_findings()
    g = coarse_grid(pos)
    vp, vn = render_volume(pos, g), render_volume(neg, g, masks=False)
    geo = pos.geo
    for f in pos.findings:
        m = vp.masks[f.id]
        assert m.sum() > 200
        hu = vp.hu[m].astype(float)
        assert -10.0 <= np.median(hu) <= 30.0
        assert np.mean((hu > -40) & (hu < 60)) > 0.95
        # dependent: posterior half of the cavity; at the base: below the dome top + effusion height
        zz, yy, xx = np.nonzero(m)
        y = g.y[yy]
        z = g.z_array[zz]
        assert np.mean(y > geo.cav_y) > 0.9
        dome = geo.z_dome_r if f.params["side"] == "R" else geo.z_dome_l
        assert z.max() <= dome + f.params["height_mm"] + 5.0
        assert z.min() < dome
        side_x = g.x[xx]
        assert np.all(side_x < geo.x_mid + 1) if f.params["side"] == "R" else np.all(side_x > geo.x_mid - 1)
        # the negative twin has aerated lung (or vessels) there
        assert np.median(vn.hu[m]) < -500


def _shrink(m: np.ndarray) -> np.ndarray:
    e = m.copy()
    e[1:] &= m[:-1]
    e[:-1] &= m[1:]
    e[:, 1:] &= m[:, :-1]
    e[:, :-1] &= m[:, 1:]
    return e


def _grow(m: np.ndarray) -> np.ndarray:
    d = m.copy()
    d[1:] |= m[:-1]
    d[:-1] |= m[1:]
    d[:, 1:] |= m[:, :-1]
    d[:, :-1] |= m[:, 1:]
    return d


def _heart_width(sl: np.ndarray, r: int, c: int, spacing: float) -> float:
    """Soft-tissue region around (r, c): eroded twice (drops the 2 mm pericardium and the coronaries that
    bridge the epicardial fat), flood-filled from the seed, grown back twice inside soft tissue."""
    soft = (sl > -30) & (sl < 200)
    core = _shrink(_shrink(soft))
    if not core[r, c]:
        return 0.0
    comp = np.zeros_like(core)
    comp[r, c] = True
    while True:
        nxt = _grow(comp) & core
        if nxt.sum() == comp.sum():
            break
        comp = nxt
    comp = _grow(_grow(comp)) & soft
    cols = np.nonzero(comp.any(axis=0))[0]
    return float((cols[-1] - cols[0] + 1) * spacing)


def _inner_thoracic_width(sl: np.ndarray, spacing: float) -> float:
    """Leftmost to rightmost aerated-lung pixel inside the patient (the table is a separate run of rows)."""
    body_rows = list((sl > -500).any(axis=1)) + [False]
    best, start = (0, 0, 0), None
    for i, v in enumerate(body_rows):
        if v and start is None:
            start = i
        if not v and start is not None:
            best = max(best, (i - start, start, i))
            start = None
    _, r0, r1 = best
    cols: list[int] = []
    for row in sl[r0:r1]:
        b = np.nonzero(row > -500)[0]
        if b.size:
            inside = np.nonzero(row[b[0] : b[-1] + 1] < -500)[0]
            if inside.size:
                cols += [int(b[0] + inside[0]), int(b[0] + inside[-1])]
    return float((max(cols) - min(cols) + 1) * spacing)


def measured_ctr(vol_hu: np.ndarray, g: Grid, centre: tuple[float, float, float]) -> float:
    """Heart width / inner thoracic width on the axial slice of maximal heart width, from HU only
    (the heart centre seeds the search; slices within 20 mm of it)."""
    r = int(np.argmin(abs(g.y - centre[1])))
    c = int(np.argmin(abs(g.x - centre[0])))
    ks = [k for k, z in enumerate(g.z) if abs(z - centre[2]) <= 20.0]
    widths = [_heart_width(vol_hu[k], r, c, g.col_spacing) for k in ks]
    k = ks[int(np.argmax(widths))]
    return max(widths) / _inner_thoracic_width(vol_hu[k], g.col_spacing)


@pytest.mark.parametrize("seed", [0, 7])
def test_cardiomegaly_raises_the_cardiothoracic_ratio(seed: int) -> None:
    pos = phantom_from_seed(seed, ["cardiomegaly"])
    neg = pos.without_findings()
    g = Grid.axial(192, 192, 2.0, 20, 3.0, float(pos.geo.heart.centre[2]))
    ctr_pos = measured_ctr(render_volume(pos, g, masks=False).hu, g, tuple(pos.geo.heart.centre))
    ctr_neg = measured_ctr(render_volume(neg, g, masks=False).hu, g, tuple(neg.geo.heart.centre))
    assert ctr_pos > 0.5 > ctr_neg
    assert abs(ctr_pos - pos.geo.cardiothoracic_ratio) < 0.04
    assert abs(ctr_neg - neg.geo.cardiothoracic_ratio) < 0.04


def test_nodule_centre_is_soft_tissue_inside_lung() -> None:
    pos = phantom_from_seed(8, ["lung_nodule"])
    for f in pos.findings:
        x, y, z = f.centre
        d = f.params["diameter_mm"]
        assert 8.0 <= d <= 20.0
        g = Grid.axial(64, 64, 1.0, 1, 1.0, z, centre_xy=(x, y))
        v = render_volume(pos, g, tissue=True, noise=False)
        c = (v.hu.shape[1] // 2, v.hu.shape[2] // 2)
        assert -100 < v.hu[0][c] < 150
        # a ring just outside the nodule is lung parenchyma (or a vessel/airway inside the lung)
        rr, cc = np.mgrid[0:64, 0:64]
        ring = np.abs(np.hypot(rr - c[0] + 0.5, cc - c[1] + 0.5) - (d / 2 * 1.15 + 4)) < 1.0
        lungish = np.isin(v.tissue[0][ring], (T.LUNG_R, T.LUNG_L, T.VESSEL, T.AIRWAY_WALL, T.AIRWAY_LUMEN))
        assert lungish.mean() > 0.9


EXPECTED_HU = {  # (low, high) bounds of the median HU inside each finding's mask
    "lung_opacity": (-650, -250),
    "consolidation": (-130, 80),
    "atelectasis": (0, 100),
    "pericardial_effusion": (-10, 30),
    "emphysema": (-1000, -900),
    "coronary_artery_wall_calcification": (300, 1400),
    "arterial_wall_calcification": (300, 1400),
    "medical_material": (1000, 3071),
}


@pytest.mark.parametrize("seed", [1, 2])
def test_every_finding_is_visible_with_its_density(seed: int) -> None:
    names = list(FINDING_NAMES)
    pos = phantom_from_seed(seed, names)
    neg = pos.without_findings()
    g = Grid.axial(160, 160, 2.4, 80, 4.0, pos.base_anatomy.scan_centre_z)
    vp = render_volume(pos, g, supersample=2)
    vn = render_volume(neg, g, masks=False, supersample=2)
    assert {f.name for f in pos.findings} == set(names)
    for f in pos.findings:
        m = vp.masks[f.id]
        assert m.any(), f.id
        if f.name in EXPECTED_HU:
            lo, hi = EXPECTED_HU[f.name]
            med = float(np.median(vp.hu[m]))
            if f.name in (
                "coronary_artery_wall_calcification",
                "arterial_wall_calcification",
                "medical_material",
            ):
                med = float(vp.hu[m].max())  # small and partial-volumed at 2.4 mm: the brightest voxel
            assert lo <= med <= hi, (f.id, med)
        if f.name == "hiatal_hernia":
            assert (vp.hu[m] < -900).sum() > 20  # gas
            assert (vn.hu[m] < -900).sum() < (vp.hu[m] < -900).sum() / 4
        if f.name == "emphysema":
            assert np.mean(vp.hu[m] < -950) > 0.3
            assert np.mean(vn.hu[m] < -950) < 0.05
    # findings that change the anatomy
    assert pos.geo.cardiothoracic_ratio > 0.5 > neg.geo.cardiothoracic_ratio
    at = next(f for f in pos.findings if f.name == "atelectasis")
    side = at.params["side"]
    raised = pos.geo.z_dome_r - neg.geo.z_dome_r if side == "R" else pos.geo.z_dome_l - neg.geo.z_dome_l
    assert raised == pytest.approx(at.params["dome_raise_mm"])


def test_findings_outside_the_scan_range_fail_clearly() -> None:
    base = phantom_from_seed(0)
    top = base.anatomy.z_apex
    with pytest.raises(FindingPlacementError, match="outside the scanned range"):
        plant(base, ["pleural_effusion"], z_range=(top - 60.0, top))


def test_render_volume_supersample_keeps_the_grid() -> None:
    ph = phantom_from_seed(2, ["lung_nodule"])
    g = Grid.axial(48, 48, 8.0, 4, 10.0, ph.base_anatomy.scan_centre_z)
    v = render_volume(ph, g, supersample=3, tissue=True)
    assert v.hu.shape == v.tissue.shape == g.shape
    assert v.hu.dtype == np.int16 and v.hu.min() >= -1024 and v.hu.max() <= 3071
