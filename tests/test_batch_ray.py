"""``hyperct process --engine ray`` on a real local Ray cluster: a head and a second node (separate
raylets and worker processes on this machine, loopback only), against the local engine.

Same findings bytes as the local engine; a rerun recomputes nothing; a study that kills its worker
is failed after a bounded number of retries without stalling the run; a study whose task Ray retries
after it wrote its results is published once; a node killed mid-run loses nothing; Ctrl-C leaves a
consistent ledger; an unreachable cluster is one line and exit 2. Small on purpose: three 60-slice
CT studies and two logical CPUs.
"""

from __future__ import annotations

import os

# Before Ray is imported (its constants read them): a cluster on loopback only, no usage report, no
# token file written into $HOME (loopback and a throw-away cluster: nothing to authenticate).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray starts its workers at niceness 15 (below the raylet and the driver). Next to the suite's other
# test workers (two trainings at niceness 0 on a 2-core CI host) that starves them: a replacement
# worker took 3 minutes to import the stack and the poisoned-study test 400 s instead of 16 s. The
# tests share the host fairly instead.
os.environ.setdefault("RAY_worker_niceness", "0")

import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import ray
from ray.cluster_utils import Cluster

from app.batch.ray_engine import FAULT_ENV, RayOptions
from app.batch.runner import BatchConfig, BatchReport, run_batch
from tests.app_fixtures import TINY_TASKS
from tests.batch_fixtures import read_csv, study_dir, study_uid
from tests.peers import Orthanc, free_port

pytestmark = [pytest.mark.peers, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
N_CT = 3
OBJECT_STORE = 80 * 1024**2
CLIENT_PORT = free_port()  # the head's Ray client server (ray://)


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three short eligible CT studies (60 slices) and an MR-only study (not processed)."""
    root = tmp_path_factory.mktemp("ray-studies")
    out = {f"ct{i}": study_dir(root / f"ct{i}", 40 + i, slices=60) for i in range(N_CT)}
    out["mr"] = study_dir(root / "mr", 49, slices=60, extras=("mr",))
    shutil.rmtree(out["mr"] / "02_axial")
    return out


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, studies: dict[str, Path]) -> Path:
    arch = tmp_path_factory.mktemp("ray-archive")
    for key, folder in studies.items():
        shutil.copytree(folder, arch / key)
    (arch / "notes.txt").write_text("not DICOM\n")  # a file error in errors.csv
    return arch


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, archive: Path, model_dir: Path) -> Path:
    """The local engine's output for the archive."""
    out = tmp_path_factory.mktemp("ray-reference")
    report = run_batch(BatchConfig(output=out, model=model_dir, archive=archive, show_progress=False))
    assert report.outcomes == {"processed": N_CT, "not-processed": 1}, report.outcomes
    return out


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head node and a second node, one logical CPU each, this process connected as the driver.
    The head also runs Ray's client server (``ray://``), for the client-mode test."""
    assert not ray.is_initialized()
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "object_store_memory": OBJECT_STORE,
            "include_dashboard": False,
            "ray_client_server_port": CLIENT_PORT,
        },
    )
    c.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def _ray(**kw: Any) -> RayOptions:
    """Two studies in flight; CPU actors take no CPU of their own (two logical CPUs in all)."""
    return RayOptions(**{"workers": 2, "max_retries": 1, **kw})


def _run(out: Path, archive: Path, model_dir: Path, **kw: Any) -> BatchReport:
    return run_batch(
        BatchConfig(output=out, model=model_dir, archive=archive, show_progress=False, ray=_ray(**kw))
    )


def _study_files(out: Path) -> dict[str, list[str]]:
    return {
        d.name: sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())
        for d in out.iterdir()
        if d.is_dir() and d.name != "_batch"
    }


def _ledger(out: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{out / '_batch' / 'ledger.sqlite'}?mode=ro", uri=True)


def _attempts(out: Path) -> dict[str, int]:
    with _ledger(out) as db:
        return dict(db.execute("SELECT study_uid, attempts FROM attempts").fetchall())


def _recorded(out: Path) -> int:
    try:
        with _ledger(out) as db:
            return int(db.execute("SELECT COUNT(*) FROM studies").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def _finding_rows(out: Path) -> list[tuple[str, ...]]:
    return sorted(tuple(r.values()) for r in read_csv(out / "findings.csv"))


def test_same_findings_bytes_as_the_local_engine_and_a_rerun_recomputes_nothing(
    tmp_path: Path, archive: Path, reference: Path, model_dir: Path, cluster: Cluster
) -> None:
    out = tmp_path / "out"
    report = _run(out, archive, model_dir)
    assert report.outcomes == {"processed": N_CT, "not-processed": 1}, report.outcomes
    assert report.engine.startswith("ray: 2 CPUs") and "2 CPU inference actor(s)" in report.engine, (
        report.engine
    )
    assert (out / "findings.csv").read_bytes() == (reference / "findings.csv").read_bytes()
    assert (out / "errors.csv").read_bytes() == (reference / "errors.csv").read_bytes()
    assert pq.read_table(out / "findings.parquet").equals(pq.read_table(reference / "findings.parquet"))
    assert _study_files(out) == _study_files(reference)  # same layout, same file names
    assert not (out / "_batch" / "staging").exists()
    assert {"load", "inference", "dicom-writers"} <= set(report.stage_seconds)

    again = _run(out, archive, model_dir)
    assert again.already_done == N_CT + 1 and not again.outcomes
    assert set(_attempts(out).values()) == {1}, "a finished study was recomputed"
    assert (out / "findings.csv").read_bytes() == (reference / "findings.csv").read_bytes()


def test_from_dicomweb_and_from_pacs_on_ray_give_the_same_findings(
    tmp_path: Path, studies: dict[str, Path], reference: Path, model_dir: Path, cluster: Cluster
) -> None:
    """WADO-RS and C-GET retrieval run in the study task, on whichever node takes the study (two
    studies, two in flight: one on each node)."""
    from app.batch.dicomweb import dicomweb_source
    from app.batch.pacs import pacs_source
    from tests.viewer_server import DICOMWEB_ROOT, orthanc_dicomweb_config

    config = {**orthanc_dicomweb_config(), "DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True}
    served = {study_uid(studies[k]) for k in ("ct0", "ct1")}
    with Orthanc(tmp_path / "orthanc", config=config) as orthanc:
        for key in ("ct0", "ct1"):
            for path in sorted(studies[key].rglob("*.dcm")):
                orthanc.upload(path)
        host, port = orthanc.address
        sources = {
            "dicomweb": dicomweb_source(orthanc.url + DICOMWEB_ROOT.rstrip("/")),
            "pacs": pacs_source(f"{orthanc.aet}@{host}:{port}"),
        }
        for name, source in sources.items():
            out = tmp_path / name
            report = run_batch(
                BatchConfig(output=out, model=model_dir, show_progress=False, ray=_ray()), source=source
            )
            assert report.outcomes == {"processed": 2}, (name, report.outcomes)
            assert _finding_rows(out) == [r for r in _finding_rows(reference) if r[0] in served], name
            assert _study_files(out) == {k: v for k, v in _study_files(reference).items() if k in served}, (
                name
            )
            assert not any((out / "_batch" / "cache" / name).iterdir()), name


def test_poisoned_study_fails_after_bounded_retries_and_a_retried_study_is_written_once(
    tmp_path: Path,
    studies: dict[str, Path],
    reference: Path,
    model_dir: Path,
    cluster: Cluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two studies (each crash costs a fresh Ray worker): one kills its worker on every try, the
    other once, after it wrote its results."""
    poisoned, retried = study_uid(studies["ct0"]), study_uid(studies["ct1"])
    archive = tmp_path / "archive"
    for key in ("ct0", "ct1"):
        shutil.copytree(studies[key], archive / key)
    both = {poisoned, retried}
    monkeypatch.setenv(FAULT_ENV, f"{poisoned},{retried}@written")
    out = tmp_path / "out"
    report = _run(out, archive, model_dir)  # a stall would end at the test's timeout
    assert report.outcomes == {"processed": 1, "failed": 1}, report.outcomes
    (error,) = [e for e in read_csv(out / "errors.csv") if e["item"] == poisoned]
    assert error["kind"] == "study"
    assert error["reason"].startswith("failed: worker lost on every try (2;"), error["reason"]
    # The retried study: written by its second attempt only, published once, recorded once.
    assert _study_files(out) == {k: v for k, v in _study_files(reference).items() if k == retried}
    assert _finding_rows(out) == [r for r in _finding_rows(reference) if r[0] == retried]
    assert set(_attempts(out).values()) == {1}
    with _ledger(out) as db:
        assert db.execute("SELECT outcome FROM studies WHERE study_uid = ?", (retried,)).fetchone() == (
            "processed",
        )
    assert not (out / "_batch" / "staging").exists()

    monkeypatch.delenv(FAULT_ENV)
    rerun = _run(out, archive, model_dir)  # failed studies are retried on a rerun, nothing else
    assert rerun.outcomes == {"processed": 1} and rerun.already_done == 1
    assert _finding_rows(out) == [r for r in _finding_rows(reference) if r[0] in both]
    assert _study_files(out) == {k: v for k, v in _study_files(reference).items() if k in both}


def _private_run_past_first_study(archive: Path, out: Path, model_dir: Path) -> subprocess.Popen[bytes]:
    """``hyperct process --engine ray`` on a private one-CPU cluster, returned once it has recorded
    its first study (so that a signal lands mid-run)."""
    cmd = [sys.executable, "-m", "app.cli", "process", str(archive), str(out), "-m", str(model_dir), "-q",
           "--engine", "ray", "--ray-cpus", "1", "--ray-object-store-mb", "80", "-w", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while _recorded(out) < 1:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "no study finished within 300 s"
        time.sleep(0.05)
    return proc


def test_cli_ctrl_c_stops_cleanly_and_the_rerun_resumes(
    tmp_path: Path, archive: Path, reference: Path, model_dir: Path, cluster: Cluster
) -> None:
    """SIGINT to ``hyperct process --engine ray`` (a private cluster of its own): exit 130, the
    ledger and tables hold what finished; the rerun on the shared cluster does the rest."""
    out = tmp_path / "out"
    proc = _private_run_past_first_study(archive, out, model_dir)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, proc.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
    recorded = _recorded(out)
    assert 1 <= recorded < N_CT + 1, "the interrupt must land half-way"
    rows = read_csv(out / "findings.csv")
    with _ledger(out) as db:
        processed = db.execute("SELECT COUNT(*) FROM studies WHERE outcome = 'processed'").fetchone()[0]
        assert db.execute("SELECT COUNT(*) FROM studies WHERE outcome = 'failed'").fetchone()[0] == 0
    assert len(rows) == processed * len(TINY_TASKS)
    assert len({(r["study_instance_uid"], r["task_key"]) for r in rows}) == len(rows)
    finished = {d for d in _study_files(out)}

    report = _run(out, archive, model_dir)
    assert report.already_done == recorded
    assert sum(report.outcomes.values()) == N_CT + 1 - recorded
    assert (out / "findings.csv").read_bytes() == (reference / "findings.csv").read_bytes()
    attempts = _attempts(out)
    assert all(attempts[uid] == 1 for uid in finished), "a finished study was recomputed"


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        out = subprocess.run(["pgrep", "-P", str(todo.pop())], capture_output=True, text=True)
        children = {int(p) for p in out.stdout.split()} - found
        found |= children
        todo += children
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_cli_driver_killed_9_leaves_no_ray_processes_and_the_rerun_resumes(
    tmp_path: Path, archive: Path, reference: Path, model_dir: Path, cluster: Cluster
) -> None:
    """SIGKILL to ``hyperct process --engine ray`` (its private cluster) once a study is recorded: the
    cluster's processes (GCS, raylet, workers, agents) end with it, and the rerun on the shared cluster
    recomputes nothing that was recorded and gives the reference tables."""
    out = tmp_path / "out"
    proc = _private_run_past_first_study(archive, out, model_dir)
    ray_processes = _descendants(proc.pid)
    assert ray_processes, "a private cluster runs in child processes"
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 180  # Ray's agents notice their raylet is gone within a minute or so
    while any(_alive(p) for p in ray_processes) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [p for p in ray_processes if _alive(p)]
    assert not left, f"processes of the killed run's cluster still run: {left}"
    recorded = _recorded(out)
    assert 1 <= recorded < N_CT + 1, "the kill must land mid-run"
    finished = {d for d in _study_files(out)}

    report = _run(out, archive, model_dir)
    assert report.already_done == recorded
    assert (out / "findings.csv").read_bytes() == (reference / "findings.csv").read_bytes()
    assert (out / "errors.csv").read_bytes() == (reference / "errors.csv").read_bytes()
    assert _study_files(out) == _study_files(reference)
    attempts = _attempts(out)
    assert all(attempts[uid] == 1 for uid in finished if uid in attempts), "a finished study was recomputed"
    assert not (out / "_batch" / "staging").exists()


def test_a_node_killed_mid_run_loses_nothing(
    tmp_path: Path, archive: Path, reference: Path, model_dir: Path, cluster: Cluster
) -> None:
    """The second node (its raylet, its workers, an inference actor) is killed once the first study
    is recorded: its study tasks are retried on the head, inference calls fail over to the head's
    actor (the lost one restarts there), and the run completes with the same results."""
    out = tmp_path / "out"
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(report=_run(out, archive, model_dir)))
    thread.start()
    deadline = time.monotonic() + 300
    while _recorded(out) < 1:
        assert thread.is_alive(), "the run ended before its first study was recorded"
        assert time.monotonic() < deadline, "no study finished within 300 s"
        time.sleep(0.02)
    (worker,) = cluster.worker_nodes
    cluster.remove_node(worker, allow_graceful=False)
    killed_at = _recorded(out)
    try:
        thread.join(timeout=600)
        assert not thread.is_alive()
    finally:
        cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)  # for the tests after this one
    assert killed_at < N_CT + 1, "the kill must land mid-run"
    report = result["report"]
    assert report.outcomes == {"processed": N_CT, "not-processed": 1}, report.outcomes
    assert (out / "findings.csv").read_bytes() == (reference / "findings.csv").read_bytes()
    assert _study_files(out) == _study_files(reference)
    assert set(_attempts(out).values()) == {1}


def test_cli_unreachable_ray_address_is_one_line_and_exit_2(tmp_path: Path, archive: Path) -> None:
    port = free_port()  # nothing listens there
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "process", str(archive), str(tmp_path / "out"),
         "--engine", "ray", "--address", f"127.0.0.1:{port}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: cannot reach the Ray cluster at 127.0.0.1:{port}: Connection refused"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["gcs", "client"])
def test_cli_on_the_cluster_prints_the_summary(
    tmp_path: Path, archive: Path, reference: Path, model_dir: Path, cluster: Cluster, mode: str
) -> None:
    """``--address HOST:PORT`` joins the running cluster as a driver, ``--address ray://HOST:PORT``
    as a Ray client (the driver runs on the head); the summary says done / skipped / failed and the
    mean time of each stage."""
    out = tmp_path / "out"
    address = cluster.address
    if mode == "client":
        address = f"ray://127.0.0.1:{CLIENT_PORT}"
    cmd = [sys.executable, "-m", "app.cli", "process", str(archive), str(out), "-m", str(model_dir),
           "--engine", "ray", "--address", address, "--study", study_uid(archive / "ct2")]  # fmt: skip
    done = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "engine: ray: 2 CPUs" in done.stdout, done.stdout
    assert ("(as a Ray client)" in done.stdout) == (mode == "client"), done.stdout
    assert "summary: 1 done, 0 skipped (already in the ledger), 0 not processed, 0 failed" in done.stdout
    assert "stage times (mean s per study of this run): load " in done.stdout
    uid = study_uid(archive / "ct2")
    assert _finding_rows(out) == [r for r in _finding_rows(reference) if r[0] == uid]


def test_address_checks_say_what_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.batch.ray_engine import check_address

    port = free_port()
    check_address(None)  # a private cluster: nothing to reach
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        check_address("head-node")
    with pytest.raises(ConnectionError, match=f"at ray://127.0.0.1:{port}: Connection refused"):
        check_address(f"ray://127.0.0.1:{port}")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(ConnectionError, match="cannot reach the Ray cluster at auto: Connection refused"):
        check_address("auto")


def test_cli_ray_options_need_the_ray_engine(tmp_path: Path, archive: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "process", str(archive), str(tmp_path / "out"), "--address", "auto"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert done.returncode == 2 and "need --engine ray" in done.stderr, done.stderr
