"""The outbox table: one row per (destination, result SOP Instance UID), ``pending → sent | failed``.

Two homes, one class. In the node the table lives in the node database, next to the jobs that
queue it (a finished job and its rows are one transaction) and a :class:`DeliveryListener` keeps
the study's state and the attempt log in step with every send. ``hyperct process --send-to`` has no
studies, jobs or instances: it opens an outbox of its own (:meth:`OutboxStore.open`, a small file
with only this table) and reads a study's delivery state from its rows (:meth:`study_states`).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from app.node.store.db import Database, Schema

logger = logging.getLogger(__name__)

#: The outbox of ``hyperct process --send-to``: this table alone (``job_id`` is empty there).
OUTBOX_SCHEMA = Schema(
    name="outbox",
    application_id=0x4843544F,  # "HCTO"
    migrations=(
        """
        CREATE TABLE outbox (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id INTEGER,
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
_COLUMNS = "job_id, study_uid, destination, sop_uid, path, state, attempts, next_attempt_at, last_error, created_at, sent_at"
_DETAIL = 4000


@dataclass(frozen=True)
class OutboxItem:
    id: int
    job_id: int | None
    study_uid: str
    destination: str
    sop_uid: str
    path: str
    attempts: int


class DeliveryListener(Protocol):
    """Told about every recorded send, inside its transaction (the node: attempt log, study state)."""

    def delivery_recorded(self, db: sqlite3.Connection, item: OutboxItem, state: str, detail: str,
                          left: int, failed: int, now: float) -> None: ...  # fmt: skip


class OutboxStore:
    """Reads and writes of the ``outbox`` table."""

    def __init__(self, db: Database, listener: DeliveryListener | None = None) -> None:
        self.db = db
        self.listener = listener

    @classmethod
    def open(cls, path: Path, *, legacy: Path | None = None, clock: Callable[[], float] = time.time) -> OutboxStore:
        """A stand-alone outbox file. ``legacy``: a node-schema database whose outbox rows are moved
        into this one (earlier batch runs kept their outbox there); it is renamed ``*.migrated``
        afterwards so it is never read again (rows already here are kept: moving twice is harmless)."""
        store = cls(Database(path, OUTBOX_SCHEMA, clock=clock))
        if legacy is not None and legacy.exists():
            store._adopt(legacy)
        return store

    def _adopt(self, legacy: Path) -> None:
        self.db.query("ATTACH DATABASE ? AS legacy", (str(legacy),))  # not allowed inside a transaction
        try:
            with self.db.transaction() as db:
                db.execute(
                    f"INSERT OR IGNORE INTO outbox ({_COLUMNS}) SELECT NULL, study_uid, destination, sop_uid, path, state, "
                    "attempts, next_attempt_at, last_error, created_at, sent_at FROM legacy.outbox ORDER BY id"
                )
                n = db.execute("SELECT changes()").fetchone()[0]
        finally:
            self.db.query("DETACH DATABASE legacy")
        for suffix in ("", "-wal", "-shm"):
            old = Path(f"{legacy}{suffix}")
            if old.exists():
                old.rename(f"{legacy}.migrated{suffix}")
        logger.info("outbox: %d row(s) moved from %s into %s", n, legacy.name, self.db.path.name)

    def close(self) -> None:
        self.db.close()

    # -- queueing --------------------------------------------------------------------------------
    @staticmethod
    def queue(db: sqlite3.Connection, job_id: int | None, study_uid: str, outputs: list[tuple[str, str]],
              destinations: list[str], *, now: float, keep_sent: bool = False) -> None:  # fmt: skip
        """Inside the caller's transaction: one row per (destination, output SOP Instance UID). A new
        row is ``pending``; an existing one (a reprocess: same deterministic UIDs) is re-queued in
        place, never doubled — unless ``keep_sent`` and it was already delivered, then it stays ``sent``."""
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

    def enqueue(self, study_uid: str, outputs: list[tuple[str, str]], destinations: list[str], *,
                resend: bool = False, now: float | None = None) -> int:  # fmt: skip
        """Queue a study's result objects ``(sop_uid, path)`` for every destination in one transaction
        (``hyperct process --send-to``). Safe to repeat: pending and failed rows are re-queued in
        place; delivered rows stay ``sent`` unless ``resend``. Returns the rows queued or kept."""
        now = self.db.clock() if now is None else now
        with self.db.transaction() as db:
            self.queue(db, None, study_uid, outputs, destinations, now=now, keep_sent=not resend)
        return len(outputs) * len(destinations)

    def requeue(self, *, include_failed: bool = True, now: float | None = None) -> int:
        """Make every pending row due now and (``include_failed``) give failed rows a fresh set of
        attempts: what a rerun of ``hyperct process --send-to`` does first. Returns the rows due."""
        now = self.db.clock() if now is None else now
        with self.db.transaction() as db:
            if include_failed:
                db.execute("UPDATE outbox SET state='pending', attempts=0, last_error=NULL WHERE state='failed'")
            return int(db.execute("UPDATE outbox SET next_attempt_at=? WHERE state='pending'", (now,)).rowcount)

    @staticmethod
    def requeue_job(db: sqlite3.Connection, job_id: int, now: float) -> int:
        """Inside the caller's transaction: a job's failed rows get a fresh set of attempts, due now."""
        return int(db.execute(
            "UPDATE outbox SET state='pending', attempts=0, next_attempt_at=? WHERE job_id=? AND state='failed'",
            (now, job_id),
        ).rowcount)  # fmt: skip

    # -- sending ---------------------------------------------------------------------------------
    def due(self, *, now: float | None = None, limit: int = 100) -> list[OutboxItem]:
        now = self.db.clock() if now is None else now
        rows = self.db.query(
            "SELECT * FROM outbox WHERE state='pending' AND next_attempt_at<=? ORDER BY destination, id LIMIT ?",
            (now, limit),
        )
        return [
            OutboxItem(r["id"], r["job_id"], r["study_uid"], r["destination"], r["sop_uid"], r["path"], r["attempts"])
            for r in rows
        ]

    def next_due(self) -> float | None:
        """When the earliest pending row is due (None when nothing is pending)."""
        row = self.db.query("SELECT MIN(next_attempt_at) FROM outbox WHERE state='pending'")[0]
        return None if row[0] is None else float(row[0])

    def result(self, item: OutboxItem, ok: bool, detail: str, *, next_attempt_at: float | None,
               now: float | None = None) -> str:  # fmt: skip
        """Record one send attempt: ``sent``, ``pending`` (retry at ``next_attempt_at``) or ``failed``."""
        now = self.db.clock() if now is None else now
        with self.db.transaction() as db:
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
                    (next_attempt_at, detail[:_DETAIL], item.id),
                )
            else:
                state = "failed"
                db.execute(
                    "UPDATE outbox SET state='failed', attempts=attempts+1, last_error=? WHERE id=?",
                    (detail[:_DETAIL], item.id),
                )
            if self.listener is not None:
                left, failed = self.left(db, item.study_uid)
                self.listener.delivery_recorded(db, item, state, detail, left, failed, now)
            return state

    @staticmethod
    def left(db: sqlite3.Connection, study_uid: str) -> tuple[int, int]:
        """A study's rows not yet sent, and how many of those failed."""
        row = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(state='failed'),0) FROM outbox WHERE study_uid=? AND state!='sent'",
            (study_uid,),
        ).fetchone()
        return int(row[0]), int(row[1])

    # -- reading, forgetting ---------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Rows by state (``pending``, ``sent``, ``failed``)."""
        return {r[0]: int(r[1]) for r in self.db.query("SELECT state, COUNT(*) FROM outbox GROUP BY state")}

    def rows(self) -> list[dict[str, Any]]:
        """Every row, by study and destination (the batch run's ``sends.csv``)."""
        return [dict(r) for r in self.db.query("SELECT * FROM outbox ORDER BY study_uid, destination, id")]

    def recent(self, limit: int = 200, state: str | None = None) -> list[dict[str, Any]]:
        """The newest rows (of one state), newest first: the console's outbox."""
        sql = "SELECT * FROM outbox" + (" WHERE state=?" if state else "") + " ORDER BY id DESC LIMIT ?"
        return [dict(r) for r in self.db.query(sql, (state, limit) if state else (limit,))]

    def for_job(self, job_id: int) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.query("SELECT * FROM outbox WHERE job_id=? ORDER BY id", (job_id,))]

    def destinations(self) -> set[tuple[str, str]]:
        """``(study_uid, destination)`` pairs that have rows."""
        return {(r[0], r[1]) for r in self.db.query("SELECT DISTINCT study_uid, destination FROM outbox")}

    def study_states(self) -> dict[str, str]:
        """Each study's delivery: ``done`` (all sent), ``failed`` (all unsent rows failed) or ``sending``."""
        rows = self.db.query(
            "SELECT study_uid, COALESCE(SUM(state!='sent'),0), COALESCE(SUM(state='failed'),0) FROM outbox GROUP BY study_uid"
        )
        return {r[0]: "done" if not r[1] else "failed" if r[1] == r[2] else "sending" for r in rows}

    @staticmethod
    def forget(db: sqlite3.Connection, study_uid: str) -> None:
        db.execute("DELETE FROM outbox WHERE study_uid=?", (study_uid,))
