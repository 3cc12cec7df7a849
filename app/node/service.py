"""``hyperct serve``: receiver, scheduler, worker, outbox and web listeners in one process.

Threads: the pynetdicom server (one thread per association), the outbox, the probe listener
(``health:``) and the web listener (``web:``, console and STOW-RS; :mod:`app.web`); the
**worker runs in the main thread**, because Holoscan applications expect to be run from it and
because a pipeline run is the one thing that may take long — or, with ``worker.processes`` > 1, in
that many worker processes (:mod:`app.node.worker_pool`) while the main thread schedules. SIGTERM/SIGINT stop the receiver
first (no new instances; peers re-send anything not acknowledged), let the running job finish
(its result is recorded, or it is re-queued at the next start if the process is killed), let the
outbox finish its current batch, then close the database. Nothing acknowledged is ever lost,
because everything acknowledged is already durable.

Before anything is created or listens, :meth:`NodeService.check` finds what would stop the node
later: a port in use, a model whose manifest does not load, a bad ``app.yaml``, a web listener
exposed without authentication. Each is a :class:`StartError` whose one line names the setting to
change.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from app.node.config import NodeConfig
from app.node.inbox import Inbox
from app.node.outbox import Outbox
from app.node.recovery import RecoveryReport, recover
from app.node.scheduler import Scheduler
from app.node.spool import Spool
from app.node.store import NodeStore
from app.node.worker import Worker

if TYPE_CHECKING:
    from app.config import AppConfig
    from app.node.worker_pool import WorkerPool
    from app.web.server import WebServer

logger = logging.getLogger(__name__)

HOUSEKEEPING_INTERVAL_S = 60.0


class StartError(ValueError):
    """The node cannot start as configured; the one-line message names the setting to change."""


class NodeService:
    """The node; ``serve_forever()`` is ``hyperct serve``."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.data_dir = config.data_path
        self.stop_event = threading.Event()
        self.heartbeat = time.monotonic()
        self.recovery: RecoveryReport | None = None
        self._threads: list[threading.Thread] = []
        self.receiver: Any = None
        self.health: WebServer | None = None
        self.web: WebServer | None = None
        self._web_store: NodeStore | None = None
        self.app_config: AppConfig | None = None
        self.pool: WorkerPool | None = None

    # ------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise :class:`StartError` for what would stop the node after it has started, before
        anything is created or listens: a node that accepts studies it can never process only
        fills its spool. Ports are probed, the model's manifest is read (files not hashed),
        ``app.yaml`` is loaded (and kept for the worker)."""
        from app.config import AppConfig
        from operators.manifest import ManifestError, check_model

        cfg = self.config
        problem = cfg.web.problem()
        if problem is not None:
            raise StartError(problem)
        if cfg.web.enabled and cfg.health.port and cfg.web.port == cfg.health.port:
            raise StartError(
                f"web.port {cfg.web.port} is health.port too: give one another port, or set health.port 0 "
                "(the web listener serves /healthz, /readyz and /metrics as well)"
            )
        _check_port("receiver", cfg.receiver.bind, cfg.receiver.port)
        if cfg.health.port:
            _check_port("health", cfg.health.bind, cfg.health.port)
        if cfg.web.enabled:
            _check_port("web", cfg.web.bind, cfg.web.port)
            if cfg.web.https:
                try:
                    cfg.web.tls.server_context()
                except (ValueError, OSError, ssl.SSLError) as exc:  # unreadable or mismatched TLS files
                    raise StartError(f"web.tls: {exc}") from None
        try:
            check_model(cfg.worker.model.absolute())
        except ManifestError as exc:
            raise StartError(f"worker.model: {exc}") from None
        try:
            self.app_config = AppConfig.load(cfg.worker.app_config)
        except (ValueError, OSError) as exc:
            raise StartError(f"worker.app-config: {exc}") from None

    def start(self) -> None:
        from app.dimse.receiver import DicomReceiver

        self.check()
        cfg = self.config
        for warning in cfg.warnings():
            logger.warning("%s", warning)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = NodeStore(self.data_dir / "state.sqlite")
        self.spool = Spool(self.data_dir / "spool")
        self.recovery = recover(self.store, self.spool, late_policy=cfg.completion.late_arrivals)
        self.scheduler = Scheduler(self.store.studies, cfg.completion.quiet_period_s)
        self.outbox = Outbox(
            self.store.outbox,
            self.data_dir,
            cfg.outbox.retry,
            calling_ae=cfg.outbox.calling_ae,
            timeout_s=cfg.outbox.timeout_s,
            tls=cfg.outbox.tls if cfg.outbox.tls.configured else None,
        )
        rc = cfg.receiver
        inbox = Inbox(self.spool, self.store, late_policy=cfg.completion.late_arrivals)
        self.receiver = DicomReceiver(rc, inbox)
        with _listening("receiver", rc.bind, rc.port):  # a port taken since check()
            self.receiver.start()
        self._spawn("outbox", self.outbox.run, self.stop_event, cfg.outbox.poll_interval_s)
        self._start_web(inbox)
        # The receiver is up first (durable receive needs no model); then the model is loaded once
        # (once per worker process), so the first study does not pay for it.
        if cfg.worker.processes > 1:
            from app.node.worker_pool import WorkerPool

            self.pool = WorkerPool(cfg, self.app_config, self.store)
            self.pool.start()
            logger.info("node started with %d worker processes (data in %s)", cfg.worker.processes, self.data_dir)
            return
        from app.pipeline import Pipeline

        self.worker = Worker(
            self.store,
            self.data_dir,
            Pipeline(cfg.worker.model, self.app_config),
            destinations=[str(d) for d in cfg.outbox.destinations],
            max_attempts=cfg.worker.max_job_attempts,
        )
        _ = self.worker.pipeline.runner
        logger.info("node started (data in %s)", self.data_dir)

    def _start_web(self, inbox: Inbox) -> None:
        """The probe listener and (when enabled) the web listener; both read the state through a
        connection of their own, as ``hyperct status`` does, so a slow page never holds the
        receiver's lock. STOW-RS stores through the receiver's inbox and counters."""
        cfg = self.config
        if not cfg.health.port and not cfg.web.enabled:
            return
        from app.web.app import NodeHandle, probe_app, web_app
        from app.web.server import WebServer

        self._web_store = NodeStore(self.data_dir / "state.sqlite")
        node = NodeHandle(
            store=self._web_store, data_dir=self.data_dir, live=self.live, ready=self.ready,
            counters=self.receiver.counters, status=self.live_status, warnings=cfg.warnings(),
            inbox=inbox, receiver=cfg.receiver,
        )  # fmt: skip
        if cfg.health.port:
            with _listening("health", cfg.health.bind, cfg.health.port):
                self.health = WebServer(probe_app(node, cfg.web), cfg.health.bind, cfg.health.port, name="health")
            self.health.start()
            logger.info("probes on http://%s:%d (/healthz /readyz /metrics)", cfg.health.bind, self.health.port)
        if cfg.web.enabled:
            with _listening("web", cfg.web.bind, cfg.web.port):
                try:
                    self.web = WebServer(web_app(node, cfg.web), cfg.web.bind, cfg.web.port, name="web",
                                         tls=cfg.web.tls, on_stop=node.closing.set)  # fmt: skip
                except (ValueError, ssl.SSLError) as exc:  # unreadable or mismatched TLS files
                    raise StartError(f"web.tls: {exc}") from None
            self.web.start()
            logger.info(
                "web console on %s (auth: %s)", self.web.url,
                "token/basic" if cfg.web.auth.configured else "none, loopback only",
            )  # fmt: skip

    def live_status(self) -> dict[str, Any]:
        """What the console shows that the database does not hold."""
        rc = self.config.receiver
        counters = self.receiver.counters if self.receiver is not None else {}
        worker = getattr(self, "worker", None)
        return {
            "receiver": {
                "ae_title": rc.ae_title, "bind": rc.bind, "port": self.receiver.port if self.receiver else rc.port,
                "listening": self.ready(), "tls": rc.tls.configured,
                "received": counters.get("instances_received", 0), "failed": counters.get("instances_failed", 0),
                "rejected": counters.get("associations_rejected", 0),
            },
            "worker": self._worker_status(worker),
            "outbox": {"destinations": [str(d) for d in self.config.outbox.destinations]},
        }  # fmt: skip

    def _worker_status(self, worker: Worker | None) -> dict[str, Any]:
        if self.pool is not None:
            running = self.pool.running()
            return {"ready": True, "processes": self.pool.n, "busy_s": max((s for _, s in running), default=None)}
        return {"ready": worker is not None, "processes": 1, "busy_s": None if worker is None or worker.busy_since is None
                else time.monotonic() - worker.busy_since}  # fmt: skip

    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # -- health -----------------------------------------------------------------------------------
    def live(self) -> bool:
        """The main loop ticked within 2 poll intervals, or is inside a job (which may take minutes)."""
        worker = getattr(self, "worker", None)
        # Starting up, or inside a job. Worker processes never block the main loop (it only schedules).
        busy = self.pool is None and (worker is None or worker.busy_since is not None)
        return busy or time.monotonic() - self.heartbeat < max(
            10.0, 4 * self.config.completion.poll_interval_s
        )

    def ready(self) -> bool:
        try:
            self.store.db.ping()
        except Exception:  # noqa: BLE001
            return False
        return self.receiver is not None and self.receiver.running and not self.stop_event.is_set()

    # -- main loop --------------------------------------------------------------------------------
    def run(self) -> None:
        """Complete quiet studies and run jobs until asked to stop."""
        next_housekeeping = 0.0
        poll = self.config.completion.poll_interval_s
        while not self.stop_event.is_set():
            self.heartbeat = time.monotonic()
            self.scheduler.tick()
            if self.pool is not None:
                self.pool.check()
                job = None
            else:
                job = self.worker.run_next()
            if self.heartbeat >= next_housekeeping:
                self.housekeeping()
                next_housekeeping = self.heartbeat + HOUSEKEEPING_INTERVAL_S
            if job is None:
                self.stop_event.wait(poll)

    def housekeeping(self, now: float | None = None) -> int:
        """Spool retention: remove the instances of delivered studies (delete, or keep N days)."""
        now = time.time() if now is None else now
        sp = self.config.spool
        if sp.retention == "keep" and sp.keep_days <= 0:
            return 0
        age = 0.0 if sp.retention == "delete" else sp.keep_days * 86400.0
        removed = 0
        for study_uid in self.store.studies.done_before(now - age):
            folder = self.spool.study_dir(study_uid)
            if folder.exists():
                self.spool.remove_study(study_uid)
                removed += 1
                logger.info("spool of study %s removed (retention %s)", study_uid, sp.retention)
        return removed

    def request_stop(self, *_: Any) -> None:
        if not self.stop_event.is_set():
            logger.info("stop requested: no new associations; finishing the current job and batch")
        self.stop_event.set()
        if self.receiver is not None:
            threading.Thread(target=self.receiver.stop, name="receiver-stop", daemon=True).start()

    def shutdown(self) -> None:
        self.stop_event.set()
        if self.receiver is not None:
            self.receiver.stop()
        if self.pool is not None:
            self.pool.stop()  # each worker process finishes its job, recorded
        for t in self._threads:
            t.join(timeout=max(60.0, self.config.outbox.timeout_s * 2))
        for listener in (self.web, self.health):
            if listener is not None:
                listener.stop()
        if self._web_store is not None:
            self._web_store.close()
        if getattr(self, "worker", None) is not None:
            self.worker.pipeline.close()
        self.store.close()
        logger.info("node stopped")

    def serve_forever(self) -> None:
        _install_signal_handlers(self.request_stop)
        self.start()
        try:
            self.run()
        finally:
            self.shutdown()


@contextlib.contextmanager
def _listening(section: str, bind: str, port: int) -> Iterator[None]:
    """Turn a failed bind into one line naming the port and the settings that chose it (the bare
    ``OSError: [Errno 98]`` names neither)."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise StartError(
                f"{section}.port {port}: {bind}:{port} is already in use (another program or node "
                f"listens there); choose another {section}.port or stop that program"
            ) from None
        raise StartError(
            f"{section}.bind {bind}, {section}.port {port}: cannot listen there: {exc}"
        ) from None


def _check_port(section: str, bind: str, port: int) -> None:
    """Bind ``bind:port`` and let it go, as the server will bind it (``SO_REUSEADDR``, like
    ``socketserver``): fails when something listens there. Port 0 (any free port) always works."""
    if not port:
        return
    with _listening(section, bind, port):
        family = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((bind, port))


def _install_signal_handlers(handler: Callable[..., None]) -> None:
    """SIGTERM/SIGINT → graceful stop: the running job finishes, then the node shuts down."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; messages carry UIDs only (the node never logs patient names)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter() if as_json else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))
