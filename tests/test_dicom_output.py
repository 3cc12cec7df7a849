"""The SR, the SEG, the Parametric Maps and the Basic Text SR share one keyword block: the same
equipment, the same research labels, each its own fixed series, and the private scheme declared
wherever one of its codes is used."""

from __future__ import annotations

from dataclasses import replace

import pytest
from pydicom.dataset import Dataset

from operators.concepts import THRESHOLD, coded
from operators.dicom_output import series_description
from operators.pmap_writer import build_pmap
from operators.results import StudyResult
from operators.seg_writer import build_seg
from operators.sr_writer import build_sr
from operators.text_report import build_text_sr
from operators.uids import NODE_DEVICE_UID, OUTPUT_KINDS, SERIES_NUMBERS, Equipment
from tests.dicom_fixtures import CTSeries, ct_series, model_info, study_result

EQUIPMENT = Equipment(
    device_serial_number="SN-42",
    software_version="9.9.9",
    institution_name="Test Hospital",
    institutional_department_name="Radiology",
    station_name="NODE1",
)
#: General Equipment attributes and the node's Contributing Equipment item: the same on every output.
SHARED = ("Manufacturer", "ManufacturerModelName", "DeviceSerialNumber", "DeviceUID",
          "ManufacturerDeviceClassUID", "SoftwareVersions", "InstitutionName", "InstitutionalDepartmentName",
          "StationName", "StudyInstanceUID", "PatientID")  # fmt: skip


@pytest.fixture(scope="module")
def series() -> CTSeries:
    return ct_series(n_slices=6, rows=16, cols=14)


@pytest.fixture(scope="module")
def result(series: CTSeries) -> StudyResult:
    return study_result(series, {"cardiomegaly": 0.9}, keys=["cardiomegaly", "pleural_effusion"])


def _outputs(result: StudyResult, series: CTSeries) -> dict[str, Dataset]:
    seg = build_seg(result, series.datasets, equipment=EQUIPMENT)
    assert seg is not None
    pmap = build_pmap(result, result.task("cardiomegaly"), series.datasets, equipment=EQUIPMENT)
    return {
        "sr": build_sr(
            result, series.datasets, equipment=EQUIPMENT, segmentation=seg, parametric_maps=[pmap]
        ),
        "seg": seg,
        "text-sr": build_text_sr(result, series.datasets, equipment=EQUIPMENT),
        "pmap": pmap,
    }


def test_outputs_share_the_equipment_block(result: StudyResult, series: CTSeries) -> None:
    outputs = _outputs(result, series)
    for kw in SHARED:
        assert len({str(ds.get(kw)) for ds in outputs.values()}) == 1, kw
    assert outputs["sr"].DeviceUID == NODE_DEVICE_UID and outputs["sr"].StationName == "NODE1"
    for kind, ds in outputs.items():
        assert ds.SeriesNumber == SERIES_NUMBERS[kind]
        finding = "Cardiomegaly" if kind == "pmap" else None  # one series per finding's map
        assert ds.SeriesDescription == series_description(kind, result.model, finding)
        (node,) = [i for i in ds.ContributingEquipmentSequence if i.Manufacturer == ds.Manufacturer]
        assert node.SoftwareVersions == "9.9.9" and node.InstitutionName == "Test Hospital"
        assert result.model.manifest_sha256 in node.ContributionDescription
    assert len({ds.SeriesInstanceUID for ds in outputs.values()}) == len(OUTPUT_KINDS)


@pytest.mark.parametrize("synthetic", [True, False])
def test_series_descriptions_carry_the_research_label_within_lo(synthetic: bool) -> None:
    model = model_info(synthetic=synthetic)
    longest = "Pulmonary hypertension (echo PASP)"  # the longest task name of tasks.json
    for kind, finding in [
        *((k, None) for k in OUTPUT_KINDS),
        ("pmap", "Pleural effusion"),
        ("pmap", longest),
    ]:
        text = series_description(kind, model, finding)
        assert len(text) <= 64, text
        assert text.endswith("SYNTHETIC DEMO - RESEARCH ONLY" if synthetic else "RESEARCH USE ONLY")
        assert finding is None or f": {finding[:6]}" in text


def test_private_scheme_declared_where_its_codes_are_used(result: StudyResult, series: CTSeries) -> None:
    outputs = _outputs(result, series)  # the SEG's one segment: cardiomegaly, SCT finding and site
    declared = [i.CodingSchemeDesignator for i in outputs["sr"].CodingSchemeIdentificationSequence]
    assert declared == [THRESHOLD.scheme_designator]  # the SR's threshold NUM
    assert "CodingSchemeIdentificationSequence" not in outputs["seg"]
    assert "CodingSchemeIdentificationSequence" not in outputs["pmap"]  # saliency, no finding code
    assert "CodingSchemeIdentificationSequence" not in outputs["text-sr"]  # text only, no private code
    private = study_result(series, {"peribronchial_thickening": 0.9}, keys=["peribronchial_thickening"])
    seg = build_seg(private, series.datasets)
    assert seg is not None
    assert [i.CodingSchemeDesignator for i in seg.CodingSchemeIdentificationSequence] == ["99HYPERCT"]


def test_coded_keeps_the_scheme_version(result: StudyResult) -> None:
    concept = replace(result.task("cardiomegaly").concept, scheme_version="2026")
    code = coded(concept)
    assert (code.value, code.scheme_designator, code.meaning, code.scheme_version) == (
        concept.value, concept.scheme_designator, concept.meaning, "2026")  # fmt: skip
