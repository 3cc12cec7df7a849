"""The one preprocessing shared by serving and training: CT :class:`Volume` -> HyperCT model input.

The reference code receives a ready-made 164^3 HU cube whose making is not described (spec O-1), so
this module *defines* the geometry, and ``docs/preprocessing.md`` is its written contract. In short:

1. reorient to LPS axes by axis permutation + flips (no oblique resampling);
2. place a 144 x 144 x 165 window of 2.5 x 2.5 x 2.0 mm voxels centred in-plane on the body (table
   excluded) and along z on the lungs, and sample it by separable linear interpolation, -1000 HU
   outside the scan;
3. clip to [-1000, 1000] HU, drop all-air slices, make the count divisible by 3, group slices into
   RGB triplets (consecutive, or the released code's strided grouping), scale to [0, 1] and apply the
   ImageNet normalisation.

Every parameter lives in :class:`PreprocessingConfig`, which is serialised into the model manifest's
``preprocessing`` section, so a model is always served with the geometry it was trained with. The
result carries a :class:`PatientTransform` that maps every model pixel back to patient LPS mm.
numpy only: no torch, scipy or transformers here.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from operators.geometry import (
    CanonicalView,
    binary_open,
    canonical_view,
    fill_holes,
    largest_component,
    orthogonal_fill,
    resample_separable,
)
from operators.volume import Volume

logger = logging.getLogger(__name__)

__all__ = [
    "SCHEMA_VERSION",
    "ModelInput",
    "PatientTransform",
    "PixelIndex",
    "PreprocessingConfig",
    "PreprocessingConfigError",
    "batch_pad",
    "denormalize_images",
    "model_map_to_source",
    "normalize_images",
    "preprocess",
    "triplet_indices",
]

SCHEMA_VERSION = 1
TRANSFORM_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Configuration = the manifest's "preprocessing" section
# --------------------------------------------------------------------------------------------------


class PreprocessingConfigError(ValueError):
    """A preprocessing configuration is invalid; ``key`` names the offending entry."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"preprocessing.{key}: {message}")
        self.key = key


_CHOICES: dict[str, tuple[str, ...]] = {
    "orientation": ("LPS",),
    "slice_order": ("inferior_to_superior", "superior_to_inferior"),
    "interpolation": ("linear",),
    "triplets": ("consecutive", "strided"),
    "inplane_centre": ("body", "volume"),
    "z_centre": ("lungs", "volume"),
    "train_flip_axis": ("x", "y"),
}
_TUPLES: dict[str, tuple[type, int]] = {
    "spacing_mm": (float, 3),
    "image_size": (int, 2),
    "hu_window": (float, 2),
    "normalize_mean": (float, 3),
    "normalize_std": (float, 3),
}
_INTS = ("n_slices",)


@dataclass(frozen=True)
class PreprocessingConfig:
    """Every parameter that shapes the model input. Defaults and their reasons: docs/preprocessing.md.

    Axis conventions: ``spacing_mm`` is (x = column, y = row, z = slice); ``image_size`` is (rows,
    columns). Canonical axes: columns run toward patient Left, rows toward Posterior (the usual
    radiological display of an axial slice), slices per ``slice_order``.
    """

    orientation: str = "LPS"
    slice_order: str = "inferior_to_superior"
    spacing_mm: tuple[float, float, float] = (2.5, 2.5, 2.0)
    image_size: tuple[int, int] = (144, 144)
    n_slices: int = 165
    interpolation: str = "linear"
    max_obliquity_deg: float = 5.0
    pad_hu: float = -1000.0
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    empty_slice_tolerance_hu: float = 1.0
    triplets: str = "consecutive"
    normalize_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    normalize_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    inplane_centre: str = "body"
    z_centre: str = "lungs"
    analysis_grid_mm: float = 4.0
    body_threshold_hu: float = -500.0
    body_min_fraction: float = 0.5
    body_opening_mm: float = 10.0
    lung_threshold_hu: float = -500.0
    lung_min_area_fraction: float = 0.05
    lung_min_area_mm2: float = 1000.0
    train_jitter_mm: float = 25.0
    train_flip_p: float = 0.5
    train_flip_axis: str = "x"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name)))
        self._check_ranges()

    def _check_ranges(self) -> None:
        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise PreprocessingConfigError(key, msg)

        need(all(s > 0 for s in self.spacing_mm), "spacing_mm", "every spacing must be > 0")
        need(all(s >= 1 for s in self.image_size), "image_size", "sizes must be >= 1")
        need(self.n_slices >= 3, "n_slices", "must be >= 3")
        need(0 <= self.max_obliquity_deg < 45, "max_obliquity_deg", "must be in [0, 45)")
        need(self.hu_window[0] < self.hu_window[1], "hu_window", "low must be below high")
        need(self.empty_slice_tolerance_hu >= 0, "empty_slice_tolerance_hu", "must be >= 0")
        need(all(s > 0 for s in self.normalize_std), "normalize_std", "every std must be > 0")
        need(self.analysis_grid_mm > 0, "analysis_grid_mm", "must be > 0")
        need(0 < self.body_min_fraction <= 1, "body_min_fraction", "must be in (0, 1]")
        need(self.body_opening_mm >= 0, "body_opening_mm", "must be >= 0")
        need(0 < self.lung_min_area_fraction <= 1, "lung_min_area_fraction", "must be in (0, 1]")
        need(self.lung_min_area_mm2 >= 0, "lung_min_area_mm2", "must be >= 0")
        need(self.train_jitter_mm >= 0, "train_jitter_mm", "must be >= 0")
        need(0 <= self.train_flip_p <= 1, "train_flip_p", "must be in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict for the manifest (tuples become lists), with ``schema_version`` first."""
        out: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessingConfig:
        """Strictly parse a manifest section: every key required, no unknown keys, types checked.

        Strict on purpose: a manifest that silently fell back to today's defaults would serve a model
        with a geometry it was not trained on the day the defaults change.
        """
        if not isinstance(data, Mapping):
            raise PreprocessingConfigError("<root>", f"expected a mapping, got {type(data).__name__}")
        if "schema_version" not in data:
            raise PreprocessingConfigError("schema_version", "missing")
        version = data["schema_version"]
        if isinstance(version, bool) or version != SCHEMA_VERSION:
            raise PreprocessingConfigError(
                "schema_version", f"unsupported version {version!r}; this code reads {SCHEMA_VERSION}"
            )
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names) - {"schema_version"})
        if unknown:
            raise PreprocessingConfigError(unknown[0], f"unknown key(s) {', '.join(unknown)}")
        missing = [n for n in names if n not in data]
        if missing:
            raise PreprocessingConfigError(missing[0], f"missing key(s) {', '.join(missing)}")
        return cls(**{n: data[n] for n in names})


def _coerce(key: str, value: Any) -> Any:
    """Check one config value's type and return it in canonical form (tuples, floats)."""
    if key in _CHOICES:
        if not isinstance(value, str) or value not in _CHOICES[key]:
            raise PreprocessingConfigError(key, f"must be one of {', '.join(_CHOICES[key])}; got {value!r}")
        return value
    if key in _TUPLES:
        kind, length = _TUPLES[key]
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != length:
            raise PreprocessingConfigError(key, f"must be a list of {length} numbers; got {value!r}")
        return tuple(_number(key, v, kind) for v in value)
    if key in _INTS:
        return _number(key, value, int)
    return _number(key, value, float)


def _number(key: str, value: Any, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PreprocessingConfigError(key, f"must be a number; got {value!r}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise PreprocessingConfigError(key, f"must be an integer; got {value!r}")
        return int(value)
    if not math.isfinite(value):
        raise PreprocessingConfigError(key, f"must be finite; got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------------
# Transform back to patient space
# --------------------------------------------------------------------------------------------------


class PixelIndex(NamedTuple):
    """Model pixel coordinates: image ``n`` and channel ``c`` (-1 where not shown), row, col."""

    n: np.ndarray
    c: np.ndarray
    row: np.ndarray
    col: np.ndarray


@dataclass(frozen=True, eq=False)
class PatientTransform:
    """Where every model pixel is in the patient.

    The model grid is the resampled canonical stack ``[grid slice, row, col]`` (before empty-slice
    removal); ``grid_affine`` maps ``(col, row, grid slice, 1)`` to LPS mm; ``slice_index[n, c]`` is the
    grid slice shown as channel ``c`` of image ``n`` (this table encodes slice removal, the mod-3 rule
    and the triplet convention).
    """

    grid_affine: np.ndarray
    grid_shape: tuple[int, int, int]
    slice_index: np.ndarray
    frame_of_reference_uid: str | None = None
    series_instance_uid: str | None = None
    _lookup: tuple[np.ndarray, np.ndarray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        affine = np.asarray(self.grid_affine, dtype=np.float64)
        table = np.asarray(self.slice_index, dtype=np.int64)
        if affine.shape != (4, 4) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise ValueError("grid_affine must be an invertible 4x4 matrix")
        if table.ndim != 2 or table.shape[1] != 3:
            raise ValueError(f"slice_index must be [N, 3], got {table.shape}")
        shape = tuple(int(s) for s in self.grid_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"grid_shape must be 3 positive sizes, got {self.grid_shape}")
        if table.size and (table.min() < 0 or table.max() >= shape[0]):
            raise ValueError("slice_index refers to slices outside the grid")
        image = np.full(shape[0], -1, dtype=np.int64)
        channel = np.full(shape[0], -1, dtype=np.int64)
        for n, c in np.ndindex(*table.shape):  # first occurrence wins (the mod-3 duplicate)
            s = table[n, c]
            if image[s] < 0:
                image[s], channel[s] = n, c
        object.__setattr__(self, "grid_affine", affine)
        object.__setattr__(self, "slice_index", table)
        object.__setattr__(self, "grid_shape", shape)
        object.__setattr__(self, "_lookup", (image, channel))

    @property
    def n_images(self) -> int:
        return int(self.slice_index.shape[0])

    @property
    def image_shape(self) -> tuple[int, int]:
        return (self.grid_shape[1], self.grid_shape[2])

    def slice_to_image(self) -> tuple[np.ndarray, np.ndarray]:
        """Per grid slice: the (first) image and channel showing it, -1 for removed slices."""
        image, channel = self._lookup
        return image.copy(), channel.copy()

    def grid_to_lps(self, col: Any, row: Any, grid_slice: Any) -> np.ndarray:
        """Continuous grid coordinates -> LPS mm ``[..., 3]``."""
        idx = np.stack(
            np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (col, row, grid_slice))), -1
        )
        return idx @ self.grid_affine[:3, :3].T + self.grid_affine[:3, 3]

    def lps_to_grid(self, lps: Any) -> np.ndarray:
        """LPS mm ``[..., 3]`` -> continuous grid coordinates ``[..., 3]`` as (col, row, grid slice)."""
        p = np.asarray(lps, dtype=np.float64)
        return (p - self.grid_affine[:3, 3]) @ np.linalg.inv(self.grid_affine[:3, :3]).T

    def pixel_to_lps(self, n: Any, c: Any, row: Any, col: Any) -> np.ndarray:
        """Model pixel (image n, channel c, row, col; row/col may be fractional) -> LPS mm."""
        grid_slice = self.slice_index[np.asarray(n), np.asarray(c)]
        return self.grid_to_lps(col, row, grid_slice)

    def lps_to_pixel(self, lps: Any) -> PixelIndex:
        """LPS mm -> the model pixel showing it: nearest grid slice's image/channel, continuous
        row/col. ``n = c = -1`` where the point is outside the field of view or its slice was removed."""
        g = self.lps_to_grid(lps)
        col, row, z = g[..., 0], g[..., 1], g[..., 2]
        zi = np.rint(z).astype(np.int64)
        h, w = self.image_shape
        inside = (zi >= 0) & (zi < self.grid_shape[0])
        inside &= (row >= -0.5) & (row <= h - 0.5) & (col >= -0.5) & (col <= w - 0.5)
        image, channel = self._lookup
        zc = np.clip(zi, 0, self.grid_shape[0] - 1)
        n = np.where(inside, image[zc], -1)
        c = np.where(inside & (n >= 0), channel[zc], -1)
        return PixelIndex(n=n, c=c, row=row, col=col)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for results.json)."""
        return {
            "version": TRANSFORM_VERSION,
            "coordinate_system": "DICOM patient LPS, mm",
            "grid_affine": self.grid_affine.tolist(),
            "grid_shape": list(self.grid_shape),
            "slice_index": self.slice_index.tolist(),
            "frame_of_reference_uid": self.frame_of_reference_uid,
            "series_instance_uid": self.series_instance_uid,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PatientTransform:
        if data.get("version") != TRANSFORM_VERSION:
            raise ValueError(f"unsupported patient transform version {data.get('version')!r}")
        table = np.asarray(data["slice_index"], dtype=np.int64).reshape(-1, 3)
        return cls(
            grid_affine=np.asarray(data["grid_affine"], dtype=np.float64),
            grid_shape=tuple(data["grid_shape"]),
            slice_index=table,
            frame_of_reference_uid=data.get("frame_of_reference_uid"),
            series_instance_uid=data.get("series_instance_uid"),
        )


@dataclass(frozen=True, eq=False)
class ModelInput:
    """``images`` float32 ``[N, 3, H, W]`` (normalised), ``mask`` bool ``[N]`` (True = real image),
    the transform back to patient space, and JSON-ready facts about how the window was placed."""

    images: np.ndarray
    mask: np.ndarray
    transform: PatientTransform
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return int(self.images.shape[0])


# --------------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------------


def triplet_indices(kept: np.ndarray, mode: str) -> np.ndarray:
    """Group ``3N`` slice indices into ``[N, 3]`` images.

    ``consecutive``: image n = slices (3n, 3n+1, 3n+2) as in the paper. ``strided``: the released
    code's layout (spec section 3.2) for an unpadded sample: the channel-major ``(3, N)`` memory viewed as
    ``(N, 3)``, i.e. flat position f = 3n + c shows slice 3 * (f mod N) + f // N.
    """
    kept = np.asarray(kept, dtype=np.int64)
    if kept.size % 3:
        raise ValueError(f"{kept.size} slices is not a multiple of 3")
    n = kept.size // 3
    if mode == "consecutive":
        return kept.reshape(n, 3)
    if mode == "strided":
        f = np.arange(3 * n)
        return kept[3 * (f % n) + f // n].reshape(n, 3)
    raise ValueError(f"unknown triplet mode {mode!r}")


def _divisible_by_3(kept: np.ndarray) -> np.ndarray:
    """Spec section 3.1 step 6: repeat the last slice up to 3; drop it if count % 3 == 1; duplicate it if 2."""
    if kept.size < 3:
        return np.concatenate([kept, np.repeat(kept[-1:], 3 - kept.size)])
    if kept.size % 3 == 1:
        return kept[:-1]
    if kept.size % 3 == 2:
        return np.concatenate([kept, kept[-1:]])
    return kept


def _window_centre(view: CanonicalView, config: PreprocessingConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Window centre in canonical index units (x, y, z), plus what was found (for results.json).

    Works on a coarse copy (about ``analysis_grid_mm``) of the canonical array: in-plane, the centroid
    of the body, taken as the largest connected region of tissue present in at least
    ``body_min_fraction`` of the slices after an opening that erases the thin patient table; along z,
    the middle of the lungs' extent (air-like voxels inside the body, in the contiguous run of slices
    around the largest lung area).
    """
    arr = view.array
    nz, ny, nx = arr.shape
    stride = [max(1, int(round(config.analysis_grid_mm / s))) for s in view.spacing]  # x, y, z
    coarse = np.asarray(arr[:: stride[2], :: stride[1], :: stride[0]], dtype=np.float32)
    grid_mm = np.asarray(view.spacing) * stride
    centre = np.array([(nx - 1) / 2, (ny - 1) / 2, (nz - 1) / 2])
    info: dict[str, Any] = {"inplane_centre": "volume", "z_centre": "volume"}

    dense = coarse > config.body_threshold_hu
    present = dense.any(axis=(1, 2))
    body = np.zeros(coarse.shape[1:], dtype=bool)
    if present.any():
        frac = dense[present].mean(axis=0)
        b0 = frac >= config.body_min_fraction
        opened = binary_open(b0, config.body_opening_mm / grid_mm[1], config.body_opening_mm / grid_mm[0])
        body = fill_holes(largest_component(opened if opened.any() else b0))
    if body.any():
        ys, xs = np.nonzero(body)
        body_centre = np.array([xs.mean() * stride[0], ys.mean() * stride[1]])
        info["body_centroid_lps"] = _lps(view, [body_centre[0], body_centre[1], centre[2]])[:2]
        info["body_area_mm2"] = float(body.sum() * grid_mm[0] * grid_mm[1])
        if config.inplane_centre == "body":
            centre[:2] = body_centre
            info["inplane_centre"] = "body"
    else:
        info["body_centroid_lps"] = None
        if config.inplane_centre == "body":
            logger.warning(
                "no body found (no tissue above %g HU); centring on the volume", config.body_threshold_hu
            )

    info["lung_extent_lps_z"] = None
    if config.z_centre == "lungs":
        if body.any():
            tissue = dense & body[None]
            inside = orthogonal_fill(tissue) & body[None]
            lung = inside & (coarse < config.lung_threshold_hu)
            area = lung.sum(axis=(1, 2)) * float(grid_mm[0] * grid_mm[1])
            if area.max() >= config.lung_min_area_mm2:
                peak = int(np.argmax(area))
                above = area >= config.lung_min_area_fraction * area[peak]
                lo = peak
                while lo > 0 and above[lo - 1]:
                    lo -= 1
                hi = peak
                while hi < above.size - 1 and above[hi + 1]:
                    hi += 1
                centre[2] = (lo + hi) / 2 * stride[2]
                info["z_centre"] = "lungs"
                z_lo = _lps(view, [centre[0], centre[1], lo * stride[2]])[2]
                z_hi = _lps(view, [centre[0], centre[1], hi * stride[2]])[2]
                info["lung_extent_lps_z"] = sorted([z_lo, z_hi])
        if info["z_centre"] != "lungs":
            if present.any():
                idx = np.flatnonzero(present)
                centre[2] = (idx[0] + idx[-1]) / 2 * stride[2]
                info["z_centre"] = "body"
            logger.warning("no lungs found; centring z on the %s", info["z_centre"])
    return centre, info


def _lps(view: CanonicalView, xyz: Sequence[float] | np.ndarray) -> list[float]:
    p = view.affine @ np.array([*xyz, 1.0])
    return [float(v) for v in p[:3]]


def _channel_stats(config: PreprocessingConfig) -> tuple[np.ndarray, np.ndarray]:
    mean = np.asarray(config.normalize_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(config.normalize_std, dtype=np.float32)[:, None, None]
    return mean, std


def normalize_images(images: np.ndarray, config: PreprocessingConfig) -> np.ndarray:
    """ImageNet normalisation, in place: float32 ``[..., 3, H, W]`` in [0, 1] -> model input; returns it.

    Per channel ``(x - normalize_mean) / normalize_std``. The one place serving and training normalise
    (the exported graph does not normalise again).
    """
    mean, std = _channel_stats(config)
    images -= mean
    images /= std
    return images


def denormalize_images(images: np.ndarray, config: PreprocessingConfig) -> np.ndarray:
    """The inverse of :func:`normalize_images`: model input -> [0, 1] intensities (a new float32 array)."""
    mean, std = _channel_stats(config)
    return (images * std + mean).astype(np.float32, copy=False)


def preprocess(volume: Volume, config: PreprocessingConfig) -> ModelInput:
    """The single entry point: CT volume -> :class:`ModelInput`.

    No augmentation here: training crops and flips a wider window of this output (``training/cache.py``).
    """
    view = canonical_view(volume, config.max_obliquity_deg)
    centre, info = _window_centre(view, config)
    info["obliquity_deg"] = view.obliquity_deg

    h, w = config.image_size
    sizes = np.array([w, h, config.n_slices])  # x, y, z
    step = np.asarray(config.spacing_mm) / view.spacing  # target step in canonical index units
    direction = np.array([1.0, 1.0, 1.0 if config.slice_order == "inferior_to_superior" else -1.0])

    # Grid index u -> canonical index q = centre + d * (u - (size - 1) / 2) * step, per axis.
    to_canon = np.eye(4)
    to_canon[:3, :3] = np.diag(direction * step)
    to_canon[:3, 3] = centre - direction * step * (sizes - 1) / 2
    positions = [to_canon[a, a] * np.arange(sizes[a]) + to_canon[a, 3] for a in (2, 1, 0)]
    info["window_centre_lps"] = _lps(view, centre)

    grid = resample_separable(view.array, positions, fill=config.pad_hu)  # [z, y, x] HU
    lo, hi = config.hu_window
    np.clip(grid, lo, hi, out=grid)
    empty = np.all(grid <= lo + config.empty_slice_tolerance_hu, axis=(1, 2))
    kept = np.flatnonzero(~empty) if not empty.all() else np.arange(grid.shape[0])
    info["empty_slices_removed"] = int(grid.shape[0] - kept.size)
    table = triplet_indices(_divisible_by_3(kept), config.triplets)

    images = grid[table]  # [N, 3, H, W]
    images -= lo
    images *= np.float32(1.0 / (hi - lo))
    np.clip(images, 0.0, 1.0, out=images)
    normalize_images(images, config)

    transform = PatientTransform(
        grid_affine=view.affine @ to_canon,
        grid_shape=(int(sizes[2]), h, w),
        slice_index=table,
        frame_of_reference_uid=volume.frame_of_reference_uid,
        series_instance_uid=volume.series_instance_uid,
    )
    info["n_images"] = int(table.shape[0])
    return ModelInput(
        images=np.ascontiguousarray(images, dtype=np.float32),
        mask=np.ones(table.shape[0], dtype=bool),
        transform=transform,
        info=info,
    )


def batch_pad(items: Sequence[ModelInput]) -> tuple[np.ndarray, np.ndarray]:
    """Stack samples into ``images [B, Nmax, 3, H, W]`` and ``mask [B, Nmax]``, zero-padding along N.

    Padding is appended after each sample's own images, image-major, so ``mask[b, n]`` is True exactly
    for the real images (the reference code's channel-major reshape misaligned the two).
    """
    if not items:
        raise ValueError("batch_pad needs at least one sample")
    shapes = {m.images.shape[1:] for m in items}
    if len(shapes) != 1:
        raise ValueError(f"samples have different image shapes {sorted(shapes)}")
    n_max = max(m.n_images for m in items)
    images = np.zeros((len(items), n_max, *next(iter(shapes))), dtype=np.float32)
    mask = np.zeros((len(items), n_max), dtype=bool)
    for b, m in enumerate(items):
        images[b, : m.n_images] = m.images
        mask[b, : m.n_images] = m.mask
    return images, mask


def model_map_to_source(
    map_nhw: np.ndarray,
    transform: PatientTransform,
    source_volume: Volume,
    *,
    order: str = "linear",
    chunk_slices: int = 8,
) -> np.ndarray:
    """Put a per-image map ``[N, h, w]`` (e.g. a 9 x 9 patch grid or a 144 x 144 saliency map) back on
    ``source_volume``'s voxels, float32 shaped like ``source_volume.hu``.

    Each source voxel is mapped to the model grid; its nearest grid slice selects the image showing
    it (a map for image n covers all three of its slices); in-plane the map is sampled with
    ``order`` ``"nearest"`` or ``"linear"`` (map pixels cover equal parts of the H x W window). Voxels
    outside the model's field of view, or on removed (empty) slices, get 0.
    """
    maps = np.asarray(map_nhw, dtype=np.float32)
    if maps.ndim != 3 or maps.shape[0] != transform.n_images:
        raise ValueError(f"map must be [N={transform.n_images}, h, w], got {maps.shape}")
    if order not in ("nearest", "linear"):
        raise ValueError(f"order must be 'nearest' or 'linear', got {order!r}")
    if (
        transform.frame_of_reference_uid
        and source_volume.frame_of_reference_uid
        and transform.frame_of_reference_uid != source_volume.frame_of_reference_uid
    ):
        raise ValueError("map and source volume are in different frames of reference")
    to_grid = np.linalg.inv(transform.grid_affine) @ source_volume.affine  # (i, j, k) -> (col, row, slice)
    perm = _axis_permutation(to_grid, source_volume.shape)
    if perm is not None:
        return _map_separable(maps, transform, source_volume.shape, to_grid, perm, order)
    logger.debug("source grid not axis-aligned with the model grid; using the general (slower) path")
    return _map_general(maps, transform, source_volume.shape, to_grid, order, chunk_slices)


def _axis_permutation(to_grid: np.ndarray, shape_kji: tuple[int, int, int]) -> list[int] | None:
    """Source index axis feeding each grid axis (col, row, slice) if the two grids are axis-aligned
    (off-axis terms move no voxel by more than 1e-3 grid pixel), else None."""
    m = np.abs(to_grid[:3, :3])
    perm = [int(v) for v in np.argmax(m, axis=1)]
    if len(set(perm)) != 3:
        return None
    extent = np.array([shape_kji[2], shape_kji[1], shape_kji[0]], dtype=np.float64)
    off = m.copy()
    off[np.arange(3), perm] = 0.0
    return perm if float((off @ extent).max()) < 1e-3 else None


def _weights(coords: np.ndarray, grid_size: int, map_size: int, order: str) -> np.ndarray:
    """``[len(coords), map_size]`` matrix sampling a map axis at grid coordinates; zero rows outside."""
    w = np.zeros((coords.size, map_size), dtype=np.float32)
    inside = (coords >= -0.5) & (coords <= grid_size - 0.5)
    rows = np.flatnonzero(inside)
    x = (coords[inside] + 0.5) * (map_size / grid_size) - 0.5
    if order == "nearest":
        w[rows, np.clip(np.floor(x + 0.5), 0, map_size - 1).astype(np.int64)] = 1.0
        return w
    x = np.clip(x, 0.0, map_size - 1.0)
    x0 = np.minimum(np.floor(x).astype(np.int64), max(map_size - 2, 0))
    x1 = np.minimum(x0 + 1, map_size - 1)
    frac = (x - x0).astype(np.float32)
    np.add.at(w, (rows, x0), 1.0 - frac)
    np.add.at(w, (rows, x1), frac)
    return w


def _map_separable(
    maps: np.ndarray,
    transform: PatientTransform,
    shape_kji: tuple[int, int, int],
    to_grid: np.ndarray,
    perm: list[int],
    order: str,
) -> np.ndarray:
    """Axis-aligned case: in-plane by two small matrix products per image, then one gather over z."""
    _, mh, mw = maps.shape
    gz, gh, gw = transform.grid_shape
    n_ijk = (shape_kji[2], shape_kji[1], shape_kji[0])
    m_col, m_row, m_slice = perm
    coords = [to_grid[g, perm[g]] * np.arange(n_ijk[perm[g]]) + to_grid[g, 3] for g in range(3)]
    w_col = _weights(coords[0], gw, mw, order)  # [n along m_col, mw]
    w_row = _weights(coords[1], gh, mh, order)  # [n along m_row, mh]
    up = np.einsum("rh,nhw,cw->nrc", w_row, maps, w_col, optimize=True).astype(np.float32)
    image_of_slice, _ = transform.slice_to_image()
    zi = np.rint(coords[2]).astype(np.int64)
    n_idx = np.where((zi >= 0) & (zi < gz), image_of_slice[np.clip(zi, 0, gz - 1)], -1)
    up = np.concatenate([up, np.zeros((1, *up.shape[1:]), dtype=np.float32)])  # index -1 -> zeros
    stacked = up[n_idx]  # axes: (m_slice, m_row, m_col)
    axes = [m_slice, m_row, m_col]
    return np.ascontiguousarray(stacked.transpose([axes.index(2), axes.index(1), axes.index(0)]))


def _map_general(
    maps: np.ndarray,
    transform: PatientTransform,
    shape_kji: tuple[int, int, int],
    to_grid: np.ndarray,
    order: str,
    chunk_slices: int,
) -> np.ndarray:
    """Any source geometry in the same frame of reference: per chunk of source slices, map every
    voxel to the grid and sample."""
    _, mh, mw = maps.shape
    gz, gh, gw = transform.grid_shape
    image_of_slice, _ = transform.slice_to_image()
    nk, nj, ni = shape_kji
    out = np.zeros((nk, nj, ni), dtype=np.float32)
    ii = np.arange(ni, dtype=np.float64)
    jj = np.arange(nj, dtype=np.float64)[:, None]
    for k0 in range(0, nk, chunk_slices):
        ks = np.arange(k0, min(nk, k0 + chunk_slices), dtype=np.float64)[:, None, None]
        col, row, zs = (
            to_grid[a, 0] * ii + to_grid[a, 1] * jj + to_grid[a, 2] * ks + to_grid[a, 3] for a in range(3)
        )
        zi = np.rint(zs).astype(np.int64)
        valid = (zi >= 0) & (zi < gz) & (row >= -0.5) & (row <= gh - 0.5) & (col >= -0.5) & (col <= gw - 0.5)
        n = np.where(valid, image_of_slice[np.clip(zi, 0, gz - 1)], -1)
        valid &= n >= 0
        if not valid.any():
            continue
        n = np.maximum(n, 0)
        r = (row + 0.5) * (mh / gh) - 0.5  # map pixel coordinates
        c = (col + 0.5) * (mw / gw) - 0.5
        if order == "nearest":
            ri = np.clip(np.floor(r + 0.5), 0, mh - 1).astype(np.int64)
            ci = np.clip(np.floor(c + 0.5), 0, mw - 1).astype(np.int64)
            value = maps[n, ri, ci]
        else:
            r = np.clip(r, 0.0, mh - 1.0)
            c = np.clip(c, 0.0, mw - 1.0)
            r0 = np.minimum(np.floor(r).astype(np.int64), max(mh - 2, 0))
            c0 = np.minimum(np.floor(c).astype(np.int64), max(mw - 2, 0))
            r1 = np.minimum(r0 + 1, mh - 1)
            c1 = np.minimum(c0 + 1, mw - 1)
            wr = (r - r0).astype(np.float32)
            wc = (c - c0).astype(np.float32)
            top = maps[n, r0, c0] * (1 - wc) + maps[n, r0, c1] * wc
            bottom = maps[n, r1, c0] * (1 - wc) + maps[n, r1, c1] * wc
            value = top * (1 - wr) + bottom * wr
        out[k0 : k0 + ks.shape[0]] = np.where(valid, value, np.float32(0.0))
    return out
