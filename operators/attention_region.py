"""The region of an attention map that the SEG shows: the relative rule and the focal rule.

Why two rules (``docs/results.md`` §4). The **relative** region, ``attention >= t x max``, is what
the per-task threshold ``t`` was calibrated for, but an attention map is smooth and wide: on the demo
study it covered 747 mL over 102 of 160 slices, most of the chest, labelled with the heart as its
site. The **focal** region keeps what a reader would call a focus: inside the body and inside the
relative region, the voxels of highest attention up to a share of the body and a volume cap, then
the largest connected component(s). It is therefore a subset of the relative region by construction,
never larger than the cap, and connected when one component is kept.

Numpy only (serving images carry no scipy): the body is the per-slice orthogonal fill of the tissue
above a HU threshold (so the lungs, enclosed by the chest wall, count as body and the air around the
patient does not); components are labelled on the selected voxels alone, by vectorised min-label
propagation with pointer jumping, so memory follows the region, not the volume.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from operators.geometry import orthogonal_fill
from operators.settings import FocalRegion
from operators.volume import Volume

logger = logging.getLogger(__name__)

__all__ = ["Body", "attention_mask", "focal_mask", "largest_components"]


@dataclass(frozen=True, eq=False)
class Body:
    """The voxels inside the patient on the source geometry (the attention maps' slice order) and the
    volume of one voxel: what the focal rule needs from the CT besides the map."""

    mask: np.ndarray  # bool [slices, rows, cols]
    voxel_ml: float

    def __post_init__(self) -> None:
        if self.mask.ndim != 3 or self.mask.dtype != bool:
            shape = f"{self.mask.dtype} {self.mask.shape}"
            raise ValueError(f"Body.mask must be a bool array [slices, rows, cols], got {shape}")
        if not self.voxel_ml > 0:
            raise ValueError(f"Body.voxel_ml must be > 0, got {self.voxel_ml}")

    @classmethod
    def of(cls, volume: Volume, threshold_hu: float) -> Body:
        """The body of a loaded CT: per slice, the orthogonal fill of the voxels above
        ``threshold_hu`` (slice by slice, so the peak memory is one slice's, not the volume's)."""
        mask = np.empty(volume.hu.shape, dtype=bool)
        for k, hu in enumerate(volume.hu):
            mask[k] = orthogonal_fill(hu > threshold_hu)
        return cls(mask=mask, voxel_ml=float(np.prod(volume.spacing)) / 1000.0)


def attention_mask(attention: np.ndarray, relative_threshold: float) -> np.ndarray:
    """The relative region: voxels whose attention is at least ``relative_threshold`` x the map's
    maximum (bool).

    Relative, because attention maps are not calibrated across studies or tasks; an all-zero (or
    negative) map has no attention and gives an empty mask.
    """
    if not 0.0 < relative_threshold <= 1.0:
        raise ValueError(f"saliency threshold must be in (0, 1], got {relative_threshold!r}")
    peak = float(np.max(attention)) if attention.size else 0.0
    if not peak > 0.0:
        return np.zeros(attention.shape, dtype=bool)
    return np.asarray(attention >= relative_threshold * peak)


def focal_mask(attention: np.ndarray, relative_threshold: float, body: Body, rule: FocalRegion) -> np.ndarray:
    """The focal region (bool, the map's shape): inside ``body`` and the relative region, the
    highest-attention voxels, at most ``rule.top_percent`` % of the body's voxels and
    ``rule.max_volume_ml``, reduced to the ``rule.components`` largest face-connected components.

    Voxels tied at the cut-off are all left out rather than some picked by memory order, so the
    region never exceeds its budget and does not depend on how the array is laid out.
    """
    if attention.shape != body.mask.shape:
        raise ValueError(f"attention shape {attention.shape} is not the body's {body.mask.shape}")
    candidates = attention_mask(attention, relative_threshold) & body.mask
    budget = min(
        math.ceil(rule.top_percent / 100.0 * int(np.count_nonzero(body.mask))),
        math.floor(rule.max_volume_ml / body.voxel_ml),
    )
    values = attention[candidates]
    if budget < 1 or values.size == 0:
        return np.zeros(attention.shape, dtype=bool)
    if values.size > budget:
        cut = np.partition(values, values.size - budget)[values.size - budget]  # the budget-th highest
        above = candidates & (attention >= cut)
        candidates = above if np.count_nonzero(above) <= budget else candidates & (attention > cut)
    return largest_components(candidates, rule.components)


def largest_components(mask: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` largest face-connected (6-connected) components of a 3-D mask; among components
    of equal size, the one whose first voxel (C order) comes first wins."""
    flat = np.flatnonzero(mask)
    if flat.size == 0:
        return np.zeros(mask.shape, dtype=bool)
    labels = _labels(flat, mask.shape)
    sizes = np.bincount(labels)
    roots = np.flatnonzero(sizes)
    kept = roots[np.lexsort((roots, -sizes[roots]))][:count]
    out = np.zeros(mask.size, dtype=bool)
    out[flat[np.isin(labels, kept)]] = True
    return out.reshape(mask.shape)


def _labels(flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Component label of each voxel of ``flat`` (sorted flat indices into ``shape``): the position in
    ``flat`` of the component's first voxel.

    Each voxel starts with its own position; every round, both voxels of each face-neighbour pair take
    the smaller label, then each voxel adopts the label its label has (pointer jumping). A label is
    always a member of the voxel's component no later than the voxel, so the rounds end when every
    pair agrees, i.e. each component carries its first voxel's position.
    """
    coords = np.unravel_index(flat, shape)
    strides = np.cumprod((1, *shape[:0:-1]))[::-1]
    firsts, seconds = [], []
    for axis, stride in enumerate(strides):
        inside = np.flatnonzero(coords[axis] < shape[axis] - 1)
        neighbour = flat[inside] + stride
        at = np.minimum(np.searchsorted(flat, neighbour), flat.size - 1)
        hit = flat[at] == neighbour
        firsts.append(inside[hit])
        seconds.append(at[hit])
    a, b = np.concatenate(firsts), np.concatenate(seconds)
    labels = np.arange(flat.size)
    while True:
        low = np.minimum(labels[a], labels[b])
        new = labels.copy()
        np.minimum.at(new, a, low)
        np.minimum.at(new, b, low)
        new = new[new]
        if np.array_equal(new, labels):
            return labels
        labels = new
