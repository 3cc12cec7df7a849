"""The ``hyperct`` command line (typer).

Every sub-command lives in ``app.commands.<name>`` and imports its heavy dependencies
(torch, monai, holoscan, onnxruntime, highdicom) inside the function body, after checking what the
user gave, so ``hyperct --help`` and a user error cost a fraction of a second, not the ≈ 8 s of the
stack (``tests/test_cli_startup.py`` keeps it so). Help is laid out by :mod:`app.commands.helpfmt`.
"""

from __future__ import annotations

import typer

from app import RESEARCH_USE_STATEMENT, __version__
from app.commands import jobs as jobs_cmd
from app.commands import labels as labels_cmd
from app.commands import model as model_cmd
from app.commands import process as process_cmd
from app.commands import run as run_cmd
from app.commands import serve as serve_cmd
from app.commands import synth as synth_cmd
from app.commands import train as train_cmd
from app.commands.helpfmt import HyperCTTyper

cli = HyperCTTyper(
    name="hyperct",
    help=(
        "HyperCT Node: run the HyperCT multi-task chest CT model on DICOM studies and return "
        f"DICOM SR + SEG results. {RESEARCH_USE_STATEMENT}"
    ),
    epilog=(
        "Start here:\n"
        "  hyperct model demo                    # the synthetic demo model, ./models\n"
        "  hyperct synth study/ -f cardiomegaly  # a synthetic CT study\n"
        "  hyperct run study/ out/               # the model on it\n"
        "  hyperct COMMAND -h                    # a command's options and examples"
    ),
    no_args_is_help=True,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"hyperct-node {__version__}")
        raise typer.Exit()


@cli.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", "-V", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """HyperCT Node command line."""


cli.command("run", help=run_cmd.HELP, short_help=run_cmd.SHORT_HELP, epilog=run_cmd.EXAMPLES)(run_cmd.run)
cli.command("process", help=process_cmd.HELP, short_help=process_cmd.SHORT_HELP, epilog=process_cmd.EXAMPLES)(
    process_cmd.process
)
cli.command("synth", help=synth_cmd.HELP, short_help=synth_cmd.SHORT_HELP, epilog=synth_cmd.EXAMPLES)(synth_cmd.synth)
cli.add_typer(labels_cmd.labels_app, name="labels", help=labels_cmd.HELP)
cli.command("export", help=model_cmd.EXPORT_HELP, short_help=model_cmd.EXPORT_SHORT_HELP)(model_cmd.export_command)
cli.add_typer(model_cmd.model_app, name="model", help=model_cmd.HELP)
cli.command("train", help=train_cmd.TRAIN_HELP, short_help=train_cmd.TRAIN_SHORT_HELP, epilog=train_cmd.TRAIN_EXAMPLES)(
    train_cmd.train
)
cli.command("evaluate", help=train_cmd.EVALUATE_HELP, short_help=train_cmd.EVALUATE_SHORT_HELP)(train_cmd.evaluate)
cli.command("baselines", help=train_cmd.BASELINES_HELP)(train_cmd.baselines)
cli.command("serve", help=serve_cmd.HELP, short_help=serve_cmd.SHORT_HELP, epilog=serve_cmd.EXAMPLES)(serve_cmd.serve)
cli.add_typer(jobs_cmd.jobs_app, name="jobs", help=jobs_cmd.HELP, epilog=jobs_cmd.EXAMPLES)
cli.command("status", help=jobs_cmd.STATUS_HELP)(jobs_cmd.status)


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
