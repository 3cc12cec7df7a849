"""Test-wide guards: nothing may reach a network other than loopback, and no hub downloads."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.shared_artifacts import shared_artifact

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel workers share the cores: one intra-op thread each (torch, OpenMP/BLAS, also in the
    # subprocesses tests start), or their thread pools oversubscribe the machine.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


class NetworkAccessError(RuntimeError):
    """Raised when a test tries to connect outside loopback."""


def _is_loopback(host: object) -> bool:
    if not isinstance(host, str):
        return False
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo


def _check(sock: socket.socket, address: object) -> None:
    if sock.family == socket.AF_UNIX:
        return
    host = address[0] if isinstance(address, tuple) else address
    if not _is_loopback(host):
        raise NetworkAccessError(f"tests may only connect to loopback, not {address!r}")


def _guarded_connect(self: socket.socket, address: object) -> None:
    _check(self, address)
    return _real_connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: object) -> int:
    _check(self, address)
    return _real_connect_ex(self, address)


def _guarded_getaddrinfo(host: object, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
    if host is not None and not _is_loopback(host if not isinstance(host, bytes) else host.decode()):
        raise NetworkAccessError(f"tests may only resolve loopback names, not {host!r}")
    return _real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(autouse=True, scope="session")
def _loopback_only() -> Iterator[None]:
    """Session-wide socket guard (the subprocess peers run on loopback and are not patched)."""
    socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign]
    socket.getaddrinfo = _guarded_getaddrinfo  # type: ignore[assignment]
    try:
        yield
    finally:
        socket.socket.connect = _real_connect  # type: ignore[method-assign]
        socket.socket.connect_ex = _real_connect_ex  # type: ignore[method-assign]
        socket.getaddrinfo = _real_getaddrinfo


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny exported test model (``tests/app_fixtures.export_tiny_model``), built once per run
    and shared read-only by the application, batch, node and packaging tests. Imported lazily: it
    needs torch."""
    from tests.app_fixtures import export_tiny_model

    return shared_artifact(tmp_path_factory, "tiny-model", export_tiny_model) / "hyperct"


#: The longest test modules, started first so that none of them ends a parallel run alone: `make test`
#: runs pytest-xdist with --dist loadscope --no-loadscope-reorder, which hands whole modules to the
#: workers in collection order. The learning test's two trainings are two modules, so they run at once.
#: Measured in a fresh-clone `make test` (2026-12-05, after Ray's workers stopped running at niceness
#: 15): the two trainings 784 and 773 s, Ray 316 s, node e2e 185 s, the demo-model rebuild 122 s.
RUN_FIRST = (
    "test_batch_ray",
    "test_training_learning",
    "test_training_learning_control",
    "test_demo_model",
    "test_demo_shipped",
    "test_web_browser",
    "test_packaging",
    "test_node_e2e",
    "test_node_worker_pool",
    "test_app",
    "test_export_formats",
    "test_demo",
    "test_batch_send",
    "test_pretext",
    "test_batch_resume",
    "test_training",
    "test_training_speed",
    "test_batch_archive",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest modules first; the sort is stable, so the tests of a module keep their order."""
    rank = {name: i for i, name in enumerate(RUN_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))


#: Modules that are one long training each. pytest-xdist keeps one more module queued on a worker
#: than it is running; behind these, that one is taken from the end of the queue (a short module).
RUN_ALONE = ("test_training_learning", "test_training_learning_control")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """--dist loadscope, except that nothing long waits behind a training (see RUN_ALONE)."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class TrainingsAlone(LoadScopeScheduling):  # type: ignore[misc]
        def _assign_work_unit(self, node: Any) -> None:
            held = self.assigned_work.get(node, {})
            if any(Path(s).stem in RUN_ALONE and not all(t.values()) for s, t in held.items()):
                self.workqueue.move_to_end(next(reversed(self.workqueue)), last=False)
            super()._assign_work_unit(node)

    return TrainingsAlone(config, log)
