"""Multi-frame CT (Enhanced CT, Legacy Converted Enhanced CT) seen one frame at a time, the way the
single-frame readers already look at a slice.

Modern scanners send Enhanced CT Image Storage and PACS migrations produce Legacy Converted Enhanced
CT: one instance holds many frames, and what a single-frame CT keeps at the top level (position,
orientation, pixel spacing, slice thickness, rescale) lives in functional groups, per frame in the
Per-Frame Functional Groups Sequence or once for all in the Shared Functional Groups Sequence
(PS3.3 C.7.6.16.1). Rather than a second reader with rules of its own, this module lifts one frame's
attributes to the top level of a small header: ``operators.volume`` then checks every frame exactly
as it checks a slice (spacing, tilt, duplicates, orientation), and series selection and the SR read
SliceThickness or ImageOrientationPatient where they always do. pydicom only: training reaches this
module through ``operators.volume``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage

from operators.volume import InvalidMultiFrameError, MissingTagError, MultiFrameNotSupportedError

logger = logging.getLogger(__name__)

__all__ = [
    "MULTIFRAME_CT_SOP_CLASSES",
    "frame_headers",
    "is_multiframe",
    "summary_header",
]

#: The multi-frame CT objects read here; any other multi-frame object is refused by name.
MULTIFRAME_CT_SOP_CLASSES: dict[str, str] = {
    EnhancedCTImageStorage: "Enhanced CT Image Storage",
    LegacyConvertedEnhancedCTImageStorage: "Legacy Converted Enhanced CT Image Storage",
}
_PER_FRAME = "PerFrameFunctionalGroupsSequence"
_SHARED = "SharedFunctionalGroupsSequence"

#: Functional group macro -> the attributes in it that a single-frame CT keeps at the top level
#: (PS3.3 C.7.6.16.2.1, .3, .4, .9 and C.8.15.3.2: Pixel Measures, Plane Position, Plane Orientation,
#: Pixel Value Transformation, CT Acquisition Details).
_LIFTED: dict[str, tuple[str, ...]] = {
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices"),
    "PlanePositionSequence": ("ImagePositionPatient",),
    "PlaneOrientationSequence": ("ImageOrientationPatient",),
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept", "RescaleType"),
    "CTAcquisitionDetailsSequence": ("GantryDetectorTilt",),
}
#: Without these a frame has no place in the patient or no HU (mandatory in both IODs: PS3.3 A.38.1.4,
#: A.70.1.4).
_REQUIRED_GROUPS = (
    "PixelMeasuresSequence",
    "PlanePositionSequence",
    "PlaneOrientationSequence",
    "PixelValueTransformationSequence",
)
#: Instance attributes the volume reader needs on each frame's header.
_INSTANCE = (
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID",
    "Modality", "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated",
    "BitsStored", "PixelRepresentation",
)  # fmt: skip


def is_multiframe(ds: Dataset) -> bool:
    """Whether ``ds`` is a multi-frame object of any SOP class: it has per-frame functional groups,
    is an Enhanced / Legacy Converted Enhanced CT, or says NumberOfFrames > 1."""
    if _PER_FRAME in ds or str(ds.get("SOPClassUID", "")) in MULTIFRAME_CT_SOP_CLASSES:
        return True
    text = _frame_count_text(ds)
    try:
        return int(text or 1) > 1
    except ValueError:
        return True  # a malformed frame count is refused by frame_headers, which names it


def _frame_count_text(ds: Dataset) -> str:
    """NumberOfFrames as written: read raw, because pydicom's IS conversion raises on garbage."""
    elem = ds.get_item("NumberOfFrames")
    value = elem.value if elem is not None else None
    if isinstance(value, bytes):
        return value.decode("ascii", errors="replace").strip(" \0")
    return "" if value is None else str(value).strip()


def _number_of_frames(ds: Dataset, where: str) -> int:
    text = _frame_count_text(ds)
    if not text:
        raise MissingTagError(f"{where}: multi-frame object without NumberOfFrames", ["NumberOfFrames"])
    try:
        frames = int(text)
    except ValueError:
        raise InvalidMultiFrameError(f"{where}: NumberOfFrames {text!r} is not a number") from None
    if frames < 1:
        raise InvalidMultiFrameError(f"{where}: NumberOfFrames {frames} is not a positive frame count")
    return frames


def _first_item(ds: Dataset | None, keyword: str) -> Dataset | None:
    seq = ds.get(keyword) if ds is not None else None
    return seq[0] if seq else None


def _lift(frame_item: Dataset | None, shared: Dataset | None, out: Dataset) -> list[str]:
    """Copy each functional group's top-level attributes into ``out`` (the frame's own group wins
    over the shared one, PS3.3 C.7.6.16.1); return the required groups found in neither."""
    missing = []
    for group, keywords in _LIFTED.items():
        item = _first_item(frame_item, group) or _first_item(shared, group)
        if item is None:
            if group in _REQUIRED_GROUPS:
                missing.append(group)
            continue
        for keyword in keywords:
            if keyword in item:
                out[keyword] = item[keyword]
    return missing


def frame_headers(ds: Dataset, where: str) -> list[Dataset]:
    """One pixel-free header per frame (frame n at index n - 1) with the frame's functional-group
    attributes lifted to the top level, for the volume reader to check like slices.

    Raises:
        MultiFrameNotSupportedError: not an Enhanced or Legacy Converted Enhanced CT.
        MissingTagError: the functional groups, or a required group of some frame, are absent.
        InvalidMultiFrameError: NumberOfFrames is malformed or disagrees with the per-frame groups.
    """
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in MULTIFRAME_CT_SOP_CLASSES:
        name = UID(sop_class).name if sop_class else "object without SOPClassUID"
        raise MultiFrameNotSupportedError(
            f"{where}: multi-frame {name} (NumberOfFrames {_frame_count_text(ds) or 'absent'}); only "
            "Enhanced CT and Legacy Converted Enhanced CT are read as multi-frame"
        )
    frames = _number_of_frames(ds, where)
    per_frame: Sequence[Dataset] = ds.get(_PER_FRAME) or []
    shared = _first_item(ds, _SHARED)
    if not per_frame and frames > 1:
        raise MissingTagError(f"{where}: no {_PER_FRAME} for {frames} frames", [_PER_FRAME])
    if per_frame and len(per_frame) != frames:
        raise InvalidMultiFrameError(
            f"{where}: {_PER_FRAME} has {len(per_frame)} items for NumberOfFrames {frames}"
        )
    instance = Dataset()
    for keyword in _INSTANCE:
        if keyword in ds:
            instance[keyword] = ds[keyword]
    headers = []
    for n in range(1, frames + 1):
        header = Dataset()
        header.update(instance)
        missing = _lift(per_frame[n - 1] if per_frame else None, shared, header)
        if missing:
            raise MissingTagError(
                f"{where}: frame {n} has no {', '.join(missing)} (neither in its {_PER_FRAME} item nor in "
                f"the {_SHARED})",
                missing,
            )
        headers.append(header)
    logger.debug("%s: %s, %d frames", where, MULTIFRAME_CT_SOP_CLASSES[sop_class], frames)
    return headers


def summary_header(ds: Dataset) -> Dataset:
    """``ds`` itself for a single-frame object; for a multi-frame one, a shallow copy without the
    functional groups and pixel data, with the first frame's attributes (SliceThickness,
    ImageOrientationPatient, ...) and the coded contrast agent lifted to the top level.

    For reading a series' descriptors (selection rules, the SR's image library) this never raises:
    what is missing stays missing, and the rule that needs it says so.
    """
    if not is_multiframe(ds):
        return ds
    out = Dataset()
    for elem in ds:
        if elem.keyword not in (_PER_FRAME, _SHARED) and elem.tag.group != 0x7FE0:
            out.add(elem)
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    per_frame = ds.get(_PER_FRAME)
    _lift(per_frame[0] if per_frame else None, _first_item(ds, _SHARED), out)
    # Enhanced CT codes the agent (Enhanced Contrast/Bolus module, PS3.3 C.7.6.4b) instead of naming it.
    agents = ds.get("ContrastBolusAgentSequence") or []
    if agents and not str(out.get("ContrastBolusAgent", "") or "").strip():
        names = (str(a.get("CodeMeaning", "") or a.get("CodeValue", "") or "coded agent") for a in agents)
        # A new element: an empty one in ``out`` is still the caller's.
        out["ContrastBolusAgent"] = DataElement("ContrastBolusAgent", "LO", "; ".join(names)[:64])
    return out
