"""``hyperct process ARCHIVE OUT``: reprocess an archive (or a PACS query) into a findings table."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from app.commands.usage import fail

if TYPE_CHECKING:
    from app.batch.ray_engine import RayOptions

ENGINES = ("local", "ray")

HELP = (
    "Reprocess an archive: index every DICOM file under ARCHIVE (nested folders, files without "
    ".dcm, DICOMDIR, zip files; headers only), run HyperCT on each study that passes the filters "
    "(the same pipeline as `hyperct run`) and write OUT/<StudyInstanceUID>/ (SR, SEG, results.json) "
    "plus OUT/findings.csv and findings.parquet (one row per study x task), OUT/studies.csv and "
    "OUT/errors.csv (every skipped file and unprocessed study, with the reason) and OUT/outcome.json "
    "(one record per study, as `hyperct run` writes it). Resumable: a rerun "
    "skips studies already finished (unless --force); an interrupted run resumes. With --from-pacs "
    "the studies come from a C-FIND at the PACS and are retrieved one by one (C-GET, or C-MOVE) into a bounded "
    "cache; with --from-dicomweb they are listed by QIDO-RS and fetched by WADO-RS. With --engine ray "
    "the studies run as Ray tasks on a local or remote cluster (inference in actors, one per GPU), "
    "with the same ledger, tables and results. With --send-to the SR, SEG and text SR of every "
    "processed study are pushed by C-STORE (with --send-stowrs by STOW-RS to a DICOMweb root) "
    "through the node's outbox (retried with backoff; OUT/sends.csv; a rerun resumes unsent results "
    "and never resends delivered ones). Exit codes: 0 done (see errors.csv), 1 error, failed "
    "studies or results not delivered, 2 bad usage, 130 interrupted. Research use only."
)
SHORT_HELP = "Reprocess an archive (or a PACS query) into per-study results and findings tables."
EXAMPLES = """Examples:
  hyperct process /archive out/          # every study; rerun to resume
  hyperct process archive.zip out/ --from 2024-01-01 --modality CT -w 2
  hyperct process out/ --from-pacs PACS@pacs.example:104 --study @uids.txt
  hyperct process out/ --from-pacs PACS@h:104 --retrieve move --move-port 113
  hyperct process out/ --from-dicomweb https://pacs.example/dicom-web
  hyperct process /archive out/ --engine ray --address ray-head.example:6379
  hyperct process /archive out/ --send-to PACS@pacs.example:104
  hyperct process /archive out/ --send-stowrs https://pacs.example/dicom-web"""


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
        None,
        "--workers",
        "-w",
        min=1,
        show_default="1; with --engine ray the cluster's CPUs",
        help="Threads that load and preprocess studies (--engine ray: studies in flight at once).",
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
    send_stowrs: list[str] = typer.Option(
        None,
        "--send-stowrs",
        metavar="URL",
        help="Push them to this DICOMweb root by STOW-RS (POST URL/studies; repeatable; with or without --send-to).",
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
    retrieve: str = typer.Option(
        "get",
        "--retrieve",
        metavar="get|move",
        help="--from-pacs: retrieve by C-GET, or by C-MOVE to our AE title (--calling-ae) at --move-port.",
    ),
    move_port: int = typer.Option(
        None,
        "--move-port",
        min=1,
        max=65535,
        help="--retrieve move: the port we listen on, where the PACS has our AE title configured.",
    ),
    move_bind: str = typer.Option(
        "0.0.0.0",  # noqa: S104 - the PACS is another host; only its AE title may call
        "--move-bind",
        metavar="ADDRESS",
        help="--retrieve move: the local address to listen on (only the PACS's AE title may call).",
    ),
    from_dicomweb: str = typer.Option(
        None,
        "--from-dicomweb",
        metavar="URL",
        help="List the studies by QIDO-RS and fetch them by WADO-RS from this DICOMweb root instead of ARCHIVE.",
    ),
    engine: str = typer.Option(
        "local",
        "--engine",
        metavar="local|ray",
        help="Run the studies here, or as Ray tasks (the scale extra).",
    ),
    address: str = typer.Option(
        None,
        "--address",
        metavar="auto|ray://HOST:PORT|HOST:PORT",
        show_default="a private Ray cluster on this machine",
        help="--engine ray: the Ray cluster to join.",
    ),
    ray_cpus: int = typer.Option(
        None,
        "--ray-cpus",
        min=1,
        show_default="all",
        help="--engine ray without --address: CPUs of the private cluster.",
    ),
    ray_object_store_mb: int = typer.Option(
        None,
        "--ray-object-store-mb",
        min=75,
        show_default="Ray's (30% of memory)",
        help="--engine ray without --address: object store of the private cluster.",
    ),
    inference_actors: int = typer.Option(
        None,
        "--inference-actors",
        min=1,
        show_default="one per GPU, else one per node",
        help="--engine ray: model replicas (each loads the model once).",
    ),
    max_retries: int = typer.Option(
        2,
        "--max-retries",
        min=0,
        help="--engine ray: retries of a study whose worker process or node dies (then it is failed).",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or summary."),
) -> None:
    """Batch reprocessing (the same pipeline as `hyperct run`)."""
    from app.batch.filters import StudyFilter, read_list

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if from_pacs and from_dicomweb:
        raise typer.BadParameter("give --from-pacs or --from-dicomweb, not both")
    remote_source = from_pacs or from_dicomweb
    if remote_source and output is None:
        archive, output = None, archive  # `hyperct process OUT --from-pacs AE@HOST:PORT`
    if output is None or (archive is None) == (remote_source is None):
        raise typer.BadParameter(
            "give ARCHIVE OUT, or OUT with --from-pacs AE@HOST:PORT or --from-dicomweb URL"
        )
    if engine not in ENGINES:
        raise typer.BadParameter(f"--engine {engine}: expected one of {', '.join(ENGINES)}")
    if engine != "ray" and (address or ray_cpus or ray_object_store_mb or inference_actors):
        raise typer.BadParameter(
            "--address, --ray-cpus, --ray-object-store-mb and --inference-actors need --engine ray"
        )
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
    if retrieve not in ("get", "move"):
        raise typer.BadParameter(f"--retrieve {retrieve}: expected get or move")
    if (retrieve == "move" or move_port) and not from_pacs:
        raise typer.BadParameter("--retrieve and --move-port go with --from-pacs")
    if retrieve == "move" and not move_port:
        raise typer.BadParameter("--retrieve move needs --move-port (where the PACS sends our AE title's instances)")
    if retrieve == "move" and engine == "ray":
        raise typer.BadParameter(
            "--retrieve move needs the local engine (the PACS sends to one host and port); "
            "with --engine ray use C-GET or --from-dicomweb"
        )
    send = None
    if send_to or send_stowrs:
        from app.batch.send import SendConfig
        from app.dimse.sender import RetryPolicy
        from app.stowrs import check_stowrs_url

        try:
            stow = [check_stowrs_url(url) for url in send_stowrs or ()]
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--send-stowrs") from None
        send = SendConfig(
            destinations=tuple(dict.fromkeys([*(_address("--send-to", d) for d in send_to or ()), *stow])),
            calling_ae=calling_ae,
            retry=RetryPolicy(max_attempts=send_attempts, initial_delay_s=send_retry_delay),
            wait_s=send_wait,
            resend=force,
        )
    ray_options = None
    if engine == "ray":
        ray_options = _ray_options(
            address, ray_cpus, ray_object_store_mb, workers, inference_actors, max_retries
        )
    if from_dicomweb:
        from app.batch.dicomweb import check_server

        try:
            check_server(from_dicomweb)
        except ImportError:
            fail("--from-dicomweb needs dicomweb-client: pip install -e '.[scale]'")
        except (ConnectionError, ValueError) as exc:
            fail(exc)
    # Heavy imports (MONAI Deploy, Holoscan) only once the arguments are known to be usable.
    from app.batch.runner import BatchConfig, BatchReport, StudyJob, run_batch
    from app.commands.run import default_model_path
    from app.config import AppConfig
    from operators.manifest import ManifestError

    cfg = BatchConfig(
        output=output,
        model=model or default_model_path(),
        archive=archive,
        app_config=AppConfig.load(config),
        workers=workers or 1,
        prefetch=prefetch,
        force=force,
        filters=filters,
        max_extract_bytes=int(cache_gb * 1024**3),
        show_progress=not quiet,
        send=send,
        ray=ray_options,
    )
    source: Callable[[BatchConfig, BatchReport], list[StudyJob]] | None = None
    if from_pacs:
        from app.batch.pacs import pacs_source

        source = pacs_source(
            from_pacs,
            calling_ae=calling_ae,
            max_cache_bytes=int(cache_gb * 1024**3),
            retrieve=retrieve,
            move_port=move_port,
            move_bind=move_bind,
        )
    elif from_dicomweb:
        from app.batch.dicomweb import dicomweb_source

        source = dicomweb_source(from_dicomweb, max_cache_bytes=int(cache_gb * 1024**3))
    try:
        report = run_batch(cfg, source=source)
    except (ManifestError, FileNotFoundError, ValueError, ConnectionError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:  # outside the processing loop (index, start-up, tables): same answer
        typer.echo("interrupted: finished studies are in the ledger; rerun the same command", err=True)
        raise typer.Exit(130) from None
    if not quiet:
        print_report(report)
    if report.interrupted:
        raise typer.Exit(130)
    undelivered = report.sends is not None and (report.sends.get("pending") or report.sends.get("failed"))
    raise typer.Exit(1 if report.outcomes.get("failed") or undelivered else 0)


def _ray_options(
    address: str | None,
    cpus: int | None,
    object_store_mb: int | None,
    workers: int | None,
    actors: int | None,
    max_retries: int,
) -> RayOptions:
    """--engine ray's options, with Ray installed and the cluster reachable (else one line, exit 2)."""
    import importlib.util

    from app.batch.ray_engine import INSTALL_HINT, RayOptions, check_address

    if importlib.util.find_spec("ray") is None:
        fail(INSTALL_HINT)
    if address and (cpus or object_store_mb):
        fail(
            "--ray-cpus and --ray-object-store-mb size a private cluster; with --address the cluster is sized already"
        )
    try:
        check_address(address)
    except (ConnectionError, ValueError) as exc:
        fail(exc)
    return RayOptions(
        address=address,
        num_cpus=cpus,
        object_store_mb=object_store_mb,
        workers=workers,
        inference_actors=actors,
        max_retries=max_retries,
    )


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
    if report.engine != "local":
        console.print(f"engine: {report.engine}", highlight=False)
    if done:  # the progress bar's rate, on the same basis (app.batch.runner.studies_per_hour)
        rate = f"{format_rate(report.studies_per_hour)} ({RATE_BASIS})"
        console.print(f"this run: {done} in {report.seconds:.1f} s: {rate}", highlight=False)
        n = sum(report.outcomes.values())
        stages = ", ".join(f"{k} {v / n:.2f}" for k, v in report.stage_seconds.items())
        console.print(f"stage times (mean s per study of this run): {stages}", highlight=False)
    else:
        console.print("this run: nothing to do")
    o = report.outcomes
    console.print(
        f"summary: {o.get('processed', 0)} done, {report.already_done} skipped (already in the ledger), "
        f"{o.get('not-processed', 0)} not processed, {o.get('failed', 0)} failed"
        + (" (see errors.csv)" if o.get("failed") or o.get("not-processed") else ""),
        highlight=False,
    )
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
