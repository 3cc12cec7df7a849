"""``worker.processes: 2``: jobs run side by side in worker processes, never mixing patients, and a
worker killed mid-job costs that job one attempt, not the study."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest

from tests.app_fixtures import small_study
from tests.node_fixtures import NodeProcess, node_settings, study_files, wait_for
from tests.peers import LOOPBACK, StoreSCP, storescu

pytestmark = [pytest.mark.peers, pytest.mark.slow]


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three synthetic studies of three different patients."""
    return [small_study(tmp_path_factory.mktemp(f"study{seed}"), seed=seed) for seed in (21, 22, 23)]


def _worker_pids(node: NodeProcess) -> list[int]:
    """The node's worker processes (spawned children; not multiprocessing's resource tracker)."""
    assert node.proc is not None
    out = subprocess.run(["pgrep", "-P", str(node.proc.pid), "-f", "spawn_main"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _send_all(node: NodeProcess, studies: list[Path]) -> None:
    with ThreadPoolExecutor(len(studies)) as pool:  # associations at the same time
        results = list(pool.map(lambda s: storescu(LOOPBACK, node.port, "HYPERCT", study_files(s)), studies))
    assert [r.returncode for r in results] == [0] * len(studies), [r.stderr[-500:] for r in results]


def _identity(folder: Path) -> tuple[str, str]:
    ds = pydicom.dcmread(study_files(folder)[0], stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.PatientID)


def _results_once_per_study(scp: StoreSCP, studies: list[Path]) -> None:
    patients = dict(map(_identity, studies))
    seen: set[str] = set()
    by_study: dict[str, int] = {}
    for path in scp.files():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert str(ds.SOPInstanceUID) not in seen, "a result was delivered twice"
        seen.add(str(ds.SOPInstanceUID))
        assert str(ds.PatientID) == patients[str(ds.StudyInstanceUID)], "a result carries another patient"
        by_study[str(ds.StudyInstanceUID)] = by_study.get(str(ds.StudyInstanceUID), 0) + 1
    assert set(by_study) == set(patients)


def _done(node: NodeProcess, n: int) -> bool:
    states = node.study_states()
    return len(states) == n and all(s == "done" for s in states.values())


def test_two_worker_processes_run_jobs_side_by_side(tmp_path: Path, model_dir: Path, studies: list[Path]) -> None:
    with StoreSCP(tmp_path / "dest", extra_args=("+uf",)) as scp:
        settings = node_settings(
            tmp_path / "data", model_dir, destinations=[f"STORESCP@{LOOPBACK}:{scp.port}"],
            extra={"worker": {"processes": 2}},
        )  # fmt: skip
        with NodeProcess(tmp_path, settings) as node:
            wait_for(lambda: "2 worker processes ready" in node.log_text(), 180, "both workers loaded")
            assert len(_worker_pids(node)) == 2
            _send_all(node, studies)
            wait_for(lambda: _done(node, 3), 300, "three studies done")
            wait_for(lambda: len(scp.files()) >= 3 * 3, 60, "results delivered")
            _results_once_per_study(scp, studies)
            jobs = node.query("SELECT id, started_at, finished_at, attempts FROM jobs ORDER BY started_at")
            assert len(jobs) == 3 and {j["attempts"] for j in jobs} == {1}
            overlap = any(
                a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"]
                for i, a in enumerate(jobs)
                for b in jobs[i + 1 :]
            )
            assert overlap, f"no two jobs ran at the same time: {jobs}"
            assert node.terminate() == 0
            assert "worker 0 (pid" in node.log_text() and "worker 1 (pid" in node.log_text()
            assert "node stopped" in node.log_text()
            assert not _worker_pids(node)


def test_a_worker_killed_mid_job_costs_one_attempt_and_is_replaced(
    tmp_path: Path, model_dir: Path, studies: list[Path]
) -> None:
    with StoreSCP(tmp_path / "dest", extra_args=("+uf",)) as scp:
        settings = node_settings(
            tmp_path / "data", model_dir, destinations=[f"STORESCP@{LOOPBACK}:{scp.port}"],
            extra={"worker": {"processes": 2, "max-job-attempts": 3}},
        )  # fmt: skip
        with NodeProcess(tmp_path, settings) as node:
            wait_for(lambda: "2 worker processes ready" in node.log_text(), 180, "both workers loaded")
            before = set(_worker_pids(node))
            _send_all(node, studies)
            running = wait_for(
                lambda: node.query("SELECT id FROM jobs WHERE state='running'"), 120, "a job running", 0.02
            )
            for pid in before:  # both workers, whatever each holds
                os.kill(pid, signal.SIGKILL)
            wait_for(lambda: _done(node, 3), 300, "three studies done after the kill")
            after = set(_worker_pids(node))
            assert len(after) == 2 and not after & before, "the killed workers were not replaced"
            jobs = {j["id"]: j for j in node.query("SELECT id, state, attempts FROM jobs")}
            assert len(jobs) == 3 and {j["state"] for j in jobs.values()} == {"done"}
            charged = [jobs[r["id"]] for r in running]
            assert all(j["attempts"] >= 2 for j in charged), jobs  # the killed run counted, then a new one
            assert "worker process died (exit code -9) while running the job" in node.log_text()
            wait_for(lambda: len(scp.files()) >= 3 * 3, 60, "results delivered")
            time.sleep(1.0)  # nothing more arrives: each result once
            _results_once_per_study(scp, studies)
