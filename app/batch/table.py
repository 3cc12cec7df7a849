"""The batch run's tables, rebuilt from the ledger and the index (never appended to).

``findings.csv`` / ``findings.parquet``: one row per processed study × task. ``studies.csv``: one
row per study taken by the run, with its outcome. ``errors.csv``: every skipped file and every
study that was not processed or failed, and every result send kept as failed (``--send-to``), with
a reason a person can act on; ``sends.csv``: every result object and destination with its state. Rebuilding from the
ledger is what keeps an interrupted-and-resumed run free of duplicate rows.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from operators.stages import atomic_temp

logger = logging.getLogger(__name__)

FINDINGS_CSV = "findings.csv"
FINDINGS_PARQUET = "findings.parquet"
STUDIES_CSV = "studies.csv"
ERRORS_CSV = "errors.csv"

FINDING_COLUMNS: tuple[tuple[str, str], ...] = (
    ("study_instance_uid", "string"),
    ("patient_id", "string"),
    ("accession_number", "string"),
    ("study_date", "string"),
    ("series_instance_uid", "string"),
    ("task_key", "string"),
    ("task_name", "string"),
    ("task_group", "string"),
    ("probability", "float64"),
    ("threshold", "float64"),
    ("decision", "string"),
    ("outcome", "string"),
    ("model_name", "string"),
    ("model_version", "string"),
    ("manifest_sha256", "string"),
)
#: Ledger column → table column where they differ.
RENAMES = {
    "study_uid": "study_instance_uid",
    "accession": "accession_number",
    "selected_series": "series_instance_uid",
}
ERROR_COLUMNS = ("kind", "item", "reason")
STUDY_COLUMNS = (
    "study_instance_uid", "patient_id", "accession_number", "study_date", "outcome", "reason",
    "series_instance_uid", "seconds",
)  # fmt: skip


def _renamed(row: dict[str, Any]) -> dict[str, Any]:
    return {RENAMES.get(k, k): v for k, v in row.items()}


def _atomic_csv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    fd, tmp = atomic_temp(path)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow(
                    {k: ("" if v is None else repr(v) if isinstance(v, float) else v) for k, v in row.items()}
                )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    """Parquet with a fixed schema (an empty run still gives a readable, typed file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [(name, pa.float64() if kind == "float64" else pa.string()) for name, kind in FINDING_COLUMNS]
    )
    table = pa.Table.from_pylist([{n: r.get(n) for n, _ in FINDING_COLUMNS} for r in rows], schema=schema)
    fd, tmp = atomic_temp(path)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_tables(
    out: Path,
    findings: list[dict[str, Any]],
    studies: list[dict[str, Any]],
    file_errors: list[tuple[str, str]],
    *,
    sends: list[dict[str, Any]] | None = None,
) -> dict[str, Path]:
    """Write the four tables into ``out`` (five with ``sends``: every outbox row of a ``--send-to``
    run, failed ones also in ``errors.csv``); returns their paths by name."""
    from app.batch.send import SEND_COLUMNS, SENDS_CSV, send_errors

    findings = [_renamed(r) for r in findings]
    studies = [_renamed(r) for r in studies]
    paths = {name: out / name for name in (FINDINGS_CSV, FINDINGS_PARQUET, STUDIES_CSV, ERRORS_CSV)}
    _atomic_csv(paths[FINDINGS_CSV], [n for n, _ in FINDING_COLUMNS], findings)
    write_parquet(paths[FINDINGS_PARQUET], findings)
    _atomic_csv(paths[STUDIES_CSV], STUDY_COLUMNS, studies)
    errors = [{"kind": "file", "item": origin, "reason": reason} for origin, reason in file_errors]
    errors += [
        {"kind": "study", "item": s["study_instance_uid"], "reason": f"{s['outcome']}: {s['reason']}"}
        for s in studies
        if s["outcome"] != "processed"
    ]
    if sends is not None:
        paths[SENDS_CSV] = out / SENDS_CSV
        _atomic_csv(paths[SENDS_CSV], SEND_COLUMNS, sends)
        errors += send_errors(sends)
    _atomic_csv(paths[ERRORS_CSV], ERROR_COLUMNS, errors)
    logger.info("tables: %d finding rows, %d studies, %d errors", len(findings), len(studies), len(errors))
    return paths
