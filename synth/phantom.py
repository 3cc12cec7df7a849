"""The renderable phantom: a base ``Anatomy`` plus planted findings, painted slice by slice.

``Phantom(anatomy, findings)`` is the unit other code works with. The findings are an add-on: the
vessel trees, noise and everything else come from the *base* anatomy and the seed, so
``phantom.without_findings()`` is the exact negative twin of a positive case (same body, same noise,
same grid), and ``phantom.with_findings(...)`` plants more on the same patient.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from enum import IntEnum
from typing import Any, ClassVar, Protocol

import numpy as np

from synth.anatomy import Anatomy, BodyGeometry
from synth.raster import Canvas, Ellipsoid, Tubes, ellipse, lut, superellipse_level
from synth.tissues import FIRST_FINDING_CODE, LUNG_CODES, T, base_hu_table
from synth.trees import grow_tree

log = logging.getLogger(__name__)


class Layer(IntEnum):
    """When a finding is painted relative to the base anatomy (see ``Phantom.paint``)."""

    PARENCHYMA = 1  # before vessels/airways: opacity, consolidation, emphysema
    NODULE = 2  # after vessels/airways
    PLEURAL = 3  # atelectasis, pleural effusion: replace whatever lung is there
    MEDIASTINAL = 4  # calcifications, hernia, metal
    RECORD = 5  # findings that live in the anatomy (cardiomegaly, pericardial effusion) only record


class PlantedFinding(Protocol):
    """What the phantom needs of a planted finding (implemented in :mod:`synth.findings`).

    A protocol, not an import: findings paint into a phantom, so the phantom must not import them.
    """

    name: ClassVar[str]
    layer: ClassVar[Layer]
    codes: dict[str, int]

    @property
    def id(self) -> str: ...
    @property
    def columns(self) -> tuple[str, ...]: ...
    def to_json(self) -> dict[str, Any]: ...
    def modify(self, a: Anatomy) -> Anatomy: ...
    def hu_entries(self) -> list[tuple[str, float, float]]: ...
    def transparent_codes(self) -> list[int]: ...
    def bind(self, codes: dict[str, int]) -> None: ...
    def z_extent(self) -> tuple[float, float]: ...
    def paint(self, cv: Canvas, ph: Phantom) -> None: ...


# What may be painted over, by structure (lookup tables indexed by the current tissue code).
_CAVITY = (T.MED_FAT, T.LUNG_R, T.LUNG_L, T.ABDOMEN, T.LIVER)
_HEART_OK = lut(_CAVITY)
_IN_HEART = lut((T.MYOCARDIUM,))
_CORONARY_OK = lut((T.EPICARDIAL_FAT, T.MYOCARDIUM, T.PERICARDIUM))
_VESSEL_OK = lut(
    _CAVITY
    + (
        T.PERICARDIUM,
        T.EPICARDIAL_FAT,
        T.PERICARDIAL_FLUID,
        T.MYOCARDIUM,
        T.SPLEEN,
        T.STOMACH_WALL,
        T.STOMACH_FLUID,
        T.MUSCLE,
    )
)
_ESO_OK = lut(_CAVITY + (T.PERICARDIUM, T.EPICARDIAL_FAT, T.STOMACH_WALL, T.STOMACH_FLUID, T.STOMACH_GAS))
_ESO_AIR_OK = lut((T.ESOPHAGUS,))
_AIRWAY_WALL_OK = lut(_CAVITY + (T.MUSCLE, T.SUBCUT_FAT))
_AIRWAY_LUMEN_OK = lut(_CAVITY + (T.AIRWAY_WALL, T.MUSCLE, T.SUBCUT_FAT))
_ABDOMEN_OK = lut((T.ABDOMEN, T.LIVER))
_NOT_OUTSIDE = lut([c for c in range(256) if c not in (T.AIR, T.TABLE, T.TABLE_CORE)])

#: Spine: vertebral level pitch and disc height (mm); the phase is anchored at the carina.
VERTEBRA_PITCH, DISC_MM = 26.0, 6.0
#: Ribs: cranio-caudal pitch, height and anterior descent (mm).
RIB_PITCH, RIB_HEIGHT, RIB_DESCENT = 26.0, 10.0, 95.0


class Phantom:
    """A patient (``anatomy``) with planted ``findings``; paints tissue codes into a ``Canvas``."""

    def __init__(self, anatomy: Anatomy, findings: Sequence[PlantedFinding] = ()) -> None:
        self.base_anatomy = anatomy
        self.findings: tuple[PlantedFinding, ...] = tuple(findings)
        eff = anatomy
        for f in self.findings:
            eff = f.modify(eff)
        self.anatomy = eff
        self.geo = BodyGeometry(eff)
        self.base_geo = self.geo if eff == anatomy else BodyGeometry(anatomy)
        self.vessel_tree, self.airway_tree = _build_trees(self.base_geo, anatomy.seed)
        tree = self.airway_tree
        self.airway_wall = Tubes(tree.p0, tree.p1, tree.r + np.maximum(0.9, 0.22 * tree.r))
        # tissue codes and HU of the findings
        self._finding_hu: dict[int, tuple[float, float]] = {}
        code = FIRST_FINDING_CODE
        for f in self.findings:
            codes = {}
            for key, hu, contrast_delta in f.hu_entries():
                if code > 250:
                    raise ValueError("too many finding components for the tissue code table")
                codes[key] = code
                self._finding_hu[code] = (hu, contrast_delta)
                code += 1
            f.bind(codes)
        transparent = [c for f in self.findings for c in f.transparent_codes()]
        parenchyma = [c for f in self.findings if f.layer is Layer.PARENCHYMA for c in f.codes.values()]
        nodules = [c for f in self.findings if f.layer is Layer.NODULE for c in f.codes.values()]
        self.vessel_ok = lut((T.LUNG_R, T.LUNG_L, T.MED_FAT, *transparent))
        self.airway_wall_ok = lut((T.LUNG_R, T.LUNG_L, T.VESSEL, *parenchyma))
        self.airway_lumen_ok = lut((T.LUNG_R, T.LUNG_L, T.VESSEL, T.AIRWAY_WALL, T.MED_FAT, *parenchyma))
        lungish = (T.LUNG_R, T.LUNG_L, T.VESSEL, T.AIRWAY_WALL, T.AIRWAY_LUMEN, *parenchyma, *nodules)
        self.lungish_codes: tuple[int, ...] = tuple(int(c) for c in lungish)
        self.lungish = lut(lungish)
        self.is_lung = lut(LUNG_CODES)
        self._tables: dict[bool, np.ndarray] = {}

    # ----- construction helpers ------------------------------------------------------------------------
    @property
    def seed(self) -> int:
        return self.base_anatomy.seed

    @property
    def finding_names(self) -> list[str]:
        """Planted finding names, each once, in planting order."""
        return list(dict.fromkeys(f.name for f in self.findings))

    def without_findings(self) -> Phantom:
        """The negative twin: same patient, grid-independent noise stream and vessel trees, nothing planted."""
        return Phantom(self.base_anatomy)

    def with_findings(self, findings: Sequence[PlantedFinding]) -> Phantom:
        """The same patient with ``findings`` added to the ones already planted."""
        return Phantom(self.base_anatomy, (*self.findings, *findings))

    def hu_table(self, contrast: bool = False) -> np.ndarray:
        """HU of every tissue code (float32[256]), with or without IV contrast."""
        table = self._tables.get(contrast)
        if table is None:
            a = self.anatomy
            table = base_hu_table(
                fat=a.fat_hu,
                muscle=a.muscle_hu,
                blood=a.blood_hu,
                lung=a.lung_hu,
                cortical=a.cortical_hu,
                marrow=a.marrow_hu,
                myocardium=a.myocardium_hu,
                liver=a.liver_hu,
                table=a.table_hu,
                contrast_boost=a.contrast_boost if contrast else 0.0,
            )
            table[int(T.PERICARDIAL_FLUID)] = a.pericardial_fluid_hu
            for c, (hu, delta) in self._finding_hu.items():
                table[c] = hu + (delta if contrast else 0.0)
            self._tables[contrast] = table
        return table

    # ----- rendering ------------------------------------------------------------------------------------
    def canvas(self, x: np.ndarray, y: np.ndarray, z: float, *, record: bool = False) -> Canvas:
        """Paint the slice at ``z`` on pixel centres ``x``/``y`` and return the canvas (codes + masks)."""
        cv = Canvas(x, y, z, record=record)
        self.paint(cv)
        return cv

    def hu_slice(self, cv: Canvas, contrast: bool = False) -> np.ndarray:
        """Noise-free HU (float32) of a painted canvas, with the gentle antero-posterior lung gradient."""
        hu = self.hu_table(contrast)[cv.t]
        a = self.anatomy
        lung = self.is_lung[cv.t]
        if lung.any():
            grad = (a.lung_grad * 0.5) * np.clip((cv.y - self.geo.cav_y) / self.geo.cav_b, -1.0, 1.0).astype(
                np.float32
            )
            hu += lung * grad[:, None]
        return hu

    def paint(self, cv: Canvas) -> None:
        """Paint everything at ``cv.z``: base anatomy first, then findings by layer."""
        layers: dict[Layer, list[PlantedFinding]] = {}
        for f in self.findings:
            lo, hi = f.z_extent()
            if lo - 1e-6 <= cv.z <= hi + 1e-6:
                layers.setdefault(f.layer, []).append(f)

        def run(layer: Layer) -> None:
            for f in layers.get(layer, ()):
                f.paint(cv, self)

        self._paint_outside(cv)
        self._paint_body(cv)
        self._paint_cavity(cv)
        self._paint_heart(cv)
        self._paint_mediastinum(cv)
        self._paint_spine(cv)
        self._paint_ribs_and_sternum(cv)
        run(Layer.PARENCHYMA)
        self.vessel_tree.paint(cv, T.VESSEL, self.vessel_ok)
        self.airway_wall.paint(cv, T.AIRWAY_WALL, self.airway_wall_ok)
        self.airway_tree.paint(cv, T.AIRWAY_LUMEN, self.airway_lumen_ok)
        run(Layer.NODULE)
        run(Layer.PLEURAL)
        run(Layer.MEDIASTINAL)
        run(Layer.RECORD)

    # ----- base anatomy, in painting order ---------------------------------------------------------------
    def _paint_outside(self, cv: Canvas) -> None:
        """The patient table: a thin curved plate (shell + foam core) posterior to the body, not touching it."""
        a = self.anatomy
        top = a.body_b + a.table_gap
        half_w = 230.0
        w = cv.win(-half_w, half_w, top, top + a.table_thick + 12.0)
        if w is None:
            return
        x, y = cv.xs(w), cv.ys(w)
        curve = top + 12.0 * (x / half_w) ** 2  # a shallow cradle, rising toward the centre-line
        depth = y - curve
        plate = (depth >= 0) & (depth <= a.table_thick)
        sub = cv.t[w]
        sub[plate] = T.TABLE
        core = (depth >= 2.0) & (depth <= a.table_thick - 2.0) & (np.abs(x) < half_w - 6.0)
        sub[core] = T.TABLE_CORE

    def _paint_body(self, cv: Canvas) -> None:
        a, g, z = self.anatomy, self.geo, cv.z
        ba, bb = g.body_ab(z)
        w = cv.win(-ba, ba, -bb, bb)
        if w is None:
            return
        sub = cv.t[w]
        lvl = superellipse_level(cv, w, 0.0, 0.0, ba, bb, a.body_p)
        sub[lvl <= 1.0] = T.SKIN
        lvl = superellipse_level(cv, w, 0.0, 0.0, ba - 1.5, bb - 1.5, a.body_p)
        sub[lvl <= 1.0] = T.SUBCUT_FAT
        lvl = superellipse_level(cv, w, 0.0, 0.0, ba - a.fat_mm, bb - a.fat_mm, a.body_p)
        sub[lvl <= 1.0] = T.MUSCLE
        # a layer of fat between the chest-wall muscles and the ribs
        ca, cb = g.cavity_ab(z)
        lvl = superellipse_level(cv, w, 0.0, g.cav_y, ca + 13.0, cb + 13.0, g.cav_p)
        sub[(lvl <= 1.0) & (cv.ys(w) < g.spine_y)] = T.SUBCUT_FAT
        # paraspinal muscles
        for sx in (-1.0, 1.0):
            hit = ellipse(cv, sx * (g.vert_r + 12.0), g.canal_y + 8.0, 26.0, 20.0)
            if hit:
                cv.fill(hit[0], hit[1], T.MUSCLE, lut((T.SUBCUT_FAT, T.MUSCLE)))

    def _paint_cavity(self, cv: Canvas) -> None:
        """Cavity fill (mediastinal fat above, abdomen below the diaphragm), lungs, liver, stomach, spleen."""
        g, z = self.geo, cv.z
        ca, cb = g.cavity_ab(z)
        w = cv.win(-ca, ca, g.cav_y - cb, g.cav_y + cb)
        if w is None:
            return
        x, y = cv.xs(w), cv.ys(w)
        sub = cv.t[w]
        inside = g.cavity_level(x, y, z) <= 1.0
        right = x < g.x_mid
        below = np.where(right, z < g.dome_z(x, y, "R"), z < g.dome_z(x, y, "L"))
        sub[inside] = T.MED_FAT
        sub[inside & below] = T.ABDOMEN
        liver = inside & below & (x < g.x_mid + 30.0 + 0.3 * (y - g.cav_y))
        sub[liver] = T.LIVER
        for side, code in (("R", T.LUNG_R), ("L", T.LUNG_L)):
            sub[g.lung_side(x, y, z, side) & inside] = code
        # stomach (gas anteriorly, fluid dependent) and spleen under the left dome
        hit = g.stomach.raster(cv)
        if hit:
            painted = cv.fill(hit[0], hit[1], T.STOMACH_WALL, _ABDOMEN_OK)
            inner = g.stomach.scaled(0.9).raster(cv)
            if inner:
                wi, mi = inner
                yy = cv.ys(wi)
                level = g.stomach.centre[1] - 0.1 * g.stomach.semi[1]
                cv.fill(wi, mi & (yy < level), T.STOMACH_GAS, lut((T.STOMACH_WALL,)))
                cv.fill(wi, mi & (yy >= level), T.STOMACH_FLUID, lut((T.STOMACH_WALL,)))
            del painted
        hit = g.spleen.raster(cv)
        if hit:
            cv.fill(hit[0], hit[1], T.SPLEEN, _ABDOMEN_OK)

    def _paint_heart(self, cv: Canvas) -> None:
        g = self.geo
        for ell, code, ok in (
            (g.pericardium, T.PERICARDIUM, _HEART_OK),
            (g.pericardial_fluid, T.PERICARDIAL_FLUID, lut((T.PERICARDIUM,))),
            (g.epicardial, T.EPICARDIAL_FAT, lut((T.PERICARDIUM, T.PERICARDIAL_FLUID))),
            (g.heart, T.MYOCARDIUM, lut((T.EPICARDIAL_FAT,))),
        ):
            if ell is None:
                continue
            hit = ell.raster(cv)
            if hit is None:
                if code is T.PERICARDIUM:
                    return
                continue
            cv.fill(hit[0], hit[1], code, ok)
        for ch in g.chambers:
            hit = ch.raster(cv)
            if hit:
                cv.fill(hit[0], hit[1], T.HEART_BLOOD, _IN_HEART)
        g.coronaries.paint(cv, T.CORONARY, _CORONARY_OK)

    def _paint_mediastinum(self, cv: Canvas) -> None:
        g = self.geo
        g.pulmonary_veins.paint(cv, T.PULM_ARTERY, _VESSEL_OK)
        g.pulmonary_arteries.paint(cv, T.PULM_ARTERY, _VESSEL_OK)
        g.aorta.paint(
            cv,
            T.AORTA,
            lut(
                (
                    *_CAVITY,
                    T.PERICARDIUM,
                    T.EPICARDIAL_FAT,
                    T.PERICARDIAL_FLUID,
                    T.MYOCARDIUM,
                    T.PULM_ARTERY,
                    T.HEART_BLOOD,
                    T.MUSCLE,
                )
            ),
        )
        g.arch_branches.paint(cv, T.AORTA, _VESSEL_OK)
        g.svc.paint(cv, T.VESSEL, _VESSEL_OK)
        g.ivc.paint(cv, T.VESSEL, _VESSEL_OK)
        g.esophagus.paint(cv, T.ESOPHAGUS, _ESO_OK)
        g.esophagus_air.paint(cv, T.ESOPHAGUS_AIR, _ESO_AIR_OK)
        r_wall = 1.8
        g.trachea_lumen.widened(r_wall).paint(cv, T.AIRWAY_WALL, _AIRWAY_WALL_OK)
        g.main_bronchi_lumen.widened(r_wall).paint(cv, T.AIRWAY_WALL, _AIRWAY_WALL_OK)
        g.trachea_lumen.paint(cv, T.AIRWAY_LUMEN, _AIRWAY_LUMEN_OK)
        g.main_bronchi_lumen.paint(cv, T.AIRWAY_LUMEN, _AIRWAY_LUMEN_OK)

    def _paint_spine(self, cv: Canvas) -> None:
        """Vertebral body (cortex + marrow, discs every level), canal with cord, lamina, spinous and transverse processes."""
        g, z = self.geo, cv.z
        r = g.vert_r
        phase = (z - self.anatomy.z_carina) % VERTEBRA_PITCH
        disc = phase < DISC_MM
        hit = ellipse(cv, 0.0, g.spine_y, r, r * 0.92)
        if hit:
            w, m = hit
            sub = cv.t[w]
            if disc:
                sub[m] = T.DISC
            else:
                sub[m] = T.CORTICAL
                inner = ellipse(cv, 0.0, g.spine_y, r - 2.5, r * 0.92 - 2.5)
                if inner:
                    cv.t[inner[0]][inner[1]] = T.MARROW
        if disc:
            hit = ellipse(cv, 0.0, g.canal_y, 8.0, 8.0)
            if hit:
                cv.fill(hit[0], hit[1], T.CORD)
            return
        upper = phase > 0.5 * (VERTEBRA_PITCH + DISC_MM)
        pw = cv.win(-38.0, 38.0, g.spine_y + r - 4.0, g.canal_y + 42.0)
        if pw is None:
            return
        w = pw
        x, y = cv.xs(w), cv.ys(w)
        sub = cv.t[w]
        rr = (x / 1.0) ** 2 + (y - g.canal_y) ** 2
        ring = (rr <= 14.0**2) & (y > g.spine_y + r - 4.0)
        spinous = (np.abs(x) <= 4.0) & (y >= g.canal_y) & (y <= g.canal_y + 40.0 - 0.6 * np.abs(x))
        bone = ring | spinous
        if upper:
            bone |= (np.abs(x) >= 8.0) & (np.abs(x) <= 36.0) & (np.abs(y - g.canal_y + 3.0) <= 5.0)
        sub[bone] = T.CORTICAL
        sub[rr <= 8.0**2] = T.CORD

    def _paint_ribs_and_sternum(self, cv: Canvas) -> None:
        g, z = self.geo, cv.z
        ca, cb = g.cavity_ab(z)
        w = cv.win(-ca - 12.0, ca + 12.0, g.cav_y - cb - 12.0, g.cav_y + cb + 12.0)
        if w is not None and g.z_rib_bottom - RIB_DESCENT < z < g.z_rib_top:
            x, y = cv.xs(w), cv.ys(w)
            outer = superellipse_level(cv, w, 0.0, g.cav_y, ca + 9.0, cb + 9.0, g.cav_p) <= 1.0
            inner = superellipse_level(cv, w, 0.0, g.cav_y, ca + 0.5, cb + 0.5, g.cav_p) <= 1.0
            band = outer & ~inner
            rows, cols = np.nonzero(band)
            if rows.size:
                px = x[0, cols]
                py = y[rows, 0]
                phi = np.arctan2(py - g.cav_y, px)
                h = (1.0 - np.sin(phi)) * 0.5  # 0 posterior .. 1 anterior
                zeff = z + RIB_DESCENT * h  # height of this rib at its posterior end
                ph = (zeff - g.z_rib_bottom) % RIB_PITCH
                rib = (ph < RIB_HEIGHT) & (zeff < g.z_rib_top) & (zeff > g.z_rib_bottom)
                rib &= ~((h < 0.2) & (np.abs(px) < g.vert_r + 4.0))  # vertebra, not rib
                anterior = (h > 0.8) & (np.abs(px) < 48.0)
                cart = rib & anterior
                rib &= ~anterior
                rib &= np.abs(px) >= 22.0
                mid_in = (
                    superellipse_level(cv, w, 0.0, g.cav_y, ca + 2.7, cb + 2.7, g.cav_p)[rows, cols] > 1.0
                )
                mid_out = (
                    superellipse_level(cv, w, 0.0, g.cav_y, ca + 6.8, cb + 6.8, g.cav_p)[rows, cols] <= 1.0
                )
                marrow = rib & mid_in & mid_out & (ph > 2.0) & (ph < RIB_HEIGHT - 2.0)
                sub = cv.t[w]
                sub[rows[rib], cols[rib]] = T.CORTICAL
                sub[rows[marrow], cols[marrow]] = T.MARROW
                sub[rows[cart], cols[cart]] = T.CARTILAGE
        top, bottom = g.z_sternum
        if bottom < z < top:
            t = (z - bottom) / (top - bottom)
            half_w = 13.0 + 10.0 * max(0.0, t - 0.75) / 0.25
            cy = g.cav_y - cb - 5.0
            hit = ellipse(cv, 0.0, cy, half_w, 6.5)
            if hit:
                cv.fill(hit[0], hit[1], T.CORTICAL)
                core = ellipse(cv, 0.0, cy, half_w - 2.2, 4.3)
                if core:
                    cv.fill(core[0], core[1], T.MARROW)


def _build_trees(g: BodyGeometry, seed: int) -> tuple[Tubes, Tubes]:
    """Pulmonary vessel trees (two per lung) and airway trees (one per lung) from lung target points."""
    rng = np.random.default_rng([int(seed), 7])
    a = g.a
    zlo, zhi = min(g.z_dome_r, g.z_dome_l) - 60.0, a.z_apex
    vessels, airways = [], []
    for side in ("R", "L"):
        n = 2400
        pts = np.column_stack(
            [
                rng.uniform(-g.cav_a, g.cav_a, n) if side == "R" else rng.uniform(-g.cav_a, g.cav_a, n),
                rng.uniform(g.cav_y - g.cav_b, g.cav_y + g.cav_b, n),
                rng.uniform(zlo, zhi, n),
            ]
        )
        pts = pts[g.lung_points(pts, side)]
        # keep away from the heart and the pleura-free mediastinum
        pts = pts[~g.pericardium.scaled(1.08).contains(pts)]
        pts = pts[:700]
        hil = g.hilum[side]
        sgn = -1.0 if side == "R" else 1.0
        half = len(pts) // 2
        order = rng.permutation(len(pts))
        art, vein = pts[order[:half]], pts[order[half:]]
        vessels.append(grow_tree(hil + [0.0, -4.0, 6.0], art, 6.5, rng, depth=7, shrink=0.8, min_r=1.1))
        vessels.append(
            grow_tree(hil + [sgn * 2.0, 10.0, -16.0], vein, 6.0, rng, depth=7, shrink=0.8, min_r=1.1)
        )
        airway_root = hil + [-sgn * 6.0, 4.0, 4.0]
        airways.append(
            grow_tree(airway_root, pts[order[: min(len(pts), 400)]], 4.8, rng, depth=4, shrink=0.8, min_r=1.6)
        )
    log.debug("trees: %d vessel and %d airway segments", sum(map(len, vessels)), sum(map(len, airways)))
    return Tubes.concat(vessels), Tubes.concat(airways)


def replace_anatomy(anatomy: Anatomy, **changes: Any) -> Anatomy:
    """``dataclasses.replace`` for findings (kept here so findings need not import dataclasses)."""
    return replace(anatomy, **changes)


__all__ = ["Ellipsoid", "Layer", "Phantom", "replace_anatomy"]
