"""operators.volume: DICOM series and NIfTI readers, the Volume geometry helpers, and every refusal."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from operators.volume import (
    DuplicateSliceError,
    EmptySeriesError,
    GantryTiltError,
    InconsistentGeometryError,
    InconsistentOrientationError,
    IrregularSpacingError,
    MissingTagError,
    MixedSeriesError,
    MultiFrameNotSupportedError,
    Volume,
    VolumeError,
    load_dicom_series,
    load_nifti,
)
from tests.volume_phantoms import (
    chest_phantom,
    ct_datasets,
    flip_volume,
    permute_volume,
    write_datasets,
    write_nifti_ras,
)


@pytest.fixture(scope="module")
def small() -> Volume:
    return chest_phantom((12, 32, 40), (10.0, 12.0, 25.0))


@pytest.fixture()
def series(small: Volume) -> list[Dataset]:
    return ct_datasets(small)


def _ipp(ds: Dataset) -> list[float]:
    return [float(v) for v in ds.ImagePositionPatient]


# ------------------------------------------------------------------------------------------- reading


def test_series_from_files_in_any_order(tmp_path: Path, small: Volume, series: list[Dataset]) -> None:
    paths = write_datasets(tmp_path, series)
    rng = np.random.default_rng(1)
    shuffled = [paths[n] for n in rng.permutation(len(paths))]
    vol = load_dicom_series(shuffled)
    assert vol.hu.dtype == np.float32
    np.testing.assert_array_equal(vol.hu, small.hu)
    np.testing.assert_allclose(vol.affine, small.affine, atol=1e-9)
    assert vol.sop_instance_uids == tuple(ds.SOPInstanceUID for ds in series)
    assert vol.series_instance_uid == series[0].SeriesInstanceUID
    assert vol.frame_of_reference_uid == series[0].FrameOfReferenceUID


def test_hu_uses_each_slices_rescale(small: Volume, series: list[Dataset]) -> None:
    ds = series[3]
    stored = ds.pixel_array.astype(np.int32) - 1024  # HU
    ds.PixelData = ((stored + 2048) // 2).astype(np.int16).tobytes()  # even HU values only
    ds.RescaleSlope, ds.RescaleIntercept = "2", "-2048"
    vol = load_dicom_series(series)
    expected = small.hu[3].copy()
    expected = ((expected + 2048) // 2) * 2 - 2048
    np.testing.assert_array_equal(vol.hu[3], expected)
    np.testing.assert_array_equal(vol.hu[4], small.hu[4])


def test_ffs_series_sorted_along_its_normal(small: Volume) -> None:
    ffs = flip_volume(small, (0, 2))  # IOP (-1,0,0,0,1,0), instance 1 at the superior end
    vol = load_dicom_series(ct_datasets(ffs))
    np.testing.assert_allclose(vol.affine, ffs.affine, atol=1e-9)
    np.testing.assert_array_equal(vol.hu, ffs.hu)
    assert vol.affine[2, 2] < 0  # k runs toward inferior: the normal of that IOP is -z


def test_volume_helpers(small: Volume) -> None:
    np.testing.assert_allclose(small.spacing, [10.0, 12.0, 25.0])
    np.testing.assert_allclose(small.direction, np.eye(3))
    assert small.shape == (12, 32, 40)
    ijk = np.array([[0, 0, 0], [39, 31, 11], [1.5, 2.25, 3.0]])
    lps = small.index_to_lps(ijk)
    np.testing.assert_allclose(lps[0], small.affine[:3, 3])
    np.testing.assert_allclose(small.lps_to_index(lps), ijk, atol=1e-12)


def test_volume_validates_itself() -> None:
    with pytest.raises(VolumeError, match="3-D"):
        Volume(hu=np.zeros((4, 4), np.float32), affine=np.eye(4))
    with pytest.raises(VolumeError, match="float32 or int16"):
        Volume(hu=np.zeros((2, 4, 4)), affine=np.eye(4))
    with pytest.raises(VolumeError, match="singular"):
        Volume(hu=np.zeros((2, 4, 4), np.float32), affine=np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(VolumeError, match="SOP Instance UIDs"):
        Volume(hu=np.zeros((2, 4, 4), np.int16), affine=np.eye(4), sop_instance_uids=("1",))


def test_single_slice_takes_its_step_from_the_header(series: list[Dataset]) -> None:
    vol = load_dicom_series(series[4:5])
    assert vol.shape[0] == 1 and vol.spacing[2] == pytest.approx(25.0)  # SliceThickness


def test_exact_resend_is_used_once(small: Volume, series: list[Dataset]) -> None:
    vol = load_dicom_series([*series, series[5]])
    assert vol.shape == small.shape


@pytest.mark.parametrize("storage", ["hfs", "ffs", "coronal"])
def test_matches_simpleitk(tmp_path: Path, small: Volume, storage: str) -> None:
    """Peer check: SimpleITK/GDCM reads the same voxels and the same geometry (dev extra only)."""
    import SimpleITK as sitk

    stored = {"hfs": small, "ffs": flip_volume(small, (0, 2)), "coronal": permute_volume(small, (0, 2, 1))}[
        storage
    ]
    write_datasets(tmp_path, ct_datasets(stored))
    ours = load_dicom_series(sorted(tmp_path.glob("*.dcm")))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path)))
    image = reader.Execute()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), ours.hu)
    affine = np.eye(4)
    affine[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    np.testing.assert_allclose(ours.affine, affine, atol=1e-6)


# ------------------------------------------------------------------------------------------ refusals


def test_missing_slice_names_the_gap(series: list[Dataset]) -> None:
    del series[6]
    with pytest.raises(IrregularSpacingError) as exc:
        load_dicom_series(series)
    msg = str(exc.value)
    assert "gap of 50.00 mm" in msg and "steps 25.00 mm" in msg
    assert "sorted slices 5 and 6" in msg and "about 1 slice(s) missing" in msg


def test_gantry_tilt_is_refused(series: list[Dataset]) -> None:
    for k, ds in enumerate(series):
        x, y, z = _ipp(ds)
        ds.ImagePositionPatient = [f"{x:g}", f"{y + k * 25.0 * math.tan(math.radians(15)):.4f}", f"{z:g}"]
    series[0].GantryDetectorTilt = "15"
    with pytest.raises(GantryTiltError, match=r"gantry tilt: .*15\.00 deg off the slice normal"):
        load_dicom_series(series)


def test_mixed_orientation_is_refused(series: list[Dataset]) -> None:
    c, s = math.cos(math.radians(10)), math.sin(math.radians(10))
    series[4].ImageOrientationPatient = [f"{c:.6f}", f"{s:.6f}", "0", f"{-s:.6f}", f"{c:.6f}", "0"]
    with pytest.raises(InconsistentOrientationError, match="mixed ImageOrientationPatient"):
        load_dicom_series(series)


def test_enhanced_ct_is_refused_by_name(series: list[Dataset]) -> None:
    series[0].SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    series[0].NumberOfFrames = 12
    with pytest.raises(MultiFrameNotSupportedError, match="Enhanced CT Image Storage"):
        load_dicom_series(series[:1])


def test_unknown_multiframe_is_refused(series: list[Dataset]) -> None:
    series[0].NumberOfFrames = 3
    with pytest.raises(MultiFrameNotSupportedError, match="NumberOfFrames=3"):
        load_dicom_series(series)


def test_missing_tags_are_named(series: list[Dataset]) -> None:
    del series[2].PixelSpacing
    del series[2].RescaleIntercept
    with pytest.raises(MissingTagError) as exc:
        load_dicom_series(series)
    assert exc.value.tags == ("PixelSpacing", "RescaleIntercept")
    assert "PixelSpacing, RescaleIntercept" in str(exc.value)


def test_missing_pixel_data_is_named(series: list[Dataset]) -> None:
    del series[1].PixelData
    with pytest.raises(MissingTagError, match="PixelData"):
        load_dicom_series(series)


def test_duplicate_positions_are_refused(series: list[Dataset]) -> None:
    series[5].ImagePositionPatient = series[4].ImagePositionPatient
    with pytest.raises(DuplicateSliceError, match="duplicate slice position"):
        load_dicom_series(series)


def test_mixed_rows_columns_are_refused(series: list[Dataset]) -> None:
    ds = series[3]
    ds.Rows, ds.Columns = 16, 80
    with pytest.raises(InconsistentGeometryError, match=r"mixed Rows x Columns in one series: 16x80, 32x40"):
        load_dicom_series(series)


def test_mixed_series_are_refused(series: list[Dataset]) -> None:
    series[0].SeriesInstanceUID = generate_uid()
    with pytest.raises(MixedSeriesError, match="SeriesInstanceUID"):
        load_dicom_series(series)


def test_no_input_is_refused() -> None:
    with pytest.raises(EmptySeriesError):
        load_dicom_series([])


def test_errors_share_one_base_class() -> None:
    for cls in (IrregularSpacingError, GantryTiltError, MissingTagError, MultiFrameNotSupportedError):
        assert issubclass(cls, VolumeError) and issubclass(cls, ValueError)


# ------------------------------------------------------------------------------------------- NIfTI


def test_nifti_ras_becomes_lps(tmp_path: Path, small: Volume) -> None:
    path = write_nifti_ras(tmp_path / "ct.nii.gz", small)
    vol = load_nifti(path)
    assert vol.hu.dtype == np.float32 and vol.sop_instance_uids is None
    # stored in RAS array order: both in-plane axes reversed against the LPS original
    expected = flip_volume(small, (0, 1))
    np.testing.assert_array_equal(vol.hu, expected.hu)
    np.testing.assert_allclose(vol.affine, expected.affine, atol=1e-6)
    np.testing.assert_allclose(vol.index_to_lps([0, 0, 0]), small.index_to_lps([39, 31, 0]), atol=1e-6)


def test_nifti_explicit_rescale(tmp_path: Path) -> None:
    import nibabel as nib

    raw = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    nib.save(nib.Nifti1Image(raw, np.eye(4)), str(tmp_path / "raw.nii"))
    vol = load_nifti(tmp_path / "raw.nii", slope=2.0, intercept=-1024.0)
    np.testing.assert_array_equal(vol.hu, raw.transpose(2, 1, 0).astype(np.float32) * 2 - 1024)

    scaled = nib.Nifti1Image(raw, np.eye(4))
    scaled.header.set_slope_inter(1.0, -1024.0)
    nib.save(scaled, str(tmp_path / "scaled.nii"))
    np.testing.assert_array_equal(load_nifti(tmp_path / "scaled.nii").hu, raw.transpose(2, 1, 0) - 1024.0)
    with pytest.raises(VolumeError, match="would apply twice"):
        load_nifti(tmp_path / "scaled.nii", intercept=-1024.0)
