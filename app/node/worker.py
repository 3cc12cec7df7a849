"""The worker: runs the application pipeline on complete studies, models loaded once per process.

Why in-process (one :class:`~app.pipeline.Pipeline`, and so one set of ONNX Runtime sessions, for
the life of the node; :meth:`~app.pipeline.Pipeline.run_folder` for every study, the same stages as
the MONAI Deploy graph without a Holoscan application per study) and not one ``python -m app`` per
study: measured
on the 2-core CI machine with the tiny test model and a 110-slice study, a study takes 1.0–2.1 s
in-process against 10.6–11.0 s as a fresh process (imports of MONAI/Holoscan/torch plus session
creation on every run); with ViT-B tasks session creation alone is 0.8–1.1 s per task (see
docs/node.md). The price is that a crash in the pipeline takes the node down — the state makes
that harmless: the job is re-queued at restart.

Each job gets a snapshot of its study: hard links (same file system, no copy) to exactly the
instances recorded in the database, so files still arriving, temporaries, and the node's own
results forwarded back never enter the pipeline. The job's outputs go to ``results/<job id>/``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from app.node.outbox import result_outputs
from app.node.store import Job, NodeStore
from app.pipeline import Pipeline

logger = logging.getLogger(__name__)


class Worker:
    """Claims queued jobs and runs them, one at a time, in the calling thread."""

    def __init__(
        self,
        store: NodeStore,
        data_dir: Path,
        pipeline: Pipeline,
        *,
        destinations: list[str],
        max_attempts: int = 3,
        on_claim: Callable[[Job | None], None] | None = None,
    ) -> None:
        self.store = store
        self.data_dir = Path(data_dir)
        self.spool_dir = self.data_dir / "spool"
        self.work_dir = self.data_dir / "work"
        self.results_dir = self.data_dir / "results"
        self.pipeline = pipeline
        self.destinations = list(destinations)
        self.max_attempts = max_attempts
        self.on_claim = on_claim  # told the job it holds (inside the claim), then None when done
        self.busy_since: float | None = None

    def run_next(self) -> Job | None:
        """Run the oldest queued job, if any; returns it (None when the queue is empty)."""
        job = self.store.jobs.claim(on_claim=self.on_claim)
        if job is None:
            return None
        self.busy_since = time.monotonic()
        try:
            self._run(job)
        finally:
            self.busy_since = None
            if self.on_claim is not None:
                self.on_claim(None)
        return job

    def _snapshot(self, job: Job) -> Path:
        folder = self.work_dir / str(job.id)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for sop_uid, path in self.store.studies.inputs(job.study_uid):
            src = self.spool_dir / path
            try:
                os.link(src, folder / src.name)
            except FileNotFoundError:
                logger.warning(
                    "instance %s of study %s is no longer in the spool", sop_uid, job.study_uid
                )
            except OSError:
                shutil.copy2(src, folder / src.name)  # another file system: copy
        return folder

    def _run(self, job: Job) -> None:
        started = time.monotonic()
        logger.info("job %d: processing study %s (attempt %d)", job.id, job.study_uid, job.attempts)
        output = self.results_dir / str(job.id)
        try:
            folder = self._snapshot(job)
            shutil.rmtree(output, ignore_errors=True)
            summaries = self.pipeline.run_folder(folder, output)
        except Exception as exc:  # noqa: BLE001 - any pipeline error is this job's failure
            logger.exception("job %d (study %s) raised", job.id, job.study_uid)
            state = self.store.jobs.fail_attempt(
                job, f"{type(exc).__name__}: {exc}", max_attempts=self.max_attempts
            )
            logger.error("job %d: %s", job.id, state)
            return
        finally:
            shutil.rmtree(self.work_dir / str(job.id), ignore_errors=True)
        summary = next((s for s in summaries if s.get("study_instance_uid") == job.study_uid), None)
        if summary is None:
            summary = {
                "outcome": "failed",
                "reason": "the pipeline returned no record for the study",
                "files": {},
            }
        outputs = result_outputs(summary, output, self.data_dir) if summary["outcome"] == "processed" else []
        final = self.store.jobs.finish(
            job,
            summary["outcome"],
            summary.get("reason") or "",
            output.relative_to(self.data_dir).as_posix(),
            outputs,
            self.destinations,
        )
        logger.info(
            "job %d: study %s %s in %.1f s (%d result object(s))",
            job.id, job.study_uid, final, time.monotonic() - started, len(outputs),
        )  # fmt: skip
