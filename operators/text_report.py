"""Human-readable fallback: a Basic Text SR (1.2.840.10008.5.1.4.1.1.88.11) with the same findings.

Why: many PACS show neither Comprehensive 3D SR content nor SEG, but almost all render Basic Text SR
as text. Same study, same patient, deterministic UIDs of its own series ("text-sr"), same research-use
and synthetic statements, rendered from the same :class:`~operators.results.StudyResult` as the
TID 1500 SR, so the two cannot disagree. Basic Text SR needs no extra dependency; an encapsulated PDF
would need a PDF writer, which the node does not ship (docs/results.md).

Content (TID 2000 "Basic Diagnostic Imaging Report" pattern): title LN 24627-2 "CT Chest Report"
(CID 7000), language, the node as device observer, and three sections (CID 7001): "Summary" (research
statements + positives), "Findings" (one TEXT "Finding" per task: ``name - PRESENT/absent - probability
0.87 (threshold 0.50)``) and "Current Procedure Descriptions" (model, version, manifest hash, series).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
from highdicom.sr.sop import _SR  # the base of highdicom's SR classes; it has no Basic Text SR class
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import BasicTextSRStorage

from operators.concepts import CT_CHEST_REPORT
from operators.dicom_output import (
    SR_DOCUMENT_FLAGS,
    device_observer_context,
    output_keywords,
    research_statements,
    save,
)
from operators.results import StudyResult, TaskResult, source_headers
from operators.uids import NODE_MODEL_NAME, Equipment

logger = logging.getLogger(__name__)

__all__ = ["BasicTextSR", "build_text_sr", "finding_line", "report_lines", "write_text_sr"]

_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS


class BasicTextSR(_SR):
    """SOP class Basic Text SR, built by highdicom's common SR machinery (evidence, patient/study
    copy, flags). The content must use Basic Text SR value types only (no NUM, no SCOORD)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(sop_class_uid=BasicTextSRStorage, **kwargs)  # type: ignore[arg-type]


def finding_line(task: TaskResult) -> str:
    """``Pleural effusion - PRESENT - probability 0.87 (threshold 0.50)`` (ASCII only: the text SR
    inherits the source's character set, often Latin-1)."""
    decision = "PRESENT" if task.present else "absent"
    return f"{task.name} - {decision} - probability {task.probability:.2f} (threshold {task.threshold:.2f})"


def _summary(result: StudyResult) -> list[str]:
    lines = list(research_statements(result.model))
    positives = [t.name for t in result.positive]
    if positives:
        lines.append(f"Findings at or above their operating threshold: {', '.join(positives)}.")
    else:
        lines.append("No finding at or above its operating threshold.")
    lines.append(
        "Probabilities are model outputs (not calibrated risks); a finding is PRESENT when its probability "
        "is at or above the task's operating threshold."
    )
    if result.model.not_covered:
        lines.append(f"Not covered by this model (not assessed, not absent): {', '.join(result.model.not_covered)}.")
    return lines


def _procedure(result: StudyResult, software_version: str) -> str:
    m = result.model
    synthetic = " Synthetic demo model." if m.synthetic else ""
    images = f"{len(result.sop_instance_uids)} images"
    if result.frame_numbers is not None:
        images = f"{len(result.sop_instance_uids)} frames of {len(result.instance_uids)} multi-frame image(s)"
    return (
        f"Automated analysis of CT series {result.series_instance_uid} "
        f"({images}) by HyperCT model {m.name} version {m.version} "
        f"(manifest SHA-256 {m.manifest_sha256}) on "
        f"{NODE_MODEL_NAME} {software_version}; {len(result.tasks)} task(s).{synthetic}"
    )


def report_lines(result: StudyResult, software_version: str | None = None) -> list[str]:
    """The text report as plain lines (for the text SR, logs of UIDs-only contexts, or a CLI)."""
    version = software_version or Equipment().software_version
    return [
        f"{CT_CHEST_REPORT.meaning} - HyperCT AI findings",
        *_summary(result),
        "Findings:",
        *(f"  {finding_line(t)}" for t in result.tasks),
        _procedure(result, version),
    ]


def _text(name: hd.sr.CodedConcept | object, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value, relationship_type=_CONTAINS)  # type: ignore[arg-type]


def _section(title: object, items: list[hd.sr.TextContentItem]) -> hd.sr.ContainerContentItem:
    section = hd.sr.ContainerContentItem(name=title, relationship_type=_CONTAINS)  # type: ignore[arg-type]
    section.ContentSequence = hd.sr.ContentSequence(items)
    return section


def build_text_sr(
    result: StudyResult,
    source_datasets: Sequence[Dataset],
    *,
    equipment: Equipment | None = None,
) -> BasicTextSR:
    """The Basic Text SR for ``result`` (same study, its own deterministic series)."""
    equipment = equipment or Equipment()
    sources = source_headers(result, source_datasets)
    root = hd.sr.ContainerContentItem(name=CT_CHEST_REPORT, template_id="2000")
    content = hd.sr.ContentSequence()
    content.extend(hd.sr.LanguageOfContentItemAndDescendants(hd.sr.templates.DEFAULT_LANGUAGE))
    content.extend(device_observer_context(equipment))
    content.append(_section(codes.LN.Summary, [_text(codes.LN.Summary, s) for s in _summary(result)]))
    content.append(
        _section(codes.LN.Findings, [_text(codes.DCM.Finding, finding_line(t)) for t in result.tasks])
    )
    content.append(
        _section(
            codes.LN.CurrentProcedureDescriptions,
            [_text(codes.DCM.ProcedureDescription, _procedure(result, equipment.software_version))],
        )
    )
    root.ContentSequence = content
    sr = BasicTextSR(
        evidence=sources,
        content=root,
        **SR_DOCUMENT_FLAGS,
        **output_keywords(
            result, "text-sr", equipment, contribution=_procedure(result, equipment.software_version)
        ),
    )
    equipment.apply(sr)
    logger.info(
        "text SR built: study %s series %s -> SOP %s", result.study_instance_uid, result.series_instance_uid,
        sr.SOPInstanceUID,
    )  # fmt: skip
    return sr


def write_text_sr(
    result: StudyResult,
    source_datasets: Sequence[Dataset],
    folder: str | Path,
    **kwargs: object,
) -> Path:
    """Build the Basic Text SR and save it as ``<folder>/TXT_<SOPInstanceUID>.dcm``."""
    sr = build_text_sr(result, source_datasets, **kwargs)  # type: ignore[arg-type]
    return save(sr, folder, "TXT")
