"""The attention-map SEG: valid DICOM, frames on the right source slices with the right pixels, segments
only for positive image findings, deterministic UIDs, our own output, and within its size budget."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from operators.attention_region import attention_mask
from operators.concepts import SALIENCY, SPATIAL_AND_RELATIONAL_CONCEPT
from operators.dicom_output import save
from operators.results import StudyResult
from operators.seg_writer import (
    DEFAULT_MAX_BYTES,
    FRAME_OVERHEAD_BYTES,
    build_seg,
    estimated_bytes,
    plan_segments,
    write_seg,
)
from operators.sr_writer import build_sr
from operators.uids import is_own_output
from tests.dicom_fixtures import (
    PATIENT_ID,
    CTSeries,
    blob,
    ct_series,
    dciodvfy,
    model_info,
    study_result,
)

needs_dciodvfy = pytest.mark.peers  # dicom3tools must be installed: `make test` installs it; never skipped
KEYS = ["reduced_lv_systolic_function", "cardiomegaly", "pleural_effusion", "lung_nodule", "consolidation"]
#: echo task positive (with a map, which must be ignored), two image findings positive, two absent
PROBS = {
    "reduced_lv_systolic_function": 0.95,
    "cardiomegaly": 0.7,
    "pleural_effusion": 0.9,
    "lung_nodule": 0.2,
}


@pytest.fixture(scope="module")
def series() -> CTSeries:
    return ct_series(n_slices=14, rows=30, cols=26)


@pytest.fixture(scope="module")
def result(series: CTSeries) -> StudyResult:
    n, rows, cols = series.volume.shape[0], 30, 26
    att = {
        "reduced_lv_systolic_function": blob((n, rows, cols), (7, 15, 13), 4.0),
        "cardiomegaly": blob((n, rows, cols), (4, 12, 9), 2.5),  # near the bottom: some slices empty
        "pleural_effusion": blob((n, rows, cols), (10, 18, 17), 3.0) * 0.01,  # small scale: rule is relative
        "lung_nodule": blob((n, rows, cols), (7, 15, 13), 2.0),
    }
    return study_result(series, PROBS, keys=KEYS, attention=att)


@pytest.fixture(scope="module")
def seg_path(series: CTSeries, result: StudyResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_seg(result, series.datasets, tmp_path_factory.mktemp("seg"))
    assert path is not None
    return path


@needs_dciodvfy
def test_binary_seg_passes_dciodvfy(seg_path: Path) -> None:
    errors, warnings = dciodvfy(seg_path)
    assert errors == []
    assert warnings == [], warnings


@needs_dciodvfy
def test_fractional_seg_passes_dciodvfy(series: CTSeries, result: StudyResult, tmp_path: Path) -> None:
    path = write_seg(result, series.datasets, tmp_path, segmentation_type="FRACTIONAL")
    assert path is not None
    errors, warnings = dciodvfy(path)
    assert errors == [] and warnings == [], errors + warnings


def test_segments_only_for_positive_image_findings(seg_path: Path, result: StudyResult) -> None:
    seg = hd.seg.segread(seg_path)
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert labels == ["Attention: Cardiomegaly", "Attention: Pleural effusion"]  # task order; no echo task
    for s, key in zip(seg.SegmentSequence, ["cardiomegaly", "pleural_effusion"], strict=True):
        task = result.task(key)
        assert s.SegmentedPropertyCategoryCodeSequence[0].CodeValue == SPATIAL_AND_RELATIONAL_CONCEPT.value
        assert s.SegmentedPropertyTypeCodeSequence[0].CodeValue == SALIENCY.value
        assert s.AnatomicRegionSequence[0].CodeValue == task.finding_site.value
        assert task.concept.value in s.SegmentDescription and "NOT a lesion outline" in s.SegmentDescription
        assert s.SegmentAlgorithmType == "AUTOMATIC"
        alg = s.SegmentationAlgorithmIdentificationSequence[0]
        assert alg.AlgorithmName == result.model.name and alg.AlgorithmVersion == result.model.version
        assert alg.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # DCM Artificial Intelligence
        assert result.model.manifest_sha256 in alg.AlgorithmParameters
    assert seg.SegmentationType == "BINARY"
    assert "Research use only" in seg.ContentDescription and "RESEARCH" in seg.SeriesDescription


@needs_dciodvfy
def test_sr_references_the_segments(series: CTSeries, result: StudyResult, tmp_path: Path) -> None:
    """With the SEG given, the SR gets one TID 1411 group per segment referencing it, linked to the
    finding's TID 1501 group by Tracking UID, and the SEG is in the SR's evidence."""
    seg = build_seg(result, series.datasets)
    assert seg is not None
    path = save(build_sr(result, series.datasets, segmentation=seg), tmp_path, "SR")
    errors, _ = dciodvfy(path)
    assert errors == []
    sr = hd.sr.srread(path)
    findings = {
        str(g.tracking_uid): str(g.tracking_identifier) for g in sr.content.get_image_measurement_groups()
    }
    regions = sr.content.get_volumetric_roi_measurement_groups()
    assert len(findings) == len(result.tasks) and len(regions) == 2
    for region, segment in zip(regions, seg.SegmentSequence, strict=True):
        ref = region.referenced_segment
        assert ref[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert ref[0].ReferencedSOPSequence[0].ReferencedSegmentNumber == segment.SegmentNumber
        assert str(region.tracking_uid) == segment.TrackingUID
        assert findings[segment.TrackingUID] == str(region.tracking_identifier) == segment.TrackingID
        assert region.finding_type == SALIENCY
    evidence = {
        i.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for i in s.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence


def test_frames_line_up_with_source_slices(seg_path: Path, series: CTSeries, result: StudyResult) -> None:
    seg = pydicom.dcmread(seg_path)
    src = series.by_uid()
    slice_of = {u: k for k, u in enumerate(result.sop_instance_uids)}
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    keys = {1: "cardiomegaly", 2: "pleural_effusion"}
    seen: dict[int, set[int]] = {1: set(), 2: set()}
    for f, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ref = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        number = fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        ipp = [float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient]
        assert ipp == [float(v) for v in src[ref].ImagePositionPatient]
        k = slice_of[ref]
        task = result.task(keys[number])
        want = attention_mask(task.attention, task.effective_saliency_threshold)[k]
        np.testing.assert_array_equal(pixels[f].astype(bool), want)
        seen[number].add(k)
    for number, key in keys.items():  # every non-empty slice present, empty ones omitted
        task = result.task(key)
        mask = attention_mask(task.attention, task.effective_saliency_threshold)
        assert seen[number] == set(np.flatnonzero(mask.any(axis=(1, 2))).tolist())
    assert len(seen[1]) < len(result.sop_instance_uids)  # empty frames were omitted


def test_patient_study_and_frame_of_reference_are_the_source_ones(seg_path: Path, series: CTSeries) -> None:
    seg = pydicom.dcmread(seg_path)
    src = series.datasets[0]
    for kw in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
               "AccessionNumber", "StudyID", "FrameOfReferenceUID"):  # fmt: skip
        assert seg.get(kw) == src.get(kw), kw
    assert seg.PatientID == PATIENT_ID
    refs = seg.ReferencedSeriesSequence[0]
    assert refs.SeriesInstanceUID == series.series_instance_uid
    assert {r.ReferencedSOPInstanceUID for r in refs.ReferencedInstanceSequence} <= set(series.by_uid())


def test_uids_are_deterministic_and_depend_on_the_model(series: CTSeries, result: StudyResult) -> None:
    a, b = build_seg(result, series.datasets), build_seg(result, series.datasets)
    assert a is not None and b is not None
    assert (a.SeriesInstanceUID, a.SOPInstanceUID) == (b.SeriesInstanceUID, b.SOPInstanceUID)
    c = build_seg(replace(result, model=model_info(sha="e" * 64)), series.datasets)
    assert (
        c is not None and c.SOPInstanceUID != a.SOPInstanceUID and c.SeriesInstanceUID != a.SeriesInstanceUID
    )


def test_seg_is_recognised_as_own_output(seg_path: Path, series: CTSeries) -> None:
    assert is_own_output(pydicom.dcmread(seg_path, stop_before_pixels=True))
    assert not is_own_output(series.datasets[0])


def test_no_positive_finding_gives_no_seg(series: CTSeries, result: StudyResult, tmp_path: Path) -> None:
    negative = replace(result, tasks=tuple(replace(t, present=False) for t in result.tasks))
    assert build_seg(negative, series.datasets) is None
    assert write_seg(negative, series.datasets, tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_echo_tasks_never_get_a_segment(series: CTSeries, result: StudyResult) -> None:
    echo_only = replace(result, tasks=(result.task("reduced_lv_systolic_function"),))
    assert echo_only.tasks[0].present and echo_only.tasks[0].attention is not None
    assert plan_segments(echo_only) == []
    assert build_seg(echo_only, series.datasets) is None


def test_positive_without_map_or_with_empty_map_is_skipped(
    series: CTSeries, result: StudyResult, caplog: pytest.LogCaptureFixture
) -> None:
    t = result.task("cardiomegaly")
    no_map = replace(t, attention=None)
    zero = replace(result.task("pleural_effusion"), attention=np.zeros_like(t.attention))
    with caplog.at_level(logging.WARNING, logger="operators.seg_writer"):
        assert build_seg(replace(result, tasks=(no_map, zero)), series.datasets) is None
    text = caplog.text
    assert "cardiomegaly" in text and "pleural_effusion" in text and PATIENT_ID not in text


def test_fractional_values_are_the_normalised_map(series: CTSeries, result: StudyResult) -> None:
    seg = build_seg(result, series.datasets, segmentation_type="FRACTIONAL")
    assert seg is not None and seg.SegmentationType == "FRACTIONAL"
    assert seg.SegmentationFractionalType == "PROBABILITY" and seg.MaximumFractionalValue == 255
    slice_of = {u: k for k, u in enumerate(result.sop_instance_uids)}
    task = result.task("pleural_effusion")
    norm = task.attention / task.attention.max()
    mask = norm >= task.effective_saliency_threshold
    stored = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    checked = 0
    for f, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        if fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber != 2:
            continue
        k = slice_of[fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        want = np.where(mask[k], np.round(norm[k] * 255), 0)
        np.testing.assert_allclose(stored[f], want, atol=1)
        checked += 1
    assert checked > 0


def test_all_frames_kept_on_request(series: CTSeries, result: StudyResult) -> None:
    seg = build_seg(result, series.datasets, omit_empty_frames=False)
    assert seg is not None and int(seg.NumberOfFrames) == 2 * len(result.sop_instance_uids)


def test_wrong_map_geometry_is_refused(series: CTSeries, result: StudyResult) -> None:
    t = result.task("cardiomegaly")
    bad = replace(
        result, tasks=(replace(t, attention=np.ones((len(result.sop_instance_uids), 5, 5), np.float32)),)
    )
    with pytest.raises(ValueError, match="Rows, Columns"):
        build_seg(bad, series.datasets)


# -- size ------------------------------------------------------------------------------------------


def test_size_budget_at_512_matrix(tmp_path: Path) -> None:
    """Worst case per frame at full matrix: 3 segments covering every slice of a 24-slice 512 x 512
    series. Measured bytes per frame bound a 300-slice study: 900 frames x 33.3 kB = 30 MB <= 50 MB.
    (Measured once at full scale, 300 x 512 x 512, 3 segments on every slice: 900 frames, 29.96 MB,
    8.7 s build, 2.2 GB peak memory; 3 realistic blobs: 283 frames, 9.4 MB, 4 s.)"""
    n, keys = 24, ["cardiomegaly", "pleural_effusion", "consolidation"]
    big = ct_series(n_slices=n, rows=512, cols=512, with_pixels=False)
    rng = np.random.default_rng(1)
    att = {k: rng.random((n, 512, 512), dtype=np.float32) for k in keys}  # about half of each slice set
    res = study_result(big, dict.fromkeys(keys, 0.9), keys=keys, attention=att)
    plans = plan_segments(res)
    seg = build_seg(res, big.datasets)
    assert seg is not None and int(seg.NumberOfFrames) == 3 * n
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    size = path.stat().st_size
    per_frame = size / (3 * n)
    assert per_frame <= 512 * 512 / 8 + FRAME_OVERHEAD_BYTES
    assert 300 * 3 * per_frame <= DEFAULT_MAX_BYTES
    assert sum(estimated_bytes(p) for p in plans) >= size - 20_000  # estimate covers frames, not the header


def test_size_budget_drops_least_probable_segments(
    series: CTSeries, result: StudyResult, caplog: pytest.LogCaptureFixture
) -> None:
    plans = plan_segments(result)
    one = max(estimated_bytes(p) for p in plans)
    with caplog.at_level(logging.WARNING, logger="operators.seg_writer"):
        seg = build_seg(result, series.datasets, max_bytes=one)
    assert seg is not None
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Attention: Pleural effusion"]  # p 0.9 > 0.7
    assert "cardiomegaly" in caplog.text
