"""The attention map as what it is: a DICOM Parametric Map of each positive finding's saliency.

Why (``docs/results.md`` §5): saliency is a continuous quantity. DCM 130404 "Saliency" belongs to the
Parametric Map quantities (CID 217 "Visual Explanation", CID 7180), and a Parametric Map carries the
map unthresholded, in its own float values, on the source CT's frame of reference: a viewer (OHIF
≥ 3.9's ``cornerstone-dicom-pmap``, 3D Slicer through dcmqi) overlays it with its own colour map.
The SEG (``seg_writer``) keeps a focal region of it for viewers and PACS that show only SEG.

Encoding, chosen for the readers:

* **one map per instance, one instance per series** (deterministic UIDs per finding,
  ``uids.output_uids(..., task_key)``): OHIF makes one display set per series from its first
  instance and copies the frames into a volume of the referenced series' size, so it reads neither a
  second map in a series nor several maps in one instance; dcmqi's ``paramap2itkimage`` writes one
  image per object. Every source slice is a frame (OHIF places frames by their source reference into
  that volume), ordered along the slice normal (dcmqi places frames by their order), each frame
  referencing its source slice (and frame number, for a multi-frame source: ``operators.placement``,
  shared with the SEG);
* **float32** values (FloatPixelData, uncompressed: the standard defines no codec for float pixels)
  equal to the attention map, with a Real World Value Mapping of slope 1, intercept 0, Quantity
  Definition DCM 130404 "Saliency" and unit UCUM "1" ("no units"); the window spans the map's range;
* Image Type ``DERIVED\\PRIMARY\\VOLUME\\RESAMPLED`` (the model's map resampled to the source grid;
  dicom3tools 2022 does not know the newer ``QUANTITY``), Frame Anatomy "Chest", laterality U
  (dicom3tools requires a laterality of a derived multi-frame image), Content Creator's Name empty
  (Type 2: a device made it), the series description naming the finding and "research use only";
* patient, study, frame of reference, equipment and own-output marking as every output of the node
  (``dicom_output.output_keywords``), so :func:`~operators.uids.is_own_output` recognises it.

Size: 4 bytes per voxel, 315 MB for a 300 x 512 x 512 series, per finding. A study's maps are kept to
a budget (the most probable findings first; the SR still reports every finding), and each map is
built, saved and released before the next, so memory holds one map at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from operators.concepts import NO_UNITS, SALIENCY
from operators.dicom_output import model_identity, output_keywords, save
from operators.placement import placement
from operators.results import StudyResult, TaskResult, source_headers
from operators.uids import Equipment

logger = logging.getLogger(__name__)

__all__ = [
    "CONTENT_DESCRIPTION",
    "CONTENT_LABEL",
    "DEFAULT_MAX_BYTES",
    "WrittenMap",
    "build_pmap",
    "estimated_bytes",
    "plan_maps",
    "write_pmaps",
]

CONTENT_LABEL = "HYPERCT_SALIENCY"
CONTENT_DESCRIPTION = "AI saliency map, not a lesion outline. Research use only."
#: Default budget of one study's maps (bytes of float pixels + per-frame headers): three 300-slice
#: 512 x 512 maps.
DEFAULT_MAX_BYTES = 1_000_000_000
#: Per-frame functional-group overhead used in the estimate (measured 670 bytes; rounded up).
FRAME_OVERHEAD_BYTES = 1024
#: The anatomy every frame shows (Frame Anatomy; its laterality: unpaired).
_CHEST = hd.sr.CodedConcept.from_code(codes.SCT.Chest)


@dataclass(frozen=True)
class WrittenMap:
    """A map on disk: its finding, its file and its header (no pixels), which the SR references."""

    task_key: str
    path: Path
    header: Dataset


def plan_maps(result: StudyResult) -> list[TaskResult]:
    """The findings that get a map, in task order: present, saliency allowed, a map with some attention
    (an all-zero map explains nothing). Skips are logged with the reason (task keys only)."""
    planned = []
    for t in result.tasks:
        if not (t.present and t.saliency):
            continue
        if t.attention is None:
            logger.warning("no parametric map for %s: positive but no attention map was given", t.key)
        elif not float(np.max(t.attention)) > 0.0:
            logger.warning("no parametric map for %s: the attention map is zero everywhere", t.key)
        else:
            planned.append(t)
    return planned


def estimated_bytes(task: TaskResult) -> int:
    """Bytes the map of ``task`` takes: every slice a float32 frame, plus its per-frame headers."""
    if task.attention is None:
        raise ValueError(f"TaskResult({task.key!r}) has no attention map")
    n, rows, cols = task.attention.shape
    return n * (rows * cols * 4 + FRAME_OVERHEAD_BYTES)


def _fit_budget(tasks: list[TaskResult], max_bytes: int | None) -> list[TaskResult]:
    """The most probable findings' maps whose estimated total fits ``max_bytes`` (None: all), in task
    order; left-out findings are logged by key."""
    if max_bytes is None:
        return tasks
    kept: set[str] = set()
    total = 0
    for t in sorted(tasks, key=lambda t: -t.probability):
        if total + estimated_bytes(t) <= max_bytes:
            kept.add(t.key)
            total += estimated_bytes(t)
    dropped = [t.key for t in tasks if t.key not in kept]
    if dropped:
        logger.warning(
            "parametric map budget %d bytes: leaving out the map(s) of %s (lowest probabilities)",
            max_bytes,
            ", ".join(dropped),
        )
    return [t for t in tasks if t.key in kept]


def _frames_along_the_normal(pm: hd.pm.ParametricMap) -> None:
    """Reorder ``pm``'s frames (functional groups and float pixels together) to ascend along the
    slice normal (row x column direction).

    Why: dcmqi's ``paramap2itkimage`` (1.5.7) puts frame *n* at slice *n* from the volume's lowest
    position along that normal and never reads a frame's own position, while highdicom orders planes
    the other way for an axial series: the map came back upside down. OHIF places frames by their
    source references, so either order suits it."""
    orientation = np.asarray(
        pm.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient, float
    )
    normal = np.cross(orientation[:3], orientation[3:])
    frames = pm.PerFrameFunctionalGroupsSequence
    distances = [
        float(normal @ np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, float)) for f in frames
    ]
    order = np.argsort(distances, kind="stable")
    if np.array_equal(order, np.arange(len(order))):
        return
    pixels = np.frombuffer(pm.FloatPixelData, dtype="<f4").reshape(len(order), int(pm.Rows), int(pm.Columns))
    pm.PerFrameFunctionalGroupsSequence = [frames[i] for i in order]
    pm.FloatPixelData = pixels[order].tobytes()


def _frame_anatomy() -> Dataset:
    item = Dataset()
    item.AnatomicRegionSequence = [_CHEST]
    item.FrameLaterality = "U"
    return item


def build_pmap(
    result: StudyResult,
    task: TaskResult,
    source_datasets: Sequence[Dataset],
    *,
    equipment: Equipment | None = None,
) -> hd.pm.ParametricMap:
    """The Parametric Map of ``task``'s attention map (on the source geometry, every slice a frame).

    Args:
        result: the study's results; ``task`` one of its tasks, with an attention map.
        task: the finding whose map this is.
        source_datasets: the selected series' instances (headers suffice), any order.
        equipment: site-specific equipment attributes.
    """
    if task.attention is None:
        raise ValueError(f"TaskResult({task.key!r}) has no attention map")
    equipment = equipment or Equipment()
    sources = source_headers(result, source_datasets)
    n = len(result.sop_instance_uids)
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    if task.attention.shape != (n, rows, cols):
        raise ValueError(
            f"TaskResult({task.key!r}).attention shape {task.attention.shape} is not the source geometry "
            f"{(n, rows, cols)} (slices, Rows, Columns)"
        )
    planes = placement(result, sources, np.arange(n))
    pixels = np.ascontiguousarray(task.attention[planes.slices], dtype=np.float32)
    low, high = float(pixels.min()), float(pixels.max())
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="SALIENCY",
        lut_explanation=f"HyperCT attention for {task.name}"[:64],
        unit=NO_UNITS,
        value_range=(low, high),
        slope=1.0,
        intercept=0.0,
        quantity_definition=SALIENCY,
    )
    pm = hd.pm.ParametricMap(
        source_images=planes.source_images,
        further_source_images=planes.further_source_images,
        plane_positions=planes.plane_positions,
        pixel_array=pixels,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[
            hd.VOILUTTransformation(
                window_center=(low + high) / 2,
                window_width=max(high - low, high),
                # a window narrower than 1 (saliency is about 0..1) is only valid as LINEAR_EXACT
                voi_lut_function=hd.VOILUTFunctionValues.LINEAR_EXACT,
            )
        ],
        content_label=CONTENT_LABEL,
        content_description=CONTENT_DESCRIPTION,
        derived_pixel_contrast=hd.pm.DerivedPixelContrastValues.RESAMPLED,
        **output_keywords(
            result,
            "pmap",
            equipment,
            contribution=f"HyperCT attention map of {task.key}, {model_identity(result.model)}",
            task=task,
        ),
    )
    _frames_along_the_normal(pm)
    pm.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [_frame_anatomy()]
    pm.ContentCreatorName = ""
    equipment.apply(pm)
    logger.info(
        "parametric map built: study %s task %s -> SOP %s (%d frame(s))",
        result.study_instance_uid,
        task.key,
        pm.SOPInstanceUID,
        int(pm.NumberOfFrames),
    )
    return pm


def _header(pm: Dataset) -> Dataset:
    """What the SR needs of a written map: its identity, not its pixels."""
    header = Dataset()
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID"):
        setattr(header, keyword, pm[keyword].value)
    return header


def write_pmaps(
    result: StudyResult,
    source_datasets: Sequence[Dataset],
    folder: str | Path,
    *,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    equipment: Equipment | None = None,
) -> list[WrittenMap]:
    """Build and save the map of each planned finding (:func:`plan_maps`, within ``max_bytes``) as
    ``<folder>/PM_<SOPInstanceUID>.dcm``, one at a time; [] when no finding gets one."""
    written = []
    for task in _fit_budget(plan_maps(result), max_bytes):
        pm = build_pmap(result, task, source_datasets, equipment=equipment)
        written.append(WrittenMap(task.key, save(pm, folder, "PM"), _header(pm)))
        del pm  # one map in memory at a time
    return written
