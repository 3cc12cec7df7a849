"""Evaluation reports: JSON + markdown + ROC PNGs for one run, and markdown tables comparing methods.

The JSON is the machine-readable record (``EvaluationResult.to_dict()``, no NaN: undefined values are
``null``); the markdown is what goes into a PR or a paper draft. Plots use matplotlib's Agg canvas
directly (``Figure`` + ``FigureCanvasAgg``), never pyplot, so no global backend or figure state is
touched and reports can be written from worker threads or headless hosts.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.metrics import EvaluationResult, Interval, TaskMetrics, ThresholdChoice

logger = logging.getLogger(__name__)

JSON_NAME = "metrics.json"
MARKDOWN_NAME = "report.md"
ROC_DIR = "roc"
ROC_OVERVIEW_NAME = "roc_overview.png"


@dataclass
class ReportFiles:
    """Paths written by ``write_report`` (relative names inside ``out_dir`` are stable)."""

    out_dir: Path
    json: Path
    markdown: Path
    roc_pngs: dict[str, Path] = field(default_factory=dict)
    roc_overview: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "json": self.json.name,
            "markdown": self.markdown.name,
            "roc_pngs": {k: str(v.relative_to(self.out_dir)) for k, v in self.roc_pngs.items()},
            "roc_overview": None if self.roc_overview is None else self.roc_overview.name,
        }


# --------------------------------------------------------------------------------------------------
# Formatting helpers.


def _f(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _with_ci(x: float | None, ci: Interval | None, digits: int = 3) -> str:
    if x is None:
        return "n/c"
    return _f(x, digits) if ci is None else f"{_f(x, digits)} [{_f(ci.lower, digits)}–{_f(ci.upper, digits)}]"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _safe_name(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", task).strip("._") or "task"


def _threshold_cell(choice: ThresholdChoice | None, full: bool) -> str:
    if choice is None or choice.threshold is None:
        return "–"
    op = choice.at_eval
    if op is None:
        return f"{choice.threshold:.3f}"
    parts = [f"Se {_f(op.sensitivity, 2)}", f"Sp {_f(op.specificity, 2)}"]
    if full:
        parts += [f"PPV {_f(op.ppv, 2)}", f"NPV {_f(op.npv, 2)}"]
    return f"{choice.threshold:.3f} ({', '.join(parts)})"


def _label(task: str, task_labels: Mapping[str, str] | None) -> str:
    return (task_labels or {}).get(task, task)


# --------------------------------------------------------------------------------------------------
# One run.


def markdown_report(
    result: EvaluationResult,
    *,
    title: str = "HyperCT evaluation",
    task_labels: Mapping[str, str] | None = None,
    roc_pngs: Mapping[str, str] | None = None,
) -> str:
    """The markdown text of ``write_report`` (usable on its own, e.g. in a PR comment)."""
    cfg = result.config
    lines = [f"# {title}", ""]
    lines.append(
        f"{result.n_scans} scans, {len(result.tasks)} tasks. AUROC/AUPRC with {cfg.ci_level:.0%} bootstrap CIs "
        f"({cfg.n_bootstrap} resamples, unit: {cfg.bootstrap_unit}; {cfg.ci_method}, seed {cfg.seed}); "
        f"ECE with {cfg.n_bins} "
        f"equal-width bins; thresholds picked on the **{cfg.thresholds_picked_on}** data and shown with "
        "their performance on the evaluated data. n/c = not computable."
    )
    lines += ["", "## Means (unweighted over computable tasks)", ""]
    lines += ["| Group | Tasks | AUROC [95% CI] | AUPRC [95% CI] | ECE |", "|---|---|---|---|---|"]
    for g, ms in result.means.items():
        a, p, e = ms["auroc"], ms["auprc"], ms["ece"]
        lines.append(
            f"| {_cell(g)} | {a.n_tasks} | {_with_ci(a.value, a.ci)} | {_with_ci(p.value, p.ci)} | {_f(e.value)} |"
        )
    rules = next((list(t.thresholds) for t in result.tasks if t.thresholds), [])
    sens_rules = [r for r in rules if r != "youden"]
    lines += ["", "## Per task", ""]
    header = ["Task", "Group", "n", "Prev.", "AUROC [95% CI]", "AUPRC [95% CI]", "ECE", "Youden thr"]
    header += [f"{r} thr" for r in sens_rules]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for t in result.tasks:
        row = [
            _cell(_label(t.task, task_labels)),
            _cell(t.group or "–"),
            str(t.n),
            _f(t.prevalence),
            _with_ci(t.auroc, t.auroc_ci),
            _with_ci(t.auprc, t.auprc_ci),
            _f(t.ece),
            _threshold_cell(t.thresholds.get("youden"), full=False),
        ]
        row += [_threshold_cell(t.thresholds.get(r), full=True) for r in sens_rules]
        lines.append("| " + " | ".join(row) + " |")
    if result.notes:
        lines += ["", "## Notes", ""] + [f"- {_cell(n)}" for n in result.notes]
    if roc_pngs:
        lines += ["", "## ROC curves", ""]
        lines += [f"- [{_cell(_label(k, task_labels))}]({v})" for k, v in roc_pngs.items()]
    return "\n".join(lines) + "\n"


def _plot_roc(ax: Any, t: TaskMetrics, label: str) -> None:
    assert t.roc is not None
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    ci = "" if t.auroc_ci is None else f" [{t.auroc_ci.lower:.3f}–{t.auroc_ci.upper:.3f}]"
    ax.plot(t.roc.fpr, t.roc.tpr, lw=1.5, label=f"AUROC {t.auroc:.3f}{ci}")
    for rule, marker in (("youden", "o"), *((r, "s") for r in t.thresholds if r != "youden")):
        op = t.thresholds.get(rule)
        if op is not None and op.at_eval is not None and op.at_eval.specificity is not None:
            ax.plot(1 - op.at_eval.specificity, op.at_eval.sensitivity, marker, ms=5, label=f"{rule} thr")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 − specificity", ylabel="sensitivity")
    ax.set_title(f"{label} (n={t.n}, prev={t.prevalence:.2f})", fontsize=9)
    ax.legend(loc="lower right", fontsize=7)


def write_roc_pngs(
    result: EvaluationResult,
    out_dir: str | Path,
    *,
    task_labels: Mapping[str, str] | None = None,
    dpi: int = 100,
    overview: bool = True,
) -> tuple[dict[str, Path], Path | None]:
    """One ROC PNG per computable task under ``out_dir/roc/`` and an overview grid; needs ``TaskMetrics.roc``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out_dir)
    (out / ROC_DIR).mkdir(parents=True, exist_ok=True)
    drawable = [t for t in result.tasks if t.computable and t.roc is not None]
    pngs: dict[str, Path] = {}
    for t in drawable:
        fig = Figure(figsize=(4, 4))
        FigureCanvasAgg(fig)
        _plot_roc(fig.add_subplot(1, 1, 1), t, _label(t.task, task_labels))
        fig.tight_layout()
        path = out / ROC_DIR / f"{_safe_name(t.task)}.png"
        fig.savefig(path, dpi=dpi)
        pngs[t.task] = path
    overview_path = None
    if overview and drawable:
        ncols = min(5, len(drawable))
        nrows = -(-len(drawable) // ncols)
        fig = Figure(figsize=(3.2 * ncols, 3.2 * nrows))
        FigureCanvasAgg(fig)
        for i, t in enumerate(drawable):
            _plot_roc(fig.add_subplot(nrows, ncols, i + 1), t, _label(t.task, task_labels))
        fig.tight_layout()
        overview_path = out / ROC_OVERVIEW_NAME
        fig.savefig(overview_path, dpi=dpi)
    return pngs, overview_path


def write_report(
    result: EvaluationResult,
    out_dir: str | Path,
    *,
    title: str = "HyperCT evaluation",
    task_labels: Mapping[str, str] | None = None,
    roc: bool = True,
    include_curves_in_json: bool = False,
    dpi: int = 100,
) -> ReportFiles:
    """Write ``metrics.json``, ``report.md`` and (``roc=True``) ``roc/<task>.png`` + ``roc_overview.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs: dict[str, Path] = {}
    overview = None
    if roc:
        pngs, overview = write_roc_pngs(result, out, task_labels=task_labels, dpi=dpi)
    payload = {"title": title, **result.to_dict(include_curves=include_curves_in_json)}
    json_path = out / JSON_NAME
    json_path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    md_path = out / MARKDOWN_NAME
    rel = {k: str(v.relative_to(out)) for k, v in pngs.items()}
    md_path.write_text(
        markdown_report(result, title=title, task_labels=task_labels, roc_pngs=rel), encoding="utf-8"
    )
    files = ReportFiles(out_dir=out, json=json_path, markdown=md_path, roc_pngs=pngs, roc_overview=overview)
    logger.info("wrote report %s (%d ROC plots)", md_path.name, len(pngs))
    return files


# --------------------------------------------------------------------------------------------------
# Several methods side by side.

MethodResults = EvaluationResult | Mapping[str, float | None]
"""An evaluated run, or ``{task: value}`` (e.g. numbers transcribed from the paper's Table 1)."""


def _values(method: MethodResults, metric: str) -> dict[str, float | None]:
    if isinstance(method, EvaluationResult):
        if metric not in ("auroc", "auprc", "ece"):
            raise ValueError(f"metric must be auroc, auprc or ece, got {metric!r}")
        return {t.task: getattr(t, metric) for t in method.tasks}
    return {str(k): None if v is None else float(v) for k, v in method.items()}


def _cis(method: MethodResults, metric: str) -> dict[str, Interval | None]:
    if isinstance(method, EvaluationResult) and metric in ("auroc", "auprc"):
        return {t.task: getattr(t, f"{metric}_ci") for t in method.tasks}
    return {}


def comparison_table(
    methods: Mapping[str, MethodResults],
    *,
    metric: str = "auroc",
    tasks: Sequence[str] | None = None,
    groups: Mapping[str, str] | None = None,
    task_labels: Mapping[str, str] | None = None,
    percent: bool = True,
    digits: int = 1,
    show_ci: bool = False,
    bold_best: bool = True,
) -> str:
    """Markdown table: one row per task, one column per method, then group and overall means.

    Means are recomputed here, unweighted over the rows shown, so every method is averaged over the
    same task set; a method missing some of those tasks gets its mean marked † (over fewer tasks).
    The best value per row is bold (highest; lowest for ECE); equal rounded values are all bold.
    """
    if not methods:
        raise ValueError("no methods to compare")
    names = list(methods)
    values = {m: _values(methods[m], metric) for m in names}
    cis = {m: _cis(methods[m], metric) for m in names}
    if tasks is None:
        first = methods[names[0]]
        tasks = (
            [t.task for t in first.tasks] if isinstance(first, EvaluationResult) else list(values[names[0]])
        )
    tasks = list(tasks)
    if groups is None:
        groups = {}
        first_result = next((r for r in methods.values() if isinstance(r, EvaluationResult)), None)
        if first_result is not None:
            groups = {t.task: t.group for t in first_result.tasks if t.group}
    scale = 100.0 if percent and metric != "ece" else 1.0
    lower_is_better = metric == "ece"

    def fmt(v: float | None) -> str:
        return "–" if v is None else f"{v * scale:.{digits}f}"

    def row(label: str, vals: dict[str, float | None], extra: dict[str, str]) -> str:
        rounded = {m: round(v * scale, digits) for m, v in vals.items() if v is not None}
        best = (min if lower_is_better else max)(rounded.values()) if rounded else None
        cells = []
        for m in names:
            text = fmt(vals[m]) + extra.get(m, "")
            if bold_best and best is not None and rounded.get(m) == best:
                text = f"**{text}**"
            cells.append(text)
        return f"| {_cell(label)} | " + " | ".join(cells) + " |"

    lines = ["| Task | " + " | ".join(_cell(m) for m in names) + " |", "|---|" + "---|" * len(names)]
    for t in tasks:
        extra = {}
        if show_ci:
            for m in names:
                ci = cis[m].get(t)
                if ci is not None:
                    extra[m] = f" [{ci.lower * scale:.{digits}f}–{ci.upper * scale:.{digits}f}]"
        lines.append(row(_label(t, task_labels), {m: values[m].get(t) for m in names}, extra))
    short = False

    def mean_row(label: str, subset: list[str]) -> str:
        nonlocal short
        vals: dict[str, float | None] = {}
        marks: dict[str, str] = {}
        for m in names:
            got = [v for v in (values[m].get(t) for t in subset) if v is not None]
            vals[m] = sum(got) / len(got) if got else None
            if got and len(got) < len(subset):
                marks[m] = "†"
                short = True
        return row(label, vals, marks)

    for g in sorted({groups[t] for t in tasks if groups.get(t)}):
        lines.append(mean_row(f"Group avg. ({g})", [t for t in tasks if groups.get(t) == g]))
    lines.append(mean_row("Overall average", tasks))
    unit = " (×100)" if scale == 100.0 else ""
    footer = ["", f"{metric.upper()}{unit}; best per row in bold; means unweighted over the tasks listed."]
    if short:
        footer.append("† mean over fewer tasks: the method has no value for some of them.")
    return "\n".join(lines + footer) + "\n"


def write_comparison(
    path: str | Path, methods: Mapping[str, MethodResults], *, title: str | None = None, **kwargs: Any
) -> Path:
    """Write ``comparison_table`` (with an optional ``# title``) to ``path``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = comparison_table(methods, **kwargs)
    p.write_text((f"# {title}\n\n" if title else "") + text, encoding="utf-8")
    return p
