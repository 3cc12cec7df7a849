"""The node's state in SQLite, split by responsibility, with all of its SQL.

* :mod:`~app.node.store.db` — one connection, one lock, transactions (re-entrant, so a change
  that spans stores is still one transaction), group commit, versioned schemas;
* :mod:`~app.node.store.studies` — received instances and their studies, study completion;
* :mod:`~app.node.store.jobs` — pipeline runs and the study states that go with them;
* :mod:`~app.node.store.outbox` — result objects to send; also the stand-alone outbox of
  ``hyperct process --send-to`` (its own small file, :meth:`OutboxStore.open`);
* :mod:`~app.node.store.journal` — errors and attempts.

:class:`NodeStore` opens the node's database and wires them; it adds only what spans all of them
(counts for ``hyperct status`` and the metrics, purge). Nothing outside this package writes SQL.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.node.store.db import Database, Schema, StateError
from app.node.store.jobs import Job, JobStore, StudyDelivery
from app.node.store.journal import Journal
from app.node.store.outbox import OutboxItem, OutboxStore
from app.node.store.studies import AFTER_RECEIVING, InstanceRecord, RecordResult, StudyStore

__all__ = [
    "AFTER_RECEIVING", "Database", "InstanceRecord", "Job", "JobStore", "Journal", "NODE_SCHEMA", "NodeStore",
    "OutboxItem", "OutboxStore", "RecordResult", "StateError", "StudyStore",
]  # fmt: skip

#: The node database ("HCTN"; files written before kinds were marked have application_id 0).
NODE_SCHEMA = Schema(
    name="node state",
    application_id=0x4843544E,
    legacy_ids=(0,),
    migrations=(
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
    ),
)


class NodeStore:
    """The node's database and its stores: ``studies``, ``jobs``, ``outbox``, ``journal``."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time, db: Database | None = None) -> None:
        self.db = db or Database(path, NODE_SCHEMA, clock=clock)
        self.journal = Journal(self.db)
        self.outbox = OutboxStore(self.db, StudyDelivery(self.journal))
        self.jobs = JobStore(self.db, self.journal, self.outbox)
        self.studies = StudyStore(self.db, self.journal, self.jobs)

    def close(self) -> None:
        self.db.close()

    def counts(self) -> dict[str, Any]:
        """Queue depth and totals for ``hyperct status`` and the metrics endpoint."""
        return {
            **self.studies.counts(),
            **self.jobs.counts(),
            "outbox": self.outbox.counts(),
            "errors": self.journal.error_count(),
        }

    def fingerprint(self) -> tuple[Any, ...]:
        """A value that changes whenever anything the console shows changes (a study updated, a job
        or error added or moved on, a send attempted): the console polls this, not the pages."""
        row = self.db.query(
            "SELECT (SELECT COUNT(*) || ':' || COALESCE(MAX(updated_at), 0) FROM studies),"
            " (SELECT COUNT(*) || ':' || COALESCE(MAX(id), 0) || ':' || COALESCE(SUM(attempts), 0)"
            "  || ':' || COALESCE(SUM(state='running'), 0) || ':' || COALESCE(MAX(finished_at), 0) FROM jobs),"
            " (SELECT COUNT(*) || ':' || COALESCE(SUM(attempts), 0) || ':' || COALESCE(SUM(state='sent'), 0)"
            "  || ':' || COALESCE(SUM(state='failed'), 0) FROM outbox),"
            " (SELECT COALESCE(MAX(id), 0) FROM errors)"
        )[0]
        return tuple(row)

    def purge(self, *, older_than_s: float, states: tuple[str, ...] = ("done", "not-processed", "failed", "superseded"),
              now: float | None = None) -> dict[str, list[int]]:  # fmt: skip
        """Forget finished studies last updated more than ``older_than_s`` ago, in one transaction.
        Returns ``{study_uid: [job ids]}`` (the caller removes their spool and result folders)."""
        now = self.db.clock() if now is None else now
        forgotten: dict[str, list[int]] = {}
        with self.db.transaction() as db:
            for uid in self.studies.finished_before(db, states, now - older_than_s):
                forgotten[uid] = self.jobs.ids(db, uid)
                self.journal.forget_jobs(db, forgotten[uid])  # attempts point at jobs and outbox rows
                self.outbox.forget(db, uid)  # outbox rows point at jobs
                self.jobs.forget(db, uid)
                self.studies.forget(db, uid)
        return forgotten
