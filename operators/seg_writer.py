"""Where the model looked: a DICOM Segmentation of the attention maps of the positive findings.

What it is, and is not (``docs/results.md``): one segment per task that is *present* and allows
saliency (never the echo-derived cardiac tasks), a region of that task's attention map on the source
geometry: the focal region, or the relative one (``operators.attention_region``). The map itself,
unthresholded, is the Parametric Map (``pmap_writer``). It is an AI explanation aid, coded as such:
category SCT "Spatial and Relational Concept", type DCM 130404 "Saliency" (CID 217 "Visual
Explanation"), label "Attention: <finding>", the finding, the region rule and "not a lesion outline"
in the Segment Description, the finding site as the anatomic region. It never claims to outline the
lesion.

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
from pydicom.dataset import Dataset

from operators.attention_region import Body, attention_mask, focal_mask
from operators.concepts import ARTIFICIAL_INTELLIGENCE, SALIENCY, SPATIAL_AND_RELATIONAL_CONCEPT, coded
from operators.dicom_output import (
    model_identity,
    output_keywords,
    research_statements,
    save,
    task_tracking_uid,
    tracking_id,
)
from operators.placement import placement
from operators.results import Concept, StudyResult, TaskResult, source_headers
from operators.settings import FocalRegion
from operators.uids import NODE_MANUFACTURER, Equipment

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "SegmentPlan",
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
    region: str  # how the region was made, as the segment's description and parameters say it


def _focal_rule(threshold: float, rule: FocalRegion, volume_ml: float) -> str:
    return (
        f"focal, {volume_ml:.1f} mL: inside the body (tissue above {rule.body_threshold_hu:g} HU, lungs "
        f"included) and attention >= {threshold:g} x max(attention), the top {rule.top_percent:g} % of "
        f"body voxels by attention, at most {rule.max_volume_ml:g} mL, the {rule.components} largest "
        "connected component(s)"
    )


def plan_segments(
    result: StudyResult,
    *,
    segmentation_type: str = "BINARY",
    focal: FocalRegion | None = None,
    body: Body | None = None,
) -> list[SegmentPlan]:
    """The segments a SEG would hold, in task order: present, saliency allowed, a map given, and a
    non-empty region. The region is the relative one (``attention_region.attention_mask``) unless
    ``focal`` is given, which needs the study's ``body`` (``attention_region.focal_mask``). Skips
    are logged with the reason (task keys only)."""
    if segmentation_type not in SEGMENTATION_TYPES:
        raise ValueError(f"segmentation_type must be one of {SEGMENTATION_TYPES}, got {segmentation_type!r}")
    if focal is not None and body is None:
        raise ValueError("the focal region needs the study's body (attention_region.Body.of(volume))")
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
        if focal is None or body is None:
            mask = attention_mask(t.attention, thr)
            region = f"attention >= {thr:g} x max(attention)"
        else:
            mask = focal_mask(t.attention, thr, body, focal)
            region = _focal_rule(thr, focal, np.count_nonzero(mask) * body.voxel_ml)
        if not mask.any():
            logger.warning(
                "no segment for %s: its %s region is empty", t.key, "relative" if focal is None else "focal"
            )
            continue
        if segmentation_type == "BINARY":
            values: np.ndarray = mask
        else:
            peak = float(np.max(t.attention))
            values = np.where(mask, np.clip(t.attention / peak, 0.0, 1.0), 0.0).astype(np.float32)
        plans.append(SegmentPlan(task=t, values=values, region=region))
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
    rule = plan.region
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


def build_seg(
    result: StudyResult,
    source_datasets: Sequence[Dataset],
    *,
    segmentation_type: str = "BINARY",
    omit_empty_frames: bool = True,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    equipment: Equipment | None = None,
    focal: FocalRegion | None = None,
    body: Body | None = None,
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
        focal: the focal rule (``app.yaml`` ``outputs.focal``); None: the relative region.
        body: the study's body (``attention_region.Body.of(volume)``), needed by ``focal``.
    """
    equipment = equipment or Equipment()
    plans = fit_budget(
        plan_segments(result, segmentation_type=segmentation_type, focal=focal, body=body),
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
    planes = placement(result, sources, keep)
    pixels = np.stack([p.values[planes.slices] for p in plans], axis=-1)  # [frames, rows, cols, segments]
    if not fractional:
        pixels = pixels.astype(np.uint8)
    used_designators = {
        c.scheme_designator for p in plans for c in (p.task.concept, p.task.finding_site) if c is not None
    }
    seg = hd.seg.Segmentation(
        source_images=planes.source_images,
        further_source_images=planes.further_source_images,
        plane_positions=planes.plane_positions,
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
