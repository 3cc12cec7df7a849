"""Training data: label CSVs, the three source layouts, patient splits, the cached torch dataset.

Layouts (``DataConfig.kind``; docs/training.md §Data):

* ``ctrate`` — CT-RATE as published: NIfTI volumes + its per-split label and metadata CSVs (:mod:`.ctrate`);
* ``dicom`` — series folders + a label CSV keyed by StudyInstanceUID/AccessionNumber (:mod:`.dicom`);
* ``synthetic_dicom`` — a folder written by ``hyperct synth`` (its ``labels.csv`` at the root);
* ``synthetic`` — in-memory phantoms rendered on the fly (:mod:`.synthetic`).

:func:`build_records` turns a :class:`~training.config.DataConfig` into scan records; :func:`resolve_tasks`
decides which registry tasks a run trains.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from operators.preprocessing import PreprocessingConfig
from training.config import DataConfig
from training.data.dataset import (
    Batch,
    EpochBatches,
    Sample,
    ScanDataset,
    choose_tasks,
    collate,
    epoch_seed,
    prepare,
    sample_tasks,
)
from training.data.labels import MISSING, BadData, DataError, LabelRow, read_label_csv
from training.data.records import DicomSeriesSource, ScanRecord, VolumeSource, permuted_labels
from training.data.splits import (
    SPLITS,
    assign_splits,
    check_patient_disjoint,
    read_split_file,
    split_patients,
    split_records,
)
from training.data.synthetic import (
    VISIBLE_FINDINGS,
    SyntheticStudy,
    design_studies,
    synthetic_records,
    tasks_for_findings,
)
from training.tasks import TaskRegistry

logger = logging.getLogger(__name__)

__all__ = [
    "MISSING",
    "SPLITS",
    "VISIBLE_FINDINGS",
    "BadData",
    "Batch",
    "DataError",
    "DicomSeriesSource",
    "EpochBatches",
    "LabelRow",
    "Sample",
    "ScanDataset",
    "ScanRecord",
    "SyntheticStudy",
    "VolumeSource",
    "assign_splits",
    "build_records",
    "check_patient_disjoint",
    "choose_tasks",
    "collate",
    "design_studies",
    "epoch_seed",
    "permuted_labels",
    "prepare",
    "read_label_csv",
    "read_split_file",
    "resolve_tasks",
    "sample_tasks",
    "split_patients",
    "split_records",
    "synthetic_records",
    "tasks_for_findings",
]

SYNTH_LABELS = "labels.csv"


def _labels_path(cfg: DataConfig) -> Path:
    if cfg.labels:
        return Path(cfg.labels[0])
    if cfg.kind == "synthetic_dicom" and cfg.root:
        return Path(cfg.root) / SYNTH_LABELS
    raise DataError(f"data.labels is required for data.kind={cfg.kind}")


def resolve_tasks(cfg: DataConfig, registry: TaskRegistry) -> list[str]:
    """The task keys to train, in registry order: ``cfg.tasks``, else every task the data labels."""
    if cfg.tasks:
        unknown = [t for t in cfg.tasks if t not in registry]
        if unknown:
            raise DataError(f"data.tasks: unknown task key(s) {', '.join(unknown)} (see training/tasks.json)")
        return [k for k in registry.keys if k in set(cfg.tasks)]
    if cfg.kind == "synthetic":
        return tasks_for_findings(cfg.synthetic.findings, registry)
    found: set[str] = set()
    key_columns = (
        ("VolumeName",) if cfg.kind == "ctrate" else (cfg.key_column, "StudyInstanceUID", "AccessionNumber")
    )
    if cfg.kind == "ctrate":
        from training.data.ctrate import find_files

        label_files = list(find_files(cfg.root or "", cfg.ctrate.splits, cfg.labels, cfg.metadata).labels)
    else:
        label_files = [_labels_path(cfg)]
    for path in (*label_files, *map(Path, cfg.extra_labels)):
        _, keys, _ = read_label_csv(
            path, registry, key_columns=key_columns, bad=BadData(skip=True), require_label=False
        )
        found.update(keys)
    return [k for k in registry.keys if k in found]


def build_records(
    cfg: DataConfig,
    registry: TaskRegistry,
    tasks: Sequence[str],
    bad: BadData | None = None,
    preprocessing: PreprocessingConfig | None = None,
) -> list[ScanRecord]:
    """Scan records for ``cfg`` with labels in ``tasks`` order; bad rows go through ``bad``.

    ``preprocessing`` sets the grid in-memory synthetic studies are rendered on (``model`` geometry).
    """
    bad = bad or BadData(skip=cfg.skip_bad)
    if cfg.kind == "synthetic":
        s = cfg.synthetic
        studies = design_studies(
            s.n_studies, s.findings, prevalence=s.prevalence, seed=s.seed, twins=s.twins, geometry=s.geometry,
            preprocessing=preprocessing,
        )  # fmt: skip
        return synthetic_records(studies, registry, tasks)
    if cfg.kind == "ctrate":
        from training.data.ctrate import ctrate_records

        c = cfg.ctrate
        return ctrate_records(
            cfg.root or "", registry, tasks, labels=cfg.labels, metadata=cfg.metadata,
            extra_labels=cfg.extra_labels, splits=c.splits, release=c.release,
            reconstructions=c.reconstructions, bad=bad,
        )  # fmt: skip
    from training.data.dicom import dicom_records

    return dicom_records(
        cfg.root or "",
        _labels_path(cfg),
        registry,
        tasks,
        key_column=cfg.key_column,
        extra_labels=cfg.extra_labels,
        rules=cfg.series_selection,
        bad=bad,
    )
