"""The one pipeline: the stage list and how one study runs through it.

Every entry point goes through here. ``hyperct run`` and the MAP entry (``python -m app``) run the
MONAI Deploy graph that :meth:`app.app.HyperCTApp.compose` builds from :data:`STAGES`, one operator
per stage; ``hyperct process`` and the node's worker call :meth:`Pipeline.run_folder` /
:meth:`Pipeline.run_stages` in-process (no Holoscan application per study, no argv, no signal
handlers to take back). Only the source (folder, archive index, spool snapshot) and the sink
(folder, findings table, outbox) differ, so a study gives the same files, ``results.json`` and
``outcome.json`` record whichever way it came in.

:class:`Pipeline` is also the one place that builds the model runner and the model's identity
(:class:`~operators.results.ModelInfo` with the manifest hash) from a model folder and ``app.yaml``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.config import AppConfig, InferenceOptions

if TYPE_CHECKING:
    from operators.model_runner import HyperCTRunner
    from operators.preprocessing import PreprocessingConfig
    from operators.results import ModelInfo
    from operators.study_case import StudyCase

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: its name (in timings, logs and errors) and its work on one case."""

    name: str
    work: Callable[[Pipeline, StudyCase], None]


def _select(p: Pipeline, case: StudyCase) -> None:
    from operators.stages import select_case_series

    select_case_series(case, p.config.series_selection)


def _volume(p: Pipeline, case: StudyCase) -> None:
    from operators.stages import load_case_volume

    load_case_volume(case, p.config.volume_checks)


def _preprocess(p: Pipeline, case: StudyCase) -> None:
    from operators.stages import preprocess_case

    preprocess_case(case, p.preprocessing)


def _infer(p: Pipeline, case: StudyCase) -> None:
    from operators.stages import infer_case

    infer_case(case, p.runner, p.model)


def _write_dicom(p: Pipeline, case: StudyCase) -> None:
    from operators.stages import write_case_dicom

    write_case_dicom(case, p.config.outputs)


def _write_key_images(p: Pipeline, case: StudyCase) -> None:
    from operators.stages import write_case_key_images

    write_case_key_images(case, p.config.outputs)


def _write_results(p: Pipeline, case: StudyCase) -> None:
    from operators.stages import write_results_json

    write_results_json(case)


#: The stages in order. Batch processing overlaps them across studies: ``PREPARE`` on loader
#: threads, ``INFER`` on the thread that owns the ONNX sessions, ``WRITE`` on a writer thread.
PREPARE: tuple[Stage, ...] = (
    Stage("series-selection", _select),
    Stage("volume-load", _volume),
    Stage("preprocessing", _preprocess),
)
INFER: tuple[Stage, ...] = (Stage("inference", _infer),)
WRITE: tuple[Stage, ...] = (
    Stage("dicom-writers", _write_dicom),
    Stage("key-images", _write_key_images),
    Stage("results-json", _write_results),
)
STAGES: tuple[Stage, ...] = (*PREPARE, *INFER, *WRITE)


def build_runner(model_path: Path, options: InferenceOptions | None = None) -> HyperCTRunner:
    """The model runner for a model folder, placed and sized by ``app.yaml``'s ``inference`` section."""
    from operators.model_runner import HyperCTRunner

    options = options or InferenceOptions()
    return HyperCTRunner(
        model_path,
        options.session_options(),
        max_resident=options.max_resident_sessions,
        budget_mb=options.memory_budget_mb,
    )


class Pipeline:
    """What one process needs to run studies: the configuration, the model runner (ONNX Runtime
    sessions created once and kept for the life of the process), the model's identity and the
    manifest's preprocessing."""

    def __init__(
        self, model_path: Path | str, config: AppConfig | None = None, *, runner: HyperCTRunner | None = None
    ) -> None:
        self.model_path = Path(model_path)
        self.config = config or AppConfig.load()
        self._runner = runner

    @property
    def runner(self) -> HyperCTRunner:
        """Built on first use (the node starts receiving before the model is loaded)."""
        if self._runner is None:
            self._runner = build_runner(self.model_path, self.config.inference)
        return self._runner

    @cached_property
    def manifest_sha256(self) -> str:
        from operators.manifest import manifest_sha256

        return manifest_sha256(self.runner.model_dir)

    @cached_property
    def model(self) -> ModelInfo:
        from operators.results import ModelInfo

        return ModelInfo.from_manifest(self.runner.manifest, self.manifest_sha256)

    @cached_property
    def preprocessing(self) -> PreprocessingConfig:
        from operators.preprocessing import PreprocessingConfig

        return PreprocessingConfig.from_dict(self.runner.manifest.preprocessing)

    def work(self, stage: Stage) -> Callable[[StudyCase], None]:
        """``stage`` bound to this pipeline: what the graph's operator for the stage calls."""
        return lambda case: stage.work(self, case)

    def run_stages(self, case: StudyCase, stages: Iterable[Stage] = STAGES) -> StudyCase:
        """Run ``stages`` on one case, each timed; a stopped or failed case skips the rest."""
        for stage in stages:
            case.run_stage(stage.name, self.work(stage))
        return case

    def run_folder(self, input_folder: Path, output_folder: Path) -> list[dict[str, Any]]:
        """Every study in a folder through all stages, in-process; writes ``outcome.json`` like the
        graph's sink and returns the same records."""
        from operators.stages import write_outcome_json
        from operators.study_loader import load_cases

        output_folder = Path(output_folder)
        output_folder.mkdir(parents=True, exist_ok=True)
        cases, _ = load_cases(Path(input_folder), output_folder)
        for case in cases:
            self.run_stages(case)
        summaries = [case.summary() for case in cases]
        write_outcome_json(output_folder, summaries)
        return summaries

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
