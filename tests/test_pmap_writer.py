"""The saliency Parametric Maps: valid DICOM, one per positive image finding in its own series, every
source slice a frame holding exactly the attention map, the Saliency quantity and no units, the
source's patient/study/frame of reference, deterministic UIDs, our own output, within a budget, and
referenced from the finding's TID 1501 group of the SR."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from operators.concepts import VISUAL_EXPLANATION
from operators.dicom_output import save
from operators.pmap_writer import WrittenMap, build_pmap, estimated_bytes, plan_maps, write_pmaps
from operators.results import StudyResult
from operators.sr_writer import build_sr
from operators.uids import SERIES_NUMBERS, is_own_output
from tests.dicom_fixtures import PATIENT_ID, CTSeries, blob, ct_series, dciodvfy, model_info, study_result

needs_dciodvfy = pytest.mark.peers  # dicom3tools must be installed: `make test` installs it; never skipped
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
KEYS = ["reduced_lv_systolic_function", "cardiomegaly", "pleural_effusion", "lung_nodule"]
#: echo task positive (with a map, which must be ignored), two image findings positive, one absent
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
    n, rows, cols = series.volume.shape
    att = {
        "reduced_lv_systolic_function": blob((n, rows, cols), (7, 15, 13), 4.0),
        "cardiomegaly": blob((n, rows, cols), (4, 12, 9), 2.5),
        "pleural_effusion": blob((n, rows, cols), (10, 18, 17), 3.0) * 0.01,  # small values stay exact
        "lung_nodule": blob((n, rows, cols), (7, 15, 13), 2.0),
    }
    return study_result(series, PROBS, keys=KEYS, attention=att)


@pytest.fixture(scope="module")
def maps(series: CTSeries, result: StudyResult, tmp_path_factory: pytest.TempPathFactory) -> list[WrittenMap]:
    return write_pmaps(result, series.datasets, tmp_path_factory.mktemp("pmap"))


@needs_dciodvfy
def test_maps_pass_dciodvfy_without_a_warning(maps: list[WrittenMap]) -> None:
    for m in maps:
        errors, warnings = dciodvfy(m.path)
        assert errors == [] and warnings == [], (m.task_key, errors + warnings)


def test_one_map_per_positive_image_finding_each_its_own_series(maps: list[WrittenMap]) -> None:
    assert [m.task_key for m in maps] == ["cardiomegaly", "pleural_effusion"]  # task order; no echo task
    headers = [pydicom.dcmread(m.path, stop_before_pixels=True) for m in maps]
    assert {str(ds.SOPClassUID) for ds in headers} == {PARAMETRIC_MAP}
    assert len({ds.SeriesInstanceUID for ds in headers}) == 2  # OHIF shows one map per series
    for ds, name in zip(headers, ["Cardiomegaly", "Pleural effus"], strict=True):
        assert ds.SeriesNumber == SERIES_NUMBERS["pmap"] and ds.InstanceNumber == 1
        assert ds.SeriesDescription.startswith(f"HyperCT saliency: {name}")
        assert ds.SeriesDescription.endswith("RESEARCH ONLY") and "Research use only" in ds.ContentDescription


def test_every_source_slice_is_a_frame_holding_the_attention(
    maps: list[WrittenMap], series: CTSeries, result: StudyResult
) -> None:
    """Frames are matched to source slices by SOPInstanceUID (file and InstanceNumber orders differ
    from the slice order here); values are the float32 attention, bit for bit."""
    src = series.by_uid()
    slice_of = {u: k for k, u in enumerate(result.sop_instance_uids)}
    for m in maps:
        pm = pydicom.dcmread(m.path)
        attention = result.task(m.task_key).attention
        assert pm.pixel_array.dtype == np.float32 and int(pm.NumberOfFrames) == len(slice_of)
        seen = set()
        for f, fg in enumerate(pm.PerFrameFunctionalGroupsSequence):
            ref = str(fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            ipp = [float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient]
            assert ipp == [float(v) for v in src[ref].ImagePositionPatient]
            np.testing.assert_array_equal(pm.pixel_array[f], attention[slice_of[ref]])
            seen.add(ref)
        assert seen == set(slice_of)


def test_real_world_value_mapping_is_saliency_without_units(
    maps: list[WrittenMap], result: StudyResult
) -> None:
    for m in maps:
        pm = pydicom.dcmread(m.path, stop_before_pixels=True)
        (rwvm,) = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence
        quantity = rwvm.QuantityDefinitionSequence[0].ConceptCodeSequence[0]
        assert (quantity.CodeValue, quantity.CodingSchemeDesignator, quantity.CodeMeaning) == (
            "130404", "DCM", "Saliency")  # fmt: skip
        unit = rwvm.MeasurementUnitsCodeSequence[0]
        assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("1", "UCUM")
        assert (rwvm.RealWorldValueSlope, rwvm.RealWorldValueIntercept) == (1.0, 0.0)
        attention = result.task(m.task_key).attention
        assert rwvm.DoubleFloatRealWorldValueLastValueMapped == pytest.approx(float(attention.max()))


def test_patient_study_and_frame_of_reference_are_the_source_ones(
    maps: list[WrittenMap], series: CTSeries
) -> None:
    src = series.datasets[0]
    for m in maps:
        pm = pydicom.dcmread(m.path, stop_before_pixels=True)
        for kw in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                   "StudyDate", "AccessionNumber", "StudyID", "FrameOfReferenceUID"):  # fmt: skip
            assert pm.get(kw) == src.get(kw), kw
        assert pm.PatientID == PATIENT_ID
        refs = pm.ReferencedSeriesSequence[0]  # OHIF needs it to find the volume to overlay
        assert refs.SeriesInstanceUID == series.series_instance_uid
        assert {r.ReferencedSOPInstanceUID for r in refs.ReferencedInstanceSequence} == set(series.by_uid())


def test_maps_are_our_own_output(maps: list[WrittenMap], series: CTSeries) -> None:
    for m in maps:
        assert is_own_output(pydicom.dcmread(m.path, stop_before_pixels=True))
    assert not is_own_output(series.datasets[0])


def test_uids_are_deterministic_per_finding_and_model(series: CTSeries, result: StudyResult) -> None:
    task = result.task("cardiomegaly")
    a, b = (build_pmap(result, task, series.datasets) for _ in range(2))
    assert (a.SeriesInstanceUID, a.SOPInstanceUID) == (b.SeriesInstanceUID, b.SOPInstanceUID)
    other = build_pmap(result, result.task("pleural_effusion"), series.datasets)
    rebuilt = build_pmap(replace(result, model=model_info(sha="e" * 64)), task, series.datasets)
    for c in (other, rebuilt):
        assert c.SOPInstanceUID != a.SOPInstanceUID and c.SeriesInstanceUID != a.SeriesInstanceUID


def test_no_map_for_absent_echo_or_zero_findings(
    series: CTSeries, result: StudyResult, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    negative = replace(result, tasks=tuple(replace(t, present=False) for t in result.tasks))
    assert write_pmaps(negative, series.datasets, tmp_path) == [] and list(tmp_path.iterdir()) == []
    t = result.task("cardiomegaly")
    zero = replace(
        result,
        tasks=(result.task("reduced_lv_systolic_function"), replace(t, attention=np.zeros_like(t.attention))),
    )
    with caplog.at_level(logging.WARNING, logger="operators.pmap_writer"):
        assert plan_maps(zero) == []
    assert "cardiomegaly" in caplog.text and PATIENT_ID not in caplog.text


def test_budget_keeps_the_most_probable_findings(
    series: CTSeries, result: StudyResult, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    one = estimated_bytes(result.task("cardiomegaly"))
    with caplog.at_level(logging.WARNING, logger="operators.pmap_writer"):
        maps = write_pmaps(result, series.datasets, tmp_path, max_bytes=one)
    assert [m.task_key for m in maps] == ["pleural_effusion"]  # p 0.9 > 0.7
    assert "cardiomegaly" in caplog.text
    assert maps[0].path.stat().st_size <= one + 20_000  # the estimate covers the frames, not the header


def test_wrong_map_geometry_is_refused(series: CTSeries, result: StudyResult) -> None:
    t = result.task("cardiomegaly")
    bad = replace(t, attention=np.ones((len(result.sop_instance_uids), 5, 5), np.float32))
    with pytest.raises(ValueError, match="Rows, Columns"):
        build_pmap(replace(result, tasks=(bad,)), bad, series.datasets)


@needs_dciodvfy
def test_sr_references_each_findings_map_from_its_group(
    maps: list[WrittenMap], series: CTSeries, result: StudyResult, tmp_path: Path
) -> None:
    """Each present finding's TID 1501 group holds IMAGE (DCM 130401 "Visual explanation") naming its
    own map; the maps join the evidence; the SR stays valid."""
    path = save(build_sr(result, series.datasets, parametric_maps=[m.header for m in maps]), tmp_path, "SR")
    errors, _ = dciodvfy(path)
    assert errors == []
    sr = hd.sr.srread(path)
    by_key = {m.task_key: str(m.header.SOPInstanceUID) for m in maps}
    names = {f"HyperCT {t.name}": t.key for t in result.tasks}
    referenced = {}
    for group in sr.content.get_image_measurement_groups():
        images = [
            i for i in group[0].ContentSequence
            if i.ValueType == "IMAGE" and i.ConceptNameCodeSequence[0].CodeValue == VISUAL_EXPLANATION.value
        ]  # fmt: skip
        for item in images:
            referenced[names[str(group.tracking_identifier)]] = str(
                item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            )
            assert item.ReferencedSOPSequence[0].ReferencedSOPClassUID == PARAMETRIC_MAP
    assert referenced == by_key
    evidence = {
        i.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for i in s.ReferencedSOPSequence
    }
    assert set(by_key.values()) <= evidence


def test_sr_refuses_a_map_of_another_result(
    maps: list[WrittenMap], series: CTSeries, result: StudyResult
) -> None:
    other = replace(result, model=model_info(sha="f" * 64))
    with pytest.raises(ValueError, match="no task's map of this result"):
        build_sr(other, series.datasets, parametric_maps=[maps[0].header])
