"""The labels CSV: CT-RATE ``multi_abnormality_labels.csv`` columns plus study keys.

Columns: ``VolumeName`` (the primary series folder, relative to the dataset root), the 18 CT-RATE
abnormality columns in CT-RATE's order (1/0), then ``StudyInstanceUID``, ``SeriesInstanceUID``,
``AccessionNumber``, ``PatientID`` so DICOM-side code can key labels by study.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from synth.tasks import CT_RATE_COLUMNS, KEY_COLUMNS

log = logging.getLogger(__name__)

LABEL_COLUMNS: tuple[str, ...] = ("VolumeName", *CT_RATE_COLUMNS, *KEY_COLUMNS)


def write_labels_csv(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``rows`` (dicts with every column of ``LABEL_COLUMNS``) to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(LABEL_COLUMNS), extrasaction="raise")
        w.writeheader()
        for row in rows:
            missing = [c for c in LABEL_COLUMNS if c not in row]
            if missing:
                raise ValueError(f"labels row lacks {missing}")
            w.writerow({c: row[c] for c in LABEL_COLUMNS})
    return path


def read_labels_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a labels CSV with the 18 task columns as ints."""
    with Path(path).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for c in CT_RATE_COLUMNS:
            r[c] = int(r[c])
    return rows
