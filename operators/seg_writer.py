"""Where the model looked: a DICOM Segmentation of the attention maps of the positive findings.

What it is, and is not (``docs/results.md``): one segment per task that is *present* and allows
saliency (never the echo-derived cardiac tasks), made by thresholding that task's attention map on
the source geometry. It is an AI explanation aid, coded as such: category SCT "Spatial and Relational
Concept", type DCM 130404 "Saliency" (CID 217 "Visual Explanation"), label "Attention: <finding>",
the finding and "not a lesion outline" in the Segment Description, the finding site as the anatomic
region. It never claims to outline the lesion.

BINARY by default (OHIF and 3D Slicer show it), FRACTIONAL (PROBABILITY, 8 bit) on request; empty
frames omitted; ``None`` when no segment would be written (highdicom refuses zero segments, and an
empty SEG would only clutter the study). Frames are aligned to source instances by SOPInstanceUID
(``StudyResult.sop_instance_uids`` is the attention maps' slice order), never by file order; for a
multi-frame source (Enhanced CT), by SOPInstanceUID and frame number (``StudyResult.frame_numbers``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from operators.concepts import ARTIFICIAL_INTELLIGENCE, SALIENCY, SPATIAL_AND_RELATIONAL_CONCEPT, coded
from operators.dicom_output import (
    model_identity,
    output_keywords,
    research_statements,
    save,
    task_tracking_uid,
    tracking_id,
)
from operators.multiframe import frame_headers
from operators.results import Concept, StudyResult, TaskResult, source_headers
from operators.uids import NODE_MANUFACTURER, Equipment

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "SegmentPlan",
    "attention_mask",
    "estimated_bytes",
    "fit_budget",
    "build_seg",
    "plan_segments",
    "write_seg",
]

CONTENT_LABEL = "HYPERCT_ATTN"
CONTENT_DESCRIPTION = "AI attention maps, not lesion outlines. Research use only."
SEGMENTATION_TYPES = ("BINARY", "FRACTIONAL")
#: Default size budget of one SEG (bytes of pixel data + per-frame headers, estimated before encoding).
DEFAULT_MAX_BYTES = 50_000_000
#: Per-frame functional-group overhead used in the estimate (measured about 600 bytes; rounded up).
FRAME_OVERHEAD_BYTES = 1024
#: CIELab display colours cycled over segments (distinct hues, readable over grey CT).
_COLOURS = (
    (60.0, 80.0, 60.0),
    (80.0, -60.0, 70.0),
    (55.0, 20.0, -70.0),
    (85.0, 0.0, 80.0),
    (60.0, 70.0, -40.0),
)


@dataclass(frozen=True, eq=False)
class SegmentPlan:
    """One segment to write: its task, its per-slice values ([slices, rows, cols]) and the rule used."""

    task: TaskResult
    values: np.ndarray  # bool (BINARY) or float32 in [0, 1] (FRACTIONAL), source slice order
    threshold: float


def attention_mask(attention: np.ndarray, relative_threshold: float) -> np.ndarray:
    """Voxels whose attention is at least ``relative_threshold`` x the map's maximum (bool).

    Relative, because attention maps are not calibrated across studies or tasks; an all-zero (or
    negative) map has no attention and gives an empty mask.
    """
    if not 0.0 < relative_threshold <= 1.0:
        raise ValueError(f"saliency threshold must be in (0, 1], got {relative_threshold!r}")
    peak = float(np.max(attention)) if attention.size else 0.0
    if not peak > 0.0:
        return np.zeros(attention.shape, dtype=bool)
    return np.asarray(attention >= relative_threshold * peak)


def plan_segments(result: StudyResult, *, segmentation_type: str = "BINARY") -> list[SegmentPlan]:
    """The segments a SEG would hold, in task order: present, saliency allowed, a map given, and a
    non-empty thresholded region. Skips are logged with the reason (task keys only)."""
    if segmentation_type not in SEGMENTATION_TYPES:
        raise ValueError(f"segmentation_type must be one of {SEGMENTATION_TYPES}, got {segmentation_type!r}")
    plans = []
    for t in result.tasks:
        if not t.present:
            continue
        if not t.saliency:
            logger.debug("no segment for %s: saliency not allowed for this task", t.key)
            continue
        if t.attention is None:
            logger.warning("no segment for %s: positive but no attention map was given", t.key)
            continue
        thr = t.effective_saliency_threshold
        if thr <= 0.0:
            raise ValueError(f"TaskResult({t.key!r}).saliency_threshold must be > 0 for a segment, got {thr}")
        mask = attention_mask(t.attention, thr)
        if not mask.any():
            logger.warning("no segment for %s: attention map is empty after thresholding", t.key)
            continue
        if segmentation_type == "BINARY":
            values: np.ndarray = mask
        else:
            peak = float(np.max(t.attention))
            values = np.where(mask, np.clip(t.attention / peak, 0.0, 1.0), 0.0).astype(np.float32)
        plans.append(SegmentPlan(task=t, values=values, threshold=thr))
    return plans


def _frame_bytes(plan: SegmentPlan) -> int:
    rows, cols = plan.values.shape[1:]
    return (rows * cols + 7) // 8 if plan.values.dtype == bool else rows * cols


def estimated_bytes(plan: SegmentPlan, *, omit_empty_frames: bool = True) -> int:
    """Bytes this segment adds to the SEG: one frame per (non-empty) slice, pixel data + headers."""
    n = plan.values.shape[0]
    frames = int(plan.values.reshape(n, -1).any(axis=1).sum()) if omit_empty_frames else n
    return frames * (_frame_bytes(plan) + FRAME_OVERHEAD_BYTES)


def fit_budget(
    plans: list[SegmentPlan], max_bytes: int | None, *, omit_empty_frames: bool = True
) -> list[SegmentPlan]:
    """Keep the most probable findings' segments whose estimated total fits ``max_bytes`` (None: no
    limit); the SEG must stay sendable to a PACS even when many findings are positive. Dropped
    segments are logged by task key; the SR still reports every finding."""
    if max_bytes is None:
        return plans
    order = sorted(range(len(plans)), key=lambda i: (-plans[i].task.probability, i))
    kept: set[int] = set()
    total = 0
    for i in order:
        size = estimated_bytes(plans[i], omit_empty_frames=omit_empty_frames)
        if total + size <= max_bytes:
            kept.add(i)
            total += size
    dropped = [plans[i].task.key for i in range(len(plans)) if i not in kept]
    if dropped:
        logger.warning(
            "SEG size budget %d bytes: leaving out the attention segment(s) of %s (lowest probabilities)",
            max_bytes,
            ", ".join(dropped),
        )
    return [p for i, p in enumerate(plans) if i in kept]


def _concept_text(c: Concept) -> str:
    return f'({c.value}, {c.scheme_designator}, "{c.meaning}")'


def _description(
    result: StudyResult, number: int, plan: SegmentPlan, fractional: bool
) -> hd.seg.SegmentDescription:
    t, model = plan.task, result.model
    rule = f"attention >= {plan.threshold:g} x max(attention)"
    params = {
        "manifest_sha256": model.manifest_sha256,
        "task": t.key,
        "region": rule,
        "values": "attention / max(attention) inside the region" if fractional else "binary",
    }
    desc = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=f"Attention: {t.name}"[:64],
        segmented_property_category=SPATIAL_AND_RELATIONAL_CONCEPT,
        segmented_property_type=SALIENCY,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=model.name,
            family=ARTIFICIAL_INTELLIGENCE,
            version=model.version,
            source=NODE_MANUFACTURER,
            parameters=params,
        ),
        tracking_uid=task_tracking_uid(result, t),
        tracking_id=tracking_id(t),
        anatomic_regions=[coded(t.finding_site)] if t.finding_site is not None else None,
        display_color=hd.color.CIELabColor(*_COLOURS[(number - 1) % len(_COLOURS)]),
    )
    desc.SegmentDescription = (
        f"AI attention map (saliency) of HyperCT for the finding {t.name} {_concept_text(t.concept)}, "
        f"probability {t.probability:.2f} >= threshold {t.threshold:.2f}. Region: {rule}. "
        "Shows where the model looked; NOT a lesion outline. " + " ".join(research_statements(model))
    )
    return desc


@dataclass(frozen=True, eq=False)
class _Placement:
    """How the SEG's planes meet the source: which slices become planes, in what order, and what
    highdicom is told about the source images."""

    slices: np.ndarray  # slice indices (StudyResult order) of the planes, in plane order
    source_images: list[Dataset]
    further_source_images: list[Dataset] | None = None
    plane_positions: list[hd.PlanePositionSequence] | None = None


def _placement(result: StudyResult, sources: list[Dataset], keep: np.ndarray) -> _Placement:
    """Single-frame series: one source image per plane (highdicom references each). One multi-frame
    instance: every frame in frame order (highdicom drops the empty ones and references each plane's
    frame by ReferencedFrameNumber). Several multi-frame instances: highdicom takes one multi-frame
    source only, so the others join as further source images (referenced in the series) and planes
    are placed by their positions, without per-frame derivation references.
    """
    if result.frame_numbers is None:
        return _Placement(keep, [sources[i] for i in keep])
    sources = [_shared_geometry(ds) for ds in sources]
    if len(sources) == 1:
        return _Placement(np.argsort(result.frame_numbers, kind="stable"), sources)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    frames = {uid: frame_headers(ds, f"source SOP {uid}") for uid, ds in by_uid.items()}
    positions = [
        hd.PlanePositionSequence(
            hd.CoordinateSystemNames.PATIENT,
            frames[result.sop_instance_uids[k]][result.frame_numbers[k] - 1].ImagePositionPatient,
        )
        for k in keep
    ]
    return _Placement(keep, sources[:1], sources[1:], positions)


#: What highdicom reads from a multi-frame source's Shared Functional Groups only.
_SHARED_BY_HIGHDICOM = ("PlaneOrientationSequence", "PixelMeasuresSequence")


def _shared_geometry(header: Dataset) -> Dataset:
    """``header`` (a pixel-free copy: ``results.source_headers``) with frame 1's orientation and pixel
    measures in its Shared Functional Groups when the source repeats them per frame, which is legal
    (and uniform: the volume reader checked) but which highdicom does not read."""
    shared = (header.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    missing = [g for g in _SHARED_BY_HIGHDICOM if g not in shared]
    if not missing:
        return header
    item = Dataset()
    item.update(shared)
    first = header.PerFrameFunctionalGroupsSequence[0]
    for group in missing:
        item[group] = first[group]
    # A new element, not an assignment to the value the header shares with the source dataset.
    header["SharedFunctionalGroupsSequence"] = DataElement("SharedFunctionalGroupsSequence", "SQ", [item])
    return header


def build_seg(
    result: StudyResult,
    source_datasets: Sequence[Dataset],
    *,
    segmentation_type: str = "BINARY",
    omit_empty_frames: bool = True,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    equipment: Equipment | None = None,
) -> hd.seg.Segmentation | None:
    """The attention-map SEG for ``result``, or None when no finding gets a segment.

    Args:
        result: the study's results; ``TaskResult.attention`` on the source geometry.
        source_datasets: the selected series' instances (headers suffice), any order.
        segmentation_type: "BINARY" (default) or "FRACTIONAL" (PROBABILITY, 8-bit, values
            attention / max inside the thresholded region, 0 outside).
        omit_empty_frames: leave out frames without any segment pixel (default; keeps the SEG small;
            only those source slices are then referenced per frame).
        max_bytes: size budget (estimated before encoding, see :func:`fit_budget`); None: no limit.
        equipment: site-specific equipment attributes.
    """
    equipment = equipment or Equipment()
    plans = fit_budget(
        plan_segments(result, segmentation_type=segmentation_type),
        max_bytes,
        omit_empty_frames=omit_empty_frames,
    )
    if not plans:
        logger.info(
            "no SEG for study %s: no positive finding with an attention region", result.study_instance_uid
        )
        return None
    sources = source_headers(result, source_datasets)
    n = len(result.sop_instance_uids)
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    for p in plans:
        if p.values.shape != (n, rows, cols):
            raise ValueError(
                f"TaskResult({p.task.key!r}).attention shape {p.values.shape} is not the source geometry "
                f"{(n, rows, cols)} (slices, Rows, Columns)"
            )
    fractional = segmentation_type == "FRACTIONAL"
    if omit_empty_frames:
        used = np.zeros(n, dtype=bool)
        for p in plans:
            used |= p.values.reshape(n, -1).any(axis=1)
        keep = np.flatnonzero(used)
    else:
        keep = np.arange(n)
    placement = _placement(result, sources, keep)
    pixels = np.stack([p.values[placement.slices] for p in plans], axis=-1)  # [frames, rows, cols, segments]
    if not fractional:
        pixels = pixels.astype(np.uint8)
    used_designators = {
        c.scheme_designator for p in plans for c in (p.task.concept, p.task.finding_site) if c is not None
    }
    seg = hd.seg.Segmentation(
        source_images=placement.source_images,
        further_source_images=placement.further_source_images,
        plane_positions=placement.plane_positions,
        pixel_array=pixels,
        segmentation_type=segmentation_type,
        segment_descriptions=[_description(result, n + 1, p, fractional) for n, p in enumerate(plans)],
        fractional_type="PROBABILITY",
        max_fractional_value=255,
        content_description=CONTENT_DESCRIPTION,
        content_label=CONTENT_LABEL,
        omit_empty_frames=omit_empty_frames,
        **output_keywords(
            result,
            "seg",
            equipment,
            contribution=f"HyperCT attention maps, {model_identity(result.model)}",
            used_designators=used_designators,
        ),
    )
    equipment.apply(seg)
    logger.info(
        "SEG built: study %s series %s -> SOP %s (%s, %d segment(s), %d frame(s))",
        result.study_instance_uid,
        result.series_instance_uid,
        seg.SOPInstanceUID,
        segmentation_type,
        len(plans),
        int(seg.NumberOfFrames),
    )
    return seg


def write_seg(
    result: StudyResult,
    source_datasets: Sequence[Dataset],
    folder: str | Path,
    **kwargs: object,
) -> Path | None:
    """Build the SEG (see :func:`build_seg`) and save it as ``<folder>/SEG_<SOPInstanceUID>.dcm``;
    None (nothing written) when there is no segment."""
    seg = build_seg(result, source_datasets, **kwargs)  # type: ignore[arg-type]
    return None if seg is None else save(seg, folder, "SEG")
