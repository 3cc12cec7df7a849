"""The MONAI Deploy operator of one pipeline stage: ``cases`` in, ``cases`` out.

Every stage between the loader and the sink has the same shape (receive the list of
:class:`~operators.study_case.StudyCase`, work on the cases still active, emit the list), so one
operator class runs any of them: ``compose()`` builds one per entry of :data:`app.pipeline.STAGES`
and the graph is exactly the stage list that ``hyperct process`` and the node run in-process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from monai.deploy.core import Fragment, Operator, OperatorSpec

from operators.study_case import StudyCase


class CaseStageOperator(Operator):
    """Runs ``work`` on each active case, timed under ``stage``; a failure fails that case only."""

    def __init__(
        self, fragment: Fragment, *args: Any, stage: str, work: Callable[[StudyCase], None], **kwargs: Any
    ) -> None:
        self.stage = stage
        self.work = work
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("cases")
        spec.output("cases")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        cases: list[StudyCase] = op_input.receive("cases")
        for case in cases:
            case.run_stage(self.stage, self.work)
        op_output.emit(cases, "cases")
