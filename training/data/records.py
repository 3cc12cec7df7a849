"""What a training sample is: a scan record (key, patient, labels) plus a source that can load its volume.

Sources are small picklable objects (DataLoader workers receive them) with a stable ``identity()``:
the cache key. Identity covers *what* is read (file names, sizes, mtimes; DICOM UIDs; a synthetic
study's full spec), never where this machine keeps it beyond the path itself, and the cache only
stores its hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from operators.volume import Volume, load_dicom_series


@runtime_checkable
class VolumeSource(Protocol):
    """Something that loads one CT volume."""

    def identity(self) -> str:
        """Stable text that changes whenever the loaded volume would (the cache key)."""
        ...

    def load(self) -> Volume: ...

    def describe(self) -> str:
        """Short human-readable name for messages (file or UID, never a full path)."""
        ...


def _file_stamp(path: Path) -> str:
    st = path.stat()
    return f"{path.as_posix()}:{st.st_size}:{st.st_mtime_ns}"


@dataclass(frozen=True)
class DicomSeriesSource:
    """One DICOM series (the one ``operators.series_selection`` picked for the study)."""

    files: tuple[str, ...]
    study_instance_uid: str
    series_instance_uid: str

    def identity(self) -> str:
        h = hashlib.sha256()
        for f in sorted(self.files):
            h.update(_file_stamp(Path(f)).encode())
        return f"dicom:{self.study_instance_uid}:{self.series_instance_uid}:{len(self.files)}:{h.hexdigest()}"

    def describe(self) -> str:
        return (
            f"series {self.series_instance_uid} of study {self.study_instance_uid} ({len(self.files)} files)"
        )

    def load(self) -> Volume:
        return load_dicom_series(self.files)


@dataclass(frozen=True, eq=False)
class ScanRecord:
    """One volume: unique ``key``, ``patient_id`` (split unit), labels ``[K]`` (1/0/-1) and its source.

    ``scan_id`` groups volumes that are reconstructions of one acquisition (CT-RATE's
    ``train_1_a_1`` and ``train_1_a_2`` are scan ``train_1_a``): evaluation scores per scan, not per
    volume. None = the volume is its own scan.
    """

    key: str
    patient_id: str
    labels: np.ndarray
    source: VolumeSource
    origin: str
    scan_id: str | None = None

    @property
    def scan(self) -> str:
        return self.scan_id or self.key

    @property
    def n_valid(self) -> int:
        return int(np.sum(self.labels != -1))


def permuted_labels(records: Sequence[ScanRecord], seed: int) -> list[ScanRecord]:
    """The label-permutation control: the same scans, each given the labels of another scan (one
    seeded permutation of whole label rows, so prevalences and co-occurrences are kept). A recipe
    trained on these must score at chance on held-out studies; anything better is a leak."""
    perm = np.random.default_rng(seed).permutation(len(records))
    return [replace(r, labels=records[int(j)].labels.copy()) for r, j in zip(records, perm, strict=True)]
