"""Liveness, readiness and Prometheus metrics over plain HTTP (stdlib ``http.server``).

Why stdlib: three small read-only endpoints do not justify a web framework in the serving image.
``/healthz`` (live: the main loop has ticked recently), ``/readyz`` (ready: the receiver listens
and the database answers), ``/metrics`` (Prometheus text format 0.0.4). Bound to loopback by
default; numbers come from the database, so they survive restarts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

logger = logging.getLogger(__name__)


def prometheus_text(counts: dict[str, Any], counters: dict[str, int]) -> str:
    """Metrics in the Prometheus text exposition format."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value:g}")

    metric("hyperct_instances_received_total", "counter", "Instances acknowledged (all time, from the state).",
           [("", counts.get("instances", 0))])  # fmt: skip
    metric("hyperct_instances_failed_total", "counter", "C-STORE requests answered with a failure since start.",
           [("", counters.get("instances_failed", 0))])  # fmt: skip
    metric("hyperct_associations_rejected_total", "counter", "Associations rejected (called AE or allow-list) since start.",
           [("", counters.get("associations_rejected", 0))])  # fmt: skip
    metric("hyperct_studies", "gauge", "Studies by state.",
           [(f'{{state="{k}"}}', v) for k, v in sorted(counts.get("studies", {}).items())])  # fmt: skip
    metric("hyperct_jobs", "gauge", "Jobs by state.",
           [(f'{{state="{k}"}}', v) for k, v in sorted(counts.get("jobs", {}).items())])  # fmt: skip
    metric("hyperct_outbox", "gauge", "Outbox rows by state.",
           [(f'{{state="{k}"}}', v) for k, v in sorted(counts.get("outbox", {}).items())])  # fmt: skip
    jobs = counts.get("jobs", {})
    metric(
        "hyperct_studies_processed_total",
        "counter",
        "Jobs finished with results.",
        [("", jobs.get("done", 0))],
    )
    metric(
        "hyperct_failures_total",
        "counter",
        "Errors recorded (receive, job, send).",
        [("", counts.get("errors", 0))],
    )
    metric("hyperct_queue_depth", "gauge", "Jobs queued or running.",
           [("", jobs.get("queued", 0) + jobs.get("running", 0))])  # fmt: skip
    metric("hyperct_processing_seconds", "summary", "Pipeline run time per job.",
           [("_sum", counts.get("processing_seconds", 0.0)), ("_count", counts.get("processing_count", 0))])  # fmt: skip
    return "\n".join(lines) + "\n"


class HealthServer:
    """Serves the three endpoints from callables (so it knows nothing about the service)."""

    def __init__(self, bind: str, port: int, *, live: Callable[[], bool], ready: Callable[[], bool],
                 metrics: Callable[[], str]) -> None:  # fmt: skip
        checks = {"/healthz": live, "/readyz": ready}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?")[0]
                try:
                    if path in checks:
                        ok = bool(checks[path]())
                        self._send(200 if ok else 503, "text/plain", "ok\n" if ok else "not ok\n")
                    elif path == "/metrics":
                        self._send(200, "text/plain; version=0.0.4", metrics())
                    else:
                        self._send(404, "text/plain", "not found\n")
                except Exception:  # noqa: BLE001 - a probe must get an answer
                    logger.exception("health endpoint %s failed", path)
                    self._send(503, "text/plain", "error\n")

            def _send(self, code: int, ctype: str, body: str) -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet probes
                return

        self._server = ThreadingHTTPServer((bind, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="health", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()
        logger.info(
            "health endpoint on http://%s:%d (/healthz /readyz /metrics)", *self._server.server_address[:2]
        )

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
