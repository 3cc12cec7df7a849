"""Series selection: rules as data, reasons for every refusal, best pick among eligible series."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from operators.series_selection import (
    CT_IMAGE_STORAGE,
    ENHANCED_CT_IMAGE_STORAGE,
    LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE,
    SelectionRules,
    SeriesSummary,
    scan_folder,
    select_series,
    summarize_series,
)
from operators.settings import SettingsError
from tests.dicom_fixtures import ct_series, write_series
from tests.multiframe_fixtures import enhanced_ct, legacy_converted

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _series(uid: str, **kw: object) -> SeriesSummary:
    n = int(kw.pop("n", 120))  # type: ignore[call-overload]
    base: dict[str, object] = dict(
        study_instance_uid="1.2.3",
        series_instance_uid=uid,
        modality="CT",
        sop_class_uid=CT_IMAGE_STORAGE,
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        slice_thickness_mm=1.0,
        body_part="CHEST",
        series_description="Chest",
        series_number=int(uid.split(".")[-1]),
        orientation=AXIAL,
        files=[Path(f"{uid}-{i}.dcm") for i in range(n)],
        n_frames=n,
    )
    base.update(kw)
    return SeriesSummary(**base)  # type: ignore[arg-type]


def test_picks_thin_non_contrast_axial_among_distractors() -> None:
    study = [
        _series("1.2.3.1", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), n=1, slice_thickness_mm=None),
        _series("1.2.3.2", slice_thickness_mm=5.0, n=60),
        _series("1.2.3.3", contrast_agent="IOHEXOL", series_description="Chest C+"),
        _series("1.2.3.4", slice_thickness_mm=1.0, n=300),
        _series("1.2.3.5", modality="MR", sop_class_uid="1.2.840.10008.5.1.4.1.1.4", n=20),
    ]
    result = select_series(study)
    assert result.selected is not None and result.selected.series_instance_uid == "1.2.3.4"
    reasons = {v.series.series_instance_uid: " ".join(v.reasons) for v in result.verdicts}
    assert "LOCALIZER" in reasons["1.2.3.1"]
    assert "5 mm is outside" in reasons["1.2.3.2"]
    assert "contrast agent given (IOHEXOL)" in reasons["1.2.3.3"]
    assert "modality MR" in reasons["1.2.3.5"]
    assert "thinnest" in result.why and result.to_dict()["outcome"] == "selected"


def test_thinnest_then_most_instances() -> None:
    a = _series("1.2.3.1", slice_thickness_mm=1.25, n=250)
    b = _series("1.2.3.2", slice_thickness_mm=0.625, n=480)
    c = _series("1.2.3.3", slice_thickness_mm=0.625, n=500)
    assert select_series([a, b, c]).selected is c


def test_no_eligible_series_explains_every_series() -> None:
    result = select_series([_series("1.2.3.7", modality="MR", n=30)])
    assert result.selected is None and result.outcome == "no-eligible-series"
    assert "modality MR is not CT" in result.why and "30 slices, fewer than 50" in result.why


def test_empty_study_is_explained() -> None:
    assert "no readable DICOM series" in select_series([]).why


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"body_part": "HEAD"}, "body part HEAD is not chest"),
        ({"orientation": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)}, "off axial"),
        ({"orientation": None}, "ImageOrientationPatient is missing"),
        (
            {"sop_class_uid": "1.2.840.10008.5.1.4.1.1.7"},
            "SOP class Secondary Capture Image Storage is not one of",
        ),
        (
            {
                "sop_class_uid": ENHANCED_CT_IMAGE_STORAGE,
                "image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER", "NONE"),
            },
            "ImageType contains LOCALIZER",
        ),
        ({"series_description": "CTA chest arterial"}, "suggests contrast"),
        ({"series_description": "Chest w/ contrast"}, "suggests contrast"),
        ({"image_type": ("DERIVED", "SECONDARY", "AXIAL")}, "lacks ORIGINAL/PRIMARY"),
    ],
)
def test_each_rule_refuses_with_a_reason(kw: dict[str, object], reason: str) -> None:
    result = select_series([_series("1.2.3.9", **kw)])
    assert result.selected is None
    assert reason in " ".join(result.verdicts[0].reasons)


def test_unspecified_body_part_is_accepted_by_default_and_refusable() -> None:
    s = _series("1.2.3.1", body_part="")
    assert select_series([s]).selected is s
    strict = SelectionRules.from_dict({"allow-unspecified-body-part": False})
    assert "BodyPartExamined is missing" in select_series([s], strict).why


def test_rules_are_data_and_validated() -> None:
    rules = SelectionRules.from_dict(
        {"min-slices": 10, "slice_thickness_mm": [0.5, 6.0], "contrast": "ignore"}
    )
    assert rules.min_slices == 10 and rules.slice_thickness_mm == (0.5, 6.0)
    assert SelectionRules.from_dict(rules.to_dict()) == rules
    thick_contrast = _series("1.2.3.2", slice_thickness_mm=5.0, contrast_agent="X", n=20)
    assert select_series([thick_contrast], rules).selected is thick_contrast
    for bad, msg in [
        ({"nope": 1}, "series-selection: unknown key 'nope'"),
        ({"min-slices": "many"}, "min-slices: expected an integer, got 'many'"),
        ({"modalities": "CT"}, "modalities: expected a list"),
        ({"contrast": "maybe"}, "contrast: must be forbid or ignore"),
        ({"slice-thickness-mm": [3, 1]}, "slice-thickness-mm: need 0 <= low <= high"),
    ]:
        with pytest.raises(SettingsError, match=msg):
            SelectionRules.from_dict(bad)


def test_scan_folder_reads_headers_and_skips_non_dicom(tmp_path: Path) -> None:
    for i in range(3):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.3.4.{i}"
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = f"1.2.3.4.{i}"
        ds.StudyInstanceUID = "1.2.3"
        ds.SeriesInstanceUID = "1.2.3.4"
        ds.Modality = "CT"
        ds.SeriesNumber = 4
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SliceThickness = "1.0"
        ds.ImageOrientationPatient = list(AXIAL)
        sub = tmp_path / "nested" / ("a" if i else "b")
        sub.mkdir(parents=True, exist_ok=True)
        ds.save_as(sub / f"IM{i}", enforce_file_format=True)  # no .dcm suffix on purpose
    (tmp_path / "README.txt").write_text("not dicom")
    (tmp_path / "truncated.dcm").write_bytes(b"\0" * 10)
    (series,) = scan_folder(tmp_path)
    assert series.n_instances == 3 and series.series_number == 4 and series.slice_thickness_mm == 1.0


def test_negated_contrast_descriptions_are_not_contrast() -> None:
    for desc in (
        "CHEST 2mm NON-CONTRAST AXIAL",
        "Thorax without contrast",
        "chest w/o IV contrast",
        "no contrast",
    ):
        s = _series("1.2.3.1", series_description=desc)
        assert select_series([s]).selected is s, desc


def test_enhanced_and_legacy_converted_ct_meet_the_same_rules(tmp_path: Path) -> None:
    """Thickness, orientation and ImageType come from the functional groups; frames count as slices;
    Enhanced CT's ImageType Value 3 (VOLUME) is not asked to say AXIAL."""
    single = ct_series(n_slices=60, rows=8, cols=8).datasets
    (legacy,) = legacy_converted(single)
    enhanced = enhanced_ct(legacy)
    enhanced.SeriesInstanceUID = generate_uid()
    write_series(tmp_path / "single", single)
    for name, ds in (("legacy", legacy), ("enhanced", enhanced)):
        (tmp_path / name).mkdir()
        ds.save_as(tmp_path / name / "MF.dcm", enforce_file_format=True)
    summaries = {s.sop_class_uid: s for s in scan_folder(tmp_path)}
    assert set(summaries) == {
        CT_IMAGE_STORAGE,
        ENHANCED_CT_IMAGE_STORAGE,
        LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE,
    }
    for s in summaries.values():
        assert (s.slice_thickness_mm, s.orientation, s.n_frames) == (2.5, AXIAL, 60), s
        assert s.n_instances == (60 if s.sop_class_uid == CT_IMAGE_STORAGE else 1)
        assert select_series([s]).selected is s, select_series([s]).why
    assert summaries[ENHANCED_CT_IMAGE_STORAGE].image_type == ("ORIGINAL", "PRIMARY", "VOLUME", "NONE")
    assert "1 instances, 60 frames" in summaries[ENHANCED_CT_IMAGE_STORAGE].describe()


def test_enhanced_ct_coded_contrast_agent_is_seen() -> None:
    (legacy,) = legacy_converted(ct_series(n_slices=60, rows=8, cols=8).datasets)
    ds = enhanced_ct(legacy)
    agent = pydicom.Dataset()
    agent.CodeValue, agent.CodingSchemeDesignator, agent.CodeMeaning = "C-B0322", "SRT", "Iohexol"
    ds.ContrastBolusAgentSequence = [agent]
    (summary,) = summarize_series([(Path("MF.dcm"), ds)])
    assert "contrast agent given (Iohexol)" in select_series([summary]).why
