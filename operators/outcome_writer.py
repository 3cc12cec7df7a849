"""The pipeline's sink operator: ``outcome.json`` for the run, the case summaries for the caller.

``outcome.json`` is what a workflow manager (and ``hyperct run``) reads: one record per study with
its outcome (processed / not-processed / failed), the reason, the series selection verdicts, the
files written and the stage timings. ``results.json`` per study is the pipeline's last stage
(:func:`operators.stages.write_results_json`); this sink only gathers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from monai.deploy.core import Fragment, Operator, OperatorSpec

from operators.stages import write_outcome_json
from operators.study_case import StudyCase


class OutcomeWriterOperator(Operator):
    """Sink: writes ``outcome.json`` and keeps the case summaries for the caller."""

    def __init__(self, fragment: Fragment, *args: Any, output_folder: Path, **kwargs: Any) -> None:
        self.output_folder = Path(output_folder)
        self.summaries: list[dict[str, Any]] = []
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("cases")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        cases: list[StudyCase] = op_input.receive("cases")
        self.summaries = [c.summary() for c in cases]
        write_outcome_json(self.output_folder, self.summaries)
