"""The base chest phantom: per-patient parameters (sampled from a seed) and the analytic shapes they imply.

All coordinates are DICOM LPS millimetres (+x patient left, +y posterior, +z superior) for a supine
patient, so "dependent" is +y. ``Anatomy`` holds only numbers (it is what a finding modifies, e.g. the
heart size for cardiomegaly); ``BodyGeometry`` turns them into shapes (ellipsoids, tubes, surfaces).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from synth.raster import Ellipsoid, Tubes

log = logging.getLogger(__name__)

#: Lower end of the phantom (mm); tubes that run "down into the abdomen" stop here.
Z_BOTTOM = -900.0
Z_TOP = 900.0
#: Cardiothoracic ratio of the reference heart that ``Anatomy.heart_ctr`` stretches.
REF_CTR = 0.43


@dataclass(frozen=True)
class Anatomy:
    """Per-patient numbers of the base phantom (mm, HU). Findings return modified copies."""

    seed: int
    sex: str
    age: int
    height_cm: float
    weight_kg: float
    # body and thoracic cage
    body_a: float
    body_b: float
    body_p: float
    fat_mm: float
    wall_lat: float
    wall_ant: float
    wall_post: float
    # cranio-caudal landmarks
    z_apex: float
    z_carina: float
    z_dome_r: float
    z_dome_l: float
    # heart and vessels
    heart_ctr: float
    heart_shift_x: float
    heart_shift_y: float
    epicardial_fat_mm: float
    aorta_r: float
    trachea_r: float
    vert_r: float
    # table
    table_gap: float
    table_thick: float
    # attenuation
    fat_hu: float
    muscle_hu: float
    blood_hu: float
    lung_hu: float
    lung_grad: float
    cortical_hu: float
    marrow_hu: float
    myocardium_hu: float
    liver_hu: float
    table_hu: float
    contrast_boost: float
    noise_sd: float
    # set by findings (0 in the base phantom)
    pericardial_fluid_mm: float = 0.0
    pericardial_fluid_hu: float = 10.0
    dome_raise_r: float = 0.0
    dome_raise_l: float = 0.0

    @property
    def scan_centre_z(self) -> float:
        """Middle of apex .. deepest costophrenic recess: the default centre of an axial chest scan."""
        return 0.5 * (self.z_apex + 15.0 + min(self.z_dome_r, self.z_dome_l) - 62.0)

    @property
    def lung_z_range(self) -> tuple[float, float]:
        """Lowest recess .. apex (mm)."""
        return (min(self.z_dome_r, self.z_dome_l) - 62.0, self.z_apex)


def sample_anatomy(seed: int) -> Anatomy:
    """Draw a patient from ``seed`` (the ranges are documented in docs/synthetic-data.md)."""
    rng = np.random.default_rng([int(seed), 0])
    u = rng.uniform
    sex = "M" if rng.random() < 0.5 else "F"
    size = u(0.0, 1.0)  # one "body habitus" factor drives width, depth and weight together
    body_a = 140.0 + 40.0 * size + u(-6, 6)
    body_b = 112.0 + 26.0 * size + u(-5, 5)
    fat_mm = 6.0 + 16.0 * size + u(-3, 3)
    z_apex = u(135.0, 160.0)
    z_carina = z_apex - u(92.0, 112.0)
    z_dome_r = z_carina - u(108.0, 135.0)
    height = (172.0 if sex == "M" else 162.0) + u(-12, 12)
    weight = 50.0 + 55.0 * size + u(-6, 6)
    return Anatomy(
        seed=int(seed),
        sex=sex,
        age=int(rng.integers(30, 88)),
        height_cm=round(height, 1),
        weight_kg=round(weight, 1),
        body_a=body_a,
        body_b=body_b,
        body_p=u(2.3, 2.8),
        fat_mm=fat_mm,
        wall_lat=fat_mm + u(12.0, 18.0),
        wall_ant=fat_mm + u(10.0, 15.0),
        wall_post=u(50.0, 62.0),
        z_apex=z_apex,
        z_carina=z_carina,
        z_dome_r=z_dome_r,
        z_dome_l=z_dome_r - u(8.0, 20.0),
        heart_ctr=u(0.38, 0.47),
        heart_shift_x=u(12.0, 26.0),
        heart_shift_y=u(-8.0, 8.0),
        epicardial_fat_mm=u(3.0, 6.0),
        aorta_r=u(13.0, 16.5),
        trachea_r=u(8.0, 10.5),
        vert_r=u(17.0, 21.0),
        table_gap=u(8.0, 25.0),
        table_thick=u(7.0, 11.0),
        fat_hu=u(-112.0, -88.0),
        muscle_hu=u(42.0, 58.0),
        blood_hu=u(35.0, 50.0),
        lung_hu=u(-875.0, -835.0),
        lung_grad=u(20.0, 45.0),
        cortical_hu=u(550.0, 750.0),
        marrow_hu=u(170.0, 270.0),
        myocardium_hu=u(38.0, 52.0),
        liver_hu=u(52.0, 66.0),
        table_hu=u(250.0, 450.0),
        contrast_boost=u(220.0, 290.0),
        noise_sd=u(10.0, 22.0),
    )


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _widest_slice_half_width(e: Ellipsoid) -> float:
    """Half the x-extent of the ellipsoid's axial cross-section through its centre, which is its widest
    axial slice: the section at height dz is the central one shrunk by 1 - c·dz²."""
    a2 = e.quadric()[:2, :2]
    return float(math.sqrt(np.linalg.inv(a2)[0, 0]))


def _wrap(angle: float) -> float:
    return (angle + math.pi) % (2 * math.pi) - math.pi


class BodyGeometry:
    """Analytic shapes of one ``Anatomy``: body, cavity, lungs, diaphragm, heart, vessels, spine, ribs.

    Functions of (x, y, z) take broadcastable arrays, so the same code evaluates a (1, W) x (H, 1)
    slice window (separable, fast) and a flat list of points (for sampling finding positions).
    """

    def __init__(self, a: Anatomy) -> None:
        self.a = a
        self.x_mid = 4.0  # mediastinal midline (slightly left of the body axis)
        # thoracic cavity (inside the ribs): a superellipse, anterior wall thinner than posterior
        self.cav_a = a.body_a - a.wall_lat
        self.cav_b = (2.0 * a.body_b - a.wall_ant - a.wall_post) / 2.0
        self.cav_y = -a.body_b + a.wall_ant + self.cav_b
        self.cav_p = 2.2
        # spine
        self.vert_r = a.vert_r
        self.spine_y = self.cav_y + self.cav_b - 0.8 * a.vert_r
        self.spine_front = self.spine_y - a.vert_r
        self.canal_y = self.spine_y + a.vert_r + 9.0
        # landmarks
        self.z_dome_r = a.z_dome_r + a.dome_raise_r
        self.z_dome_l = a.z_dome_l + a.dome_raise_l
        self.dome_x = (self.x_mid - 0.45 * self.cav_a, self.x_mid + 0.45 * self.cav_a)
        self.dome_y = self.cav_y - 0.25 * self.cav_b
        self.apex_x = (self.x_mid - 0.42 * self.cav_a, self.x_mid + 0.42 * self.cav_a)
        self.apex_y = self.cav_y + 0.15 * self.cav_b
        self.z_rib_top = a.z_apex + 12.0
        self.z_rib_bottom = min(self.z_dome_r, self.z_dome_l) - 75.0
        self.z_sternum = (a.z_carina + 70.0, min(self.z_dome_r, self.z_dome_l) + 25.0)
        # airway / oesophagus line
        self.eso_y = self.spine_front - 11.0
        self.trachea_y = self.eso_y - 9.0 - a.trachea_r
        self.hilum = {
            "R": np.array(
                [self.x_mid - 0.33 * self.cav_a, self.cav_y + 0.08 * self.cav_b, a.z_carina - 22.0]
            ),
            "L": np.array(
                [self.x_mid + 0.34 * self.cav_a, self.cav_y + 0.12 * self.cav_b, a.z_carina - 14.0]
            ),
        }
        self._build_heart()
        self._build_vessels()
        self._build_abdomen()

    # ----- body and cavity -------------------------------------------------------------------------
    def body_ab(self, z: Any) -> tuple[Any, Any]:
        """Body half-width/half-depth at ``z``: constant over the chest, narrowing to the neck above the apex."""
        t = np.clip((z - (self.a.z_apex + 35.0)) / 70.0, 0.0, 1.0)
        s = t * t * (3 - 2 * t)
        return self.a.body_a * (1.0 - 0.45 * s), self.a.body_b * (1.0 - 0.2 * s)

    def cavity_ab(self, z: Any) -> tuple[Any, Any]:
        """Cavity half-axes: the cage narrows from the carina up to the apex (cone-shaped upper thorax).

        ``z`` may be a scalar or an array (point sampling)."""
        a = self.a
        t = np.clip((z - a.z_carina) / (a.z_apex - a.z_carina), 0.0, 1.0)
        lat = 1.0 - 0.22 * t**1.5
        body_a, _ = self.body_ab(z)
        return np.minimum(self.cav_a * lat, body_a - 12.0), self.cav_b * (1.0 - 0.12 * t**1.5)

    def inner_thoracic_width(self, z: float) -> float:
        return 2.0 * float(self.cavity_ab(z)[0])

    def cavity_level(self, x: Any, y: Any, z: Any) -> Any:
        ca, cb = self.cavity_ab(z)
        return (np.abs(x) / ca) ** self.cav_p + (np.abs(y - self.cav_y) / cb) ** self.cav_p

    def posterior_wall_y(self, x: Any, z: float) -> Any:
        """y of the posterior cavity wall above ``x`` (where dependent pleural fluid collects)."""
        ca, cb = self.cavity_ab(z)
        rel = np.clip(np.abs(x) / ca, 0.0, 1.0) ** self.cav_p
        return self.cav_y + cb * (1.0 - rel) ** (1.0 / self.cav_p)

    # ----- lungs -----------------------------------------------------------------------------------
    def dome_z(self, x: Any, y: Any, side: str) -> Any:
        """Height of the diaphragm dome under lung ``side`` ('R' or 'L'): lowest posteriorly and laterally."""
        i = 0 if side == "R" else 1
        top = self.z_dome_r if side == "R" else self.z_dome_l
        fx = 55.0 * ((x - self.dome_x[i]) / (0.6 * self.cav_a)) ** 2
        fy = 40.0 * ((y - self.dome_y) / self.cav_b) ** 2
        return top - fx - fy

    def apex_z(self, x: Any, y: Any, side: str) -> Any:
        i = 0 if side == "R" else 1
        fx = 60.0 * ((x - self.apex_x[i]) / (0.55 * self.cav_a)) ** 2
        fy = 40.0 * ((y - self.apex_y) / self.cav_b) ** 2
        return self.a.z_apex - fx - fy

    def mediastinum_half_width(self, y: Any, z: Any) -> Any:
        """Half-width of the fat band between the lungs (narrow anterior junction, wide at the spine)."""
        front = self.cav_y - self.cav_b
        t = np.clip((y - front) / (self.spine_front - front), 0.0, 1.2)
        w = np.interp(
            t, [0.0, 0.2, 0.55, 0.85, 1.0, 1.2], [5.0, 12.0, 22.0, 20.0, self.vert_r + 6.0, self.vert_r + 6.0]
        )
        above = np.asarray(z) > self.a.z_carina + 10.0  # upper mediastinum is wider (great vessel branches)
        return w + np.where(above, 8.0, 0.0)

    def lung_side(self, x: Any, y: Any, z: Any, side: str) -> Any:
        """Where lung ``side`` would be with no organs painted over it (bool, broadcast of x and y)."""
        inside = self.cavity_level(x, y, z) <= 1.0
        hw = self.mediastinum_half_width(y, z)
        medial = (x < self.x_mid - hw) if side == "R" else (x > self.x_mid + hw)
        return inside & medial & (z > self.dome_z(x, y, side)) & (z < self.apex_z(x, y, side))

    def lung_points(self, pts: np.ndarray, side: str) -> np.ndarray:
        """``lung_side`` for points (N, 3) with their own z (slow path for sampling)."""
        pts = np.asarray(pts, dtype=np.float64).reshape(-1, 3)
        return np.asarray(self.lung_side(pts[:, 0], pts[:, 1], pts[:, 2], side), dtype=bool)

    # ----- heart -----------------------------------------------------------------------------------
    def _build_heart(self) -> None:
        a = self.a
        axis = _unit(np.array([0.62, -0.45, -0.62]))  # base -> apex: left, anterior, inferior
        e1 = _unit(np.cross(axis, [0.0, 0.0, 1.0]))
        e2 = np.cross(axis, e1)
        rot = np.stack([axis, e1, e2], axis=1)
        z_mid = 0.5 * (self.z_dome_r + self.z_dome_l)
        itw_half = self.inner_thoracic_width(z_mid + 40.0) / 2.0
        # A reference heart (CTR 0.43) sized to fit between the sternum and the spine (squeezing its AP
        # axis if needed), then stretched in patient space to the wanted CTR: an enlarged heart grows
        # mostly transversely (x by the full factor, y by its 4th root, z by its cube root).
        max_hy = 0.5 * (self.spine_front - 6.0 - (self.cav_y - self.cav_b + 8.0))
        f = a.heart_ctr / REF_CTR
        fy, fz = f**0.25, f ** (1.0 / 3.0)
        for ap in np.linspace(1.0, 0.45, 12):
            unit = Ellipsoid((0.0, 0.0, 0.0), (1.2, 0.92 * ap, 0.85), rot)
            scale = REF_CTR * itw_half / _widest_slice_half_width(unit)
            if unit.half_extent()[1] * scale * fy <= max_hy:
                break
        semi0 = np.array([1.2, 0.92 * ap, 0.85]) * scale
        ref = Ellipsoid((0.0, 0.0, 0.0), tuple(semi0), rot)
        fx = a.heart_ctr * itw_half / _widest_slice_half_width(ref)
        stretch = np.diag([fx, fy, fz])
        self.heart_stretch = stretch
        sinv = np.linalg.inv(stretch)
        quad = sinv @ ref.quadric() @ sinv
        evals, evecs = np.linalg.eigh(quad)
        semi = tuple(float(v) for v in 1.0 / np.sqrt(evals))
        rot_s = evecs
        hx, hy, hz = Ellipsoid((0.0, 0.0, 0.0), semi, rot_s).half_extent()
        cx = self.x_mid + a.heart_shift_x + 0.3 * max(0.0, hx - 55.0)
        cy = 0.5 * (self.spine_front - 6.0 + (self.cav_y - self.cav_b + 8.0)) + a.heart_shift_y * ap - 4.0
        cz = min(self.z_dome_r, self.z_dome_l) - 12.0 + hz
        self.heart = Ellipsoid((cx, cy, cz), semi, rot_s)
        self.heart_half = np.array([hx, hy, hz])
        epi = a.epicardial_fat_mm

        def grow(mm: float) -> Ellipsoid:
            return Ellipsoid((cx, cy, cz), tuple(v + mm for v in semi), rot_s)

        self.epicardial = grow(epi)
        self.pericardial_fluid = grow(epi + a.pericardial_fluid_mm) if a.pericardial_fluid_mm > 0 else None
        self.pericardium = grow(epi + a.pericardial_fluid_mm + 2.0)
        c = np.array([cx, cy, cz])
        h = self.heart_half

        def cham(off: tuple[float, float, float], sc: tuple[float, float, float]) -> Ellipsoid:
            return Ellipsoid(tuple(c + np.array(off) * h), tuple(np.array(sc) * h))

        self.chambers = [
            cham((0.22, 0.02, -0.18), (0.42, 0.40, 0.45)),  # LV
            cham((-0.12, -0.38, -0.12), (0.40, 0.26, 0.45)),  # RV
            cham((0.02, 0.45, 0.38), (0.36, 0.24, 0.30)),  # LA
            cham((-0.47, 0.08, 0.18), (0.27, 0.34, 0.40)),  # RA
        ]
        self.aortic_root = c + np.array([-0.12, -0.12, 0.72]) * h
        self.pa_root = c + np.array([0.08, -0.55, 0.62]) * h
        self.ra_top = c + np.array([-0.62, 0.05, 0.55]) * h
        # coronary arteries: curves in the epicardial fat, built on the reference heart in its own frame
        # (long axis first) and stretched like the heart
        sc = semi0 + epi * 0.55 / np.sqrt(fx * fy)

        def on_surface(v: np.ndarray) -> np.ndarray:
            return c + stretch @ (rot @ (sc * _unit(v)))

        def local_angle(world_dir: np.ndarray) -> float:
            loc = rot.T @ world_dir
            return math.atan2(loc[2], loc[1])

        ant = local_angle(np.array([0.0, -1.0, 0.0]))
        right = local_angle(np.array([-1.0, 0.0, 0.0]))
        sgn = 1.0 if _wrap(right - ant) > 0 else -1.0
        s0 = -0.45  # atrioventricular groove, towards the base

        def ring(phi: float, s: float = s0) -> np.ndarray:
            r = math.sqrt(1 - s * s)
            return on_surface(np.array([s, r * math.cos(phi), r * math.sin(phi)]))

        rca = [ring(ant - sgn * 0.25 + sgn * t) for t in np.linspace(0.0, math.radians(200), 14)]
        pda_phi = ant - sgn * 0.25 + sgn * math.radians(200)
        rca += [ring(pda_phi, s) for s in np.linspace(s0 + 0.12, 0.75, 7)]
        lcx = [ring(ant + sgn * 0.35 - sgn * t) for t in np.linspace(0.0, math.radians(150), 11)]
        lad = [ring(ant + sgn * 0.15, s) for s in np.linspace(s0, 0.95, 12)]
        lm = [self.aortic_root + np.array([6.0, 0.0, -4.0]), ring(ant + sgn * 0.25)]
        self.coronary_paths = {
            "RCA": np.array(rca),
            "LAD": np.array(lad),
            "LCX": np.array(lcx),
            "LM": np.array(lm),
        }
        self.coronaries = Tubes.concat(
            [
                Tubes.polyline(self.coronary_paths["RCA"], np.linspace(2.0, 1.3, len(rca))),
                Tubes.polyline(self.coronary_paths["LAD"], np.linspace(1.9, 1.2, len(lad))),
                Tubes.polyline(self.coronary_paths["LCX"], np.linspace(1.8, 1.3, len(lcx))),
                Tubes.polyline(self.coronary_paths["LM"], 2.2),
            ]
        )

    @property
    def heart_width(self) -> float:
        """Transverse width of the heart on its widest axial slice (the one through its centre)."""
        return 2.0 * _widest_slice_half_width(self.heart)

    @property
    def cardiothoracic_ratio(self) -> float:
        """Heart width over the inner thoracic width on the axial slice of maximal heart width (analytic)."""
        return self.heart_width / self.inner_thoracic_width(float(self.heart.centre[2]))

    # ----- great vessels, airways, oesophagus --------------------------------------------------------
    def _build_vessels(self) -> None:
        a = self.a
        xm = self.x_mid
        r_asc, r_desc = a.aorta_r, 0.8 * a.aorta_r
        z_arch = a.z_carina + 12.0
        asc_top = np.array([xm - 16.0, self.cav_y - 0.38 * self.cav_b, z_arch])
        desc_x = xm + self.vert_r + r_desc * 0.55
        desc_y = self.spine_y - 0.35 * self.vert_r
        desc_top = np.array([desc_x, desc_y, z_arch])
        root = self.aortic_root
        asc = [root, root + np.array([-4.0, -6.0, 20.0]), asc_top]
        # the arch runs posteriorly and to the LEFT of the trachea (a quadratic Bezier in the axial plane)
        ctrl = np.array([xm + a.trachea_r + r_asc + 24.0, self.trachea_y - 8.0])
        arch = []
        for t in np.linspace(0.0, 1.0, 13):
            xy = (1 - t) ** 2 * asc_top[:2] + 2 * t * (1 - t) * ctrl + t**2 * desc_top[:2]
            arch.append(np.array([xy[0], xy[1], z_arch + 24.0 * math.sin(math.pi * t)]))
        desc = [
            desc_top,
            np.array([desc_x + 2.0, desc_y - 4.0, self.z_dome_l - 30.0]),
            np.array([xm + 4.0, self.spine_y - self.vert_r - 8.0, Z_BOTTOM]),
        ]
        self.aorta_path = np.array(asc + arch[1:] + desc[1:])
        radii = [r_asc] * len(asc) + list(np.linspace(r_asc, r_desc, len(arch) - 1)) + [r_desc, r_desc * 0.95]
        self.aorta = Tubes.polyline(self.aorta_path, radii)
        top = Z_TOP
        pts = [arch[3], arch[6], arch[8]]
        self.arch_branches = Tubes.concat(
            [
                Tubes.polyline(
                    [pts[0], pts[0] + [-12.0, 6.0, 30.0], [xm - 34.0, self.cav_y - 0.1 * self.cav_b, top]],
                    6.5,
                ),
                Tubes.polyline(
                    [pts[1], pts[1] + [4.0, 4.0, 30.0], [xm + 14.0, self.cav_y - 0.05 * self.cav_b, top]], 4.5
                ),
                Tubes.polyline(
                    [pts[2], pts[2] + [8.0, 0.0, 28.0], [xm + 40.0, self.cav_y + 0.15 * self.cav_b, top]], 5.0
                ),
            ]
        )
        bif = np.array([xm + 6.0, self.cav_y - 0.12 * self.cav_b, a.z_carina - 10.0])
        self.pulmonary_arteries = Tubes.concat(
            [
                Tubes.polyline([self.pa_root, self.pa_root + [2.0, 6.0, 12.0], bif], 13.0),
                Tubes.polyline([bif, self.hilum["R"] + [6.0, -4.0, 4.0]], 10.0),
                Tubes.polyline([bif, self.hilum["L"] + [-6.0, -6.0, 6.0]], 10.0),
            ]
        )
        self.pulmonary_veins = Tubes.concat(
            [
                Tubes.polyline([self.chambers[2].centre, self.hilum["R"] + [4.0, 10.0, -18.0]], 7.0),
                Tubes.polyline([self.chambers[2].centre, self.hilum["L"] + [-4.0, 10.0, -16.0]], 7.0),
            ]
        )
        self.svc = Tubes.polyline(
            [
                [xm - 38.0, self.cav_y - 0.16 * self.cav_b, top],
                [xm - 38.0, self.cav_y - 0.14 * self.cav_b, z_arch],
                self.ra_top,
            ],
            9.0,
        )
        self.ivc = Tubes.polyline(
            [self.ra_top + [4.0, 20.0, -30.0], [xm - 20.0, self.spine_front - 14.0, Z_BOTTOM]], 11.0
        )
        hiatus = np.array([xm + 16.0, self.eso_y - 4.0, min(self.z_dome_r, self.z_dome_l) - 8.0])
        self.hiatus = hiatus
        eso_path = [
            [xm + 2.0, self.eso_y, top],
            [xm + 6.0, self.eso_y, a.z_carina - 30.0],
            hiatus,
            hiatus + [22.0, -14.0, -26.0],
        ]
        self.esophagus = Tubes.polyline(eso_path, 7.5)
        self.esophagus_air = Tubes.polyline(eso_path[:3], 1.8)
        carina = np.array([xm, self.trachea_y, a.z_carina])
        r = a.trachea_r
        self.carina = carina
        self.trachea_lumen = Tubes.polyline([[xm, self.trachea_y, top], carina], r)
        self.main_bronchi_lumen = Tubes.concat(
            [
                Tubes.polyline([carina, self.hilum["R"] + [8.0, 6.0, 6.0]], 0.75 * r),
                Tubes.polyline([carina, self.hilum["L"] + [-8.0, 6.0, 2.0]], 0.68 * r),
            ]
        )

    # ----- below the diaphragm -----------------------------------------------------------------------
    def _build_abdomen(self) -> None:
        zl = self.z_dome_l
        self.stomach = Ellipsoid(
            (self.x_mid + 0.45 * self.cav_a, self.cav_y - 0.05 * self.cav_b, zl - 48.0), (45.0, 38.0, 40.0)
        )
        self.spleen = Ellipsoid(
            (self.x_mid + 0.62 * self.cav_a, self.cav_y + 0.55 * self.cav_b, zl - 55.0), (28.0, 38.0, 48.0)
        )
