"""What flows through the pipeline: one ``StudyCase`` per study found in the input.

Each stage fills its part of a case or stops it with an outcome and a reason, and later stages
skip stopped cases. Passing the cases down one chain (rather than failing the graph) is what lets
a study without an eligible series end in a clear "not processed" outcome instead of an exception,
and lets one bad study in an input folder leave the others alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Kinds of the DICOM result objects in :attr:`StudyCase.files` (what goes to a PACS); a per-finding
#: object's key is ``<kind>:<task key>`` (one Parametric Map per positive finding).
DICOM_FILE_KINDS = ("sr", "seg", "text_sr", "pmap")


def pmap_file_key(task_key: str) -> str:
    """The :attr:`StudyCase.files` key of one finding's Parametric Map."""
    return f"pmap:{task_key}"


def dicom_file_keys(files: Mapping[str, str]) -> list[str]:
    """The keys of ``files`` (a case's or ``results.json``'s) that name DICOM result objects, in
    order: every kind the writers produce, ``results.json`` and anything else left out."""
    return [key for key in files if key.split(":", 1)[0] in DICOM_FILE_KINDS]


class Outcome(str, Enum):
    """How a study ended; ``NOT_PROCESSED`` is a normal end (nothing eligible), not an error."""

    PENDING = "pending"
    PROCESSED = "processed"
    NOT_PROCESSED = "not-processed"
    FAILED = "failed"


@dataclass
class StudyCase:
    """One study on its way through the pipeline (no patient names: UIDs and IDs only)."""

    study_instance_uid: str
    output_folder: Path
    patient_id: str = ""
    accession_number: str = ""
    study: Any = None  # monai.deploy DICOMStudy
    selection: Any = None  # operators.series_selection.SelectionResult
    series_datasets: list[Any] = field(default_factory=list)  # pydicom Datasets of the selected series
    volume: Any = None  # operators.volume.Volume
    model_input: Any = None  # operators.preprocessing.ModelInput
    result: Any = None  # operators.results.StudyResult
    files: dict[str, str] = field(default_factory=dict)  # kind[:task] -> path relative to output_folder
    outcome: Outcome = Outcome.PENDING
    reason: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.outcome is Outcome.PENDING

    def stop(self, outcome: Outcome, reason: str) -> None:
        """End this case; the first stop wins (later stages never overwrite the first reason)."""
        if self.active:
            self.outcome, self.reason = outcome, reason
            log = logger.info if outcome is Outcome.NOT_PROCESSED else logger.error
            log("study %s %s: %s", self.study_instance_uid, outcome.value, reason)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage; an unexpected exception fails this case only, with the error named."""
        t0 = time.perf_counter()
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - one study's failure must not stop the others
            logger.exception("study %s: %s failed", self.study_instance_uid, name)
            self.stop(Outcome.FAILED, f"{name}: {type(exc).__name__}: {exc}")
        finally:
            self.timings[name] = round(time.perf_counter() - t0, 4)

    def run_stage(self, name: str, work: Callable[[StudyCase], None]) -> None:
        """Run one stage on this case if it is still active, timed; an exception fails this case only."""
        if self.active:
            with self.stage(name):
                work(self)

    def summary(self) -> dict[str, Any]:
        """The outcome record written to ``outcome.json`` and returned by ``hyperct run``."""
        return {
            "study_instance_uid": self.study_instance_uid,
            "outcome": self.outcome.value,
            "reason": self.reason,
            "selection": self.selection.to_dict() if self.selection is not None else None,
            "files": dict(self.files),
            "timings_s": dict(self.timings),
            "warnings": list(self.warnings),
        }
