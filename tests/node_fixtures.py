"""Helpers for the node tests (no tests here): the node as a real process, an in-process receiver,
and small synthetic studies as lists of files.

The node runs as ``python -m app.cli serve`` in its own process so tests can kill -9 it; the
receiver-only tests run it in-process (no model, milliseconds per instance).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from app.dimse.receiver import DicomReceiver, ReceiverOptions
from app.node.inbox import Inbox
from app.node.spool import DurableFs, Spool
from app.node.store import NodeStore
from tests.peers import LOOPBACK, free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
SCU_AE = "STORESCU"


def study_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.dcm"))


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def node_settings(data_dir: Path, model: Path, *, port: int | None = None, destinations: list[str] = (),
                  quiet_period_s: float = 1.0, retry: dict[str, Any] | None = None,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    node: dict[str, Any] = {
        "data-dir": str(data_dir),
        "receiver": {
            "ae-title": "HYPERCT",
            "port": port or free_port(),
            "allowed-callers": [SCU_AE, "ORTHANC@127.0.0.1"],
        },
        "completion": {"quiet-period-s": quiet_period_s, "poll-interval-s": 0.2},
        "worker": {"model": str(model)},
        "outbox": {
            "destinations": list(destinations),
            "poll-interval-s": 0.3,
            "timeout-s": 10,
            "retry": retry or {"max-attempts": 5, "initial-delay-s": 0.5, "factor": 2, "max-delay-s": 2},
        },
        "health": {"port": free_port()},
        "logging": {"level": "INFO"},
    }
    for key, value in (extra or {}).items():
        node.setdefault(key, {}).update(value) if isinstance(value, dict) else node.__setitem__(key, value)
    return {"node": node}


class NodeProcess:
    """``hyperct serve`` in a child process; ``kill9()`` and ``start()`` again for crash tests."""

    def __init__(self, folder: Path, settings: dict[str, Any], *, root: Path = ROOT) -> None:
        """``root``: the checkout whose ``app`` runs (benchmarks compare another revision)."""
        self.folder = folder
        self.root = Path(root)
        self.settings = settings
        self.config = folder / "node.yaml"
        self.config.write_text(yaml.safe_dump(settings))
        self.port = int(settings["node"]["receiver"]["port"])
        self.data_dir = Path(settings["node"]["data-dir"])
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    def start(self) -> NodeProcess:
        log = self.folder / f"node-{len(self.logs)}.log"
        self.logs.append(log)
        env = {**os.environ, "PYTHONPATH": str(self.root)}
        self.proc = subprocess.Popen(  # noqa: S603 - our own CLI
            [sys.executable, "-m", "app.cli", "serve", "--config", str(self.config)],
            stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=self.folder,
        )  # fmt: skip
        try:
            wait_for_port(self.port, proc=self.proc, timeout_s=120)
        except BaseException:
            raise RuntimeError(f"node did not start:\n{self.log_text()[-3000:]}") from None
        return self

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout_s: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise

    def query(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        """Read the node's database from outside, as ``hyperct status`` does (WAL: never blocks it)."""
        conn = sqlite3.connect(self.data_dir / "state.sqlite", timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(sql, params)]
        finally:
            conn.close()

    def study_states(self) -> dict[str, str]:
        return {r["study_uid"]: r["state"] for r in self.query("SELECT study_uid, state FROM studies")}

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.terminate()


@contextlib.contextmanager
def receiver(folder: Path, *, fs: DurableFs | None = None, allowed: tuple[str, ...] = (SCU_AE,),
             store_handler: Callable[..., int] | None = None,
             late_policy: str = "reprocess") -> Iterator[tuple[DicomReceiver, Spool, NodeStore]]:  # fmt: skip
    """An in-process receiver (no worker) on a free loopback port, storing into the node's inbox."""
    spool = Spool(folder / "spool", fs=fs)
    store = NodeStore(folder / "state.sqlite")
    rx = DicomReceiver(
        ReceiverOptions(ae_title="HYPERCT", bind=LOOPBACK, port=free_port(), allowed_callers=allowed),
        Inbox(spool, store, late_policy=late_policy), store_handler=store_handler,
    )  # fmt: skip
    if store_handler is not None and hasattr(store_handler, "counters"):
        rx.counters = store_handler.counters
    rx.start()
    try:
        yield rx, spool, store
    finally:
        rx.stop()
        store.close()
