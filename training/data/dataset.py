"""Torch dataset over scan records, batching, and the paper's one-valid-task-per-scan sampling (spec §6).

Every sample goes through :mod:`training.cache` (which calls ``operators.preprocessing.preprocess``,
the serving code, on a miss). Randomness is never drawn from global state: augmentation from
generators seeded by ``(seed, epoch, index)``, the batch order by ``(seed, epoch)``
(:class:`EpochBatches`), so an epoch is identical whether it runs straight through, in DataLoader
workers (persistent ones too: the epoch travels with each index), after ``--resume``, or split over
several processes.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from operators.preprocessing import ModelInput, PreprocessingConfig, batch_pad
from training.cache import CachedInput, InputCache, preprocess_with_margin, train_margin
from training.data.labels import BadData, DataError
from training.data.records import ScanRecord

logger = logging.getLogger(__name__)

#: A dataset key: a record index, or ``(epoch, index)`` to draw that epoch's augmentation.
SampleKey = int | tuple[int, int]


def epoch_seed(seed: int, epoch: int, stream: int = 0, *more: int) -> int:
    """A 63-bit seed for one (run seed, epoch, stream[, more]): independent of everything that ran before."""
    state = np.random.SeedSequence([seed, epoch, stream, *more]).generate_state(2, np.uint32)
    return int(state.view(np.uint64)[0] >> 1)


@dataclass(frozen=True, eq=False)
class Sample:
    """One preprocessed scan: ``images [N, 3, H, W]`` (normalised), ``mask [N]``, ``labels [K]``.

    ``load_seconds``: what building it cost (cache read, crop, normalisation), for the loader ratio."""

    images: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    index: int
    load_seconds: float = 0.0

    @property
    def n_images(self) -> int:
        return int(self.images.shape[0])


@dataclass
class Batch:
    """Padded batch: ``images [B, N, 3, H, W]``, ``mask [B, N]``, ``labels [B, K]``, dataset ``index [B]``.

    ``load_seconds``: the time its samples and the padding took to build, wherever that ran (a loader
    worker or the training process): the loader's cost per batch, to compare with a training step."""

    images: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    dropped_bad: int = 0
    load_seconds: float = 0.0

    def pin_memory(self) -> Batch:
        """Page-locked copies (DataLoader ``pin_memory=True``), so host-to-device copies can overlap."""
        return Batch(self.images.pin_memory(), self.mask.pin_memory(), self.labels.pin_memory(),
                     self.index.pin_memory(), self.dropped_bad, self.load_seconds)  # fmt: skip

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _load_error(record: ScanRecord, exc: BaseException) -> DataError:
    if isinstance(exc, DataError) and record.origin in str(exc):
        return exc
    return DataError(f"{record.origin}: cannot read {record.source.describe()}: {exc}")


class ScanDataset(Dataset):
    """Records → :class:`Sample` via the cache; ``augment`` = random shift + flip from a cached wider window."""

    def __init__(
        self,
        records: Sequence[ScanRecord],
        preprocessing: PreprocessingConfig,
        cache: InputCache,
        *,
        augment: bool = False,
        seed: int = 0,
        skip_bad: bool = False,
    ) -> None:
        self.records = list(records)
        self.preprocessing = preprocessing
        self.cache = cache
        self.augment = augment
        self.margin = train_margin(preprocessing) if augment else (0, 0)
        self.seed = int(seed)
        self.skip_bad = skip_bad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Pick the epoch whose augmentation draws ``__getitem__(index)`` reproduces (an
        ``(epoch, index)`` key names its epoch itself)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def labels(self) -> np.ndarray:
        """``[n, K]`` labels of all records (1/0/-1)."""
        if not self.records:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([r.labels for r in self.records])

    def cached(self, i: int) -> CachedInput:
        """The cached input of record ``i`` (loads and preprocesses on a miss)."""
        r = self.records[i]
        try:
            return self.cache.get(r.source.identity(), self.preprocessing, r.source.load, margin=self.margin)
        except Exception as exc:  # noqa: BLE001 - any reader failure becomes a named DataError
            raise _load_error(r, exc) from exc

    def __getitem__(self, key: SampleKey) -> Sample | None:
        t0 = time.perf_counter()
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        try:
            entry = self.cached(i)
        except DataError as exc:
            if not self.skip_bad:
                raise
            logger.warning("skipping bad sample: %s", exc)
            return None
        shift, flip = (0, 0), False
        if self.augment:
            rng = np.random.default_rng([self.seed, epoch, i, 17])
            my, mx = self.margin
            shift = (int(rng.integers(-my, my + 1)), int(rng.integers(-mx, mx + 1)))
            flip = bool(rng.random() < self.preprocessing.train_flip_p)
        images = entry.window(self.preprocessing, shift=shift, flip=flip)
        mask = np.ones(images.shape[0], dtype=bool)
        return Sample(images, mask, self.records[i].labels.copy(), i, time.perf_counter() - t0)


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """The training batches of an epoch, and this process's part of each (a DataLoader ``batch_sampler``).

    The order is one permutation per epoch seeded by ``(seed, epoch, 1)``, cut into global batches of
    ``batch_size``; with ``world`` processes each takes a contiguous part of every global batch (sizes
    differ by at most one; a part may be empty at the end of an epoch). So 1 or N processes train on
    the same batches, every scan exactly once per epoch. ``torch``'s ``DistributedSampler`` is not
    used: it shards the whole epoch (a global batch would not be a single process's batch) and pads
    it by repeating scans. Keys are ``(epoch, index)``, so workers need no ``set_epoch``.
    """

    def __init__(self, n: int, batch_size: int, seed: int, *, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world = rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_batches(self) -> list[list[int]]:
        """Record indices of every global batch of the current epoch, in training order."""
        order = np.random.default_rng(epoch_seed(self.seed, self.epoch, 1)).permutation(self.n).tolist()
        return [order[b : b + self.batch_size] for b in range(0, self.n, self.batch_size)]

    def part(self, batch: Sequence[int]) -> list[int]:
        """This process's contiguous share of a global batch."""
        cuts = np.linspace(0, len(batch), self.world + 1).round().astype(int)
        return list(batch[cuts[self.rank] : cuts[self.rank + 1]])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.global_batches():
            yield [(self.epoch, i) for i in self.part(batch)]

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


def collate(items: Sequence[Sample | None]) -> Batch:
    """Pad with ``operators.preprocessing.batch_pad`` (mask True = real image); drop skipped samples."""
    t0 = time.perf_counter()
    good = [s for s in items if s is not None]
    dropped = len(items) - len(good)
    if not good:
        return Batch(
            torch.zeros(0), torch.zeros(0, dtype=torch.bool), torch.zeros(0, 0), torch.zeros(0), dropped
        )
    images, mask = batch_pad(cast(Sequence[ModelInput], good))
    return Batch(
        images=torch.from_numpy(images),
        mask=torch.from_numpy(mask),
        labels=torch.from_numpy(np.stack([s.labels for s in good])),
        index=torch.tensor([s.index for s in good], dtype=torch.long),
        dropped_bad=dropped,
        load_seconds=sum(s.load_seconds for s in good) + time.perf_counter() - t0,
    )


def sample_tasks(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spec §6 / O-16: per scan, one task drawn uniformly from its *valid* tasks (label ≠ −1).

    One uniform draw per scan whether or not it is kept, so the stream does not depend on which scans
    are missing labels; :func:`choose_tasks` with the draws given.
    """
    labels = np.asarray(labels)
    return choose_tasks(labels, np.asarray(rng.random(labels.shape[0])))


def choose_tasks(
    labels: np.ndarray, u: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The task of each scan from its uniform draw ``u [B]`` in [0, 1): among its valid tasks, uniformly
    (task ``floor(u · n_valid)``) or, given ``weights [K]`` (``data.task_weights``), in proportion to
    them (the first valid task whose cumulative share exceeds ``u``).

    Returns ``(keep [B'] row indices, task [B'] column indices, target [B'] 0/1)``; scans with no
    valid task are dropped (not in ``keep``). Training passes draws made per position of the global
    batch, so a scan gets the same task whichever process trains it.
    """
    labels = np.asarray(labels)
    valid = (labels != -1) & np.isfinite(labels)
    counts = valid.sum(axis=1)
    keep = np.flatnonzero(counts > 0)
    tasks = np.empty(keep.size, dtype=np.int64)
    for j, b in enumerate(keep):
        choices = np.flatnonzero(valid[b])
        if weights is None:
            tasks[j] = choices[min(int(u[b] * choices.size), choices.size - 1)]
        else:
            share = np.cumsum(weights[choices]) / weights[choices].sum()
            tasks[j] = choices[min(int(np.searchsorted(share, u[b], side="right")), choices.size - 1)]
    return keep, tasks, labels[keep, tasks].astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Filling the cache up front (finds bad data before training starts, in parallel)


def _compute(
    args: tuple[ScanRecord, PreprocessingConfig, tuple[int, int]],
) -> tuple[CachedInput | None, str | None]:
    record, config, margin = args
    try:
        return preprocess_with_margin(record.source.load(), config, margin), None
    except Exception as exc:  # noqa: BLE001 - reported by the caller with the record's origin
        return None, str(_load_error(record, exc))


def prepare(
    records: Sequence[ScanRecord],
    preprocessing: PreprocessingConfig,
    cache: InputCache,
    *,
    augment: bool = False,
    workers: int = 0,
    bad: BadData | None = None,
    progress: Any = None,
) -> list[ScanRecord]:
    """Make sure every record is in the cache; returns the records that could be read.

    Unreadable volumes go through ``bad`` (raise a :class:`DataError` naming the record, or skip and
    count). ``workers`` > 0 reads/preprocesses in that many processes. ``progress``: optional
    callable ``(done, total)``.
    """
    bad = bad or BadData()
    margin = train_margin(preprocessing) if augment else (0, 0)
    todo = [r for r in records if not cache.contains(r.source.identity(), preprocessing, margin)]
    failed: set[int] = set()
    done = len(records) - len(todo)
    if progress is not None:
        progress(done, len(records))

    def store(record: ScanRecord, entry: CachedInput | None, error: str | None) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, len(records))
        if entry is None:
            failed.add(id(record))
            bad.report(error or f"{record.origin}: unreadable")
            return
        cache.put(record.source.identity(), preprocessing, entry, margin=margin)

    if workers > 0 and len(todo) > 1:
        # fork: workers only run numpy code (rendering, reading, preprocessing) and start instantly
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            for record, (entry, error) in zip(
                todo, pool.map(_compute, [(r, preprocessing, margin) for r in todo], chunksize=1), strict=True
            ):
                store(record, entry, error)
    else:
        for r in todo:
            store(r, *_compute((r, preprocessing, margin)))
    if todo:
        logger.info(
            "cached %d scans (%d already cached, %d unreadable)",
            len(todo),
            len(records) - len(todo),
            len(failed),
        )
    return [r for r in records if id(r) not in failed]
