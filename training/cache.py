"""Disk cache of preprocessed model inputs, so an epoch does not re-decode DICOM / NIfTI or re-resample.

An entry is keyed by the *source identity* (what was read: file names, sizes, mtimes, UIDs, or a
synthetic study's full specification) and a hash of the :class:`PreprocessingConfig` plus the margin.
Changing either gives a new key; stale entries are never served.

**What is stored.** ``operators.preprocessing.preprocess`` output without its ImageNet normalisation:
the [0, 1] intensities quantised to ``uint16`` (step 1/65535 ≈ 0.03 HU, i.e. lossless for CT), shape
``[N, 3, H + 2·my, W + 2·mx]`` — about 7 MB for a 55-image 144² scan (the reference stores 35 MB
float64 cubes). Normalising on read costs one multiply-add.

**Augmentation without re-resampling.** For training, the window is preprocessed ``margin`` pixels
wider on each side (default ``ceil(train_jitter_mm / spacing)`` = 10 px, i.e. 164² like the
reference's crop source) by ``preprocess``, which never augments. A training sample is then a random 144² crop (shift
up to ± margin px on each axis, i.e. ±``train_jitter_mm`` up to rounding to whole pixels) and a flip
along ``train_flip_axis`` with ``train_flip_p``, at the cost of a slice copy instead of a resample. The
cropped window is exactly the serving window shifted (the grid is symmetric about its centre), so a
zero shift gives the serving input bit for bit except that the empty-slice rule saw the wider window.
Validation/test entries are stored without margin: they are the serving input.

**Concurrency.** Entries are written to a temporary file and renamed (atomic); two workers computing
the same entry just write it twice. ``CacheStats`` counts hits/misses per process (tests assert hits).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from operators.preprocessing import (
    ModelInput,
    PreprocessingConfig,
    denormalize_images,
    normalize_images,
    preprocess,
)
from operators.volume import Volume

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
_SCALE = 65535.0


def config_hash(config: PreprocessingConfig, margin: tuple[int, int] = (0, 0)) -> str:
    """Stable hash of everything that shapes a cached input (config, margin, cache format)."""
    payload = {"v": CACHE_VERSION, "config": config.to_dict(), "margin": list(margin)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def train_margin(config: PreprocessingConfig) -> tuple[int, int]:
    """Pixels added on each side (rows, columns) so that crops cover ``train_jitter_mm``."""
    sx, sy, _ = config.spacing_mm
    return (
        int(math.ceil(config.train_jitter_mm / sy - 1e-9)),
        int(math.ceil(config.train_jitter_mm / sx - 1e-9)),
    )


@dataclass(frozen=True, eq=False)
class CachedInput:
    """A cached scan: ``scaled`` uint16 ``[N, 3, H', W']`` ([0, 1] × 65535) and the preprocessing info."""

    scaled: np.ndarray
    margin: tuple[int, int]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return int(self.scaled.shape[0])

    def window(
        self,
        config: PreprocessingConfig,
        *,
        shift: tuple[int, int] = (0, 0),
        flip: bool = False,
    ) -> np.ndarray:
        """Normalised float32 ``[N, 3, H, W]``: the window shifted by ``shift`` (rows, cols) px, maybe flipped.

        ``flip`` mirrors along ``config.train_flip_axis`` ("x" = columns, "y" = rows), as ``preprocess``.
        """
        my, mx = self.margin
        dy, dx = shift
        if abs(dy) > my or abs(dx) > mx:
            raise ValueError(f"shift {shift} exceeds the cached margin {self.margin}")
        h = self.scaled.shape[2] - 2 * my
        w = self.scaled.shape[3] - 2 * mx
        crop = self.scaled[:, :, my + dy : my + dy + h, mx + dx : mx + dx + w]
        if flip:
            crop = crop[:, :, :, ::-1] if config.train_flip_axis == "x" else crop[:, :, ::-1, :]
        images = crop.astype(np.float32)
        images *= np.float32(1.0 / _SCALE)
        return np.ascontiguousarray(normalize_images(images, config))


@dataclass
class CacheStats:
    """Per-process counters (tests use them to prove a hit avoided re-reading the source)."""

    hits: int = 0
    misses: int = 0
    memory_hits: int = 0


def encode(model_input: ModelInput, config: PreprocessingConfig, margin: tuple[int, int]) -> CachedInput:
    """Undo the ImageNet normalisation of a ``preprocess`` result and quantise to uint16."""
    scaled = denormalize_images(model_input.images, config)
    q = np.clip(np.rint(scaled * _SCALE), 0, _SCALE).astype(np.uint16)
    info = {k: v for k, v in model_input.info.items() if _jsonable(v)}
    return CachedInput(scaled=q, margin=margin, info=info)


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
    except (TypeError, ValueError):
        return False
    return True


def preprocess_with_margin(
    volume: Volume, config: PreprocessingConfig, margin: tuple[int, int] = (0, 0)
) -> CachedInput:
    """``preprocess`` on a window ``margin`` px wider per side (no augmentation), encoded for the cache."""
    my, mx = margin
    wide = dataclasses.replace(
        config, image_size=(config.image_size[0] + 2 * my, config.image_size[1] + 2 * mx)
    )
    return encode(preprocess(volume, wide), config, margin)


class InputCache:
    """Preprocessed inputs on disk (``root``) and/or in memory (``memory_items`` most recent, LRU).

    ``root=None`` keeps entries in memory only (tests, the in-memory demo). ``get`` takes the source
    identity and a loader callable; the loader (which reads and decodes the volume) is only called on a
    miss — that is the property the tests assert.
    """

    def __init__(self, root: str | os.PathLike[str] | None, *, memory_items: int = 0) -> None:
        self.root = Path(root) if root is not None else None
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)
        self.memory_items = memory_items if self.root is not None else max(memory_items, 1 << 30)
        self._memory: dict[str, CachedInput] = {}
        self.stats = CacheStats()

    @staticmethod
    def key(identity: str, config: PreprocessingConfig, margin: tuple[int, int] = (0, 0)) -> str:
        digest = hashlib.sha256(identity.encode()).hexdigest()[:24]
        return f"{digest}-{config_hash(config, margin)}"

    def _paths(self, key: str) -> tuple[Path, Path]:
        assert self.root is not None
        sub = self.root / key[:2]
        return sub / f"{key}.npy", sub / f"{key}.json"

    def contains(self, identity: str, config: PreprocessingConfig, margin: tuple[int, int] = (0, 0)) -> bool:
        key = self.key(identity, config, margin)
        if key in self._memory:
            return True
        return self.root is not None and all(p.exists() for p in self._paths(key))

    def get(
        self,
        identity: str,
        config: PreprocessingConfig,
        load: Callable[[], Volume],
        *,
        margin: tuple[int, int] = (0, 0),
        meta: Callable[[], Mapping[str, Any]] | None = None,
    ) -> CachedInput:
        """The cached input for ``identity``; on a miss ``load()`` the volume, preprocess and store it.

        ``meta`` (optional) adds JSON-ready facts computed with the load (e.g. synthetic labels) to the
        entry's info; they come back on hits without calling ``load``.
        """
        key = self.key(identity, config, margin)
        hit = self._memory.get(key)
        if hit is not None:
            self.stats.memory_hits += 1
            self.stats.hits += 1
            self._memory[key] = self._memory.pop(key)  # LRU: most recent last
            return hit
        if self.root is not None:
            data_path, info_path = self._paths(key)
            if data_path.exists() and info_path.exists():
                try:
                    entry = CachedInput(
                        scaled=np.load(data_path, mmap_mode="r"),
                        margin=margin,
                        info=json.loads(info_path.read_text(encoding="utf-8")),
                    )
                except (OSError, ValueError) as exc:  # a torn or corrupt entry: recompute it
                    logger.warning("cache entry %s unreadable (%s); recomputing", data_path.name, exc)
                else:
                    self.stats.hits += 1
                    self._remember(key, entry)
                    return entry
        self.stats.misses += 1
        entry = preprocess_with_margin(load(), config, margin)
        if meta is not None:
            entry.info.update(dict(meta()))
        if self.root is not None:
            self._write(key, entry)
        self._remember(key, entry)
        return entry

    def put(
        self,
        identity: str,
        config: PreprocessingConfig,
        entry: CachedInput,
        *,
        margin: tuple[int, int] = (0, 0),
    ) -> None:
        """Store an entry computed elsewhere (e.g. by a worker process); counts as a miss."""
        if tuple(entry.margin) != tuple(margin):
            raise ValueError(f"entry margin {entry.margin} != {margin}")
        key = self.key(identity, config, margin)
        self.stats.misses += 1
        if self.root is not None:
            self._write(key, entry)
        self._remember(key, entry)

    def _remember(self, key: str, entry: CachedInput) -> None:
        if self.memory_items <= 0:
            return
        self._memory[key] = entry
        while len(self._memory) > self.memory_items:
            self._memory.pop(next(iter(self._memory)))

    def _write(self, key: str, entry: CachedInput) -> None:
        data_path, info_path = self._paths(key)
        data_path.parent.mkdir(parents=True, exist_ok=True)
        for path, writer in (
            (data_path, lambda fh: np.save(fh, entry.scaled)),
            (info_path, lambda fh: fh.write(json.dumps(entry.info).encode())),
        ):
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as fh:
                    writer(fh)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    def clear_memory(self) -> None:
        self._memory.clear()
