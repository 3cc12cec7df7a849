"""Evaluation metrics and reports: hand-computed cases, sklearn agreement, missing labels, bootstrap,
thresholds, calibration, and the report files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from training import metrics as M
from training.report import comparison_table, markdown_report, write_comparison, write_report

# A tiny example worked out by hand (positive iff score >= threshold):
#   thr 0.80: TP1 FP0 -> Se .5 Sp 1  J .5      thr 0.35: TP2 FP1 -> Se 1 Sp .5 J .5
#   thr 0.40: TP1 FP1 -> Se .5 Sp .5 J 0       thr 0.10: TP2 FP2 -> Se 1 Sp 0  J 0
Y_TINY = np.array([0, 0, 1, 1])
S_TINY = np.array([0.1, 0.4, 0.35, 0.8])


def _toy(n: int = 400, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, (n, k)).astype(float)
    s = np.clip(0.35 * y + 0.65 * rng.random((n, k)), 0, 1)
    return y, s


# -------------------------------------------------------------------------------------- AUROC / AUPRC


def test_auroc_perfect_reversed_and_ties() -> None:
    y = np.array([0, 0, 1, 1])
    assert M.auroc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert M.auroc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert M.auroc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert M.auroc(Y_TINY, S_TINY) == pytest.approx(0.75)  # 3 of 4 (pos, neg) pairs ordered
    assert M.auprc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0


def test_agrees_with_sklearn() -> None:
    y, s = _toy(300, 1, seed=3)
    s = np.round(s, 1)  # many ties
    assert M.auroc(y[:, 0], s[:, 0]) == pytest.approx(roc_auc_score(y[:, 0], s[:, 0]))
    assert M.auprc(y[:, 0], s[:, 0]) == pytest.approx(average_precision_score(y[:, 0], s[:, 0]))


def test_missing_labels_are_excluded_per_task() -> None:
    y = np.array([0, 1, 0, 1, -1, np.nan, -1])
    s = np.array([0.2, 0.9, 0.3, 0.7, 0.99, np.nan, 0.0])  # missing rows may have any score, even NaN
    assert M.auroc(y, s) == 1.0
    res = M.evaluate(
        np.c_[y, [1, 0, 1, 0, 1, 0, 1]], np.c_[s, np.linspace(0, 1, 7)], ["a", "b"], n_bootstrap=50
    )
    assert res.task("a").n == 4 and res.task("b").n == 7
    assert res.task("a").prevalence == 0.5


def test_fast_bootstrap_statistic_equals_sklearn_on_resamples() -> None:
    rng = np.random.default_rng(1)
    n = 200
    y = rng.integers(0, 2, n).astype(float)
    s = np.round(rng.random(n), 1)
    task = M._sorted_task(np.arange(n), y, s)
    draws = rng.integers(0, n, (4, n))
    weights = np.stack([np.bincount(d, minlength=n) for d in draws])
    auc, ap = M._weighted_auc_ap(task, weights)
    for b, d in enumerate(draws):
        assert auc[b] == pytest.approx(roc_auc_score(y[d], s[d]), abs=1e-12)
        assert ap[b] == pytest.approx(average_precision_score(y[d], s[d]), abs=1e-12)


# ------------------------------------------------------------------------------------------ bootstrap


def test_bootstrap_ci_contains_estimate_and_is_reproducible() -> None:
    y, s = _toy()
    kw = {"n_bootstrap": 300, "groups": {"t0": "cardiac", "t1": "cardiac", "t2": "radiology"}}
    a = M.evaluate(y, s, ["t0", "t1", "t2"], seed=7, **kw)
    b = M.evaluate(y, s, ["t0", "t1", "t2"], seed=7, **kw)
    c = M.evaluate(y, s, ["t0", "t1", "t2"], seed=8, **kw)
    for t in a.tasks:
        assert t.auroc_ci is not None and t.auroc_ci.lower <= t.auroc <= t.auroc_ci.upper
        assert t.auprc_ci is not None and t.auprc_ci.lower <= t.auprc <= t.auprc_ci.upper
        assert t.n_bootstrap_used == 300
    assert a.to_dict() == b.to_dict()
    assert a.task("t0").auroc_ci != c.task("t0").auroc_ci
    overall = a.means["overall"]["auroc"]
    assert overall.value == pytest.approx(np.mean([t.auroc for t in a.tasks]))
    assert overall.ci is not None and overall.ci.lower <= overall.value <= overall.ci.upper
    assert a.means["cardiac"]["auroc"].value == pytest.approx((a.task("t0").auroc + a.task("t1").auroc) / 2)
    assert a.means["radiology"]["auroc"].tasks == ["t2"]


def test_one_class_resamples_are_skipped_and_counted() -> None:
    y = np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 0], dtype=float)
    s = np.linspace(1, 0, 10)
    t = M.evaluate_task(y, s, "rare", n_bootstrap=200, seed=0)
    assert t.auroc == 1.0
    # P(no positive in a resample of 10) = 0.9^10 ≈ 0.35
    assert 80 < t.n_bootstrap_used < 180
    assert t.auroc_ci is not None


# ------------------------------------------------------------------------------------- not computable


def test_not_computable_tasks_never_crash_and_are_left_out_of_means() -> None:
    y, s = _toy(100, 3)
    y[:, 1] = -1  # no valid labels
    y[:, 2] = 1  # one class only
    res = M.evaluate(y, s, ["ok", "empty", "single"], n_bootstrap=50)
    for key in ("empty", "single"):
        t = res.task(key)
        assert not t.computable and t.auroc is None and t.auprc is None and t.ece is None
        assert t.auroc_ci is None and t.thresholds == {} and "not computable" in (t.note or "")
    assert res.task("empty").n == 0 and res.task("empty").prevalence is None
    assert res.task("single").n == 100 and res.task("single").prevalence == 1.0
    assert res.means["overall"]["auroc"].tasks == ["ok"]
    assert res.means["overall"]["auroc"].value == res.task("ok").auroc
    assert sum("excluded from means" in n for n in res.notes) == 2
    json.dumps(res.to_dict(include_curves=True), allow_nan=False)


def test_nothing_computable() -> None:
    res = M.evaluate(np.full((5, 1), -1.0), np.zeros((5, 1)), ["x"], n_bootstrap=10)
    assert res.means["overall"]["auroc"].value is None
    assert M.auroc([1, 1], [0.2, 0.3]) is None and M.auprc([], []) is None


@pytest.mark.parametrize(
    ("labels", "scores", "match"),
    [
        ([[0], [2]], [[0.1], [0.2]], "task 'a': labels must be 0, 1, -1 or NaN"),
        ([[0], [1]], [[0.1], [np.nan]], "task 'a': 1 scans with a valid label have no finite score"),
        ([[0], [1]], [[0.1], [0.2], [0.3]], "differ in shape"),
    ],
)
def test_bad_inputs_are_named(labels: list[list[float]], scores: list[list[float]], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        M.evaluate(labels, scores, ["a"], n_bootstrap=0)


# ------------------------------------------------------------------------------------------ thresholds


def test_youden_and_target_sensitivity_on_a_tiny_known_example() -> None:
    assert M.youden_threshold(Y_TINY, S_TINY) == 0.8  # J tie 0.80 vs 0.35 -> the higher threshold
    assert M.sensitivity_threshold(Y_TINY, S_TINY, 1.0) == 0.35
    assert M.sensitivity_threshold(Y_TINY, S_TINY, 0.5) == 0.8
    assert M.sensitivity_threshold(Y_TINY, S_TINY, 0.6) == 0.35
    op = M.operating_point(Y_TINY, S_TINY, 0.35)
    assert (op.tp, op.fp, op.tn, op.fn) == (2, 1, 1, 0)
    assert (op.sensitivity, op.specificity, op.ppv, op.npv) == (1.0, 0.5, pytest.approx(2 / 3), 1.0)
    op = M.operating_point(Y_TINY, S_TINY, 0.9)
    assert op.ppv is None and op.sensitivity == 0.0 and op.npv == 0.5


def test_youden_unique_maximum() -> None:
    y = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    # thr 0.6: Se .75 Sp 1 (J .75); thr 0.4: Se 1 Sp .75 (J .75) -> tie -> 0.6; thr 0.5: J .5
    assert M.youden_threshold(y, s) == 0.6
    assert M.youden_threshold(y[:-1].tolist() + [0], s) == 0.4  # 0.4: Se 3/3, Sp 3/5 -> J .6 (max)


def test_target_sensitivity_is_robust_to_float_rounding() -> None:
    y = np.r_[np.ones(10), np.zeros(10)]
    s = np.r_[np.linspace(0.95, 0.5, 10), np.linspace(0.45, 0.0, 10)]
    thr = M.sensitivity_threshold(y, s, 0.7)  # 0.7·10 = 7.000000000000001 in floating point
    assert thr == pytest.approx(s[6])
    assert M.operating_point(y, s, thr).sensitivity == 0.7


def test_thresholds_are_picked_on_validation_and_applied_to_test() -> None:
    res = M.evaluate(
        np.array([[0], [1], [0], [1]]),
        np.array([[0.2], [0.6], [0.7], [0.9]]),
        ["a"],
        val_true=Y_TINY,
        val_score=S_TINY,
        n_bootstrap=0,
    )
    ch = res.task("a").thresholds["youden"]
    assert ch.picked_on == "validation" and ch.threshold == 0.8
    assert ch.at_pick is not None and ch.at_pick.sensitivity == 0.5
    assert ch.at_eval is not None and (ch.at_eval.tp, ch.at_eval.fp) == (1, 0)
    assert res.task("a").thresholds["sensitivity_90"].threshold == 0.35
    assert res.thresholds_for_manifest() == {"a": {"youden": 0.8, "sensitivity_90": 0.35}}
    assert not any("optimistic" in n for n in res.notes)
    res = M.evaluate(Y_TINY, S_TINY, ["a"], n_bootstrap=0)
    assert res.task("a").thresholds["youden"].picked_on == "evaluation"
    assert any("optimistic" in n for n in res.notes)


# ------------------------------------------------------------------------------------------ calibration


def test_ece_of_a_perfectly_calibrated_toy_is_zero() -> None:
    probs, labels = [], []
    for c in (0.05, 0.15, 0.25, 0.55, 0.85, 0.95):
        n_pos = round(c * 100)
        probs += [c] * 100
        labels += [1] * n_pos + [0] * (100 - n_pos)
    cal = M.calibration(labels, probs)
    assert cal.ece == pytest.approx(0.0, abs=1e-12)
    assert [b.n for b in cal.bins] == [100, 100, 100, 0, 0, 100, 0, 0, 100, 100]
    assert cal.bins[3].mean_predicted is None and cal.bins[0].observed_rate == pytest.approx(0.05)


def test_ece_sampled_calibration_is_small_and_miscalibration_is_seen() -> None:
    rng = np.random.default_rng(0)
    p = rng.random(20000)
    y = (rng.random(20000) < p).astype(int)
    assert M.expected_calibration_error(y, p) < 0.02
    assert M.expected_calibration_error([0, 0, 0, 0], [0.9, 0.9, 0.9, 0.9]) == pytest.approx(0.9)
    assert M.expected_calibration_error([1, 0], [1.0, 0.0]) == 0.0  # 1.0 goes in the last bin


def test_logit_scores_get_no_ece() -> None:
    with pytest.raises(ValueError, match="probabilities"):
        M.calibration([0, 1], [-2.0, 3.0])
    t = M.evaluate_task([0, 1, 0, 1], [-2.0, 3.0, -1.0, 0.5], n_bootstrap=0)
    assert t.auroc == 1.0 and t.ece is None and "no calibration" in (t.note or "")


# ---------------------------------------------------------------------------------------------- report


def test_report_files_are_written_and_readable(tmp_path: Path) -> None:
    y, s = _toy(200, 3)
    y[:, 2] = 0  # one not-computable task in the report
    groups = {"t0": "cardiac", "t1": "radiology", "t2": "radiology"}
    res = M.evaluate(y, s, ["t0", "t1", "t2"], groups=groups, n_bootstrap=100)
    files = write_report(res, tmp_path / "rep", title="Toy", task_labels={"t0": "Red. LV"})
    data = json.loads(files.json.read_text())
    assert data["title"] == "Toy" and data["n_scans"] == 200
    assert data["tasks"][0]["auroc"] == pytest.approx(res.task("t0").auroc)
    assert data["tasks"][2]["auroc"] is None and "roc" not in data["tasks"][0]
    md = files.markdown.read_text()
    assert "| Red. LV | cardiac | 200 |" in md and "n/c" in md and "roc/t0.png" in md
    assert set(files.roc_pngs) == {"t0", "t1"}
    for png in [*files.roc_pngs.values(), files.roc_overview]:
        assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert files.to_dict()["roc_pngs"] == {"t0": "roc/t0.png", "t1": "roc/t1.png"}
    assert markdown_report(res).startswith("# HyperCT evaluation")


def test_comparison_table(tmp_path: Path) -> None:
    y, s = _toy(200, 2)
    res = M.evaluate(y, s, ["a", "b"], groups={"a": "cardiac", "b": "radiology"}, n_bootstrap=50)
    paper = {"a": 0.99, "b": None}
    text = comparison_table({"HyperCT": res, "Paper": paper}, show_ci=True)
    lines = text.splitlines()
    assert lines[0] == "| Task | HyperCT | Paper |"
    assert lines[2].startswith("| a |") and "**99.0**" in lines[2]
    assert f"{res.task('b').auroc * 100:.1f} [" in lines[3] and lines[3].endswith("| – |")
    assert "Group avg. (cardiac)" in text and "Overall average" in text
    overall = next(line for line in lines if line.startswith("| Overall average"))
    assert "99.0†" in overall and "†" in text.splitlines()[-1]
    ece = comparison_table({"x": {"a": 0.1}, "y": {"a": 0.05}}, metric="ece", percent=True, digits=2)
    assert "**0.05**" in ece  # lower is better, ECE not scaled
    path = write_comparison(tmp_path / "cmp.md", {"x": {"a": 0.7}}, title="Table 1")
    assert path.read_text().startswith("# Table 1\n\n| Task | x |")
