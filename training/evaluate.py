"""``hyperct evaluate CHECKPOINT DATA``: score a checkpoint, write the report and the thresholds file.

Metrics come from :mod:`training.metrics` (per-task AUROC/AUPRC with bootstrap CIs, means, ECE,
Youden and target-sensitivity thresholds) and the report from :mod:`training.report` (``metrics.json``,
``report.md``, ROC PNGs). Thresholds are picked on **validation** predictions — by default the
``val_predictions.csv`` that training wrote next to the checkpoint (the best epoch's), else the
validation split is scored now — and applied unchanged to the evaluated data.

``thresholds.json`` (read by the export step; docs/training.md §thresholds.json)::

    {"schema": "hyperct-thresholds/1", "score": "...", "picked_on": "validation", "default_rule": "youden",
     "tasks": {"<task key>": {"threshold": t_youden, "thresholds": {"youden": t, "sensitivity_90": t},
                              "validation_auroc": a, "prevalence": p, "n": n, "picked_on": "validation",
                              "evaluation_auroc": a_test}}}

Scores and thresholds are sigmoid probabilities; positive iff score ≥ threshold.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from operators.preprocessing import PreprocessingConfig
from training.cache import InputCache
from training.config import ConfigError, RunConfig, load_config
from training.data import SPLITS, BadData, DataError, ScanDataset, ScanRecord, prepare
from training.metrics import DEFAULT_TARGET_SENSITIVITIES, EvaluationResult, auroc, evaluate
from training.report import ReportFiles, write_report
from training.tasks import TaskRegistry

logger = logging.getLogger(__name__)

THRESHOLDS_JSON = "thresholds.json"
THRESHOLDS_SCHEMA = "hyperct-thresholds/1"
PREDICTIONS_CSV = "predictions.csv"


@dataclass
class EvaluationOutput:
    result: EvaluationResult
    files: ReportFiles
    thresholds: Path
    predictions: Path
    tasks: list[str]


def data_config_for(data: str | Path, overrides: Sequence[str] = ()) -> tuple[RunConfig, str]:
    """``DATA`` argument → (run config, default split).

    * a YAML file or bundled recipe name (e.g. the run's ``config.yaml``): its data section; split "test";
    * a folder with ``labels.csv`` at its root (``hyperct synth`` output, or any DICOM folder laid out
      that way): every study in it; split "all".
    """
    p = Path(data)
    if p.is_dir():
        labels = p / "labels.csv"
        if not labels.is_file():
            raise ConfigError(f"{p.name}: a DICOM evaluation folder needs labels.csv at its root")
        extra = {
            "data": {"kind": "dicom", "root": str(p), "labels": str(labels), "key_column": "StudyInstanceUID"}
        }
        return load_config(None, overrides, extra=extra), "all"
    return load_config(data, overrides), "test"


def _records_for(
    cfg: RunConfig,
    tasks: Sequence[str],
    split: str,
    registry: TaskRegistry,
    bad: BadData,
    pre: PreprocessingConfig,
) -> dict[str, list[ScanRecord]]:
    from training.data import build_records, split_records

    recs = [r for r in build_records(cfg.data, registry, tasks, bad, pre) if r.n_valid > 0]
    if split == "all":
        return {"all": recs}
    return split_records(recs, cfg.data.split, cfg.data.kind)


def _align(
    tasks: Sequence[str], src_tasks: Sequence[str], labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    y = np.full((labels.shape[0], len(tasks)), -1.0)
    s = np.full((labels.shape[0], len(tasks)), np.nan)
    for j, t in enumerate(tasks):
        if t in src_tasks:
            y[:, j] = labels[:, src_tasks.index(t)]
            s[:, j] = scores[:, src_tasks.index(t)]
    return y, s


def thresholds_document(
    result: EvaluationResult,
    tasks: Sequence[str],
    val_labels: np.ndarray | None,
    val_scores: np.ndarray | None,
    *,
    checkpoint: str,
    default_rule: str = "youden",
) -> dict[str, Any]:
    """The ``thresholds.json`` content (see the module docstring)."""
    picked_on = result.config.thresholds_picked_on
    out_tasks: dict[str, Any] = {}
    for j, t in enumerate(tasks):
        tm = result.task(t)
        rules = {r: c.threshold for r, c in tm.thresholds.items() if c.threshold is not None}
        if val_labels is not None and val_scores is not None:
            y, s = val_labels[:, j], val_scores[:, j]
            ok = (y != -1) & np.isfinite(y) & np.isfinite(s)
            v_auc = auroc(y[ok], s[ok]) if ok.any() else None
            n = int(ok.sum())
            prev = float(y[ok].mean()) if n else None
        else:
            v_auc, n, prev = tm.auroc, tm.n, tm.prevalence
        out_tasks[t] = {
            "threshold": rules.get(default_rule),
            "thresholds": rules,
            "validation_auroc": v_auc,
            "prevalence": prev,
            "n": n,
            "picked_on": picked_on,
            "evaluation_auroc": tm.auroc,
        }
    return {
        "schema": THRESHOLDS_SCHEMA,
        "score": "sigmoid probability of the task logit; positive iff score >= threshold",
        "picked_on": picked_on,
        "default_rule": default_rule,
        "checkpoint": checkpoint,
        "tasks": out_tasks,
    }


def per_scan(
    records: Sequence[ScanRecord], labels: np.ndarray, scores: np.ndarray
) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Volume rows → one row per scan: ``(scan ids, patient ids, labels, scores)``.

    A scan's score is the mean of its reconstructions' probabilities (NaN-aware), so a scan with
    three reconstructions counts once, like a scan with one; its labels come from one report and must
    agree across its volumes (a disagreement is bad data, not something to average).
    """
    order: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        order.setdefault(r.scan, []).append(i)
    if len(order) == len(records):
        return [r.scan for r in records], [r.patient_id for r in records], labels, scores
    out_y = np.empty((len(order), labels.shape[1]))
    out_s = np.full((len(order), scores.shape[1]), np.nan)
    patients: list[str] = []
    for n, (scan, rows) in enumerate(order.items()):
        ys = labels[rows]
        if not (ys == ys[0]).all():
            raise DataError(
                f"scan {scan}: its volumes {', '.join(records[i].key for i in rows)} carry different labels"
            )
        out_y[n] = ys[0]
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column: the task was not scored
            out_s[n] = np.nanmean(scores[rows], axis=0)
        patients.append(records[rows[0]].patient_id)
    logger.info("%d volumes scored as %d scans (mean over reconstructions)", len(records), len(order))
    return list(order), patients, out_y, out_s


def evaluate_checkpoint(
    checkpoint: str | Path,
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    split: str = "test",
    val_predictions: str | Path | None = None,
    n_bootstrap: int = 1000,
    target_sensitivities: Sequence[float] = DEFAULT_TARGET_SENSITIVITIES,
    records: Sequence[ScanRecord] | None = None,
    cache: InputCache | None = None,
    registry: TaskRegistry | None = None,
    roc_plots: bool = True,
    title: str | None = None,
) -> EvaluationOutput:
    """Evaluate ``checkpoint`` on ``split`` of ``cfg``'s data (or on ``records``); write the report files."""
    import torch

    from training.device import resolve_device, resolve_loader_workers
    from training.model import load_checkpoint
    from training.train import make_cache, predict, read_predictions, write_predictions

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Path(checkpoint)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt.name} not found")
    if split not in (*SPLITS, "all"):
        raise ConfigError(f"split must be one of {', '.join(SPLITS)} or all, got {split!r}")
    registry = registry or TaskRegistry.load()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    model, extra = load_checkpoint(ckpt, backbone_path=cfg.model.backbone_path)
    model.to(device)
    tasks = list(extra.get("tasks") or model.task_keys)
    pre = (
        PreprocessingConfig.from_dict(extra["preprocessing"])
        if extra.get("preprocessing")
        else PreprocessingConfig()
    )
    bad = BadData(skip=cfg.data.skip_bad)
    cache = cache or make_cache(cfg, out)

    if records is not None:
        groups_of_records = {"all": [r for r in records if r.n_valid > 0]}
        split = "all"
    else:
        groups_of_records = _records_for(cfg, tasks, split, registry, bad, pre)
    evaluated = prepare(groups_of_records[split], pre, cache, workers=cfg.data.workers, bad=bad)
    if not evaluated:
        raise DataError(f"no scans to evaluate in split {split!r}")
    ds = ScanDataset(evaluated, pre, cache, skip_bad=cfg.data.skip_bad)
    workers = resolve_loader_workers(cfg.data.loader_workers, device)
    scores = predict(model, ds, tasks, batch_size=cfg.eval_batch_size, device=device, precision=cfg.precision,
                     workers=workers, progress=cfg.progress)  # fmt: skip
    labels = ds.labels().astype(float)

    val_y = val_s = None
    vp = Path(val_predictions) if val_predictions else ckpt.with_name("val_predictions.csv")
    if split == "val":
        logger.info("evaluating the validation split itself: thresholds are picked on it")
    elif vp.is_file():
        _, v_tasks, v_labels, v_scores = read_predictions(vp)
        val_y, val_s = _align(tasks, v_tasks, v_labels, v_scores)
        logger.info("thresholds from %s (%d validation scans)", vp.name, val_y.shape[0])
    elif "val" in groups_of_records and groups_of_records["val"]:
        val_recs = prepare(groups_of_records["val"], pre, cache, workers=cfg.data.workers, bad=bad)
        vds = ScanDataset(val_recs, pre, cache, skip_bad=cfg.data.skip_bad)
        val_s = predict(
            model, vds, tasks, batch_size=cfg.eval_batch_size, device=device, precision=cfg.precision
        )
        val_y = vds.labels().astype(float)
    else:
        logger.warning("no validation predictions: thresholds are picked on the evaluated data (optimistic)")

    groups = {t: registry.by_key(t).group for t in tasks if t in registry}
    _, patients, scan_y, scan_s = per_scan(ds.records, labels, scores)
    result = evaluate(
        scan_y, scan_s, tasks, groups=groups, val_true=val_y, val_score=val_s, n_bootstrap=n_bootstrap,
        target_sensitivities=target_sensitivities, patients=patients,
    )  # fmt: skip
    short = {t: registry.by_key(t).short_name or t for t in tasks if t in registry}
    files = write_report(result, out, title=title or f"HyperCT evaluation: {ckpt.name}, split {split}",
                         task_labels=short, roc=roc_plots)  # fmt: skip
    doc = thresholds_document(result, tasks, val_y, val_s, checkpoint=ckpt.name)
    thr_path = out / THRESHOLDS_JSON
    thr_path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    pred_path = write_predictions(out / PREDICTIONS_CSV, evaluated, tasks, scores)
    mean = result.means["overall"]["auroc"].value
    logger.info("mean AUROC %s over %d tasks on %d scans", "n/a" if mean is None else f"{mean:.4f}",
                result.means["overall"]["auroc"].n_tasks, len(evaluated))  # fmt: skip
    return EvaluationOutput(result, files, thr_path, pred_path, tasks)


def mean_value(result: EvaluationResult) -> float:
    v = result.means["overall"]["auroc"].value
    return math.nan if v is None else float(v)


__all__ = [
    "EvaluationOutput",
    "data_config_for",
    "evaluate_checkpoint",
    "mean_value",
    "thresholds_document",
]
