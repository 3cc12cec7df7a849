"""Attention maps scored against known finding masks: the SEG's saliency threshold and the pointing game.

Synthetic studies know where every planted finding is. Rendered with their voxel masks, preprocessed
by the serving preprocessing and run through the exported model exactly as served (ONNX Runtime via
:class:`operators.model_runner.HyperCTRunner`), they give

- the **saliency threshold** per task: the relative level ``t`` (the SEG region is
  ``attention >= t × max(attention)``, ``docs/results.md``) that maximises the mean Dice between that
  region and the finding on a *calibration* set (validation data, never the studies scored below),
  written into the manifest as ``saliency_threshold``;
- the **pointing game** (``training.attention.pointing_hit``) on *other* held-out positives.

Both are computed in model pixel space (the ground truth is sampled at every model pixel's patient
position), where the attention map lives; the SEG maps the same relative threshold back to the source
geometry. The attention map is an explanation of where the model looked, not a lesion outline: a good
Dice here does not make it one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from operators.manifest import MANIFEST_NAME, parse_manifest
from operators.preprocessing import ModelInput, PatientTransform, PreprocessingConfig, preprocess
from training.attention import pointing_hit
from training.data.labels import column_lookup, normalise_column
from training.data.synthetic import SyntheticStudy, render_study_with_masks
from training.tasks import TaskRegistry

logger = logging.getLogger(__name__)

#: Candidate relative thresholds (fractions of the map's maximum).
CANDIDATES: tuple[float, ...] = tuple(round(0.1 * k, 1) for k in range(1, 10))


@dataclass(frozen=True, eq=False)
class MaskedCase:
    """One positive (study, task): the model input and the finding in model pixels ``[N, H, W]``."""

    name: str
    task: str
    model_input: ModelInput
    target: np.ndarray


@dataclass
class SaliencyCalibration:
    """The chosen relative threshold of one task and the evidence for it."""

    task: str
    threshold: float
    dice: float
    cases: int
    dice_by_threshold: dict[float, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "threshold": self.threshold,
            "mean_dice": round(self.dice, 4),
            "cases": self.cases,
            "mean_dice_by_threshold": {f"{t:g}": round(d, 4) for t, d in self.dice_by_threshold.items()},
        }


def model_space_target(voxel_mask: np.ndarray, affine: np.ndarray, transform: PatientTransform) -> np.ndarray:
    """``[N, H, W]`` bool: image ``n`` pixel (r, c) is True when the finding's voxel mask (array order
    ``[slice, row, col]``, ``affine`` mapping (col, row, slice) to LPS) is set at that pixel's patient
    position on any of the image's three slices (nearest voxel)."""
    n_img = transform.n_images
    h, w = transform.image_shape
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    out = np.zeros((n_img, h, w), dtype=bool)
    shape = voxel_mask.shape
    for n in range(n_img):
        for c in range(3):
            lps = transform.pixel_to_lps(n, c, rows, cols)
            ijk = np.rint(lps @ inv[:3, :3].T + inv[:3, 3]).astype(np.int64)  # (col, row, slice)
            i, j, k = ijk[..., 0], ijk[..., 1], ijk[..., 2]
            inside = (i >= 0) & (i < shape[2]) & (j >= 0) & (j < shape[1]) & (k >= 0) & (k < shape[0])
            hit = np.zeros((h, w), dtype=bool)
            hit[inside] = voxel_mask[k[inside], j[inside], i[inside]]
            out[n] |= hit
    return out


def masked_cases(
    studies: Sequence[SyntheticStudy],
    tasks: Sequence[str],
    preprocessing: PreprocessingConfig,
    registry: TaskRegistry | None = None,
) -> list[MaskedCase]:
    """Positive (study, task) cases of ``tasks`` whose finding is visible in the model input."""
    registry = registry or TaskRegistry.load()
    lookup = column_lookup(registry)
    out: list[MaskedCase] = []
    for study in studies:
        volume, masks = render_study_with_masks(study)
        model_input = preprocess(volume, preprocessing)
        for column, voxels in masks.items():
            key = lookup.get(normalise_column(column))
            if key is None or key not in tasks:
                continue
            target = model_space_target(voxels, volume.affine, model_input.transform)
            target &= np.asarray(model_input.mask, dtype=bool)[:, None, None]
            if target.any():
                out.append(MaskedCase(f"{study.key}:{key}", key, model_input, target))
            else:
                logger.info("%s: %s not inside the model window; not scored", study.key, key)
    return out


def _pixel_region(attention: np.ndarray, threshold: float, pixel_shape: tuple[int, int]) -> np.ndarray:
    """``attention >= threshold × max`` on the patch grid, expanded to pixels ``[N, H, W]``."""
    n, gh, gw = attention.shape
    grid = attention >= threshold * float(attention.max())
    return np.kron(grid, np.ones((pixel_shape[0] // gh, pixel_shape[1] // gw), dtype=bool)).astype(bool)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def _attention(runner: Any, cases: Sequence[MaskedCase]) -> list[np.ndarray | None]:
    maps: list[np.ndarray | None] = []
    for case in cases:
        att = runner.run_input(case.model_input, tasks=[case.task])[case.task].attention
        maps.append(None if att is None or not np.any(att > 0) else np.asarray(att, dtype=np.float64))
    return maps


def calibrate_saliency(
    runner: Any, cases: Sequence[MaskedCase], candidates: Sequence[float] = CANDIDATES
) -> dict[str, SaliencyCalibration]:
    """Per task, the candidate threshold with the best mean Dice on ``cases`` (ties: the higher one,
    the smaller region). An all-zero map scores Dice 0 at every threshold (the SEG shows nothing)."""
    by_task: dict[str, list[tuple[MaskedCase, np.ndarray | None]]] = {}
    for case, att in zip(cases, _attention(runner, cases), strict=True):
        by_task.setdefault(case.task, []).append((case, att))
    out: dict[str, SaliencyCalibration] = {}
    for task, items in by_task.items():
        scores: dict[float, float] = {}
        for t in candidates:
            values = [
                0.0 if att is None else dice(_pixel_region(att, t, case.target.shape[1:]), case.target)
                for case, att in items
            ]
            scores[float(t)] = float(np.mean(values))
        best = max(scores.values())
        chosen = max(t for t, d in scores.items() if d == best)
        out[task] = SaliencyCalibration(task, chosen, best, len(items), scores)
    return out


def pointing_scores(runner: Any, cases: Sequence[MaskedCase]) -> dict[str, dict[str, Any]]:
    """Pointing game per task on ``cases``: hits / evaluable (maps that are not all zero)."""
    out: dict[str, dict[str, Any]] = {}
    for case, att in zip(cases, _attention(runner, cases), strict=True):
        row = out.setdefault(case.task, {"hits": 0, "evaluable": 0, "cases": 0, "chance": []})
        row["cases"] += 1
        if att is None:
            continue
        hit = pointing_hit(att, case.target)
        assert hit is not None
        row["evaluable"] += 1
        row["hits"] += int(hit[0])
        gh, gw = att.shape[1:]
        ph, pw = case.target.shape[1] // gh, case.target.shape[2] // gw
        cells = case.target.reshape(case.target.shape[0], gh, ph, gw, pw).any(axis=(2, 4))
        valid = int(np.asarray(case.model_input.mask, dtype=bool).sum())
        row["chance"].append(float(cells.sum()) / (valid * gh * gw))
    for row in out.values():
        row["score"] = row["hits"] / row["evaluable"] if row["evaluable"] else None
        row["chance"] = float(np.mean(row["chance"])) if row["chance"] else None
    return out


def write_saliency_thresholds(
    model_dir: str | Path, calibration: Mapping[str, SaliencyCalibration], evidence: Mapping[str, Any]
) -> None:
    """Set ``saliency_threshold`` of the calibrated tasks in ``model_dir``'s manifest (tasks that allow
    saliency only) and record the evidence under ``training_data.saliency_calibration``. The manifest is
    validated before it atomically replaces the old one."""
    path = Path(model_dir) / MANIFEST_NAME
    data = json.loads(path.read_text(encoding="utf-8"))
    for task in data["tasks"]:
        cal = calibration.get(task["key"])
        if cal is not None and task.get("saliency", True):
            task["saliency_threshold"] = cal.threshold
    data.setdefault("training_data", {})["saliency_calibration"] = {
        **evidence,
        "tasks": {k: c.to_dict() for k, c in calibration.items()},
    }
    parse_manifest(json.loads(json.dumps(data)))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
