"""The ``hyperct`` command line (typer).

Every sub-command lives in ``app.commands.<name>`` and imports its heavy dependencies
(torch, monai, holoscan, onnxruntime) inside the function body, so ``hyperct --help`` starts fast.
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

cli = typer.Typer(
    name="hyperct",
    help=(
        "HyperCT Node: run the HyperCT multi-task chest CT model on DICOM studies and return "
        f"DICOM SR + SEG results. {RESEARCH_USE_STATEMENT}"
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
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


cli.command("run", help=run_cmd.HELP)(run_cmd.run)
cli.command("process", help=process_cmd.HELP)(process_cmd.process)
cli.command("synth", help=synth_cmd.HELP)(synth_cmd.synth)
cli.add_typer(labels_cmd.labels_app, name="labels", help=labels_cmd.HELP)
cli.command("export", help=model_cmd.EXPORT_HELP)(model_cmd.export_command)
cli.add_typer(model_cmd.model_app, name="model", help=model_cmd.HELP)
cli.command("train", help=train_cmd.TRAIN_HELP)(train_cmd.train)
cli.command("evaluate", help=train_cmd.EVALUATE_HELP)(train_cmd.evaluate)
cli.command("baselines", help=train_cmd.BASELINES_HELP)(train_cmd.baselines)
cli.command("serve", help=serve_cmd.HELP)(serve_cmd.serve)
cli.add_typer(jobs_cmd.jobs_app, name="jobs", help=jobs_cmd.HELP)
cli.command("status", help=jobs_cmd.STATUS_HELP)(jobs_cmd.status)


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
