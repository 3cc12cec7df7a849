"""Plantable findings: each one is tied to a CT-RATE task column, randomised from the seed, and sized
to stay visible after downsampling to ~2.5 mm in-plane / ~2 mm slices.

A finding either paints its own tissue codes into the slice (nodule, opacity, effusion, ...) or
changes the anatomy (cardiomegaly enlarges the heart, pericardial effusion widens the sac,
atelectasis raises the hemidiaphragm) and then only records where it is. Every finding records its
region in the canvas, which gives ground-truth masks and voxel bounding boxes.

Sampling uses one random stream per finding name (``[seed, 1000 + index of the name]``), so adding
or removing one finding never moves another: the positive and negative twins share everything else.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from synth.anatomy import Anatomy, BodyGeometry, sample_anatomy
from synth.phantom import Layer, Phantom, replace_anatomy
from synth.raster import Canvas, Ellipsoid, Tubes, lut, rotation
from synth.tasks import FINDING_NAMES, FINDING_TASKS, normalise_finding_name
from synth.tissues import T

log = logging.getLogger(__name__)

Box = tuple[list[float], list[float]]


class FindingPlacementError(ValueError):
    """A finding cannot be placed inside the scanned z-range (e.g. a lung-base finding on an apical scan)."""


def _r(v: Any) -> Any:
    """Round floats (recursively) for JSON output."""
    if isinstance(v, float):
        return round(v, 2)
    if isinstance(v, (list, tuple)):
        return [_r(x) for x in v]
    if isinstance(v, np.ndarray):
        return _r(v.tolist())
    if isinstance(v, dict):
        return {k: _r(x) for k, x in v.items()}
    return v


@dataclass
class Finding:
    """Base class: one planted instance (a nodule, one side's effusion, ...)."""

    name: ClassVar[str] = ""
    layer: ClassVar[Layer] = Layer.MEDIASTINAL

    index: int
    centre: tuple[float, ...]
    params: dict[str, Any] = field(default_factory=dict)
    codes: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def id(self) -> str:
        return f"{self.name}_{self.index}"

    @property
    def columns(self) -> tuple[str, ...]:
        return FINDING_TASKS[self.name]

    def modify(self, a: Anatomy) -> Anatomy:
        """Change the anatomy this finding lives in (default: none)."""
        return a

    def hu_entries(self) -> list[tuple[str, float, float]]:
        """``(key, HU, extra HU with IV contrast)`` for each tissue code the finding paints."""
        return []

    def transparent_codes(self) -> list[int]:
        """Own codes that pulmonary vessels may be drawn across (ground glass, emphysema)."""
        return []

    def bind(self, codes: dict[str, int]) -> None:
        self.codes = codes

    def bbox(self) -> Box:
        raise NotImplementedError

    def z_extent(self) -> tuple[float, float]:
        lo, hi = self.bbox()
        return lo[2], hi[2]

    def paint(self, cv: Canvas, ph: Phantom) -> None:
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        lo, hi = self.bbox()
        return {
            "id": self.id,
            "name": self.name,
            "task": self.columns[0],
            "tasks": list(self.columns),
            "centre_mm": _r(list(self.centre)),
            "bbox_mm": {"min": _r(lo), "max": _r(hi)},
            "params": _r(self.params),
        }


def _ell_json(e: Ellipsoid) -> dict[str, Any]:
    return {"centre_mm": list(e.centre), "semi_axes_mm": list(e.semi), "rotation": e.rot.tolist()}


def _ell_from(d: dict[str, Any]) -> Ellipsoid:
    return Ellipsoid(
        tuple(d["centre_mm"]), tuple(d["semi_axes_mm"]), np.asarray(d["rotation"], dtype=np.float64)
    )


def _union_box(boxes: Sequence[Box], pad: float = 0.0) -> Box:
    lo = np.min([b[0] for b in boxes], axis=0) - pad
    hi = np.max([b[1] for b in boxes], axis=0) + pad
    return lo.tolist(), hi.tolist()


# ---------------------------------------------------------------------------------------------------
# Ellipsoid-based findings
# ---------------------------------------------------------------------------------------------------
@dataclass
class _EllipsoidFinding(Finding):
    """Findings made of ellipsoids, each with its own HU (``params['parts']``)."""

    allowed_codes: ClassVar[tuple[int, ...]] = ()

    def parts(self) -> list[tuple[Ellipsoid, float]]:
        return [(_ell_from(p), p["hu"]) for p in self.params["parts"]]

    def _levels(self) -> list[float]:
        """Distinct HU values of the parts (parts with equal HU share one tissue code)."""
        return sorted({float(p["hu"]) for p in self.params["parts"]})

    def part_key(self, hu: float) -> str:
        return f"hu{self._levels().index(float(hu))}"

    def hu_entries(self) -> list[tuple[str, float, float]]:
        delta = float(self.params.get("contrast_enhancement_hu", 0.0))
        return [(f"hu{i}", hu, delta) for i, hu in enumerate(self._levels())]

    def bbox(self) -> Box:
        return _union_box([e.bbox() for e, _ in self.parts()])

    def allowed(self, ph: Phantom) -> np.ndarray:
        return lut(self.allowed_codes)

    def paint(self, cv: Canvas, ph: Phantom) -> None:
        ok = self.allowed(ph)
        keys = {hu: self.codes[self.part_key(hu)] for hu in self._levels()}
        for e, hu in self._cached_parts():
            hit = e.raster(cv)
            if hit:
                painted = cv.fill(hit[0], hit[1], keys[float(hu)], ok)
                cv.remember(self.id, hit[0], painted)

    def _cached_parts(self) -> list[tuple[Ellipsoid, float]]:
        cache = self.__dict__.get("_parts_cache")
        if cache is None:
            cache = self.__dict__["_parts_cache"] = self.parts()
        return cache


@dataclass
class LungNodule(_EllipsoidFinding):
    """A solid, slightly ellipsoidal nodule (8–20 mm) of soft-tissue density inside a lung."""

    name: ClassVar[str] = "lung_nodule"
    layer: ClassVar[Layer] = Layer.NODULE

    def allowed(self, ph: Phantom) -> np.ndarray:
        return ph.lungish


@dataclass
class _Patch(_EllipsoidFinding):
    """Patchy parenchymal disease: a cluster of overlapping ellipsoids confined to lung parenchyma."""

    layer: ClassVar[Layer] = Layer.PARENCHYMA

    def allowed(self, ph: Phantom) -> np.ndarray:
        return ph.is_lung


@dataclass
class LungOpacity(_Patch):
    """Ground-glass opacity (−600…−300 HU): vessels stay visible through it."""

    name: ClassVar[str] = "lung_opacity"

    def transparent_codes(self) -> list[int]:
        return list(self.codes.values())


@dataclass
class Consolidation(_Patch):
    """Consolidation (−100…+50 HU): hides vessels, keeps air bronchograms (airways are drawn over it)."""

    name: ClassVar[str] = "consolidation"


@dataclass
class Emphysema(_Patch):
    """Low-attenuation lung (< −950 HU): centrilobular holes in upper-lung zones, or a few bullae."""

    name: ClassVar[str] = "emphysema"

    def transparent_codes(self) -> list[int]:
        return list(self.codes.values())

    def allowed(self, ph: Phantom) -> np.ndarray:
        return lut((*ph.is_lung.nonzero()[0].tolist(), *self.codes.values()))


@dataclass
class CoronaryCalcification(_EllipsoidFinding):
    """Calcified plaques (400–1200 HU, 3–9 mm) along the proximal coronary arteries."""

    name: ClassVar[str] = "coronary_artery_wall_calcification"
    allowed_codes: ClassVar[tuple[int, ...]] = (
        T.CORONARY,
        T.EPICARDIAL_FAT,
        T.MYOCARDIUM,
        T.PERICARDIUM,
        T.AORTA,
        T.MED_FAT,
        T.PERICARDIAL_FLUID,
    )


@dataclass
class ArterialCalcification(_EllipsoidFinding):
    """Calcified plaques on the aortic wall (arch and descending aorta)."""

    name: ClassVar[str] = "arterial_wall_calcification"
    allowed_codes: ClassVar[tuple[int, ...]] = (
        T.AORTA,
        T.MED_FAT,
        T.LUNG_R,
        T.LUNG_L,
        T.VESSEL,
        T.ABDOMEN,
        T.PERICARDIUM,
        T.EPICARDIAL_FAT,
    )


_HERNIA_OK = tuple(
    int(c)
    for c in T
    if c
    not in (
        T.AIR,
        T.TABLE,
        T.TABLE_CORE,
        T.CORTICAL,
        T.MARROW,
        T.DISC,
        T.CORD,
        T.AORTA,
        T.SUBCUT_FAT,
        T.MUSCLE,
        T.SKIN,
        T.METAL,
    )
)


@dataclass
class HiatalHernia(Finding):
    """Stomach herniated through the hiatus: a walled sac above the diaphragm behind the heart,
    gas anteriorly over a dependent fluid level."""

    name: ClassVar[str] = "hiatal_hernia"

    def hu_entries(self) -> list[tuple[str, float, float]]:
        return [("wall", 40.0, 30.0), ("gas", -995.0, 0.0), ("fluid", self.params["fluid_hu"], 0.0)]

    def _sac(self) -> Ellipsoid:
        return Ellipsoid(self.centre, tuple(self.params["semi_axes_mm"]))

    def bbox(self) -> Box:
        return self._sac().bbox()

    def paint(self, cv: Canvas, ph: Phantom) -> None:
        sac = self._sac()
        outer = sac.raster(cv)
        if not outer:
            return
        ok = lut(_HERNIA_OK + tuple(ph.lungish_codes))
        painted = cv.fill(outer[0], outer[1], self.codes["wall"], ok)
        cv.remember(self.id, outer[0], painted)
        wall = self.params["wall_mm"]
        inner = Ellipsoid(sac.centre, tuple(s - wall for s in sac.semi)).raster(cv)
        if inner:
            w, m = inner
            gas = cv.ys(w) < self.params["fluid_level_y_mm"]
            own = lut((self.codes["wall"],))
            cv.fill(w, m & gas, self.codes["gas"], own)
            cv.fill(w, m & ~gas, self.codes["fluid"], own)


@dataclass
class MedicalMaterial(Finding):
    """Metal (clipped to the top of the HU range): sternotomy wires looped around the sternum, or surgical clips."""

    name: ClassVar[str] = "medical_material"

    def _tubes(self) -> Tubes:
        segs = np.asarray(self.params["segments_mm"], dtype=np.float64)
        return Tubes(segs[:, 0], segs[:, 1], np.full(len(segs), self.params["wire_radius_mm"]))

    def hu_entries(self) -> list[tuple[str, float, float]]:
        return [("metal", 3071.0, 0.0)]

    def bbox(self) -> Box:
        return self._tubes().bbox()

    def paint(self, cv: Canvas, ph: Phantom) -> None:
        ok = lut(tuple(c for c in range(256) if c not in (T.AIR, T.TABLE, T.TABLE_CORE)))
        self._tubes().paint(cv, self.codes["metal"], ok, key=self.id)


# ---------------------------------------------------------------------------------------------------
# Findings that live in the lung bases
# ---------------------------------------------------------------------------------------------------
def _side_window(
    cv: Canvas, g: BodyGeometry, side: str, zlo: float
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray] | None:
    ca, cb = g.cavity_ab(cv.z)
    xlo, xhi = (-ca, g.x_mid) if side == "R" else (g.x_mid, ca)
    w = cv.win(xlo, xhi, g.cav_y - cb, g.cav_y + cb)
    if w is None:
        return None
    return w, cv.xs(w), cv.ys(w)


@dataclass
class PleuralEffusion(Finding):
    """Free fluid (0–20 HU) layering in the dependent (posterior) pleural space of one lung base.

    The crescent is ``thickness_mm`` thick at the base (measured forward from the posterior chest
    wall) and thins out up to ``height_mm`` above the dome; it replaces whatever lung was there."""

    name: ClassVar[str] = "pleural_effusion"
    layer: ClassVar[Layer] = Layer.PLEURAL

    def hu_entries(self) -> list[tuple[str, float, float]]:
        return [("fluid", self.params["hu"], 0.0)]

    def _z(self) -> tuple[float, float]:
        return self.params["z_base_mm"], self.params["z_top_mm"]

    def bbox(self) -> Box:
        p = self.params
        return p["bbox_min"], p["bbox_max"]

    def thickness_at(self, z: float) -> float:
        zb, zt = self._z()
        full = self.params["z_full_mm"]
        if z <= full:
            return self.params["thickness_mm"]
        return self.params["thickness_mm"] * max(0.0, (zt - z) / (zt - full)) ** 0.6

    def paint(self, cv: Canvas, ph: Phantom) -> None:
        g = ph.geo
        side = self.params["side"]
        t = self.thickness_at(cv.z)
        if t <= 0.5:
            return
        sw = _side_window(cv, g, side, 0.0)
        if sw is None:
            return
        w, x, y = sw
        wall = g.posterior_wall_y(x, cv.z)
        mask = (y > wall - t) & ph.lungish[cv.t[w]]
        painted = cv.fill(w, mask, self.codes["fluid"])
        cv.remember(self.id, w, painted)


@dataclass
class Atelectasis(Finding):
    """Collapsed lung at one base: a dense wedge (20–60 HU) along the posterior base with volume loss
    (the hemidiaphragm on that side rises by ``dome_raise_mm``)."""

    name: ClassVar[str] = "atelectasis"
    layer: ClassVar[Layer] = Layer.PLEURAL

    def modify(self, a: Anatomy) -> Anatomy:
        key = "dome_raise_r" if self.params["side"] == "R" else "dome_raise_l"
        return replace_anatomy(a, **{key: getattr(a, key) + self.params["dome_raise_mm"]})

    def hu_entries(self) -> list[tuple[str, float, float]]:
        return [("lung", self.params["hu"], 45.0)]

    def bbox(self) -> Box:
        return self.params["bbox_min"], self.params["bbox_max"]

    def paint(self, cv: Canvas, ph: Phantom) -> None:
        g = ph.geo
        p = self.params
        sw = _side_window(cv, g, p["side"], 0.0)
        if sw is None:
            return
        w, x, y = sw
        y0 = g.cav_y + p["start_fraction"] * g.cav_b
        frac = np.clip((y - y0) / (g.cav_y + g.cav_b - y0), 0.0, 1.0) ** 0.7
        above = cv.z - g.dome_z(x, y, p["side"])
        mask = (above < p["height_mm"] * frac) & ph.lungish[cv.t[w]]
        painted = cv.fill(w, mask, self.codes["lung"])
        cv.remember(self.id, w, painted)


# ---------------------------------------------------------------------------------------------------
# Findings that live in the anatomy and only record
# ---------------------------------------------------------------------------------------------------
_HEART = lut((T.MYOCARDIUM, T.HEART_BLOOD, T.CORONARY))
_PERI_FLUID = lut((T.PERICARDIAL_FLUID,))


@dataclass
class Cardiomegaly(Finding):
    """Enlarged heart: the cardiothoracic ratio becomes ``ctr`` (0.56–0.68; normal phantoms are 0.38–0.47)."""

    name: ClassVar[str] = "cardiomegaly"
    layer: ClassVar[Layer] = Layer.RECORD

    def modify(self, a: Anatomy) -> Anatomy:
        return replace_anatomy(a, heart_ctr=self.params["ctr"])

    def bbox(self) -> Box:
        return self.params["bbox_min"], self.params["bbox_max"]

    def paint(self, cv: Canvas, ph: Phantom) -> None:
        hit = ph.geo.pericardium.raster(cv)
        if hit:
            cv.remember(self.id, hit[0], _HEART[cv.t[hit[0]]])


@dataclass
class PericardialEffusion(Finding):
    """Fluid (0–20 HU) in the pericardial sac: a rim ``thickness_mm`` wide around the heart."""

    name: ClassVar[str] = "pericardial_effusion"
    layer: ClassVar[Layer] = Layer.RECORD

    def modify(self, a: Anatomy) -> Anatomy:
        return replace_anatomy(
            a, pericardial_fluid_mm=self.params["thickness_mm"], pericardial_fluid_hu=self.params["hu"]
        )

    def bbox(self) -> Box:
        return self.params["bbox_min"], self.params["bbox_max"]

    def paint(self, cv: Canvas, ph: Phantom) -> None:
        hit = ph.geo.pericardium.raster(cv)
        if hit:
            cv.remember(self.id, hit[0], _PERI_FLUID[cv.t[hit[0]]])


FINDING_CLASSES: dict[str, type[Finding]] = {
    c.name: c
    for c in (
        LungNodule,
        LungOpacity,
        Consolidation,
        Atelectasis,
        PleuralEffusion,
        PericardialEffusion,
        Cardiomegaly,
        Emphysema,
        CoronaryCalcification,
        ArterialCalcification,
        HiatalHernia,
        MedicalMaterial,
    )
}
assert set(FINDING_CLASSES) == set(FINDING_NAMES)


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------
class LungSampler:
    """Picks points deep inside lung parenchyma (coarse 3 mm renders of the base phantom, eroded)."""

    STEP = 3.0

    def __init__(self, ph: Phantom, z_range: tuple[float, float]) -> None:
        g = ph.geo
        self.x = np.arange(-g.cav_a, g.cav_a + self.STEP, self.STEP)
        self.y = np.arange(g.cav_y - g.cav_b, g.cav_y + g.cav_b + self.STEP, self.STEP)
        lo, hi = ph.anatomy.lung_z_range
        lo, hi = max(lo, z_range[0]), min(hi, z_range[1])
        self.z = np.arange(lo, hi + 1e-6, self.STEP) if hi > lo else np.zeros(0)
        lungish = lut((T.LUNG_R, T.LUNG_L, T.VESSEL, T.AIRWAY_WALL, T.AIRWAY_LUMEN))
        self.mask = np.zeros((len(self.z), len(self.y), len(self.x)), dtype=bool)
        for k, z in enumerate(self.z):
            cv = ph.canvas(self.x, self.y, float(z))
            self.mask[k] = lungish[cv.t] & (cv.t != T.AIRWAY_LUMEN) | ph.is_lung[cv.t]
        self.side_x = g.x_mid

    def eroded(self, margin: float) -> np.ndarray:
        n = max(0, int(math.ceil(margin / self.STEP)))
        m = self.mask.copy()
        for _ in range(n):
            e = m.copy()
            e[:, 1:, :] &= m[:, :-1, :]
            e[:, :-1, :] &= m[:, 1:, :]
            e[:, :, 1:] &= m[:, :, :-1]
            e[:, :, :-1] &= m[:, :, 1:]
            e[1:] &= m[:-1]
            e[:-1] &= m[1:]
            e[0] = e[-1] = False
            m = e
        return m

    def sample(
        self,
        rng: np.random.Generator,
        margin: float,
        *,
        side: str | None = None,
        z_between: tuple[float, float] | None = None,
        avoid: Sequence[Box] = (),
        tries: int = 200,
    ) -> np.ndarray | None:
        """A point with ``margin`` mm of lung around it, or ``None``."""
        m = self.eroded(margin)
        if z_between is not None:
            m[(self.z < z_between[0]) | (self.z > z_between[1])] = False
        if side == "R":
            m[:, :, self.x >= self.side_x] = False
        elif side == "L":
            m[:, :, self.x <= self.side_x] = False
        idx = np.argwhere(m)
        if len(idx) == 0:
            return None
        for _ in range(tries):
            k, j, i = idx[rng.integers(len(idx))]
            p = np.array([self.x[i], self.y[j], self.z[k]]) + rng.uniform(-1.0, 1.0, 3)
            if not any(all(b[0][d] - margin <= p[d] <= b[1][d] + margin for d in range(3)) for b in avoid):
                return p
        return None


@dataclass
class PlantContext:
    """What samplers share: the phantom so far (base anatomy plus the anatomy-changing findings already
    sampled, so positions respect e.g. an enlarged heart or a raised hemidiaphragm), the scanned z-range
    and the regions already taken."""

    base: Phantom
    z_range: tuple[float, float]
    taken: list[Box] = field(default_factory=list)
    modifiers: list[Finding] = field(default_factory=list)
    _current: Phantom | None = None
    _lungs: LungSampler | None = None

    @property
    def current(self) -> Phantom:
        if self._current is None:
            self._current = Phantom(self.base.base_anatomy, self.modifiers) if self.modifiers else self.base
        return self._current

    @property
    def g(self) -> BodyGeometry:
        return self.current.geo

    def add_modifier(self, f: Finding) -> None:
        self.modifiers.append(f)
        self._current = None
        self._lungs = None

    def lungs(self) -> LungSampler:
        if self._lungs is None:
            self._lungs = LungSampler(self.current, self.z_range)
        return self._lungs

    def require_z(self, name: str, lo: float, hi: float) -> None:
        zl, zh = self.z_range
        if hi < zl + 4.0 or lo > zh - 4.0:
            raise FindingPlacementError(
                f"{name} sits at z {lo:.0f}..{hi:.0f} mm, outside the scanned range {zl:.0f}..{zh:.0f} mm; "
                "scan more slices or move the scan centre"
            )


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    return rotation(*rng.uniform(0.0, 2.0 * math.pi, 3))


def _sample_nodules(ctx: PlantContext, rng: np.random.Generator) -> list[Finding]:
    out: list[Finding] = []
    g = ctx.g
    n = int(rng.choice([1, 1, 1, 2, 2, 3]))
    # keep out of the dependent lung bases, where effusion/atelectasis may go
    z_floor = max(g.z_dome_r, g.z_dome_l) + 12.0
    for i in range(n):
        d = float(rng.uniform(8.0, 20.0))
        semi = tuple(d / 2.0 * rng.uniform(0.88, 1.12, 3))
        margin = max(semi) + 4.0
        p = ctx.lungs().sample(rng, margin, z_between=(z_floor, 1e9), avoid=ctx.taken)
        if p is None:
            p = ctx.lungs().sample(rng, margin, avoid=ctx.taken)
        if p is None:
            if out:
                break
            raise FindingPlacementError("no room for a lung nodule inside the scanned lungs")
        e = Ellipsoid(tuple(p), semi, _random_rotation(rng))
        hu = float(rng.uniform(10.0, 60.0))
        f = LungNodule(
            i + 1,
            tuple(p),
            {
                "diameter_mm": d,
                "hu": hu,
                "contrast_enhancement_hu": 20.0,
                "parts": [{**_ell_json(e), "hu": hu}],
            },
        )
        out.append(f)
        ctx.taken.append(f.bbox())
    return out


def _sample_patch(ctx: PlantContext, rng: np.random.Generator, cls: type[_Patch]) -> list[Finding]:
    dense = cls is Consolidation
    n_patches = 1 if dense else int(rng.choice([1, 1, 2]))
    out: list[Finding] = []
    for i in range(n_patches):
        margin = 12.0
        p = ctx.lungs().sample(rng, margin, avoid=ctx.taken)
        if p is None:
            raise FindingPlacementError(f"no room for {cls.name} inside the scanned lungs")
        level = float(rng.uniform(-100.0, 50.0) if dense else rng.uniform(-600.0, -300.0))
        parts = []
        for _ in range(int(rng.integers(2, 5) if dense else rng.integers(3, 7))):
            off = rng.normal(0.0, 9.0 if dense else 14.0, 3)
            base = rng.uniform(14.0, 26.0) if dense else rng.uniform(12.0, 28.0)
            semi = tuple(base * rng.uniform(0.7, 1.3, 3))
            e = Ellipsoid(tuple(p + off), semi, _random_rotation(rng))
            jitter = rng.uniform(-20.0, 20.0) if dense else rng.uniform(-60.0, 60.0)
            parts.append({**_ell_json(e), "hu": float(np.clip(level + jitter, -650.0, 60.0))})
        f = cls(
            i + 1,
            tuple(p),
            {"hu_level": level, "contrast_enhancement_hu": 30.0 if dense else 10.0, "parts": parts},
        )
        out.append(f)
        ctx.taken.append(f.bbox())
    return out


def _first(p: np.ndarray | None, fallback: Callable[[], np.ndarray | None]) -> np.ndarray | None:
    return p if p is not None else fallback()


def _sample_emphysema(ctx: PlantContext, rng: np.random.Generator) -> list[Finding]:
    g = ctx.g
    lungs = ctx.lungs()
    bullous = rng.random() < 0.35
    parts = []
    zmid = 0.5 * (g.a.z_carina + max(g.z_dome_r, g.z_dome_l))
    if bullous:
        for _ in range(int(rng.integers(2, 5))):
            r = float(rng.uniform(10.0, 22.0))
            margin = r * 0.6
            p = lungs.sample(rng, margin, z_between=(zmid, 1e9), avoid=ctx.taken)
            if p is None:
                p = lungs.sample(rng, margin)
            if p is None:
                continue
            e = Ellipsoid(tuple(p), (r, r * rng.uniform(0.8, 1.0), r * rng.uniform(0.8, 1.0)))
            parts.append({**_ell_json(e), "hu": float(rng.uniform(-1000.0, -985.0))})
    else:
        for _ in range(int(rng.integers(2, 4))):
            rz = float(rng.uniform(35.0, 55.0))
            c = _first(
                lungs.sample(rng, 8.0, z_between=(zmid, 1e9), avoid=ctx.taken), lambda: lungs.sample(rng, 8.0)
            )
            if c is None:
                continue
            zone = Ellipsoid(tuple(c), (rz, rz * 0.8, rz))
            parts.append({**_ell_json(zone), "hu": round(float(rng.uniform(-975.0, -958.0)))})
            hole_hu = round(float(rng.uniform(-1000.0, -985.0)))
            for _ in range(int(rng.integers(40, 90))):
                off = rng.normal(0.0, 0.45, 3) * np.array(zone.semi)
                r = float(rng.uniform(3.0, 7.0))
                hole = Ellipsoid(tuple(np.asarray(c) + off), (r, r, r))
                parts.append({**_ell_json(hole), "hu": hole_hu})
    if not parts:
        raise FindingPlacementError("no room for emphysema inside the scanned lungs")
    centre = np.mean([p["centre_mm"] for p in parts], axis=0)
    return [
        Emphysema(1, tuple(centre), {"pattern": "bullous" if bullous else "centrilobular", "parts": parts})
    ]


def _base_box(g: BodyGeometry, side: str, z_top: float, depth: float) -> Box:
    ca = g.cav_a
    xlo, xhi = (-ca, g.x_mid) if side == "R" else (g.x_mid, ca)
    zb = (g.z_dome_r if side == "R" else g.z_dome_l) - 65.0
    return [xlo, g.cav_y + g.cav_b - depth, zb], [xhi, g.cav_y + g.cav_b, z_top]


def _sample_effusion(ctx: PlantContext, rng: np.random.Generator) -> list[Finding]:
    g = ctx.g
    u = rng.random()
    sides = ["R"] if u < 0.3 else ["L"] if u < 0.6 else ["R", "L"]
    out: list[Finding] = []
    for i, side in enumerate(sides):
        dome = g.z_dome_r if side == "R" else g.z_dome_l
        t = float(rng.uniform(20.0, 45.0))
        h = float(rng.uniform(40.0, 90.0))
        top = dome + h
        ctx.require_z("pleural_effusion", dome - 60.0, top)
        lo, hi = _base_box(g, side, top, t + 5.0)
        lo[1] = g.cav_y - t  # laterally the wall curves forward: the crescent reaches the cavity mid-plane
        p = {
            "side": side,
            "thickness_mm": t,
            "height_mm": h,
            "hu": float(rng.uniform(0.0, 20.0)),
            "z_base_mm": dome - 65.0,
            "z_full_mm": dome,
            "z_top_mm": top,
            "bbox_min": lo,
            "bbox_max": hi,
        }
        centre = (0.5 * (lo[0] + hi[0]), hi[1] - t / 2.0, dome - 10.0)
        f = PleuralEffusion(i + 1, centre, p)
        out.append(f)
        ctx.taken.append((lo, hi))
    return out


def _sample_atelectasis(ctx: PlantContext, rng: np.random.Generator) -> list[Finding]:
    g = ctx.g
    side = "R" if rng.random() < 0.5 else "L"
    raise_mm = float(rng.uniform(8.0, 20.0))
    h = float(rng.uniform(30.0, 55.0))
    dome = (g.z_dome_r if side == "R" else g.z_dome_l) + raise_mm
    ctx.require_z("atelectasis", dome - 60.0, dome + h)
    lo, hi = _base_box(g, side, dome + h, 2.0 * g.cav_b)
    lo[2] += raise_mm
    p = {
        "side": side,
        "dome_raise_mm": raise_mm,
        "height_mm": h,
        "start_fraction": float(rng.uniform(-0.3, 0.15)),
        "hu": float(rng.uniform(20.0, 60.0)),
        "bbox_min": lo,
        "bbox_max": hi,
    }
    centre = (0.5 * (lo[0] + hi[0]), g.cav_y + 0.6 * g.cav_b, dome - 5.0)
    f = Atelectasis(1, centre, p)
    ctx.taken.append((lo, hi))
    return [f]


def _heart_box(a: Anatomy) -> tuple[BodyGeometry, Box]:
    g = BodyGeometry(a)
    return g, g.pericardium.bbox()


def _sample_cardiomegaly(ctx: PlantContext, rng: np.random.Generator) -> list[Finding]:
    ctr = float(rng.uniform(0.56, 0.68))
    g, box = _heart_box(replace_anatomy(ctx.current.anatomy, heart_ctr=ctr))
    ctx.require_z("cardiomegaly", box[0][2], box[1][2])
    return [
        Cardiomegaly(
            1,
            tuple(g.heart.centre),
            {"ctr": ctr, "normal_ctr": ctx.base.anatomy.heart_ctr, "bbox_min": box[0], "bbox_max": box[1]},
        )
    ]


def _sample_pericardial(ctx: PlantContext, rng: np.random.Generator) -> list[Finding]:
    t = float(rng.uniform(8.0, 18.0))
    hu = float(rng.uniform(0.0, 20.0))
    g, box = _heart_box(replace_anatomy(ctx.current.anatomy, pericardial_fluid_mm=t))
    ctx.require_z("pericardial_effusion", box[0][2], box[1][2])
    return [
        PericardialEffusion(
            1, tuple(g.heart.centre), {"thickness_mm": t, "hu": hu, "bbox_min": box[0], "bbox_max": box[1]}
        )
    ]


def _sample_coronary(ctx: PlantContext, rng: np.random.Generator) -> list[Finding]:
    g = ctx.g
    parts = []
    names = list(g.coronary_paths)
    weights = np.array([0.3, 0.35, 0.2, 0.15])  # RCA, LAD, LCX, LM
    for _ in range(int(rng.integers(3, 9))):
        vessel = names[int(rng.choice(len(names), p=weights))]
        path = g.coronary_paths[vessel]
        t = float(rng.uniform(0.0, 0.7 if vessel != "LM" else 1.0)) * (len(path) - 1)
        k = min(int(t), len(path) - 2)
        c = path[k] + (t - k) * (path[k + 1] - path[k])
        along = path[k + 1] - path[k]
        along = along / (np.linalg.norm(along) + 1e-9)
        e1 = np.cross(along, [0.0, 0.0, 1.0])
        if np.linalg.norm(e1) < 1e-6:
            e1 = np.array([1.0, 0.0, 0.0])
        e1 /= np.linalg.norm(e1)
        rot = np.stack([along, e1, np.cross(along, e1)], axis=1)
        semi = (float(rng.uniform(3.0, 6.0)), float(rng.uniform(2.0, 3.2)), float(rng.uniform(2.0, 3.2)))
        e = Ellipsoid(tuple(c), semi, rot)
        parts.append({**_ell_json(e), "hu": float(rng.uniform(500.0, 1300.0)), "artery": vessel})
    lo, hi = _union_box([_ell_from(p).bbox() for p in parts])
    ctx.require_z("coronary_artery_wall_calcification", lo[2], hi[2])
    centre = np.mean([p["centre_mm"] for p in parts], axis=0)
    return [CoronaryCalcification(1, tuple(centre), {"plaques": len(parts), "parts": parts})]


def _sample_aortic(ctx: PlantContext, rng: np.random.Generator) -> list[Finding]:
    g = ctx.g
    path = g.aorta_path
    radii = g.aorta.r
    zl, zh = ctx.z_range
    # segments of the thoracic aorta inside the scan (skip the last one, which runs to the pelvis)
    seg_ok = [k for k in range(len(path) - 2) if zl + 5.0 < 0.5 * (path[k][2] + path[k + 1][2]) < zh - 5.0]
    seg_ok = seg_ok or [k for k in range(len(path) - 1)]
    parts = []
    for _ in range(int(rng.integers(3, 11))):
        k = int(rng.choice(seg_ok))
        a, b = path[k], path[k + 1]
        if k == len(path) - 2:
            b = a + (b - a) * min(1.0, 120.0 / np.linalg.norm(b - a))
        t = float(rng.uniform(0.0, 1.0))
        c = a + t * (b - a)
        along = (b - a) / np.linalg.norm(b - a)
        e1 = np.cross(along, [0.0, 0.0, 1.0])
        if np.linalg.norm(e1) < 1e-6:
            e1 = np.cross(along, [1.0, 0.0, 0.0])
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(along, e1)
        ang = float(rng.uniform(0.0, 2.0 * math.pi))
        radial = math.cos(ang) * e1 + math.sin(ang) * e2
        tangent = np.cross(along, radial)
        r = float(radii[k]) - 0.8
        rot = np.stack([radial, tangent, along], axis=1)
        semi = (float(rng.uniform(1.3, 2.2)), float(rng.uniform(4.0, 10.0)), float(rng.uniform(3.0, 8.0)))
        e = Ellipsoid(tuple(c + r * radial), semi, rot)
        parts.append({**_ell_json(e), "hu": float(rng.uniform(400.0, 1200.0))})
    lo, hi = _union_box([_ell_from(p).bbox() for p in parts])
    ctx.require_z("arterial_wall_calcification", lo[2], hi[2])
    centre = np.mean([p["centre_mm"] for p in parts], axis=0)
    return [ArterialCalcification(1, tuple(centre), {"plaques": len(parts), "parts": parts})]


def _sample_hernia(ctx: PlantContext, rng: np.random.Generator) -> list[Finding]:
    g = ctx.g
    semi = (float(rng.uniform(20.0, 32.0)), float(rng.uniform(16.0, 26.0)), float(rng.uniform(20.0, 35.0)))
    hz = g.hiatus[2]
    c = (g.hiatus[0] + float(rng.uniform(-8.0, 6.0)), g.eso_y - semi[1] * 0.55, hz + semi[2] * 0.75)
    gas = float(rng.uniform(0.3, 0.9))
    level = c[1] - semi[1] + 2.0 * semi[1] * gas
    ctx.require_z("hiatal_hernia", c[2] - semi[2], c[2] + semi[2])
    return [
        HiatalHernia(
            1,
            c,
            {
                "semi_axes_mm": list(semi),
                "wall_mm": 3.0,
                "gas_fraction": gas,
                "fluid_level_y_mm": level,
                "fluid_hu": float(rng.uniform(5.0, 30.0)),
            },
        )
    ]


def _loop(centre: np.ndarray, a: float, b: float, tilt: float, n: int = 18) -> list[list[list[float]]]:
    segs = []
    pts = []
    for k in range(n + 1):
        phi = 2.0 * math.pi * k / n
        x = a * math.cos(phi)
        y = b * math.sin(phi)
        pts.append(centre + np.array([x, y, tilt * x / a]))
    for k in range(n):
        segs.append([pts[k].tolist(), pts[k + 1].tolist()])
    return segs


def _sample_metal(ctx: PlantContext, rng: np.random.Generator) -> list[Finding]:
    g = ctx.g
    zl, zh = ctx.z_range
    if rng.random() < 0.55:
        top, bottom = g.z_sternum
        n = int(rng.integers(4, 8))
        gap = float(rng.uniform(17.0, 24.0))
        lo_z, hi_z = max(bottom + 5.0, zl + 4.0), min(top - 5.0, zh - 4.0)
        if hi_z - lo_z < 10.0:
            raise FindingPlacementError("the sternum is outside the scanned range (medical_material wires)")
        start = float(rng.uniform(lo_z, max(lo_z, hi_z - gap * (n - 1))))
        cb = float(g.cavity_ab(start)[1])
        segs = []
        for k in range(n):
            z = start + k * gap
            if z > hi_z:
                break
            cy = g.cav_y - cb - 5.0
            segs += _loop(
                np.array([0.0, cy, z]), 17.0 + float(rng.uniform(0, 3)), 9.0, float(rng.uniform(-2, 2))
            )
            # twisted knot in front of the sternum
            segs.append(
                [[0.0, cy - 9.0, z], [float(rng.uniform(-3, 3)), cy - 13.0, z + float(rng.uniform(-2, 2))]]
            )
        kind, radius = "sternal_wires", 1.25
    else:
        segs = []
        for _ in range(int(rng.integers(2, 5))):
            hil = g.hilum["R" if rng.random() < 0.5 else "L"]
            c = np.array(
                [
                    g.x_mid + float(rng.uniform(-25, 25)),
                    hil[1] + float(rng.uniform(-20, 10)),
                    hil[2] + float(rng.uniform(-10, 35)),
                ]
            )
            c[2] = min(max(c[2], zl + 8.0), zh - 8.0)
            d = rng.normal(size=3)
            d /= np.linalg.norm(d)
            length = float(rng.uniform(7.0, 10.0))
            segs.append([(c - d * length / 2).tolist(), (c + d * length / 2).tolist()])
        kind, radius = "surgical_clips", 1.5
    arr = np.asarray(segs)
    centre = arr.reshape(-1, 3).mean(axis=0)
    return [MedicalMaterial(1, tuple(centre), {"kind": kind, "wire_radius_mm": radius, "segments_mm": segs})]


_SAMPLERS = {
    # anatomy-changing findings first: everything placed later sees the changed anatomy
    "cardiomegaly": _sample_cardiomegaly,
    "pericardial_effusion": _sample_pericardial,
    "atelectasis": _sample_atelectasis,
    # then the big lung-base region, parenchymal patches, and nodules last (they avoid the rest)
    "pleural_effusion": _sample_effusion,
    "consolidation": lambda c, r: _sample_patch(c, r, Consolidation),
    "lung_opacity": lambda c, r: _sample_patch(c, r, LungOpacity),
    "emphysema": _sample_emphysema,
    "lung_nodule": _sample_nodules,
    "coronary_artery_wall_calcification": _sample_coronary,
    "arterial_wall_calcification": _sample_aortic,
    "hiatal_hernia": _sample_hernia,
    "medical_material": _sample_metal,
}
#: Sampling order: the regions that must not overlap are claimed by the big base findings first.
SAMPLING_ORDER = tuple(_SAMPLERS)


def finding_rng(seed: int, name: str) -> np.random.Generator:
    """The random stream of one finding name for a patient seed (independent of the other findings)."""
    return np.random.default_rng([int(seed), 1000 + FINDING_NAMES.index(name)])


def sample_findings(
    base: Phantom, names: Sequence[str], z_range: tuple[float, float] | None = None
) -> list[Finding]:
    """Randomised findings for ``base`` (a phantom without findings), placed inside ``z_range`` (mm)."""
    wanted = {normalise_finding_name(n) for n in names}
    zr = z_range if z_range is not None else (-1e9, 1e9)
    ctx = PlantContext(base, zr)
    out: list[Finding] = []
    for name in SAMPLING_ORDER:
        if name in wanted:
            new = _SAMPLERS[name](ctx, finding_rng(base.seed, name))
            for f in new:
                if f.modify(base.base_anatomy) != base.base_anatomy:
                    ctx.add_modifier(f)
            out += new
    return out


def plant(base: Phantom, names: Sequence[str], z_range: tuple[float, float] | None = None) -> Phantom:
    """``base`` with the named findings planted (randomised from the patient seed)."""
    if base.findings:
        raise ValueError("plant() expects a phantom without findings; use with_findings() to add to one")
    return Phantom(base.base_anatomy, sample_findings(base, names, z_range))


def phantom_from_seed(
    seed: int, findings: Iterable[str] = (), z_range: tuple[float, float] | None = None
) -> Phantom:
    """The seed's patient with the named findings planted (see :func:`plant`)."""
    return plant(Phantom(sample_anatomy(seed)), list(findings), z_range=z_range)
