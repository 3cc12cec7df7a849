"""Run the pipeline over many studies with models loaded once and loading/writing overlapped with inference.

The main thread owns the ONNX sessions (one :class:`~operators.model_runner.HyperCTRunner` for the
whole run) and the ledger. ``workers`` threads load and preprocess the next studies into a bounded
prefetch queue (``prefetch`` studies at most, each holding its volume in memory) and one writer
thread writes the previous study's SEG/SR while the current one runs inference, so reading DICOM,
preprocessing and writing hide behind inference. The stages are the application's own
(:data:`app.pipeline.PREPARE`, :data:`~app.pipeline.INFER`, :data:`~app.pipeline.WRITE` of one
:class:`~app.pipeline.Pipeline`), so a study gives the same results here as with ``hyperct run``.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.batch.discover import DiscoverConfig, discover
from app.batch.filters import StudyFilter
from app.batch.index import ArchiveIndex, IndexSummary, StudyRow, study_files
from app.batch.ledger import FindingRow, Ledger, StudyRecord
from app.batch.send import BatchSender, SendConfig
from app.batch.table import write_tables
from app.config import AppConfig
from app.pipeline import INFER, PREPARE, WRITE, Pipeline

if TYPE_CHECKING:
    from rich.progress import Progress

    from app.batch.ray_engine import RayEngine, RayOptions
    from operators.model_runner import HyperCTRunner
    from operators.study_case import StudyCase

logger = logging.getLogger(__name__)

WORK_DIR = "_batch"  # OUT/_batch/{index.sqlite, ledger.sqlite, cache/}
TABLE_REFRESH_S = 60.0
#: What the one rate of a run means, in the progress bar and the summary alike (said in the summary).
RATE_BASIS = "studies finished ÷ time since processing started, as on the progress bar"


def studies_per_hour(studies: int, seconds: float) -> float:
    """The rate of a run: studies finished per hour of wall time since processing started (the index,
    the ledger check and the model load before it excluded). The progress bar shows it while the run
    goes and the summary prints it at the end, so both say the same number: rich's own ``speed``
    averages only the last 30 s of updates and disagreed with the summary (issue #19)."""
    return 3600.0 * studies / seconds if seconds > 0 else 0.0


def format_rate(per_hour: float) -> str:
    return f"{per_hour:,.0f} studies/h"


@dataclass(frozen=True)
class BatchConfig:
    """One ``hyperct process`` run."""

    output: Path
    model: Path
    archive: Path | None = None  # None with a PACS source
    app_config: AppConfig = field(default_factory=AppConfig)
    workers: int = 1
    prefetch: int = 2  # 0 = load each study only when inference is ready for it (no overlap)
    force: bool = False
    filters: StudyFilter = field(default_factory=StudyFilter)
    max_extract_bytes: int = 50 * 1024**3
    show_progress: bool = True
    send: SendConfig | None = None  # --send-to: results go out through the node's outbox
    ray: RayOptions | None = None  # --engine ray: the studies run as Ray tasks (app/batch/ray_engine.py)

    @property
    def work_dir(self) -> Path:
        return self.output / WORK_DIR


@dataclass
class StudyJob:
    """One study to process: identity from the index (or C-FIND), files fetched when it is prepared."""

    study_uid: str
    patient_id: str = ""
    accession: str = ""
    study_date: str = ""
    files: Callable[[], list[Path]] = list
    release: Callable[[], None] = lambda: None  # frees a retrieval cache after the study
    #: ``files`` retrieves the study over the network (PACS, DICOMweb): the Ray engine calls it on the
    #: worker that processes the study; an archive's file list is read from the index on the driver.
    retrieve: bool = False


@dataclass
class BatchReport:
    """What a run did (printed by the command, returned to tests and the benchmark)."""

    index: IndexSummary | None = None
    studies_found: int = 0
    excluded: Counter[str] = field(default_factory=Counter)  # filter reason -> count
    already_done: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)  # of the studies run now
    tables: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0
    interrupted: bool = False
    sends: dict[str, int] | None = None  # outbox rows of OUT by state (sent, pending, failed)
    engine: str = "local"  # or what the Ray engine ran on ("ray: 2 CPUs, 0 GPUs on 1 node(s); ...")
    stage_seconds: dict[str, float] = field(default_factory=dict)  # stage -> seconds, this run's studies

    def count(self, summary: dict[str, Any]) -> str:
        """Count one finished study of this run (outcome and stage times); returns its outcome."""
        outcome = str(summary["outcome"])
        self.outcomes[outcome] += 1
        for stage, seconds in (summary.get("timings_s") or {}).items():
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + float(seconds)
        return outcome

    @property
    def studies_per_hour(self) -> float:
        """See :func:`studies_per_hour`; ``seconds`` runs from the start of processing to the last
        study finished (to the end of the run when none finished)."""
        return studies_per_hour(sum(self.outcomes.values()), self.seconds)


def make_progress(enabled: bool) -> Progress:
    """A rich progress bar with count, rate and ETA."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def _rate(progress: Progress, task: Any, unit: str, per: float) -> None:
    speed = progress.tasks[task].speed if task is not None else None
    progress.update(task, rate=f"{speed * per:,.1f} {unit}" if speed else "")


def index_archive(cfg: BatchConfig, index: ArchiveIndex, progress: Progress) -> IndexSummary:
    """Discover files (unpacking zips) and index their headers, with a progress bar."""
    assert cfg.archive is not None
    dcfg = DiscoverConfig(
        cache_dir=cfg.work_dir / "cache", max_extract_bytes=cfg.max_extract_bytes, exclude=(cfg.output,)
    )
    scan = progress.add_task("discovering", total=None, rate="")
    found = discover(cfg.archive, dcfg, on_file=lambda: progress.advance(scan))
    progress.update(scan, total=len(found.candidates), completed=len(found.candidates))
    task = progress.add_task("indexing headers", total=len(found.candidates), rate="")

    def tick() -> None:
        progress.advance(task)
        _rate(progress, task, "files/s", 1.0)

    return index.build(found.candidates, found.skipped, workers=cfg.workers, on_file=tick)


def archive_jobs(cfg: BatchConfig, index: ArchiveIndex, report: BatchReport) -> list[StudyJob]:
    """The indexed studies that pass the filters, each with its own file list."""
    jobs = []
    rows = index.studies()
    report.studies_found = len(rows)
    for row in rows:
        why = cfg.filters.why_excluded(row)
        if why is not None:
            report.excluded[why] += 1
            continue
        files = partial(study_files, index.path, row.study_uid)  # read when the study is loaded
        jobs.append(StudyJob(row.study_uid, row.patient_id, row.accession, row.study_date, files=files))
    return jobs


def retrieval_jobs(
    rows: Iterable[StudyRow],
    cfg: BatchConfig,
    report: BatchReport,
    cache: Path,
    fetch: Callable[[str, Path], list[Path]],
) -> list[StudyJob]:
    """The jobs of a remote source (``--from-pacs``, ``--from-dicomweb``): each row the filters keep
    (the others are counted in ``report.excluded``) becomes a job that retrieves its study with
    ``fetch(uid, folder)`` into ``cache/<uid>`` when prepared, and removes it once recorded."""
    jobs = []
    for row in rows:
        why = cfg.filters.why_excluded(row)
        if why is not None:
            report.excluded[why] += 1
            continue
        folder = cache / row.study_uid
        jobs.append(
            StudyJob(
                row.study_uid,
                row.patient_id,
                row.accession,
                row.study_date,
                files=partial(fetch, row.study_uid, folder),
                release=partial(shutil.rmtree, folder, ignore_errors=True),
                retrieve=True,
            )
        )
    return jobs


def prepare_job(pipeline: Pipeline, job: StudyJob, output: Path) -> StudyCase:
    """Load, select, volume, preprocess one study (both engines). Never raises: a failure is the case's."""
    from operators.study_case import Outcome, StudyCase

    t0 = time.perf_counter()
    try:
        case = load_job(job, output)
        case.timings["load"] = round(time.perf_counter() - t0, 4)
        return pipeline.run_stages(case, PREPARE)
    except Exception as exc:  # noqa: BLE001 - one study's failure must not stop the batch
        logger.exception("study %s: loading failed", job.study_uid)
        case = StudyCase(study_instance_uid=job.study_uid, output_folder=output)
        case.stop(Outcome.FAILED, f"load: {type(exc).__name__}: {exc}")
        return case


def load_job(job: StudyJob, output: Path) -> StudyCase:
    """Read one study's files into a :class:`StudyCase` with the application's loader code."""
    from operators.study_case import Outcome, StudyCase
    from operators.study_loader import cases_from_studies, group_instances

    files = job.files()
    studies, skipped = group_instances([str(f) for f in files])
    cases = [c for c in cases_from_studies(studies, output) if c.study_instance_uid == job.study_uid]
    if not cases:
        case = StudyCase(study_instance_uid=job.study_uid, output_folder=output)
        detail = f"; e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        case.stop(Outcome.FAILED, f"none of its {len(files)} files could be read any more{detail}")
        return case
    case = cases[0]
    case.warnings.extend(f"skipped {name}: {why}" for name, why in skipped)
    return case


class BatchRunner:
    """Holds the model and configuration for one run; ``run`` processes the jobs."""

    def __init__(
        self, cfg: BatchConfig, runner: HyperCTRunner | None = None, sender: BatchSender | None = None
    ) -> None:
        self.cfg = cfg
        self.sender = sender
        self.pipeline = Pipeline(cfg.model, cfg.app_config, runner=runner)
        self.runner = self.pipeline.runner
        self.manifest_sha = self.pipeline.manifest_sha256
        self.model = self.pipeline.model

    def prepare(self, job: StudyJob) -> StudyCase:
        """Worker-thread side: load, select, volume, preprocess. Never raises."""
        return prepare_job(self.pipeline, job, self.cfg.output)

    def infer(self, case: StudyCase) -> StudyCase:
        """Main-thread side: the model (sessions are this thread's)."""
        return self.pipeline.run_stages(case, INFER)

    def write(self, case: StudyCase) -> dict[str, Any]:
        """Writer-thread side: SEG, SR, text SR, results.json; the study's outcome record."""
        return self.pipeline.run_stages(case, WRITE).summary()

    def record(self, job: StudyJob, case: StudyCase, summary: dict[str, Any], ledger: Ledger) -> str:
        """One ledger transaction for a written study (main thread: the ledger's connection lives here).

        With ``--send-to`` the results are queued in the outbox first, in their own transaction: a
        kill between the two leaves the study out of the ledger, so a rerun redoes it and queues the
        same rows again (in place; delivered ones stay delivered) — a study in the ledger always has
        its sends queued."""
        if self.sender is not None:
            try:
                self.sender.enqueue(job.study_uid, summary)
            except Exception as exc:  # noqa: BLE001 - one study's failure must not stop the batch
                logger.exception("study %s: queuing its results for sending failed", job.study_uid)
                summary = {
                    **summary,
                    "outcome": "failed",
                    "reason": f"send queue: {type(exc).__name__}: {exc}",
                }
        findings = []
        if case.result is not None and summary["outcome"] == "processed":
            findings = [
                FindingRow(t.key, t.name, t.group, float(t.probability), float(t.threshold), t.decision)
                for t in case.result.tasks
            ]
        selected = (
            case.selection.selected.series_instance_uid if case.selection and case.selection.selected else ""
        )
        ledger.record(
            StudyRecord(
                study_uid=job.study_uid,
                outcome=summary["outcome"],
                reason=summary["reason"],
                patient_id=job.patient_id or case.patient_id,
                accession=job.accession or case.accession_number,
                study_date=job.study_date,
                selected_series=selected,
                model_name=self.model.name,
                model_version=self.model.version,
                manifest_sha256=self.manifest_sha,
                seconds=round(sum(case.timings.values()), 3),
                outcome_record=summary,
            ),
            findings,
        )
        return str(summary["outcome"])

    def run(
        self,
        jobs: list[StudyJob],
        ledger: Ledger,
        progress: Progress,
        report: BatchReport,
        *,
        started: float | None = None,
    ) -> None:
        """Process ``jobs`` in order as a three-stage pipeline: prepare (``workers`` threads, at most
        ``prefetch`` studies ahead) → infer (this thread) → write (one writer thread, one study).

        With ``prefetch`` 0 every stage runs here, one study after the other (the baseline).
        ``started`` (``time.perf_counter()``, default now) is when processing started: each finished
        study sets ``report.seconds`` from it, and the bar shows ``report.studies_per_hour``.
        """
        started = time.perf_counter() if started is None else started
        task = progress.add_task("processing studies", total=len(jobs), rate="")
        overlap = self.cfg.prefetch > 0
        pending: deque[tuple[StudyJob, Future[StudyCase] | None]] = deque()
        todo = iter(jobs)
        last_tables = time.monotonic()
        writing: tuple[StudyJob, StudyCase, Future[dict[str, Any]]] | None = None

        def done(job: StudyJob, case: StudyCase, summary: dict[str, Any]) -> None:
            try:
                outcome = self.record(job, case, summary, ledger)
            finally:
                job.release()
            report.count({**summary, "outcome": outcome})
            report.seconds = time.perf_counter() - started
            progress.advance(task)
            progress.update(task, rate=format_rate(report.studies_per_hour))

        with _executor(max(1, self.cfg.workers), "prefetch") as pool, _executor(1, "writer") as writer:

            def fill() -> None:
                while len(pending) < max(self.cfg.prefetch, 1):
                    job = next(todo, None)
                    if job is None:
                        return
                    ledger.start(job.study_uid)
                    pending.append((job, pool.submit(self.prepare, job) if overlap else None))

            fill()
            while pending:
                job, future = pending.popleft()
                case = future.result() if future is not None else self.prepare(job)
                fill()  # the next studies load while this one runs inference
                self.infer(case)
                if writing is not None:  # the previous study was written while this one ran inference
                    done(writing[0], writing[1], writing[2].result())
                    writing = None
                if overlap:
                    writing = (job, case, writer.submit(self.write, case))
                else:
                    done(job, case, self.write(case))
                del case
                if time.monotonic() - last_tables > TABLE_REFRESH_S:
                    self.write_tables(ledger, None)
                    last_tables = time.monotonic()
            if writing is not None:
                done(writing[0], writing[1], writing[2].result())

    def write_tables(self, ledger: Ledger, index: ArchiveIndex | None) -> dict[str, Path]:
        errors = index.file_errors() if index is not None else getattr(self, "_file_errors", [])
        self._file_errors = errors
        sends = self.sender.rows() if self.sender is not None else None
        tables = write_tables(self.cfg.output, ledger.finding_rows(), ledger.study_rows(), errors, sends=sends)
        from operators.stages import OUTCOME_FILE, write_outcome_json

        write_outcome_json(self.cfg.output, ledger.outcome_records())
        return {**tables, "outcome": self.cfg.output / OUTCOME_FILE}


def drain_sends(sender: BatchSender, progress: Progress, *, interrupted: bool) -> dict[str, int]:
    """Send what the run queued and is not delivered yet, for at most ``--send-wait`` seconds, with a
    progress bar (an interrupted run only stops the outbox: a rerun sends the rest)."""
    if interrupted:
        sender.stop()
        return sender.counts()
    counts = sender.counts()
    total = sum(counts.values())
    task = progress.add_task("sending results", total=total, completed=counts.get("sent", 0), rate="")

    def show(c: dict[str, int]) -> None:
        progress.update(
            task,
            completed=c.get("sent", 0) + c.get("failed", 0),
            rate=f"{c.get('pending', 0)} pending, {c.get('failed', 0)} failed",
        )

    try:
        return sender.drain(on_pass=show)
    except KeyboardInterrupt:
        logger.warning("sending interrupted: pending results stay queued; rerun to send them")
        return sender.counts()


@contextmanager
def _executor(workers: int, name: str) -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(workers, thread_name_prefix=name)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_batch(
    cfg: BatchConfig,
    *,
    runner: HyperCTRunner | None = None,
    source: Callable[[BatchConfig, BatchReport], list[StudyJob]] | None = None,
) -> BatchReport:
    """Index (or query), filter, skip what the ledger holds, process the rest, write the tables.

    ``source`` replaces the archive index (``--from-pacs`` passes the C-FIND based one). With
    ``cfg.ray`` the studies run on a Ray cluster (:class:`app.batch.ray_engine.RayEngine`, connected
    before anything else so that an unreachable cluster stops the run at once); everything else —
    index, filters, ledger, sends, tables — is this function's, the same for both engines.
    """
    t0 = time.perf_counter()
    engine: RayEngine | None = None
    if cfg.ray is not None:
        from app.batch.ray_engine import RayEngine

        engine = RayEngine(cfg)  # connects (or starts a local cluster); ConnectionError when it cannot
    try:
        return _run_batch(cfg, runner, source, engine, t0)
    finally:
        if engine is not None:
            engine.close()


def _run_batch(
    cfg: BatchConfig,
    runner: HyperCTRunner | None,
    source: Callable[[BatchConfig, BatchReport], list[StudyJob]] | None,
    engine: RayEngine | None,
    t0: float,
) -> BatchReport:
    cfg.output.mkdir(parents=True, exist_ok=True)
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    report = BatchReport()
    sender = BatchSender(cfg.send, cfg.output, cfg.work_dir) if cfg.send is not None else None
    try:
        batch = BatchRunner(cfg, runner, sender)
    except BaseException:
        if sender is not None:
            sender.close()
        raise
    ledger = Ledger(cfg.work_dir / "ledger.sqlite")
    index = ArchiveIndex(cfg.work_dir / "index.sqlite") if source is None else None
    try:
        if sender is not None:
            sender.start()
        with make_progress(cfg.show_progress) as progress:
            if index is not None:
                report.index = index_archive(cfg, index, progress)
                jobs = archive_jobs(cfg, index, report)
            else:
                assert source is not None
                jobs = source(cfg, report)
            if not cfg.force:
                done = ledger.finished(batch.manifest_sha)
                report.already_done = sum(j.study_uid in done for j in jobs)
                if sender is not None:
                    sender.queue_finished(j.study_uid for j in jobs if j.study_uid in done)
                jobs = [j for j in jobs if j.study_uid not in done]
            logger.info("%d studies to process (%d already done)", len(jobs), report.already_done)
            t_run = time.perf_counter()
            try:
                if engine is not None:
                    if jobs:  # actors and workers ready before the clock starts (as the local model is)
                        engine.setup()
                        t_run = time.perf_counter()
                    report.engine = engine.describe()
                    engine.run(batch, jobs, ledger, progress, report, started=t_run)
                else:
                    batch.run(jobs, ledger, progress, report, started=t_run)
            except KeyboardInterrupt:
                report.interrupted = True
                logger.warning("interrupted: finished studies are in the ledger; rerun to resume")
            if not report.outcomes:
                report.seconds = time.perf_counter() - t_run
            if sender is not None:
                report.sends = drain_sends(sender, progress, interrupted=report.interrupted)
        report.tables = batch.write_tables(ledger, index)
    finally:
        if sender is not None:
            sender.close()
        ledger.close()
        if index is not None:
            index.close()
        close_source = getattr(source, "close", None)  # e.g. the C-MOVE destination of --from-pacs
        if close_source is not None:
            close_source()
    logger.info("batch run took %.1f s", time.perf_counter() - t0)
    return report
