"""``hyperct process --engine ray``: the studies of a batch run as Ray tasks, the model in Ray actors.

Shape. One Ray task per study runs the application's own stage functions (``PREPARE``, ``INFER``,
``WRITE`` of :mod:`app.pipeline`, through :func:`app.batch.runner.prepare_job`), and inference goes to
a pool of actors that each hold one :class:`~operators.model_runner.HyperCTRunner` for the life of
the run (one actor per GPU, ``num_gpus=1``, where the cluster has GPUs; else one per node). Why not a
separate Ray task per stage (or Ray Data): a study's stages are sequential, and the writers need the
HU volume (≈ 315 MB for 300 slices) and every source dataset that loading produced; splitting would
ship those through the object store twice per study for no extra parallelism — the parallelism is
many studies in flight. Only the model input goes to an actor and only the model outputs come back.

Guarantees (the local engine's, kept at scale):

* **The ledger is the single source of truth** and only the driver writes it — the same
  :class:`~app.batch.ledger.Ledger` and :meth:`~app.batch.runner.BatchRunner.record` as the local
  engine, one transaction per study, so the tables (rebuilt from it) are the same bytes.
* **Written exactly once.** A task writes its study under ``OUT/_batch/staging/<attempt>/`` (a fresh
  folder per attempt) and returns; the driver alone moves the finished study folder to
  ``OUT/<StudyInstanceUID>`` (one rename) and then records it. A task that Ray retries after its
  worker died leaves at most an orphan staging folder, removed at the end of the run.
* **A poisoned study does not stall the run**: Ray retries a task whose worker process or node dies
  ``max_retries`` times; then the driver records the study as failed (``errors.csv``) and goes on.
* **Ctrl-C** stops what is in flight (its tasks end with the driver) and records nothing more;
  finished studies stay in the ledger.

Workers must see ARCHIVE, OUT and the model folder at the same paths as the driver (a shared file
system: the usual set-up of a backfill cluster); ``--from-pacs`` / ``--from-dicomweb`` studies are
retrieved by the worker that processes them.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import socket
import sys
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.batch.runner import (
    BatchConfig,
    BatchReport,
    BatchRunner,
    StudyJob,
    format_rate,
    prepare_job,
)
from app.config import AppConfig, InferenceOptions

if TYPE_CHECKING:
    from rich.progress import Progress

    from app.batch.ledger import Ledger
    from operators.study_case import StudyCase

logger = logging.getLogger(__name__)

STAGING_DIR = "staging"  # OUT/_batch/staging/<attempt>/<StudyInstanceUID>/
INSTALL_HINT = "the Ray engine needs Ray: pip install -e '.[scale]' (or pip install 'ray==2.60.0')"
#: Fault injection, for the tests and for rehearsing a backfill: comma-separated StudyInstanceUIDs
#: whose study task kills its own worker process (``os._exit``) at the start of every attempt (a
#: poisoned study), or ``UID@written`` once, after the study is written to staging (a retried task).
FAULT_ENV = "HYPERCT_FAULT_CRASH_STUDIES"
FAULT_EXIT = 70


@dataclass(frozen=True)
class RayOptions:
    """How ``--engine ray`` reaches and uses its cluster."""

    address: str | None = None  # None: a private cluster on this machine; "auto"; "ray://h:p"; "h:p"
    num_cpus: int | None = None  # the private cluster's CPUs (default: this machine's)
    object_store_mb: int | None = None  # the private cluster's object store (default: Ray's)
    workers: int | None = None  # studies in flight at once (default: the cluster's CPUs)
    inference_actors: int | None = None  # default: one per GPU, else one per node
    actor_cpus: float = 0.0  # CPU actors: a study task waiting for its inference frees its CPU
    max_retries: int = 2  # retries of a study whose worker process or node died


# -- address checks (no Ray import: the command calls this before anything heavy) --------------------


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _current_cluster() -> str | None:
    """What ``ray.init(address="auto")`` would use: $RAY_ADDRESS, else the address file that
    ``ray start --head`` writes on this machine."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    path = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def check_address(address: str | None, *, timeout_s: float = 5.0) -> None:
    """Fail fast on a Ray address that cannot work: ValueError for a malformed one, ConnectionError
    (one line) when nothing answers there. ``ray.init`` itself retries an unreachable GCS for a
    minute or more with pages of log; this opens one TCP connection instead."""
    if address is None:
        return
    target = address
    if address == "auto":
        found = _current_cluster()
        if found is None:
            raise ConnectionError(
                "--address auto: no Ray cluster is running on this machine (ray start --head)"
            )
        target = found
    if target.startswith("ray://"):
        target = target[len("ray://") :]
    host, port = _host_port(target)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ConnectionError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


def _is_loopback(address: str) -> bool:
    try:
        host, _ = _host_port(address.removeprefix("ray://"))
    except ValueError:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def connect(opts: RayOptions) -> bool:
    """Connect this process to Ray (or start a private cluster); True when this call started it.

    A private cluster, or one addressed on loopback, stays on loopback: Ray's switch for that
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, its default on Windows and macOS) must be set before Ray
    is imported, and its processes inherit it. Usage statistics are off unless the user turned them on.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = opts.address or os.environ.get("RAY_ADDRESS") or None  # Ray's own variable, if set
    if (address is None or _is_loopback(address)) and "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise ConnectionError(INSTALL_HINT) from None
    if ray.is_initialized():
        return False  # a caller (a test, a notebook) holds the connection: use it, leave it
    common: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if address is None:
            ray.init(
                address="local",  # a new cluster: never one that happens to run on this machine
                num_cpus=opts.num_cpus,
                object_store_memory=opts.object_store_mb * 1024**2 if opts.object_store_mb else None,
                include_dashboard=False,
                **common,
            )
        else:
            check_address(address)
            ray.init(address=address, **common)
    except (ConnectionError, ValueError):
        raise
    except Exception as exc:  # noqa: BLE001 - Ray raises RuntimeError and others; say it in one line
        where = address or "a local Ray cluster"
        raise ConnectionError(f"cannot start or join {where}: {str(exc).splitlines()[0]}") from None
    return True


# -- the worker side -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerContext:
    """What every study task of one run needs (put in the object store once)."""

    key: str  # the run (a worker process caches its pipeline per run)
    model: str
    app_config: AppConfig
    staging: str  # OUT/_batch/staging
    actors: tuple[Any, ...]  # inference actor handles
    #: The driver's ``FAULT_ENV`` value. Carried here, not as the tasks' runtime environment: a
    #: runtime environment of its own would start a separate pool of cold worker processes.
    faults: str = ""


@dataclass(frozen=True)
class StudySpec:
    """One study task: identity and where its files come from."""

    study_uid: str
    patient_id: str = ""
    accession: str = ""
    study_date: str = ""
    files: tuple[str, ...] = ()  # an archive study's files, read from the index by the driver
    fetch: Callable[[], list[Path]] | None = None  # retrieved where the study runs (PACS, DICOMweb)
    release: Callable[[], None] | None = None


@dataclass
class StudyDone:
    """What a study task returns: the case without its pixel data, its outcome record, its staging."""

    case: Any
    summary: dict[str, Any]
    staging: str


class InferenceActor:
    """Holds one model runner for the life of the run (sessions created on first use and kept)."""

    def __init__(self, model: str, options: InferenceOptions) -> None:
        from app.pipeline import build_runner

        self.runner = build_runner(Path(model), options)

    def ready(self) -> str:
        import onnxruntime as ort

        return ",".join(ort.get_available_providers())

    def run(self, images: Any, mask: Any, tasks: Any = None) -> dict[str, Any]:
        return self.runner.run(images, mask, tasks)


class ActorRunner:
    """Stands in for :class:`~operators.model_runner.HyperCTRunner` in a study task, so that
    :func:`operators.stages.infer_case` runs unchanged: the manifest is read here, the model runs in
    an inference actor.

    An actor on a node that died is "unavailable" until Ray notices (missed heartbeats: seconds to
    tens of seconds) and restarts it elsewhere, so a call that fails goes to the next actor of the
    pool, with a growing pause, for up to ``failover_s``. When every try failed, the error is kept in
    ``lost`` for the task to re-raise (Ray then retries the whole study) rather than ending the study
    as failed."""

    failover_s = 120.0

    def __init__(self, model: str, actors: tuple[Any, ...]) -> None:
        from operators.manifest import find_model_dir, load_manifest

        self.model_dir = find_model_dir(Path(model))
        self.manifest = load_manifest(self.model_dir, verify_files=False)
        self.actors = actors
        self.study_uid = ""
        self.lost: BaseException | None = None

    def run_input(self, model_input: Any, tasks: Any = None) -> dict[str, Any]:
        import ray
        from ray.exceptions import RayActorError

        first = zlib.crc32(self.study_uid.encode())
        deadline = time.monotonic() + self.failover_s
        images, mask = ray.put(model_input.images), ray.put(model_input.mask)  # once for every try
        attempt = 0
        while True:
            actor = self.actors[(first + attempt) % len(self.actors)]
            try:
                outputs: dict[str, Any] = ray.get(actor.run.remote(images, mask, tasks))
                return outputs
            except RayActorError as exc:
                # the other actors at once, then pauses of 1, 2, 4 ... 10 s
                rounds = attempt - len(self.actors) + 1
                pause = 0.0 if rounds < 0 else min(2.0**rounds, 10.0)
                if time.monotonic() + pause > deadline:
                    self.lost = exc
                    raise
                logger.warning("study %s: inference actor lost (%s); trying again", self.study_uid, exc)
                time.sleep(pause)
                attempt += 1

    def close(self) -> None:
        pass


_PIPELINES: dict[str, tuple[Any, ActorRunner]] = {}


def _pipeline(ctx: WorkerContext) -> tuple[Any, ActorRunner]:
    """One pipeline per worker process and run (the manifest is read once per process)."""
    if ctx.key not in _PIPELINES:
        from app.pipeline import Pipeline

        _PIPELINES.clear()
        runner = ActorRunner(ctx.model, ctx.actors)
        _PIPELINES[ctx.key] = (Pipeline(ctx.model, ctx.app_config, runner=runner), runner)  # type: ignore[arg-type]
    return _PIPELINES[ctx.key]


def _fault(study_uid: str, point: str, staging: Path, faults: str) -> None:
    """See :data:`FAULT_ENV` (``faults``: its value on the driver)."""
    for entry in faults.split(","):
        uid, _, when = entry.strip().partition("@")
        if uid != study_uid or (when or "start") != point:
            continue
        if when == "written":  # once per run
            marker = staging / f".fault-{study_uid}"
            if marker.exists():
                return
            marker.touch()
        logger.error("study %s: %s set: exiting this worker process (%s)", study_uid, FAULT_ENV, point)
        os._exit(FAULT_EXIT)


def warm_up() -> int:
    """Import the loading and writing stack (MONAI Deploy's loader alone takes seconds) in a study
    worker before the run's clock starts, as the local engine's index pass does in its process."""
    import app.pipeline  # noqa: F401
    import operators.stages  # noqa: F401
    import operators.study_loader  # noqa: F401

    return os.getpid()


def slim(case: StudyCase) -> StudyCase:
    """The case without pixel data, source datasets or attention maps: what the driver records."""
    case.study, case.series_datasets, case.volume, case.model_input = None, [], None, None
    if case.result is not None:
        case.result = replace(case.result, tasks=tuple(replace(t, attention=None) for t in case.result.tasks))
    return case


def process_study(ctx: WorkerContext, spec: StudySpec) -> StudyDone:
    """One study through every stage in this worker, written under a fresh staging folder."""
    from app.pipeline import INFER, WRITE

    staging_root = Path(ctx.staging)
    _fault(spec.study_uid, "start", staging_root, ctx.faults)
    pipeline, runner = _pipeline(ctx)
    staging = staging_root / uuid.uuid4().hex
    files: Callable[[], list[Path]] = spec.fetch or (lambda: [Path(f) for f in spec.files])
    job = StudyJob(spec.study_uid, spec.patient_id, spec.accession, spec.study_date, files=files)
    try:
        case = prepare_job(pipeline, job, staging)
        runner.study_uid, runner.lost = spec.study_uid, None
        pipeline.run_stages(case, INFER)
        if runner.lost is not None:
            raise runner.lost  # an inference actor died: Ray retries the whole study
        pipeline.run_stages(case, WRITE)
        summary = case.summary()
        _fault(spec.study_uid, "written", staging_root, ctx.faults)
        return StudyDone(slim(case), summary, str(staging))
    finally:
        if spec.release is not None:
            spec.release()


# -- the driver side -------------------------------------------------------------------------------


def publish(staged: Path, target: Path, trash: Path) -> None:
    """Move a staged study folder to ``OUT/<uid>`` with one rename (an older folder of the same study
    — ``--force``, an earlier failed write — is moved aside first and removed after)."""
    if not staged.is_dir():
        raise FileNotFoundError(f"staged results missing: {staged}")
    old = None
    if target.exists():
        trash.mkdir(parents=True, exist_ok=True)
        old = trash / f"{target.name}.{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(staged, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def lost_reason(exc: BaseException, max_retries: int) -> str:
    """One line for ``errors.csv`` from what ``ray.get`` raised for a study task."""
    from ray.exceptions import RayActorError, RayTaskError

    if isinstance(exc, RayTaskError) and exc.cause is not None:
        cause = exc.cause
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        if isinstance(cause, RayActorError):
            return f"inference actor lost on every try ({max_retries + 1}): {type(cause).__name__}"
        return f"{type(cause).__name__}: {first}"[:500]
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (
        f"worker lost on every try ({max_retries + 1}; a study that kills its worker process or node "
        f"is retried {max_retries} times): {type(exc).__name__}: {first}"
    )[:500]


class RayEngine:
    """Connects to (or starts) the cluster; runs the studies of :func:`app.batch.runner.run_batch`."""

    def __init__(self, cfg: BatchConfig) -> None:
        assert cfg.ray is not None
        self.cfg = cfg
        self.opts = cfg.ray
        self.owned = connect(self.opts)
        self.actors: list[Any] = []
        self.on_gpu = False
        self._remote: Any = None
        self._ctx: Any = None

    @property
    def staging(self) -> Path:
        return self.cfg.work_dir / STAGING_DIR

    def resources(self) -> dict[str, float]:
        import ray

        return {k: float(v) for k, v in ray.cluster_resources().items()}

    def window(self) -> int:
        """Studies in flight at once: ``workers``, else the cluster's CPUs."""
        if self.opts.workers:
            return self.opts.workers
        return max(1, int(self.resources().get("CPU", 1)))

    def describe(self) -> str:
        import ray

        res = self.resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        kind = "GPU" if self.on_gpu else "CPU"
        client = " (as a Ray client)" if ray.util.client.ray.is_connected() else ""
        return (
            f"ray: {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs on {nodes} node(s){client}; "
            f"{len(self.actors) or self._n_actors()} {kind} inference actor(s); "
            f"{self.window()} studies in flight"
        )

    def _n_actors(self) -> int:
        import ray

        if self.opts.inference_actors:
            return self.opts.inference_actors
        gpus = int(self.resources().get("GPU", 0))
        return gpus or max(1, sum(1 for n in ray.nodes() if n.get("Alive")))

    def setup(self) -> None:
        """Before the run's clock starts: the inference pool (models loaded once per actor, restarted
        on any node when lost) and ``window`` study workers with the stack imported."""
        import ray
        from ray.exceptions import RayActorError

        shutil.rmtree(self.staging, ignore_errors=True)  # orphans of a killed run
        self.staging.mkdir(parents=True, exist_ok=True)
        options: dict[str, Any] = {
            "num_cpus": 1,
            "max_retries": self.opts.max_retries,
            "retry_exceptions": [RayActorError],
        }
        self._remote = ray.remote(process_study).options(**options)
        warm = [ray.remote(warm_up).options(**options).remote() for _ in range(self.window())]
        self.on_gpu = self.resources().get("GPU", 0) >= 1
        actor = ray.remote(InferenceActor).options(
            num_cpus=1 if self.on_gpu else self.opts.actor_cpus,
            num_gpus=1 if self.on_gpu else 0,
            max_restarts=-1,
            max_task_retries=1,
            scheduling_strategy="SPREAD",
        )
        self.actors = [
            actor.remote(str(self.cfg.model), self.cfg.app_config.inference) for _ in range(self._n_actors())
        ]
        providers = ray.get([a.ready.remote() for a in self.actors])
        logger.info("%d inference actor(s) ready (%s)", len(self.actors), providers[0])
        ray.get(warm)
        self._ctx = ray.put(
            WorkerContext(uuid.uuid4().hex, str(self.cfg.model), self.cfg.app_config, str(self.staging),
                          tuple(self.actors), os.environ.get(FAULT_ENV, ""))
        )  # fmt: skip

    def _spec(self, job: StudyJob) -> StudySpec:
        if job.retrieve:
            return StudySpec(
                job.study_uid,
                job.patient_id,
                job.accession,
                job.study_date,
                fetch=job.files,
                release=job.release,
            )
        files = tuple(str(p) for p in job.files())
        return StudySpec(job.study_uid, job.patient_id, job.accession, job.study_date, files=files)

    def run(
        self,
        batch: BatchRunner,
        jobs: list[StudyJob],
        ledger: Ledger,
        progress: Progress,
        report: BatchReport,
        *,
        started: float,
    ) -> None:
        """Keep ``window`` study tasks in flight; record each as it finishes (any order: the tables
        are sorted). Same ledger, records and tables as :meth:`BatchRunner.run`."""
        import ray

        from app.batch.runner import TABLE_REFRESH_S

        task = progress.add_task("processing studies", total=len(jobs), rate="")
        if not jobs:
            return
        if self._ctx is None:
            self.setup()
        remote, ctx = self._remote, self._ctx
        window = self.window()
        in_flight: dict[Any, StudyJob] = {}
        todo = iter(jobs)
        last_tables = time.monotonic()
        try:
            while True:
                while len(in_flight) < window and (job := next(todo, None)) is not None:
                    ledger.start(job.study_uid)
                    try:
                        spec = self._spec(job)
                    except Exception as exc:  # noqa: BLE001 - one study's failure must not stop the batch
                        self._record_failed(batch, job, f"load: {type(exc).__name__}: {exc}", ledger, report)
                        continue
                    in_flight[remote.remote(ctx, spec)] = job
                if not in_flight:
                    break
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
                for ref in ready:
                    job = in_flight.pop(ref)
                    self._finish(batch, job, ref, ledger, report)
                    report.seconds = time.perf_counter() - started
                    per_hour = report.studies_per_hour
                    progress.advance(task)
                    progress.update(task, rate=f"{per_hour / 3600:.2f} studies/s ({format_rate(per_hour)})")
                if time.monotonic() - last_tables > TABLE_REFRESH_S:
                    batch.write_tables(ledger, None)
                    last_tables = time.monotonic()
        except KeyboardInterrupt:
            # No ray.cancel(force=True) here: racing a task that completes at that moment, Ray 2.60's
            # core worker fails a CHECK ("Tried to complete task that was not pending") and aborts
            # the driver. The tasks end with this driver instead (close(): a private cluster shuts
            # down; on a shared one Ray ends the tasks of a driver that disconnects), and nothing of
            # them is recorded; the rerun does them again.
            logger.warning("interrupted: %d studies in flight were stopped (not recorded)", len(in_flight))
            raise
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)

    def _record_failed(
        self, batch: BatchRunner, job: StudyJob, reason: str, ledger: Ledger, report: BatchReport
    ) -> None:
        from operators.study_case import Outcome, StudyCase

        case = StudyCase(study_instance_uid=job.study_uid, output_folder=self.cfg.output)
        case.stop(Outcome.FAILED, reason)
        report.count({**case.summary(), "outcome": batch.record(job, case, case.summary(), ledger)})

    def _finish(
        self, batch: BatchRunner, job: StudyJob, ref: Any, ledger: Ledger, report: BatchReport
    ) -> None:
        """Publish and record one finished study task (the only place results reach OUT and the ledger)."""
        import ray
        from ray.exceptions import RayError, TaskCancelledError

        from operators.study_case import Outcome, StudyCase

        staging: Path | None = None
        try:
            done: StudyDone = ray.get(ref)
            case, summary, staging = done.case, done.summary, Path(done.staging)
        except TaskCancelledError:
            return
        except RayError as exc:
            case = StudyCase(study_instance_uid=job.study_uid, output_folder=self.cfg.output)
            case.stop(Outcome.FAILED, lost_reason(exc, self.opts.max_retries))
            summary = case.summary()
        try:
            if summary["outcome"] == Outcome.PROCESSED.value and staging is not None:
                try:
                    publish(staging / job.study_uid, self.cfg.output / job.study_uid, self.staging / ".trash")
                except OSError as exc:
                    logger.error("study %s: publishing its results failed: %s", job.study_uid, exc)
                    summary = {
                        **summary,
                        "outcome": "failed",
                        "reason": f"publish: {type(exc).__name__}: {exc}",
                    }
            outcome = batch.record(job, case, summary, ledger)
            report.count({**summary, "outcome": outcome})
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            job.release()

    def close(self) -> None:
        """Stop the inference actors; shut down a cluster this engine started."""
        try:
            import ray

            for actor in self.actors:
                ray.kill(actor, no_restart=True)
            self.actors = []
            if self.owned:
                ray.shutdown()
        except Exception:  # noqa: BLE001 - closing must not hide the run's own outcome
            logger.warning("closing the Ray connection failed", exc_info=True)
