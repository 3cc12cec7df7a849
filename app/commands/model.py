"""``hyperct export`` and ``hyperct model verify``.

``export`` (training side) imports torch and ``training`` inside its body only; ``verify`` (serving
side) uses ``operators.model_verify`` (onnxruntime, no torch). Wire with::

    from app.commands import model as model_cmd
    cli.command("export", help=model_cmd.EXPORT_HELP)(model_cmd.export_command)
    cli.add_typer(model_cmd.model_app, name="model", help=model_cmd.HELP)
"""

from __future__ import annotations

import json
import logging
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from app.commands.helpfmt import HyperCTTyper
from app.commands.training_extra import needs_training_extra, require_checkpoint

logger = logging.getLogger(__name__)

HELP = "Inspect and check exported HyperCT models (model folders with manifest.json + ONNX files)."
EXPORT_HELP = (
    "Export a HyperCT checkpoint to ONNX (one merged-LoRA model per task by default) plus a validated "
    "manifest.json: the model folder the node serves (e.g. models/hyperct/). See docs/export.md."
)
EXPORT_SHORT_HELP = "Export a HyperCT checkpoint to the ONNX model folder the node serves."
VERIFY_HELP = (
    "Verify a model folder: manifest schema, file hashes, and that every ONNX file loads in ONNX "
    "Runtime and runs on a dummy study with the declared inputs/outputs. Exit code 1 on any problem."
)

model_app = HyperCTTyper(name="model", help=HELP, no_args_is_help=True)


class ExportFormat(str, Enum):
    merged = "merged"
    factored = "factored"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


class Target(str, Enum):
    auto = "auto"
    gpu = "gpu"
    cpu = "cpu"


def _split(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [p.strip() for v in values for p in v.split(",") if p.strip()]


def _mb(size: int | None) -> str:
    return "?" if size is None else f"{size / 2**20:.1f}"


@model_app.callback()
def _model_group() -> None:
    """Keeps ``model`` a command group."""


@needs_training_extra("hyperct export")
def export_command(
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="HyperCT checkpoint (.pt from training).")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Model folder to write (manifest.json + ONNX files).")],
    tasks: Annotated[
        list[str] | None,
        typer.Option("--tasks", help="Export only these task keys (comma-separated or repeated)."),
    ] = None,
    fmt: Annotated[
        ExportFormat,
        typer.Option(
            "--format", help="merged: one ONNX per task (default); factored: one graph + task input."
        ),
    ] = ExportFormat.merged,
    precision: Annotated[
        Precision,
        typer.Option(
            "--precision",
            help="auto: fp16 for a GPU target, fp32 for a CPU one. fp16: fp16 weights/activations, I/O fp32; "
            "int8: dynamic int8 quantisation (CPU hosts). Parity to fp32 is measured and recorded.",
        ),
    ] = Precision.auto,
    target: Annotated[
        Target,
        typer.Option("--target", help="Where the model will be served: gpu, cpu, or auto (this machine)."),
    ] = Target.auto,
    fp16: Annotated[bool, typer.Option("--fp16", help="Same as --precision fp16.")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Same as --precision int8.")] = False,
    thresholds: Annotated[
        Path | None,
        typer.Option("--thresholds", help="metrics.json or thresholds JSON: thresholds, AUROC, prevalence."),
    ] = None,
    threshold_rule: Annotated[
        str, typer.Option("--threshold-rule", help="Named threshold used as the operating threshold.")
    ] = "youden",
    name: Annotated[str, typer.Option("--name", help="Model name in the manifest.")] = "hyperct",
    version: Annotated[str, typer.Option("--version", help="Model version in the manifest.")] = "0.1.0",
    synthetic: Annotated[bool, typer.Option("--synthetic", help="Mark as a synthetic (demo) model.")] = False,
    training_data: Annotated[
        Path | None, typer.Option("--training-data", help="JSON file describing the training data.")
    ] = None,
    backbone_path: Annotated[
        Path | None, typer.Option("--backbone-path", help="Local DINOv3 folder (overrides the checkpoint's).")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
    no_check: Annotated[
        bool, typer.Option("--no-check", help="Skip the ONNX Runtime vs PyTorch self-check per task.")
    ] = False,
) -> None:
    """``hyperct export CHECKPOINT OUT``."""
    require_checkpoint(checkpoint)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from app.commands.output import output_console
    from operators.manifest import ManifestError, load_manifest
    from operators.ort_session import gpu_present
    from training.export import ExportError, export_model, resolve_precision

    console, err = output_console(), output_console(stderr=True)
    shorthand = [name for name, on in (("fp16", fp16), ("int8", int8)) if on]
    if len(shorthand) > 1 or (shorthand and precision.value not in ("auto", shorthand[0])):
        asked = ", ".join(
            [f"--{n}" for n in shorthand]
            + ([f"--precision {precision.value}"] if precision.value != "auto" else [])
        )
        err.print(f"[red]error:[/red] {asked} exclude each other")
        raise typer.Exit(2)
    where = target.value if target is not Target.auto else ("gpu" if gpu_present() else "cpu")
    chosen, why = resolve_precision(shorthand[0] if shorthand else precision.value, where)
    console.print(f"precision: {why}")
    data: dict[str, Any] | None = None
    if training_data is not None:
        try:
            data = json.loads(training_data.read_text())
        except (OSError, ValueError) as e:
            err.print(f"[red]error:[/red] --training-data {training_data}: {e}")
            raise typer.Exit(2) from e
    try:
        with Progress(
            TextColumn("[bold]export[/bold] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress:
            bar = progress.add_task("loading checkpoint", total=None)

            def report(done: int, total: int, key: str) -> None:
                progress.update(bar, completed=done, total=total, description=key)

            export_model(
                checkpoint,
                out,
                fmt=fmt.value,
                precision=chosen,
                tasks=_split(tasks),
                thresholds=thresholds,
                threshold_rule=threshold_rule,
                synthetic=synthetic,
                name=name,
                version=version,
                training_data=data,
                backbone_path=backbone_path,
                check=not no_check,
                overwrite=overwrite,
                progress=report,
            )
        manifest = load_manifest(out, verify_files=False)
    except (ExportError, ManifestError, FileNotFoundError, ValueError) as e:
        err.print(f"[red]export failed:[/red] {e}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from e
    checks = json.loads((out / "manifest.json").read_text())["export"]["self_check"]
    table = Table(title=f"{manifest.name} {manifest.version}: {manifest.format}, {manifest.precision}")
    for col in ("task", "group", "file", "MB", "threshold", "|Δlogit| vs torch"):
        table.add_column(col)
    for t in manifest.tasks:
        size = sum((out / f).stat().st_size for f, _ in t.files())
        diff = checks.get(t.key, {}).get("max_abs_logit_diff")
        table.add_row(
            t.key,
            t.group,
            t.file,
            _mb(size),
            f"{t.threshold:.3f}",
            "skipped" if diff is None else f"{diff:.1e}",
        )
    console.print(table)
    parity = json.loads((out / "manifest.json").read_text())["export"].get("parity_to_fp32")
    if parity and parity["precision"] != "fp32":
        console.print(
            f"parity of {parity['precision']} to PyTorch fp32 over {parity['tasks']} task(s): "
            f"max |Δlogit| {parity['max_abs_logit_diff']:.2e}, max |Δprobability| "
            f"{parity['max_abs_probability_diff']:.2e} (manifest export.parity_to_fp32)"
        )
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    console.print(f"wrote {out} ({total / 2**20:.1f} MB, {len(manifest.tasks)} task(s))")


@model_app.command("verify", help=VERIFY_HELP)
def verify_command(
    model_dir: Annotated[
        Path, typer.Argument(metavar="MODEL", help="Model folder (or a models root holding hyperct/).")
    ],
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or auto.")] = "cpu",
    no_run: Annotated[bool, typer.Option("--no-run", help="Check schema and hashes only.")] = False,
) -> None:
    """``hyperct model verify DIR``."""
    from rich.table import Table

    from app.commands.output import output_console
    from operators.model_verify import verify_model
    from operators.ort_session import SessionOptions

    console, err = output_console(), output_console(stderr=True)
    try:
        options = SessionOptions(device=device)
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    report = verify_model(model_dir, run=not no_run, session_options=options)
    m = report.manifest
    if m is not None:
        title = f"{m.name} {m.version} ({m.format}, {m.precision}{', SYNTHETIC' if m.synthetic else ''})"
        table = Table(title=title)
        for col in ("key", "group", "code", "threshold", "AUROC", "MB", "status"):
            table.add_column(col)
        for t in report.tasks:
            table.add_row(
                t.key,
                t.group,
                t.code,
                f"{t.threshold:.3f}" + ("" if t.threshold_source[:7] != "default" else " (default)"),
                "—" if t.auroc is None else f"{t.auroc:.3f}",
                _mb(t.size_bytes),
                "[green]ok[/green]" if t.ok else "[red]FAIL[/red]",
            )
        console.print(table)
    if report.ok:
        console.print(f"[green]ok[/green]: {report.model_dir} ({len(report.tasks)} task(s))")
        return
    for problem in report.problems:
        err.print(f"[red]problem:[/red] {problem}", soft_wrap=True, highlight=False)
    raise typer.Exit(1)


DEMO_HELP = (
    "Build the demo model into OUT (default models/hyperct): train the demo recipe on synthetic "
    "phantoms, pick thresholds on its validation split, export. Reused when an up-to-date one is there "
    "(a few minutes on 2 CPU cores otherwise). Synthetic demo — not for clinical use."
)
DEMO_EXAMPLES = """Examples:
  hyperct model demo          # ./models/hyperct, where run and serve look
  hyperct model demo --force  # rebuild it
  hyperct model demo /opt/models/hyperct  # then: run IN OUT -m /opt/models
  hyperct model demo /tmp/control --control  # permuted-label control"""


@model_app.command("demo", help=DEMO_HELP, epilog=DEMO_EXAMPLES)
@needs_training_extra("hyperct model demo")
def demo_command(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Model folder to write.")] = Path("models/hyperct"),
    seed: Annotated[int, typer.Option("--seed", help="Training seed (the synthetic studies are fixed).")] = 0,
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild even when an up-to-date model is there.")
    ] = False,
    recipe: Annotated[
        str,
        typer.Option("--recipe", help="Recipe to build (default: demo, the shipped one; e.g. demo-small)."),
    ] = "demo",
    control: Annotated[
        bool,
        typer.Option("--control", help="Train on permuted labels instead: held-out AUROC must be at chance."),
    ] = False,
) -> None:
    """``hyperct model demo [OUT]`` (imports training lazily: it trains)."""
    from app.commands.output import output_console
    from training.demo_model import build_demo_model

    console = output_console()
    model = build_demo_model(out, seed=seed, force=force, recipe=recipe, control=control)
    how = "reused (up to date)" if model.cached else f"built in {model.seconds:.0f} s"
    aurocs = ", ".join(f"{k} {'—' if v is None else f'{v:.3f}'}" for k, v in model.validation_auroc.items())
    console.print(f"demo model {how}: {model.path}  validation AUROC: {aurocs}", highlight=False)
