"""Rasterisation primitives: paint analytic shapes into one axial slice of tissue codes.

Everything works on a bounding-box window of the slice and uses separable 1D terms where it can
(``f(x)[None, :] + g(y)[:, None]``), which is what keeps a 512×512 slice at a few milliseconds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

Window = tuple[slice, slice]


class Canvas:
    """One axial slice at height ``z``: pixel centres ``x`` (columns) and ``y`` (rows), tissue codes ``t``.

    ``record`` collects the region each planted finding claims (finding id -> full-slice bool mask),
    which gives ground-truth masks and voxel bounding boxes without a second render.
    """

    __slots__ = ("x", "y", "z", "t", "dx", "dy", "record", "masks")

    def __init__(self, x: np.ndarray, y: np.ndarray, z: float, *, record: bool = False) -> None:
        self.x = np.asarray(x, dtype=np.float32)
        self.y = np.asarray(y, dtype=np.float32)
        self.z = float(z)
        self.t = np.zeros((self.y.size, self.x.size), dtype=np.uint8)
        self.dx = float(self.x[1] - self.x[0]) if self.x.size > 1 else 1.0
        self.dy = float(self.y[1] - self.y[0]) if self.y.size > 1 else 1.0
        self.record = record
        self.masks: dict[str, np.ndarray] = {}

    def win(self, xmin: float, xmax: float, ymin: float, ymax: float) -> Window | None:
        """Index window of the pixels whose centres lie in the box, or ``None`` when it misses the slice."""
        c0 = max(0, math.ceil((xmin - float(self.x[0])) / self.dx - 1e-6))
        c1 = min(self.x.size, math.floor((xmax - float(self.x[0])) / self.dx + 1e-6) + 1)
        r0 = max(0, math.ceil((ymin - float(self.y[0])) / self.dy - 1e-6))
        r1 = min(self.y.size, math.floor((ymax - float(self.y[0])) / self.dy + 1e-6) + 1)
        if c0 >= c1 or r0 >= r1:
            return None
        return (slice(r0, r1), slice(c0, c1))

    def xs(self, w: Window) -> np.ndarray:
        """Column coordinates of a window as a (1, w) row vector."""
        return self.x[w[1]][None, :]

    def ys(self, w: Window) -> np.ndarray:
        """Row coordinates of a window as an (h, 1) column vector."""
        return self.y[w[0]][:, None]

    def fill(self, w: Window, mask: np.ndarray, code: int, allowed: np.ndarray | None = None) -> np.ndarray:
        """Set ``code`` where ``mask`` (and, if given, ``allowed[current code]``) holds; return the painted mask."""
        sub = self.t[w]
        if allowed is not None:
            mask = mask & allowed[sub]
        sub[mask] = code
        return mask

    def remember(self, key: str, w: Window, mask: np.ndarray) -> None:
        """Add a window mask to the ground-truth mask of finding ``key`` (no-op unless recording)."""
        if not self.record or not mask.any():
            return
        full = self.masks.get(key)
        if full is None:
            full = self.masks[key] = np.zeros(self.t.shape, dtype=bool)
        full[w] |= mask


def lut(codes: list[int] | tuple[int, ...] | set[int]) -> np.ndarray:
    """A 256-entry boolean lookup table: ``lut(codes)[t]`` says whether tissue ``t`` may be painted over."""
    table = np.zeros(256, dtype=bool)
    table[list(codes)] = True
    return table


def ellipse(cv: Canvas, cx: float, cy: float, a: float, b: float) -> tuple[Window, np.ndarray] | None:
    """Axis-aligned ellipse ``((x-cx)/a)² + ((y-cy)/b)² <= 1``."""
    if a <= 0 or b <= 0:
        return None
    w = cv.win(cx - a, cx + a, cy - b, cy + b)
    if w is None:
        return None
    u = ((cv.xs(w) - cx) / a) ** 2
    v = ((cv.ys(w) - cy) / b) ** 2
    return w, (u + v) <= 1.0


def superellipse_level(
    cv: Canvas, w: Window, cx: float, cy: float, a: float, b: float, p: float
) -> np.ndarray:
    """``|x-cx|/a ** p + |y-cy|/b ** p`` on a window (<= 1 inside); separable, so cheap."""
    u = (np.abs(cv.xs(w) - cx) / a) ** p
    v = (np.abs(cv.ys(w) - cy) / b) ** p
    return u + v


def rotation(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """A rotation matrix from three angles (radians) about z, y and x, applied in that order."""
    cz, sz = math.cos(yaw), math.sin(yaw)
    cy, sy = math.cos(pitch), math.sin(pitch)
    cx, sx = math.cos(roll), math.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class Ellipsoid:
    """An oriented ellipsoid: ``centre`` (mm), ``semi`` axes (mm) and rotation ``rot`` (columns = axes)."""

    centre: tuple[float, ...]
    semi: tuple[float, ...]
    rot: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        object.__setattr__(self, "centre", tuple(float(v) for v in self.centre))
        object.__setattr__(self, "semi", tuple(float(v) for v in self.semi))
        object.__setattr__(self, "rot", np.asarray(self.rot, dtype=np.float64))

    def quadric(self) -> np.ndarray:
        s = np.asarray(self.semi, dtype=np.float64)
        return self.rot @ np.diag(1.0 / s**2) @ self.rot.T

    def half_extent(self) -> np.ndarray:
        """Half size of the axis-aligned bounding box."""
        return np.sqrt(((self.rot * np.asarray(self.semi)) ** 2).sum(axis=1))

    def bbox(self) -> tuple[list[float], list[float]]:
        c, e = np.asarray(self.centre), self.half_extent()
        return (c - e).tolist(), (c + e).tolist()

    def scaled(self, factor: float) -> Ellipsoid:
        return Ellipsoid(self.centre, tuple(s * factor for s in self.semi), self.rot)

    def contains(self, pts: np.ndarray) -> np.ndarray:
        """Which of the points (N, 3) lie inside."""
        d = np.asarray(pts, dtype=np.float64) - np.asarray(self.centre)
        return np.einsum("ni,ij,nj->n", d, self.quadric(), d) <= 1.0

    def raster(self, cv: Canvas, level: float = 1.0) -> tuple[Window, np.ndarray] | None:
        """The ellipsoid's cross-section with the slice (quadric value ``<= level``)."""
        cx, cy, cz = self.centre
        e = self.half_extent() * math.sqrt(level)
        dz = cv.z - cz
        if abs(dz) > e[2]:
            return None
        w = cv.win(cx - e[0], cx + e[0], cy - e[1], cy + e[1])
        if w is None:
            return None
        m = self.quadric()
        qx = cv.xs(w) - cx
        qy = cv.ys(w) - cy
        fx = (m[0, 0] * qx + 2.0 * m[0, 2] * dz) * qx
        fy = (m[1, 1] * qy + 2.0 * m[1, 2] * dz) * qy + m[2, 2] * dz * dz
        q = fx + fy
        if abs(m[0, 1]) > 1e-12:
            q = q + (2.0 * m[0, 1]) * (qy * qx)
        return w, q <= level


@dataclass
class Tubes:
    """Capsule segments (``p0``–``p1`` with radius ``r``) painted with one tissue code.

    Used for great vessels, airways, vessel trees, coronaries and wires; a slice only touches the
    segments whose z-range (plus radius) contains it.
    """

    p0: np.ndarray  # (N, 3)
    p1: np.ndarray  # (N, 3)
    r: np.ndarray  # (N,)

    def __post_init__(self) -> None:
        self.p0 = np.asarray(self.p0, dtype=np.float64).reshape(-1, 3)
        self.p1 = np.asarray(self.p1, dtype=np.float64).reshape(-1, 3)
        self.r = np.broadcast_to(np.asarray(self.r, dtype=np.float64), (self.p0.shape[0],)).copy()
        self.zlo = np.minimum(self.p0[:, 2], self.p1[:, 2]) - self.r
        self.zhi = np.maximum(self.p0[:, 2], self.p1[:, 2]) + self.r
        self._d = self.p1 - self.p0
        self._l2 = (self._d**2).sum(axis=1)

    @classmethod
    def polyline(cls, points: Any, radius: Any) -> Tubes:
        """Consecutive points joined by segments; ``radius`` per point (interpolated per segment) or one value."""
        pts = np.asarray(points, dtype=np.float64)
        rad = np.broadcast_to(np.asarray(radius, dtype=np.float64), (len(pts),))
        return cls(pts[:-1], pts[1:], 0.5 * (rad[:-1] + rad[1:]))

    @classmethod
    def concat(cls, parts: list[Tubes]) -> Tubes:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0))
        return cls(
            np.concatenate([p.p0 for p in parts]),
            np.concatenate([p.p1 for p in parts]),
            np.concatenate([p.r for p in parts]),
        )

    def __len__(self) -> int:
        return int(self.p0.shape[0])

    def widened(self, extra: float) -> Tubes:
        return Tubes(self.p0, self.p1, self.r + extra)

    def bbox(self) -> tuple[list[float], list[float]]:
        lo = np.minimum(self.p0, self.p1) - self.r[:, None]
        hi = np.maximum(self.p0, self.p1) + self.r[:, None]
        return lo.min(axis=0).tolist(), hi.max(axis=0).tolist()

    def rasters(self, cv: Canvas) -> Iterator[tuple[Window, np.ndarray]]:
        """Yield ``(window, mask)`` for every segment crossing the slice (point-to-segment distance <= r).

        The per-segment bounding boxes are computed for all crossing segments at once; the loop only
        rasterises, with plain Python floats (numpy scalars are slow in tight loops)."""
        z = cv.z
        sel = np.nonzero((self.zlo <= z) & (self.zhi >= z))[0]
        if sel.size == 0:
            return
        p0, d, r = self.p0[sel], self._d[sel], self.r[sel]
        dz = d[:, 2]
        flat = np.abs(dz) <= 1e-9
        safe = np.where(flat, 1.0, dz)
        t1 = (z - r - p0[:, 2]) / safe
        t2 = (z + r - p0[:, 2]) / safe
        ta = np.where(flat, 0.0, np.maximum(0.0, np.minimum(t1, t2)))
        tb = np.where(flat, 1.0, np.minimum(1.0, np.maximum(t1, t2)))
        xa, xb = p0[:, 0] + ta * d[:, 0], p0[:, 0] + tb * d[:, 0]
        ya, yb = p0[:, 1] + ta * d[:, 1], p0[:, 1] + tb * d[:, 1]
        boxes = np.stack(
            [np.minimum(xa, xb) - r, np.maximum(xa, xb) + r, np.minimum(ya, yb) - r, np.maximum(ya, yb) + r],
            axis=1,
        )
        keep = ta <= tb
        l2 = self._l2[sel]
        rows = zip(
            boxes.tolist(), p0.tolist(), d.tolist(), r.tolist(), l2.tolist(), keep.tolist(), strict=True
        )
        for (x0, x1, y0, y1), (px, py, pz), (dx, dy, dzz), rr, ll, ok in rows:
            if not ok:
                continue
            w = cv.win(x0, x1, y0, y1)
            if w is None:
                continue
            qx = cv.xs(w) - px
            qy = cv.ys(w) - py
            qz = z - pz
            if ll < 1e-12:
                dist2 = qx * qx + qy * qy + qz * qz
            else:
                t = qx * (dx / ll) + (qy * (dy / ll) + qz * dzz / ll)
                np.maximum(t, 0.0, out=t)
                np.minimum(t, 1.0, out=t)
                ex = qx - t * dx
                ey = qy - t * dy
                ez = qz - t * dzz
                dist2 = ex * ex + ey * ey
                dist2 += ez * ez
            yield w, dist2 <= rr * rr

    def paint(self, cv: Canvas, code: int, allowed: np.ndarray | None = None, key: str | None = None) -> None:
        for w, mask in self.rasters(cv):
            painted = cv.fill(w, mask, code, allowed)
            if key is not None:
                cv.remember(key, w, painted)
