"""numpy-only geometry kernels behind the shared preprocessing: reorientation by axis permutation,
separable linear resampling, and the small 2-D binary morphology used to find the body.

Kept apart from ``preprocessing`` so that the pipeline there reads as the written contract, and so that
these kernels can be tested (and timed) on their own. No scipy: serving images must stay small.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from operators.volume import ObliqueVolumeError, Volume

logger = logging.getLogger(__name__)

__all__ = [
    "CanonicalView",
    "binary_open",
    "canonical_view",
    "fill_holes",
    "largest_component",
    "orthogonal_fill",
    "resample_separable",
]

_AXIS_NAMES = ("L/R (x)", "P/A (y)", "S/I (z)")


@dataclass(frozen=True, eq=False)
class CanonicalView:
    """The volume seen on LPS-aligned axes without copying voxels.

    ``array`` is a (possibly negatively strided) view of ``volume.hu`` indexed ``[z, y, x]`` where
    x grows toward patient Left, y toward Posterior, z toward Superior. ``canon_to_source`` maps the
    homogeneous canonical index ``(x, y, z, 1)`` to the source index ``(i, j, k, 1)``; ``affine`` maps
    it to LPS mm exactly (including any residual obliquity, which is below the tolerance).
    """

    array: np.ndarray
    spacing: np.ndarray  # mm along canonical (x, y, z)
    canon_to_source: np.ndarray
    affine: np.ndarray
    obliquity_deg: float


def canonical_view(volume: Volume, max_obliquity_deg: float) -> CanonicalView:
    """Reorient ``volume`` to LPS axes by an axis permutation and flips (a view, no copy).

    Raises:
        ObliqueVolumeError: an axis is more than ``max_obliquity_deg`` off its nearest patient axis,
            or two axes share one patient axis.
    """
    direction = volume.direction
    target = np.argmax(np.abs(direction), axis=0)  # patient axis of each source index axis m
    angles = [math.degrees(math.acos(min(1.0, abs(float(direction[target[m], m]))))) for m in range(3)]
    if len(set(target.tolist())) != 3:
        raise ObliqueVolumeError(
            f"volume axes do not map one-to-one onto patient axes (direction cosines {direction.round(3).tolist()})"
        )
    worst = int(np.argmax(angles))
    if angles[worst] > max_obliquity_deg:
        raise ObliqueVolumeError(
            f"oblique volume: index axis {'ijk'[worst]} is {angles[worst]:.1f} deg off the nearest patient axis "
            f"{_AXIS_NAMES[target[worst]]}; at most {max_obliquity_deg:g} deg can be reoriented by axis "
            "permutation (oblique reformats are not supported)"
        )
    src_of = np.empty(3, dtype=int)  # source index axis m feeding canonical axis a
    src_of[target] = np.arange(3)
    sign = np.sign(direction[np.arange(3), src_of])
    n_src = (volume.shape[2], volume.shape[1], volume.shape[0])  # sizes along i, j, k

    # hu is [k, j, i]: source index axis m lives on array axis 2 - m.
    array = volume.hu.transpose(2 - src_of[2], 2 - src_of[1], 2 - src_of[0])
    flips = tuple(2 - a for a in range(3) if sign[a] < 0)
    if flips:
        array = np.flip(array, axis=flips)

    canon_to_source = np.zeros((4, 4))
    canon_to_source[3, 3] = 1.0
    for a in range(3):
        m = src_of[a]
        canon_to_source[m, a] = sign[a]
        canon_to_source[m, 3] = 0.0 if sign[a] > 0 else n_src[m] - 1
    spacing = volume.spacing[src_of]
    return CanonicalView(
        array=array,
        spacing=spacing,
        canon_to_source=canon_to_source,
        affine=volume.affine @ canon_to_source,
        obliquity_deg=float(max(angles)),
    )


# --------------------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------------------


def _interp_axis(a: np.ndarray, q: np.ndarray, axis: int, fill: float) -> np.ndarray:
    """Linear interpolation of ``a`` at positions ``q`` (index units) along one axis, as float32.

    A sample counts as inside while it lies within the voxel extent ``[-0.5, n - 0.5]`` (edge
    voxels are held constant there); beyond that it is ``fill``.
    """
    n = a.shape[axis]
    inside = (q >= -0.5) & (q <= n - 0.5)
    qc = np.clip(q, 0.0, n - 1.0)
    i0 = np.minimum(np.floor(qc).astype(np.intp), max(n - 2, 0))
    i1 = np.minimum(i0 + 1, n - 1)
    shape = [1] * a.ndim
    shape[axis] = -1
    w = (qc - i0).astype(np.float32).reshape(shape)
    out = np.take(a, i0, axis=axis).astype(np.float32, copy=False)  # take always returns a new array
    hi = np.take(a, i1, axis=axis).astype(np.float32, copy=False)
    hi = hi - out
    hi *= w
    out += hi
    if not inside.all():
        index: list[slice | np.ndarray] = [slice(None)] * a.ndim
        index[axis] = ~inside
        out[tuple(index)] = fill
    return out


def resample_separable(array: np.ndarray, positions: Sequence[np.ndarray], fill: float) -> np.ndarray:
    """Sample ``array`` on the tensor grid ``positions[0] x positions[1] x ...`` (index units).

    Separable linear interpolation, one axis at a time. The source is first cropped to the index
    range the samples touch (a view), and the axis that shrinks the data most is done first, so a
    512x512x300 CT costs a few hundred milliseconds. Out-of-volume samples get ``fill``.
    """
    if len(positions) != array.ndim:
        raise ValueError(f"{len(positions)} position arrays for a {array.ndim}-D array")
    qs = [np.asarray(q, dtype=np.float64) for q in positions]
    crop: list[slice] = []
    for q, n in zip(qs, array.shape, strict=True):
        inside = q[(q >= -0.5) & (q <= n - 0.5)]
        if inside.size == 0:
            return np.full([q.size for q in qs], fill, dtype=np.float32)
        lo = max(0, int(math.floor(inside.min())))
        hi = min(n, int(math.ceil(inside.max())) + 1)
        crop.append(slice(lo, hi))
    # Out-of-range samples are filled by position, so shift them with the crop but keep them out.
    shifted = []
    for q, s, n in zip(qs, crop, array.shape, strict=True):
        outside = (q < -0.5) | (q > n - 0.5)
        qq = q - s.start
        qq[outside] = -np.inf
        shifted.append(qq)
    out = array[tuple(crop)]
    order = sorted(range(array.ndim), key=lambda ax: -(out.shape[ax] / max(1, shifted[ax].size)))
    for ax in order:
        out = _interp_axis(out, shifted[ax], ax, fill)
    return np.asarray(out, dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# 2-D binary morphology (small images: the coarse body analysis grid)
# --------------------------------------------------------------------------------------------------


def _disk(radius_y: float, radius_x: float) -> list[tuple[int, int]]:
    ry, rx = int(math.floor(radius_y)), int(math.floor(radius_x))
    return [
        (dy, dx)
        for dy in range(-ry, ry + 1)
        for dx in range(-rx, rx + 1)
        if (dy / max(radius_y, 1e-9)) ** 2 + (dx / max(radius_x, 1e-9)) ** 2 <= 1.0 + 1e-9
    ]


def _morph(mask: np.ndarray, offsets: list[tuple[int, int]], erode: bool) -> np.ndarray:
    r = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    h, w = mask.shape
    padded = np.pad(mask, r, constant_values=False)
    out = np.ones_like(mask) if erode else np.zeros_like(mask)
    for dy, dx in offsets:
        part = padded[r + dy : r + dy + h, r + dx : r + dx + w]
        if erode:
            out &= part
        else:
            out |= part
    return out


def binary_open(mask: np.ndarray, radius_y: float, radius_x: float) -> np.ndarray:
    """Opening with an elliptical disk (radii in pixels): removes structures thinner than it."""
    offsets = _disk(radius_y, radius_x)
    if len(offsets) <= 1:
        return mask.copy()
    return _morph(_morph(mask, offsets, erode=True), offsets, erode=False)


def _label(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels (0 = background) by vectorised min-label propagation."""
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        p = np.pad(labels, 1, constant_values=big)
        new = np.minimum.reduce([p[1:-1, 1:-1], p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        new = np.where(mask, new, big)
        # pointer jumping: adopt the label of the pixel our label names (speeds up convergence)
        flat = new.ravel()
        jumped = np.where(mask, flat[np.where(mask, new, 1).ravel() - 1].reshape(h, w), big)
        new = np.minimum(new, jumped)
        if np.array_equal(new, labels):
            break
        labels = new
    return np.where(mask, labels, 0)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a 2-D mask (empty in, empty out)."""
    if not mask.any():
        return mask.copy()
    labels = _label(mask)
    values, counts = np.unique(labels[labels > 0], return_counts=True)
    return labels == values[int(np.argmax(counts))]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions of a 2-D mask that do not touch the image border."""
    background = _label(~mask)
    border = np.unique(np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]]))
    outside = np.isin(background, border[border > 0])
    return ~outside


def orthogonal_fill(mask: np.ndarray) -> np.ndarray:
    """Per 2-D slice of ``mask [..., y, x]``: the pixels lying between mask pixels both along their
    row and along their column (an orthogonally convex hull). Vectorised; fills enclosed air like
    the lungs while leaving air beside a narrower body part (neck, gaps next to arms) outside."""
    ny, nx = mask.shape[-2:]
    xs = np.arange(nx)
    ys = np.arange(ny)[:, None]
    row_any = np.asarray(mask.any(axis=-1))
    first_x = mask.argmax(axis=-1)
    last_x = nx - 1 - mask[..., ::-1].argmax(axis=-1)
    in_row = row_any[..., None] & (xs >= first_x[..., None]) & (xs <= last_x[..., None])
    col_any = np.asarray(mask.any(axis=-2))
    first_y = mask.argmax(axis=-2)
    last_y = ny - 1 - mask[..., ::-1, :].argmax(axis=-2)
    in_col = col_any[..., None, :] & (ys >= first_y[..., None, :]) & (ys <= last_y[..., None, :])
    return in_row & in_col
