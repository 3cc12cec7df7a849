"""The node's state in SQLite: studies, instances, jobs, attempts, errors, outbox.

Why SQLite in WAL mode with ``synchronous=FULL``: one file, no server, readers (``hyperct jobs``,
the health endpoint) never block the receiver, and with FULL every commit is on disk when
``COMMIT`` returns — the receiver acknowledges an instance only after that. Every state change is
one transaction (``BEGIN IMMEDIATE`` … ``COMMIT``), so a crash leaves either the old or the new
state, never half of one. The schema is versioned with ``PRAGMA user_version``; migrations run in
order at open.

Study states::

    receiving ──quiet period──▶ complete (job queued) ──▶ processing ──▶ sending ──▶ done
        │  only non-CT instances ─▶ stored             └▶ not_processed | failed
        └─ conflicting PatientID/issuer ─▶ quarantined (never processed)

A CT instance arriving after ``receiving`` follows the late-arrival policy: ``reprocess`` puts the
study back to ``receiving`` with a new *generation* (older jobs are superseded), ``ignore`` only logs.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Ordered migrations; index + 1 is the schema version they produce. Append only.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE studies (
        study_uid TEXT PRIMARY KEY,
        patient_id TEXT,
        issuer TEXT,
        state TEXT NOT NULL,
        generation INTEGER NOT NULL DEFAULT 1,
        instance_count INTEGER NOT NULL DEFAULT 0,
        trigger_count INTEGER NOT NULL DEFAULT 0,
        calling_ae TEXT,
        first_received REAL NOT NULL,
        last_received REAL NOT NULL,
        updated_at REAL NOT NULL,
        error TEXT
    );
    CREATE INDEX studies_state ON studies(state);
    CREATE TABLE instances (
        sop_uid TEXT PRIMARY KEY,
        study_uid TEXT NOT NULL REFERENCES studies(study_uid),
        series_uid TEXT,
        sop_class_uid TEXT,
        modality TEXT,
        transfer_syntax TEXT,
        patient_id TEXT,
        issuer TEXT,
        triggers INTEGER NOT NULL,
        own_output INTEGER NOT NULL,
        path TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        calling_ae TEXT,
        received_at REAL NOT NULL,
        duplicates INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX instances_study ON instances(study_uid);
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        study_uid TEXT NOT NULL REFERENCES studies(study_uid),
        generation INTEGER NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        outcome TEXT,
        reason TEXT,
        output_dir TEXT
    );
    CREATE INDEX jobs_state ON jobs(state);
    CREATE TABLE attempts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id INTEGER REFERENCES jobs(id),
        outbox_id INTEGER REFERENCES outbox(id),
        kind TEXT NOT NULL,
        started_at REAL NOT NULL,
        finished_at REAL,
        ok INTEGER,
        detail TEXT
    );
    CREATE TABLE errors (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        kind TEXT NOT NULL,
        study_uid TEXT,
        sop_uid TEXT,
        job_id INTEGER,
        message TEXT NOT NULL
    );
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        study_uid TEXT NOT NULL,
        destination TEXT NOT NULL,
        sop_uid TEXT NOT NULL,
        path TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        last_error TEXT,
        created_at REAL NOT NULL,
        sent_at REAL,
        UNIQUE (destination, sop_uid)
    );
    CREATE INDEX outbox_due ON outbox(state, next_attempt_at);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

#: Study states after which a CT instance is a *late arrival*.
AFTER_RECEIVING = ("complete", "processing", "sending", "done", "not_processed", "failed")


@dataclass(frozen=True)
class InstanceRecord:
    """What the receiver tells the state about one spooled instance (header only, no pixels)."""

    study_uid: str
    sop_uid: str
    series_uid: str
    sop_class_uid: str
    modality: str
    transfer_syntax: str
    patient_id: str
    issuer: str
    triggers: bool
    own_output: bool
    path: str
    size: int
    sha256: str
    calling_ae: str


@dataclass(frozen=True)
class RecordResult:
    """``status``: new | duplicate (identical bytes, nothing changed) | replaced | conflict."""

    status: str
    study_state: str
    message: str = ""


@dataclass(frozen=True)
class Job:
    id: int
    study_uid: str
    generation: int
    attempts: int


@dataclass(frozen=True)
class OutboxItem:
    id: int
    job_id: int
    study_uid: str
    destination: str
    sop_uid: str
    path: str
    attempts: int


class StateError(RuntimeError):
    """A state change that the current state does not allow."""


class State:
    """All reads and writes of the node's database (thread-safe: one connection, one lock)."""

    def __init__(self, path: Path, *, clock: Any = time.time) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            str(self.path), isolation_level=None, check_same_thread=False, timeout=30
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.execute("PRAGMA busy_timeout=30000")
        self._migrate()

    # ------------------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One state change: BEGIN IMMEDIATE … COMMIT (rolled back on any exception)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self.commit()

    def commit(self) -> None:
        """COMMIT (a method of its own so tests can spy on it or make it fail)."""
        self._conn.execute("COMMIT")

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._conn.execute(sql, params))

    def _migrate(self) -> None:
        with self._lock:
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StateError(
                    f"{self.path}: schema version {version} is newer than this node ({SCHEMA_VERSION})"
                )
            for n in range(version, SCHEMA_VERSION):
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _statements(MIGRATIONS[n]):
                        self._conn.execute(statement)
                    self._conn.execute(f"PRAGMA user_version={n + 1}")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
                logger.info("state database migrated to schema version %d", n + 1)

    # ------------------------------------------------------------------------------------------
    # Receiving
    # ------------------------------------------------------------------------------------------
    def instance(self, sop_uid: str) -> sqlite3.Row | None:
        rows = self.query("SELECT * FROM instances WHERE sop_uid=?", (sop_uid,))
        return rows[0] if rows else None

    def record_instance(
        self, rec: InstanceRecord, *, late_policy: str = "reprocess", now: float | None = None
    ) -> RecordResult:
        """Record one durably spooled instance and its effect on the study, in one transaction."""
        now = self.clock() if now is None else now
        with self.transaction() as db:
            old = db.execute(
                "SELECT study_uid, sha256 FROM instances WHERE sop_uid=?", (rec.sop_uid,)
            ).fetchone()
            if old is not None and old["study_uid"] != rec.study_uid:
                msg = f"SOP Instance {rec.sop_uid} already belongs to study {old['study_uid']}"
                self._error(db, "duplicate-conflict", msg, rec.study_uid, rec.sop_uid, now=now)
                return RecordResult("conflict", "", msg)
            study = db.execute("SELECT * FROM studies WHERE study_uid=?", (rec.study_uid,)).fetchone()
            if old is not None and old["sha256"] == rec.sha256:
                db.execute("UPDATE instances SET duplicates=duplicates+1 WHERE sop_uid=?", (rec.sop_uid,))
                return RecordResult("duplicate", study["state"] if study else "")
            status = "replaced" if old is not None else "new"
            if study is None:
                db.execute(
                    "INSERT INTO studies (study_uid, patient_id, issuer, state, calling_ae, first_received,"
                    " last_received, updated_at) VALUES (?,?,?,?,?,?,?,?)",
                    (rec.study_uid, rec.patient_id, rec.issuer, "receiving", rec.calling_ae, now, now, now),
                )
                study = db.execute("SELECT * FROM studies WHERE study_uid=?", (rec.study_uid,)).fetchone()
            db.execute(
                "INSERT INTO instances (sop_uid, study_uid, series_uid, sop_class_uid, modality, transfer_syntax,"
                " patient_id, issuer, triggers, own_output, path, size, sha256, calling_ae, received_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(sop_uid) DO UPDATE SET"
                " series_uid=excluded.series_uid, sop_class_uid=excluded.sop_class_uid, modality=excluded.modality,"
                " transfer_syntax=excluded.transfer_syntax, patient_id=excluded.patient_id, issuer=excluded.issuer,"
                " triggers=excluded.triggers, own_output=excluded.own_output, path=excluded.path, size=excluded.size,"
                " sha256=excluded.sha256, calling_ae=excluded.calling_ae, received_at=excluded.received_at,"
                " duplicates=instances.duplicates+1",
                (
                    rec.sop_uid, rec.study_uid, rec.series_uid, rec.sop_class_uid, rec.modality, rec.transfer_syntax,
                    rec.patient_id, rec.issuer, int(rec.triggers), int(rec.own_output), rec.path, rec.size,
                    rec.sha256, rec.calling_ae, now,
                ),
            )  # fmt: skip
            counts = db.execute(
                "SELECT COUNT(*) AS n, COALESCE(SUM(triggers),0) AS t FROM instances WHERE study_uid=?",
                (rec.study_uid,),
            ).fetchone()
            state = study["state"]
            if state != "quarantined" and (study["patient_id"], study["issuer"]) != (
                rec.patient_id,
                rec.issuer,
            ):
                msg = (
                    f"study {rec.study_uid} quarantined: instance {rec.sop_uid} has a different PatientID/issuer "
                    "than earlier instances of the same study (identities are not logged)"
                )
                logger.error("%s", msg)
                self._error(db, "quarantine", msg, rec.study_uid, rec.sop_uid, now=now)
                db.execute(
                    "UPDATE jobs SET state='superseded' WHERE study_uid=? AND state='queued'",
                    (rec.study_uid,),
                )
                state = "quarantined"
                db.execute("UPDATE studies SET error=? WHERE study_uid=?", (msg, rec.study_uid))
            elif rec.triggers and state in (*AFTER_RECEIVING, "stored"):
                if state == "stored":
                    state = "receiving"
                elif late_policy == "reprocess":
                    logger.warning(
                        "late arrival %s for study %s (state %s): policy reprocess, study back to receiving",
                        rec.sop_uid, rec.study_uid, state,
                    )  # fmt: skip
                    db.execute(
                        "UPDATE jobs SET state='superseded' WHERE study_uid=? AND state='queued'",
                        (rec.study_uid,),
                    )
                    db.execute(
                        "UPDATE studies SET generation=generation+1 WHERE study_uid=?", (rec.study_uid,)
                    )
                    state = "receiving"
                else:
                    logger.warning(
                        "late arrival %s for study %s (state %s): policy ignore, stored only",
                        rec.sop_uid, rec.study_uid, state,
                    )  # fmt: skip
            bump = state == "receiving"
            db.execute(
                "UPDATE studies SET state=?, instance_count=?, trigger_count=?, updated_at=?"
                + (", last_received=?" if bump else "")
                + " WHERE study_uid=?",
                (state, counts["n"], counts["t"], now, *((now,) if bump else ()), rec.study_uid),
            )
            return RecordResult(status, state)

    def add_error(
        self,
        kind: str,
        message: str,
        study_uid: str | None = None,
        sop_uid: str | None = None,
        job_id: int | None = None,
    ) -> None:
        with self.transaction() as db:
            self._error(db, kind, message, study_uid, sop_uid, job_id)

    def _error(self, db: sqlite3.Connection, kind: str, message: str, study_uid: str | None = None,
               sop_uid: str | None = None, job_id: int | None = None, *, now: float | None = None) -> None:  # fmt: skip
        db.execute(
            "INSERT INTO errors (at, kind, study_uid, sop_uid, job_id, message) VALUES (?,?,?,?,?,?)",
            (self.clock() if now is None else now, kind, study_uid, sop_uid, job_id, message[:4000]),
        )

    # ------------------------------------------------------------------------------------------
    # Completion and jobs
    # ------------------------------------------------------------------------------------------
    def complete_quiet_studies(self, quiet_period_s: float, *, now: float | None = None) -> list[int]:
        """Studies quiet for ``quiet_period_s``: CT-bearing ones get a job, the others are ``stored``."""
        now = self.clock() if now is None else now
        jobs: list[int] = []
        due = "SELECT 1 FROM studies WHERE state='receiving' AND last_received<=? LIMIT 1"
        if not self.query(due, (now - quiet_period_s,)):
            return jobs  # the common case: no write transaction, no fsync, no lock held for the receiver
        with self.transaction() as db:
            rows = db.execute(
                "SELECT study_uid, generation, trigger_count FROM studies WHERE state='receiving' AND last_received<=?",
                (now - quiet_period_s,),
            ).fetchall()
            for r in rows:
                if r["trigger_count"] == 0:
                    db.execute(
                        "UPDATE studies SET state='stored', updated_at=? WHERE study_uid=?",
                        (now, r["study_uid"]),
                    )
                    continue
                jobs.append(_queue_job(db, r["study_uid"], r["generation"], now))
        for uid, job in zip((r["study_uid"] for r in rows if r["trigger_count"]), jobs, strict=True):
            logger.info("study %s complete after %.1f s quiet: job %d queued", uid, quiet_period_s, job)
        return jobs

    def claim_job(self, *, now: float | None = None) -> Job | None:
        """The oldest queued job, now ``running`` (its study ``processing``), with an attempt row."""
        now = self.clock() if now is None else now
        with self.transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE state='queued' ORDER BY id LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state='running', attempts=attempts+1, started_at=? WHERE id=?",
                (now, row["id"]),
            )
            db.execute(
                "UPDATE studies SET state='processing', updated_at=? WHERE study_uid=? AND generation=? AND state='complete'",
                (now, row["study_uid"], row["generation"]),
            )
            db.execute(
                "INSERT INTO attempts (job_id, kind, started_at) VALUES (?,?,?)", (row["id"], "process", now)
            )
            return Job(row["id"], row["study_uid"], row["generation"], row["attempts"] + 1)

    def _study_current(self, db: sqlite3.Connection, job: Job) -> bool:
        s = db.execute("SELECT generation, state FROM studies WHERE study_uid=?", (job.study_uid,)).fetchone()
        return s is not None and s["generation"] == job.generation and s["state"] == "processing"

    def _close_attempt(self, db: sqlite3.Connection, job_id: int, ok: bool, detail: str, now: float) -> None:
        db.execute(
            "UPDATE attempts SET finished_at=?, ok=?, detail=? WHERE id=(SELECT MAX(id) FROM attempts WHERE job_id=?)",
            (now, int(ok), detail[:4000], job_id),
        )

    def finish_job(
        self,
        job: Job,
        outcome: str,
        reason: str,
        output_dir: str,
        outputs: list[tuple[str, str]],
        destinations: list[str],
        *,
        now: float | None = None,
    ) -> str:
        """Record a finished pipeline run and queue its outputs ``(sop_uid, path)`` for every destination.

        Returns the job's final state (``done``, ``not_processed``, ``failed`` or ``superseded`` when a
        late arrival or a quarantine overtook the run)."""
        now = self.clock() if now is None else now
        with self.transaction() as db:
            self._close_attempt(db, job.id, outcome != "failed", f"{outcome}: {reason}", now)
            if not self._study_current(db, job):
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
            study_state = {"processed": "sending" if outputs and destinations else "done"}.get(
                outcome, outcome
            )
            if outcome == "failed":
                self._error(db, "job", reason, job.study_uid, job_id=job.id, now=now)
            if outcome == "processed":
                self._queue_outputs(db, job.id, job.study_uid, outputs, destinations, now=now)
            db.execute(
                "UPDATE studies SET state=?, updated_at=?, error=? WHERE study_uid=?",
                (study_state, now, reason if outcome == "failed" else None, job.study_uid),
            )
            return state

    def fail_attempt(self, job: Job, reason: str, *, max_attempts: int, now: float | None = None) -> str:
        """A run that raised: requeue until ``max_attempts``, then ``failed`` (kept, visible)."""
        now = self.clock() if now is None else now
        with self.transaction() as db:
            self._close_attempt(db, job.id, False, reason, now)
            self._error(db, "job", reason, job.study_uid, job_id=job.id, now=now)
            if not self._study_current(db, job):
                db.execute("UPDATE jobs SET state='superseded', finished_at=? WHERE id=?", (now, job.id))
                return "superseded"
            if job.attempts < max_attempts:
                db.execute("UPDATE jobs SET state='queued' WHERE id=?", (job.id,))
                db.execute(
                    "UPDATE studies SET state='complete', updated_at=? WHERE study_uid=?",
                    (now, job.study_uid),
                )
                return "queued"
            db.execute(
                "UPDATE jobs SET state='failed', finished_at=?, reason=? WHERE id=?", (now, reason, job.id)
            )
            db.execute(
                "UPDATE studies SET state='failed', error=?, updated_at=? WHERE study_uid=?",
                (reason, now, job.study_uid),
            )
            return "failed"

    def requeue_interrupted(self, *, now: float | None = None) -> int:
        """At start-up: runs that a crash or shutdown interrupted go back to the queue."""
        now = self.clock() if now is None else now
        with self.transaction() as db:
            rows = db.execute("SELECT id, study_uid, generation FROM jobs WHERE state='running'").fetchall()
            for r in rows:
                self._close_attempt(db, r["id"], False, "interrupted (restart)", now)
                db.execute("UPDATE jobs SET state='queued' WHERE id=?", (r["id"],))
                db.execute(
                    "UPDATE studies SET state='complete', updated_at=? WHERE study_uid=? AND generation=? AND state='processing'",
                    (now, r["study_uid"], r["generation"]),
                )
        return len(rows)

    def retry_job(self, job_id: int, *, now: float | None = None) -> str:
        """Operator retry: a failed/not-processed job runs again; failed sends are re-queued."""
        now = self.clock() if now is None else now
        with self.transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise StateError(f"no job {job_id}")
            failed_sends = db.execute(
                "UPDATE outbox SET state='pending', attempts=0, next_attempt_at=? WHERE job_id=? AND state='failed'",
                (now, job_id),
            ).rowcount
            if failed_sends:
                db.execute(
                    "UPDATE studies SET state='sending', updated_at=? WHERE study_uid=?",
                    (now, row["study_uid"]),
                )
                return f"{failed_sends} send(s) re-queued"
            if row["state"] not in ("failed", "not_processed", "superseded", "done"):
                raise StateError(f"job {job_id} is {row['state']}; only finished jobs can be retried")
            study = db.execute("SELECT * FROM studies WHERE study_uid=?", (row["study_uid"],)).fetchone()
            if study["state"] in ("receiving", "complete", "processing"):
                raise StateError(f"study {row['study_uid']} is {study['state']}; it will be processed anyway")
            return (
                f"job {_queue_job(db, row['study_uid'], study['generation'], now, clear_error=True)} queued"
            )

    # ------------------------------------------------------------------------------------------
    # Outbox
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _queue_outputs(db: sqlite3.Connection, job_id: int, study_uid: str, outputs: list[tuple[str, str]],
                       destinations: list[str], *, now: float, keep_sent: bool = False) -> None:  # fmt: skip
        """One outbox row per (destination, output SOP Instance UID): a new row is ``pending``; an
        existing one (a reprocess: same deterministic UIDs) is re-queued in place, never doubled —
        unless ``keep_sent`` and it was already delivered, then it stays ``sent``."""
        for sop_uid, path in outputs:
            for dest in destinations:
                db.execute(
                    "INSERT INTO outbox (job_id, study_uid, destination, sop_uid, path, state, next_attempt_at, created_at)"
                    " VALUES (?,?,?,?,?,'pending',?,?) ON CONFLICT(destination, sop_uid) DO UPDATE SET"
                    " job_id=excluded.job_id, path=excluded.path, state='pending', attempts=0,"
                    " next_attempt_at=excluded.next_attempt_at, last_error=NULL, sent_at=NULL"
                    " WHERE NOT (? AND outbox.state='sent')",
                    (job_id, study_uid, dest, sop_uid, path, now, now, int(keep_sent)),
                )

    def enqueue_results(
        self,
        study_uid: str,
        outputs: list[tuple[str, str]],
        destinations: list[str],
        *,
        output_dir: str = "",
        reason: str = "",
        resend: bool = False,
        now: float | None = None,
    ) -> int:
        """Queue a study's result objects ``(sop_uid, path relative to the data folder)`` for every
        destination, outside the node's receive → job flow (``hyperct process --send-to``).

        One transaction records a finished job (so ``hyperct jobs`` / ``hyperct status`` show it like
        a node job), the study (``sending`` until its rows are sent, then ``done``) and the outbox
        rows; the :class:`~app.node.outbox.Outbox` sends them with its retry policy. Calling it again
        for the same results is safe: pending and failed rows are re-queued in place, and rows
        already delivered stay ``sent`` unless ``resend``. Returns the job id."""
        now = self.clock() if now is None else now
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM studies WHERE study_uid=?", (study_uid,)).fetchone() is None:
                db.execute(
                    "INSERT INTO studies (study_uid, state, first_received, last_received, updated_at)"
                    " VALUES (?,?,?,?,?)",
                    (study_uid, "sending", now, now, now),
                )
            cur = db.execute(
                "INSERT INTO jobs (study_uid, generation, state, attempts, created_at, started_at, finished_at,"
                " outcome, reason, output_dir) SELECT study_uid, generation, 'done', 1, ?, ?, ?, 'processed', ?, ?"
                " FROM studies WHERE study_uid=?",
                (now, now, now, reason, output_dir, study_uid),
            )
            job_id = int(cur.lastrowid)
            self._queue_outputs(db, job_id, study_uid, outputs, destinations, now=now, keep_sent=not resend)
            self._settle_study(db, study_uid, now)
            return job_id

    @staticmethod
    def _settle_study(db: sqlite3.Connection, study_uid: str, now: float) -> None:
        left = db.execute(
            "SELECT COUNT(*) FROM outbox WHERE study_uid=? AND state!='sent'", (study_uid,)
        ).fetchone()[0]
        db.execute(
            "UPDATE studies SET state=?, error=NULL, updated_at=? WHERE study_uid=?",
            ("sending" if left else "done", now, study_uid),
        )

    def requeue_outbox(self, *, include_failed: bool = True, now: float | None = None) -> int:
        """Make every pending row due now and (``include_failed``) give failed rows a fresh set of
        attempts: what a rerun of ``hyperct process --send-to`` does first. Returns the rows due."""
        now = self.clock() if now is None else now
        with self.transaction() as db:
            if include_failed:
                uids = [
                    r[0] for r in db.execute("SELECT DISTINCT study_uid FROM outbox WHERE state='failed'")
                ]
                db.execute(
                    "UPDATE outbox SET state='pending', attempts=0, last_error=NULL WHERE state='failed'"
                )
                for uid in uids:
                    self._settle_study(db, uid, now)
            return db.execute("UPDATE outbox SET next_attempt_at=? WHERE state='pending'", (now,)).rowcount

    def outbox_counts(self) -> dict[str, int]:
        """Outbox rows by state (``pending``, ``sent``, ``failed``)."""
        return {r[0]: int(r[1]) for r in self.query("SELECT state, COUNT(*) FROM outbox GROUP BY state")}

    def outbox_rows(self) -> list[dict[str, Any]]:
        """Every outbox row, oldest first (the batch run's ``sends.csv``)."""
        return [dict(r) for r in self.query("SELECT * FROM outbox ORDER BY study_uid, destination, id")]

    def next_outbox_due(self) -> float | None:
        """When the earliest pending row is due (None when nothing is pending)."""
        row = self.query("SELECT MIN(next_attempt_at) FROM outbox WHERE state='pending'")[0]
        return None if row[0] is None else float(row[0])

    def due_outbox(self, *, now: float | None = None, limit: int = 100) -> list[OutboxItem]:
        now = self.clock() if now is None else now
        rows = self.query(
            "SELECT * FROM outbox WHERE state='pending' AND next_attempt_at<=? ORDER BY destination, id LIMIT ?",
            (now, limit),
        )
        return [
            OutboxItem(
                r["id"], r["job_id"], r["study_uid"], r["destination"], r["sop_uid"], r["path"], r["attempts"]
            )
            for r in rows
        ]

    def outbox_result(self, item: OutboxItem, ok: bool, detail: str, *, next_attempt_at: float | None,
                      now: float | None = None) -> str:  # fmt: skip
        """Record one send attempt: ``sent``, ``pending`` (retry at ``next_attempt_at``) or ``failed``.
        When the last item of a study is sent the study becomes ``done``."""
        now = self.clock() if now is None else now
        with self.transaction() as db:
            db.execute(
                "INSERT INTO attempts (outbox_id, job_id, kind, started_at, finished_at, ok, detail) VALUES (?,?,?,?,?,?,?)",
                (item.id, item.job_id, "send", now, now, int(ok), detail[:4000]),
            )
            if ok:
                state = "sent"
                db.execute(
                    "UPDATE outbox SET state='sent', attempts=attempts+1, sent_at=?, last_error=NULL WHERE id=?",
                    (now, item.id),
                )
            elif next_attempt_at is not None:
                state = "pending"
                db.execute(
                    "UPDATE outbox SET attempts=attempts+1, next_attempt_at=?, last_error=? WHERE id=?",
                    (next_attempt_at, detail[:4000], item.id),
                )
            else:
                state = "failed"
                db.execute(
                    "UPDATE outbox SET state='failed', attempts=attempts+1, last_error=? WHERE id=?",
                    (detail[:4000], item.id),
                )
                self._error(
                    db,
                    "send",
                    f"{item.destination}: {detail}",
                    item.study_uid,
                    item.sop_uid,
                    item.job_id,
                    now=now,
                )
            left = db.execute(
                "SELECT COUNT(*) FROM outbox WHERE study_uid=? AND state!='sent'", (item.study_uid,)
            ).fetchone()[0]
            failed = db.execute(
                "SELECT COUNT(*) FROM outbox WHERE study_uid=? AND state='failed'", (item.study_uid,)
            ).fetchone()[0]
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
            return state

    # ------------------------------------------------------------------------------------------
    # Reading (CLI, health)
    # ------------------------------------------------------------------------------------------
    def counts(self) -> dict[str, Any]:
        """Queue depth and totals for ``hyperct status`` and the metrics endpoint."""
        studies = {r[0]: r[1] for r in self.query("SELECT state, COUNT(*) FROM studies GROUP BY state")}
        jobs = {r[0]: r[1] for r in self.query("SELECT state, COUNT(*) FROM jobs GROUP BY state")}
        outbox = {r[0]: r[1] for r in self.query("SELECT state, COUNT(*) FROM outbox GROUP BY state")}
        instances = self.query("SELECT COUNT(*), COALESCE(SUM(duplicates),0) FROM instances")[0]
        latency = self.query(
            "SELECT COUNT(*), COALESCE(SUM(finished_at-started_at),0) FROM jobs WHERE finished_at IS NOT NULL AND started_at IS NOT NULL"
        )[0]
        errors = self.query("SELECT COUNT(*) FROM errors")[0][0]
        return {
            "studies": studies,
            "jobs": jobs,
            "outbox": outbox,
            "instances": int(instances[0]),
            "duplicates": int(instances[1]),
            "processing_count": int(latency[0]),
            "processing_seconds": float(latency[1]),
            "errors": int(errors),
        }

    def last_errors(self, n: int = 10) -> list[dict[str, Any]]:
        return [dict(r) for r in self.query("SELECT * FROM errors ORDER BY id DESC LIMIT ?", (n,))]

    def jobs(self, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        sql = "SELECT * FROM jobs" + (" WHERE state=?" if state else "") + " ORDER BY id DESC LIMIT ?"
        return [dict(r) for r in self.query(sql, (state, limit) if state else (limit,))]

    def job_details(self, job_id: int) -> dict[str, Any]:
        rows = self.query("SELECT * FROM jobs WHERE id=?", (job_id,))
        if not rows:
            raise StateError(f"no job {job_id}")
        job = dict(rows[0])
        job["study"] = dict(self.query("SELECT * FROM studies WHERE study_uid=?", (job["study_uid"],))[0])
        job["attempts_log"] = [
            dict(r) for r in self.query("SELECT * FROM attempts WHERE job_id=? ORDER BY id", (job_id,))
        ]
        job["outbox"] = [
            dict(r) for r in self.query("SELECT * FROM outbox WHERE job_id=? ORDER BY id", (job_id,))
        ]
        job["errors"] = [
            dict(r) for r in self.query("SELECT * FROM errors WHERE job_id=? ORDER BY id", (job_id,))
        ]
        return job

    def studies(self, state: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM studies" + (" WHERE state=?" if state else "") + " ORDER BY first_received"
        return [dict(r) for r in self.query(sql, (state,) if state else ())]

    def purge(self, *, older_than_s: float, states: tuple[str, ...] = ("done", "not_processed", "failed", "superseded"),
              now: float | None = None) -> list[str]:  # fmt: skip
        """Forget finished studies last updated more than ``older_than_s`` ago; returns their UIDs
        (the caller removes their spool and result folders)."""
        now = self.clock() if now is None else now
        marks = ",".join("?" * len(states))
        with self.transaction() as db:
            uids = [
                r[0]
                for r in db.execute(
                    f"SELECT study_uid FROM studies WHERE state IN ({marks}) AND updated_at<=?",
                    (*states, now - older_than_s),
                )
            ]
            for uid in uids:
                job_ids = [r[0] for r in db.execute("SELECT id FROM jobs WHERE study_uid=?", (uid,))]
                for jid in job_ids:
                    db.execute("DELETE FROM attempts WHERE job_id=?", (jid,))
                db.execute("DELETE FROM outbox WHERE study_uid=?", (uid,))
                db.execute("DELETE FROM jobs WHERE study_uid=?", (uid,))
                db.execute("DELETE FROM instances WHERE study_uid=?", (uid,))
                db.execute("DELETE FROM studies WHERE study_uid=?", (uid,))
        return uids


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)


def _queue_job(
    db: sqlite3.Connection, study_uid: str, generation: int, now: float, *, clear_error: bool = False
) -> int:
    """Mark the study complete and queue a job for its current generation (inside the caller's transaction)."""
    db.execute(
        "UPDATE studies SET state='complete'"
        + (", error=NULL" if clear_error else "")
        + ", updated_at=? WHERE study_uid=?",
        (now, study_uid),
    )
    cur = db.execute(
        "INSERT INTO jobs (study_uid, generation, state, created_at) VALUES (?,?,?,?)",
        (study_uid, generation, "queued", now),
    )
    return int(cur.lastrowid)
