"""What each pipeline stage does to one :class:`~operators.study_case.StudyCase`.

One function per stage, each filling its part of the case or stopping it with an outcome and a
reason. :mod:`app.pipeline` lists them in order; the MONAI Deploy graph (one
:class:`~operators.stage_operator.CaseStageOperator` per stage), ``hyperct process`` and the node all
call these same functions, so a study gives the same results whichever way it came in. The work
itself lives in the cores (series selection, volume, preprocessing, runner, SR/SEG writers).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from operators.attention_region import Body
from operators.dicom_output import save
from operators.key_images import (
    KEY_IMAGES_DIR,
    KeyImageMeta,
    key_image_file_key,
    key_image_name,
    plan_key_images,
    render_key_image,
)
from operators.model_runner import HyperCTRunner
from operators.pmap_writer import write_pmaps
from operators.preprocessing import PreprocessingConfig, model_map_to_source, preprocess
from operators.results import ModelInfo, StudyResult, TaskResult
from operators.seg_writer import build_seg
from operators.series_selection import SelectionRules, select_series, summarize_series
from operators.settings import WriterOptions
from operators.sr_writer import build_sr
from operators.study_case import Outcome, StudyCase, pmap_file_key
from operators.text_report import build_text_sr
from operators.volume import VolumeChecks, VolumeError, check_volume, load_dicom_series

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
OUTCOME_FILE = "outcome.json"


def select_case_series(case: StudyCase, rules: SelectionRules) -> None:
    """Fill ``case.selection`` and ``case.series_datasets`` or stop the case with the reasons."""
    pairs = []
    for series in case.study.get_all_series():
        for inst in series.get_sop_instances():
            ds = inst.get_native_sop_instance()
            pairs.append((Path(str(getattr(ds, "filename", "") or "")), ds))
    summaries = summarize_series(pairs)
    result = select_series(summaries, rules)
    case.selection = result
    if result.selected is None:
        case.stop(Outcome.NOT_PROCESSED, result.why)
        return
    uid = result.selected.series_instance_uid
    case.series_datasets = [ds for _, ds in pairs if str(ds.SeriesInstanceUID) == uid]


def load_case_volume(case: StudyCase, checks: VolumeChecks) -> None:
    """Fill ``case.volume`` or stop the case with the reason."""
    try:
        volume = load_dicom_series(case.series_datasets)
    except VolumeError as exc:
        case.stop(Outcome.NOT_PROCESSED, f"series refused: {exc}")
        return
    reason = check_volume(volume, checks)
    if reason is not None:
        case.stop(Outcome.NOT_PROCESSED, f"series refused: {reason}")
        return
    case.volume = volume
    logger.info(
        "study %s: volume %s voxels, spacing %s mm",
        case.study_instance_uid,
        "x".join(map(str, volume.shape)),
        ", ".join(f"{s:.3g}" for s in volume.spacing),
    )


def preprocess_case(case: StudyCase, config: PreprocessingConfig) -> None:
    """Fill ``case.model_input`` or stop the case when nothing lies inside the body window."""
    case.model_input = preprocess(case.volume, config)
    if not bool(case.model_input.mask.any()):
        case.stop(Outcome.NOT_PROCESSED, "preprocessing left no image inside the body window")


def infer_case(case: StudyCase, runner: HyperCTRunner, model: ModelInfo) -> None:
    """Fill ``case.result``: per-task probability, decision, and source-space attention maps."""
    outputs = runner.run_input(case.model_input)
    tasks: list[TaskResult] = []
    for entry in runner.manifest.tasks:
        out = outputs[entry.key]
        result = TaskResult.from_manifest(entry, out.logit, probability=out.probability)
        if result.present and result.saliency and out.attention is not None:
            # Only positive findings get a map and a SEG segment, and a full-resolution float map
            # is ~300 MB: resample just those.
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
        sop_instance_uids=tuple(volume.sop_instance_uids or ()),
        frame_numbers=volume.frame_numbers,
        tasks=tuple(tasks),
        model=model,
        frame_of_reference_uid=volume.frame_of_reference_uid,
        selection=case.selection.to_dict() if case.selection is not None else {},
    )


def study_folder(case: StudyCase) -> Path:
    """Each study's results go to ``OUT/<StudyInstanceUID>/``."""
    return case.output_folder / case.study_instance_uid


def _body(case: StudyCase, options: WriterOptions) -> Body | None:
    """The study's body for the focal SEG region, computed only when it is the rule and a finding can
    get a segment (it reads the whole volume once)."""
    if options.seg_region != "focal":
        return None
    if not any(t.present and t.saliency and t.attention is not None for t in case.result.tasks):
        return None
    return Body.of(case.volume, options.focal.body_threshold_hu)


def write_case_dicom(case: StudyCase, options: WriterOptions) -> None:
    """Write the DICOM results of one processed study and record their paths in ``case.files``: the
    Parametric Maps and the SEG first, because the SR references them."""
    folder = study_folder(case)
    sources = case.series_datasets
    maps = []
    if options.parametric_map:
        budget = options.parametric_map_max_mb
        maps = write_pmaps(
            case.result, sources, folder, max_bytes=None if budget is None else int(budget * 1_000_000)
        )
        for m in maps:
            case.files[pmap_file_key(m.task_key)] = str(m.path.relative_to(case.output_folder))
    seg = None
    if options.seg:
        body = _body(case, options)
        seg = build_seg(
            case.result,
            sources,
            segmentation_type=options.segmentation_type,
            focal=options.focal if body is not None else None,
            body=body,
        )
        if seg is not None:
            case.files["seg"] = str(save(seg, folder, "SEG").relative_to(case.output_folder))
    sr = build_sr(case.result, sources, segmentation=seg, parametric_maps=[m.header for m in maps])
    case.files["sr"] = str(save(sr, folder, "SR").relative_to(case.output_folder))
    if options.text_report:
        text = build_text_sr(case.result, sources)
        case.files["text_sr"] = str(save(text, folder, "TXT").relative_to(case.output_folder))


def write_case_key_images(case: StudyCase, options: WriterOptions) -> None:
    """Write a PNG key image of each positive finding with an attention map into
    ``<study>/key_images/`` and record them: in ``case.files`` (``key_image:<task key>``, relative to
    the output folder like every file) and in the result, for ``results.json`` (relative to it).

    PNGs left there by an earlier run of the same study for findings that are not positive now are
    removed: a stale key image beside ``results.json`` would show a finding the results do not have.
    """
    if not options.key_images:
        return
    folder = study_folder(case) / KEY_IMAGES_DIR
    written: dict[str, str] = {}
    for task in plan_key_images(case.result):
        assert task.attention is not None  # plan_key_images keeps only findings with a map
        meta = KeyImageMeta.of(task, case.volume, synthetic=case.result.model.synthetic)
        path = folder / key_image_name(task.key)
        write_bytes_atomic(path, render_key_image(case.volume.hu, task.attention, meta))
        written[task.key] = f"{KEY_IMAGES_DIR}/{path.name}"
        case.files[key_image_file_key(task.key)] = str(path.relative_to(case.output_folder))
    if folder.is_dir():
        keep = {Path(p).name for p in written.values()}
        for stale in folder.glob("*.png"):
            if stale.name not in keep:
                stale.unlink(missing_ok=True)
    case.result = replace(case.result, key_images=written)
    if written:
        logger.info("study %s: key images %s", case.study_instance_uid, sorted(written))


def atomic_temp(path: Path) -> tuple[int, str]:
    """A temp file beside ``path`` for an atomic write, with the mode a plain ``open`` would give.

    ``mkstemp`` creates 0600 files: results.json and the batch tables would then be unreadable to
    the group that reads the DICOM outputs (0644 under the usual umask) in the same folder.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` via a temp file in the same folder, fsync, then rename over ``path``: a reader
    (the web console, a sync job) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = atomic_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temp file in the same folder, fsync, then rename over ``path``."""
    write_bytes_atomic(path, (json.dumps(data, indent=2, allow_nan=False) + "\n").encode())


def write_results_json(case: StudyCase) -> None:
    """Write ``results.json`` of an inferred study and mark it processed (the last stage)."""
    folder = study_folder(case)
    result = case.result.with_outputs(files=dict(case.files), timings_s=dict(case.timings))
    write_json_atomic(folder / RESULTS_FILE, result.to_dict())
    case.files["results"] = str((folder / RESULTS_FILE).relative_to(case.output_folder))
    case.outcome = Outcome.PROCESSED
    positives = [t.key for t in case.result.tasks if t.present]
    logger.info(
        "study %s processed: %d positive finding(s) %s", case.study_instance_uid, len(positives), positives
    )


def write_outcome_json(output_folder: Path, summaries: list[dict[str, Any]]) -> None:
    """``outcome.json``: one record per study of the run (what a workflow manager reads)."""
    write_json_atomic(Path(output_folder) / OUTCOME_FILE, {"studies": summaries})
