"""Preprocessing operator: HU volume → HyperCT model input, by the model manifest's parameters.

A thin wrapper: the one preprocessing lives in :mod:`operators.preprocessing` (training imports
the same module), and its parameters come only from the manifest's ``preprocessing`` section, so a
model is always served with the geometry it was trained on.
"""

from __future__ import annotations

import logging
from typing import Any

from monai.deploy.core import Fragment

from operators.case_stage import CaseStageOperator
from operators.preprocessing import PreprocessingConfig, preprocess
from operators.study_case import Outcome, StudyCase

logger = logging.getLogger(__name__)


def preprocess_case(case: StudyCase, config: PreprocessingConfig) -> None:
    """Fill ``case.model_input`` or stop the case when nothing lies inside the body window."""
    case.model_input = preprocess(case.volume, config)
    if not bool(case.model_input.mask.any()):
        case.stop(Outcome.NOT_PROCESSED, "preprocessing left no image inside the body window")


class PreprocessOperator(CaseStageOperator):
    """``cases`` → ``cases`` with ``model_input`` ([N, 3, 144, 144] images, mask, transform back)."""

    stage = "preprocessing"

    def __init__(self, fragment: Fragment, *args: Any, config: PreprocessingConfig, **kwargs: Any) -> None:
        self.config = config
        super().__init__(fragment, *args, **kwargs)

    def process(self, case: StudyCase) -> None:
        preprocess_case(case, self.config)
