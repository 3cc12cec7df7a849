"""The node's history: errors (anything that went wrong, with the UIDs it concerns) and attempts
(each run of a job and each send of an outbox row). Written inside the transaction of the change
it explains, read by ``hyperct status`` / ``hyperct jobs show`` and the metrics."""

from __future__ import annotations

import sqlite3
from typing import Any

from app.node.store.db import Database

_DETAIL = 4000  # characters kept of a message


class Journal:
    """The ``errors`` and ``attempts`` tables."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- errors ----------------------------------------------------------------------------------
    def error(self, db: sqlite3.Connection, kind: str, message: str, study_uid: str | None = None,
              sop_uid: str | None = None, job_id: int | None = None, *, now: float | None = None) -> None:  # fmt: skip
        """An error row inside the caller's transaction."""
        db.execute(
            "INSERT INTO errors (at, kind, study_uid, sop_uid, job_id, message) VALUES (?,?,?,?,?,?)",
            (self.db.clock() if now is None else now, kind, study_uid, sop_uid, job_id, message[:_DETAIL]),
        )

    def add_error(self, kind: str, message: str, study_uid: str | None = None, sop_uid: str | None = None,
                  job_id: int | None = None) -> None:  # fmt: skip
        """An error row in a transaction of its own."""
        with self.db.transaction() as db:
            self.error(db, kind, message, study_uid, sop_uid, job_id)

    def last_errors(self, n: int = 10) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.query("SELECT * FROM errors ORDER BY id DESC LIMIT ?", (n,))]

    def error_count(self) -> int:
        return int(self.db.query("SELECT COUNT(*) FROM errors")[0][0])

    # -- attempts --------------------------------------------------------------------------------
    @staticmethod
    def start_run(db: sqlite3.Connection, job_id: int, now: float) -> None:
        db.execute("INSERT INTO attempts (job_id, kind, started_at) VALUES (?,?,?)", (job_id, "process", now))

    @staticmethod
    def close_run(db: sqlite3.Connection, job_id: int, ok: bool, detail: str, now: float) -> None:
        """Close the job's latest attempt."""
        db.execute(
            "UPDATE attempts SET finished_at=?, ok=?, detail=? WHERE id=(SELECT MAX(id) FROM attempts WHERE job_id=?)",
            (now, int(ok), detail[:_DETAIL], job_id),
        )

    @staticmethod
    def send(db: sqlite3.Connection, outbox_id: int, job_id: int | None, ok: bool, detail: str, now: float) -> None:
        db.execute(
            "INSERT INTO attempts (outbox_id, job_id, kind, started_at, finished_at, ok, detail) VALUES (?,?,?,?,?,?,?)",
            (outbox_id, job_id, "send", now, now, int(ok), detail[:_DETAIL]),
        )

    # -- per job, and forgetting -----------------------------------------------------------------
    def for_job(self, job_id: int) -> dict[str, list[dict[str, Any]]]:
        return {
            "attempts_log": [dict(r) for r in self.db.query("SELECT * FROM attempts WHERE job_id=? ORDER BY id", (job_id,))],
            "errors": [dict(r) for r in self.db.query("SELECT * FROM errors WHERE job_id=? ORDER BY id", (job_id,))],
        }  # fmt: skip

    @staticmethod
    def forget_jobs(db: sqlite3.Connection, job_ids: list[int]) -> None:
        for job_id in job_ids:
            db.execute("DELETE FROM attempts WHERE job_id=?", (job_id,))
