"""Turn a phantom into HU slices and volumes on a grid: analytic shapes, then noise, then 12-bit storage.

``render_volume`` is the fast path for tests and training code: the HU volume exactly as the DICOM
series stores it, plus a boolean ground-truth mask per planted finding, without writing any file.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from synth.geometry import Grid
from synth.phantom import Phantom
from synth.raster import Canvas
from synth.tissues import HU_MAX, HU_MIN

log = logging.getLogger(__name__)

#: Stored value = HU - RESCALE_INTERCEPT, 12 bits (0..4095).
RESCALE_INTERCEPT = -1024
STORED_MAX = 4095

#: Reference voxel of ``Anatomy.noise_sd``: 0.75 mm pixels, 1.25 mm slices.
_REF_PIXEL_AREA, _REF_THICKNESS = 0.75 * 0.75, 1.25


def noise_sigma(ph: Phantom, grid: Grid, thickness: float) -> float:
    """Noise SD for this voxel size: quantum noise falls with the square root of the voxel volume."""
    area = grid.row_spacing * grid.col_spacing
    factor = math.sqrt(_REF_PIXEL_AREA / area) * math.sqrt(_REF_THICKNESS / max(thickness, 0.1))
    return ph.anatomy.noise_sd * min(1.6, max(0.3, factor))


#: SD of the smoothed uniform noise before scaling: int8 uniform (SD 73.9) through [1,2,1] x [1,2,1] (x 6).
_RAW_NOISE_SD = 6.0 * math.sqrt((256.0**2 - 1.0) / 12.0)


def noise_slice(seed: int, k: int, shape: tuple[int, int], sigma: float, stream: int = 2) -> np.ndarray:
    """Mildly correlated (CT-like) noise of SD ``sigma`` for canonical slice ``k``, seeded by (seed, stream, k)
    so that twins on one grid share it.

    Uniform random bytes smoothed by [1,2,1] in x and y: the weighted sum of 16 samples is Gaussian to
    within plotting accuracy (central limit) and ten times cheaper than ``standard_normal``."""
    rows, cols = shape
    rng = np.random.default_rng([int(seed), int(stream), int(k)])
    n = (
        np.frombuffer(rng.bytes((rows + 2) * (cols + 2)), dtype=np.int8)
        .astype(np.float32)
        .reshape(rows + 2, cols + 2)
    )
    n += np.float32(0.5)  # int8 has mean -0.5
    s = n[:, 1:-1] * np.float32(2.0)
    s += n[:, :-2]
    s += n[:, 2:]
    t = s[1:-1] * np.float32(2.0)
    t += s[:-2]
    t += s[2:]
    t *= np.float32(sigma / _RAW_NOISE_SD)
    return t


def to_stored(hu: np.ndarray) -> np.ndarray:
    """HU (float) -> stored uint16 (rounded, clipped to [-1024, 3071] HU)."""
    out = np.rint(hu)
    np.clip(out, HU_MIN, HU_MAX, out=out)
    out -= RESCALE_INTERCEPT
    return out.astype(np.uint16)


def render_hu_slice(
    ph: Phantom,
    grid: Grid,
    k: int,
    *,
    contrast: bool = False,
    noise: bool = True,
    thickness: float | None = None,
    record: bool = False,
    sub_samples: int = 1,
) -> tuple[np.ndarray, Canvas]:
    """HU (float32) of canonical slice ``k``; with ``sub_samples`` > 1 the slab of ``thickness`` is averaged
    (partial volume of thick slices). Returns the centre canvas too (codes + recorded masks)."""
    z = grid.z[k]
    thick = thickness if thickness is not None else (grid.slice_spacing or 1.0)
    cv = ph.canvas(grid.x, grid.y, z, record=record)
    hu = ph.hu_slice(cv, contrast)
    if sub_samples > 1:
        offsets = (np.arange(sub_samples) - (sub_samples - 1) / 2.0) * (thick / sub_samples)
        acc = np.zeros_like(hu)
        for off in offsets:
            acc += hu if abs(off) < 1e-9 else ph.hu_slice(ph.canvas(grid.x, grid.y, z + float(off)), contrast)
        hu = acc / np.float32(sub_samples)
    if noise:
        hu += noise_slice(ph.seed, k, hu.shape, noise_sigma(ph, grid, thick))
    return hu, cv


@dataclass
class RenderedVolume:
    """A rendered grid: ``hu`` (int16, axes z ascending / rows +y / cols +x) equals what the DICOM series
    stores after rescale; ``masks`` maps finding id -> bool volume; ``tissue`` the code map (optional)."""

    grid: Grid
    hu: np.ndarray
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    tissue: np.ndarray | None = None
    finding_tasks: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def task_mask(self, column: str) -> np.ndarray:
        """Union of the masks of the findings that make CT-RATE column ``column`` positive."""
        out = np.zeros(self.hu.shape, dtype=bool)
        for fid, m in self.masks.items():
            if column in self.finding_tasks.get(fid, ()):
                out |= m
        return out


def render_volume(
    ph: Phantom,
    grid: Grid,
    *,
    contrast: bool = False,
    noise: bool = True,
    masks: bool = True,
    tissue: bool = False,
    thickness: float | None = None,
    supersample: int = 1,
    sub_samples: int = 1,
) -> RenderedVolume:
    """Render ``ph`` on ``grid`` without writing DICOM.

    With the defaults the HU equal what a DICOM series of the same grid stores (same noise stream).
    ``supersample`` > 1 averages s×s sub-pixels (partial volume, for coarse grids such as 2.5 mm; the masks
    then mark pixels touched by the finding), ``sub_samples`` > 1 averages the slab of ``thickness``.
    ``tissue`` also returns the tissue-code map (``synth.tissues.T``) of the pixel centres.
    """
    nz, ny, nx = grid.shape
    s = max(1, int(supersample))
    fine = grid
    if s > 1:
        fine = Grid(
            ny * s, nx * s, grid.row_spacing / s, grid.col_spacing / s, grid.z, grid.centre_x, grid.centre_y
        )
    thick = thickness if thickness is not None else (grid.slice_spacing or 1.0)
    sigma = noise_sigma(ph, grid, thick)
    hu = np.empty((nz, ny, nx), dtype=np.int16)
    tis = np.empty((nz, ny, nx), dtype=np.uint8) if tissue else None
    out_masks: dict[str, np.ndarray] = {}
    if masks:
        for f in ph.findings:
            out_masks[f.id] = np.zeros((nz, ny, nx), dtype=bool)
    for k in range(nz):
        h, cv = render_hu_slice(
            ph,
            fine,
            k,
            contrast=contrast,
            noise=False,
            thickness=thick,
            record=masks,
            sub_samples=sub_samples,
        )
        if s > 1:
            h = h.reshape(ny, s, nx, s).mean(axis=(1, 3), dtype=np.float32)
        if noise:
            h += noise_slice(ph.seed, k, h.shape, sigma)
        hu[k] = to_stored(h).astype(np.int32) + RESCALE_INTERCEPT
        if tis is not None:
            tis[k] = cv.t[s // 2 :: s, s // 2 :: s] if s > 1 else cv.t
        for fid, m in cv.masks.items():
            out_masks[fid][k] = m.reshape(ny, s, nx, s).any(axis=(1, 3)) if s > 1 else m
    return RenderedVolume(grid, hu, out_masks, tis, {f.id: f.columns for f in ph.findings})
