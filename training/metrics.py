"""Per-task evaluation of a multi-task binary classifier (spec §7; open point O-23).

What the paper reports (AUROC per task, unweighted means, bootstrap 95 % CIs) plus what a deployment
needs and the paper lacks (AUPRC, calibration, operating thresholds with sensitivity / specificity /
PPV / NPV; spec §12). Every metric is computed per task on the scans whose label is valid: a label of
-1 or NaN is "missing" (spec §2.4) and is excluded for that task only.

Choices (docs/evaluation.md explains why):

* Point estimates: ``sklearn.metrics.roc_auc_score`` / ``average_precision_score`` (ties count ½).
* Bootstrap: scans (rows) are the resampling unit, one shared set of resamples for all tasks, so the
  CI of a *mean over tasks* keeps the correlation between tasks of the same scan. Percentile method.
  A resample in which a task has one class only is **skipped** for that task (not redrawn), and the
  number of resamples used is reported. Seeded ``numpy.random.default_rng``: reproducible.
* ECE: 10 equal-width bins on [0, 1], right-open except the last; weighted by bin size.
* Thresholds: "predict positive iff score ≥ threshold"; candidates are the observed scores.
  Youden's J (ties → the highest threshold), and "the highest threshold with sensitivity ≥ target".
  Thresholds are picked on validation data when given and then applied unchanged to the evaluated data.
* Tasks with no valid labels or one class only are "not computable": metrics are ``None``, never an
  exception, and they are left out of the means with a note.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

logger = logging.getLogger(__name__)

DEFAULT_N_BOOTSTRAP = 1000
DEFAULT_CI_LEVEL = 0.95
DEFAULT_SEED = 42
DEFAULT_N_BINS = 10
DEFAULT_TARGET_SENSITIVITIES: tuple[float, ...] = (0.9,)
_BOOTSTRAP_CHUNK = 100  # resamples generated and scored together (memory: chunk × n_scans weights)


# --------------------------------------------------------------------------------------------------
# Result dataclasses.


@dataclass
class Interval:
    lower: float
    upper: float

    def to_dict(self) -> dict[str, float]:
        return {"lower": self.lower, "upper": self.upper}


@dataclass
class OperatingPoint:
    """Confusion counts and rates at ``threshold`` (positive iff score ≥ threshold); None = 0/0."""

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int
    sensitivity: float | None
    specificity: float | None
    ppv: float | None
    npv: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ThresholdChoice:
    """A threshold rule, where it was picked, and how it performs there and on the evaluated data."""

    rule: str  # "youden" or "sensitivity_90" (target 0.90)
    target_sensitivity: float | None
    picked_on: str  # "validation" or "evaluation"
    threshold: float | None
    at_pick: OperatingPoint | None
    at_eval: OperatingPoint | None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CalibrationBin:
    lower: float
    upper: float
    n: int
    mean_predicted: float | None
    observed_rate: float | None


@dataclass
class Calibration:
    """ECE and the reliability table it is computed from."""

    ece: float
    n_bins: int
    bins: list[CalibrationBin]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RocCurve:
    fpr: list[float]
    tpr: list[float]
    thresholds: list[float | None]


@dataclass
class TaskMetrics:
    """All metrics of one task; ``None`` where not computable (see ``note``)."""

    task: str
    group: str | None
    n: int
    n_positive: int
    n_negative: int
    prevalence: float | None
    computable: bool
    auroc: float | None = None
    auroc_ci: Interval | None = None
    auprc: float | None = None
    auprc_ci: Interval | None = None
    n_bootstrap_used: int = 0
    calibration: Calibration | None = None
    thresholds: dict[str, ThresholdChoice] = field(default_factory=dict)
    note: str | None = None
    roc: RocCurve | None = field(default=None, repr=False)

    @property
    def ece(self) -> float | None:
        return None if self.calibration is None else self.calibration.ece

    def to_dict(self, include_curves: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["ece"] = self.ece
        if not include_curves:
            d.pop("roc")
        return d


@dataclass
class MeanMetric:
    """Unweighted mean of a metric over the computable tasks of a group, with its bootstrap CI."""

    value: float | None
    ci: Interval | None
    n_tasks: int
    tasks: list[str]
    n_bootstrap_used: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvaluationConfig:
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP
    ci_level: float = DEFAULT_CI_LEVEL
    seed: int = DEFAULT_SEED
    n_bins: int = DEFAULT_N_BINS
    target_sensitivities: tuple[float, ...] = DEFAULT_TARGET_SENSITIVITIES
    bootstrap_unit: str = "scan (row), shared across tasks"
    ci_method: str = "percentile"
    one_class_resamples: str = "skipped (not redrawn); count reported as n_bootstrap_used"
    thresholds_picked_on: str = "evaluation"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_sensitivities"] = list(self.target_sensitivities)
        return d


@dataclass
class EvaluationResult:
    """Per-task metrics, means (``means[group][metric]``; group "overall" always present), notes."""

    tasks: list[TaskMetrics]
    means: dict[str, dict[str, MeanMetric]]
    config: EvaluationConfig
    n_scans: int
    notes: list[str] = field(default_factory=list)

    def task(self, key: str) -> TaskMetrics:
        for t in self.tasks:
            if t.task == key:
                return t
        raise KeyError(key)

    def thresholds_for_manifest(self) -> dict[str, dict[str, float]]:
        """``{task: {rule: threshold}}`` for the tasks where a threshold was found (manifest format)."""
        return {
            t.task: {r: c.threshold for r, c in t.thresholds.items() if c.threshold is not None}
            for t in self.tasks
            if any(c.threshold is not None for c in t.thresholds.values())
        }

    def to_dict(self, include_curves: bool = False) -> dict[str, Any]:
        return {
            "n_scans": self.n_scans,
            "config": self.config.to_dict(),
            "tasks": [t.to_dict(include_curves) for t in self.tasks],
            "means": {g: {m: v.to_dict() for m, v in ms.items()} for g, ms in self.means.items()},
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------------------------------
# Single-task functions (1-D arrays; missing labels dropped).


def valid_mask(y_true: np.ndarray) -> np.ndarray:
    """True where a label is 0 or 1 (i.e. not -1 / NaN)."""
    y = np.asarray(y_true, dtype=float)
    return np.isfinite(y) & (y != -1)


def _valid(y_true: Any, y_score: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=float).ravel()
    s = np.asarray(y_score, dtype=float).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    m = valid_mask(y)
    y, s = y[m], s[m]
    bad = ~np.isin(y, (0.0, 1.0))
    if bad.any():
        raise ValueError(f"labels must be 0, 1, -1 or NaN; found {y[bad][0]!r}")
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} scans with a valid label have no finite score")
    return y.astype(np.int8), s


def _both_classes(y: np.ndarray) -> bool:
    return y.size > 0 and 0 < int(y.sum()) < y.size


def auroc(y_true: Any, y_score: Any) -> float | None:
    """AUROC on valid labels (sklearn); None when a class is absent."""
    y, s = _valid(y_true, y_score)
    return float(roc_auc_score(y, s)) if _both_classes(y) else None


def auprc(y_true: Any, y_score: Any) -> float | None:
    """Average precision (sklearn's step-wise AUPRC, no interpolation); None when a class is absent."""
    y, s = _valid(y_true, y_score)
    return float(average_precision_score(y, s)) if _both_classes(y) else None


def calibration(y_true: Any, y_prob: Any, n_bins: int = DEFAULT_N_BINS) -> Calibration:
    """ECE over ``n_bins`` equal-width bins ([i/n, (i+1)/n), last bin closed) and the reliability table.

    ECE = Σ_b (n_b / n) · |mean predicted_b − observed rate_b|. Raises ValueError if a score is outside
    [0, 1] (logits are not probabilities) or no label is valid.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y, p = _valid(y_true, y_prob)
    if y.size == 0:
        raise ValueError("no valid labels")
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError("scores must be probabilities in [0, 1] for calibration")
    idx = np.clip(np.floor(p * n_bins).astype(int), 0, n_bins - 1)
    bins: list[CalibrationBin] = []
    ece = 0.0
    for b in range(n_bins):
        m = idx == b
        nb = int(m.sum())
        if nb:
            conf, acc = float(p[m].mean()), float(y[m].mean())
            ece += nb / y.size * abs(conf - acc)
            bins.append(CalibrationBin(b / n_bins, (b + 1) / n_bins, nb, conf, acc))
        else:
            bins.append(CalibrationBin(b / n_bins, (b + 1) / n_bins, 0, None, None))
    return Calibration(ece=float(ece), n_bins=n_bins, bins=bins)


def expected_calibration_error(y_true: Any, y_prob: Any, n_bins: int = DEFAULT_N_BINS) -> float:
    return calibration(y_true, y_prob, n_bins).ece


def _cumulative_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores descending, and TP / FP counts when predicting positive at score ≥ each one."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]  # last index of each score group
    tp = np.cumsum(y_sorted)[last]
    fp = (last + 1) - tp
    return s_sorted[last], tp.astype(np.int64), fp.astype(np.int64)


def operating_point(y_true: Any, y_score: Any, threshold: float) -> OperatingPoint:
    """Sensitivity, specificity, PPV, NPV at ``threshold`` (positive iff score ≥ threshold)."""
    y, s = _valid(y_true, y_score)
    pred = s >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    tn = int(np.sum(~pred & (y == 0)))

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    return OperatingPoint(
        threshold=float(threshold),
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        sensitivity=ratio(tp, tp + fn),
        specificity=ratio(tn, tn + fp),
        ppv=ratio(tp, tp + fp),
        npv=ratio(tn, tn + fn),
    )


def youden_threshold(y_true: Any, y_score: Any) -> float | None:
    """Observed score maximising J = sensitivity + specificity − 1; ties → the highest such score."""
    y, s = _valid(y_true, y_score)
    if not _both_classes(y):
        return None
    thr, tp, fp = _cumulative_counts(y, s)
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    j_scaled = tp * n_neg - fp * n_pos  # J · n_pos · n_neg, in integers: exact ties
    return float(thr[int(np.argmax(j_scaled))])  # argmax = first = highest threshold


def sensitivity_threshold(y_true: Any, y_score: Any, target: float) -> float | None:
    """The highest observed score at which sensitivity ≥ ``target``; None without positives."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    y, s = _valid(y_true, y_score)
    n_pos = int(y.sum())
    if n_pos == 0:
        return None
    thr, tp, _ = _cumulative_counts(y, s)
    need = math.ceil(target * n_pos - 1e-9)  # tp/n_pos ≥ target, robust to 0.7·10 = 7.000…01
    return float(thr[int(np.argmax(tp >= need))])


def sensitivity_rule_name(target: float) -> str:
    return f"sensitivity_{target * 100:g}"


# --------------------------------------------------------------------------------------------------
# Bootstrap (weighted, vectorised over resamples).


@dataclass
class _SortedTask:
    """One task's valid scans sorted by score (descending) with score-group starts, for fast resamples."""

    rows: np.ndarray  # indices into the scan axis, in descending score order
    y: np.ndarray  # labels in that order (float 0/1)
    starts: np.ndarray  # first position of each distinct-score group


def _sorted_task(rows: np.ndarray, y: np.ndarray, s: np.ndarray) -> _SortedTask:
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    starts = np.r_[0, np.flatnonzero(np.diff(s_sorted)) + 1]
    return _SortedTask(rows=rows[order], y=y[order].astype(float), starts=starts)


def _weighted_auc_ap(task: _SortedTask, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and AP for each row of ``weights`` [B, n_scans] (integer resample counts); NaN = one class.

    Equal to sklearn's ``roc_auc_score`` / ``average_precision_score`` on the resampled data (ties ½;
    AP = Σ ΔRecall · Precision over distinct-score thresholds): tested against sklearn.
    """
    w = weights[:, task.rows].astype(float)
    pos = np.add.reduceat(w * task.y, task.starts, axis=1)  # [B, G] positive weight per score group
    neg = np.add.reduceat(w * (1.0 - task.y), task.starts, axis=1)
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    cum_pos, cum_neg = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        below = n_neg[:, None] - cum_neg  # negatives with a strictly lower score
        auc = (pos * (below + 0.5 * neg)).sum(axis=1) / (n_pos * n_neg)
        precision = np.where(cum_pos + cum_neg > 0, cum_pos / (cum_pos + cum_neg), 0.0)
        ap = (pos * precision).sum(axis=1) / n_pos
    bad = (n_pos == 0) | (n_neg == 0)
    auc[bad] = np.nan
    ap[bad] = np.nan
    return auc, ap


def _bootstrap(
    tasks: Sequence[_SortedTask | None],
    n_scans: int,
    n_bootstrap: int,
    seed: int,
    clusters: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """[n_bootstrap, K] AUROC and AP per resample (NaN where not computable), one resample set for all.

    ``clusters`` (an index per scan, e.g. its patient) makes the resampling unit the cluster: a drawn
    patient brings all of their scans, so scans of one patient are not treated as independent.
    """
    k = len(tasks)
    aucs = np.full((n_bootstrap, k), np.nan)
    aps = np.full((n_bootstrap, k), np.nan)
    if n_bootstrap == 0 or n_scans == 0:
        return aucs, aps
    units = int(clusters.max()) + 1 if clusters is not None else n_scans
    rng = np.random.default_rng(seed)
    for start in range(0, n_bootstrap, _BOOTSTRAP_CHUNK):
        b = min(_BOOTSTRAP_CHUNK, n_bootstrap - start)
        draws = rng.integers(0, units, size=(b, units))
        flat = (draws + np.arange(b)[:, None] * units).ravel()
        weights = np.bincount(flat, minlength=b * units).reshape(b, units)
        if clusters is not None:
            weights = weights[:, clusters]
        for j, t in enumerate(tasks):
            if t is not None:
                aucs[start : start + b, j], aps[start : start + b, j] = _weighted_auc_ap(t, weights)
    return aucs, aps


def _percentile_ci(values: np.ndarray, level: float) -> Interval | None:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return None
    lo, hi = np.percentile(v, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return Interval(float(lo), float(hi))


# --------------------------------------------------------------------------------------------------
# Multi-task evaluation.


def _as_matrix(a: Any, k: int, what: str) -> np.ndarray:
    m = np.asarray(a, dtype=float)
    if m.ndim == 1 and k == 1:
        m = m.reshape(-1, 1)
    if m.ndim != 2 or m.shape[1] != k:
        raise ValueError(f"{what} must have shape (n_scans, {k}), got {m.shape}")
    return m


def _pick_thresholds(
    y_pick: np.ndarray,
    s_pick: np.ndarray,
    y_eval: np.ndarray,
    s_eval: np.ndarray,
    picked_on: str,
    targets: Sequence[float],
) -> dict[str, ThresholdChoice]:
    """Thresholds picked on (y_pick, s_pick) and applied unchanged to (y_eval, s_eval)."""
    out: dict[str, ThresholdChoice] = {}
    can_eval = valid_mask(y_eval).any()
    rules: list[tuple[str, float | None]] = [("youden", None)] + [
        (sensitivity_rule_name(t), t) for t in targets
    ]
    for rule, target in rules:
        thr = (
            youden_threshold(y_pick, s_pick)
            if target is None
            else sensitivity_threshold(y_pick, s_pick, target)
        )
        note = None
        if thr is None:
            note = f"not computable on the {picked_on} data (needs both classes)"
        out[rule] = ThresholdChoice(
            rule=rule,
            target_sensitivity=target,
            picked_on=picked_on,
            threshold=thr,
            at_pick=None if thr is None else operating_point(y_pick, s_pick, thr),
            at_eval=None if thr is None or not can_eval else operating_point(y_eval, s_eval, thr),
            note=note,
        )
    return out


def evaluate(
    y_true: Any,
    y_score: Any,
    task_names: Sequence[str],
    *,
    groups: Mapping[str, str] | None = None,
    val_true: Any = None,
    val_score: Any = None,
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
    ci_level: float = DEFAULT_CI_LEVEL,
    seed: int = DEFAULT_SEED,
    n_bins: int = DEFAULT_N_BINS,
    target_sensitivities: Sequence[float] = DEFAULT_TARGET_SENSITIVITIES,
    patients: Sequence[str] | None = None,
) -> EvaluationResult:
    """Evaluate ``y_score`` [n_scans, K] against ``y_true`` [n_scans, K] (1 / 0 / -1 or NaN = missing).

    ``groups`` maps task → group (e.g. "radiology"/"cardiac") for group means; "overall" is always
    computed. ``val_true``/``val_score`` (same task columns) are where thresholds are picked; without
    them thresholds are picked on the evaluated data, which is optimistic and flagged in the notes.
    ``patients`` (one id per scan row) makes the bootstrap resample patients instead of scans.
    """
    names = list(task_names)
    k = len(names)
    if k == 0 or len(set(names)) != k:
        raise ValueError("task_names must be non-empty and unique")
    if not 0 < ci_level < 1:
        raise ValueError(f"ci_level must be in (0, 1), got {ci_level}")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    y_all = _as_matrix(y_true, k, "y_true")
    s_all = _as_matrix(y_score, k, "y_score")
    if y_all.shape != s_all.shape:
        raise ValueError(f"y_true {y_all.shape} and y_score {s_all.shape} differ in shape")
    have_val = val_true is not None or val_score is not None
    if have_val:
        if val_true is None or val_score is None:
            raise ValueError("give both val_true and val_score, or neither")
        yv_all = _as_matrix(val_true, k, "val_true")
        sv_all = _as_matrix(val_score, k, "val_score")
        if yv_all.shape != sv_all.shape:
            raise ValueError(f"val_true {yv_all.shape} and val_score {sv_all.shape} differ in shape")
    picked_on = "validation" if have_val else "evaluation"
    config = EvaluationConfig(
        n_bootstrap=n_bootstrap,
        ci_level=ci_level,
        seed=seed,
        n_bins=n_bins,
        target_sensitivities=tuple(float(t) for t in target_sensitivities),
        thresholds_picked_on=picked_on,
    )
    groups = dict(groups or {})
    n_scans = y_all.shape[0]
    clusters = None
    if patients is not None:
        if len(patients) != n_scans:
            raise ValueError(f"patients has {len(patients)} entries for {n_scans} scans")
        _, clusters = np.unique(np.asarray(patients, dtype=str), return_inverse=True)
        config.bootstrap_unit = (
            f"patient ({int(clusters.max()) + 1 if n_scans else 0} patients), shared across tasks"
        )
    notes: list[str] = []
    results: list[TaskMetrics] = []
    sorted_tasks: list[_SortedTask | None] = []

    for j, name in enumerate(names):
        col_y, col_s = y_all[:, j], s_all[:, j]
        try:
            y, s = _valid(col_y, col_s)
        except ValueError as exc:
            raise ValueError(f"task {name!r}: {exc}") from None
        n_pos = int(y.sum())
        tm = TaskMetrics(
            task=name,
            group=groups.get(name),
            n=int(y.size),
            n_positive=n_pos,
            n_negative=int(y.size - n_pos),
            prevalence=n_pos / y.size if y.size else None,
            computable=_both_classes(y),
        )
        results.append(tm)
        if not tm.computable:
            why = "no valid labels" if y.size == 0 else f"one class only ({n_pos} positive of {y.size})"
            tm.note = f"not computable: {why}; excluded from means"
            notes.append(f"{name}: {tm.note}")
            sorted_tasks.append(None)
            continue
        tm.auroc = float(roc_auc_score(y, s))
        tm.auprc = float(average_precision_score(y, s))
        fpr, tpr, thr = roc_curve(y, s)
        # sklearn's first threshold is +inf ("nothing positive"): None keeps the JSON valid
        tm.roc = RocCurve(fpr.tolist(), tpr.tolist(), [float(v) if np.isfinite(v) else None for v in thr])
        if s.min() >= 0.0 and s.max() <= 1.0:
            tm.calibration = calibration(y, s, n_bins)
        else:
            tm.note = "scores outside [0, 1]: no calibration (ECE) computed"
        if have_val:
            try:
                yv, sv = _valid(yv_all[:, j], sv_all[:, j])
            except ValueError as exc:
                raise ValueError(f"task {name!r} (validation): {exc}") from None
        else:
            yv, sv = y, s
        tm.thresholds = _pick_thresholds(yv, sv, y, s, picked_on, config.target_sensitivities)
        sorted_tasks.append(_sorted_task(np.flatnonzero(valid_mask(col_y)), y, s))

    aucs, aps = _bootstrap(sorted_tasks, n_scans, n_bootstrap, seed, clusters)
    for j, tm in enumerate(results):
        if not tm.computable:
            continue
        tm.n_bootstrap_used = int(np.isfinite(aucs[:, j]).sum())
        tm.auroc_ci = _percentile_ci(aucs[:, j], ci_level)
        tm.auprc_ci = _percentile_ci(aps[:, j], ci_level)
        if n_bootstrap and tm.n_bootstrap_used < n_bootstrap:
            notes.append(
                f"{tm.task}: {n_bootstrap - tm.n_bootstrap_used} of {n_bootstrap} resamples had one class "
                "only and were skipped for its CI"
            )

    group_names = ["overall"] + sorted({g for g in groups.values() if g})
    means: dict[str, dict[str, MeanMetric]] = {}
    for g in group_names:
        idx = [j for j, tm in enumerate(results) if g == "overall" or tm.group == g]
        ok = [j for j in idx if results[j].computable]
        means[g] = {
            "auroc": _mean_metric(
                [results[j].auroc for j in ok], [names[j] for j in ok], aucs[:, ok], ci_level
            ),
            "auprc": _mean_metric(
                [results[j].auprc for j in ok], [names[j] for j in ok], aps[:, ok], ci_level
            ),
        }
        with_ece = [j for j in ok if results[j].ece is not None]
        means[g]["ece"] = _mean_metric(
            [results[j].ece for j in with_ece], [names[j] for j in with_ece], None, ci_level
        )
    if not have_val:
        notes.append("thresholds were picked on the evaluated data itself (optimistic); pass validation data")
    unknown = sorted(set(groups) - set(names))
    if unknown:
        notes.append(f"groups name tasks that were not evaluated: {', '.join(unknown)}")
    logger.info(
        "evaluated %d tasks on %d scans: mean AUROC %s (%d computable)",
        k,
        n_scans,
        "n/a" if means["overall"]["auroc"].value is None else f"{means['overall']['auroc'].value:.4f}",
        means["overall"]["auroc"].n_tasks,
    )
    return EvaluationResult(tasks=results, means=means, config=config, n_scans=n_scans, notes=notes)


def _mean_metric(
    values: Sequence[float | None], tasks: list[str], boot: np.ndarray | None, level: float
) -> MeanMetric:
    """Mean over tasks; its CI uses only resamples where every one of those tasks was computable."""
    vals = [v for v in values if v is not None]
    if not vals:
        return MeanMetric(value=None, ci=None, n_tasks=0, tasks=[])
    ci, used = None, 0
    if boot is not None and boot.size:
        complete = np.isfinite(boot).all(axis=1)
        used = int(complete.sum())
        ci = _percentile_ci(boot[complete].mean(axis=1), level) if used else None
    return MeanMetric(
        value=float(np.mean(vals)), ci=ci, n_tasks=len(vals), tasks=tasks, n_bootstrap_used=used
    )


def evaluate_task(y_true: Any, y_score: Any, task: str = "task", **kwargs: Any) -> TaskMetrics:
    """Single-task convenience wrapper around ``evaluate``."""
    vt, vs = kwargs.pop("val_true", None), kwargs.pop("val_score", None)
    res = evaluate(
        np.asarray(y_true, dtype=float).reshape(-1, 1),
        np.asarray(y_score, dtype=float).reshape(-1, 1),
        [task],
        val_true=None if vt is None else np.asarray(vt, dtype=float).reshape(-1, 1),
        val_score=None if vs is None else np.asarray(vs, dtype=float).reshape(-1, 1),
        **kwargs,
    )
    return res.tasks[0]
