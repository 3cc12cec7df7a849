"""Sampling grids in patient space (DICOM LPS, mm) and how a grid maps to a DICOM series.

The phantom is analytic, so every series is a sampling of the same patient-space field. We always
render on a *canonical* grid (array axes z ascending, rows toward +y = posterior, columns toward
+x = patient left) and only reorder/flip when writing; that is what makes an HFS series and its FFS
twin bit-identical in patient space.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from enum import Enum
from functools import cached_property

import numpy as np

log = logging.getLogger(__name__)

#: Field of view used when no pixel spacing is given: 384 mm, i.e. 0.75 mm at 512 columns.
DEFAULT_FOV_MM = 384.0
#: Cranio-caudal coverage used when no slice spacing is given (whole lungs with margin).
DEFAULT_COVERAGE_MM = 320.0
MIN_SLICES, MAX_SLICES = 50, 600


class PatientPosition(str, Enum):
    """Supported patient positions (supine only: "dependent" is always +y)."""

    HFS = "HFS"
    FFS = "FFS"


@dataclass(frozen=True)
class Grid:
    """A canonical axial grid: ``z`` ascending (mm), rows along +y, columns along +x.

    ``x``/``y`` of pixel (row r, column c) are ``centre + (index - (n-1)/2) * spacing``, so the grid is
    symmetric about its centre and a left-right flip maps it onto itself exactly.
    """

    rows: int
    cols: int
    row_spacing: float
    col_spacing: float
    z: tuple[float, ...]
    centre_x: float = 0.0
    centre_y: float = 0.0

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1 or not self.z:
            raise ValueError("a grid needs at least one row, column and slice")
        if self.row_spacing <= 0 or self.col_spacing <= 0:
            raise ValueError("pixel spacing must be positive")
        if any(b <= a for a, b in zip(self.z, self.z[1:], strict=False)):
            raise ValueError("grid z positions must be strictly ascending")

    @classmethod
    def axial(
        cls,
        rows: int,
        cols: int,
        pixel_spacing: float | tuple[float, float],
        slices: int,
        slice_spacing: float,
        centre_z: float = 0.0,
        centre_xy: tuple[float, float] = (0.0, 0.0),
    ) -> Grid:
        """Evenly spaced axial slices centred on ``centre_z`` (positions rounded to µm)."""
        dy, dx = (pixel_spacing, pixel_spacing) if isinstance(pixel_spacing, (int, float)) else pixel_spacing
        half = (slices - 1) / 2.0
        z = tuple(round(centre_z + (k - half) * slice_spacing, 3) for k in range(slices))
        return cls(rows, cols, float(dy), float(dx), z, float(centre_xy[0]), float(centre_xy[1]))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.z), self.rows, self.cols)

    @cached_property
    def x(self) -> np.ndarray:
        """Column centres (mm, +x = patient left), ascending (read-only)."""
        x = self.centre_x + (np.arange(self.cols) - (self.cols - 1) / 2.0) * self.col_spacing
        x.flags.writeable = False
        return x

    @cached_property
    def y(self) -> np.ndarray:
        """Row centres (mm, +y = posterior), ascending (read-only)."""
        y = self.centre_y + (np.arange(self.rows) - (self.rows - 1) / 2.0) * self.row_spacing
        y.flags.writeable = False
        return y

    @property
    def z_array(self) -> np.ndarray:
        return np.asarray(self.z, dtype=np.float64)

    @property
    def slice_spacing(self) -> float:
        return float(np.median(np.diff(self.z))) if len(self.z) > 1 else 0.0

    def with_z(self, z: tuple[float, ...]) -> Grid:
        return Grid(self.rows, self.cols, self.row_spacing, self.col_spacing, z, self.centre_x, self.centre_y)


@dataclass(frozen=True)
class SeriesGeometry:
    """A canonical grid plus how it is written: patient position, slice thickness, instance order."""

    grid: Grid
    position: PatientPosition = PatientPosition.HFS
    slice_thickness: float | None = None

    @property
    def thickness(self) -> float:
        return self.slice_thickness if self.slice_thickness is not None else self.grid.slice_spacing

    @property
    def flip_x(self) -> bool:
        """FFS images run toward patient right along a row: the stored columns are the canonical ones reversed."""
        return self.position is PatientPosition.FFS

    @property
    def orientation(self) -> tuple[float, ...]:
        """ImageOrientationPatient (row direction cosines, then column direction cosines)."""
        row_x = -1.0 if self.flip_x else 1.0
        return (row_x, 0.0, 0.0, 0.0, 1.0, 0.0)

    def instance_order(self) -> list[int]:
        """Canonical slice index for instance 1, 2, ...: HFS starts superior (z descending), FFS inferior."""
        n = len(self.grid.z)
        return list(range(n - 1, -1, -1)) if self.position is PatientPosition.HFS else list(range(n))

    def position_of(self, k: int) -> tuple[float, float, float]:
        """ImagePositionPatient (centre of the first stored pixel) of canonical slice ``k``."""
        x = self.grid.x
        y0 = float(self.grid.y[0])
        x0 = float(x[-1] if self.flip_x else x[0])
        return (x0, y0, float(self.grid.z[k]))

    def to_stored(self, canonical: np.ndarray) -> np.ndarray:
        """A canonical 2D slice in the column order the DICOM file stores."""
        return np.ascontiguousarray(canonical[:, ::-1]) if self.flip_x else canonical


def default_slice_spacing(slices: int, coverage_mm: float = DEFAULT_COVERAGE_MM) -> float:
    """About ``coverage_mm`` over ``slices``, rounded to 0.25 mm and kept within 0.5–5 mm."""
    return min(5.0, max(0.5, round(coverage_mm / slices * 4) / 4))


def default_pixel_spacing(cols: int, fov_mm: float = DEFAULT_FOV_MM) -> float:
    """``fov_mm`` over the columns, rounded to 1/1000 mm."""
    return round(fov_mm / cols, 3)


def format_ds(value: float) -> str:
    """A decimal string of at most 16 characters with no float noise (``-0`` becomes ``0``)."""
    v = round(float(value), 6)
    if v == 0:
        return "0"
    text = f"{v:.6f}".rstrip("0").rstrip(".")
    if len(text) > 16:
        text = f"{v:.10g}"
    return text


def ceil_div(a: float, b: float) -> int:
    return int(math.ceil(a / b - 1e-9))
