"""Base class of the pipeline stages: ``cases`` in, ``cases`` out, one timed stage per active case.

Every stage between the loader and the sink has the same shape (receive the list of
:class:`~operators.study_case.StudyCase`, work on the cases still active, emit the list); only
``process`` differs, so each stage module holds just its own work.
"""

from __future__ import annotations

from typing import Any

from monai.deploy.core import Operator, OperatorSpec

from operators.study_case import StudyCase


class CaseStageOperator(Operator):
    """Subclasses set ``stage`` (the name in timings and error messages) and implement ``process``."""

    stage = "stage"

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("cases")
        spec.output("cases")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        cases: list[StudyCase] = op_input.receive("cases")
        for case in cases:
            if case.active:
                with case.stage(self.stage):
                    self.process(case)
        op_output.emit(cases, "cases")

    def process(self, case: StudyCase) -> None:
        raise NotImplementedError
