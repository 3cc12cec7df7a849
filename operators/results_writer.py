"""Results sink: ``results.json`` per processed study and ``outcome.json`` for the whole run.

``outcome.json`` is what a workflow manager (and ``hyperct run``) reads: one record per study with
its outcome (processed / not-processed / failed), the reason, the series selection verdicts, the
files written and the stage timings. Files are written atomically (temp file, fsync, rename) so a
crash never leaves a half-written JSON that a later reader would trust.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from monai.deploy.core import Fragment, Operator, OperatorSpec

from operators.study_case import Outcome, StudyCase

logger = logging.getLogger(__name__)

OUTCOME_FILE = "outcome.json"
RESULTS_FILE = "results.json"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temp file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finish_case(case: StudyCase) -> None:
    """Write ``results.json`` for a processed study and mark it processed."""
    if not case.active:
        return
    with case.stage("results-json"):
        folder = case.output_folder / case.study_instance_uid
        result = case.result.with_outputs(files=dict(case.files), timings_s=dict(case.timings))
        write_json_atomic(folder / RESULTS_FILE, result.to_dict())
        case.files["results"] = str((folder / RESULTS_FILE).relative_to(case.output_folder))
    if case.active:
        case.outcome = Outcome.PROCESSED
        positives = [t.key for t in case.result.tasks if t.present]
        logger.info("study %s processed: %d positive finding(s) %s", case.study_instance_uid, len(positives), positives)


class ResultsWriterOperator(Operator):
    """Sink: writes the JSON results and keeps the case summaries for the caller."""

    def __init__(self, fragment: Fragment, *args: Any, output_folder: Path, **kwargs: Any) -> None:
        self.output_folder = Path(output_folder)
        self.summaries: list[dict[str, Any]] = []
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("cases")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        cases: list[StudyCase] = op_input.receive("cases")
        for case in cases:
            finish_case(case)
        self.summaries = [c.summary() for c in cases]
        write_json_atomic(self.output_folder / OUTCOME_FILE, {"studies": self.summaries})
