"""`make demo`: the main job end to end on the embedded default.

Each step prints what it does; later issues add steps (demo model, node on loopback, storescu →
node → storescp, dciodvfy, findings). Today it writes a synthetic chest CT study with planted
findings and prints its summary. Run as ``python -m app.demo [OUT]``.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

from rich.console import Console

from app import RESEARCH_USE_STATEMENT

logger = logging.getLogger(__name__)
console = Console()

DEMO_FINDINGS = "pleural_effusion,lung_nodule,cardiomegaly"


def step_synthetic_study(out: Path) -> Path:
    """Write one synthetic study (thin axial CT + scout + thick series) with planted findings."""
    from app.cli import cli

    study_dir = out / "study"
    if study_dir.exists():
        shutil.rmtree(study_dir)
    console.rule("[bold]1. Synthetic chest CT study (synthetic, not clinical)")
    args = ["synth", str(study_dir), "--finding", DEMO_FINDINGS, "--extra", "scout,thick", "--seed", "7"]
    console.print(f"$ hyperct {' '.join(args)}")
    try:
        cli(args, standalone_mode=False)
    except SystemExit as exc:  # typer may exit on its own
        if exc.code:
            raise
    return study_dir


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else Path("demo-out")
    out.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]HyperCT Node demo[/bold] — {RESEARCH_USE_STATEMENT}")
    study = step_synthetic_study(out)
    files = sum(1 for p in study.rglob("*.dcm"))
    console.rule("[bold]Done")
    console.print(f"{files} DICOM files under {study}; labels in {study / 'labels.csv'}")
    console.print(
        "[dim]Next (issue by issue): the demo model, the node on loopback, storescu → node → storescp, "
        "dciodvfy, findings.[/dim]"
    )
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    raise SystemExit(main())
