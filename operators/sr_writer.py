"""The primary result object: a Comprehensive 3D SR with a TID 1500 Imaging Measurement Report.

Why this encoding (``docs/results.md``, peers.md §4): it is what IHE AI Results expects from an
Evidence Creator, reporting systems can read it without re-dictation, and highdicom writes it natively.
One TID 1501 measurement group per task carries the tracking identifier (text + UID, the UID shared with
the task's SEG segment), the finding (the task's coded concept), the finding site, a coded
present/absent qualitative evaluation, the probability and the operating threshold as NUMs (UCUM "1")
and TID 4019 algorithm identification with the manifest hash. The document lives in the source study,
copies its patient/study attributes, references every source instance (evidence + image library) and
says "research use only" in the series description and in the content.

Pure function of (:class:`~operators.results.StudyResult`, source headers): no Holoscan, no model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from operators.results import CodingScheme, Concept, ModelInfo, StudyResult, TaskResult, source_headers
from operators.uids import (
    NODE_DEVICE_UID,
    NODE_MANUFACTURER,
    NODE_MODEL_NAME,
    SERIES_NUMBERS,
    Equipment,
    output_uids,
    tracking_uid,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ABSENT",
    "HYPERCT_SCHEME",
    "PRESENT",
    "PROBABILITY",
    "PROCEDURE_CT_CHEST",
    "RESEARCH_USE_STATEMENT",
    "SYNTHETIC_STATEMENT",
    "THRESHOLD",
    "build_sr",
    "coding_scheme_items",
    "device_observer_context",
    "image_library_container",
    "research_statements",
    "save",
    "write_sr",
]

#: The node's private coding scheme (declared in every object that uses one of its codes).
HYPERCT_SCHEME = CodingScheme(
    designator="99HYPERCT",
    name="HyperCT Node task concepts",
    responsible_organization="HyperCT Node project",
    version="1",
)
#: NUM concept of the model output. Private on purpose: DCM 122157 "Probability" exists but is in no
#: context group and its definition was not verifiable offline; ours is defined in docs/results.md as
#: "model probability (sigmoid of the task logit) that the finding is present; not calibrated".
PROBABILITY = Code("PROB-FINDING", "99HYPERCT", "Probability of finding")
#: NUM concept of the operating threshold the decision used (decision: probability >= threshold).
THRESHOLD = Code("PROB-THRESHOLD", "99HYPERCT", "Decision threshold for probability of finding")
#: Values of the qualitative evaluation: SCT Present / Absent, the members of DICOM CID 240/241 as listed
#: by pydicom's code dictionary (``codes.SCT.Present`` = 52101004, ``codes.SCT.Absent`` = 272519000;
#: HL7/mCODE uses 2667000 for Absent, DICOM does not).
PRESENT = codes.SCT.Present
ABSENT = codes.SCT.Absent
#: Procedure reported: LOINC 24627-2 (CT of the chest; pydicom lists the same code in CID 7000 as
#: "CT Chest Report"). TID 1500 takes it from the extensible CID 100.
PROCEDURE_CT_CHEST = Code("24627-2", "LN", "CT Chest")
_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS
_QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
_NO_UNITS = codes.UCUM.NoUnits

RESEARCH_USE_STATEMENT = (
    "For research use only. Not for diagnostic use. Results of an AI model, not reviewed by a physician."
)
SYNTHETIC_STATEMENT = "Synthetic demo model: trained on synthetic data only. Not for clinical use."
#: LO (64 characters) texts for Series Description / Content Description.
SERIES_DESCRIPTION = "HyperCT AI findings - RESEARCH USE ONLY"
SERIES_DESCRIPTION_SYNTHETIC = "HyperCT AI findings - SYNTHETIC DEMO - RESEARCH ONLY"


def research_statements(model: ModelInfo) -> list[str]:
    """The statements every output carries: research use, plus the synthetic note when it applies."""
    return [RESEARCH_USE_STATEMENT, *([SYNTHETIC_STATEMENT] if model.synthetic else [])]


def _code(c: Concept) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(c.value, c.scheme_designator, c.meaning, c.scheme_version)


def coding_scheme_items(model: ModelInfo, used_designators: set[str]) -> list[CodingSchemeIdentificationItem]:
    """CodingSchemeIdentificationSequence items for the private ("99…") schemes in use.

    Raises ValueError naming the scheme when a private designator is used but neither the manifest nor
    the node declares it (an undeclared private code is meaningless to a receiver).
    """
    known = {s.designator: s for s in (HYPERCT_SCHEME, *model.coding_schemes)}  # the manifest wins
    items = []
    for designator in sorted(d for d in used_designators if d.startswith("99")):
        scheme = known.get(designator)
        if scheme is None:
            raise ValueError(
                f"CodingSchemeIdentificationSequence: private coding scheme {designator!r} is used but not "
                "declared in the manifest's coding_schemes"
            )
        items.append(
            CodingSchemeIdentificationItem(
                designator=scheme.designator,
                name=scheme.name or None,
                version=scheme.version or None,
                responsible_organization=scheme.responsible_organization or None,
            )
        )
    return items


def _used_designators(result: StudyResult) -> set[str]:
    used = {PROBABILITY.scheme_designator, THRESHOLD.scheme_designator}
    for t in result.tasks:
        used.add(t.concept.scheme_designator)
        if t.finding_site is not None:
            used.add(t.finding_site.scheme_designator)
    return used


def _algorithm(model: ModelInfo, task: TaskResult) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=[
            f"manifest_sha256={model.manifest_sha256}",
            f"task={task.key}",
            "decision=probability>=threshold",
        ],
    )


def _group(result: StudyResult, task: TaskResult) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    concept = _code(task.concept)
    tracking = hd.sr.TrackingIdentifier(
        uid=tracking_uid(
            result.study_instance_uid, result.series_instance_uid, result.model.manifest_sha256, task.key
        ),
        identifier=f"HyperCT {task.name}"[:64],
    )
    measurements = [
        hd.sr.Measurement(name=PROBABILITY, value=float(task.probability), unit=_NO_UNITS),
        hd.sr.Measurement(name=THRESHOLD, value=float(task.threshold), unit=_NO_UNITS),
    ]
    evaluation = hd.sr.QualitativeEvaluation(name=concept, value=PRESENT if task.present else ABSENT)
    sites = [hd.sr.FindingSite(_code(task.finding_site))] if task.finding_site is not None else None
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=concept,
        finding_sites=sites,
        algorithm_id=_algorithm(result.model, task),
        measurements=measurements,
        qualitative_evaluations=[evaluation],
    )


def _attention_groups(
    result: StudyResult, segmentation: Dataset
) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    """TID 1411 groups, one per SEG segment of ours, referencing it (IHE AIR "regions").

    Linked to the task's TID 1501 group by the same Tracking UID. The finding type is DCM 130404
    "Saliency", not the finding: the region says where the model looked, not where the lesion is.
    """
    if segmentation.get("StudyInstanceUID") != result.study_instance_uid:
        raise ValueError(
            f"segmentation StudyInstanceUID {segmentation.get('StudyInstanceUID')} is not the result's study"
        )
    by_uid = {
        tracking_uid(
            result.study_instance_uid, result.series_instance_uid, result.model.manifest_sha256, t.key
        ): t
        for t in result.tasks
    }
    groups = []
    for seg_item in segmentation.SegmentSequence:
        task = by_uid.get(str(seg_item.get("TrackingUID", "")))
        if task is None:
            raise ValueError(
                f"segmentation segment {seg_item.SegmentNumber}: TrackingUID matches no task of this result"
            )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=str(seg_item.TrackingUID), identifier=f"HyperCT {task.name}"[:64]
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=segmentation.SOPClassUID,
                    sop_instance_uid=segmentation.SOPInstanceUID,
                    segment_number=int(seg_item.SegmentNumber),
                    source_series=hd.sr.SourceSeriesForSegmentation(result.series_instance_uid),
                ),
                finding_type=codes.DCM.Saliency,
                finding_sites=[hd.sr.FindingSite(_code(task.finding_site))] if task.finding_site else None,
                algorithm_id=_algorithm(result.model, task),
            )
        )
    return groups


def _statements_container(model: ModelInfo) -> hd.sr.ContainerContentItem:
    """TID 1500 row "Qualitative Evaluations" (UMLS C0034375) at report level, holding the research-use
    (and synthetic) statements as TEXT "Comment" items: highdicom builds no report-level row, so we add
    it to the root container ourselves."""
    container = hd.sr.ContainerContentItem(
        name=_QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=codes.DCM.Comment, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
            for text in research_statements(model)
        ]
    )
    return container


def device_observer_context(equipment: Equipment) -> hd.sr.ObservationContext:
    """TID 1001/1004: the node as the (only) observer, identified by its fixed Device UID."""
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=NODE_DEVICE_UID,
                name=NODE_MODEL_NAME,
                manufacturer_name=NODE_MANUFACTURER,
                model_name=NODE_MODEL_NAME,
                serial_number=equipment.device_serial_number,
            ),
        )
    )


def build_sr(
    result: StudyResult,
    source_datasets: Sequence[Dataset],
    *,
    equipment: Equipment | None = None,
    image_library: bool = True,
    per_image_position: bool = False,
    segmentation: Dataset | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 Comprehensive 3D SR for ``result``.

    Args:
        result: the study's results (any non-empty subset of the model's tasks).
        source_datasets: the selected series' instances (headers suffice), any order.
        equipment: site-specific equipment attributes (institution, station, serial number).
        image_library: include a TID 1600 image library: one group for the series with the shared
            descriptors (modality, frame of reference, matrix, spacing, orientation) and one IMAGE entry
            per source instance. The instances are referenced in the evidence sequence either way.
        per_image_position: also give each library entry its Image Position (Patient) (3 NUM items per
            slice; 300 slices: +0.2 MB, +1.4 s).
        segmentation: the attention SEG written for the same result (``seg_writer.build_seg``); when
            given, each segment gets a TID 1411 group referencing it, and the SEG joins the evidence.
    """
    equipment = equipment or Equipment()
    sources = source_headers(result, source_datasets)
    model = result.model
    uids = output_uids(result.study_instance_uid, result.series_instance_uid, model.manifest_sha256, "sr")
    report = hd.sr.MeasurementReport(
        observation_context=device_observer_context(equipment),
        procedure_reported=PROCEDURE_CT_CHEST,
        imaging_measurements=[
            *(_group(result, t) for t in result.tasks),
            *(_attention_groups(result, segmentation) if segmentation is not None else ()),
        ],
        title=codes.cid7021.ImagingMeasurementReport,
    )
    root = report[0].ContentSequence
    if image_library:
        # TID 1500 order: ... procedure reported, image library, imaging measurements, ...
        root.insert(len(root) - 1, image_library_container(sources, per_image_position=per_image_position))
    root.append(_statements_container(model))
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*sources, *([segmentation] if segmentation is not None else [])],
        content=report[0],
        series_instance_uid=uids.series_instance_uid,
        series_number=SERIES_NUMBERS["sr"],
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        manufacturer=NODE_MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=equipment.institution_name,
        institutional_department_name=equipment.institutional_department_name,
        contributing_equipment=[equipment.contributing_equipment(_contribution(model))],
        coding_schemes=coding_scheme_items(model, _used_designators(result)),
        series_description=SERIES_DESCRIPTION_SYNTHETIC if model.synthetic else SERIES_DESCRIPTION,
        manufacturer_model_name=NODE_MODEL_NAME,
        software_versions=equipment.software_version,
        device_serial_number=equipment.device_serial_number,
    )
    equipment.apply(sr)
    logger.info(
        "SR built: study %s series %s -> SOP %s (%d tasks, %d present)",
        result.study_instance_uid,
        result.series_instance_uid,
        uids.sop_instance_uid,
        len(result.tasks),
        len(result.positive),
    )
    return sr


def _contribution(model: ModelInfo) -> str:
    synthetic = " (synthetic demo model)" if model.synthetic else ""
    return f"HyperCT model {model.name} {model.version}{synthetic}, manifest SHA-256 {model.manifest_sha256}"


_HAS_ACQ = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
_MM = codes.UCUM.Millimeter
_PIXELS = hd.sr.CodedConcept("{pixels}", "UCUM", "Pixels")
_DIRECTION = hd.sr.CodedConcept("{-1:1}", "UCUM", "{-1:1}")
_SOURCE = hd.sr.CodedConcept("260753009", "SCT", "Source")
_ORIENTATION = (
    codes.DCM.ImageOrientationPatientRowX, codes.DCM.ImageOrientationPatientRowY,
    codes.DCM.ImageOrientationPatientRowZ, codes.DCM.ImageOrientationPatientColumnX,
    codes.DCM.ImageOrientationPatientColumnY, codes.DCM.ImageOrientationPatientColumnZ,
)  # fmt: skip
_POSITION = (
    codes.DCM.ImagePositionPatientX,
    codes.DCM.ImagePositionPatientY,
    codes.DCM.ImagePositionPatientZ,
)


def _num(name: Code, value: object, unit: hd.sr.CodedConcept | Code) -> hd.sr.NumContentItem:
    return hd.sr.NumContentItem(name=name, value=float(value), unit=unit, relationship_type=_HAS_ACQ)  # type: ignore[arg-type]


def image_library_container(
    sources: Sequence[Dataset], *, per_image_position: bool = True
) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library for one series: one Image Library Group (TID 1601) whose TID 1602/1604
    descriptors are shared by all its images, then one IMAGE "Source" entry per instance.

    Why not highdicom's ``ImageLibrary``: it repeats every descriptor on every image (about 4,000
    content items and 12 s for a 300-slice series); here the series-level facts are stated once.
    """
    first = sources[0]
    descriptors: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(
            name=codes.DCM.Modality,
            value=hd.sr.CodedConcept(str(first.get("Modality", "CT")), "DCM", _modality_meaning(first)),
            relationship_type=_HAS_ACQ,
        )
    ]
    if first.get("FrameOfReferenceUID"):
        descriptors.append(
            hd.sr.UIDRefContentItem(
                name=codes.DCM.FrameOfReferenceUID,
                value=first.FrameOfReferenceUID,
                relationship_type=_HAS_ACQ,
            )
        )
    descriptors += [_num(codes.DCM.PixelDataRows, first.Rows, _PIXELS),
                    _num(codes.DCM.PixelDataColumns, first.Columns, _PIXELS)]  # fmt: skip
    if first.get("PixelSpacing"):
        descriptors += [_num(codes.DCM.HorizontalPixelSpacing, first.PixelSpacing[1], _MM),
                        _num(codes.DCM.VerticalPixelSpacing, first.PixelSpacing[0], _MM)]  # fmt: skip
    if first.get("SliceThickness") not in (None, ""):
        descriptors.append(_num(codes.DCM.SliceThickness, first.SliceThickness, _MM))
    if first.get("ImageOrientationPatient"):
        descriptors += [
            _num(n, v, _DIRECTION) for n, v in zip(_ORIENTATION, first.ImageOrientationPatient, strict=True)
        ]
    group = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibraryGroup, relationship_type=_CONTAINS)
    group.ContentSequence = hd.sr.ContentSequence(descriptors)
    for ds in sources:
        image = hd.sr.ImageContentItem(
            name=_SOURCE,
            referenced_sop_class_uid=ds.SOPClassUID,
            referenced_sop_instance_uid=ds.SOPInstanceUID,
            relationship_type=_CONTAINS,
        )
        if per_image_position and ds.get("ImagePositionPatient"):
            image.ContentSequence = hd.sr.ContentSequence(
                [_num(n, v, _MM) for n, v in zip(_POSITION, ds.ImagePositionPatient, strict=True)]
            )
        group.ContentSequence.append(image)
    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=_CONTAINS)
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


def _modality_meaning(ds: Dataset) -> str:
    return {
        "CT": "Computed Tomography",
        "MR": "Magnetic Resonance",
        "PT": "Positron emission tomography",
    }.get(str(ds.get("Modality", "CT")), str(ds.get("Modality", "CT")))


def write_sr(
    result: StudyResult,
    source_datasets: Sequence[Dataset],
    folder: str | Path,
    **kwargs: object,
) -> Path:
    """Build the SR (see :func:`build_sr`) and save it as ``<folder>/SR_<SOPInstanceUID>.dcm``."""
    sr = build_sr(result, source_datasets, **kwargs)  # type: ignore[arg-type]
    return save(sr, folder, "SR")


def save(ds: Dataset, folder: str | Path, prefix: str) -> Path:
    """Write ``ds`` as a DICOM Part 10 file named by its SOP Instance UID (a rerun overwrites it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{prefix}_{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
