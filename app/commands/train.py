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

from app.commands.training_extra import needs_training_extra, require_checkpoint
from app.commands.usage import OUT_OPTION_HELP, positional_or_option

logger = logging.getLogger(__name__)

TRAIN_HELP = (
    "Train HyperCT (one valid task per scan per step, BCE, AdamW, cosine per epoch; best epoch by mean "
    "validation AUROC). Writes best.pt, last.pt, metrics.csv, config.yaml, splits.csv and the "
    "validation predictions used for thresholds. Several GPUs: torchrun --nproc_per_node N -m app.cli "
    "train RECIPE OUT. See docs/training.md."
)
TRAIN_SHORT_HELP = "Train HyperCT from a recipe (synthetic phantoms, CT-RATE, or DICOM + labels)."
TRAIN_EXAMPLES = """Examples:
  hyperct train demo runs/demo              # synthetic phantoms, CPU, minutes
  hyperct train demo runs/demo --epochs 2 --set optimizer.lr=1e-3
  hyperct train ctrate runs/ctrate --set data.root=/data/CT-RATE/dataset
  hyperct train ctrate runs/ctrate --resume  # continue after a crash
  hyperct train my-recipe.yaml runs/site"""
EVALUATE_HELP = (
    "Evaluate a checkpoint on DATA (a run config/recipe YAML: its test split; or a DICOM folder with "
    "labels.csv: every study). Writes metrics.json, report.md, ROC plots, predictions.csv and "
    "thresholds.json (picked on validation predictions)."
)
EVALUATE_SHORT_HELP = "Evaluate a checkpoint: AUROC with CIs, thresholds, ROC plots, report.md."
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




def bundled_recipes() -> list[str]:
    """The recipes shipped in ``training/recipes`` (what ``train --help`` lists), found without
    importing ``training`` (torch); none where the training side is not installed."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("training")
    except (ImportError, ValueError):  # a finder that refuses it: not installed, as for None
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted({p.stem for root in spec.submodule_search_locations for p in Path(root, "recipes").glob("*.yaml")})


def _recipe_help() -> str:
    names = bundled_recipes()
    bundled = f"a bundled name ({', '.join(names)})" if names else "a bundled name (none installed)"
    return f"Recipe: {bundled} or a YAML file."


RecipeArg = Annotated[str, typer.Argument(metavar="RECIPE", help=_recipe_help())]
OutOption = Annotated[Path | None, typer.Option("--out", "-o", hidden=True, help=OUT_OPTION_HELP)]
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


def _required_out(out: Path | None, out_option: Path | None, usage: str) -> Path:
    """OUT as the positional argument or the older ``-o/--out``; missing is a usage error."""
    folder = positional_or_option(out, out_option)
    if folder is None:
        raise typer.BadParameter(f"give the output folder: {usage}")
    return folder


@needs_training_extra("hyperct train")
def train(
    recipe: RecipeArg,
    out: Annotated[
        Path | None,
        typer.Argument(
            metavar="OUT", show_default=False, help="Run folder (checkpoints, metrics, config). Required."
        ),
    ] = None,
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
    out_option: OutOption = None,
) -> None:
    """Typer wrapper around ``training.train.train``; prints a JSON summary."""
    out = _required_out(out, out_option, "hyperct train RECIPE OUT")
    _logging(verbose)
    from training.config import ConfigError, load_config

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
    try:  # the recipe and --set first: a mistake there is a second, not torch's import (≈ 5 s)
        cfg = load_config(recipe, overrides)
    except (ConfigError, FileNotFoundError) as exc:
        raise _fail(exc) from None
    from training.data import DataError
    from training.train import train as run_train

    try:
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
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="Checkpoint (best.pt of a run).")],
    data: Annotated[
        str,
        typer.Argument(
            metavar="DATA",
            help="Run config / recipe YAML (its test split) or a DICOM folder with labels.csv.",
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Argument(metavar="OUT", show_default=False, help="Report folder (default: CHECKPOINT's folder/eval)."),
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
    out_option: OutOption = None,
) -> None:
    """Typer wrapper around ``training.evaluate.evaluate_checkpoint``; prints the means as JSON."""
    out = positional_or_option(out, out_option)
    require_checkpoint(checkpoint)
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
    out: Annotated[
        Path | None,
        typer.Argument(
            metavar="OUT", show_default=False, help="Output folder (one sub-folder per method). Required."
        ),
    ] = None,
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
    out_option: OutOption = None,
) -> None:
    """Typer wrapper around ``training.baselines.run_baselines``; prints the comparison table."""
    out = _required_out(out, out_option, "hyperct baselines RECIPE OUT")
    _logging(verbose)
    from training.config import ConfigError, load_config

    try:  # the recipe and --set before torch's import (≈ 5 s)
        cfg = load_config(recipe, list(set_ or []) + _flags(device))
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        raise _fail(exc) from None
    from training.baselines import METHODS, run_baselines
    from training.data import DataError

    chosen = [p.strip() for v in (methods or list(METHODS)) for p in v.split(",") if p.strip()]
    bad = [m for m in chosen if m not in METHODS]
    if bad:
        raise typer.BadParameter(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
    try:
        res = run_baselines(cfg, out, methods=chosen, hyperct_checkpoint=hyperct, n_bootstrap=bootstrap)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        raise _fail(exc) from None
    typer.echo(res.comparison.read_text(encoding="utf-8"))
