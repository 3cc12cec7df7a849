"""operators.volume: DICOM series and NIfTI readers, the Volume geometry helpers, and every refusal."""

from __future__ import annotations

import copy
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
    InvalidMultiFrameError,
    IrregularSpacingError,
    MissingTagError,
    MixedSeriesError,
    MultiFrameNotSupportedError,
    Volume,
    VolumeError,
    load_dicom_series,
    load_nifti,
)
from tests.multiframe_fixtures import enhanced_ct, legacy_converted
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


def test_multiframe_of_another_sop_class_is_refused_by_name(series: list[Dataset]) -> None:
    series[0].NumberOfFrames = 3  # a single-frame SOP class claiming frames
    with pytest.raises(
        MultiFrameNotSupportedError, match=r"multi-frame CT Image Storage \(NumberOfFrames 3\)"
    ):
        load_dicom_series(series)
    (mf,) = legacy_converted(series)
    mf.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    with pytest.raises(MultiFrameNotSupportedError, match="Enhanced MR Image Storage"):
        load_dicom_series([mf])


def test_single_and_multiframe_in_one_series_are_refused(series: list[Dataset]) -> None:
    (mf,) = legacy_converted(series[6:], series_uid=str(series[0].SeriesInstanceUID))
    with pytest.raises(MixedSeriesError, match="single-frame .* and multi-frame .* instances in one series"):
        load_dicom_series([*series[:6], mf])


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
    for cls in (
        IrregularSpacingError,
        GantryTiltError,
        MissingTagError,
        MultiFrameNotSupportedError,
        InvalidMultiFrameError,
    ):
        assert issubclass(cls, VolumeError) and issubclass(cls, ValueError)


# ------------------------------------------------------------------------------------- multi-frame


def _same_volume(vol: Volume, ref: Volume) -> None:
    np.testing.assert_array_equal(vol.hu, ref.hu)
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-6)


def test_legacy_converted_ct_is_the_single_frame_volume(
    tmp_path: Path, small: Volume, series: list[Dataset]
) -> None:
    (mf,) = legacy_converted(series)
    (path,) = write_datasets(tmp_path, [mf])
    vol = load_dicom_series([path])
    _same_volume(vol, load_dicom_series(series))
    _same_volume(vol, small)
    assert (
        vol.sop_instance_uids == (mf.SOPInstanceUID,) * 12 and vol.series_instance_uid == mf.SeriesInstanceUID
    )
    frame_z = {
        n: float(item.PlanePositionSequence[0].ImagePositionPatient[2])
        for n, item in enumerate(mf.PerFrameFunctionalGroupsSequence, start=1)
    }
    assert vol.frame_numbers is not None
    assert [frame_z[n] for n in vol.frame_numbers] == pytest.approx(
        vol.index_to_lps([[0, 0, k] for k in range(12)])[:, 2]
    )


def test_enhanced_ct_frames_in_any_order_with_per_frame_rescale(small: Volume, series: list[Dataset]) -> None:
    (legacy,) = legacy_converted(series)
    order = [int(i) for i in np.random.default_rng(2).permutation(12)]
    ds = enhanced_ct(legacy, frame_order=order, per_frame_rescale=True)
    assert "PixelValueTransformationSequence" not in ds.SharedFunctionalGroupsSequence[0]
    vol = load_dicom_series([ds])
    _same_volume(vol, small)
    assert vol.frame_numbers == tuple(
        order.index(n) + 1 for n in range(11, -1, -1)
    )  # legacy frame 1 is the top


def test_ffs_multiframe_matches_its_single_frame_series(small: Volume) -> None:
    ffs = flip_volume(small, (0, 2))
    (mf,) = legacy_converted(ct_datasets(ffs))
    _same_volume(load_dicom_series([mf]), ffs)


def test_series_of_several_multiframe_instances(tmp_path: Path, small: Volume, series: list[Dataset]) -> None:
    parts = legacy_converted(series, instances=3)
    paths = write_datasets(tmp_path, parts[::-1])
    vol = load_dicom_series(paths)
    _same_volume(vol, small)
    uids = [str(p.SOPInstanceUID) for p in parts]  # consecutive runs from the bottom up
    assert vol.sop_instance_uids == tuple(u for u in uids for _ in range(4))
    assert vol.frame_numbers == (4, 3, 2, 1) * 3
    assert load_dicom_series([*parts, parts[1]]).shape == small.shape  # an exact re-send counts once


def test_compressed_multiframe_is_decoded_frame_by_frame(small: Volume, series: list[Dataset]) -> None:
    from pydicom.uid import RLELossless

    (mf,) = legacy_converted(series)
    mf.compress(RLELossless)
    _same_volume(load_dicom_series([mf]), small)


def test_missing_functional_group_names_file_frame_and_group(tmp_path: Path, series: list[Dataset]) -> None:
    (mf,) = legacy_converted(series)
    del mf.PerFrameFunctionalGroupsSequence[4].PlanePositionSequence
    (path,) = write_datasets(tmp_path, [mf])
    with pytest.raises(MissingTagError) as exc:
        load_dicom_series([path])
    msg = str(exc.value)
    assert f"{path}: frame 5 has no PlanePositionSequence" in msg and "\n" not in msg
    assert exc.value.tags == ("PlanePositionSequence",)


def test_missing_attribute_inside_a_group_names_the_frame(series: list[Dataset]) -> None:
    (mf,) = legacy_converted(series)
    del mf.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    with pytest.raises(
        MissingTagError, match=r"dataset #0 frame 1: missing required attribute\(s\) PixelSpacing"
    ):
        load_dicom_series([mf])


def test_no_functional_groups_is_refused(series: list[Dataset]) -> None:
    (mf,) = legacy_converted(series)
    del mf.PerFrameFunctionalGroupsSequence
    del mf.SharedFunctionalGroupsSequence
    with pytest.raises(MissingTagError, match="no PerFrameFunctionalGroupsSequence for 12 frames"):
        load_dicom_series([mf])


def _patched(path: Path, element: bytes, value: bytes) -> Path:
    """Overwrite the 2-byte value of the first element whose tag + VR + length is ``element``, as a
    damaged file would carry it (pydicom refuses to write such values itself)."""
    data = path.read_bytes()
    at = data.index(element) + len(element)
    path.write_bytes(data[:at] + value + data[at + 2 :])
    return path


NUMBER_OF_FRAMES = b"\x28\x00\x08\x00IS\x02\x00"


@pytest.mark.parametrize(
    ("text", "message"),
    [(b"1\xee", "NumberOfFrames '1\ufffd' is not a number"), (b"11", "has 12 items for NumberOfFrames 11")],
)
def test_bad_frame_count_is_refused(tmp_path: Path, series: list[Dataset], text: bytes, message: str) -> None:
    (mf,) = legacy_converted(series)
    (path,) = write_datasets(tmp_path, [mf])
    with pytest.raises(InvalidMultiFrameError, match=message):
        load_dicom_series([_patched(path, NUMBER_OF_FRAMES, text)])


def _per_frame(mf: Dataset, group: str, frame: int) -> Dataset:
    """Give frame ``frame`` its own copy of a shared functional group; return its item."""
    item = copy.deepcopy(mf.SharedFunctionalGroupsSequence[0][group].value[0])
    setattr(mf.PerFrameFunctionalGroupsSequence[frame - 1], group, [item])
    return item


def test_non_uniform_frames_are_refused_naming_file_and_frame(series: list[Dataset]) -> None:
    (mf,) = legacy_converted(series)
    _per_frame(mf, "PixelMeasuresSequence", 7).PixelSpacing = ["12", "11"]
    with pytest.raises(
        InconsistentGeometryError, match=r"mixed PixelSpacing .*dataset #0 frame 7: \[12.0, 11.0\]"
    ):
        load_dicom_series([mf])
    (mf,) = legacy_converted(series)
    c, s = math.cos(math.radians(10)), math.sin(math.radians(10))
    iop = [f"{c:.6f}", f"{s:.6f}", "0", f"{-s:.6f}", f"{c:.6f}", "0"]
    _per_frame(mf, "PlaneOrientationSequence", 3).ImageOrientationPatient = iop
    with pytest.raises(
        InconsistentOrientationError, match=r"mixed ImageOrientationPatient.*dataset #0 frame 3"
    ):
        load_dicom_series([mf])


def test_duplicate_and_missing_frames_are_refused(series: list[Dataset]) -> None:
    (mf,) = legacy_converted(series)
    frames = mf.PerFrameFunctionalGroupsSequence
    frames[5].PlanePositionSequence = frames[4].PlanePositionSequence
    with pytest.raises(DuplicateSliceError, match=r"frame [56] and SOP .* frame [56]"):
        load_dicom_series([mf])
    (mf,) = legacy_converted(series[:5] + series[6:])
    with pytest.raises(IrregularSpacingError, match="about 1 slice\\(s\\) missing"):
        load_dicom_series([mf])


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
