"""The primary result object: a Comprehensive 3D SR with a TID 1500 Imaging Measurement Report.

Why this encoding (``docs/results.md``, peers.md §4): it is what IHE AI Results expects from an
Evidence Creator, reporting systems can read it without re-dictation, and highdicom writes it natively.
One TID 1501 measurement group per task carries the tracking identifier (text + UID, the UID shared with
the task's SEG segment), the finding (the task's coded concept), the finding site, a coded
present/absent qualitative evaluation (an absent finding has no Finding row), the certainty
(DCM 111012, a probability in 0..1, UCUM "1") and the operating threshold as NUMs
and TID 4019 algorithm identification with the manifest hash, and, when the finding has a Parametric
Map, an IMAGE reference to it (DCM 130401 "Visual explanation"). The document lives in the source study,
copies its patient/study attributes, references every source instance (evidence + image library) and
says "research use only" in the series description and in the content.

Pure function of (:class:`~operators.results.StudyResult`, source headers): no Holoscan, no model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from operators.concepts import (
    ABSENT,
    COMMENT,
    CT_CHEST_PROCEDURE,
    IMAGING_MEASUREMENT_REPORT,
    NO_UNITS,
    PRESENT,
    PROBABILITY,
    QUALITATIVE_EVALUATIONS,
    SALIENCY,
    THRESHOLD,
    VISUAL_EXPLANATION,
    coded,
)
from operators.dicom_output import (
    SR_DOCUMENT_FLAGS,
    device_observer_context,
    model_identity,
    output_keywords,
    research_statements,
    save,
    task_tracking_uid,
    tracking_id,
)
from operators.multiframe import summary_header
from operators.results import ModelInfo, StudyResult, TaskResult, source_headers
from operators.uids import Equipment, output_uids

logger = logging.getLogger(__name__)

__all__ = ["build_sr", "image_library_container", "write_sr"]

_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS


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
            f"decision_threshold={task.threshold:.6g}",
            "decision=probability>=decision_threshold",
        ],
    )


def _group(
    result: StudyResult, task: TaskResult, explanation: Dataset | None
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One TID 1501 group. A present finding is named in the Finding row; an absent one is not: a
    reader or findings index that keys on Finding (OHIF, the HL7 SR-to-FHIR mapping) takes that row
    as an assertion, so an absent finding says so only in its qualitative evaluation
    (<finding> = SCT Absent), beside the certainty that led to it. ``explanation``, the finding's
    Parametric Map, is referenced as IMAGE (DCM 130401 "Visual explanation")."""
    concept = coded(task.concept)
    tracking = hd.sr.TrackingIdentifier(uid=task_tracking_uid(result, task), identifier=tracking_id(task))
    measurements = [
        hd.sr.Measurement(name=PROBABILITY, value=float(task.probability), unit=NO_UNITS),
        hd.sr.Measurement(name=THRESHOLD, value=float(task.threshold), unit=NO_UNITS),
    ]
    evaluation = hd.sr.QualitativeEvaluation(name=concept, value=PRESENT if task.present else ABSENT)
    sites = (
        [hd.sr.FindingSite(coded(task.finding_site))]
        if task.finding_site is not None and task.present
        else None
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=concept if task.present else None,
        finding_sites=sites,
        algorithm_id=_algorithm(result.model, task),
        measurements=measurements,
        qualitative_evaluations=[evaluation],
    )
    if explanation is not None:
        group[0].ContentSequence.append(
            hd.sr.ImageContentItem(
                name=VISUAL_EXPLANATION,
                referenced_sop_class_uid=explanation.SOPClassUID,
                referenced_sop_instance_uid=explanation.SOPInstanceUID,
                relationship_type=_CONTAINS,
            )
        )
    return group


def _explanations(result: StudyResult, parametric_maps: Sequence[Dataset]) -> dict[str, Dataset]:
    """Task key -> that finding's Parametric Map, recognised by its deterministic SOP Instance UID
    (``uids.output_uids(..., "pmap", task key)``); a map of another result is refused."""
    expected = {
        output_uids(
            result.study_instance_uid,
            result.series_instance_uid,
            result.model.manifest_sha256,
            "pmap",
            t.key,
        ).sop_instance_uid: t.key
        for t in result.tasks
    }
    found = {}
    for pm in parametric_maps:
        key = expected.get(str(pm.SOPInstanceUID))
        if key is None:
            raise ValueError(f"parametric map {pm.SOPInstanceUID} is no task's map of this result")
        found[key] = pm
    return found


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
    by_uid = {task_tracking_uid(result, t): t for t in result.tasks}
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
                    uid=str(seg_item.TrackingUID), identifier=tracking_id(task)
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=segmentation.SOPClassUID,
                    sop_instance_uid=segmentation.SOPInstanceUID,
                    segment_number=int(seg_item.SegmentNumber),
                    source_series=hd.sr.SourceSeriesForSegmentation(result.series_instance_uid),
                ),
                finding_type=SALIENCY,
                finding_sites=[hd.sr.FindingSite(coded(task.finding_site))] if task.finding_site else None,
                algorithm_id=_algorithm(result.model, task),
            )
        )
    return groups


def _statements_container(model: ModelInfo) -> hd.sr.ContainerContentItem:
    """TID 1500 row "Qualitative Evaluations" (UMLS C0034375) at report level, holding the research-use
    (and synthetic) statements as TEXT "Comment" items: highdicom builds no report-level row, so we add
    it to the root container ourselves."""
    container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type=_CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(name=COMMENT, value=text, relationship_type=_CONTAINS)
            for text in research_statements(model)
        ]
    )
    return container


def build_sr(
    result: StudyResult,
    source_datasets: Sequence[Dataset],
    *,
    equipment: Equipment | None = None,
    image_library: bool = True,
    per_image_position: bool = False,
    segmentation: Dataset | None = None,
    parametric_maps: Sequence[Dataset] = (),
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
        parametric_maps: the Parametric Maps written for the same result (headers suffice:
            ``pmap_writer.WrittenMap.header``); each finding's group references its map, and the maps
            join the evidence.
    """
    equipment = equipment or Equipment()
    sources = source_headers(result, source_datasets)
    model = result.model
    explanations = _explanations(result, parametric_maps)
    report = hd.sr.MeasurementReport(
        observation_context=device_observer_context(equipment),
        procedure_reported=CT_CHEST_PROCEDURE,
        imaging_measurements=[
            *(_group(result, t, explanations.get(t.key)) for t in result.tasks),
            *(_attention_groups(result, segmentation) if segmentation is not None else ()),
        ],
        title=IMAGING_MEASUREMENT_REPORT,
    )
    root = report[0].ContentSequence
    if image_library:
        # TID 1500 order: ... procedure reported, image library, imaging measurements, ...
        root.insert(len(root) - 1, image_library_container(sources, per_image_position=per_image_position))
    root.append(_statements_container(model))
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*sources, *([segmentation] if segmentation is not None else []), *parametric_maps],
        content=report[0],
        **SR_DOCUMENT_FLAGS,
        **output_keywords(
            result,
            "sr",
            equipment,
            contribution=f"HyperCT {model_identity(model)}",
            used_designators=_used_designators(result),
        ),
    )
    equipment.apply(sr)
    logger.info(
        "SR built: study %s series %s -> SOP %s (%d tasks, %d present)",
        result.study_instance_uid,
        result.series_instance_uid,
        sr.SOPInstanceUID,
        len(result.tasks),
        len(result.positive),
    )
    return sr


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
    content items and 12 s for a 300-slice series); here the series-level facts are stated once. A
    multi-frame source (Enhanced CT) is one entry, its descriptors read from its functional groups.
    """
    first = summary_header(sources[0])
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
