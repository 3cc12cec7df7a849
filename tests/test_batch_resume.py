"""A batch run killed half-way resumes: same final table, no duplicate rows, finished studies kept."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.batch.runner import BatchConfig, run_batch
from operators.model_runner import HyperCTRunner
from tests.app_fixtures import TINY_TASKS
from tests.batch_fixtures import read_csv, study_dir

ROOT = Path(__file__).resolve().parents[1]
N_STUDIES = 4

pytestmark = pytest.mark.peers


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four short eligible studies (60 slices of 3 mm), four patients."""
    arch = tmp_path_factory.mktemp("archive")
    for i in range(N_STUDIES):
        study_dir(arch / f"s{i}", 20 + i, slices=60)
    return arch


def _ledger_count(ledger: Path) -> int:
    if not ledger.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT COUNT(*) FROM studies").fetchone()[0])
    except sqlite3.OperationalError:  # schema not created yet
        return 0


def _start_and_wait_for_first_study(
    archive: Path, out: Path, model_dir: Path, ledger: Path
) -> subprocess.Popen[bytes]:
    """``hyperct process`` in a subprocess, returned once its first study is in the ledger."""
    cmd = [sys.executable, "-m", "app.cli", "process", str(archive), str(out), "-m", str(model_dir), "-q"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while _ledger_count(ledger) < 1:
        assert proc.poll() is None, (
            f"run ended before its first study finished: {proc.stderr.read().decode()[-2000:]}"  # type: ignore[union-attr]
        )
        assert time.monotonic() < deadline, "no study finished within 240 s"
        time.sleep(0.02)
    return proc


def _rows(out: Path) -> list[tuple[str, ...]]:
    return sorted(tuple(r.values()) for r in read_csv(out / "findings.csv"))


def test_killed_run_resumes_without_duplicates(tmp_path: Path, archive: Path, model_dir: Path) -> None:
    runner = HyperCTRunner(model_dir)
    reference = tmp_path / "reference"
    run_batch(
        BatchConfig(output=reference, model=model_dir, archive=archive, show_progress=False), runner=runner
    )
    expected = _rows(reference)
    assert len(expected) == N_STUDIES * len(TINY_TASKS)

    out = tmp_path / "out"
    ledger = out / "_batch" / "ledger.sqlite"
    proc = _start_and_wait_for_first_study(archive, out, model_dir, ledger)
    proc.kill()  # SIGKILL: no cleanup, no table written
    proc.wait(timeout=30)
    done_before = _ledger_count(ledger)
    assert 1 <= done_before < N_STUDIES, "the kill must land half-way"
    with sqlite3.connect(ledger) as db:
        finished = [r[0] for r in db.execute("SELECT study_uid FROM studies")]
    mtimes = {uid: (out / uid / "results.json").stat().st_mtime_ns for uid in finished}

    report = run_batch(
        BatchConfig(output=out, model=model_dir, archive=archive, show_progress=False), runner=runner
    )
    assert report.already_done == done_before
    assert report.outcomes == {"processed": N_STUDIES - done_before}
    assert _rows(out) == expected  # same table, no duplicates
    with sqlite3.connect(ledger) as db:
        attempts = dict(db.execute("SELECT study_uid, attempts FROM attempts").fetchall())
        assert db.execute("SELECT COUNT(*) FROM findings").fetchone()[0] == len(expected)
    for uid in finished:
        assert attempts[uid] == 1, f"finished study {uid} was recomputed"
        assert (out / uid / "results.json").stat().st_mtime_ns == mtimes[uid]


def test_ctrl_c_stops_cleanly_with_tables_of_what_finished(
    tmp_path: Path, archive: Path, model_dir: Path
) -> None:
    out = tmp_path / "out"
    ledger = out / "_batch" / "ledger.sqlite"
    proc = _start_and_wait_for_first_study(archive, out, model_dir, ledger)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    recorded = _ledger_count(ledger)
    assert recorded < N_STUDIES, "the interrupt must land half-way"
    rows = read_csv(out / "findings.csv")  # written on the way out
    assert len(rows) == recorded * len(TINY_TASKS)
    assert len({(r["study_instance_uid"], r["task_key"]) for r in rows}) == len(rows)
