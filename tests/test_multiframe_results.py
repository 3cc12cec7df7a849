"""SEG, Parametric Map, SR and text SR on a multi-frame source (Legacy Converted / Enhanced CT):
valid DICOM (dciodvfy), and referencing the multi-frame instances, each SEG and map frame by its
source frame."""

from __future__ import annotations

import copy
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from operators.attention_region import attention_mask
from operators.dicom_output import save
from operators.pmap_writer import write_pmaps
from operators.results import StudyResult
from operators.seg_writer import build_seg
from operators.sr_writer import build_sr
from operators.text_report import build_text_sr
from operators.volume import load_dicom_series
from tests.dicom_fixtures import CTSeries, blob, ct_series, dciodvfy, study_result
from tests.multiframe_fixtures import enhanced_ct, legacy_converted

pytestmark = pytest.mark.peers  # dciodvfy (dicom3tools) must be installed; never skipped
KEYS = ["cardiomegaly", "pleural_effusion", "lung_nodule"]
PROBS = {"cardiomegaly": 0.8, "pleural_effusion": 0.9, "lung_nodule": 0.1}
#: The only dciodvfy warning we accept: it does not know private coding schemes (declared in the SR).
PRIVATE_SCHEME = "Unrecognized defined term <99HYPERCT>"


def _multiframe_series(instances: int) -> CTSeries:
    single = ct_series(n_slices=12, rows=30, cols=26)
    parts = legacy_converted(single.datasets, instances=instances)
    if instances == 1:  # a true Enhanced CT, frames from head to feet
        parts = [enhanced_ct(parts[0], frame_order=range(11, -1, -1))]
    return CTSeries(datasets=parts, volume=load_dicom_series(parts))


def _result(series: CTSeries) -> StudyResult:
    n, rows, cols = series.volume.shape
    att = {
        "cardiomegaly": blob((n, rows, cols), (3, 12, 9), 2.0),  # near the bottom: some frames empty
        "pleural_effusion": blob((n, rows, cols), (8, 18, 17), 3.0),
    }
    return study_result(series, PROBS, keys=KEYS, attention=att)


@pytest.fixture(scope="module", params=[1, 3], ids=["one-instance", "three-instances"])
def case(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[CTSeries, StudyResult, dict[str, Path]]:
    series = _multiframe_series(request.param)
    result = _result(series)
    out = tmp_path_factory.mktemp("mf")
    seg = build_seg(result, series.datasets)
    assert seg is not None
    maps = write_pmaps(result, series.datasets, out)
    assert [m.task_key for m in maps] == ["cardiomegaly", "pleural_effusion"]
    sr = build_sr(result, series.datasets, segmentation=seg, parametric_maps=[m.header for m in maps])
    written = {
        "seg": save(seg, out, "SEG"),
        "sr": save(sr, out, "SR"),
        "text": save(build_text_sr(result, series.datasets), out, "TXT"),
        **{f"pmap:{m.task_key}": m.path for m in maps},
    }
    return series, result, written


def _uids(series: CTSeries) -> set[str]:
    return {str(ds.SOPInstanceUID) for ds in series.datasets}


@pytest.mark.parametrize("kind", ["seg", "sr", "text", "pmap:cardiomegaly"])
def test_outputs_pass_dciodvfy(case: tuple[CTSeries, StudyResult, dict[str, Path]], kind: str) -> None:
    errors, warnings = dciodvfy(case[2][kind])
    assert errors == []
    assert all(PRIVATE_SCHEME in w for w in warnings), warnings


def test_seg_frames_reference_their_source_frames(
    case: tuple[CTSeries, StudyResult, dict[str, Path]],
) -> None:
    series, result, written = case
    seg = pydicom.dcmread(written["seg"])
    sources = {str(ds.SOPInstanceUID): ds for ds in series.datasets}
    referenced = {
        str(i.ReferencedSOPInstanceUID)
        for s in seg.ReferencedSeriesSequence
        for i in s.ReferencedInstanceSequence
    }
    assert referenced == _uids(series)
    slice_of = {pos: k for k, pos in enumerate(result.slice_sources)}
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    keys = {1: "cardiomegaly", 2: "pleural_effusion"}
    seen: dict[int, set[int]] = {1: set(), 2: set()}
    for f, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ipp = np.array([float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient])
        k = int(round(series.volume.lps_to_index(ipp)[2]))
        np.testing.assert_allclose(series.volume.index_to_lps([0, 0, k]), ipp, atol=1e-4)
        if len(sources) == 1:  # highdicom names each plane's source frame
            ref = fg.DerivationImageSequence[0].SourceImageSequence[0]
            assert slice_of[(str(ref.ReferencedSOPInstanceUID), int(ref.ReferencedFrameNumber))] == k
            frame = sources[str(ref.ReferencedSOPInstanceUID)].PerFrameFunctionalGroupsSequence[
                int(ref.ReferencedFrameNumber) - 1
            ]
            np.testing.assert_allclose(
                [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient], ipp, atol=1e-4
            )
        number = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        task = result.task(keys[number])
        np.testing.assert_array_equal(
            pixels[f].astype(bool), attention_mask(task.attention, task.effective_saliency_threshold)[k]
        )
        seen[number].add(k)
    for number, key in keys.items():  # every non-empty slice present, empty ones omitted
        task = result.task(key)
        mask = attention_mask(task.attention, task.effective_saliency_threshold)
        assert seen[number] == set(np.flatnonzero(mask.any(axis=(1, 2))).tolist())


def test_parametric_map_frames_are_the_attention_of_their_source_frames(
    case: tuple[CTSeries, StudyResult, dict[str, Path]],
) -> None:
    """Every slice is a frame (OHIF copies the frames into a volume of the source's size), at its
    source frame's position, its values the attention of that slice."""
    series, result, written = case
    pm = pydicom.dcmread(written["pmap:cardiomegaly"])
    attention = result.task("cardiomegaly").attention
    assert int(pm.NumberOfFrames) == len(result.slice_sources) and pm.FrameOfReferenceUID == (
        series.datasets[0].FrameOfReferenceUID
    )
    assert {
        str(i.ReferencedSOPInstanceUID) for i in pm.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    } == (_uids(series))
    slice_of = {pos: k for k, pos in enumerate(result.slice_sources)}
    seen = set()
    for f, fg in enumerate(pm.PerFrameFunctionalGroupsSequence):
        ipp = np.array([float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient])
        k = int(round(series.volume.lps_to_index(ipp)[2]))
        np.testing.assert_allclose(series.volume.index_to_lps([0, 0, k]), ipp, atol=1e-4)
        if len(series.datasets) == 1:  # each frame names its source frame
            ref = fg.DerivationImageSequence[0].SourceImageSequence[0]
            assert slice_of[(str(ref.ReferencedSOPInstanceUID), int(ref.ReferencedFrameNumber))] == k
        np.testing.assert_array_equal(pm.pixel_array[f], attention[k])
        seen.add(k)
    assert seen == set(range(len(result.slice_sources)))


def _evidence(ds: Dataset) -> set[str]:
    return {
        str(i.ReferencedSOPInstanceUID)
        for s in ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for i in s.ReferencedSOPSequence
    }


def test_sr_evidence_and_image_library_are_the_multiframe_instances(
    case: tuple[CTSeries, StudyResult, dict[str, Path]],
) -> None:
    series, _, written = case
    sr = hd.sr.srread(written["sr"])
    seg = pydicom.dcmread(written["seg"], stop_before_pixels=True)
    maps = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for k, p in written.items()
        if k.startswith("pmap:")
    }
    assert _evidence(sr) == _uids(series) | {seg.SOPInstanceUID} | maps
    library = next(
        i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning == "Image Library"
    )
    group = library.ContentSequence[0].ContentSequence
    images = [i for i in group if i.ValueType == "IMAGE"]  # one entry per instance, not per frame
    assert len(images) == len(series.datasets)
    assert {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images} == _uids(series)
    descriptors = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in group if i.ValueType == "NUM"}
    assert float(descriptors["Slice Thickness"].MeasuredValueSequence[0].NumericValue) == 2.5
    assert "Image Orientation (Patient) Row X" in descriptors  # read from the functional groups


def test_text_report_and_results_json_count_frames(
    case: tuple[CTSeries, StudyResult, dict[str, Path]],
) -> None:
    series, result, written = case
    texts = [str(e.value) for e in pydicom.dcmread(written["text"]).iterall() if e.keyword == "TextValue"]
    n = len(series.datasets)
    assert any(f"(12 frames of {n} multi-frame image(s))" in t for t in texts), texts
    data = result.to_dict()
    assert data["n_instances"] == n and len(data["sop_instance_uids"]) == 12
    assert data["frame_numbers"] == list(result.frame_numbers or ()) and len(data["frame_numbers"]) == 12


def test_geometry_repeated_per_frame_still_gives_a_valid_seg(tmp_path: Path) -> None:
    """Orientation and pixel measures in every frame's functional groups instead of the shared ones:
    legal, read alike, and the SEG (highdicom reads them from the shared groups) still lines up."""
    single = ct_series(n_slices=12, rows=30, cols=26)
    (legacy,) = legacy_converted(single.datasets)
    ds = enhanced_ct(legacy)
    shared = ds.SharedFunctionalGroupsSequence[0]
    for group in ("PlaneOrientationSequence", "PixelMeasuresSequence"):
        for item in ds.PerFrameFunctionalGroupsSequence:
            item[group] = copy.deepcopy(shared[group])
        del shared[group]
    series = CTSeries(datasets=[ds], volume=load_dicom_series([ds]))
    np.testing.assert_array_equal(series.volume.hu, single.volume.hu)
    np.testing.assert_allclose(series.volume.affine, single.volume.affine, atol=1e-6)
    seg = build_seg(_result(series), series.datasets)
    assert seg is not None and "PlaneOrientationSequence" not in ds.SharedFunctionalGroupsSequence[0]
    errors, _ = dciodvfy(save(seg, tmp_path, "SEG"))
    assert errors == []
    refs = {
        int(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        for f in seg.PerFrameFunctionalGroupsSequence
    }
    assert refs and refs <= set(range(1, 13))
