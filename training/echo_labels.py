"""Derive the 7 echo-based cardiac labels for a list of CTs (spec §2.3, §2.4; open points O-7, O-9, O-21).

Each CT is matched to one transthoracic echo of the same patient within ±``window_days`` (the closest
one), and the 7 labels are computed from that echo's measurements. Labels are 1 / 0 / -1, where -1
means "missing" (spec §2.4): evaluation skips it and training never uses it as a negative.

The label rules are not implemented here: they are the machine-readable ``echo_rule`` entries of the
task registry (``training/tasks.json``, evaluated by ``training.tasks.EchoRule.evaluate``), the one
implementation. This module reads and normalises the CSVs, matches echoes to CTs, maps each echo to
the registry's field names and evaluates the 7 rules. The rules follow the *paper* (LAVI > 34 mL/m²,
the clinical guideline), not the released code (LAVI > 35); ``lavi_threshold=35`` (the registry
parameter ``lavi_threshold``, choices 34 and 35) reproduces the code.

Deliberate deviations from the reference code (see docs/evaluation.md):

* RV text is lower-cased and stripped before the ``== "normal"`` test (O-9); the code compares
  case-sensitively, so "Normal" would be a positive there. Null tokens ("NA", "NaN", ...) are missing.
* Ventricular enlargement is **missing** when sex is neither M nor F (registry rule); the code gives
  0, which would add unverifiable negatives.
* Echo ↔ CT matching is not in the released code (O-21); the tie rules below are ours.

Everything is plain ``csv`` + ``datetime`` (and the standard-library-only task registry): this module
needs neither pandas nor torch, so the ``hyperct labels echo`` command stays light.
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from training.tasks import EchoRule, TaskRegistry

logger = logging.getLogger(__name__)

CARDIAC_TASKS: tuple[str, ...] = (
    "reduced_rv_systolic_function",
    "reduced_lv_systolic_function",
    "pulmonary_hypertension",
    "atrial_chamber_enlargement",
    "ventricular_enlargement",
    "left_atrial_filling_pressure",
    "right_atrial_filling_pressure",
)
"""The 7 cardiac task keys in the order of the task-embedding table (spec §2.3, indices 1–7)."""

MISSING = -1
PAPER_LAVI_THRESHOLD = 34.0
"""LAVI cut-off (mL/m²) of paper Table 15 and the ASE guideline; the default."""
CODE_LAVI_THRESHOLD = 35.0
"""LAVI cut-off used by the released code (``task_prompts.py``), open point O-7."""
DEFAULT_WINDOW_DAYS = 180

NULL_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none"})
"""Cell values read as null (case-insensitive, after stripping); what CSV exports of NaN/None produce."""

# Canonical field -> accepted header spellings, in priority order: when several are present the first
# non-null value in this order wins (spec §2.2 "merged by first non-null").
ECHO_COLUMNS: dict[str, tuple[str, ...]] = {
    "PatientID": ("PatientID", "patient_id", "ECHO_PatientID"),
    "EchoDate": ("EchoDate", "echo_date", "ECHO_date", "ECHO_EchoDate"),
    "lvef": ("lvef", "lvef_value", "ECHO_lvef", "ECHO_lvef_value"),
    "rv_systolic_function": (
        "rv_systolic_function",
        "rv_systolic_function_value",
        "ECHO_rv_systolic_function",
        "ECHO_rv_systolic_function_value",
    ),
    "pasp": ("pasp", "pasp_value", "ECHO_pasp", "ECHO_pasp_value"),
    "la_volume_index": (
        "la_volume_index",
        "la_volume_index_value",
        "ECHO_la_volume_index",
        "ECHO_la_volume_index_value",
    ),
    "lv_d_measurement": ("lv_d_measurement", "lv_d_measurement_value", "ECHO_lv_d_measurement"),
    "e_a_ratio": ("e_a_ratio", "e_a_ratio_value", "ECHO_e_a_ratio", "ECHO_e_a_ratio_value"),
    "tr_max_velocity": (
        "tr_max_velocity",
        "tr_max_velocity_value",
        "ECHO_tr_max_velocity",
        "ECHO_tr_max_velocity_value",
    ),
    "sex": ("sex", "Patients_Sex", "PatientSex", "ECHO_sex"),
}
ECHO_NUMERIC = ("lvef", "pasp", "la_volume_index", "lv_d_measurement", "e_a_ratio", "tr_max_velocity")

CT_KEY_COLUMNS: tuple[str, ...] = ("StudyInstanceUID", "VolumeName", "Path")
"""Key columns looked for in the CT list, first present wins (or pass ``key_column``)."""
CT_COLUMNS: dict[str, tuple[str, ...]] = {
    "PatientID": ("PatientID", "patient_id"),
    "StudyDate": ("StudyDate", "study_date"),
}
CT_SEX_COLUMNS: tuple[str, ...] = ("sex", "PatientSex", "Patients_Sex")
"""Optional sex column on the CT list: used only where the matched echo has no sex."""

OUTPUT_EXTRA_COLUMNS = ("echo_date", "echo_days_from_ct")


class EchoLabelError(ValueError):
    """Bad echo-label input; the message names the file, the row (and line) and the column."""


@dataclass(frozen=True)
class EchoRecord:
    """One echo row, with fields already parsed (numbers in the units of spec §2.2)."""

    row: int  # 1-based data row in the echo CSV (line = row + 1 for files without quoted newlines)
    patient_id: str
    date: dt.date
    lvef: float | None = None
    rv_systolic_function: str | None = None
    pasp: float | None = None
    la_volume_index: float | None = None
    lv_d_measurement: float | None = None
    e_a_ratio: float | None = None
    tr_max_velocity: float | None = None
    sex: str | None = None  # "M", "F" or None (unknown / other)


@dataclass(frozen=True)
class CTRecord:
    row: int
    key: str
    patient_id: str
    date: dt.date
    sex: str | None = None


@dataclass
class TaskCounts:
    positive: int = 0
    negative: int = 0
    missing: int = 0


@dataclass
class EchoLabelSummary:
    """What ``derive_echo_labels`` did, for the log and for the report next to the labels."""

    ct_csv: str
    echo_csv: str
    out_csv: str
    key_column: str
    lavi_threshold: float
    window_days: int
    n_ct: int
    n_echo_rows: int
    n_matched: int
    n_unmatched: int
    n_ties: int  # CTs where more than one echo was at the minimal distance (tie rule applied)
    tasks: dict[str, TaskCounts] = field(default_factory=dict)
    rv_positive_texts: dict[str, int] = field(default_factory=dict)
    """Normalised RV texts counted as positive, with counts: audit that no "not assessed" slips in."""
    sex_unknown_matched: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Labels: the registry's echo rules, evaluated on one echo.

ECHO_RULE_FIELDS: dict[str, str] = {
    "lvef": "ECHO_lvef_value",
    "rv_systolic_function": "ECHO_rv_systolic_function_value",
    "pasp": "ECHO_pasp_value",
    "la_volume_index": "ECHO_la_volume_index_value",
    "lv_d_measurement": "ECHO_lv_d_measurement",
    "e_a_ratio": "ECHO_e_a_ratio",
    "tr_max_velocity": "ECHO_tr_max_velocity_value",
    "sex": "Patients_Sex",
}
"""``EchoRecord`` field -> the row field the registry's ``echo_rule`` criteria read."""


def normalise_rv_text(text: str | None) -> str | None:
    """Lower-case and strip (O-9); null tokens → None."""
    if text is None:
        return None
    norm = text.strip().lower()
    return None if norm in NULL_TOKENS else norm


def normalise_sex(text: str | None) -> str | None:
    """Map "M"/"male" → "M", "F"/"female" → "F", anything else (O, U, other, null) → None."""
    if text is None:
        return None
    norm = text.strip().upper()
    if norm in ("M", "MALE"):
        return "M"
    if norm in ("F", "FEMALE"):
        return "F"
    return None


@lru_cache(maxsize=8)
def _cardiac_rules(lavi_threshold: float) -> tuple[tuple[str, EchoRule], ...]:
    """The registry's rules for ``CARDIAC_TASKS`` at this LAVI cut-off (loaded once per value).

    Raises ``TaskRegistryError`` (a ``ValueError``) for a threshold the registry does not allow.
    """
    registry = TaskRegistry.load(lavi_threshold=lavi_threshold)
    rules: list[tuple[str, EchoRule]] = []
    for key in CARDIAC_TASKS:
        rule = registry.by_key(key).echo_rule
        if rule is None:  # the registry's validation requires one for every cardiac task
            raise ValueError(f"{registry.source}: task {key!r} has no echo_rule")
        rules.append((key, rule))
    return tuple(rules)


def labels_for_echo(
    echo: EchoRecord, *, lavi_threshold: float = PAPER_LAVI_THRESHOLD, fallback_sex: str | None = None
) -> dict[str, int]:
    """The 7 labels (1/0/-1) for one echo, keyed by ``CARDIAC_TASKS``, from the registry's echo rules.

    Sex is the echo's, or ``fallback_sex`` (the CT list's) when the echo has none; anything that is
    not M/F normalises to null, which makes ventricular enlargement missing.
    """
    sex = normalise_sex(echo.sex if echo.sex is not None else fallback_sex)
    row: dict[str, Any] = {rule_field: getattr(echo, attr) for attr, rule_field in ECHO_RULE_FIELDS.items()}
    row[ECHO_RULE_FIELDS["rv_systolic_function"]] = normalise_rv_text(echo.rv_systolic_function)
    row[ECHO_RULE_FIELDS["sex"]] = sex
    labels: dict[str, int] = {}
    for key, rule in _cardiac_rules(float(lavi_threshold)):
        value = rule.evaluate(row)
        labels[key] = MISSING if value is None else int(value)
    return labels


# --------------------------------------------------------------------------------------------------
# Parsing.

_DATE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})(?:[ T].*)?$")


def parse_date(text: str) -> dt.date:
    """YYYYMMDD (DICOM) or YYYY-MM-DD, optionally followed by a time, which is ignored (day precision)."""
    m = _DATE.match(text.strip())
    if not m:
        raise ValueError(f"cannot parse {text!r} as a date (expected YYYYMMDD or YYYY-MM-DD)")
    try:
        return dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError as exc:
        raise ValueError(f"cannot parse {text!r} as a date ({exc})") from None


def _is_null(text: str | None) -> bool:
    return text is None or text.strip().lower() in NULL_TOKENS


def _parse_number(text: str | None) -> float | None:
    if _is_null(text):
        return None
    assert text is not None
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"cannot parse {text!r} as a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    if value < 0:
        raise ValueError(f"{text!r} is negative; echo measurements are >= 0")
    return value


@dataclass
class _Table:
    """A CSV read into memory with header resolution; knows how to name a cell in an error."""

    path: Path
    header: list[str]
    rows: list[list[str]]
    lines: list[int]  # physical line of each row (csv.reader.line_num)

    def where(self, i: int, column: str) -> str:
        return f"{self.path.name}: row {i + 1} (line {self.lines[i]}), column {column!r}"

    def resolve(self, field_name: str, spellings: Sequence[str], *, required: bool = True) -> list[int]:
        """Indices of the header columns that spell ``field_name``, in priority order."""
        lookup: dict[str, list[int]] = {}
        for j, h in enumerate(self.header):
            lookup.setdefault(h.strip().lower(), []).append(j)
        found = [j for s in spellings for j in lookup.get(s.lower(), [])]
        found = list(dict.fromkeys(found))
        if required and not found:
            raise EchoLabelError(
                f"{self.path.name}: missing required column {field_name!r} "
                f"(accepted spellings: {', '.join(spellings)}; header has: {', '.join(self.header)})"
            )
        return found

    def first_non_null(self, i: int, cols: Sequence[int]) -> tuple[str | None, str]:
        """(value, header name) of the first non-null cell among ``cols``; ``(None, first name)``."""
        row = self.rows[i]
        for j in cols:
            cell = row[j] if j < len(row) else ""
            if not _is_null(cell):
                return cell.strip(), self.header[j]
        return None, self.header[cols[0]] if cols else ""


def _read_csv(path: Path) -> _Table:
    if not path.is_file():
        raise EchoLabelError(f"{path.name}: file not found ({path})")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise EchoLabelError(f"{path.name}: empty file (no header row)") from None
        rows: list[list[str]] = []
        lines: list[int] = []
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue  # blank line
            if len(row) > len(header):
                raise EchoLabelError(
                    f"{path.name}: row {len(rows) + 1} (line {reader.line_num}) has {len(row)} fields, "
                    f"the header has {len(header)}"
                )
            rows.append(row)
            lines.append(reader.line_num)
    return _Table(path=path, header=[h.strip() for h in header], rows=rows, lines=lines)


def read_echo_csv(path: str | os.PathLike[str], *, require_sex: bool = True) -> list[EchoRecord]:
    """Parse the echo CSV; any bad cell raises ``EchoLabelError`` naming file, row and column.

    ``require_sex=False`` lets the sex column be absent (the CT list then supplies it).
    """
    table = _read_csv(Path(path))
    cols = {
        name: table.resolve(name, spellings, required=require_sex or name != "sex")
        for name, spellings in ECHO_COLUMNS.items()
    }
    records: list[EchoRecord] = []
    for i in range(len(table.rows)):
        pid, pid_col = table.first_non_null(i, cols["PatientID"])
        if pid is None:
            raise EchoLabelError(f"{table.where(i, pid_col)}: PatientID is empty")
        date_text, date_col = table.first_non_null(i, cols["EchoDate"])
        if date_text is None:
            raise EchoLabelError(f"{table.where(i, date_col)}: echo date is empty")
        try:
            date = parse_date(date_text)
        except ValueError as exc:
            raise EchoLabelError(f"{table.where(i, date_col)}: {exc}") from None
        values: dict[str, Any] = {}
        for name in ECHO_NUMERIC:
            text, col = table.first_non_null(i, cols[name])
            try:
                values[name] = _parse_number(text)
            except ValueError as exc:
                raise EchoLabelError(f"{table.where(i, col)}: {exc}") from None
        if values["lvef"] is not None and values["lvef"] > 100:
            _, col = table.first_non_null(i, cols["lvef"])
            raise EchoLabelError(f"{table.where(i, col)}: LVEF {values['lvef']} is above 100 %")
        rv_text, _ = table.first_non_null(i, cols["rv_systolic_function"])
        sex_text = table.first_non_null(i, cols["sex"])[0] if cols["sex"] else None
        records.append(
            EchoRecord(
                row=i + 1,
                patient_id=pid,
                date=date,
                rv_systolic_function=rv_text,
                sex=normalise_sex(sex_text),
                **values,
            )
        )
    lvefs = [r.lvef for r in records if r.lvef is not None]
    if lvefs and max(lvefs) <= 1.0:
        logger.warning("%s: every LVEF is <= 1; are they fractions instead of percent?", Path(path).name)
    return records


def read_ct_csv(
    path: str | os.PathLike[str], key_column: str | None = None
) -> tuple[str, list[CTRecord], bool]:
    """Parse the CT list; returns (key column name as spelled in the file, records, has a sex column)."""
    table = _read_csv(Path(path))
    if key_column is not None:
        key_cols = table.resolve(key_column, (key_column,))
    else:
        key_cols = []
        for name in CT_KEY_COLUMNS:
            key_cols = table.resolve(name, (name,), required=False)
            if key_cols:
                break
        if not key_cols:
            raise EchoLabelError(
                f"{table.path.name}: missing required key column (one of {', '.join(CT_KEY_COLUMNS)}; "
                f"header has: {', '.join(table.header)})"
            )
    key_idx = key_cols[0]
    key_name = table.header[key_idx]
    pid_cols = table.resolve("PatientID", CT_COLUMNS["PatientID"])
    date_cols = table.resolve("StudyDate", CT_COLUMNS["StudyDate"])
    sex_cols = table.resolve("sex", CT_SEX_COLUMNS, required=False)
    records: list[CTRecord] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(table.rows):
        key = row[key_idx].strip() if key_idx < len(row) else ""
        if _is_null(key):
            raise EchoLabelError(f"{table.where(i, key_name)}: key is empty")
        if key in seen:
            raise EchoLabelError(
                f"{table.where(i, key_name)}: duplicate key {key!r} (first at row {seen[key]})"
            )
        seen[key] = i + 1
        pid, pid_col = table.first_non_null(i, pid_cols)
        if pid is None:
            raise EchoLabelError(f"{table.where(i, pid_col)}: PatientID is empty")
        date_text, date_col = table.first_non_null(i, date_cols)
        if date_text is None:
            raise EchoLabelError(f"{table.where(i, date_col)}: StudyDate is empty")
        try:
            date = parse_date(date_text)
        except ValueError as exc:
            raise EchoLabelError(f"{table.where(i, date_col)}: {exc}") from None
        sex_text = table.first_non_null(i, sex_cols)[0] if sex_cols else None
        records.append(CTRecord(row=i + 1, key=key, patient_id=pid, date=date, sex=normalise_sex(sex_text)))
    return key_name, records, bool(sex_cols)


# --------------------------------------------------------------------------------------------------
# Matching.


@dataclass(frozen=True)
class Match:
    echo: EchoRecord
    days_from_ct: int  # echo date − CT date; negative = echo before the CT
    tied: bool  # another echo was equally close (the tie rule decided)


def match_echo(
    ct: CTRecord, echoes: Iterable[EchoRecord], window_days: int = DEFAULT_WINDOW_DAYS
) -> Match | None:
    """The echo of ``ct``'s patient closest in time within ±``window_days`` (inclusive), or None.

    Ties (same |distance|): the echo *before* the CT wins (it was available when the CT was read and
    cannot reflect a change the CT might have triggered), then the earlier row of the echo CSV.
    """
    candidates: list[tuple[tuple[int, int, int], EchoRecord, int]] = []
    for e in echoes:
        if e.patient_id != ct.patient_id:
            continue
        days = (e.date - ct.date).days
        if abs(days) <= window_days:
            candidates.append(((abs(days), 0 if days <= 0 else 1, e.row), e, days))
    if not candidates:
        return None
    rank, echo, days = min(candidates, key=lambda c: c[0])
    n_closest = sum(1 for c in candidates if c[0][0] == rank[0])
    return Match(echo=echo, days_from_ct=days, tied=n_closest > 1)


# --------------------------------------------------------------------------------------------------
# Public entry point.


def derive_echo_labels(
    ct_csv: str | os.PathLike[str],
    echo_csv: str | os.PathLike[str],
    out_csv: str | os.PathLike[str],
    *,
    lavi_threshold: float = PAPER_LAVI_THRESHOLD,
    window_days: int = DEFAULT_WINDOW_DAYS,
    key_column: str | None = None,
) -> EchoLabelSummary:
    """Write ``out_csv``: the CT key column, the 7 task columns (1/0/-1), ``echo_date``, ``echo_days_from_ct``.

    Rows follow the CT list's order. CTs with no echo in the window get -1 for all 7 tasks and empty
    echo columns. The file is written atomically (temp file + rename) so a failed run leaves no
    half-written labels behind.
    """
    if window_days < 0:
        raise ValueError(f"window_days must be >= 0, got {window_days}")
    if not math.isfinite(lavi_threshold) or lavi_threshold <= 0:
        raise ValueError(f"lavi_threshold must be a positive number, got {lavi_threshold}")
    _cardiac_rules(float(lavi_threshold))  # fail now, before reading any CSV, on a value the registry refuses
    key_name, cts, ct_has_sex = read_ct_csv(ct_csv, key_column)
    echoes = read_echo_csv(echo_csv, require_sex=not ct_has_sex)
    by_patient: dict[str, list[EchoRecord]] = {}
    for e in echoes:
        by_patient.setdefault(e.patient_id, []).append(e)

    counts = {t: TaskCounts() for t in CARDIAC_TASKS}
    rv_pos: Counter[str] = Counter()
    n_matched = n_ties = sex_unknown = 0
    out_rows: list[list[str]] = []
    for ct in cts:
        m = match_echo(ct, by_patient.get(ct.patient_id, ()), window_days)
        if m is None:
            labels = dict.fromkeys(CARDIAC_TASKS, MISSING)
            extra = ["", ""]
        else:
            n_matched += 1
            n_ties += int(m.tied)
            labels = labels_for_echo(m.echo, lavi_threshold=lavi_threshold, fallback_sex=ct.sex)
            if m.echo.sex is None and ct.sex is None:
                sex_unknown += 1
            if labels["reduced_rv_systolic_function"] == 1:
                rv_pos[normalise_rv_text(m.echo.rv_systolic_function) or ""] += 1
            extra = [m.echo.date.strftime("%Y%m%d"), str(m.days_from_ct)]
        for t in CARDIAC_TASKS:
            c = counts[t]
            v = labels[t]
            if v == 1:
                c.positive += 1
            elif v == 0:
                c.negative += 1
            else:
                c.missing += 1
        out_rows.append([ct.key, *(str(labels[t]) for t in CARDIAC_TASKS), *extra])

    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow([key_name, *CARDIAC_TASKS, *OUTPUT_EXTRA_COLUMNS])
            writer.writerows(out_rows)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

    summary = EchoLabelSummary(
        ct_csv=Path(ct_csv).name,
        echo_csv=Path(echo_csv).name,
        out_csv=out.name,
        key_column=key_name,
        lavi_threshold=float(lavi_threshold),
        window_days=int(window_days),
        n_ct=len(cts),
        n_echo_rows=len(echoes),
        n_matched=n_matched,
        n_unmatched=len(cts) - n_matched,
        n_ties=n_ties,
        tasks=counts,
        rv_positive_texts=dict(sorted(rv_pos.items())),
        sex_unknown_matched=sex_unknown,
    )
    logger.info(
        "echo labels: %d CTs, %d matched to an echo within ±%d d (%d ties), LAVI > %g; wrote %s",
        summary.n_ct, n_matched, window_days, n_ties, lavi_threshold, out.name,
    )  # fmt: skip
    if sex_unknown:
        logger.info("%d matched CTs have no usable sex (M/F): ventricular_enlargement = -1", sex_unknown)
    return summary
