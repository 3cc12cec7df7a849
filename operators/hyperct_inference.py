"""HyperCT inference operator: every task of the manifest on one study, via ONNX Runtime.

Sessions live in a :class:`~operators.model_runner.HyperCTRunner` created once per process and
handed to the app (``run``, ``process`` and ``serve`` reuse it across studies); this operator only
turns the runner's logits into decisions by the manifest thresholds and puts the attention maps of
positive findings back on the source geometry for the SEG writer.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from monai.deploy.core import Fragment

from operators.case_stage import CaseStageOperator
from operators.manifest import manifest_sha256
from operators.model_runner import HyperCTRunner
from operators.preprocessing import model_map_to_source
from operators.results import ModelInfo, StudyResult, TaskResult
from operators.study_case import StudyCase

logger = logging.getLogger(__name__)


def infer_case(case: StudyCase, runner: HyperCTRunner, model: ModelInfo) -> None:
    """Fill ``case.result``: per-task probability, decision, and source-space attention maps."""
    outputs = runner.run_input(case.model_input)
    tasks: list[TaskResult] = []
    for entry in runner.manifest.tasks:
        out = outputs[entry.key]
        result = TaskResult.from_manifest(entry, out.logit, probability=out.probability)
        if result.present and result.saliency and out.attention is not None:
            # Only positive findings get a SEG segment, and a full-resolution float map is ~300 MB:
            # resample just those.
            source_map = model_map_to_source(out.attention, case.model_input.transform, case.volume)
            result = replace(result, attention=source_map)
        tasks.append(result)
        logger.info(
            "study %s: %s p=%.4f threshold=%.3f %s",
            case.study_instance_uid,
            entry.key,
            result.probability,
            result.threshold,
            result.decision,
        )
    volume = case.volume
    case.result = StudyResult(
        study_instance_uid=case.study_instance_uid,
        series_instance_uid=str(volume.series_instance_uid),
        sop_instance_uids=list(volume.sop_instance_uids or []),
        tasks=tasks,
        model=model,
        frame_of_reference_uid=volume.frame_of_reference_uid,
        selection=case.selection.to_dict() if case.selection is not None else {},
    )


class HyperCTInferenceOperator(CaseStageOperator):
    """``cases`` → ``cases`` with ``result`` (a :class:`~operators.results.StudyResult`)."""

    stage = "inference"

    def __init__(self, fragment: Fragment, *args: Any, runner: HyperCTRunner, **kwargs: Any) -> None:
        self.runner = runner
        self.model = ModelInfo.from_manifest(runner.manifest, manifest_sha256(runner.model_dir))
        super().__init__(fragment, *args, **kwargs)

    def process(self, case: StudyCase) -> None:
        infer_case(case, self.runner, self.model)
