"""Received instances and their studies, and study completion.

Study states::

    receiving ──quiet period──▶ complete (job queued) ──▶ processing ──▶ sending ──▶ done
        │  only non-CT instances ─▶ stored             └▶ not-processed | failed
        └─ conflicting PatientID/issuer ─▶ quarantined (never processed)

A CT instance arriving after ``receiving`` follows the late-arrival policy: ``reprocess`` puts the
study back to ``receiving`` with a new *generation* (older jobs are superseded), ``ignore`` only logs.
Recording an instance goes through :meth:`Database.group`, so the handlers of concurrent
associations share one commit.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from typing import Any

from app.node.store.db import Database
from app.node.store.jobs import JobStore
from app.node.store.journal import Journal

logger = logging.getLogger(__name__)

#: Study states after which a CT instance is a *late arrival*.
AFTER_RECEIVING = ("complete", "processing", "sending", "done", "not-processed", "failed")


@dataclass(frozen=True)
class InstanceRecord:
    """One durably spooled instance (header only, no pixels) and where its file is."""

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


class StudyStore:
    """The ``studies`` and ``instances`` tables."""

    def __init__(self, db: Database, journal: Journal, jobs: JobStore) -> None:
        self.db = db
        self.journal = journal
        self.jobs = jobs

    # -- receiving -------------------------------------------------------------------------------
    def has_instance(self, sop_uid: str) -> bool:
        return bool(self.db.query("SELECT 1 FROM instances WHERE sop_uid=?", (sop_uid,)))

    def record(self, rec: InstanceRecord, *, late_policy: str = "reprocess", now: float | None = None) -> RecordResult:
        """Record one durably spooled instance and its effect on the study; returns once committed
        (in a group commit with concurrent callers)."""
        now = self.db.clock() if now is None else now
        return self.db.group(lambda db: self._record(db, rec, late_policy, now))

    def _record(self, db: sqlite3.Connection, rec: InstanceRecord, late_policy: str, now: float) -> RecordResult:
        old = db.execute("SELECT study_uid, sha256 FROM instances WHERE sop_uid=?", (rec.sop_uid,)).fetchone()
        if old is not None and old["study_uid"] != rec.study_uid:
            msg = f"SOP Instance {rec.sop_uid} already belongs to study {old['study_uid']}"
            self.journal.error(db, "duplicate-conflict", msg, rec.study_uid, rec.sop_uid, now=now)
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
        if status == "new":  # kept up to date here instead of counting the study's rows each time
            counts = (study["instance_count"] + 1, study["trigger_count"] + int(rec.triggers))
        else:
            counts = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(triggers),0) FROM instances WHERE study_uid=?", (rec.study_uid,)
            ).fetchone()
        state = study["state"]
        if state != "quarantined" and (study["patient_id"], study["issuer"]) != (rec.patient_id, rec.issuer):
            msg = (
                f"study {rec.study_uid} quarantined: instance {rec.sop_uid} has a different PatientID/issuer "
                "than earlier instances of the same study (identities are not logged)"
            )
            logger.error("%s", msg)
            self.journal.error(db, "quarantine", msg, rec.study_uid, rec.sop_uid, now=now)
            self.jobs.supersede_queued(db, rec.study_uid)
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
                self.jobs.supersede_queued(db, rec.study_uid)
                db.execute("UPDATE studies SET generation=generation+1 WHERE study_uid=?", (rec.study_uid,))
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
            (state, counts[0], counts[1], now, *((now,) if bump else ()), rec.study_uid),
        )
        return RecordResult(status, state)

    # -- completion ------------------------------------------------------------------------------
    def complete_quiet(self, quiet_period_s: float, *, now: float | None = None) -> list[int]:
        """Studies quiet for ``quiet_period_s``: CT-bearing ones get a job, the others are ``stored``.
        Returns the new job ids."""
        now = self.db.clock() if now is None else now
        jobs: list[int] = []
        due = "SELECT 1 FROM studies WHERE state='receiving' AND last_received<=? LIMIT 1"
        if not self.db.query(due, (now - quiet_period_s,)):
            return jobs  # the common case: no write transaction, no fsync, no lock held for the receiver
        with self.db.transaction() as db:
            rows = db.execute(
                "SELECT study_uid, generation, trigger_count FROM studies WHERE state='receiving' AND last_received<=?",
                (now - quiet_period_s,),
            ).fetchall()
            for r in rows:
                if r["trigger_count"] == 0:
                    db.execute("UPDATE studies SET state='stored', updated_at=? WHERE study_uid=?", (now, r["study_uid"]))
                    continue
                jobs.append(self.jobs.queue(db, r["study_uid"], r["generation"], now))
        for uid, job in zip((r["study_uid"] for r in rows if r["trigger_count"]), jobs, strict=True):
            logger.info("study %s complete after %.1f s quiet: job %d queued", uid, quiet_period_s, job)
        return jobs

    # -- reading ---------------------------------------------------------------------------------
    def rows(self, state: str | None = None, *, newest_first: bool = False, limit: int | None = None) -> list[dict[str, Any]]:
        """Studies, oldest first (the console: newest first, at most ``limit``)."""
        sql = "SELECT * FROM studies" + (" WHERE state=?" if state else "")
        sql += " ORDER BY first_received" + (" DESC" if newest_first else "") + (" LIMIT ?" if limit else "")
        params = ((state,) if state else ()) + ((limit,) if limit else ())
        return [dict(r) for r in self.db.query(sql, params)]

    def get(self, study_uid: str) -> dict[str, Any] | None:
        """One study's row, or None."""
        rows = self.db.query("SELECT * FROM studies WHERE study_uid=?", (study_uid,))
        return dict(rows[0]) if rows else None

    def inputs(self, study_uid: str) -> list[tuple[str, str]]:
        """``(sop_uid, spool path)`` of a study's recorded instances, our own outputs excluded: what a
        job processes."""
        rows = self.db.query("SELECT sop_uid, path FROM instances WHERE study_uid=? AND own_output=0", (study_uid,))
        return [(r[0], r[1]) for r in rows]

    def paths(self) -> set[str]:
        """Spool paths of every recorded instance (recovery adopts files not among them)."""
        return {r[0] for r in self.db.query("SELECT path FROM instances")}

    def done_before(self, cutoff: float) -> list[str]:
        """Studies delivered (``done``) and unchanged since ``cutoff`` (spool retention)."""
        return [r[0] for r in self.db.query("SELECT study_uid FROM studies WHERE state='done' AND updated_at<=?", (cutoff,))]

    def finished_before(self, db: sqlite3.Connection, states: tuple[str, ...], cutoff: float) -> list[str]:
        marks = ",".join("?" * len(states))
        return [r[0] for r in db.execute(
            f"SELECT study_uid FROM studies WHERE state IN ({marks}) AND updated_at<=?", (*states, cutoff))]  # fmt: skip

    def counts(self) -> dict[str, Any]:
        """Studies by state, instances and duplicates received."""
        studies = {r[0]: r[1] for r in self.db.query("SELECT state, COUNT(*) FROM studies GROUP BY state")}
        instances = self.db.query("SELECT COUNT(*), COALESCE(SUM(duplicates),0) FROM instances")[0]
        return {"studies": studies, "instances": int(instances[0]), "duplicates": int(instances[1])}

    @staticmethod
    def forget(db: sqlite3.Connection, study_uid: str) -> None:
        db.execute("DELETE FROM instances WHERE study_uid=?", (study_uid,))
        db.execute("DELETE FROM studies WHERE study_uid=?", (study_uid,))
