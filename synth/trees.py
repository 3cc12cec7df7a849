"""Branching tubular trees (pulmonary vessels, airways) that fill the lungs.

A tree grows from a hilar root toward the centroid of a cloud of target points inside the lung, then
splits the cloud along its principal axis and recurses: cheap, deterministic for a seed, and it
gives vessels that taper from the hilum to the periphery like real ones.
"""

from __future__ import annotations

import logging

import numpy as np

from synth.raster import Tubes

log = logging.getLogger(__name__)


def grow_tree(
    root: np.ndarray,
    targets: np.ndarray,
    r0: float,
    rng: np.random.Generator,
    *,
    depth: int,
    shrink: float = 0.8,
    min_r: float = 1.0,
    reach: float = 0.55,
) -> Tubes:
    """Grow a tree of capsule segments from ``root`` toward ``targets`` (N, 3).

    Each node moves ``reach`` of the way to the centroid of its targets, then the targets are split
    in two by the plane through their centroid normal to their principal axis; leaves go all the way.
    """
    p0: list[np.ndarray] = []
    p1: list[np.ndarray] = []
    rr: list[float] = []
    stack = [(np.asarray(root, dtype=np.float64), np.asarray(targets, dtype=np.float64), r0, depth)]
    while stack:
        p, tg, r, d = stack.pop()
        if len(tg) == 0:
            continue
        c = tg.mean(axis=0)
        v = c - p
        length = float(np.linalg.norm(v))
        if length < 2.0:
            continue
        leaf = d == 0 or len(tg) < 4 or r * shrink < min_r
        step = length if leaf else length * reach
        step = min(step, 90.0)
        end = p + v / length * step + rng.normal(0.0, 0.8, 3)
        p0.append(p)
        p1.append(end)
        rr.append(r)
        if leaf:
            continue
        centred = tg - c
        _, vecs = np.linalg.eigh(centred.T @ centred)
        side = centred @ vecs[:, -1] >= 0
        stack.append((end, tg[side], r * shrink, d - 1))
        stack.append((end, tg[~side], r * shrink, d - 1))
    if not p0:
        return Tubes(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0))
    return Tubes(np.array(p0), np.array(p1), np.array(rr))
