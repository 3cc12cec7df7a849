"""Label CSVs → per-scan task labels (1 / 0 / −1 = missing), with errors that name file, row and column.

A label CSV has one key column (``VolumeName``, ``StudyInstanceUID`` or ``AccessionNumber``), task
columns and optionally known identifier/bookkeeping columns. A task column may be spelled as the
registry key (``pleural_effusion``), the task name (``Pleural effusion``) or its CT-RATE column; the
match is case- and space-insensitive. Any other column is refused: a misspelt task would otherwise be
silently ignored and the task trained without labels.

Cell values: ``1``/``1.0``/``true`` → 1; ``0``/``0.0``/``false`` → 0; ``-1``, empty, ``NA``, ``NaN``,
``null``, ``None`` → missing (spec §2.4, O-8: "not mentioned" is missing, never a negative).
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.tasks import TaskRegistry

logger = logging.getLogger(__name__)

MISSING = -1.0
NULL_TOKENS = frozenset({"", "-1", "-1.0", "na", "n/a", "nan", "null", "none"})
POSITIVE_TOKENS = frozenset({"1", "1.0", "true", "yes"})
NEGATIVE_TOKENS = frozenset({"0", "0.0", "false", "no"})

#: Non-task columns a label CSV may carry (identifiers, the echo-label bookkeeping, a fixed split).
ID_COLUMNS: frozenset[str] = frozenset(
    c.casefold()
    for c in (
        "VolumeName", "StudyInstanceUID", "SeriesInstanceUID", "AccessionNumber", "PatientID", "Path",
        "StudyDate", "echo_date", "echo_days_from_ct", "split", "patient_id", "study_date",
    )
)  # fmt: skip


class DataError(ValueError):
    """Bad training data; the message names the file (name only) and the row, and what is wrong."""


@dataclass
class BadData:
    """Collects bad-data reports: raises :class:`DataError` unless ``skip`` (then warns and counts)."""

    skip: bool = False
    messages: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.messages)

    def report(self, message: str) -> None:
        if not self.skip:
            raise DataError(message)
        self.messages.append(message)
        logger.warning("skipped bad data: %s", message)


@dataclass(frozen=True)
class LabelRow:
    """One row of a label CSV: the key, its task labels and where it came from."""

    key: str
    labels: dict[str, float]
    file: str
    row: int
    line: int
    ids: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.file}: row {self.row} (line {self.line})"


def normalise_column(name: str) -> str:
    """Header spelling → comparison form (case, spaces, '_' and '-' ignored)."""
    return re.sub(r"[\s_\-]+", " ", name.strip()).casefold()


def column_lookup(registry: TaskRegistry) -> dict[str, str]:
    """Normalised header spelling → task key (key, name and CT-RATE label column of every task)."""
    out: dict[str, str] = {}
    for t in registry:
        for spelling in (t.key, t.name, t.label_column):
            if spelling:
                out[normalise_column(spelling)] = t.key
    return out


def parse_label(text: str | None, where: str) -> float:
    """A cell → 1.0, 0.0 or MISSING; anything else raises :class:`DataError` naming ``where``."""
    v = "" if text is None else str(text).strip().casefold()
    if v in NULL_TOKENS:
        return MISSING
    if v in POSITIVE_TOKENS:
        return 1.0
    if v in NEGATIVE_TOKENS:
        return 0.0
    raise DataError(f"{where}: label {text!r} is not 1, 0, -1 or empty")


def read_label_csv(
    path: str | Path,
    registry: TaskRegistry,
    *,
    key_columns: Sequence[str],
    bad: BadData | None = None,
    require_label: bool = True,
) -> tuple[str, list[str], dict[str, LabelRow]]:
    """Read a label CSV → ``(key column used, task keys present, {key: LabelRow})``.

    ``key_columns``: accepted key column names, first present wins. Structural problems (no key
    column, unknown or duplicate columns) always raise. Row problems (bad value, empty or duplicate
    key, ``require_label`` and every label missing) go through ``bad`` (raise, or skip with a warning).
    """
    bad = bad or BadData()
    file = Path(path)
    name = file.name
    if not file.is_file():
        raise DataError(f"{name}: label file not found")
    lookup = column_lookup(registry)
    with file.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DataError(f"{name}: empty file (no header row)") from None
        folded = [h.casefold() for h in header]
        key_col = next((k for k in key_columns if k.casefold() in folded), None)
        if key_col is None:
            raise DataError(
                f"{name}: no key column; expected one of {', '.join(key_columns)} (header: {', '.join(header)})"
            )
        key_idx = folded.index(key_col.casefold())
        task_cols: dict[int, str] = {}
        id_cols: dict[int, str] = {}
        unknown: list[str] = []
        for i, h in enumerate(header):
            if i == key_idx:
                continue
            task = lookup.get(normalise_column(h))
            if task is not None:
                if task in task_cols.values():
                    raise DataError(f"{name}: task {task!r} has two columns (second: {h!r})")
                task_cols[i] = task
            elif h.casefold() in ID_COLUMNS:
                id_cols[i] = h
            elif h:
                unknown.append(h)
        if unknown:
            raise DataError(
                f"{name}: header row (line 1): column(s) {', '.join(repr(u) for u in unknown)} are neither a task "
                "(registry key, name or CT-RATE column; see docs/tasks.md) nor a known identifier column"
            )
        if not task_cols:
            raise DataError(f"{name}: no task columns (header: {', '.join(header)})")
        rows: dict[str, LabelRow] = {}
        for n, cells in enumerate(reader, start=1):
            line = reader.line_num
            where = f"{name}: row {n} (line {line})"
            if not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                bad.report(f"{where}: {len(cells)} cells, the header has {len(header)}")
                continue
            key = cells[key_idx].strip()
            if not key:
                bad.report(f"{where}: empty {key_col}")
                continue
            if key in rows:
                bad.report(f"{where}: {key_col} {key!r} repeats {rows[key].where}")
                continue
            try:
                labels = {
                    task: parse_label(cells[i], f"{where}, column {header[i]!r}")
                    for i, task in task_cols.items()
                }
            except DataError as exc:
                bad.report(str(exc))
                continue
            if require_label and all(v == MISSING for v in labels.values()):
                bad.report(f"{where}: {key_col} {key!r} has every label missing")
                continue
            ids = {id_cols[i]: cells[i].strip() for i in id_cols}
            rows[key] = LabelRow(key=key, labels=labels, file=name, row=n, line=line, ids=ids)
    logger.info("%s: %d rows, %d task columns, key %s", name, len(rows), len(task_cols), key_col)
    return key_col, list(task_cols.values()), rows


def merge_labels(
    primary: Mapping[str, LabelRow], extra: Iterable[Mapping[str, LabelRow]], bad: BadData | None = None
) -> dict[str, LabelRow]:
    """Add the labels of ``extra`` tables (e.g. echo-derived cardiac labels) to the primary rows by key.

    Keys only in an extra table are ignored (an echo list may cover more CTs). A task valid in two
    tables with different values is a conflict, reported through ``bad``.
    """
    bad = bad or BadData()
    out = dict(primary)
    for table in extra:
        for key, row in table.items():
            base = out.get(key)
            if base is None:
                continue
            merged = dict(base.labels)
            conflict = False
            for task, v in row.labels.items():
                old = merged.get(task, MISSING)
                if old != MISSING and v != MISSING and old != v:
                    bad.report(f"{row.where}: {task} = {v:g} contradicts {base.where} ({old:g})")
                    conflict = True
                    break
                if v != MISSING:
                    merged[task] = v
            if not conflict:
                out[key] = LabelRow(base.key, merged, base.file, base.row, base.line, {**row.ids, **base.ids})
    return out


def label_vector(labels: Mapping[str, float], tasks: Sequence[str]) -> np.ndarray:
    """``[K]`` float32 in ``tasks`` order; tasks absent from ``labels`` are missing."""
    return np.array([labels.get(t, MISSING) for t in tasks], dtype=np.float32)
