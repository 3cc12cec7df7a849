"""Artefacts built once per test run and shared read-only by every test that needs them, across
pytest-xdist workers too (no tests here)."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest


def shared_artifact(
    tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]
) -> Path:
    """A folder that ``build(folder)`` fills once per test run, even when pytest-xdist runs the suite
    in several worker processes (session fixtures run once per worker there): the workers share the
    run's base temp folder, the first one to take the lock builds, the others wait and reuse it.

    Only for artefacts the tests read and never modify. A build that raises leaves nothing behind,
    so the next worker builds again (and fails the same way: a failure is never hidden)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # <run>/popen-gwN: the run's folder is the parent
        root = root.parent
    shared = root / "shared"
    shared.mkdir(exist_ok=True)
    folder, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            try:
                build(folder)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            done.touch()
    return folder
