"""``hyperct labels …``: derive training/evaluation labels from clinical tables.

``training`` is imported inside the command body only, so ``hyperct --help`` stays light and the
serving code never imports ``training`` at module level (tests/test_dependencies.py).
Wire with ``cli.add_typer(labels.labels_app, name="labels", help=labels.HELP)`` or register
``labels_echo_command`` under a group of your own.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from app.commands.helpfmt import HyperCTTyper
from app.commands.training_extra import needs_training_extra
from app.commands.usage import OUT_OPTION_HELP, positional_or_option

logger = logging.getLogger(__name__)

HELP = "Derive task labels from clinical tables (echo measurements → the 7 cardiac labels)."

ECHO_HELP = (
    "Match each CT to the closest echo of the same patient within ±WINDOW days and derive the 7 "
    "cardiac labels (1 / 0 / -1 = missing) by the paper's rules (LAVI > 34 mL/m² by default; "
    "--lavi-threshold 35 reproduces the released code). Writes CT key, 7 label columns, echo_date and "
    "echo_days_from_ct (echo − CT, days). See docs/evaluation.md."
)

labels_app = HyperCTTyper(name="labels", help=HELP, no_args_is_help=True)


@labels_app.callback()
def _labels_group() -> None:
    """Keeps ``labels`` a command group (typer collapses a one-command app into that command)."""


@labels_app.command("echo", help=ECHO_HELP)
@needs_training_extra("hyperct labels echo")
def labels_echo_command(
    ct_csv: Annotated[
        Path,
        typer.Argument(
            metavar="CT_CSV",
            help="CT list CSV: StudyInstanceUID (or VolumeName/Path), PatientID, StudyDate (YYYYMMDD).",
        ),
    ],
    echo_csv: Annotated[
        Path,
        typer.Argument(
            metavar="ECHO_CSV",
            help=(
                "Echo CSV: PatientID, EchoDate, lvef, rv_systolic_function, pasp, la_volume_index, "
                "lv_d_measurement (cm), e_a_ratio, tr_max_velocity (m/s), sex; ECHO_… spellings accepted."
            )
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Argument(metavar="OUT", show_default=False, help="Output labels CSV (written atomically). Required."),
    ] = None,
    lavi_threshold: Annotated[
        float,
        typer.Option(
            "--lavi-threshold", help="LAVI cut-off in mL/m²: 34 = paper (default), 35 = released code."
        ),
    ] = 34.0,
    window_days: Annotated[int, typer.Option("--window-days", min=0, help="Echo ↔ CT window, ± days.")] = 180,
    key_column: Annotated[
        str,
        typer.Option(
            "--key-column", help="CT list key column (default: StudyInstanceUID, VolumeName, Path)."
        ),
    ] = "",
    out_option: Annotated[Path | None, typer.Option("--out", "-o", hidden=True, help=OUT_OPTION_HELP)] = None,
) -> None:
    """Typer wrapper around ``training.echo_labels.derive_echo_labels``; prints the summary as JSON."""
    out = positional_or_option(out, out_option)
    if out is None:
        raise typer.BadParameter("give the output CSV: hyperct labels echo CT_CSV ECHO_CSV OUT")
    from training.echo_labels import EchoLabelError, derive_echo_labels

    try:
        summary = derive_echo_labels(
            ct_csv,
            echo_csv,
            out,
            lavi_threshold=lavi_threshold,
            window_days=window_days,
            key_column=key_column or None,
        )
    except (EchoLabelError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(json.dumps(summary.to_dict(), indent=2))
