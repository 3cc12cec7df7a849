"""Jobs: one pipeline run of a study's generation, ``queued → running → done | not-processed |
failed | superseded``, and the study states that go with a run (``complete → processing → sending
→ done``). A finished job queues its outputs in the outbox in the same transaction.

A job is *current* while its study is ``processing`` with the job's generation; a late arrival or
a quarantine moves the study on, and the run is then recorded as ``superseded`` and sends nothing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.node.store.db import Database, StateError
from app.node.store.journal import Journal
from app.node.store.outbox import OutboxItem, OutboxStore

#: Every state a job can be in (``hyperct jobs list --state`` accepts these, ``not_processed`` too, no other).
#: ``not-processed`` is spelt as the run's outcome (outcome.json, results.json), which :meth:`JobStore.finish`
#: stores as the state; ``not_processed`` was the spelling of these constants only, so it matched no row.
JOB_STATES = ("queued", "running", "done", "not-processed", "failed", "superseded")


@dataclass(frozen=True)
class Job:
    id: int
    study_uid: str
    generation: int
    attempts: int


class JobStore:
    """The ``jobs`` table and the study transitions of a run."""

    def __init__(self, db: Database, journal: Journal, outbox: OutboxStore) -> None:
        self.db = db
        self.journal = journal
        self.outbox = outbox

    # -- inside other stores' transactions -------------------------------------------------------
    @staticmethod
    def queue(db: sqlite3.Connection, study_uid: str, generation: int, now: float, *, clear_error: bool = False) -> int:
        """Mark the study complete and queue a job for its current generation."""
        db.execute(
            "UPDATE studies SET state='complete'" + (", error=NULL" if clear_error else "") + ", updated_at=? WHERE study_uid=?",
            (now, study_uid),
        )
        cur = db.execute(
            "INSERT INTO jobs (study_uid, generation, state, created_at) VALUES (?,?,?,?)",
            (study_uid, generation, "queued", now),
        )
        return int(cur.lastrowid)  # type: ignore[arg-type]

    @staticmethod
    def supersede_queued(db: sqlite3.Connection, study_uid: str) -> None:
        """Queued jobs of a study that moved on (late arrival, quarantine) never run."""
        db.execute("UPDATE jobs SET state='superseded' WHERE study_uid=? AND state='queued'", (study_uid,))

    # -- the worker ------------------------------------------------------------------------------
    def claim(self, *, now: float | None = None, on_claim: Callable[[Job], None] | None = None) -> Job | None:
        """The oldest queued job, now ``running`` (its study ``processing``), with an attempt row.

        ``on_claim`` runs inside the transaction: a worker process that tells the main process which
        job it holds does so before the claim commits (if it dies before the commit, the job is
        still queued), so a job is never ``running`` without the main process knowing who holds it."""
        now = self.db.clock() if now is None else now
        with self.db.transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE state='queued' ORDER BY id LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state='running', attempts=attempts+1, started_at=? WHERE id=?", (now, row["id"]))
            db.execute(
                "UPDATE studies SET state='processing', updated_at=? WHERE study_uid=? AND generation=? AND state='complete'",
                (now, row["study_uid"], row["generation"]),
            )
            self.journal.start_run(db, row["id"], now)
            job = Job(row["id"], row["study_uid"], row["generation"], row["attempts"] + 1)
            if on_claim is not None:
                on_claim(job)
            return job

    @staticmethod
    def _current(db: sqlite3.Connection, job: Job) -> bool:
        s = db.execute("SELECT generation, state FROM studies WHERE study_uid=?", (job.study_uid,)).fetchone()
        return s is not None and s["generation"] == job.generation and s["state"] == "processing"

    def finish(self, job: Job, outcome: str, reason: str, output_dir: str, outputs: list[tuple[str, str]],
               destinations: list[str], *, now: float | None = None) -> str:  # fmt: skip
        """Record a finished pipeline run and queue its outputs ``(sop_uid, path)`` for every destination.

        Returns the job's final state (``done``, ``not-processed``, ``failed`` or ``superseded`` when a
        late arrival or a quarantine overtook the run)."""
        now = self.db.clock() if now is None else now
        with self.db.transaction() as db:
            self.journal.close_run(db, job.id, outcome != "failed", f"{outcome}: {reason}", now)
            if not self._current(db, job):
                db.execute(
                    "UPDATE jobs SET state='superseded', finished_at=?, outcome=?, reason=?, output_dir=? WHERE id=?",
                    (now, outcome, reason, output_dir, job.id),
                )
                return "superseded"
            state = {"processed": "done"}.get(outcome, outcome)
            db.execute(
                "UPDATE jobs SET state=?, finished_at=?, outcome=?, reason=?, output_dir=? WHERE id=?",
                (state, now, outcome, reason, output_dir, job.id),
            )
            study_state = {"processed": "sending" if outputs and destinations else "done"}.get(outcome, outcome)
            if outcome == "failed":
                self.journal.error(db, "job", reason, job.study_uid, job_id=job.id, now=now)
            if outcome == "processed":
                self.outbox.queue(db, job.id, job.study_uid, outputs, destinations, now=now)
            db.execute(
                "UPDATE studies SET state=?, updated_at=?, error=? WHERE study_uid=?",
                (study_state, now, reason if outcome == "failed" else None, job.study_uid),
            )
            return state

    def fail_attempt(self, job: Job, reason: str, *, max_attempts: int, now: float | None = None) -> str:
        """A run that raised: requeue until ``max_attempts``, then ``failed`` (kept, visible)."""
        now = self.db.clock() if now is None else now
        with self.db.transaction() as db:
            self.journal.close_run(db, job.id, False, reason, now)
            self.journal.error(db, "job", reason, job.study_uid, job_id=job.id, now=now)
            if not self._current(db, job):
                db.execute("UPDATE jobs SET state='superseded', finished_at=? WHERE id=?", (now, job.id))
                return "superseded"
            if job.attempts < max_attempts:
                db.execute("UPDATE jobs SET state='queued' WHERE id=?", (job.id,))
                db.execute("UPDATE studies SET state='complete', updated_at=? WHERE study_uid=?", (now, job.study_uid))
                return "queued"
            db.execute("UPDATE jobs SET state='failed', finished_at=?, reason=? WHERE id=?", (now, reason, job.id))
            db.execute(
                "UPDATE studies SET state='failed', error=?, updated_at=? WHERE study_uid=?", (reason, now, job.study_uid)
            )
            return "failed"

    def requeue_interrupted(self, *, now: float | None = None) -> int:
        """At start-up: runs that a crash or shutdown interrupted go back to the queue."""
        now = self.db.clock() if now is None else now
        with self.db.transaction() as db:
            rows = db.execute("SELECT id, study_uid, generation FROM jobs WHERE state='running'").fetchall()
            for r in rows:
                self.journal.close_run(db, r["id"], False, "interrupted (restart)", now)
                db.execute("UPDATE jobs SET state='queued' WHERE id=?", (r["id"],))
                db.execute(
                    "UPDATE studies SET state='complete', updated_at=? WHERE study_uid=? AND generation=? AND state='processing'",
                    (now, r["study_uid"], r["generation"]),
                )
        return len(rows)

    # -- the operator ----------------------------------------------------------------------------
    def retry(self, job_id: int, *, now: float | None = None) -> str:
        """Operator retry: a failed/not-processed job runs again; failed sends are re-queued."""
        now = self.db.clock() if now is None else now
        with self.db.transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise StateError(f"no job {job_id}")
            failed_sends = self.outbox.requeue_job(db, job_id, now)
            if failed_sends:
                db.execute("UPDATE studies SET state='sending', updated_at=? WHERE study_uid=?", (now, row["study_uid"]))
                return f"{failed_sends} send(s) re-queued"
            if row["state"] not in ("failed", "not-processed", "superseded", "done"):
                raise StateError(f"job {job_id} is {row['state']}; only finished jobs can be retried")
            study = db.execute("SELECT * FROM studies WHERE study_uid=?", (row["study_uid"],)).fetchone()
            if study["state"] in ("receiving", "complete", "processing"):
                raise StateError(f"study {row['study_uid']} is {study['state']}; it will be processed anyway")
            return f"job {self.queue(db, row['study_uid'], study['generation'], now, clear_error=True)} queued"

    def rows(self, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Jobs, newest first."""
        sql = "SELECT * FROM jobs" + (" WHERE state=?" if state else "") + " ORDER BY id DESC LIMIT ?"
        return [dict(r) for r in self.db.query(sql, (state, limit) if state else (limit,))]

    def get(self, job_id: int) -> dict[str, Any] | None:
        """One job's row, or None."""
        rows = self.db.query("SELECT * FROM jobs WHERE id=?", (job_id,))
        return dict(rows[0]) if rows else None

    def for_study(self, study_uid: str) -> list[dict[str, Any]]:
        """A study's jobs, newest first."""
        return [dict(r) for r in self.db.query("SELECT * FROM jobs WHERE study_uid=? ORDER BY id DESC", (study_uid,))]

    def details(self, job_id: int) -> dict[str, Any]:
        """Everything about one job: the job, its study, attempts, outbox rows, errors."""
        rows = self.db.query("SELECT * FROM jobs WHERE id=?", (job_id,))
        if not rows:
            raise StateError(f"no job {job_id}")
        job = dict(rows[0])
        job["study"] = dict(self.db.query("SELECT * FROM studies WHERE study_uid=?", (job["study_uid"],))[0])
        history = self.journal.for_job(job_id)
        job["attempts_log"] = history["attempts_log"]
        job["outbox"] = self.outbox.for_job(job_id)
        job["errors"] = history["errors"]
        return job

    def counts(self) -> dict[str, Any]:
        """Jobs by state, and the number and total seconds of finished runs."""
        jobs = {r[0]: r[1] for r in self.db.query("SELECT state, COUNT(*) FROM jobs GROUP BY state")}
        latency = self.db.query(
            "SELECT COUNT(*), COALESCE(SUM(finished_at-started_at),0) FROM jobs"
            " WHERE finished_at IS NOT NULL AND started_at IS NOT NULL"
        )[0]
        return {"jobs": jobs, "processing_count": int(latency[0]), "processing_seconds": float(latency[1])}

    @staticmethod
    def ids(db: sqlite3.Connection, study_uid: str) -> list[int]:
        return [r[0] for r in db.execute("SELECT id FROM jobs WHERE study_uid=?", (study_uid,))]

    @staticmethod
    def forget(db: sqlite3.Connection, study_uid: str) -> None:
        """Inside the caller's transaction (after their attempts and outbox rows): a study's jobs."""
        db.execute("DELETE FROM jobs WHERE study_uid=?", (study_uid,))


class StudyDelivery:
    """The node's :class:`~app.node.store.outbox.DeliveryListener`: every send goes into the attempt
    log (a failure also into the errors); when a study's last row is sent it is ``done``, when every
    unsent row has failed it is ``failed``."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def delivery_recorded(self, db: sqlite3.Connection, item: OutboxItem, state: str, detail: str,
                          left: int, failed: int, now: float) -> None:  # fmt: skip
        self.journal.send(db, item.id, item.job_id, state == "sent", detail, now)
        if state == "failed":
            self.journal.error(db, "send", f"{item.destination}: {detail}", item.study_uid, item.sop_uid,
                               item.job_id, now=now)  # fmt: skip
        if left == 0:
            db.execute(
                "UPDATE studies SET state='done', updated_at=? WHERE study_uid=? AND state='sending'",
                (now, item.study_uid),
            )
        elif failed and left == failed:
            db.execute(
                "UPDATE studies SET state='failed', error=?, updated_at=? WHERE study_uid=? AND state='sending'",
                (f"{failed} result(s) could not be sent", now, item.study_uid),
            )
