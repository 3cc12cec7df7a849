"""The HyperCT MONAI Deploy application: DICOM study → series selection → volume → HyperCT → SR + SEG.

``compose()`` reads like the data flow. The same application serves ``hyperct run``, the MAP
entry (``python -m app`` / ``HOLOSCAN_*`` paths), and later ``process`` and ``serve``: those pass a
:class:`~operators.model_runner.HyperCTRunner` created once per process, so ONNX Runtime sessions
are not rebuilt for every study.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application

from app.config import AppConfig
from operators.dicom_writer import DicomResultWriterOperator, write_case_dicom
from operators.hyperct_inference import HyperCTInferenceOperator, infer_case
from operators.model_runner import HyperCTRunner
from operators.onnx_model import register_hyperct_model
from operators.preprocessing import PreprocessingConfig
from operators.preprocessor import PreprocessOperator, preprocess_case
from operators.results import ModelInfo
from operators.results_writer import ResultsWriterOperator, finish_case
from operators.series_selector import SeriesSelectorOperator, select_case_series
from operators.study_case import StudyCase
from operators.study_loader import StudyLoaderOperator
from operators.volume_loader import VolumeLoaderOperator, load_case_volume

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
        runner: HyperCTRunner | None = None,
        config: AppConfig | None = None,
        **kwargs: Any,
    ) -> None:
        self.runner = runner
        self.app_config = config
        self.summaries: list[dict[str, Any]] = []
        self._sink: ResultsWriterOperator | None = None
        super().__init__(argv, *args, **kwargs)

    def compose(self) -> None:
        register_hyperct_model()
        ctx = Application.init_app_context(self.argv)  # -i/-o/-m or HOLOSCAN_INPUT/OUTPUT/MODEL_PATH
        input_folder, output_folder = Path(ctx.input_path), Path(ctx.output_path)
        config = self.app_config or AppConfig.load()
        runner = self.runner or HyperCTRunner(
            ctx.model_path,
            config.inference.session_options(),
            max_resident=config.inference.max_resident_sessions,
            budget_mb=config.inference.memory_budget_mb,
        )
        self.runner = runner
        preprocessing = PreprocessingConfig.from_dict(runner.manifest.preprocessing)

        study_loader = StudyLoaderOperator(
            self, CountCondition(self, 1), input_folder=input_folder, output_folder=output_folder, name="study_loader"
        )
        series_selector = SeriesSelectorOperator(self, rules=config.selection, name="series_selector")
        volume_loader = VolumeLoaderOperator(self, checks=config.volume_checks, name="volume_loader")
        preprocessor = PreprocessOperator(self, config=preprocessing, name="preprocessor")
        inference = HyperCTInferenceOperator(self, runner=runner, name="hyperct_inference")
        dicom_writer = DicomResultWriterOperator(self, options=config.outputs, name="dicom_writer")
        results_writer = ResultsWriterOperator(self, output_folder=output_folder, name="results_writer")
        self._sink = results_writer

        self.add_flow(study_loader, series_selector, {("cases", "cases")})
        self.add_flow(series_selector, volume_loader, {("cases", "cases")})
        self.add_flow(volume_loader, preprocessor, {("cases", "cases")})
        self.add_flow(preprocessor, inference, {("cases", "cases")})
        self.add_flow(inference, dicom_writer, {("cases", "cases")})
        self.add_flow(dicom_writer, results_writer, {("cases", "cases")})

    def run(self, *args: Any, **kwargs: Any) -> Any:
        out = super().run(*args, **kwargs)
        self.summaries = list(self._sink.summaries) if self._sink is not None else []
        return out


def _run_stages(case: StudyCase, stages: tuple[tuple[str, Callable[[], None]], ...]) -> StudyCase:
    """Each stage on an active case, timed, failing only this case (as ``CaseStageOperator`` does)."""
    for name, work in stages:
        if case.active:
            with case.stage(name):
                work()
    return case


def prepare_case(case: StudyCase, config: AppConfig, preprocessing: PreprocessingConfig) -> StudyCase:
    """The CPU-side stages before the model (selection, volume, preprocessing) on one loaded study.

    Hooks for ``hyperct process``, which runs the graph's stages as a pipeline over many studies
    (next studies load while this one is inferred and the previous one written): the operators'
    own stage functions and stage names, without a graph per study.
    """
    return _run_stages(
        case,
        (
            (SeriesSelectorOperator.stage, lambda: select_case_series(case, config.selection)),
            (VolumeLoaderOperator.stage, lambda: load_case_volume(case, config.volume_checks)),
            (PreprocessOperator.stage, lambda: preprocess_case(case, preprocessing)),
        ),
    )


def infer_prepared_case(case: StudyCase, runner: HyperCTRunner, model: ModelInfo) -> StudyCase:
    """The inference stage of a prepared case."""
    return _run_stages(case, ((HyperCTInferenceOperator.stage, lambda: infer_case(case, runner, model)),))


def write_case_results(case: StudyCase, config: AppConfig) -> dict[str, Any]:
    """DICOM writers and ``results.json`` of an inferred case; its outcome record."""
    _run_stages(case, ((DicomResultWriterOperator.stage, lambda: write_case_dicom(case, config.outputs)),))
    finish_case(case)
    return case.summary()


def process_folder(
    input_folder: Path,
    output_folder: Path,
    model_path: Path,
    *,
    runner: HyperCTRunner | None = None,
    config: AppConfig | None = None,
    log_level: str = "WARN",
) -> list[dict[str, Any]]:
    """Run the application once over a folder and return one outcome record per study."""
    output_folder.mkdir(parents=True, exist_ok=True)
    # Holoscan drops argv[0] as the interpreter and self.argv[0] as the program: give both.
    argv = ["python", "hyperct", "-i", str(input_folder), "-o", str(output_folder), "-m", str(model_path), "-l", log_level]
    app = HyperCTApp(argv, runner=runner, config=config)
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
