"""``hyperct process ARCHIVE OUT``: reprocess an archive (or a PACS query) into a findings table."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

HELP = (
    "Reprocess an archive: index every DICOM file under ARCHIVE (nested folders, files without "
    ".dcm, DICOMDIR, zip files; headers only), run HyperCT on each study that passes the filters "
    "(the same pipeline as `hyperct run`) and write OUT/<StudyInstanceUID>/ (SR, SEG, results.json) "
    "plus OUT/findings.csv and findings.parquet (one row per study x task), OUT/studies.csv and "
    "OUT/errors.csv (every skipped file and unprocessed study, with the reason) and OUT/outcome.json "
    "(one record per study, as `hyperct run` writes it). Resumable: a rerun "
    "skips studies already finished (unless --force); an interrupted run resumes. With --from-pacs "
    "the studies come from a C-FIND at the PACS and are retrieved one by one (C-GET) into a bounded "
    "cache. With --send-to the SR, SEG and text SR of every processed study are pushed by C-STORE "
    "through the node's outbox (retried with backoff; OUT/sends.csv; a rerun resumes unsent results "
    "and never resends delivered ones). Exit codes: 0 done (see errors.csv), 1 error, failed "
    "studies or results not delivered, 2 bad usage, 130 interrupted. Research use only."
)
SHORT_HELP = "Reprocess an archive (or a PACS query) into per-study results and findings tables."
EXAMPLES = """Examples:
  hyperct process /archive out/          # every study; rerun to resume
  hyperct process archive.zip out/ --from 2024-01-01 --modality CT -w 2
  hyperct process out/ --from-pacs PACS@pacs.example:104 --study @uids.txt
  hyperct process /archive out/ --send-to PACS@pacs.example:104"""


def _date(value: str | None) -> str:
    from app.batch.filters import parse_date

    if not value:
        return ""
    try:
        return parse_date(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _address(option: str, text: str) -> str:
    """``AE@host:port`` checked by the one address parser (the node file's and the sender's) and
    written back in its canonical form; a bad one is a usage error naming the option."""
    from app.dimse.network import RemoteNode

    try:
        return str(RemoteNode.parse(text))
    except ValueError as exc:
        raise typer.BadParameter(f"{option} {text}: {exc}") from None


def process(
    archive: Path = typer.Argument(
        None,
        metavar="ARCHIVE",
        help="Folder tree or .zip of DICOM files (omit with --from-pacs: then give OUT only).",
    ),
    output: Path = typer.Argument(None, metavar="OUT", help="Output folder (created; holds the ledger)."),
    model: Path = typer.Option(
        None,
        "--model",
        "-m",
        show_default="$HOLOSCAN_MODEL_PATH, else ./models",
        help="Model folder with manifest.json, or a models root holding hyperct/ (`hyperct model demo` makes one).",
    ),
    config: Path = typer.Option(None, "--config", "-c", exists=True, dir_okay=False, help="app.yaml to use."),
    workers: int = typer.Option(
        1, "--workers", "-w", min=1, help="Threads that load and preprocess studies."
    ),
    prefetch: int = typer.Option(
        2,
        "--prefetch",
        min=0,
        help="Studies prepared ahead of inference (each holds its volume in memory); 0 = no overlap.",
    ),
    force: bool = typer.Option(False, "--force", help="Recompute studies the ledger already holds."),
    date_from: str = typer.Option(
        None, "--from", help="Only studies with StudyDate on or after this (YYYY-MM-DD)."
    ),
    date_to: str = typer.Option(
        None, "--to", help="Only studies with StudyDate on or before this (YYYY-MM-DD)."
    ),
    study_uid: list[str] = typer.Option(
        None,
        "--study",
        help="Only these StudyInstanceUIDs (repeat, comma-separate, or @file with one per line).",
    ),
    accession: list[str] = typer.Option(
        None, "--accession", help="Only these AccessionNumbers (repeat, comma-separate, or @file)."
    ),
    modality: list[str] = typer.Option(
        None, "--modality", help="Only studies holding a series of this modality (e.g. CT; repeatable)."
    ),
    from_pacs: str = typer.Option(
        None,
        "--from-pacs",
        metavar="AE@HOST:PORT",
        help="Query and retrieve the studies from this PACS instead of ARCHIVE.",
    ),
    calling_ae: str = typer.Option(
        "HYPERCT", "--calling-ae", help="Our AE title towards the PACS (--from-pacs and --send-to)."
    ),
    send_to: list[str] = typer.Option(
        None,
        "--send-to",
        metavar="AE@HOST:PORT",
        help="Push each processed study's SR, SEG and text SR to this PACS (C-STORE; repeatable).",
    ),
    send_wait: float = typer.Option(
        300.0,
        "--send-wait",
        min=0.0,
        help="At the end, wait at most this many seconds for results not yet delivered (then rerun).",
    ),
    send_attempts: int = typer.Option(
        8, "--send-attempts", min=1, help="Tries per result object before it is kept as failed."
    ),
    send_retry_delay: float = typer.Option(
        10.0,
        "--send-retry-delay",
        min=0.0,
        help="Seconds before the first retry of a transient failure (doubles each time, at most 1 h).",
    ),
    cache_gb: float = typer.Option(
        50.0,
        "--cache-gb",
        min=0.1,
        help="Upper bound of unpacked zips / retrieved studies under OUT/_batch/cache.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or summary."),
) -> None:
    """Batch reprocessing (the same pipeline as `hyperct run`)."""
    from app.batch.filters import StudyFilter, read_list

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if from_pacs and output is None:
        archive, output = None, archive  # `hyperct process OUT --from-pacs AE@HOST:PORT`
    if output is None or (archive is None) == (from_pacs is None):
        raise typer.BadParameter("give ARCHIVE OUT, or OUT with --from-pacs AE@HOST:PORT")
    if archive is not None and not archive.exists():
        raise typer.BadParameter(f"ARCHIVE {archive} does not exist")
    try:
        filters = StudyFilter(
            date_from=_date(date_from),
            date_to=_date(date_to),
            study_uids=read_list(study_uid),
            accessions=read_list(accession),
            modalities=frozenset(m.upper() for m in read_list(modality)),
        )
    except OSError as exc:
        raise typer.BadParameter(str(exc)) from None
    if from_pacs:
        from_pacs = _address("--from-pacs", from_pacs)
    send = None
    if send_to:
        from app.batch.send import SendConfig
        from app.dimse.sender import RetryPolicy

        send = SendConfig(
            destinations=tuple(dict.fromkeys(_address("--send-to", dest) for dest in send_to)),
            calling_ae=calling_ae,
            retry=RetryPolicy(max_attempts=send_attempts, initial_delay_s=send_retry_delay),
            wait_s=send_wait,
            resend=force,
        )
    # Heavy imports (MONAI Deploy, Holoscan) only once the arguments are known to be usable.
    from app.batch.runner import BatchConfig, run_batch
    from app.commands.run import default_model_path
    from app.config import AppConfig
    from operators.manifest import ManifestError

    cfg = BatchConfig(
        output=output,
        model=model or default_model_path(),
        archive=archive,
        app_config=AppConfig.load(config),
        workers=workers,
        prefetch=prefetch,
        force=force,
        filters=filters,
        max_extract_bytes=int(cache_gb * 1024**3),
        show_progress=not quiet,
        send=send,
    )
    source = None
    if from_pacs:
        from app.batch.pacs import pacs_source

        source = pacs_source(from_pacs, calling_ae=calling_ae, max_cache_bytes=int(cache_gb * 1024**3))
    try:
        report = run_batch(cfg, source=source)
    except (ManifestError, FileNotFoundError, ValueError, ConnectionError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if not quiet:
        print_report(report)
    if report.interrupted:
        raise typer.Exit(130)
    undelivered = report.sends is not None and (report.sends.get("pending") or report.sends.get("failed"))
    raise typer.Exit(1 if report.outcomes.get("failed") or undelivered else 0)


def print_report(report: object) -> None:
    """What was found, skipped, done and where the tables are."""
    from rich.table import Table

    from app.batch.runner import RATE_BASIS, BatchReport, format_rate
    from app.commands.output import output_console

    assert isinstance(report, BatchReport)
    console = output_console()
    if report.index is not None:
        idx = report.index
        console.print(
            f"index: {idx.files_seen} files ({idx.files_read} read), {idx.instances} instances, "
            f"{idx.studies} studies, {idx.series} series of which {idx.ct_series} CT"
        )
        if idx.skipped:
            table = Table(title="skipped files", title_justify="left")
            table.add_column("reason")
            table.add_column("files", justify="right")
            for reason, n in idx.skipped.most_common():
                table.add_row(reason, str(n))
            console.print(table)
    for reason, n in report.excluded.most_common():
        console.print(f"filtered out: {n} study(ies): {reason}")
    if report.already_done:
        console.print(f"already in the ledger (skipped; --force to redo): {report.already_done}")
    done = ", ".join(f"{n} {k}" for k, n in sorted(report.outcomes.items()))
    if done:  # the progress bar's rate, on the same basis (app.batch.runner.studies_per_hour)
        rate = f"{format_rate(report.studies_per_hour)} ({RATE_BASIS})"
        console.print(f"this run: {done} in {report.seconds:.1f} s: {rate}", highlight=False)
    else:
        console.print("this run: nothing to do")
    if report.sends is not None:
        sent, pending, failed = (report.sends.get(k, 0) for k in ("sent", "pending", "failed"))
        hint = (
            " (rerun the same command to send them; failed ones are in errors.csv)"
            if pending or failed
            else ""
        )
        console.print(f"sends: {sent} delivered, {pending} pending, {failed} failed{hint}")
    for name, path in report.tables.items():
        console.print(f"  {name}: {path}")
    if report.interrupted:
        console.print("[yellow]interrupted[/yellow]: rerun the same command to resume")
