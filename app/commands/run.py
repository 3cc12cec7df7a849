"""``hyperct run IN OUT``: one folder of DICOM files through the application, findings printed.

OUT, the model and ``app.yaml`` are checked before the MONAI Deploy / Holoscan stack is imported
(≈ 8 s): a mistake in them costs well under 2 s and is one line naming the culprit (exit 2), not
Holoscan's usage text, a traceback after the whole pipeline ran, or an empty OUT left behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from app.commands.usage import fail

if TYPE_CHECKING:
    from app.config import AppConfig

HELP = (
    "Run HyperCT on the DICOM study (or studies) in IN and write SR, SEG, text SR and results.json "
    "under OUT/<StudyInstanceUID>/ plus OUT/outcome.json. Exit codes: 0 processed, 3 no eligible "
    "series (nothing to do; see outcome.json), 1 error, 2 bad usage. Research use only."
)
SHORT_HELP = "Run HyperCT on the DICOM study (or studies) in folder IN; results under OUT."
EXAMPLES = """Examples:
  hyperct model demo                   # once: the demo model in ./models
  hyperct run study/ out/              # -m: $HOLOSCAN_MODEL_PATH or ./models
  hyperct run study/ out/ -m models/hyperct -q
  hyperct run study/ out/ -c app.yaml  # series selection, outputs, inference"""
DEFAULT_MODELS = Path("models")
MODEL_HINT = (
    "pass -m MODEL_FOLDER, or build the synthetic demo model with `hyperct model demo` (writes ./models/hyperct)"
)


def default_model_path() -> Path:
    """``HOLOSCAN_MODEL_PATH`` if set, else ``./models`` (where ``make demo`` puts the demo model)."""
    return Path(os.environ.get("HOLOSCAN_MODEL_PATH", DEFAULT_MODELS))


def check_output_folder(folder: Path) -> None:
    """Refuse an OUT that cannot be created or written, before any work: otherwise the whole
    pipeline runs first and the run ends in three tracebacks (Python, Holoscan, rich)."""
    existing = folder.absolute()
    while not existing.exists():  # the nearest part of OUT that exists decides
        existing = existing.parent
    if not existing.is_dir():
        fail(f"OUT {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
        fail(f"OUT {folder}: {existing} is {'on a read-only file system' if read_only else 'not writable'}")


def check_model_folder(model: Path) -> None:
    """Refuse a missing or broken model before Holoscan parses ``-m`` (its own usage text, ≈ 9 s
    in) and before OUT is created."""
    from operators.manifest import ManifestError, check_model

    try:
        check_model(model.absolute())
    except ManifestError as exc:
        fail(f"model: {exc}; {MODEL_HINT}")


def load_app_config(path: Path | None) -> AppConfig:
    """``app.yaml`` (``-c``, else ``$HOLOSCAN_CONFIG_PATH``, else the repository's), or exit 2
    naming the file and the key."""
    from app.config import AppConfig

    try:
        return AppConfig.load(path)
    except (ValueError, OSError) as exc:
        fail(exc)


def print_findings(output: Path, summaries: list[dict]) -> None:
    """A findings table per processed study (from results.json) and the reason for the others."""
    from rich.table import Table

    from app.commands.output import output_console

    console = output_console()
    for s in summaries:
        uid = s["study_instance_uid"] or "(no study)"
        if s["outcome"] != "processed":
            console.print(f"[yellow]{s['outcome']}[/yellow] study {uid}: {s['reason']}")
            continue
        data = json.loads((output / s["files"]["results"]).read_text())
        model = data.get("model", {})
        title = f"study {uid} — {model.get('name', '?')} {model.get('version', '')}"
        if model.get("synthetic"):
            title += " (SYNTHETIC demo model, not clinical)"
        table = Table(title=title, caption="Research use only. Attention maps are not lesion outlines.")
        for col in ("task", "group", "probability", "threshold", "finding"):
            table.add_column(col, justify="right" if col in ("probability", "threshold") else "left")
        for t in data["tasks"]:
            finding = "[bold red]present[/bold red]" if t["decision"] == "present" else "absent"
            table.add_row(t["name"], t["group"], f"{t['probability']:.3f}", f"{t['threshold']:.3f}", finding)
        console.print(table)
        if model.get("not_covered"):
            console.print(f"not covered by this model (not assessed): {', '.join(model['not_covered'])}")
        console.print("files: " + ", ".join(f"{k}={v}" for k, v in s["files"].items()))


def run(
    input_folder: Path = typer.Argument(..., metavar="IN", exists=True, file_okay=False, help="Folder of DICOM files."),
    output_folder: Path = typer.Argument(..., metavar="OUT", file_okay=False, help="Output folder (created)."),
    model: Path = typer.Option(
        None,
        "--model",
        "-m",
        show_default="$HOLOSCAN_MODEL_PATH, else ./models",
        help="Model folder with manifest.json, or a models root holding hyperct/ (`hyperct model demo` makes one).",
    ),
    config: Path = typer.Option(None, "--config", "-c", exists=True, dir_okay=False, help="app.yaml to use."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not print the findings table."),
) -> None:
    """Process one folder (the same pipeline as the MAP and the node)."""
    model_path = model or default_model_path()
    check_output_folder(output_folder)
    app_config = load_app_config(config)
    check_model_folder(model_path)

    import logging

    from app.app import exit_code, run_graph
    from app.pipeline import Pipeline
    from operators.manifest import ManifestError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        summaries = run_graph(input_folder, output_folder, Pipeline(model_path, app_config))
    except (ManifestError, FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if not quiet:
        print_findings(output_folder, summaries)
    raise typer.Exit(exit_code(summaries, map_entry=False))
