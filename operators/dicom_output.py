"""What every DICOM object the node writes shares: the series and equipment keywords, the research-use
labels, the device observer, the tracking identifiers, and how the file is saved.

The TID 1500 SR (``sr_writer``), the attention SEG (``seg_writer``), the saliency Parametric Maps
(``pmap_writer``) and the Basic Text SR (``text_report``) pass :func:`output_keywords` to their
highdicom constructor and then :meth:`~operators.uids.Equipment.apply`, so they all agree on who
made them (Manufacturer, model, Device UID: what :func:`~operators.uids.is_own_output` recognises),
on their deterministic series and instance UIDs, and on saying "research use only". The patient and
study attributes are not here: highdicom copies them from the source instances, which
:func:`~operators.results.source_headers` vets and completes (Type 2) for every writer.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset

from operators.concepts import DEVICE, coding_scheme_items
from operators.results import ModelInfo, StudyResult, TaskResult
from operators.uids import (
    NODE_DEVICE_UID,
    NODE_MANUFACTURER,
    NODE_MODEL_NAME,
    SERIES_NUMBERS,
    Equipment,
    output_uids,
    tracking_uid,
)

__all__ = [
    "RESEARCH_USE_STATEMENT",
    "OutputKeywords",
    "SR_DOCUMENT_FLAGS",
    "SYNTHETIC_STATEMENT",
    "device_observer_context",
    "model_identity",
    "output_keywords",
    "research_statements",
    "save",
    "series_description",
    "task_tracking_uid",
    "tracking_id",
]

RESEARCH_USE_STATEMENT = (
    "For research use only. Not for diagnostic use. Results of an AI model, not reviewed by a physician."
)
SYNTHETIC_STATEMENT = "Synthetic demo model: trained on synthetic data only. Not for clinical use."
#: What each output kind's Series Description names, before its research-use label.
_SERIES_SUBJECTS = {
    "sr": "AI findings",
    "seg": "AI attention maps",
    "text-sr": "AI findings (text)",
    "pmap": "saliency",
}


class _SRDocumentFlags(TypedDict):
    is_complete: bool
    is_final: bool
    is_verified: bool


#: SR document status (PS3.3 C.17.2): complete, but preliminary and unverified: no physician has
#: verified an AI result.
SR_DOCUMENT_FLAGS = _SRDocumentFlags(is_complete=True, is_final=False, is_verified=False)


class OutputKeywords(TypedDict):
    """The keyword block of :func:`output_keywords` (typed, so each constructor call is checked)."""

    series_instance_uid: str
    series_number: int
    sop_instance_uid: str
    instance_number: int
    manufacturer: str
    manufacturer_model_name: str
    software_versions: str
    device_serial_number: str
    institution_name: str | None
    institutional_department_name: str | None
    series_description: str
    contributing_equipment: list[hd.ContributingEquipment]
    coding_schemes: list[CodingSchemeIdentificationItem] | None


def research_statements(model: ModelInfo) -> list[str]:
    """The statements every output carries: research use, plus the synthetic note when it applies."""
    return [RESEARCH_USE_STATEMENT, *([SYNTHETIC_STATEMENT] if model.synthetic else [])]


def series_description(kind: str, model: ModelInfo, finding: str | None = None) -> str:
    """Series Description of the ``kind`` output ("sr", "seg", "text-sr", "pmap"): what it holds and
    the research-use (and synthetic) label, within LO's 64 characters. ``finding`` (a per-finding
    series) is named after the subject, shortened so that the label always survives whole: a
    viewer's series list is where a reader sees which map is which."""
    label = "SYNTHETIC DEMO - RESEARCH ONLY" if model.synthetic else "RESEARCH USE ONLY"
    subject = f"HyperCT {_SERIES_SUBJECTS[kind]}"
    if finding:
        room = 64 - len(subject) - len(label) - len(": ") - len(" - ")
        subject += f": {finding[:room].rstrip()}"
    return f"{subject} - {label}"


def model_identity(model: ModelInfo) -> str:
    """``model <name> <version>[ (synthetic demo model)], manifest SHA-256 <hash>``: the model build
    in the Contribution Description of the outputs."""
    synthetic = " (synthetic demo model)" if model.synthetic else ""
    return f"model {model.name} {model.version}{synthetic}, manifest SHA-256 {model.manifest_sha256}"


def task_tracking_uid(result: StudyResult, task: TaskResult) -> str:
    """Tracking UID (TID 4108) of ``task``'s finding: the same in the SR groups and the SEG segment."""
    return tracking_uid(
        result.study_instance_uid, result.series_instance_uid, result.model.manifest_sha256, task.key
    )


def tracking_id(task: TaskResult) -> str:
    """Tracking Identifier text (TID 4108, LO) of ``task``'s finding."""
    return f"HyperCT {task.name}"[:64]


def output_keywords(
    result: StudyResult,
    kind: str,
    equipment: Equipment,
    *,
    contribution: str,
    used_designators: set[str] | None = None,
    task: TaskResult | None = None,
) -> OutputKeywords:
    """The keyword arguments every highdicom constructor of an output takes from the node: the
    deterministic series / instance UIDs and series number of ``kind``, the General Equipment
    attributes, the series description, the node's Contributing Equipment item (its Contribution
    Description is ``contribution``) and the declarations of the private coding schemes in
    ``used_designators`` (see :func:`~operators.concepts.coding_scheme_items`). ``task`` makes it
    the object of one finding (a Parametric Map): its own series, named after the finding."""
    model = result.model
    uids = output_uids(
        result.study_instance_uid,
        result.series_instance_uid,
        model.manifest_sha256,
        kind,
        task.key if task is not None else None,
    )
    return OutputKeywords(
        series_instance_uid=uids.series_instance_uid,
        series_number=SERIES_NUMBERS[kind],
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        manufacturer=NODE_MANUFACTURER,
        manufacturer_model_name=NODE_MODEL_NAME,
        software_versions=equipment.software_version,
        device_serial_number=equipment.device_serial_number,
        institution_name=equipment.institution_name,
        institutional_department_name=equipment.institutional_department_name,
        series_description=series_description(kind, model, task.name if task is not None else None),
        contributing_equipment=[equipment.contributing_equipment(contribution)],
        coding_schemes=coding_scheme_items(model, used_designators or set()) or None,
    )


def device_observer_context(equipment: Equipment) -> hd.sr.ObservationContext:
    """TID 1001/1004: the node as the (only) observer of an SR, identified by its fixed Device UID."""
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=DEVICE,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=NODE_DEVICE_UID,
                name=NODE_MODEL_NAME,
                manufacturer_name=NODE_MANUFACTURER,
                model_name=NODE_MODEL_NAME,
                serial_number=equipment.device_serial_number,
            ),
        )
    )


def save(ds: Dataset, folder: str | Path, prefix: str) -> Path:
    """Write ``ds`` as a DICOM Part 10 file named by its SOP Instance UID (a rerun overwrites it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{prefix}_{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
