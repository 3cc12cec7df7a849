"""``worker.processes: N`` (N > 1): N worker processes run jobs side by side.

Why processes: loading, preprocessing and the SR/SEG writers cost ≈ 2.5 s of CPU per 300-slice
study and hold the interpreter lock for much of it, so on a GPU host one worker leaves the card idle
between studies; threads would share that lock. Each process is the in-process worker of
:mod:`app.node.worker` — its own :class:`~app.pipeline.Pipeline` (models loaded once per process:
N × the model's memory, on the GPU too), its own connection to the node's SQLite database — and
claims jobs there (``BEGIN IMMEDIATE``: a job goes to exactly one process). The main process keeps
the receiver, the scheduler, the outbox and the web listeners, and watches the workers:

* a worker that dies mid-job (a crash in a native library, the OOM killer) costs that job one
  attempt — re-queued, or failed after ``worker.max-job-attempts`` — and is started again, so a
  study that kills its worker cannot stall the node or loop forever;
* on stop, each worker finishes its current job (recorded) and exits; a worker ignores SIGINT (a
  Ctrl-C reaches the whole process group) and dies with the main process (``PR_SET_PDEATHSIG``), so a
  killed node leaves no orphan: its running jobs are re-queued at the next start, as with one worker.

``spawn``, not ``fork``: the main process runs threads (receiver, outbox, web) and a forked copy of
a process with threads may hold a lock forever. For the same reason nothing shared with a worker
has a lock (``RawValue`` flags, polled): a worker killed while holding the lock of a
``multiprocessing.Event`` or a synchronized ``Value`` would leave it held, and the main process
would hang on its next ``set()`` or read.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from app.config import AppConfig
    from app.node.config import NodeConfig
    from app.node.store import NodeStore

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_IDLE = 0  # no job


@dataclass
class _Slot:
    """One worker process and what the main process can see of it."""

    index: int
    process: BaseProcess
    job: Any  # RawValue('q'): the running job id, 0 when idle
    busy_since: Any  # RawValue('d'): time.time() when the job started, 0 when idle
    ready: Any  # RawValue('b'): the model is loaded


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the loop's parent check ends us
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _worker_main(
    config: NodeConfig,
    app_config: AppConfig | None,
    index: int,
    stop: Any,
    job: Any,
    busy_since: Any,
    ready: Any,
    parent: int,
    log: tuple[str, bool],
) -> None:
    """One worker process: claim jobs and run them until ``stop`` (or the main process is gone)."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when we stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from app.node.service import configure_logging
    from app.node.store import NodeStore
    from app.node.worker import Worker
    from app.pipeline import Pipeline

    configure_logging(*log)
    store = NodeStore(config.data_path / "state.sqlite")

    def claimed(current: Any) -> None:
        busy_since.value = time.time() if current is not None else 0.0
        job.value = current.id if current is not None else _IDLE

    worker = Worker(
        store,
        config.data_path,
        Pipeline(config.worker.model, app_config),
        destinations=[str(d) for d in config.outbox.destinations],
        max_attempts=config.worker.max_job_attempts,
        on_claim=claimed,
    )
    _ = worker.pipeline.runner  # the model, loaded before the first job
    ready.value = 1
    logger.info("worker %d (pid %d) ready", index, os.getpid())
    poll = config.completion.poll_interval_s
    try:
        while not stop.value and os.getppid() == parent:
            if worker.run_next() is None:
                time.sleep(poll)
    finally:
        worker.pipeline.close()
        store.close()
        logger.info("worker %d (pid %d) stopped", index, os.getpid())


class WorkerPool:
    """N worker processes over the node's database; :meth:`check` is called from the main loop."""

    def __init__(self, config: NodeConfig, app_config: AppConfig | None, store: NodeStore) -> None:
        self.config, self.app_config, self.store = config, app_config, store
        self.n = config.worker.processes
        self._ctx = mp.get_context("spawn")
        self._stop = self._ctx.RawValue("b", 0)
        self._slots: list[_Slot] = []
        root = logging.getLogger()
        self._log = (logging.getLevelName(root.level), any(type(h.formatter).__name__ == "JsonFormatter"
                                                         for h in root.handlers))  # fmt: skip

    def start(self, *, wait_ready_s: float = 600.0) -> None:
        self._slots = [self._start(i) for i in range(self.n)]
        deadline = time.monotonic() + wait_ready_s
        for slot in self._slots:  # as with one worker: the node reports started once models are loaded
            while not slot.ready.value:
                time.sleep(0.1)
                if not slot.process.is_alive():
                    raise RuntimeError(
                        f"worker {slot.index} exited with code {slot.process.exitcode} while loading the model"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"worker {slot.index} did not load the model within {wait_ready_s:.0f} s"
                    )
        logger.info("%d worker processes ready", self.n)

    def _start(self, index: int) -> _Slot:
        job, busy, ready = (
            self._ctx.RawValue("q", _IDLE),
            self._ctx.RawValue("d", 0.0),
            self._ctx.RawValue("b", 0),
        )
        process = self._ctx.Process(
            target=_worker_main,
            args=(self.config, self.app_config, index, self._stop, job, busy, ready, os.getpid(), self._log),
            name=f"hyperct-worker-{index}",
            daemon=False,  # a worker finishes its job on stop; daemonic ones are killed at exit
        )
        process.start()
        return _Slot(index, process, job, busy, ready)

    def check(self) -> list[int]:
        """Charge a dead worker's job one attempt and start the worker again; returns the job ids charged."""
        charged = []
        for i, slot in enumerate(self._slots):
            if slot.process.is_alive() or self._stop.value:
                continue
            code = slot.process.exitcode
            job_id = int(slot.job.value)
            if job_id != _IDLE:
                charged.append(job_id)
                self._charge(job_id, f"worker process died (exit code {code}) while running the job")
            logger.error(
                "worker %d (pid %s) exited with code %s; starting it again",
                slot.index,
                slot.process.pid,
                code,
            )
            self._slots[i] = self._start(slot.index)
        return charged

    def _charge(self, job_id: int, reason: str) -> None:
        from app.node.store.jobs import Job

        row = self.store.jobs.get(job_id)
        if row is None or row["state"] != "running":
            return  # recorded before the worker died
        job = Job(job_id, row["study_uid"], row["generation"], row["attempts"])
        state = self.store.jobs.fail_attempt(job, reason, max_attempts=self.config.worker.max_job_attempts)
        logger.error("job %d (study %s): %s; %s", job_id, job.study_uid, reason, state)

    def running(self) -> list[tuple[int, float]]:
        """``(job id, seconds running)`` of each busy worker."""
        now = time.time()
        return [
            (int(s.job.value), now - float(s.busy_since.value)) for s in self._slots if s.job.value != _IDLE
        ]

    @property
    def busy(self) -> bool:
        return any(s.job.value != _IDLE for s in self._slots)

    @property
    def pids(self) -> list[int | None]:
        return [s.process.pid for s in self._slots]

    def stop(self, timeout_s: float | None = None) -> None:
        """Ask every worker to stop after its current job and wait for them (``timeout_s``: then kill;
        a killed worker's job is re-queued at the next start)."""
        self._stop.value = 1
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for slot in self._slots:
            slot.process.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if slot.process.is_alive():
                logger.warning("worker %d did not stop in time; killing it", slot.index)
                slot.process.kill()
                slot.process.join()
