"""``hyperct train``, ``hyperct evaluate`` and ``hyperct baselines`` (training side).

torch and ``training`` are imported inside the command bodies only, so ``hyperct --help`` stays fast
and serving never loads the training stack; without the ``train`` extra each command says so in one
line (:func:`app.commands.training_extra.needs_training_extra`). Wire with::

    from app.commands import train as train_cmd
    cli.command("train", help=train_cmd.TRAIN_HELP)(train_cmd.train)
    cli.command("evaluate", help=train_cmd.EVALUATE_HELP)(train_cmd.evaluate)
    cli.command("baselines", help=train_cmd.BASELINES_HELP)(train_cmd.baselines)

Configuration: a YAML recipe (``training/recipes/<name>.yaml`` or a path) patched by repeated
``--set section.key=value`` (values parsed as YAML), plus a few explicit flags that win over both.
Bad options exit with code 2; bad data or configuration print ``error: …`` and exit with code 2.
"""

from __future__ import annotations

import json
import logging
import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from app.commands.training_extra import needs_training_extra

logger = logging.getLogger(__name__)

TRAIN_HELP = (
    "Train HyperCT (one valid task per scan per step, BCE, AdamW, cosine per epoch; best epoch by mean "
    "validation AUROC). Writes best.pt, last.pt, metrics.csv, config.yaml, splits.csv and the "
    "validation predictions used for thresholds. Several GPUs: torchrun --nproc_per_node N -m app.cli "
    "train RECIPE --out RUN. See docs/training.md."
)
EVALUATE_HELP = (
    "Evaluate a checkpoint on DATA (a run config/recipe YAML: its test split; or a DICOM folder with "
    "labels.csv: every study). Writes metrics.json, report.md, ROC plots, predictions.csv and "
    "thresholds.json (picked on validation predictions)."
)
BASELINES_HELP = (
    "Train and evaluate the HPS multi-task and single-task LoRA baselines on the recipe's split and "
    "budget; writes comparison.md (with HyperCT when --hyperct is given)."
)


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class Split(str, Enum):
    train = "train"
    val = "val"
    test = "test"
    all = "all"
    default = "default"


RecipeArg = Annotated[
    str,
    typer.Argument(help="Recipe: a bundled name (demo, paper, ctrate, dicom) or a YAML file."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config value, e.g. --set optimizer.lr=1e-3 (repeatable)."),
]
DeviceOpt = Annotated[Device | None, typer.Option("--device", help="auto, cpu or cuda.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]


def _logging(verbose: bool) -> None:
    """Log to stderr; under torchrun only rank 0 logs progress (the others warnings and errors)."""
    level = logging.DEBUG if verbose else logging.INFO
    if os.environ.get("RANK", "0").strip() not in ("", "0"):
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _fail(exc: BaseException) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(code=2)


def _flags(device: Device | None, **values: Any) -> list[str]:
    out = [f"{k}={v}" for k, v in values.items() if v is not None]
    if device is not None:
        out.append(f"device={device.value}")
    return out


@needs_training_extra("hyperct train")
def train(
    recipe: RecipeArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (checkpoints, metrics, config).")],
    set_: SetOpt = None,
    device: DeviceOpt = None,
    precision: Annotated[
        Precision | None,
        typer.Option("--precision", help="auto (bf16 autocast on CUDA, fp32 on the CPU), fp32 or bf16."),
    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Number of epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Scans per step.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", min=0.0, help="AdamW learning rate.")] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed (python, numpy, torch, task draws).")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.pt.")] = False,
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="Skip unreadable scans / bad label rows (warn and count).")
    ] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars.")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Typer wrapper around ``training.train.train``; prints a JSON summary."""
    _logging(verbose)
    from training.config import ConfigError, load_config
    from training.data import DataError
    from training.train import train as run_train

    overrides = list(set_ or [])
    overrides += _flags(
        device,
        precision=precision.value if precision else None,
        epochs=epochs,
        batch_size=batch_size,
        **{"optimizer.lr": lr, "seed": seed},
    )
    if skip_bad:
        overrides.append("data.skip_bad=true")
    if no_progress:
        overrides.append("progress=false")
    try:
        cfg = load_config(recipe, overrides)
        result = run_train(cfg, out, resume=resume)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        raise _fail(exc) from None
    if result.rank != 0:  # under torchrun rank 0 reports for all
        return
    typer.echo(
        json.dumps(
            {
                "best_checkpoint": result.best_checkpoint.name,
                "best_epoch": result.best_epoch,
                "best_val_mean_auroc": result.best_val_auroc,
                "tasks": result.tasks,
                "splits": result.splits,
                "bad_samples": result.bad_samples,
            },
            indent=2,
        )
    )


@needs_training_extra("hyperct evaluate")
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint (best.pt of a run).")],
    data: Annotated[
        str,
        typer.Argument(help="Run config / recipe YAML (its test split) or a DICOM folder with labels.csv."),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Report folder (default: CHECKPOINT dir/eval).")
    ] = None,
    split: Annotated[
        Split, typer.Option("--split", help="Split to evaluate (default: test; all for a folder).")
    ] = Split.default,
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=0, help="Bootstrap resamples for CIs.")] = 1000,
    target_sensitivity: Annotated[
        list[float] | None,
        typer.Option(
            "--target-sensitivity", help="Also pick the threshold reaching this sensitivity (repeatable)."
        ),
    ] = None,
    val_predictions: Annotated[
        Path | None, typer.Option("--val-predictions", help="Validation predictions CSV for thresholds.")
    ] = None,
    set_: SetOpt = None,
    device: DeviceOpt = None,
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="Skip unreadable scans (warn and count).")
    ] = False,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="No ROC PNGs.")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Typer wrapper around ``training.evaluate.evaluate_checkpoint``; prints the means as JSON."""
    _logging(verbose)
    from training.config import ConfigError
    from training.data import DataError
    from training.evaluate import data_config_for, evaluate_checkpoint

    overrides = list(set_ or []) + _flags(device) + (["data.skip_bad=true"] if skip_bad else [])
    try:
        cfg, default_split = data_config_for(data, overrides)
        chosen = default_split if split is Split.default else split.value
        targets = tuple(target_sensitivity) if target_sensitivity else (0.9,)
        res = evaluate_checkpoint(
            checkpoint, cfg, out or checkpoint.parent / "eval", split=chosen, val_predictions=val_predictions,
            n_bootstrap=bootstrap, target_sensitivities=targets, roc_plots=not no_plots,
        )  # fmt: skip
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        raise _fail(exc) from None
    means = {g: {m: v.value for m, v in ms.items()} for g, ms in res.result.means.items()}
    typer.echo(
        json.dumps(
            {"report": str(res.files.markdown.name), "thresholds": res.thresholds.name, "means": means},
            indent=2,
        )
    )


@needs_training_extra("hyperct baselines")
def baselines(
    recipe: RecipeArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (one sub-folder per method).")],
    hyperct: Annotated[
        Path | None,
        typer.Option("--hyperct", help="HyperCT checkpoint or run folder to include in the table."),
    ] = None,
    methods: Annotated[
        list[str] | None,
        typer.Option("--methods", help="hps, stl (comma-separated or repeated; default both)."),
    ] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=0, help="Bootstrap resamples for CIs.")] = 1000,
    set_: SetOpt = None,
    device: DeviceOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Typer wrapper around ``training.baselines.run_baselines``; prints the comparison table."""
    _logging(verbose)
    from training.baselines import METHODS, run_baselines
    from training.config import ConfigError, load_config
    from training.data import DataError

    chosen = [p.strip() for v in (methods or list(METHODS)) for p in v.split(",") if p.strip()]
    bad = [m for m in chosen if m not in METHODS]
    if bad:
        raise typer.BadParameter(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
    try:
        cfg = load_config(recipe, list(set_ or []) + _flags(device))
        res = run_baselines(cfg, out, methods=chosen, hyperct_checkpoint=hyperct, n_bootstrap=bootstrap)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        raise _fail(exc) from None
    typer.echo(res.comparison.read_text(encoding="utf-8"))
