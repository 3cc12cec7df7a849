"""Data-parallel training over the processes ``torchrun`` starts (torch.distributed, DDP).

``torchrun --nproc_per_node N -m app.cli train RECIPE --out RUN`` starts N copies of the command;
torchrun puts ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and the rendezvous
address in each one's environment, and :func:`data_parallel` reads them, so nothing else is needed.
Without them (a plain ``hyperct train``) it is one process and every method here is a pass-through.

What is split and what is shared (docs/training.md §5, DDP):

* ``batch_size`` stays the *global* batch: each process trains on its part of every batch the single
  process would train on (``training.data.EpochBatches``), so the optimiser sees the same batches,
  steps and learning rates on 1 or N processes;
* gradients are averaged by DDP (NCCL on CUDA, gloo on the CPU); the training loop scales each
  process's loss so that the average equals the single-process mean over the kept scans;
* validation is sharded by scan and the scores gathered on every process, so all agree on the best
  epoch; rank 0 alone writes files;
* work that must happen once (filling a disk cache) runs on rank 0 first while the others wait on a
  gloo group with a one-day timeout: it can take hours, longer than the default group's timeout.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from training.device import resolve_device

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: How long a process waits for rank 0's one-off work (filling the cache of 25,692 CT-RATE scans
#: with 4 reader processes takes ≈ 2.5 h; docs/training.md §3).
LONG_WAIT = timedelta(days=1)


@dataclass
class DataParallel:
    """This process's place among the training processes, and the few collectives training needs."""

    device: torch.device
    rank: int = 0
    world: int = 1
    local_world: int = 1
    waits: Any = None  # a gloo process group with LONG_WAIT (None for a single process)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs progress and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around ``model`` (its trainable parameters are averaged after every backward).

        DDP copies rank 0's parameters and buffers to the others once, here; buffers are not
        re-broadcast before every forward (``forward_sync_buffers=False``): the frozen backbone's
        buffers are constants."""
        if not self.distributed:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of ``values`` over all processes (float64)."""
        if not self.distributed:
            return [float(v) for v in values]
        where = self.device if self.device.type == "cuda" else torch.device("cpu")
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=where)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().tolist()

    def all_gather(self, value: T) -> list[T]:
        """``value`` of every process, in rank order (pickled; for small results such as scores)."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value, group=self.waits)
        return out

    def main_first(self, work: Callable[[], T]) -> T:
        """Rank 0 runs ``work`` while the others wait; then the others run it too (and find what rank
        0 left behind, e.g. a filled cache). A failure on rank 0 is raised on every process."""
        if not self.distributed:
            return work()
        result: Any = None
        error: BaseException | None = None
        if self.is_main:
            try:
                result = work()
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the others heard of it
                error = exc
        box: list[Any] = [error]
        dist.broadcast_object_list(box, src=0, group=self.waits)
        if box[0] is not None:
            raise box[0]
        return result if self.is_main else work()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


@contextmanager
def data_parallel(device_name: str) -> Iterator[DataParallel]:
    """This process's :class:`DataParallel` for a run on ``device_name`` (``auto``/``cpu``/``cuda``).

    Under torchrun (``WORLD_SIZE`` > 1) it joins the process group for the run — NCCL when the device
    is CUDA (``cuda:LOCAL_RANK``), gloo on the CPU — unless the caller already did, and leaves it at
    the end if it joined it."""
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = resolve_device(device_name, local_rank if world > 1 else 0)
    if world <= 1:
        yield DataParallel(device)
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    joined = not dist.is_initialized()
    if joined:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    waits = dist.new_group(backend="gloo", timeout=LONG_WAIT)
    dp = DataParallel(device, dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_WORLD_SIZE", 1), waits)
    if dp.is_main:
        logger.info("data-parallel training: %d processes (%s), this is rank 0 on %s",
                    dp.world, dist.get_backend(), device)  # fmt: skip
    try:
        yield dp
    finally:
        dist.destroy_process_group(waits)
        if joined:
            dist.destroy_process_group()
