"""operators.preprocessing: the geometry contract (docs/preprocessing.md) on numpy phantoms."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from operators.geometry import canonical_view
from operators.preprocessing import (
    ModelInput,
    PatientTransform,
    PreprocessingConfig,
    PreprocessingConfigError,
    batch_pad,
    denormalize_images,
    model_map_to_source,
    normalize_images,
    preprocess,
    triplet_indices,
)
from operators.volume import ObliqueVolumeError, Volume, load_dicom_series, load_nifti
from tests.volume_phantoms import (
    chest_phantom,
    ct_datasets,
    flip_volume,
    lps_affine,
    permute_volume,
    read_pixels,
    write_datasets,
    write_nifti_ras,
)

CFG = PreprocessingConfig()
HALF_VOXEL = np.array([1.25, 1.25, 1.0])  # half the default model voxel, (x, y, z) mm
MARKER_IJK = (69, 95, 70)  # inside the right lung of the default phantom


@pytest.fixture(scope="module")
def chest() -> Volume:
    """Full-length chest: 200 x 200 x 150 voxels of 2 x 2 x 2.5 mm (400 x 400 x 375 mm)."""
    return chest_phantom(marker_ijk=MARKER_IJK)


@pytest.fixture(scope="module")
def chest_input(chest: Volume) -> ModelInput:
    return preprocess(chest, CFG)


def _z_ramp(n_slices: int = 180, spacing_z: float = 2.0) -> Volume:
    """HU = -900 + 5 * (z mm - z0): each model slice's value names its patient z exactly."""
    vol = chest_phantom((n_slices, 40, 40), (10.0, 10.0, spacing_z))
    z = vol.index_to_lps(np.stack([np.zeros(n_slices), np.zeros(n_slices), np.arange(n_slices)], -1))[:, 2]
    hu = np.broadcast_to((-900.0 + 5.0 * (z - z[0]))[:, None, None], vol.shape).astype(np.float32)
    return Volume(hu=np.ascontiguousarray(hu), affine=vol.affine)


def _hu_of(images: np.ndarray, cfg: PreprocessingConfig = CFG) -> np.ndarray:
    """Undo the normalisation of ``images [..., 3, H, W]`` back to (clipped) HU."""
    lo, hi = cfg.hu_window
    return denormalize_images(images, cfg).astype(np.float64) * (hi - lo) + lo


# -------------------------------------------------------------------------------- shapes and masks


def test_full_length_chest_gives_55_images(chest_input: ModelInput) -> None:
    m = chest_input
    assert m.images.shape == (55, 3, 144, 144) and m.images.dtype == np.float32
    assert m.mask.shape == (55,) and m.mask.dtype == bool and m.mask.all()
    assert m.info["inplane_centre"] == "body" and m.info["z_centre"] == "lungs"
    assert m.info["empty_slices_removed"] == 0
    hu = _hu_of(m.images)
    assert hu.min() == pytest.approx(-1000.0, abs=1e-3) and hu.max() <= 1000.0 + 1e-3
    np.testing.assert_array_equal(m.transform.slice_index, np.arange(165).reshape(55, 3))


def test_short_scan_drops_empty_slices() -> None:
    m = preprocess(chest_phantom((100, 200, 200)), CFG)  # 250 mm: the 330 mm window overhangs
    # 250 mm of scan (+/- half a slice) holds 125 model slices of 2 mm; 125 % 3 == 2 -> 126 -> 42
    assert m.info["empty_slices_removed"] == 40
    assert m.images.shape == (42, 3, 144, 144) and m.mask.all()
    assert (_hu_of(m.images) > -999.0).reshape(42 * 3, -1).any(axis=1).all()  # no all-air slice kept


def test_all_air_volume_keeps_every_slice() -> None:
    air = Volume(hu=np.full((20, 30, 30), -1000.0, np.float32), affine=lps_affine((5, 5, 5), (0, 0, 0)))
    m = preprocess(air, CFG)
    assert m.n_images == 55 and m.info["body_centroid_lps"] is None and m.info["z_centre"] == "volume"


def test_batch_pad_mask_matches_images(chest_input: ModelInput) -> None:
    short = preprocess(chest_phantom((100, 200, 200)), CFG)
    images, mask = batch_pad([short, chest_input, short])
    assert images.shape == (3, 55, 3, 144, 144) and mask.shape == (3, 55)
    np.testing.assert_array_equal(mask.sum(axis=1), [42, 55, 42])
    for b, m in enumerate([short, chest_input, short]):
        np.testing.assert_array_equal(images[b, : m.n_images], m.images)
        assert mask[b, : m.n_images].all() and not mask[b, m.n_images :].any()
        assert not images[b, m.n_images :].any()
    # every masked-in image is a real one and every masked-out image is padding
    real = np.abs(images).reshape(3, 55, -1).max(axis=2) > 0
    np.testing.assert_array_equal(real, mask)


# ------------------------------------------------------------------------ same patient, same input


def test_dicom_and_nifti_give_identical_input(tmp_path: Path, chest: Volume) -> None:
    dicom = load_dicom_series(write_datasets(tmp_path / "dcm", ct_datasets(chest)))
    nifti = load_nifti(write_nifti_ras(tmp_path / "ct.nii", chest))
    assert not np.array_equal(dicom.hu, nifti.hu)  # RAS storage: in-plane axes reversed
    a, b = preprocess(dicom, CFG), preprocess(nifti, CFG)
    assert a.images.shape == b.images.shape
    assert np.abs(a.images - b.images).max() <= 1e-6
    np.testing.assert_allclose(a.transform.grid_affine, b.transform.grid_affine, atol=1e-6)


def test_ffs_twin_gives_identical_input(tmp_path: Path, chest: Volume) -> None:
    hfs_ds = ct_datasets(chest)
    ffs_ds = ct_datasets(flip_volume(chest, (0, 2)))  # IOP (-1,0,0,0,1,0), reversed slices, x-flipped
    hfs_paths = write_datasets(tmp_path / "hfs", hfs_ds)
    ffs_paths = write_datasets(tmp_path / "ffs", ffs_ds)
    # orientation differs
    assert [float(v) for v in hfs_ds[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in ffs_ds[0].ImageOrientationPatient] == [-1, 0, 0, 0, 1, 0]
    # slice order differs: instance 1 is the most inferior slice in one, the most superior in the other
    z_hfs = [float(ds.ImagePositionPatient[2]) for ds in hfs_ds]
    z_ffs = [float(ds.ImagePositionPatient[2]) for ds in ffs_ds]
    assert z_hfs == sorted(z_hfs) and z_ffs == sorted(z_ffs, reverse=True) and z_ffs == z_hfs[::-1]
    # raw pixels differ: the same slice position is stored x-flipped
    raw_hfs, raw_ffs = read_pixels(hfs_paths[60]), read_pixels(ffs_paths[len(ffs_paths) - 1 - 60])
    assert not np.array_equal(raw_hfs, raw_ffs)
    np.testing.assert_array_equal(raw_hfs, raw_ffs[:, ::-1])

    hfs, ffs = load_dicom_series(hfs_paths), load_dicom_series(ffs_paths)
    assert not np.array_equal(hfs.hu, ffs.hu) and not np.allclose(hfs.affine, ffs.affine)
    a, b = preprocess(hfs, CFG), preprocess(ffs, CFG)
    assert np.abs(a.images - b.images).max() <= 1e-6
    np.testing.assert_allclose(a.transform.grid_affine, b.transform.grid_affine, atol=1e-9)


@pytest.mark.parametrize("order", [(2, 1, 0), (1, 2, 0)])
def test_permuted_storage_gives_identical_input(chest: Volume, chest_input: ModelInput, order: tuple) -> None:
    stored = permute_volume(chest, order)
    m = preprocess(stored, CFG)
    assert np.abs(m.images - chest_input.images).max() <= 1e-6
    maps = np.random.default_rng(0).random((55, 9, 9)).astype(np.float32)
    back = model_map_to_source(maps, m.transform, stored)
    expected = permute_volume(
        Volume(hu=model_map_to_source(maps, chest_input.transform, chest), affine=chest.affine), order
    )
    np.testing.assert_allclose(back, expected.hu, atol=1e-6)


# ----------------------------------------------------------------------- back to patient space


def test_marker_maps_to_model_and_back(chest: Volume, chest_input: ModelInput) -> None:
    t = chest_input.transform
    p = chest.index_to_lps(MARKER_IJK)
    px = t.lps_to_pixel(p)
    n, c = int(px.n), int(px.c)
    assert n >= 0 and c >= 0
    # continuous coordinates round-trip exactly; the nearest model pixel is within half a voxel
    np.testing.assert_allclose(t.pixel_to_lps(n, c, px.row, px.col), p, atol=1e-9)
    row, col = int(np.rint(px.row)), int(np.rint(px.col))
    assert np.all(np.abs(t.pixel_to_lps(n, c, row, col) - p) <= HALF_VOXEL + 1e-9)
    # ... and the image really shows the marker there (it is the brightest pixel around)
    hu = _hu_of(chest_input.images[n])[c]
    patch = hu[row - 4 : row + 5, col - 4 : col + 5]
    assert hu[row, col] == patch.max() and hu[row, col] > 500.0

    one_hot = np.zeros((55, 144, 144), np.float32)
    one_hot[n, row, col] = 1.0
    back = model_map_to_source(one_hot, t, chest, order="nearest")
    assert back.shape == chest.shape
    k, j, i = MARKER_IJK[2], MARKER_IJK[1], MARKER_IJK[0]
    assert back[k, j, i] == 1.0
    lit = chest.index_to_lps(np.argwhere(back > 0)[:, ::-1])
    d = np.abs(lit - p)
    assert d[:, 0].max() <= 2.5 and d[:, 1].max() <= 2.5 and d[:, 2].max() <= 6.0 + 1e-9


def test_coarse_patch_map_lands_on_the_marker(chest: Volume, chest_input: ModelInput) -> None:
    t = chest_input.transform
    px = t.lps_to_pixel(chest.index_to_lps(MARKER_IJK))
    patch = np.zeros((55, 9, 9), np.float32)
    patch[int(px.n), int(px.row) // 16, int(px.col) // 16] = 1.0  # the ViT patch holding the marker
    back = model_map_to_source(patch, t, chest)
    k, j, i = MARKER_IJK[2], MARKER_IJK[1], MARKER_IJK[0]
    assert back[k, j, i] > 0.0
    peak = chest.index_to_lps(np.unravel_index(np.argmax(back), back.shape)[::-1])
    assert np.all(np.abs(peak - chest.index_to_lps(MARKER_IJK))[:2] <= 16 * 2.5)
    assert back.min() == 0.0 and back.max() <= 1.0 + 1e-6


def test_map_onto_other_geometry_uses_the_transform(chest_input: ModelInput) -> None:
    """A source grid that is rotated and shifted against the model grid (general path): a constant
    map lands exactly on the voxels whose patient point the transform says the model shows."""
    c, s = math.cos(math.radians(3)), math.sin(math.radians(3))
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([7.0, 7.0, 9.0])
    affine[:3, 3] = [-230.0, -231.0, -190.0]
    other = Volume(hu=np.zeros((45, 66, 66), np.float32), affine=affine)
    back = model_map_to_source(np.ones((55, 9, 9), np.float32), chest_input.transform, other)
    kji = np.argwhere(np.ones(other.shape, bool))
    shown = chest_input.transform.lps_to_pixel(other.index_to_lps(kji[:, ::-1])).n >= 0
    np.testing.assert_array_equal(back.reshape(-1) > 0, shown)
    assert 0 < shown.mean() < 1


def test_transform_json_round_trip(chest_input: ModelInput) -> None:
    t = chest_input.transform
    again = PatientTransform.from_dict(json.loads(json.dumps(t.to_dict())))
    np.testing.assert_array_equal(again.grid_affine, t.grid_affine)
    np.testing.assert_array_equal(again.slice_index, t.slice_index)
    assert again.grid_shape == t.grid_shape == (165, 144, 144)
    pts = np.array([[0.0, 0.0, 0.0], [30.0, -20.0, 50.0]])
    for a, b in zip(t.lps_to_pixel(pts), again.lps_to_pixel(pts), strict=True):
        np.testing.assert_array_equal(a, b)
    json.dumps(chest_input.info)  # the placement facts are JSON-ready too


# -------------------------------------------------------------------------------- window placement


def test_window_is_centred_on_the_body_not_the_table() -> None:
    body = np.array([35.0, 25.0])  # off the image centre (0, 0); a 15 mm table under the back
    vol = chest_phantom(body_offset_mm=(35.0, 25.0), table_mm=15.0)
    m = preprocess(vol, CFG)
    centre = m.transform.grid_to_lps(71.5, 71.5, 82.0)[:2]
    assert np.all(np.abs(centre - body) <= 3.0), centre
    np.testing.assert_allclose(m.info["window_centre_lps"][:2], centre, atol=1e-9)
    # without the opening the table is part of "the body" and pulls the window toward it
    naive = preprocess(vol, PreprocessingConfig(body_opening_mm=0.0)).info["window_centre_lps"]
    assert naive[1] - body[1] > 6.0
    # and centring on the image instead is a configuration choice
    plain = preprocess(vol, PreprocessingConfig(inplane_centre="volume")).info["window_centre_lps"]
    assert np.all(np.abs(np.asarray(plain[:2])) <= 1.0 + 1e-9)


def test_window_is_centred_on_the_lungs_along_z() -> None:
    vol = chest_phantom((200, 200, 200), lung_z_mm=80.0)  # a 500 mm scan, lungs in its upper part
    m = preprocess(vol, CFG)
    assert m.info["z_centre"] == "lungs"
    assert abs(m.info["window_centre_lps"][2] - 80.0) <= 3.0
    lo, hi = m.info["lung_extent_lps_z"]
    assert -45.0 <= lo <= -30.0 and 190.0 <= hi <= 205.0
    assert m.n_images == 55


# ------------------------------------------------------------------------------------------ triplets


@pytest.mark.parametrize(
    ("count", "expected"), [(1, [0, 0, 0]), (2, [0, 1, 1]), (4, [0, 1, 2]), (5, [0, 1, 2, 3, 4, 4])]
)
def test_slice_count_made_divisible_by_3(count: int, expected: list[int]) -> None:
    from operators.preprocessing import _divisible_by_3

    assert _divisible_by_3(np.arange(count)).tolist() == expected


def test_strided_triplets_reproduce_the_released_code() -> None:
    table = triplet_indices(np.arange(165), "strided")
    expected = {0: [0, 3, 6], 1: [9, 12, 15], 17: [153, 156, 159], 18: [162, 1, 4], 19: [7, 10, 13]}
    expected |= {36: [160, 163, 2], 54: [158, 161, 164]}
    for n, slices in expected.items():
        assert table[n].tolist() == slices
    assert sorted(table.ravel().tolist()) == list(range(165))
    np.testing.assert_array_equal(triplet_indices(np.arange(165), "consecutive")[18], [54, 55, 56])


@pytest.mark.parametrize("mode", ["consecutive", "strided"])
def test_images_show_the_slices_the_transform_names(mode: str) -> None:
    cfg = PreprocessingConfig(triplets=mode, z_centre="volume", inplane_centre="volume")
    m = preprocess(_z_ramp(), cfg)
    assert m.n_images == 55
    z0 = _z_ramp().affine[2, 3]
    shown_z = (_hu_of(m.images, cfg)[:, :, 72, 72] + 900.0) / 5.0 + z0  # [N, 3]
    n, c = np.meshgrid(np.arange(55), np.arange(3), indexing="ij")
    np.testing.assert_allclose(shown_z, m.transform.pixel_to_lps(n, c, 72, 72)[..., 2], atol=1e-3)
    dz = np.diff(shown_z, axis=1)
    if mode == "consecutive":
        np.testing.assert_allclose(dz, 2.0, atol=1e-3)
    else:
        assert np.isclose(dz[0], 6.0, atol=1e-3).all() and not np.isclose(dz[18], 6.0, atol=1e-3).all()


def test_slice_order_superior_to_inferior() -> None:
    up = preprocess(_z_ramp(), PreprocessingConfig(z_centre="volume"))
    down = preprocess(_z_ramp(), PreprocessingConfig(z_centre="volume", slice_order="superior_to_inferior"))
    z_up = up.transform.pixel_to_lps(0, 0, 0, 0)[2]
    z_down = down.transform.pixel_to_lps(0, 0, 0, 0)[2]
    assert z_up < z_down  # image 0 is the most inferior in the default order
    # the same slices in reverse order (compared in HU: the normalisation differs per channel)
    np.testing.assert_allclose(_hu_of(down.images), _hu_of(up.images)[::-1, ::-1], atol=1e-3)


# ------------------------------------------------------------------------------ determinism, scaling


def test_preprocess_is_deterministic(chest: Volume, chest_input: ModelInput) -> None:
    """No randomness here: training augments by cropping a wider window (training/cache.py)."""
    again = preprocess(chest, CFG)
    np.testing.assert_array_equal(again.images, chest_input.images)


def test_imagenet_normalisation_round_trips() -> None:
    unit = np.random.default_rng(0).random((2, 3, 4, 5), dtype=np.float32)
    images = normalize_images(unit.copy(), CFG)
    assert images.dtype == np.float32
    np.testing.assert_allclose(images[:, 1], (unit[:, 1] - 0.456) / 0.224, rtol=1e-6)
    np.testing.assert_allclose(denormalize_images(images, CFG), unit, atol=1e-6)


# ----------------------------------------------------------------------------------------- obliquity


def _rotated(vol: Volume, degrees: float) -> Volume:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    affine = vol.affine.copy()
    affine[:3, :3] = np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ affine[:3, :3]
    return Volume(hu=vol.hu, affine=affine)


def test_oblique_volume_is_refused(chest: Volume) -> None:
    with pytest.raises(ObliqueVolumeError, match=r"20\.0 deg off the nearest patient axis"):
        preprocess(_rotated(chest, 20.0), CFG)


def test_slightly_oblique_volume_keeps_exact_geometry(chest: Volume) -> None:
    tilted = _rotated(chest, 3.0)
    assert canonical_view(tilted, 5.0).obliquity_deg == pytest.approx(3.0)
    m = preprocess(tilted, CFG)
    p = tilted.index_to_lps(MARKER_IJK)
    px = m.transform.lps_to_pixel(p)
    np.testing.assert_allclose(m.transform.pixel_to_lps(px.n, px.c, px.row, px.col), p, atol=1e-9)
    hu = _hu_of(m.images[int(px.n)])[int(px.c)]
    row, col = int(np.rint(px.row)), int(np.rint(px.col))
    assert hu[row, col] == hu[row - 4 : row + 5, col - 4 : col + 5].max() > 500.0


# ---------------------------------------------------------------------------------------------- config


def test_config_round_trip() -> None:
    cfg = PreprocessingConfig(triplets="strided", spacing_mm=(2.0, 2.0, 1.5), n_slices=150)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["schema_version"] == 1 and data["spacing_mm"] == [2.0, 2.0, 1.5]
    assert PreprocessingConfig.from_dict(data) == cfg
    assert PreprocessingConfig.from_dict(CFG.to_dict()) == CFG


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("triplets", "random", "must be one of consecutive, strided"),
        ("spacing_mm", [2.5, 2.5], "list of 3 numbers"),
        ("spacing_mm", [2.5, -1.0, 2.0], "> 0"),
        ("n_slices", 16.5, "integer"),
        ("n_slices", True, "number"),
        ("hu_window", [1000, -1000], "low must be below high"),
        ("train_flip_p", 2.0, r"\[0, 1\]"),
        ("normalize_std", [0.2, 0.0, 0.2], "> 0"),
        ("orientation", "RAS", "must be one of LPS"),
        ("schema_version", 2, "unsupported version 2"),
    ],
)
def test_config_errors_name_the_key(key: str, value: object, match: str) -> None:
    data = CFG.to_dict()
    data[key] = value
    with pytest.raises(PreprocessingConfigError, match=match) as exc:
        PreprocessingConfig.from_dict(data)
    assert exc.value.key == key and f"preprocessing.{key}" in str(exc.value)


def test_config_unknown_and_missing_keys() -> None:
    data = CFG.to_dict()
    data["window_level"] = 40
    with pytest.raises(PreprocessingConfigError, match="unknown key") as exc:
        PreprocessingConfig.from_dict(data)
    assert exc.value.key == "window_level"
    data = CFG.to_dict()
    del data["n_slices"]
    with pytest.raises(PreprocessingConfigError, match="missing key") as exc:
        PreprocessingConfig.from_dict(data)
    assert exc.value.key == "n_slices"
    with pytest.raises(PreprocessingConfigError, match="schema_version"):
        PreprocessingConfig.from_dict({k: v for k, v in CFG.to_dict().items() if k != "schema_version"})


# ---------------------------------------------------------------------------------------------- timing


@pytest.mark.slow
def test_timing_of_a_full_size_ct(capsys: pytest.CaptureFixture[str]) -> None:
    """Not a timed assertion: prints the cost of preprocess (and of mapping a map back) for the report."""
    vol = chest_phantom((300, 512, 512), (0.75, 0.75, 1.25), table_mm=15.0, marker_ijk=None)
    preprocess(vol, CFG)  # warm-up: first touch of the pages
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        m = preprocess(vol, CFG)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    model_map_to_source(np.ones((m.n_images, 9, 9), np.float32), m.transform, vol)
    t_map = time.perf_counter() - t0
    assert m.n_images == 55
    with capsys.disabled():
        print(
            f"\n[timing] preprocess 300x512x512 float32: median {sorted(times)[1]:.2f} s "
            f"(min {min(times):.2f}, max {max(times):.2f}); model_map_to_source 9x9 -> source {t_map:.2f} s"
        )
