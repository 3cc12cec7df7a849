"""operators.geometry kernels against naive references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from operators.geometry import (
    binary_open,
    canonical_view,
    fill_holes,
    largest_component,
    orthogonal_fill,
    resample_separable,
)
from operators.volume import ObliqueVolumeError, Volume
from tests.volume_phantoms import flip_volume, permute_volume


def _trilinear(a: np.ndarray, p: tuple[float, float, float], fill: float) -> float:
    """Naive reference: voxel-extent inside test, edge clamp, 8-corner weights."""
    if any(not (-0.5 <= q <= n - 0.5) for q, n in zip(p, a.shape, strict=True)):
        return fill
    q = [min(max(v, 0.0), n - 1.0) for v, n in zip(p, a.shape, strict=True)]
    lo = [min(int(np.floor(v)), max(n - 2, 0)) for v, n in zip(q, a.shape, strict=True)]
    total = 0.0
    for corner in itertools.product((0, 1), repeat=3):
        idx, w = [], 1.0
        for ax in range(3):
            i = min(lo[ax] + corner[ax], a.shape[ax] - 1)
            f = q[ax] - lo[ax]
            w *= f if corner[ax] else 1.0 - f
            idx.append(i)
        total += w * float(a[tuple(idx)])
    return total


def test_resample_matches_naive_trilinear() -> None:
    rng = np.random.default_rng(3)
    a = rng.normal(size=(7, 9, 11)).astype(np.float32)
    pos = [np.sort(rng.uniform(-1.5, n + 0.5, size=5)) for n in a.shape]
    out = resample_separable(a, pos, fill=-7.0)
    assert out.shape == (5, 5, 5) and out.dtype == np.float32
    for i, j, k in itertools.product(range(5), repeat=3):
        ref = _trilinear(a, (pos[0][i], pos[1][j], pos[2][k]), -7.0)
        assert out[i, j, k] == pytest.approx(ref, abs=1e-5)


def test_resample_int16_and_strided_views() -> None:
    a = (np.arange(6 * 8 * 10).reshape(6, 8, 10) - 200).astype(np.int16)
    view = a[::-1, :, ::-1]
    pos = [np.array([0.0, 2.5, 5.0]), np.array([1.0, 6.25]), np.array([0.5, 9.0])]
    out = resample_separable(view, pos, fill=0.0)
    ref = [[[_trilinear(view, (z, y, x), 0.0) for x in pos[2]] for y in pos[1]] for z in pos[0]]
    np.testing.assert_allclose(out, ref, atol=1e-4)
    assert (resample_separable(a, [np.array([-3.0]), np.array([1.0]), np.array([1.0])], 5.0) == 5.0).all()


def test_canonical_view_undoes_flips_and_permutations() -> None:
    hu = np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32)
    vol = Volume(hu=hu, affine=np.diag([1.0, 2.0, 3.0, 1.0]))
    ref = canonical_view(vol, 5.0)
    for stored in (
        flip_volume(vol, (0, 2)),
        permute_volume(vol, (2, 0, 1)),
        flip_volume(permute_volume(vol, (1, 2, 0)), (1,)),
    ):
        view = canonical_view(stored, 5.0)
        np.testing.assert_array_equal(view.array, ref.array)
        np.testing.assert_allclose(view.affine, ref.affine, atol=1e-12)
        np.testing.assert_allclose(view.spacing, [1.0, 2.0, 3.0])
        assert np.shares_memory(view.array, stored.hu)  # a view, not a copy


def test_canonical_view_refuses_axes_sharing_a_patient_axis() -> None:
    affine = np.eye(4)
    affine[:3, :3] = [[0.7071, 0.7071, 0.0], [0.7071, -0.7071, 0.0], [0.0, 0.0, 1.0]]
    with pytest.raises(ObliqueVolumeError):
        canonical_view(Volume(hu=np.zeros((2, 2, 2), np.float32), affine=affine), 5.0)


def test_morphology_kernels() -> None:
    m = np.zeros((30, 40), bool)
    m[2:18, 2:30] = True  # big block ...
    m[8:11, 12:15] = False  # ... with a hole
    m[22:28, 32:38] = True  # small block
    m[18:20, :] = True  # thin bar touching the big block
    opened = binary_open(m, 2.0, 2.0)
    assert not opened[19, 35] and opened[10, 20] and opened[25, 35]  # thin bar removed, blocks kept
    big = largest_component(opened)
    assert big[10, 20] and not big[25, 35]
    filled = fill_holes(big)
    assert filled[9, 13] and not big[9, 13]
    ring = np.zeros((1, 9, 9), bool)
    ring[0, 2, 2:7] = ring[0, 6, 2:7] = ring[0, 2:7, 2] = ring[0, 2:7, 6] = True
    inside = orthogonal_fill(ring)[0]
    assert inside[4, 4] and not inside[0, 0] and inside.sum() == 25
