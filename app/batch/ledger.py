"""The resumable ledger of a batch run: SQLite in OUT, one transaction per finished study.

A study's findings rows and its outcome are committed together, so a run killed at any moment
leaves each study either fully recorded or not at all; a rerun then skips what is recorded (for
the same model) and redoes the rest, and the findings table, rebuilt from the ledger, never holds a
row twice. Failed studies are retried on a rerun; "not processed" (nothing eligible) is final.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY, outcome TEXT NOT NULL, reason TEXT NOT NULL,
    patient_id TEXT, accession TEXT, study_date TEXT, selected_series TEXT,
    model_name TEXT, model_version TEXT, manifest_sha256 TEXT NOT NULL,
    seconds REAL, finished_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS findings (
    study_uid TEXT NOT NULL, task_key TEXT NOT NULL, task_name TEXT, task_group TEXT,
    probability REAL NOT NULL, threshold REAL NOT NULL, decision TEXT NOT NULL,
    PRIMARY KEY (study_uid, task_key)
);
CREATE TABLE IF NOT EXISTS outcomes (study_uid TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS attempts (study_uid TEXT PRIMARY KEY, attempts INTEGER NOT NULL, last_started TEXT);
"""

FINAL_OUTCOMES = ("processed", "not-processed")


@dataclass(frozen=True)
class StudyRecord:
    """One study's entry in the ledger (what ``studies.csv`` shows)."""

    study_uid: str
    outcome: str
    reason: str
    patient_id: str = ""
    accession: str = ""
    study_date: str = ""
    selected_series: str = ""
    model_name: str = ""
    model_version: str = ""
    manifest_sha256: str = ""
    seconds: float = 0.0
    #: The study's ``outcome.json`` record (the same one ``hyperct run`` writes).
    outcome_record: dict[str, Any] | None = None


@dataclass(frozen=True)
class FindingRow:
    """One task of one processed study."""

    task_key: str
    task_name: str
    task_group: str
    probability: float
    threshold: float
    decision: str


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class Ledger:
    """``OUT/_batch/ledger.sqlite``; used from the thread that runs inference only."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None)  # explicit transactions below
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a commit survives a kill or a power cut
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def finished(self, manifest_sha256: str) -> set[str]:
        """Studies with a final outcome from this model (a rerun skips them unless --force)."""
        rows = self.db.execute(
            f"SELECT study_uid FROM studies WHERE manifest_sha256 = ? AND outcome IN {FINAL_OUTCOMES}",
            (manifest_sha256,),
        )
        return {r[0] for r in rows}

    def start(self, study_uid: str) -> None:
        """Count an attempt (how a test, or a person, sees that a finished study was not redone)."""
        self.db.execute(
            "INSERT INTO attempts VALUES (?, 1, ?) ON CONFLICT(study_uid) DO UPDATE SET "
            "attempts = attempts + 1, last_started = excluded.last_started",
            (study_uid, _now()),
        )

    def record(self, study: StudyRecord, findings: list[FindingRow]) -> None:
        """Commit one study's outcome and findings in a single transaction (replacing an older record)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute("DELETE FROM findings WHERE study_uid = ?", (study.study_uid,))
            self.db.executemany(
                "INSERT INTO findings VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        study.study_uid,
                        f.task_key,
                        f.task_name,
                        f.task_group,
                        f.probability,
                        f.threshold,
                        f.decision,
                    )
                    for f in findings
                ],
            )
            self.db.execute(
                "INSERT OR REPLACE INTO studies VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (study.study_uid, study.outcome, study.reason, study.patient_id, study.accession, study.study_date,
                 study.selected_series, study.model_name, study.model_version, study.manifest_sha256,
                 study.seconds, _now()),
            )  # fmt: skip
            if study.outcome_record is not None:
                self.db.execute(
                    "INSERT OR REPLACE INTO outcomes VALUES (?, ?)",
                    (study.study_uid, json.dumps(study.outcome_record, allow_nan=False)),
                )
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def attempts(self) -> dict[str, int]:
        return {r[0]: int(r[1]) for r in self.db.execute("SELECT study_uid, attempts FROM attempts")}

    def study_rows(self) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT * FROM studies ORDER BY study_date, study_uid")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def outcome_records(self) -> list[dict[str, Any]]:
        """Every recorded study's ``outcome.json`` record, in ``studies.csv`` order (a ledger from
        before the records were kept gives the outcome and reason alone)."""
        records = {r[0]: json.loads(r[1]) for r in self.db.execute("SELECT study_uid, record FROM outcomes")}
        return [
            records.get(row["study_uid"])
            or {"study_instance_uid": row["study_uid"], "outcome": row["outcome"], "reason": row["reason"]}
            for row in self.study_rows()
        ]

    def finding_rows(self) -> list[dict[str, Any]]:
        """Findings joined with their study, one per (processed study, task)."""
        cur = self.db.execute(
            """SELECT s.study_uid, s.patient_id, s.accession, s.study_date, s.selected_series,
                      f.task_key, f.task_name, f.task_group, f.probability, f.threshold, f.decision,
                      s.outcome, s.model_name, s.model_version, s.manifest_sha256
               FROM findings f JOIN studies s USING (study_uid)
               ORDER BY s.study_date, s.study_uid, f.task_key"""
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
