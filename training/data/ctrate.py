"""CT-RATE layout: NIfTI volumes + ``multi_abnormality_labels.csv`` + a metadata CSV.

* **Labels**: ``VolumeName`` + the 18 CT-RATE abnormality columns (= the registry's ``label_column``);
  extra label CSVs keyed by ``VolumeName`` (e.g. ``hyperct labels echo`` output) are joined on it.
* **Metadata**: ``VolumeName``, ``RescaleSlope``, ``RescaleIntercept`` (required: CT-RATE NIfTIs
  store raw values) and, when present, ``XYSpacing`` (``"[0.75, 0.75]"``, row then column) and
  ``ZSpacing``, which replace the header's voxel size when they disagree.
* **Patient id**: CT-RATE names volumes ``<split>_<patient>_<scan>_<reconstruction>.nii.gz``, e.g.
  ``train_1234_a_2.nii.gz`` = patient 1234 of CT-RATE's train set, scan ``a``, reconstruction 2. All
  scans and reconstructions of ``train_1234`` are one patient (kept in one split). ``train_`` and
  ``valid_`` numbering are separate in CT-RATE, so the prefix is part of the id.
* **Files** are found anywhere under ``root`` by name (CT-RATE nests them as
  ``train/train_1234/train_1234_a/train_1234_a_2.nii.gz``; a flat folder works too).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

from training.data.labels import BadData, DataError, label_vector, merge_labels, read_label_csv
from training.data.records import NiftiSource, ScanRecord
from training.tasks import TaskRegistry

logger = logging.getLogger(__name__)

VOLUME_NAME = re.compile(
    r"^(?P<split>[A-Za-z]+)_(?P<patient>[A-Za-z0-9]+)_(?P<scan>[A-Za-z0-9]+)_(?P<recon>\d+)(?:\.nii(?:\.gz)?)?$"
)


def ctrate_patient_id(volume_name: str) -> str:
    """``train_1234_a_2.nii.gz`` → ``train_1234``; ``ValueError`` if the name does not follow CT-RATE."""
    m = VOLUME_NAME.match(Path(volume_name).name)
    if m is None:
        raise ValueError(
            f"{volume_name!r} does not follow CT-RATE's <split>_<patient>_<scan>_<reconstruction>.nii.gz"
        )
    return f"{m.group('split')}_{m.group('patient')}"


def _index_volumes(root: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            if name.endswith((".nii.gz", ".nii")):
                index.setdefault(name, Path(dirpath) / name)
    return index


def _float(text: str | None) -> float | None:
    try:
        v = float(str(text).strip())
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _spacing(xy: str | None, z: str | None) -> tuple[float, float, float] | None:
    if not xy or not z:
        return None
    nums = [_float(v) for v in re.split(r"[\[\],\s]+", xy) if v]
    zs = _float(z)
    if len(nums) != 2 or any(v is None or v <= 0 for v in nums) or zs is None or zs <= 0:
        return None
    row, col = nums
    return (float(col), float(row), float(zs))  # type: ignore[arg-type]


def read_metadata(path: str | Path) -> dict[str, tuple[float, float, tuple[float, float, float] | None]]:
    """``{VolumeName: (slope, intercept, spacing or None)}`` from the CT-RATE metadata CSV."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{file.name}: metadata file not found")
    out: dict[str, tuple[float, float, tuple[float, float, float] | None]] = {}
    with file.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = {f.casefold(): f for f in (reader.fieldnames or [])}
        need = ["volumename", "rescaleslope", "rescaleintercept"]
        missing = [n for n in need if n not in fields]
        if missing:
            raise DataError(
                f"{file.name}: missing column(s) {', '.join(missing)} (header: {', '.join(fields.values())})"
            )
        for n, row in enumerate(reader, start=1):
            name = (row[fields["volumename"]] or "").strip()
            slope, inter = _float(row[fields["rescaleslope"]]), _float(row[fields["rescaleintercept"]])
            if not name or slope is None or inter is None:
                raise DataError(
                    f"{file.name}: row {n} (line {reader.line_num}): need VolumeName, RescaleSlope and RescaleIntercept"
                )
            spacing = _spacing(
                row.get(fields.get("xyspacing", ""), None), row.get(fields.get("zspacing", ""), None)
            )
            out[name] = (slope, inter, spacing)
    return out


def ctrate_records(
    root: str | Path,
    labels: str | Path,
    metadata: str | Path,
    registry: TaskRegistry,
    tasks: Sequence[str],
    *,
    extra_labels: Sequence[str | Path] = (),
    bad: BadData | None = None,
) -> list[ScanRecord]:
    """One :class:`ScanRecord` per labelled volume (label-file order)."""
    bad = bad or BadData()
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"CT-RATE volume folder {root.name!r} does not exist")
    _, _, rows = read_label_csv(labels, registry, key_columns=("VolumeName",), bad=bad)
    extras = [
        read_label_csv(p, registry, key_columns=("VolumeName",), bad=bad, require_label=False)[2]
        for p in extra_labels
    ]
    rows = merge_labels(rows, extras, bad)
    meta = read_metadata(metadata)
    index = _index_volumes(root)
    records: list[ScanRecord] = []
    for key, row in rows.items():
        name = key if key.endswith((".nii", ".nii.gz")) else f"{key}.nii.gz"
        try:
            patient = ctrate_patient_id(name)
        except ValueError as exc:
            bad.report(f"{row.where}: {exc}")
            continue
        path = index.get(name)
        if path is None:
            bad.report(f"{row.where}: volume {name} not found under the CT-RATE folder")
            continue
        m = meta.get(key) or meta.get(name)
        if m is None:
            bad.report(f"{row.where}: volume {name} has no row in the metadata CSV (rescale slope/intercept)")
            continue
        slope, inter, spacing = m
        src = NiftiSource(str(path), slope=slope, intercept=inter, spacing=spacing)
        records.append(ScanRecord(key, patient, label_vector(row.labels, tasks), src, row.where))
    logger.info("CT-RATE: %d volumes of %d labelled rows", len(records), len(rows))
    return records
