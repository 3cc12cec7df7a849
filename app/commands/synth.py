"""``hyperct synth``: write synthetic chest CT studies (DICOM) with planted findings and labels.

Imports stay light at module level (the CLI imports this on every start); numpy, pydicom and the
generator are imported inside the command.
"""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

log = logging.getLogger(__name__)

HELP = (
    "Generate synthetic chest CT studies: an analytic phantom (body, lungs with vessels and airways, "
    "heart, aorta, coronaries, spine, ribs, table) with optional planted findings, written as a valid "
    "CT Image Storage series plus labels.csv (CT-RATE columns) and findings.json ground truth. "
    "Defaults: 160 slices of 512x512 (~2 mm spacing over 320 mm, 0.75 mm pixels), HFS, explicit VR LE."
)

SHORT_HELP = "Generate synthetic chest CT studies (DICOM) with planted findings and their labels."
EXAMPLES = """Examples:
  hyperct synth study/                          # one study, no findings
  hyperct synth study/ -f cardiomegaly -f pleural_effusion --slices 80
  hyperct synth data/ --studies 20 --random-findings --prevalence 0.3 -j 2
  hyperct synth study/ -t jpeg-ls --extra scout,thick"""

FINDING_CHOICES = (
    "lung_nodule, lung_opacity, consolidation, atelectasis, pleural_effusion, pericardial_effusion, cardiomegaly, "
    "emphysema, coronary_artery_wall_calcification, arterial_wall_calcification, hiatal_hernia, medical_material"
)


class Position(str, Enum):
    HFS = "HFS"
    FFS = "FFS"


def _split(values: list[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out += [p.strip() for p in v.split(",") if p.strip()]
    return out


def _findings_cb(values: list[str] | None) -> list[str]:
    from synth.tasks import normalise_finding_name

    try:
        return [normalise_finding_name(v) for v in _split(values)]
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _syntax_cb(value: str) -> str:
    from synth.codecs import resolve_syntax

    try:
        return resolve_syntax(value).key
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _extras_cb(values: list[str] | None) -> list[str]:
    from synth.study import EXTRA_SERIES

    extras = [v.lower() for v in _split(values)]
    bad = [e for e in extras if e not in EXTRA_SERIES]
    if bad:
        raise typer.BadParameter(f"unknown extra series {', '.join(bad)}; valid: {', '.join(EXTRA_SERIES)}")
    return extras


def _prevalence_cb(value: str) -> str:
    from synth.dataset import parse_prevalence

    try:
        parse_prevalence(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


def synth(
    out: Annotated[
        Path, typer.Argument(help="Output folder (created if missing).", file_okay=False, metavar="OUT")
    ],
    slices: Annotated[
        int,
        typer.Option("--slices", "-n", min=50, max=600, help="Axial slices of the primary series (50-600)."),
    ] = 160,
    slice_spacing: Annotated[
        float | None,
        typer.Option(
            "--slice-spacing",
            min=0.3,
            max=10.0,
            help="Slice spacing in mm (default: ~320 mm / slices, 0.25 mm steps).",
        ),
    ] = None,
    slice_thickness: Annotated[
        float | None,
        typer.Option(
            "--slice-thickness", min=0.3, max=10.0, help="Slice thickness in mm (default: the spacing)."
        ),
    ] = None,
    pixel_spacing: Annotated[
        float | None,
        typer.Option(
            "--pixel-spacing",
            min=0.2,
            max=10.0,
            help="In-plane pixel spacing in mm (default: 384 mm / columns).",
        ),
    ] = None,
    rows: Annotated[int, typer.Option("--rows", min=64, max=1024, help="Image rows.")] = 512,
    cols: Annotated[int, typer.Option("--cols", min=64, max=1024, help="Image columns.")] = 512,
    position: Annotated[
        Position, typer.Option("--position", case_sensitive=False, help="Patient position (supine).")
    ] = Position.HFS,
    finding: Annotated[
        list[str] | None,
        typer.Option(
            "--finding",
            "-f",
            callback=_findings_cb,
            help=f"Finding to plant (repeat or comma-separate): {FINDING_CHOICES}.",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Patient seed (first seed with --studies).")] = 0,
    contrast: Annotated[
        bool, typer.Option("--contrast/--no-contrast", help="IV contrast in the primary series.")
    ] = False,
    transfer_syntax: Annotated[
        str,
        typer.Option(
            "--transfer-syntax",
            "-t",
            callback=_syntax_cb,
            help="explicit, implicit, deflated, jpeg-lossless (DCMTK), jpeg-ls (DCMTK), rle, j2k, or a transfer syntax UID.",
        ),
    ] = "explicit",
    extra: Annotated[
        list[str] | None,
        typer.Option(
            "--extra",
            "-x",
            callback=_extras_cb,
            help="Extra series in the same study: scout, thick, contrast, mr.",
        ),
    ] = None,
    patient_name: Annotated[
        str | None, typer.Option("--patient-name", help="(default: SYNTHETIC^PHANTOM^<seed>)")
    ] = None,
    patient_id: Annotated[str | None, typer.Option("--patient-id", help="(default: SYN<seed>)")] = None,
    accession: Annotated[
        str | None, typer.Option("--accession", help="(default: derived from the configuration)")
    ] = None,
    study_uid: Annotated[
        str | None, typer.Option("--study-uid", help="(default: deterministic 2.25 UID)")
    ] = None,
    series_uid: Annotated[
        str | None, typer.Option("--series-uid", help="Primary series UID (default: deterministic).")
    ] = None,
    studies: Annotated[
        int, typer.Option("--studies", min=1, max=100000, help="Number of studies (different patients).")
    ] = 1,
    random_findings: Annotated[
        bool, typer.Option("--random-findings", help="Draw each finding per study at --prevalence.")
    ] = False,
    prevalence: Annotated[
        str,
        typer.Option(
            "--prevalence",
            callback=_prevalence_cb,
            help="Finding prevalence: 0.3, or 0.2,lung_nodule=0.5,... .",
        ),
    ] = "0.3",
    paired: Annotated[
        bool, typer.Option("--paired", help="With --studies: each study is followed by its negative twin.")
    ] = False,
    vary_geometry: Annotated[
        bool,
        typer.Option(
            "--vary-geometry/--fixed-geometry",
            help="With --studies > 1: randomise FOV, slice spacing, coverage, HFS/FFS.",
        ),
    ] = True,
    jobs: Annotated[
        int, typer.Option("--jobs", "-j", min=1, max=64, help="Studies generated in parallel (processes).")
    ] = 1,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary table.")] = False,
) -> None:
    """Generate synthetic chest CT DICOM studies."""
    from rich.table import Table

    from app.commands.output import output_console
    from synth.dataset import DatasetConfig, generate_dataset, parse_prevalence, summary_rows
    from synth.findings import FindingPlacementError
    from synth.geometry import PatientPosition
    from synth.study import StudyConfig

    console = output_console()
    single_only = {
        "--patient-name": patient_name,
        "--patient-id": patient_id,
        "--accession": accession,
        "--study-uid": study_uid,
        "--series-uid": series_uid,
    }
    if studies > 1:
        given = [k for k, v in single_only.items() if v]
        if given:
            raise typer.BadParameter(
                f"{', '.join(given)} only apply to a single study", param_hint="--studies"
            )
    elif paired:
        raise typer.BadParameter("--paired needs --studies 2 or more", param_hint="--paired")
    for name, uid in (("--study-uid", study_uid), ("--series-uid", series_uid)):
        if uid and not _valid_uid(uid):
            raise typer.BadParameter(f"{uid!r} is not a valid DICOM UID", param_hint=name)
    base = StudyConfig(
        seed=seed,
        findings=tuple(finding or ()),
        slices=slices,
        slice_spacing=slice_spacing,
        slice_thickness=slice_thickness,
        pixel_spacing=pixel_spacing,
        rows=rows,
        cols=cols,
        position=PatientPosition(position.value),
        contrast=contrast,
        transfer_syntax=transfer_syntax,
        extras=tuple(extra or ()),
        patient_name=patient_name,
        patient_id=patient_id,
        accession=accession,
        study_uid=study_uid,
        series_uid=series_uid,
    )
    try:
        base.validated()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    dcfg = DatasetConfig(
        studies=studies,
        base=base,
        random_findings=random_findings,
        prevalence=parse_prevalence(prevalence),
        vary_geometry=vary_geometry and studies > 1,
        paired=paired,
        jobs=jobs,
    )
    done = 0

    def progress(res: object) -> None:
        nonlocal done
        done += 1
        if studies > 1 and not quiet:
            console.print(f"[dim]{done}/{studies}[/dim] {getattr(res, 'folder').name}")  # noqa: B009

    try:
        result = generate_dataset(dcfg, out, progress=progress)
    except FindingPlacementError as exc:
        raise typer.BadParameter(str(exc), param_hint="--finding") from None
    except RuntimeError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    if quiet:
        return
    table = Table(title=f"Synthetic studies in {out}", show_lines=True)
    table.add_column("Study folder / StudyInstanceUID", overflow="fold", ratio=3)
    table.add_column("Series (images)", no_wrap=True)
    table.add_column("Findings", overflow="fold", ratio=2)
    table.add_column("s", justify="right", no_wrap=True)
    rows_ = summary_rows(result.studies)
    for r in rows_[:50]:
        series = "\n".join(f"{name} ({n})" for name, n in r["series_list"])
        findings = "\n".join(r["findings_list"]) or "-"
        table.add_row(
            f"{r['study']}\n[dim]{r['study_uid']}[/dim]",
            f"{series}\n[dim]{r['position']}[/dim]",
            findings,
            f"{r['seconds']:.1f}",
        )
    if len(rows_) > 50:
        table.add_row(f"... {len(rows_) - 50} more", "", "", "")
    console.print(table)
    console.print(f"labels: {result.labels_csv}")


def _valid_uid(uid: str) -> bool:
    import re

    return len(uid) <= 64 and re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+", uid) is not None
