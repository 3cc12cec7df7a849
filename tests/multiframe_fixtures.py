"""Test helpers (no tests here): multi-frame CT objects built from single-frame series.

Legacy Converted Enhanced CT comes from highdicom's converter, as a PACS migration would make it. A
true Enhanced CT is made from that with pydicom: Enhanced CT SOP class, ImageType Value 3 VOLUME, no
converter leftovers, and optionally the frames shuffled and a per-frame rescale, which the converter
never writes but scanners may.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import EnhancedCTImageStorage, generate_uid

_LEGACY_ONLY = (
    "UnassignedPerFrameConvertedAttributesSequence",
    "UnassignedSharedConvertedAttributesSequence",
    "ConversionSourceAttributesSequence",
)


def _position(ds: Dataset) -> float:
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    return float(np.array([float(v) for v in ds.ImagePositionPatient]) @ np.cross(iop[:3], iop[3:]))


def legacy_converted(
    datasets: Sequence[Dataset], *, instances: int = 1, series_uid: str | None = None
) -> list[Dataset]:
    """The series as ``instances`` Legacy Converted Enhanced CT objects of one new series (the slices
    split into consecutive runs along the normal)."""
    ordered = sorted(datasets, key=_position)
    series_uid = series_uid or generate_uid()
    chunks = np.array_split(np.arange(len(ordered)), instances)
    return [
        hd.legacy.LegacyConvertedEnhancedCTImage(
            [ordered[i] for i in chunk],
            series_instance_uid=series_uid,
            series_number=int(ordered[0].get("SeriesNumber", 1) or 1),
            sop_instance_uid=generate_uid(),
            instance_number=n + 1,
        )
        for n, chunk in enumerate(chunks)
    ]


def enhanced_ct(
    legacy: Dataset, *, frame_order: Sequence[int] | None = None, per_frame_rescale: bool = False
) -> Dataset:
    """A true Enhanced CT from a Legacy Converted one: same frames and geometry (frame n of the result is
    frame ``frame_order[n - 1]`` of ``legacy``); with ``per_frame_rescale`` each frame gets its own
    RescaleIntercept (-1024 - n % 3) and stored values to match, so HU are unchanged."""
    ds = copy.deepcopy(legacy)
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    shared = ds.SharedFunctionalGroupsSequence[0]
    shared.CTImageFrameTypeSequence[0].FrameType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    acquisition = Dataset()
    acquisition.GantryDetectorTilt = "0"
    shared.CTAcquisitionDetailsSequence = [acquisition]
    for item in (ds, shared, *ds.PerFrameFunctionalGroupsSequence):
        for keyword in _LEGACY_ONLY:
            if keyword in item:
                delattr(item, keyword)
    n = int(ds.NumberOfFrames)
    rows, cols = int(ds.Rows), int(ds.Columns)
    dtype = np.int16 if int(ds.PixelRepresentation) else np.uint16
    frames = np.frombuffer(ds.PixelData, dtype=dtype).reshape(n, rows, cols)
    order = list(frame_order) if frame_order is not None else list(range(n))
    per_frame = [ds.PerFrameFunctionalGroupsSequence[i] for i in order]
    frames = frames[order].copy()
    if per_frame_rescale:
        slope = float(shared.PixelValueTransformationSequence[0].RescaleSlope)
        base = float(shared.PixelValueTransformationSequence[0].RescaleIntercept)
        template = shared.PixelValueTransformationSequence[0]
        del shared.PixelValueTransformationSequence
        for k, item in enumerate(per_frame):
            shift = k % 3
            rescale = copy.deepcopy(template)
            rescale.RescaleIntercept = f"{base - shift:g}"
            item.PixelValueTransformationSequence = [rescale]
            frames[k] += round(shift / slope)
    for k, item in enumerate(per_frame):
        item.FrameContentSequence[0].InStackPositionNumber = k + 1
        item.FrameContentSequence[0].DimensionIndexValues = k + 1
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = frames.tobytes()
    return ds


def replace_series_with_multiframe(folder: Path, *, kind: str = "legacy", instances: int = 1) -> list[Path]:
    """Replace the single-frame files of a series folder by its multi-frame equivalent ("legacy":
    Legacy Converted Enhanced CT, "enhanced": Enhanced CT with its frames from head to feet)."""
    import pydicom

    files = sorted(folder.glob("*.dcm"))
    converted = legacy_converted([pydicom.dcmread(f) for f in files], instances=instances)
    if kind == "enhanced":
        converted = [enhanced_ct(ds, frame_order=range(int(ds.NumberOfFrames))[::-1]) for ds in converted]
    for f in files:
        f.unlink()
    paths = []
    for n, ds in enumerate(converted):
        path = folder / f"MF{n:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
