"""Header-only index of an archive: studies, series and files in SQLite.

The index pass reads headers only (large elements deferred, never decoded) with the same reader
the pipeline's study loader uses, so a file the index accepts is a file the loader accepts. It is
what filters run on (date, accession, modality), what each study's file list comes from (so two
studies in one folder never mix), and it is incremental: an unchanged file (same path, size and
mtime) is not read again on a rerun.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from app.batch.discover import Candidate, Skip

logger = logging.getLogger(__name__)

COMMIT_EVERY = 2000  # files

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, origin TEXT NOT NULL, size INTEGER, mtime_ns INTEGER,
    status TEXT NOT NULL,            -- ok | skipped | duplicate
    reason TEXT NOT NULL DEFAULT '',
    sop_uid TEXT, study_uid TEXT, series_uid TEXT, modality TEXT, sop_class TEXT,
    patient_id TEXT, accession TEXT, study_date TEXT, series_number INTEGER, series_description TEXT
);
CREATE INDEX IF NOT EXISTS files_study ON files(study_uid);
CREATE TABLE IF NOT EXISTS skips (origin TEXT NOT NULL, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, modality TEXT, series_number INTEGER,
    description TEXT, n_files INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY, patient_id TEXT, accession TEXT, study_date TEXT,
    modalities TEXT NOT NULL, n_series INTEGER NOT NULL, n_files INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class HeaderInfo:
    """What the index keeps of one instance (no patient names)."""

    sop_uid: str
    study_uid: str
    series_uid: str
    modality: str
    sop_class: str
    patient_id: str
    accession: str
    study_date: str
    series_number: int | None
    series_description: str


@dataclass(frozen=True)
class StudyRow:
    """One indexed study (a row of ``studies``)."""

    study_uid: str
    patient_id: str
    accession: str
    study_date: str
    modalities: tuple[str, ...]
    n_series: int
    n_files: int


@dataclass
class IndexSummary:
    """What the index pass found and skipped (printed by ``hyperct process``)."""

    files_seen: int = 0
    files_read: int = 0  # headers actually read (the others were unchanged since the last run)
    instances: int = 0
    studies: int = 0
    series: int = 0
    ct_series: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # short reason -> count


def _text(ds: Any, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def read_header(path: Path) -> tuple[HeaderInfo | None, str]:
    """Header of one file with pixel data deferred; (None, reason) when the pipeline could not use it."""
    from operators.study_loader import read_instance

    ds, why = read_instance(path)
    if ds is None:
        if why.startswith("missing "):
            why = f"not a usable DICOM instance ({why})"
        return None, why
    number = ds.get("SeriesNumber")
    try:
        series_number = int(number) if number not in (None, "") else None
    except (TypeError, ValueError):
        series_number = None
    return (
        HeaderInfo(
            sop_uid=_text(ds, "SOPInstanceUID"),
            study_uid=_text(ds, "StudyInstanceUID"),
            series_uid=_text(ds, "SeriesInstanceUID"),
            modality=_text(ds, "Modality").upper(),
            sop_class=_text(ds, "SOPClassUID"),
            patient_id=_text(ds, "PatientID"),
            accession=_text(ds, "AccessionNumber"),
            study_date=_text(ds, "StudyDate"),
            series_number=series_number,
            series_description=_text(ds, "SeriesDescription"),
        ),
        "",
    )


def short_reason(reason: str) -> str:
    """The reason without its details, for counting ("not readable as DICOM", "truncated", ...)."""
    return reason.split(" (")[0].split(":")[0].strip()


class ArchiveIndex:
    """The SQLite index under OUT (``connect`` once per thread; writes happen on the caller's thread)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path)
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def build(
        self,
        candidates: Iterable[Candidate],
        skips: Iterable[Skip],
        *,
        workers: int = 1,
        on_file: Callable[[], None] | None = None,
    ) -> IndexSummary:
        """Index ``candidates`` (reusing unchanged files), drop files no longer present, derive studies/series."""
        candidates = list(candidates)
        summary = IndexSummary(files_seen=len(candidates))
        known = {
            row[0]: (row[1], row[2]) for row in self.db.execute("SELECT path, size, mtime_ns FROM files")
        }
        todo: list[tuple[Candidate, int, int]] = []
        keep: set[str] = set()
        for cand in candidates:
            try:
                st = cand.path.stat()
            except OSError as exc:
                todo.append((cand, -1, -1))
                logger.warning("cannot stat %s: %s", cand.origin, exc)
                continue
            key = str(cand.path)
            keep.add(key)
            if known.get(key) == (st.st_size, st.st_mtime_ns):
                if on_file:
                    on_file()
                continue
            todo.append((cand, st.st_size, st.st_mtime_ns))

        def work(item: tuple[Candidate, int, int]) -> tuple[Candidate, int, int, HeaderInfo | None, str]:
            cand, size, mtime = item
            if size < 0:
                return cand, size, mtime, None, "file vanished or is not readable"
            try:
                info, why = read_header(cand.path)
            except Exception as exc:  # noqa: BLE001 - never stop the index for one file
                info, why = None, f"not readable as DICOM ({type(exc).__name__}: {exc})"
            return cand, size, mtime, info, why

        with self.db:
            gone = set(known) - keep
            self.db.executemany("DELETE FROM files WHERE path = ?", [(p,) for p in gone])
            self.db.execute("UPDATE files SET status = 'ok', reason = '' WHERE status = 'duplicate'")
            with ThreadPoolExecutor(max(1, workers)) as pool:
                for cand, size, mtime, info, why in pool.map(work, todo):
                    summary.files_read += 1
                    self._store(cand, size, mtime, info, why)
                    if summary.files_read % COMMIT_EVERY == 0:
                        self.db.commit()  # an interrupted index pass keeps what it has read
                    if on_file:
                        on_file()
            self._mark_duplicates()
            self.db.execute("DELETE FROM skips")
            self.db.executemany("INSERT INTO skips VALUES (?, ?)", [(s.origin, s.reason) for s in skips])
            self._derive()
        for (reason,) in self.db.execute("SELECT reason FROM files WHERE status != 'ok'"):
            summary.skipped[short_reason(reason)] += 1
        for (reason,) in self.db.execute("SELECT reason FROM skips"):
            summary.skipped[short_reason(reason)] += 1
        summary.instances = self.db.execute("SELECT COUNT(*) FROM files WHERE status = 'ok'").fetchone()[0]
        summary.studies = self.db.execute("SELECT COUNT(*) FROM studies").fetchone()[0]
        summary.series = self.db.execute("SELECT COUNT(*) FROM series").fetchone()[0]
        summary.ct_series = self.db.execute("SELECT COUNT(*) FROM series WHERE modality = 'CT'").fetchone()[0]
        logger.info(
            "index: %d instances, %d studies, %d series", summary.instances, summary.studies, summary.series
        )
        return summary

    def _store(self, cand: Candidate, size: int, mtime: int, info: HeaderInfo | None, why: str) -> None:
        if info is None:
            row: tuple[Any, ...] = (str(cand.path), cand.origin, size, mtime, "skipped", why) + (None,) * 10
        else:
            row = (str(cand.path), cand.origin, size, mtime, "ok", "", info.sop_uid, info.study_uid, info.series_uid,
                   info.modality, info.sop_class, info.patient_id, info.accession, info.study_date,
                   info.series_number, info.series_description)  # fmt: skip
        self.db.execute("INSERT OR REPLACE INTO files VALUES (" + ",".join("?" * 16) + ")", row)

    def _mark_duplicates(self) -> None:
        """The same SOP instance in two files (a folder and its zip copy): the first by origin wins."""
        rows = self.db.execute(
            "SELECT path, origin, sop_uid FROM files WHERE status = 'ok' ORDER BY sop_uid, origin"
        ).fetchall()
        first: dict[str, str] = {}
        for path, origin, sop in rows:
            if sop in first:
                self.db.execute(
                    "UPDATE files SET status = 'duplicate', reason = ? WHERE path = ?",
                    (f"duplicate SOP instance (same SOPInstanceUID as {first[sop]}); ignored", path),
                )
            else:
                first[sop] = origin

    def _derive(self) -> None:
        self.db.execute("DELETE FROM series")
        self.db.execute("DELETE FROM studies")
        self.db.execute(
            """INSERT INTO series SELECT series_uid, MIN(study_uid), MIN(modality), MIN(series_number),
               MIN(series_description), COUNT(*) FROM files WHERE status = 'ok' GROUP BY series_uid"""
        )
        self.db.execute(
            """INSERT INTO studies SELECT study_uid, MIN(patient_id), MIN(accession), MIN(study_date),
               GROUP_CONCAT(DISTINCT modality), COUNT(DISTINCT series_uid), COUNT(*)
               FROM files WHERE status = 'ok' GROUP BY study_uid"""
        )

    def studies(self) -> list[StudyRow]:
        """Every indexed study, ordered by date then UID (a stable processing order)."""
        rows = self.db.execute(
            "SELECT study_uid, patient_id, accession, study_date, modalities, n_series, n_files FROM studies "
            "ORDER BY study_date, study_uid"
        ).fetchall()
        return [
            StudyRow(
                r[0],
                r[1] or "",
                r[2] or "",
                r[3] or "",
                tuple(sorted(set((r[4] or "").split(",")) - {""})),
                r[5],
                r[6],
            )
            for r in rows
        ]

    def study_files(self, study_uid: str) -> list[Path]:
        """The accepted files of one study (duplicates and unreadable files left out)."""
        return study_files(self.path, study_uid)

    def file_errors(self) -> list[tuple[str, str]]:
        """(origin, reason) of every file or discovery item that was skipped."""
        rows = self.db.execute(
            "SELECT origin, reason FROM files WHERE status != 'ok' ORDER BY origin"
        ).fetchall()
        rows += self.db.execute("SELECT origin, reason FROM skips ORDER BY origin").fetchall()
        return [(str(o), str(r)) for o, r in rows]


def study_files(index_path: Path, study_uid: str) -> list[Path]:
    """One study's accepted files, read with a connection of its own (callable from any thread).

    The prefetch workers ask for a study's files only when they load it, so an archive of many
    studies never holds every file list in memory.
    """
    with closing(sqlite3.connect(f"file:{quote(str(index_path))}?mode=ro", uri=True)) as db:
        rows = db.execute(
            "SELECT path FROM files WHERE status = 'ok' AND study_uid = ? ORDER BY path", (study_uid,)
        ).fetchall()
    return [Path(r[0]) for r in rows]
