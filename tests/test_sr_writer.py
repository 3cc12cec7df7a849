"""The TID 1500 SR and the Basic Text SR: valid DICOM (dciodvfy, dsrdump), the same numbers and decisions
as results.json, the source patient/study, deterministic UIDs, and recognisable as our own output."""

from __future__ import annotations

import copy
import json
import logging
import math
import subprocess
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from operators.concepts import ABSENT, PRESENT, PROBABILITY, THRESHOLD
from operators.dicom_output import RESEARCH_USE_STATEMENT, SYNTHETIC_STATEMENT
from operators.results import ModelInfo, StudyResult, TaskResult, decisions, probabilities
from operators.sr_writer import build_sr, write_sr
from operators.text_report import build_text_sr, finding_line, write_text_sr
from operators.uids import (
    NODE_DEVICE_UID,
    NODE_MANUFACTURER,
    is_own_output,
    name_based_uid,
    output_uids,
    tracking_uid,
)
from tests.dicom_fixtures import (
    PATIENT_ID,
    PATIENT_NAME,
    CTSeries,
    ct_series,
    dciodvfy,
    model_info,
    study_result,
    task_entries,
    write_series,
)

POSITIVE = {"pleural_effusion": 0.8712345678901234, "cardiomegaly": 0.5, "reduced_lv_systolic_function": 0.93}
#: The only dciodvfy warning we accept: it does not know private coding schemes (declared in the SR).
ALLOWED_WARNING = (
    "Warning - Unrecognized defined term <99HYPERCT> for value 1 of attribute <Coding Scheme Designator>"
)
needs_dciodvfy = pytest.mark.peers  # dicom3tools must be installed: `make test` installs it; never skipped
needs_dsrdump = pytest.mark.peers  # DCMTK must be installed; never skipped


@pytest.fixture(scope="module")
def series() -> CTSeries:
    return ct_series()


@pytest.fixture(scope="module")
def result(series: CTSeries) -> StudyResult:
    return study_result(series, POSITIVE)


@pytest.fixture(scope="module")
def written(
    series: CTSeries, result: StudyResult, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("sr")
    paths = write_series(out / "ct", series.datasets)
    return {"sr": write_sr(result, series.datasets, out), "text": write_text_sr(result, series.datasets, out),
            "ct": paths[0]}  # fmt: skip


def _groups(path: Path) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    sr = hd.sr.srread(path)
    return sr.content.get_image_measurement_groups()


def _texts(ds: Dataset) -> list[str]:
    out = []
    for item in ds.ContentSequence:
        if item.ValueType == "TEXT":
            out.append(str(item.TextValue))
        if "ContentSequence" in item:
            out.extend(_texts(item))
    return out


# -- validity ------------------------------------------------------------------------------------


@needs_dciodvfy
@pytest.mark.parametrize("kind", ["sr", "text"])
def test_dciodvfy_reports_no_errors(written: dict[str, Path], kind: str) -> None:
    errors, warnings = dciodvfy(written[kind])
    assert errors == []
    unexpected = [w for w in warnings if w != ALLOWED_WARNING]
    assert unexpected == [], unexpected


@needs_dciodvfy
def test_single_task_model_is_valid(series: CTSeries, tmp_path: Path) -> None:
    one = study_result(series, {"cardiomegaly": 0.7}, keys=["cardiomegaly"])
    path = write_sr(one, series.datasets, tmp_path)
    errors, _ = dciodvfy(path)
    assert errors == []
    groups = _groups(path)
    assert len(groups) == 1
    assert groups[0].finding_type.value == "8186001"


@needs_dsrdump
@pytest.mark.parametrize("kind", ["sr", "text"])
def test_dsrdump_reads_the_document(written: dict[str, Path], kind: str) -> None:
    out = subprocess.run(["dsrdump", str(written[kind])], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "E:" not in out.stderr and "error" not in out.stderr.lower(), out.stderr
    title = "Imaging Measurement Report" if kind == "sr" else "CT Chest Report"
    assert title in out.stdout


# -- content: numbers and decisions ----------------------------------------------------------------


def test_probabilities_and_decisions_read_back_exactly(written: dict[str, Path], result: StudyResult) -> None:
    js = result.to_json()
    want_p, want_d = probabilities(js), decisions(js)
    by_uid = {
        tracking_uid(
            result.study_instance_uid, result.series_instance_uid, result.model.manifest_sha256, t.key
        ): t.key
        for t in result.tasks
    }
    got_p, got_d = {}, {}
    for g in _groups(written["sr"]):
        key = by_uid[str(g.tracking_uid)]
        (prob,) = g.get_measurements(name=PROBABILITY)
        (thr,) = g.get_measurements(name=THRESHOLD)
        raw = prob[0].MeasuredValueSequence[0]
        assert isinstance(raw.FloatingPointValue, float)
        got_p[key] = raw.FloatingPointValue
        assert prob.value == raw.FloatingPointValue
        assert prob.unit.value == "1" and prob.unit.scheme_designator == "UCUM"
        assert (prob.name.value, prob.name.scheme_designator) == ("111012", "DCM")  # Certainty of Finding
        assert thr.value == result.task(key).threshold
        (ev,) = g.get_qualitative_evaluations(name=hd.sr.CodedConcept(*_concept(result, key)))
        assert ev.value in (PRESENT, ABSENT)
        got_d[key] = "present" if ev.value == PRESENT else "absent"
        if ev.value == PRESENT:
            assert g.finding_type.value == result.task(key).concept.value
        else:  # a reader keying on the Finding row must not list an absent finding
            assert g.finding_type is None and not g.finding_sites
        assert f"decision_threshold={result.task(key).threshold:.6g}" in _parameters(g)
    assert got_p == want_p  # exact float64 equality, every task
    assert got_d == want_d
    assert want_d["pleural_effusion"] == "present" and want_d["cardiomegaly"] == "present"  # p == threshold
    assert want_d["lung_nodule"] == "absent"


def _parameters(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> list[str]:
    """TID 4019 Algorithm Parameters (111002) of one measurement group."""
    items = [i for top in group for i in (top, *_walk(top))]
    return [i.TextValue for i in items if i.get("ValueType") == "TEXT"
            and i.ConceptNameCodeSequence[0].CodeValue == "111002"]  # fmt: skip


def _concept(result: StudyResult, key: str) -> tuple[str, str, str]:
    c = result.task(key).concept
    return c.value, c.scheme_designator, c.meaning


def test_finding_sites_tell_the_two_calcification_tasks_apart(series: CTSeries, tmp_path: Path) -> None:
    both = study_result(
        series, {"coronary_artery_wall_calcification": 0.9, "arterial_wall_calcification": 0.9},
        keys=["coronary_artery_wall_calcification", "arterial_wall_calcification", "cardiomegaly"],
    )  # fmt: skip
    groups = _groups(write_sr(both, series.datasets, tmp_path))
    sites = {
        str(g.tracking_identifier): [s.value.value for s in g.finding_sites]
        for g in groups
        if g.finding_type is not None and g.finding_type.value == "237897009"
    }
    assert sorted(sites.values()) == [["41801008"], ["51114001"]]  # coronary artery, artery
    (absent,) = [g for g in groups if g.finding_type is None]  # cardiomegaly at 0.1: no Finding, no site
    assert not absent.finding_sites


def test_algorithm_identification_names_model_and_manifest(
    written: dict[str, Path], result: StudyResult
) -> None:
    ds = pydicom.dcmread(written["sr"])
    params = [
        item.TextValue
        for item in _walk(ds)
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "111002"
    ]
    assert f"manifest_sha256={result.model.manifest_sha256}" in params
    names = {item.TextValue for item in _walk(ds) if item.ValueType == "TEXT"
             and item.ConceptNameCodeSequence[0].CodeValue == "111001"}  # fmt: skip
    assert names == {result.model.name}


def _walk(ds: Dataset) -> list[Dataset]:
    out = []
    for item in ds.get("ContentSequence", []):
        out.append(item)
        out.extend(_walk(item))
    return out


# -- identity: patient, study, frame of reference, references -------------------------------------


@pytest.mark.parametrize("kind", ["sr", "text"])
def test_patient_and_study_are_the_source_ones(written: dict[str, Path], series: CTSeries, kind: str) -> None:
    ds = pydicom.dcmread(written[kind])
    src = series.datasets[0]
    for kw in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
               "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID"):  # fmt: skip
        assert ds.get(kw) == src.get(kw), kw
    assert ds.PatientID == PATIENT_ID and str(ds.PatientName) == PATIENT_NAME
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    refs = ds.CurrentRequestedProcedureEvidenceSequence[0]
    assert refs.StudyInstanceUID == src.StudyInstanceUID
    assert refs.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    got = {r.ReferencedSOPInstanceUID for r in refs.ReferencedSeriesSequence[0].ReferencedSOPSequence}
    assert got == set(series.by_uid())


def test_image_library_carries_frame_of_reference(written: dict[str, Path], series: CTSeries) -> None:
    ds = pydicom.dcmread(written["sr"])
    for_uids = {item.UID for item in _walk(ds) if item.ValueType == "UIDREF"
                and item.ConceptNameCodeSequence[0].CodeValue == "112227"}  # fmt: skip
    assert for_uids == {series.frame_of_reference_uid}
    images = [i for i in _walk(ds) if i.ValueType == "IMAGE"]
    assert {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images} == set(series.by_uid())


def test_sources_from_another_series_are_refused(series: CTSeries, result: StudyResult) -> None:
    other = ct_series(n_slices=3, study_uid=series.study_instance_uid)
    with pytest.raises(ValueError, match="SeriesInstanceUID"):
        build_sr(result, series.datasets + other.datasets)
    with pytest.raises(ValueError, match="SOPInstanceUID"):
        build_sr(result, series.datasets[1:])


def test_instances_outside_the_result_are_not_referenced(series: CTSeries, result: StudyResult) -> None:
    localizer = copy.deepcopy(series.datasets[0])
    localizer.SOPInstanceUID = pydicom.uid.generate_uid()  # same series, not in the volume
    sr = build_sr(result, [*series.datasets, localizer])
    refs = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert localizer.SOPInstanceUID not in {r.ReferencedSOPInstanceUID for r in refs}
    assert len(refs) == len(result.sop_instance_uids)


def test_sources_without_type2_patient_attributes_still_work(series: CTSeries, result: StudyResult) -> None:
    bare = [copy.deepcopy(ds) for ds in series.datasets]
    for ds in bare:
        del ds.PatientBirthDate, ds.AccessionNumber, ds.ReferringPhysicianName
    sr = build_sr(result, bare)
    assert sr.PatientBirthDate == "" and sr.AccessionNumber == ""


# -- UIDs and own-output recognition ---------------------------------------------------------------


def test_uids_are_deterministic_and_depend_on_the_model(series: CTSeries, result: StudyResult) -> None:
    a, b = build_sr(result, series.datasets), build_sr(result, series.datasets)
    assert (a.SeriesInstanceUID, a.SOPInstanceUID) == (b.SeriesInstanceUID, b.SOPInstanceUID)
    other = replace(result, model=model_info(sha="f" * 64))
    c = build_sr(other, series.datasets)
    assert c.SeriesInstanceUID != a.SeriesInstanceUID and c.SOPInstanceUID != a.SOPInstanceUID
    t = build_text_sr(result, series.datasets)
    assert t.SOPInstanceUID == build_text_sr(result, series.datasets).SOPInstanceUID
    assert len({a.SOPInstanceUID, t.SOPInstanceUID, a.SeriesInstanceUID, t.SeriesInstanceUID}) == 4


def test_output_uids_are_valid_distinct_2_25_uids() -> None:
    study, series, sha = "1.2.3", "1.2.3.4", "a" * 64
    uids = [output_uids(study, series, sha, k) for k in ("sr", "seg", "text-sr")]
    flat = [u for x in uids for u in (x.series_instance_uid, x.sop_instance_uid)]
    assert len(set(flat)) == 6
    for u in flat:
        assert u.startswith("2.25.") and len(u) <= 64 and pydicom.uid.UID(u).is_valid
    assert output_uids(study, series, sha.upper(), "sr") == uids[0]  # hash case does not matter
    assert output_uids(study, "1.2.3.5", sha, "sr") != uids[0]
    assert name_based_uid("x") == name_based_uid("x") != name_based_uid("y")
    with pytest.raises(ValueError, match="output kind"):
        output_uids(study, series, sha, "pdf")
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        output_uids("", series, sha, "sr")


def test_own_outputs_are_recognised(written: dict[str, Path], series: CTSeries) -> None:
    sr = pydicom.dcmread(written["sr"])
    text = pydicom.dcmread(written["text"], stop_before_pixels=True)
    assert is_own_output(sr) and is_own_output(text)
    assert not is_own_output(pydicom.dcmread(written["ct"]))
    assert not is_own_output(series.datasets[0])


def test_foreign_srs_are_not_ours(written: dict[str, Path]) -> None:
    foreign = pydicom.dcmread(written["sr"])
    foreign.Manufacturer = "Other AI Inc"  # same UIDs copied, other product: not ours
    assert not is_own_output(foreign)
    lookalike = Dataset()
    lookalike.Manufacturer = NODE_MANUFACTURER  # name alone is not enough
    lookalike.Modality = "SR"
    assert not is_own_output(lookalike)
    lookalike.DeviceUID = NODE_DEVICE_UID
    assert is_own_output(lookalike)
    # our SR stripped of its equipment UIDs is still recognised by its Device Observer UID
    stripped = pydicom.dcmread(written["sr"])
    del stripped.DeviceUID, stripped.ManufacturerDeviceClassUID
    assert is_own_output(stripped)


# -- codes, statements -----------------------------------------------------------------------------


def test_private_scheme_is_declared(written: dict[str, Path]) -> None:
    ds = pydicom.dcmread(written["sr"])
    declared = {i.CodingSchemeDesignator: i for i in ds.CodingSchemeIdentificationSequence}
    assert "99HYPERCT" in declared
    assert declared["99HYPERCT"].CodingSchemeName == "HyperCT Node task concepts"
    used = {i.CodingSchemeDesignator for i in _code_items(ds)}
    assert {d for d in used if d.startswith("99")} <= set(declared)


def _code_items(ds: Dataset) -> list[Dataset]:
    out = []
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                if "CodingSchemeDesignator" in item:
                    out.append(item)
                out.extend(_code_items(item))
    return out


def test_undeclared_private_scheme_is_refused(series: CTSeries, result: StudyResult) -> None:
    bare = replace(result, model=ModelInfo("m", "1", "b" * 64, coding_schemes=()))
    t = result.task("medical_material")
    odd = replace(t, concept=replace(t.concept, scheme_designator="99OTHER"))
    bad = replace(bare, tasks=(odd,))
    with pytest.raises(ValueError, match=r"CodingSchemeIdentificationSequence.*99OTHER"):
        build_sr(bad, series.datasets)
    build_sr(replace(bare, tasks=(t,)), series.datasets)  # 99HYPERCT: the node declares it itself


@pytest.mark.parametrize("kind", ["sr", "text"])
def test_research_and_synthetic_statements(written: dict[str, Path], kind: str) -> None:
    ds = pydicom.dcmread(written[kind])
    texts = _texts(ds)
    assert RESEARCH_USE_STATEMENT in texts
    assert SYNTHETIC_STATEMENT in texts
    assert "RESEARCH" in ds.SeriesDescription and "SYNTHETIC" in ds.SeriesDescription


def test_no_synthetic_note_for_a_real_model(series: CTSeries, result: StudyResult) -> None:
    real = replace(result, model=model_info(synthetic=False))
    for ds in (build_sr(real, series.datasets), build_text_sr(real, series.datasets)):
        texts = _texts(ds)
        assert RESEARCH_USE_STATEMENT in texts and SYNTHETIC_STATEMENT not in texts
        assert "SYNTHETIC" not in ds.SeriesDescription and "RESEARCH" in ds.SeriesDescription


def test_text_sr_lines(written: dict[str, Path], result: StudyResult) -> None:
    texts = _texts(pydicom.dcmread(written["text"]))
    assert "Pleural effusion - PRESENT - probability 0.87 (threshold 0.50)" in texts
    assert "Lung nodule - absent - probability 0.10 (threshold 0.50)" in texts
    assert all(finding_line(t) in texts for t in result.tasks)
    assert any(result.model.name in s and result.model.version in s for s in texts)
    ds = pydicom.dcmread(written["text"])
    assert ds.SOPClassUID == pydicom.uid.BasicTextSRStorage
    assert {i.ValueType for i in _walk(ds)} <= {"TEXT", "CODE", "UIDREF", "CONTAINER"}


def test_tasks_the_model_does_not_cover_are_named_not_absent(series: CTSeries, result: StudyResult) -> None:
    """A model of a few tasks (the demo model) must not read as 'the other tasks are absent'."""
    kept = result.tasks[:2]
    dropped = tuple(t.name for t in result.tasks[2:])
    assert dropped
    partial = replace(result, tasks=kept, model=replace(result.model, not_covered=dropped))
    texts = _texts(build_text_sr(partial, series.datasets))
    assert f"Not covered by this model (not assessed, not absent): {', '.join(dropped)}." in texts
    assert not [t for t in texts if t.startswith(tuple(f"{name} -" for name in dropped))]
    assert json.loads(partial.to_json())["model"]["not_covered"] == list(dropped)
    assert not any("Not covered" in t for t in _texts(build_text_sr(result, series.datasets)))


# -- results.json ----------------------------------------------------------------------------------


def test_results_json_has_uids_but_no_patient_data(result: StudyResult) -> None:
    text = result.to_json()
    assert PATIENT_ID not in text and "Phantom" not in text
    d = json.loads(text)
    assert d["study_instance_uid"] == result.study_instance_uid
    assert d["model"]["manifest_sha256"] == result.model.manifest_sha256
    assert probabilities(text)["pleural_effusion"] == POSITIVE["pleural_effusion"]
    assert [t["key"] for t in d["tasks"]] == [t.key for t in result.tasks]
    assert d["tasks"][0]["attention_shape"] is None  # echo task: no map


def test_writer_logs_uids_not_patient_data(
    series: CTSeries, result: StudyResult, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        build_sr(result, series.datasets)
        build_text_sr(result, series.datasets)
    assert caplog.records
    assert all(PATIENT_ID not in r.getMessage() and "Phantom" not in r.getMessage() for r in caplog.records)


def test_task_result_from_manifest_applies_the_decision_rule() -> None:
    (entry,) = task_entries(["pleural_effusion"], threshold=0.6)
    at = TaskResult.from_manifest(entry, 0.0, probability=0.6)
    assert at.present and at.decision == "present" and at.concept.value == "60046008"
    below = TaskResult.from_manifest(entry, -3.0)  # probability = sigmoid(logit)
    assert below.probability == pytest.approx(1 / (1 + math.exp(3.0))) and below.decision == "absent"
    assert TaskResult.from_manifest(entry, 800.0).probability == 1.0  # no overflow


def test_task_result_errors_name_the_field() -> None:
    (entry,) = task_entries(["cardiomegaly"])
    with pytest.raises(ValueError, match=r"cardiomegaly.*probability"):
        TaskResult.from_manifest(entry, 0.0, probability=1.5)
    with pytest.raises(ValueError, match=r"cardiomegaly.*attention"):
        TaskResult.from_manifest(entry, 0.0, attention=np.zeros((2, 2)))


def test_study_result_checks_map_slices(series: CTSeries, result: StudyResult) -> None:
    t = result.task("cardiomegaly")
    bad = replace(t, attention=np.zeros((3, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"cardiomegaly.*3 slices"):
        replace(result, tasks=(bad,))
