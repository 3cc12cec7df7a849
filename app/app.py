"""The HyperCT MONAI Deploy application: DICOM study → series selection → volume → HyperCT → SR + SEG.

``compose()`` builds the graph from the one stage list (:data:`app.pipeline.STAGES`): the study
loader, one :class:`~operators.stage_operator.CaseStageOperator` per stage, and the outcome sink.
This graph serves ``hyperct run`` and the MAP entry (``python -m app`` / ``HOLOSCAN_*`` paths);
``hyperct process`` and the node run the same stages in-process through
:class:`~app.pipeline.Pipeline`.
"""

from __future__ import annotations

import logging
from itertools import pairwise
from pathlib import Path
from typing import Any

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application

from app.config import AppConfig
from app.pipeline import STAGES, Pipeline
from operators.onnx_model import register_hyperct_model
from operators.outcome_writer import OutcomeWriterOperator
from operators.stage_operator import CaseStageOperator
from operators.study_loader import StudyLoaderOperator

logger = logging.getLogger(__name__)


class HyperCTApp(Application):
    """HyperCT Node application (research use only)."""

    name = "hyperct"
    description = "HyperCT multi-task chest CT: TID 1500 SR + attention-map SEG. Research use only."
    version = "0.1.0"

    def __init__(
        self,
        argv: list[str] | None = None,
        *args: Any,
        pipeline: Pipeline | None = None,
        config: AppConfig | None = None,
        **kwargs: Any,
    ) -> None:
        self.pipeline = pipeline
        self.app_config = config
        self.summaries: list[dict[str, Any]] = []
        self._sink: OutcomeWriterOperator | None = None
        super().__init__(argv, *args, **kwargs)

    def compose(self) -> None:
        register_hyperct_model()
        ctx = Application.init_app_context(self.argv)  # -i/-o/-m or HOLOSCAN_INPUT/OUTPUT/MODEL_PATH
        input_folder, output_folder = Path(ctx.input_path), Path(ctx.output_path)
        if self.pipeline is None:
            self.pipeline = Pipeline(ctx.model_path, self.app_config)
        pipeline = self.pipeline
        _ = pipeline.runner  # load the model before the graph starts (a missing model fails here)

        loader = StudyLoaderOperator(
            self, CountCondition(self, 1), input_folder=input_folder, output_folder=output_folder, name="study_loader"
        )
        stages = [
            CaseStageOperator(self, stage=stage.name, work=pipeline.work(stage), name=stage.name.replace("-", "_"))
            for stage in STAGES
        ]
        self._sink = OutcomeWriterOperator(self, output_folder=output_folder, name="outcome_writer")
        chain = [loader, *stages, self._sink]
        for upstream, downstream in pairwise(chain):
            self.add_flow(upstream, downstream, {("cases", "cases")})

    def run(self, *args: Any, **kwargs: Any) -> Any:
        out = super().run(*args, **kwargs)
        self.summaries = list(self._sink.summaries) if self._sink is not None else []
        return out


def run_graph(
    input_folder: Path, output_folder: Path, pipeline: Pipeline, *, log_level: str = "WARN"
) -> list[dict[str, Any]]:
    """Run the MONAI Deploy graph once over a folder (``hyperct run``); one outcome record per study."""
    output_folder.mkdir(parents=True, exist_ok=True)
    # Holoscan drops argv[0] as the interpreter and self.argv[0] as the program: give both.
    argv = ["python", "hyperct", "-i", str(input_folder), "-o", str(output_folder), "-m", str(pipeline.model_path), "-l", log_level]
    app = HyperCTApp(argv, pipeline=pipeline)
    app.run()
    return app.summaries


EXIT_OK = 0
EXIT_FAILED = 1
EXIT_NOT_PROCESSED = 3  # hyperct run: nothing eligible (documented); the MAP entry exits 0 instead


def exit_code(summaries: list[dict[str, Any]], *, map_entry: bool) -> int:
    """0 when every study was processed; failures give 1; "nothing eligible" gives 3 for ``hyperct
    run`` but 0 for the MAP entry (workflow managers retry non-zero exits, and a retry cannot help)."""
    outcomes = {s["outcome"] for s in summaries}
    if "failed" in outcomes or not summaries:
        return EXIT_FAILED
    if "processed" not in outcomes and not map_entry:
        return EXIT_NOT_PROCESSED
    return EXIT_OK
