"""Preprocessing operator: HU volume → HyperCT model input, by the model manifest's parameters.

A thin wrapper: the one preprocessing lives in :mod:`operators.preprocessing` (training imports
the same module), and its parameters come only from the manifest's ``preprocessing`` section, so a
model is always served with the geometry it was trained on.
"""

from __future__ import annotations

import logging
from typing import Any

from monai.deploy.core import Fragment, Operator, OperatorSpec

from operators.preprocessing import PreprocessingConfig, preprocess
from operators.study_case import Outcome, StudyCase

logger = logging.getLogger(__name__)


class PreprocessOperator(Operator):
    """``cases`` → ``cases`` with ``model_input`` ([N, 3, 144, 144] images, mask, transform back)."""

    def __init__(self, fragment: Fragment, *args: Any, config: PreprocessingConfig, **kwargs: Any) -> None:
        self.config = config
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("cases")
        spec.output("cases")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        cases: list[StudyCase] = op_input.receive("cases")
        for case in cases:
            if case.active:
                with case.stage("preprocessing"):
                    case.model_input = preprocess(case.volume, self.config)
                    if not bool(case.model_input.mask.any()):
                        case.stop(Outcome.NOT_PROCESSED, "preprocessing left no image inside the body window")
        op_output.emit(cases, "cases")
