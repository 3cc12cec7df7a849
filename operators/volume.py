"""A CT volume in Hounsfield units with its exact patient geometry, and the readers that make one.

Everything downstream (preprocessing, the SEG writer putting maps back on the source) needs one
unambiguous statement of where each voxel is in the patient, so this module fixes it:

* ``Volume.hu`` is indexed ``[k, j, i]`` = (slice, row, column), like a stack of DICOM frames.
* ``Volume.affine`` maps the homogeneous *index* ``(i, j, k, 1)`` (column, row, slice: the DICOM /
  ITK order, note the reversal against the array order) to DICOM patient **LPS** millimetres
  (+x toward the patient's Left, +y Posterior, +z Superior/head).

The DICOM reader refuses, with a typed error naming the problem, every series whose geometry cannot be
described by one such affine (gantry tilt, missing or duplicated slices, mixed orientations, ...):
resampling silently across those would put findings in the wrong place. numpy + pydicom only;
nibabel is imported lazily for NIfTI (a training-only dependency).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array

from operators.dicom_values import MalformedAttributeError, integer, number, numbers
from operators.settings import Settings

logger = logging.getLogger(__name__)

__all__ = [
    "DuplicateSliceError",
    "EmptySeriesError",
    "GantryTiltError",
    "InconsistentGeometryError",
    "InconsistentOrientationError",
    "InvalidMultiFrameError",
    "IrregularSpacingError",
    "MalformedValueError",
    "MissingTagError",
    "MixedSeriesError",
    "MultiFrameNotSupportedError",
    "ObliqueVolumeError",
    "UnsupportedImageError",
    "Volume",
    "VolumeError",
    "load_dicom_series",
    "load_nifti",
]


# --------------------------------------------------------------------------------------------------
# Errors: one base class so callers (series selection, the loader operator) can catch "this series
# cannot be made into a volume" and record why, while tests and logs see the precise reason.
# --------------------------------------------------------------------------------------------------


class VolumeError(ValueError):
    """A series or file cannot be turned into a geometrically exact :class:`Volume`."""


class EmptySeriesError(VolumeError):
    """No images were given."""


class MissingTagError(VolumeError):
    """Required attributes are absent; ``tags`` lists their keywords."""

    def __init__(self, message: str, tags: Sequence[str]) -> None:
        super().__init__(message)
        self.tags = tuple(tags)


class UnsupportedImageError(VolumeError):
    """The object is not a single-frame greyscale image this reader handles."""


class MalformedValueError(VolumeError):
    """A numeric attribute holds a value that is not a number (``operators.dicom_values``)."""


class MultiFrameNotSupportedError(UnsupportedImageError):
    """A multi-frame object other than Enhanced CT or Legacy Converted Enhanced CT (e.g. Enhanced MR)."""


class InvalidMultiFrameError(VolumeError):
    """A multi-frame object whose frames cannot be told apart (NumberOfFrames malformed, or not the
    number of per-frame functional groups)."""


class MixedSeriesError(VolumeError):
    """Instances from more than one series or frame of reference were mixed."""


class InconsistentGeometryError(VolumeError):
    """Rows/Columns, PixelSpacing or in-plane slice positions differ between slices."""


class InconsistentOrientationError(VolumeError):
    """Slices do not share one ImageOrientationPatient."""


class GantryTiltError(VolumeError):
    """Slice positions do not progress along the slice normal (tilted gantry acquisition)."""


class IrregularSpacingError(VolumeError):
    """Slice steps are not constant: missing slices or mixed spacings."""


class DuplicateSliceError(VolumeError):
    """Two different instances occupy the same slice position."""


class ObliqueVolumeError(VolumeError):
    """The volume axes are too far from the patient axes to reorient by axis permutation."""


# --------------------------------------------------------------------------------------------------
# Volume
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Volume:
    """HU voxels ``[k, j, i]`` plus the affine from index ``(i, j, k, 1)`` to LPS mm.

    The source identity fields let later writers (SEG, SR) reference exactly the images a result was
    computed from; they are ``None`` for NIfTI input. ``sop_instance_uids`` names the instance of each
    slice k; for multi-frame CT, ``frame_numbers`` names its frame (1-based) in that instance, and is
    ``None`` for single-frame series.
    """

    hu: np.ndarray
    affine: np.ndarray
    sop_instance_uids: tuple[str, ...] | None = None
    series_instance_uid: str | None = None
    frame_of_reference_uid: str | None = None
    study_instance_uid: str | None = None
    frame_numbers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.hu.ndim != 3 or min(self.hu.shape) < 1:
            raise VolumeError(f"hu must be a non-empty 3-D array [k, j, i], got shape {self.hu.shape}")
        if self.hu.dtype not in (np.float32, np.int16):
            raise VolumeError(f"hu must be float32 or int16, got {self.hu.dtype}")
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise VolumeError("affine must be a finite 4x4 matrix")
        if not np.allclose(affine[3], [0.0, 0.0, 0.0, 1.0]):
            raise VolumeError(f"affine last row must be [0, 0, 0, 1], got {affine[3].tolist()}")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise VolumeError("affine is singular")
        object.__setattr__(self, "affine", affine)
        if self.sop_instance_uids is not None and len(self.sop_instance_uids) != self.hu.shape[0]:
            raise VolumeError(
                f"{len(self.sop_instance_uids)} SOP Instance UIDs for {self.hu.shape[0]} slices"
            )
        if self.frame_numbers is not None and (
            self.sop_instance_uids is None or len(self.frame_numbers) != self.hu.shape[0]
        ):
            raise VolumeError(
                f"{len(self.frame_numbers)} frame numbers for {self.hu.shape[0]} slices "
                "(and each needs a SOP Instance UID)"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(k, j, i)`` = (slices, rows, columns)."""
        k, j, i = self.hu.shape
        return (k, j, i)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along ``(i, j, k)`` (column step, row step, slice step): affine order."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the unit LPS directions of increasing i, j and k."""
        return self.affine[:3, :3] / self.spacing

    def index_to_lps(self, ijk: Any) -> np.ndarray:
        """Map (continuous) indices ``[..., 3]`` in ``(i, j, k)`` order to LPS mm ``[..., 3]``."""
        p = np.asarray(ijk, dtype=np.float64)
        return p @ self.affine[:3, :3].T + self.affine[:3, 3]

    def lps_to_index(self, lps: Any) -> np.ndarray:
        """Map LPS mm ``[..., 3]`` to continuous indices ``[..., 3]`` in ``(i, j, k)`` order."""
        p = np.asarray(lps, dtype=np.float64)
        return (p - self.affine[:3, 3]) @ np.linalg.inv(self.affine[:3, :3]).T


# --------------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------------

_REQUIRED = (
    "SOPInstanceUID",
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "RescaleSlope",
    "RescaleIntercept",
)


@dataclass(frozen=True)
class _SliceHeader:
    index: int  # position in the caller's input
    ds: Dataset | None  # the dataset when given in memory (or already read), else None
    path: str | None
    sop_uid: str
    series_uid: str | None
    study_uid: str | None
    for_uid: str | None
    rows: int
    cols: int
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    iop: np.ndarray  # 6
    ipp: np.ndarray  # 3
    slope: float
    intercept: float
    gantry_tilt: float | None
    frame: int | None = None  # 1-based frame of a multi-frame instance; None for a single-frame one

    @property
    def where(self) -> str:
        """The file (or dataset) and frame, for messages."""
        return _describe(self.path, self.index) + (f" frame {self.frame}" if self.frame is not None else "")

    @property
    def label(self) -> str:
        """The SOP instance (and frame), for messages."""
        return f"SOP {self.sop_uid}" + (f" frame {self.frame}" if self.frame is not None else "")


def _is_empty(value: object) -> bool:
    if value is None or isinstance(value, str):
        return not value
    try:
        return len(value) == 0  # type: ignore[arg-type]
    except TypeError:
        return False


def _describe(source: str | None, index: int) -> str:
    return source if source is not None else f"dataset #{index}"


def _read_headers(index: int, item: str | os.PathLike[str] | Dataset) -> list[_SliceHeader]:
    """One header per slice: one for a single-frame instance, one per frame of a multi-frame CT."""
    from operators.multiframe import frame_headers, is_multiframe  # it builds on this module's errors

    if isinstance(item, Dataset):
        ds = item
        name = getattr(ds, "filename", None)  # a dataset read from a file is named by it in messages
        path = os.fspath(name) if isinstance(name, str | os.PathLike) else None
    else:
        path = os.fspath(item)
        ds = pydicom.dcmread(path)  # once, with pixels: reading the header and the pixels apart costs 2x
    where = _describe(path, index)
    if not is_multiframe(ds):
        return [_read_header(index, ds, path, where)]
    return [
        replace(_read_header(index, frame, path, f"{where} frame {n}"), ds=ds, frame=n)
        for n, frame in enumerate(frame_headers(ds, where), start=1)
    ]


def _read_header(index: int, ds: Dataset, path: str | None, where: str) -> _SliceHeader:
    missing = [kw for kw in _REQUIRED if _is_empty(ds.get(kw))]
    if missing:
        raise MissingTagError(f"{where}: missing required attribute(s) {', '.join(missing)}", missing)
    try:
        samples = integer(ds, "SamplesPerPixel", where, 1)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
        if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise UnsupportedImageError(
                f"{where}: not a greyscale image (SamplesPerPixel {samples}, PhotometricInterpretation {photometric})"
            )
        iop = np.array(numbers(ds, "ImageOrientationPatient", where, 6), dtype=np.float64)
        ipp = np.array(numbers(ds, "ImagePositionPatient", where, 3), dtype=np.float64)
        ps = numbers(ds, "PixelSpacing", where, 2) or ()
        rows, cols = integer(ds, "Rows", where), integer(ds, "Columns", where)
        slope, intercept = number(ds, "RescaleSlope", where), number(ds, "RescaleIntercept", where)
        tilt = number(ds, "GantryDetectorTilt", where)
    except MalformedAttributeError as exc:
        raise MalformedValueError(str(exc)) from None
    if min(ps) <= 0 or not rows or not cols or rows < 1 or cols < 1:
        raise InconsistentGeometryError(
            f"{where}: PixelSpacing {list(ps)} and Rows x Columns {rows} x {cols} must be positive"
        )
    row, col = iop[:3], iop[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise InconsistentOrientationError(
            f"{where}: ImageOrientationPatient {iop.tolist()} is not two orthogonal unit vectors"
        )
    return _SliceHeader(
        index=index,
        ds=ds,
        path=path,
        sop_uid=str(ds.SOPInstanceUID),
        series_uid=str(ds.SeriesInstanceUID) if ds.get("SeriesInstanceUID") else None,
        study_uid=str(ds.StudyInstanceUID) if ds.get("StudyInstanceUID") else None,
        for_uid=str(ds.FrameOfReferenceUID) if ds.get("FrameOfReferenceUID") else None,
        rows=int(rows),
        cols=int(cols),
        pixel_spacing=(ps[0], ps[1]),
        iop=iop,
        ipp=ipp,
        slope=float(slope),  # type: ignore[arg-type]  # required above
        intercept=float(intercept),  # type: ignore[arg-type]
        gantry_tilt=tilt,
    )


def _dataset(h: _SliceHeader, stop_before_pixels: bool = False) -> Dataset:
    if h.ds is not None:
        return h.ds
    assert h.path is not None
    return pydicom.dcmread(h.path, stop_before_pixels=stop_before_pixels)


_NATIVE_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
_NATIVE_DTYPES = {(16, 0): "<u2", (16, 1): "<i2", (8, 0): "u1", (8, 1): "i1"}


def _pixels(ds: Dataset, frame: int | None, where: str) -> np.ndarray:
    """Stored pixel values of one slice (``frame``, 1-based, of a multi-frame instance); a zero-copy
    view for native little-endian data.

    ``pixel_array`` handles every codec but costs several ms per slice in checks; uncompressed CT
    (most of what a PACS sends) is just the bytes. Values must equal what pydicom returns: when
    BitsStored < BitsAllocated we fall back unless the high bits are clear (unsigned). A compressed
    multi-frame instance is decoded one frame at a time, never whole.
    """
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    try:
        key = (integer(ds, "BitsAllocated", where, 0), integer(ds, "PixelRepresentation", where, 0))
        samples, stored_bits = integer(ds, "SamplesPerPixel", where, 1), integer(ds, "BitsStored", where)
    except MalformedAttributeError as exc:
        raise MalformedValueError(str(exc)) from None
    if syntax in _NATIVE_LE and key in _NATIVE_DTYPES and samples == 1:
        rows, cols = int(ds.Rows), int(ds.Columns)
        data = ds.PixelData
        count = rows * cols
        offset = (frame - 1 if frame else 0) * count * key[0] // 8
        if len(data) >= offset + count * key[0] // 8:
            arr = np.frombuffer(data, dtype=_NATIVE_DTYPES[key], count=count, offset=offset)
            arr = arr.reshape(rows, cols)
            stored = stored_bits or key[0]
            if stored == key[0] or (key[1] == 0 and int(arr.max()) < (1 << stored)):
                return arr
    try:
        return ds.pixel_array if frame is None else pixel_array(ds, index=frame - 1)
    except (ValueError, TypeError, RuntimeError, NotImplementedError, AttributeError, KeyError) as exc:
        raise UnsupportedImageError(f"{where}: pixel data cannot be decoded ({exc})") from None


def _check_same(headers: Sequence[_SliceHeader], attr: str, label: str, error: type[VolumeError]) -> None:
    values = {getattr(h, attr) for h in headers}
    if len(values) > 1:
        counts = {v: sum(getattr(h, attr) == v for h in headers) for v in values}
        listing = "; ".join(f"{v!s} ({n} slices)" for v, n in sorted(counts.items(), key=lambda t: -t[1]))
        raise error(f"mixed {label} in one series: {listing}")


def _dedupe(headers: list[_SliceHeader]) -> list[_SliceHeader]:
    """Drop exact re-sends of one SOP instance (same UID, same position), which a PACS may do."""
    seen: dict[tuple[str, int | None], _SliceHeader] = {}
    resent: set[str] = set()
    out = []
    for h in headers:
        prior = seen.get((h.sop_uid, h.frame))
        if prior is None:
            seen[(h.sop_uid, h.frame)] = h
            out.append(h)
        elif np.allclose(prior.ipp, h.ipp, atol=1e-4):
            if h.sop_uid not in resent:
                logger.warning("SOP Instance %s given twice; using it once", h.sop_uid)
                resent.add(h.sop_uid)
        else:
            raise DuplicateSliceError(
                f"{h.label} appears at two positions {prior.ipp.tolist()} and {h.ipp.tolist()}"
            )
    return out


def load_dicom_series(
    items: Iterable[str | os.PathLike[str] | Dataset],
    *,
    orientation_tolerance: float = 1e-3,
    spacing_tolerance: float = 0.1,
    max_drift_px: float = 0.5,
) -> Volume:
    """Read one DICOM series (file paths or pydicom datasets) into a :class:`Volume`.

    Slices are ordered by the projection of ImagePositionPatient on the slice normal (row cosine x
    column cosine), never by InstanceNumber, so the k axis always points along the normal. HU are
    ``stored * RescaleSlope + RescaleIntercept`` per slice, in float32 (exact for CT integers). The
    series is single-frame instances, or Enhanced / Legacy Converted Enhanced CT instances whose
    frames count as slices (``operators.multiframe`` lifts each frame's functional groups), never
    both.

    Args:
        items: paths or datasets of one series, in any order.
        orientation_tolerance: largest allowed difference of any ImageOrientationPatient component.
        spacing_tolerance: largest allowed deviation of any slice step from the median step,
            relative to it (0.1 tolerates rounded positions, never a missing slice).
        max_drift_px: largest in-plane displacement of slice positions off the normal line, in
            pixels, before the series counts as gantry-tilted (or its positions as inconsistent).

    Raises:
        VolumeError: a subclass naming what is wrong (see the module's error classes).
    """
    headers = [h for n, item in enumerate(items) for h in _read_headers(n, item)]
    if not headers:
        raise EmptySeriesError("no DICOM instances given")
    multiframe = {h.frame is not None for h in headers}
    if len(multiframe) > 1:
        single = next(h for h in headers if h.frame is None)
        multi = next(h for h in headers if h.frame is not None)
        raise MixedSeriesError(
            f"single-frame ({single.where}) and multi-frame ({multi.where}) instances in one series: "
            "which of them is the volume is ambiguous"
        )
    headers = _dedupe(headers)
    _check_same(headers, "series_uid", "SeriesInstanceUID", MixedSeriesError)
    _check_same(headers, "for_uid", "FrameOfReferenceUID", MixedSeriesError)
    shapes = {(h.rows, h.cols) for h in headers}
    if len(shapes) > 1:
        listing = ", ".join(f"{r}x{c}" for r, c in sorted(shapes))
        raise InconsistentGeometryError(f"mixed Rows x Columns in one series: {listing}")
    spacings = np.array([h.pixel_spacing for h in headers])
    if np.ptp(spacings, axis=0).max() > 1e-4 * spacings.max():
        odd = headers[int(np.argmax(np.abs(spacings - spacings[0]).max(axis=1)))]
        raise InconsistentGeometryError(
            f"mixed PixelSpacing in one series: {sorted({tuple(s) for s in spacings.tolist()})} "
            f"({headers[0].where}: {list(headers[0].pixel_spacing)}, {odd.where}: {list(odd.pixel_spacing)})"
        )
    iops = np.stack([h.iop for h in headers])
    deviation = np.abs(iops - iops[0]).max(axis=1)
    if deviation.max() > orientation_tolerance:
        bad = headers[int(np.argmax(deviation))]
        raise InconsistentOrientationError(
            f"mixed ImageOrientationPatient in one series: {headers[0].iop.round(4).tolist()} "
            f"({headers[0].where}) vs {bad.iop.round(4).tolist()} ({bad.where})"
        )

    iop = iops.mean(axis=0)
    row_dir = iop[:3] / np.linalg.norm(iop[:3])  # direction of increasing column index i
    col_dir = iop[3:] - (iop[3:] @ row_dir) * row_dir
    col_dir /= np.linalg.norm(col_dir)  # direction of increasing row index j
    normal = np.cross(row_dir, col_dir)
    dist = np.array([h.ipp @ normal for h in headers])
    order = np.argsort(dist, kind="stable")
    headers = [headers[n] for n in order]
    dist = dist[order]
    ipps = np.stack([h.ipp for h in headers])
    n = len(headers)
    pixel = float(spacings[0].min())

    if n > 1:
        steps = np.diff(dist)
        dup = np.flatnonzero(steps < 0.01)  # mm; real slice steps are >= 0.1 mm
        if dup.size:
            a, b = headers[dup[0]], headers[dup[0] + 1]
            raise DuplicateSliceError(
                f"{dup.size} duplicate slice position(s); first at {dist[dup[0]]:.3f} mm along the normal: "
                f"{a.label} and {b.label}"
            )
        along = dist[-1] - dist[0]
        drift = ipps[-1] - ipps[0] - along * normal
        drift_mm = float(np.linalg.norm(drift))
        if drift_mm > max_drift_px * pixel:
            angle = math.degrees(math.atan2(drift_mm, along))
            tag = (
                ""
                if headers[0].gantry_tilt is None
                else f" (GantryDetectorTilt {headers[0].gantry_tilt:g} deg)"
            )
            raise GantryTiltError(
                f"gantry tilt: slice positions progress {angle:.2f} deg off the slice normal "
                f"({drift_mm:.2f} mm in-plane drift over {along:.1f} mm){tag}; tilted series need "
                "a shear correction that is not supported"
            )
        frac = (dist - dist[0]) / along
        off_line = ipps - ipps[0] - frac[:, None] * (ipps[-1] - ipps[0])
        wobble = np.linalg.norm(off_line, axis=1)
        if wobble.max() > max_drift_px * pixel:
            worst = int(np.argmax(wobble))
            raise InconsistentGeometryError(
                f"slice positions are not collinear: slice {worst} ({headers[worst].label}) is "
                f"{wobble[worst]:.2f} mm off the line through the first and last positions"
            )
        median = float(np.median(steps))
        irregular = np.flatnonzero(np.abs(steps - median) > spacing_tolerance * median)
        if irregular.size:
            parts = []
            for g in irregular[:3]:
                gap = steps[g]
                missing = round(gap / median) - 1
                what = f"about {missing} slice(s) missing" if missing >= 1 else "uneven step"
                parts.append(
                    f"gap of {gap:.2f} mm between sorted slices {g} and {g + 1} "
                    f"(at {dist[g]:.2f} and {dist[g + 1]:.2f} mm along the normal; {what})"
                )
            more = f" and {irregular.size - 3} more" if irregular.size > 3 else ""
            raise IrregularSpacingError(
                f"irregular slice spacing (the series steps {median:.2f} mm): " + "; ".join(parts) + more
            )
        step = along / (n - 1)
    else:
        ds0 = _dataset(headers[0], stop_before_pixels=True)
        where = _describe(headers[0].path, headers[0].index)
        try:
            step = number(ds0, "SpacingBetweenSlices", where) or number(ds0, "SliceThickness", where) or 1.0
        except MalformedAttributeError as exc:
            raise MalformedValueError(str(exc)) from None
        logger.warning("single-slice series: slice step %.3f mm taken from the header", step)

    rows, cols = headers[0].rows, headers[0].cols
    hu = np.empty((n, rows, cols), dtype=np.float32)
    for k, h in enumerate(headers):
        ds = _dataset(h)
        if "PixelData" not in ds:
            raise MissingTagError(f"{h.where}: missing required attribute(s) PixelData", ["PixelData"])
        pixels = _pixels(ds, h.frame, h.where)
        if pixels.shape != (rows, cols):
            raise InconsistentGeometryError(
                f"{h.where}: pixel data shape {pixels.shape} != Rows x Columns {(rows, cols)}"
            )
        out = hu[k]
        np.multiply(pixels, np.float32(h.slope), out=out, casting="unsafe")
        out += np.float32(h.intercept)
        if str(ds.get("PhotometricInterpretation", "MONOCHROME2")) == "MONOCHROME1":
            logger.warning("%s: MONOCHROME1 CT; HU taken from the rescale as is", h.where)

    affine = np.eye(4)
    ps_row, ps_col = spacings.mean(axis=0)  # PixelSpacing = (between rows, between columns)
    affine[:3, 0] = row_dir * ps_col
    affine[:3, 1] = col_dir * ps_row
    affine[:3, 2] = normal * step
    affine[:3, 3] = ipps[0]
    logger.debug("loaded %d slices %dx%d, step %.4f mm", n, rows, cols, step)
    return Volume(
        hu=hu,
        affine=affine,
        sop_instance_uids=tuple(h.sop_uid for h in headers),
        series_instance_uid=headers[0].series_uid,
        frame_of_reference_uid=headers[0].for_uid,
        study_instance_uid=headers[0].study_uid,
        frame_numbers=tuple(h.frame for h in headers if h.frame is not None) or None,
    )


# --------------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------------

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def load_nifti(
    path: str | os.PathLike[str], *, slope: float | None = None, intercept: float | None = None
) -> Volume:
    """Read a 3-D NIfTI CT (e.g. CT-RATE) into a :class:`Volume` in LPS.

    NIfTI affines map ``(i, j, k)`` to RAS, so the first two rows are negated. The data array
    ``[i, j, k]`` becomes ``hu[k, j, i]``. Pass ``slope``/``intercept`` (CT-RATE keeps them in a
    metadata CSV) to rescale the raw stored values; giving them while the header also scales is
    refused as ambiguous.
    """
    try:
        import nibabel as nib  # training extra only
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("load_nifti needs nibabel (pip install 'hyperct-node[train]')") from exc

    img: Any = nib.load(os.fspath(path))
    shape = img.shape
    if len(shape) > 3 and all(s == 1 for s in shape[3:]):
        shape = shape[:3]
    if len(shape) != 3:
        raise UnsupportedImageError(f"{os.fspath(path)}: expected a 3-D image, got shape {img.shape}")
    if slope is None and intercept is None:
        data = np.asarray(img.dataobj, dtype=np.float32)
    else:
        # nibabel moves the header's scl_slope/scl_inter onto the array proxy when loading
        hdr_slope = float(getattr(img.dataobj, "slope", 1.0))
        hdr_inter = float(getattr(img.dataobj, "inter", 0.0))
        if hdr_slope != 1.0 or hdr_inter != 0.0:
            raise VolumeError(
                f"{os.fspath(path)}: header already scales (scl_slope={hdr_slope}, scl_inter={hdr_inter}); "
                "explicit slope/intercept would apply twice"
            )
        raw = np.asarray(img.dataobj.get_unscaled())
        data = raw.astype(np.float32) * np.float32(1.0 if slope is None else slope)
        data += np.float32(0.0 if intercept is None else intercept)
    data = data.reshape(shape)
    hu = np.ascontiguousarray(data.transpose(2, 1, 0))
    affine = _RAS_TO_LPS @ np.asarray(img.affine, dtype=np.float64)
    return Volume(hu=hu, affine=affine)


class VolumeChecks(Settings):
    """Sanity checks on a loaded CT volume (``app.yaml`` section ``volume-checks``)."""

    section: ClassVar[str] = "volume-checks"

    min_z_extent_mm: float = 120.0
    lung_hu_range: tuple[float, float] = (-950.0, -600.0)
    min_lung_fraction: float = 0.01


def check_volume(volume: Volume, checks: VolumeChecks) -> str | None:
    """The reason a volume cannot be a chest CT for HyperCT, or None when it can."""
    n = volume.shape[0]
    z_extent = float(np.linalg.norm(volume.affine[:3, 2])) * max(n - 1, 0)
    if z_extent < checks.min_z_extent_mm:
        return (
            f"the series covers {z_extent:.0f} mm along the body, less than {checks.min_z_extent_mm:.0f} mm"
        )
    middle = volume.hu[n // 4 : max(n // 4 + 1, 3 * n // 4)]
    lo, hi = checks.lung_hu_range
    fraction = float(np.count_nonzero((middle >= lo) & (middle <= hi))) / middle.size
    if fraction < checks.min_lung_fraction:
        return (
            f"no lungs found: {fraction:.1%} of the central slices lie in {lo:g}..{hi:g} HU "
            f"(need {checks.min_lung_fraction:.0%}); not a chest CT or wrong rescale"
        )
    return None
