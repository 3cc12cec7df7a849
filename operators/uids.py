"""Deterministic UIDs for the objects the node writes, and recognising those objects again.

Why deterministic: a rerun of the same model on the same series must *replace* the previous SR / SEG
in a PACS, not add a second copy next to it. Every output UID is therefore a name-based UUID
(RFC 9562 version 5, written as a ``2.25.<integer>`` UID per ISO/IEC 9834-8 / DICOM PS3.5 B.2) of

    (UID scheme version, StudyInstanceUID, selected SeriesInstanceUID, manifest SHA-256, object kind, role)

so the same inputs always give the same SeriesInstanceUID / SOPInstanceUID, and a different model build
(another manifest hash) or another series gives different ones. Only the creation date/time differs
between reruns.

Why :func:`is_own_output`: the node receives whatever the PACS forwards, including its own SR / SEG
sent back to the same study. It must never feed those into the model (a loop at best, garbage at
worst). Our outputs carry Manufacturer ``"HyperCT Node"`` together with two fixed UIDs in the General
Equipment module, Manufacturer's Device Class UID (:data:`NODE_DEVICE_CLASS_UID`, the product) and
Device UID (:data:`NODE_DEVICE_UID`), and SRs also name the node as Device Observer (UID
:data:`NODE_DEVICE_UID`). Standard attributes only: private tags are commonly stripped by archives
and anonymisers.
"""

from __future__ import annotations

import importlib.metadata
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset

if TYPE_CHECKING:
    from highdicom import ContributingEquipment

logger = logging.getLogger(__name__)

__all__ = [
    "NODE_DEVICE_CLASS_UID",
    "NODE_DEVICE_SERIAL",
    "NODE_DEVICE_UID",
    "NODE_MANUFACTURER",
    "NODE_MODEL_NAME",
    "OUTPUT_KINDS",
    "SERIES_NUMBERS",
    "UID_SCHEME",
    "Equipment",
    "OutputUIDs",
    "is_own_output",
    "name_based_uid",
    "node_software_version",
    "output_uids",
    "tracking_uid",
]

#: Manufacturer (0008,0070) of every object the node writes.
NODE_MANUFACTURER = "HyperCT Node"
#: Manufacturer's Model Name (0008,1090) of every object the node writes.
NODE_MODEL_NAME = "HyperCT Node"
#: Device UID (0018,1002) of the node, fixed for all installations and versions (a UUID generated once,
#: 2.25 form): written in the General Equipment module and as the SR Device Observer UID (TID 1004).
NODE_DEVICE_UID = "2.25.114105102254913576657360493369908474120"
#: Manufacturer's Device Class UID (0018,100B): the *product* "HyperCT Node", so every installation
#: recognises every other's outputs.
NODE_DEVICE_CLASS_UID = "2.25.9337926179985418445403576457267467715"
#: Device Serial Number (0018,1000) written when the deployment sets none (highdicom's SEG needs one).
NODE_DEVICE_SERIAL = "HYPERCT-NODE"
#: Namespace of the name-based UUIDs below; changing it (or :data:`UID_SCHEME`) changes every output UID.
_NAMESPACE = uuid.UUID("3ac1863e-5c4f-41c1-ba2b-62137ae10db3")
#: Version of the UID derivation, part of every name; bump only on purpose (reruns would then duplicate).
UID_SCHEME = "hyperct-node-uids-v1"
#: Object kinds the node writes; each gets its own series ("pmap": one series per finding, see
#: :func:`output_uids`).
OUTPUT_KINDS = ("sr", "seg", "text-sr", "pmap")
#: Fixed Series Numbers per kind, so the result series sort together and the same on every rerun.
SERIES_NUMBERS = {"sr": 9801, "seg": 9802, "text-sr": 9803, "pmap": 9804}
_DEVICE_OBSERVER_UID = ("121012", "DCM")


@dataclass(frozen=True)
class OutputUIDs:
    """The UIDs of one output object."""

    series_instance_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Equipment:
    """Site-specific General Equipment attributes of the outputs (the identity attributes, Manufacturer
    and Device UID, are fixed: :func:`is_own_output` depends on them)."""

    device_serial_number: str = NODE_DEVICE_SERIAL
    software_version: str = field(default_factory=lambda: node_software_version())
    institution_name: str | None = None
    institutional_department_name: str | None = None
    station_name: str | None = None

    def apply(self, ds: Dataset) -> None:
        """Set the General Equipment attributes on an output dataset."""
        ds.Manufacturer = NODE_MANUFACTURER
        ds.ManufacturerModelName = NODE_MODEL_NAME
        ds.DeviceSerialNumber = self.device_serial_number
        ds.DeviceUID = NODE_DEVICE_UID
        ds.ManufacturerDeviceClassUID = NODE_DEVICE_CLASS_UID
        ds.SoftwareVersions = self.software_version
        if self.institution_name:
            ds.InstitutionName = self.institution_name
        if self.institutional_department_name:
            ds.InstitutionalDepartmentName = self.institutional_department_name
        if self.station_name:
            ds.StationName = self.station_name

    def contributing_equipment(self, description: str) -> ContributingEquipment:
        """A Contributing Equipment Sequence item (purpose: Processing Equipment) naming the node and the
        model: IHE AIR's "processing algorithm" equipment. (No Device UID here: dicom3tools' dciodvfy
        does not know it in this macro and flags the object as Standard Extended.)"""
        from highdicom import ContributingEquipment
        from pydicom.sr.codedict import codes

        item = ContributingEquipment(
            manufacturer=NODE_MANUFACTURER,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=NODE_MODEL_NAME,
            software_versions=self.software_version,
            device_serial_number=self.device_serial_number,
            institution_name=self.institution_name,
            station_name=self.station_name,
            contribution_description=description[:1024],
        )
        return item


def name_based_uid(*parts: str) -> str:
    """``2.25.<int>`` of the version-5 UUID of ``parts`` (joined with a unit separator, which no UID or
    hex digest contains) in the node's namespace."""
    for p in parts:
        if not isinstance(p, str) or not p:
            raise ValueError(f"UID name parts must be non-empty strings, got {p!r}")
    return f"2.25.{uuid.uuid5(_NAMESPACE, chr(31).join((UID_SCHEME, *parts))).int}"


def _check(study_instance_uid: str, series_instance_uid: str, manifest_sha256: str) -> None:
    if not study_instance_uid:
        raise ValueError("StudyInstanceUID is empty; output UIDs are derived from it")
    if not series_instance_uid:
        raise ValueError(
            "SeriesInstanceUID (of the selected series) is empty; output UIDs are derived from it"
        )
    if not manifest_sha256:
        raise ValueError("manifest_sha256 is empty; output UIDs are derived from it")


def output_uids(
    study_instance_uid: str,
    series_instance_uid: str,
    manifest_sha256: str,
    kind: str,
    task_key: str | None = None,
) -> OutputUIDs:
    """Series and SOP Instance UID of the ``kind`` object ("sr", "seg", "text-sr", "pmap") for this
    study, selected series and model build. Same inputs, same UIDs.

    ``task_key`` names the finding of a per-finding object (a Parametric Map): each gets a series of
    its own, because OHIF (``cornerstone-dicom-pmap``) makes one display set per series from its
    first instance only."""
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r}; must be one of {OUTPUT_KINDS}")
    _check(study_instance_uid, series_instance_uid, manifest_sha256)
    if task_key == "":
        raise ValueError("task_key is empty; per-finding output UIDs are derived from it")
    key: tuple[str, ...] = (study_instance_uid, series_instance_uid, manifest_sha256.lower(), kind)
    if task_key is not None:
        key += (task_key,)
    return OutputUIDs(
        series_instance_uid=name_based_uid(*key, "series"),
        sop_instance_uid=name_based_uid(*key, "instance"),
    )


def tracking_uid(
    study_instance_uid: str, series_instance_uid: str, manifest_sha256: str, task_key: str
) -> str:
    """Tracking Unique Identifier of one task's finding: the same UID in the SR measurement group and
    in the SEG segment, which is how a viewer links the two."""
    _check(study_instance_uid, series_instance_uid, manifest_sha256)
    if not task_key:
        raise ValueError("task_key is empty; tracking UIDs are derived from it")
    return name_based_uid(
        study_instance_uid, series_instance_uid, manifest_sha256.lower(), "tracking", task_key
    )


def node_software_version() -> str:
    """Version of the installed ``hyperct-node`` distribution (SoftwareVersions), or ``"unknown"``."""
    try:
        return importlib.metadata.version("hyperct-node")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _values(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str | bytes):
        return [str(value).strip()]
    if not isinstance(value, Iterable):
        return [str(value).strip()]
    try:
        return [str(v).strip() for v in value]
    except TypeError:
        return [str(value).strip()]


def _observer_uids(items: Iterable[Dataset]) -> Iterable[str]:
    for item in items:
        if item.get("ValueType") != "UIDREF" or "ConceptNameCodeSequence" not in item:
            continue
        name = item.ConceptNameCodeSequence[0]
        if (name.get("CodeValue"), name.get("CodingSchemeDesignator")) == _DEVICE_OBSERVER_UID:
            yield str(item.get("UID", "")).strip()


def is_own_output(dataset: Dataset) -> bool:
    """True if ``dataset`` (a full dataset or only its header) was written by a HyperCT Node.

    Requires Manufacturer "HyperCT Node" *and* one of our UIDs: Manufacturer's Device Class UID
    (the product), Device UID (the node), or, in an SR, our Device Observer UID in the root content.
    The manufacturer name alone is never enough (another product could share it), nor is a UID alone
    (a tool quoting our SR could copy it into a foreign object).
    """
    if str(dataset.get("Manufacturer", "")).strip() != NODE_MANUFACTURER:
        return False
    if NODE_DEVICE_CLASS_UID in _values(dataset.get("ManufacturerDeviceClassUID")):
        return True
    if NODE_DEVICE_UID in _values(dataset.get("DeviceUID")):
        return True
    if "ContentSequence" in dataset:
        return NODE_DEVICE_UID in set(_observer_uids(dataset.ContentSequence))
    return False
