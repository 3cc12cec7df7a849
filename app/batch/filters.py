"""Which indexed studies a batch run takes: date range, StudyInstanceUID / AccessionNumber lists, modality."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from app.batch.index import StudyRow


def parse_date(text: str) -> str:
    """``YYYY-MM-DD`` or ``YYYYMMDD`` → DICOM ``YYYYMMDD``; ``ValueError`` names the bad value."""
    cleaned = text.strip().replace("-", "")
    try:
        dt.datetime.strptime(cleaned, "%Y%m%d")
    except ValueError:
        raise ValueError(f"not a date (YYYY-MM-DD): {text!r}") from None
    return cleaned


def read_list(values: list[str] | None) -> frozenset[str]:
    """Values given inline (comma-separated) or as ``@file`` with one value per line."""
    out: set[str] = set()
    for value in values or []:
        if value.startswith("@"):
            lines = Path(value[1:]).read_text().splitlines()
            out.update(line.strip() for line in lines if line.strip() and not line.startswith("#"))
        else:
            out.update(v.strip() for v in value.split(",") if v.strip())
    return frozenset(out)


@dataclass(frozen=True)
class StudyFilter:
    """Empty fields filter nothing; a study must pass every non-empty one."""

    date_from: str = ""  # YYYYMMDD, inclusive
    date_to: str = ""
    study_uids: frozenset[str] = frozenset()
    accessions: frozenset[str] = frozenset()
    modalities: frozenset[str] = frozenset()  # the study holds a series of one of these

    def why_excluded(self, study: StudyRow) -> str | None:
        """The reason ``study`` is filtered out, or None when it is taken."""
        if self.study_uids and study.study_uid not in self.study_uids:
            return "StudyInstanceUID not in the list"
        if self.accessions and study.accession not in self.accessions:
            return "AccessionNumber not in the list"
        if self.modalities and not (set(study.modalities) & {m.upper() for m in self.modalities}):
            return f"no series of modality {'/'.join(sorted(self.modalities))}"
        if (self.date_from or self.date_to) and not study.study_date:
            return "no StudyDate, and a date range was given"
        if self.date_from and study.study_date < self.date_from:
            return f"StudyDate {study.study_date} before {self.date_from}"
        if self.date_to and study.study_date > self.date_to:
            return f"StudyDate {study.study_date} after {self.date_to}"
        return None
