"""DICOM layout: series folders (any layout) + a label CSV keyed by StudyInstanceUID or AccessionNumber.

The series of each study is chosen by ``operators.series_selection`` — the same rules and ranking the
node uses when serving — so a model is trained on the series it will later be shown. Patient id: the
CSV's ``PatientID`` column when present, else the DICOM PatientID of the study.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pydicom

from operators.series_selection import SelectionRules, SeriesSummary, scan_folder, select_series
from training.data.labels import BadData, DataError, label_vector, merge_labels, read_label_csv
from training.data.records import DicomSeriesSource, ScanRecord
from training.tasks import TaskRegistry

logger = logging.getLogger(__name__)

KEY_COLUMNS = ("StudyInstanceUID", "AccessionNumber")


def _accession(series: Sequence[SeriesSummary]) -> str:
    for s in series:
        for f in s.files[:1]:
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["AccessionNumber"])
            except Exception:  # noqa: BLE001 - unreadable files were already filtered by scan_folder
                continue
            return str(ds.get("AccessionNumber", "") or "").strip()
    return ""


def dicom_records(
    root: str | Path,
    labels: str | Path,
    registry: TaskRegistry,
    tasks: Sequence[str],
    *,
    key_column: str = "StudyInstanceUID",
    extra_labels: Sequence[str | Path] = (),
    rules: Mapping[str, Any] | SelectionRules | None = None,
    bad: BadData | None = None,
) -> list[ScanRecord]:
    """One record per labelled study whose series selection succeeds (label-file order)."""
    bad = bad or BadData()
    if key_column not in KEY_COLUMNS:
        raise DataError(f"key column must be one of {', '.join(KEY_COLUMNS)}, got {key_column!r}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"DICOM folder {root.name!r} does not exist")
    selection = rules if isinstance(rules, SelectionRules) else SelectionRules.from_dict(rules or None)
    _, _, rows = read_label_csv(labels, registry, key_columns=(key_column,), bad=bad)
    extras = [
        read_label_csv(p, registry, key_columns=(key_column,), bad=bad, require_label=False)[2]
        for p in extra_labels
    ]
    rows = merge_labels(rows, extras, bad)

    by_study: dict[str, list[SeriesSummary]] = defaultdict(list)
    for s in scan_folder(root):
        by_study[s.study_instance_uid].append(s)
    if key_column == "AccessionNumber":
        by_key: dict[str, list[SeriesSummary]] = {}
        for uid, series in by_study.items():
            acc = _accession(series)
            if acc in by_key:
                raise DataError(f"AccessionNumber {acc!r} is shared by two studies (one is {uid})")
            if acc:
                by_key[acc] = series
    else:
        by_key = dict(by_study)
    logger.info("DICOM: %d studies found under %s", len(by_key), root.name)

    records: list[ScanRecord] = []
    for key, row in rows.items():
        candidates = by_key.get(key)
        if candidates is None:
            bad.report(f"{row.where}: no DICOM study with {key_column} {key} under the DICOM folder")
            continue
        result = select_series(candidates, selection)
        if result.selected is None:
            bad.report(f"{row.where}: study {key}: {result.why}")
            continue
        chosen = result.selected
        patient = row.ids.get("PatientID") or row.ids.get("patient_id") or chosen.patient_id
        if not patient:
            bad.report(f"{row.where}: study {key} has no PatientID (needed for the patient-level split)")
            continue
        src = DicomSeriesSource(
            files=tuple(str(f) for f in chosen.files),
            study_instance_uid=chosen.study_instance_uid,
            series_instance_uid=chosen.series_instance_uid,
        )
        records.append(ScanRecord(key, patient, label_vector(row.labels, tasks), src, row.where))
    logger.info(
        "DICOM: %d labelled studies with a selected series (of %d label rows)", len(records), len(rows)
    )
    return records
