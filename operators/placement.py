"""Where the frames of a derived multi-frame object (the SEG, the Parametric Maps) meet the source CT.

Both writers hand highdicom a pixel array in the slice order of the attention maps
(``StudyResult.sop_instance_uids``, with ``frame_numbers`` for multi-frame sources) and must tell it
which source image each plane derives from. Single-frame series and one multi-frame instance are
referenced plane by plane; several multi-frame instances are a case highdicom does not model (it
takes one multi-frame source image), so planes are placed by position there. One module, so that the
SEG and the maps of a study always land on the same voxels.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from operators.multiframe import frame_headers
from operators.results import StudyResult

__all__ = ["Placement", "placement", "shared_geometry"]

#: What highdicom reads from a multi-frame source's Shared Functional Groups only.
_SHARED_BY_HIGHDICOM = ("PlaneOrientationSequence", "PixelMeasuresSequence")


@dataclass(frozen=True, eq=False)
class Placement:
    """How a derived object's planes meet the source: which slices become planes, in what order, and
    what highdicom is told about the source images."""

    slices: np.ndarray  # slice indices (StudyResult order) of the planes, in plane order
    source_images: list[Dataset]
    further_source_images: list[Dataset] | None = None
    plane_positions: list[hd.PlanePositionSequence] | None = None


def placement(result: StudyResult, sources: list[Dataset], keep: np.ndarray) -> Placement:
    """The planes for the slices ``keep`` (StudyResult order) of ``result``'s source ``sources``
    (``results.source_headers``).

    Single-frame series: one source image per plane (highdicom references each). One multi-frame
    instance: every frame in frame order (highdicom references each plane's frame by
    ReferencedFrameNumber and, for a SEG, drops the empty ones itself). Several multi-frame instances:
    highdicom takes one multi-frame source only, so the others join as further source images
    (referenced in the series) and planes are placed by their positions, without per-frame
    derivation references.
    """
    if result.frame_numbers is None:
        return Placement(keep, [sources[i] for i in keep])
    sources = [shared_geometry(ds) for ds in sources]
    if len(sources) == 1:
        return Placement(np.argsort(result.frame_numbers, kind="stable"), sources)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    frames = {uid: frame_headers(ds, f"source SOP {uid}") for uid, ds in by_uid.items()}
    positions = [
        hd.PlanePositionSequence(
            hd.CoordinateSystemNames.PATIENT,
            frames[result.sop_instance_uids[k]][result.frame_numbers[k] - 1].ImagePositionPatient,
        )
        for k in keep
    ]
    return Placement(keep, sources[:1], sources[1:], positions)


def shared_geometry(header: Dataset) -> Dataset:
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
