"""``hyperct process --send-to``: results go out through the node's outbox, once, and resume on a rerun."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from app.batch.runner import BatchConfig, run_batch
from app.batch.send import SendConfig
from app.cli import cli
from app.dimse.sender import RetryPolicy
from app.node.store import InstanceRecord, NodeStore, OutboxStore
from operators.model_runner import HyperCTRunner
from operators.study_case import dicom_file_keys
from tests.batch_fixtures import read_csv, study_dir, study_uid
from tests.dicom_fixtures import dciodvfy
from tests.peers import StoreSCP, free_port

pytestmark = pytest.mark.peers


@pytest.fixture(scope="module")
def runner(model_dir: Path) -> HyperCTRunner:
    return HyperCTRunner(model_dir)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two short eligible studies of two patients."""
    arch = tmp_path_factory.mktemp("archive")
    for i in range(2):
        study_dir(arch / f"s{i}", 40 + i, slices=60)
    return arch


def _results(out: Path, uids: list[str]) -> dict[str, tuple[str, str]]:
    """SOP Instance UID -> (study, file name) of every DICOM result (SR, SEG, Parametric Maps, text
    SR) the run wrote."""
    found = {}
    for uid in uids:
        files = json.loads((out / uid / "results.json").read_text())["outputs"]["files"]
        for key in dicom_file_keys(files):
            path = out / files[key]
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            found[str(ds.SOPInstanceUID)] = (uid, path.name)
    return found


def _received(scp: StoreSCP) -> Counter[str]:
    """SOP Instance UIDs received, counted (storescp +uf: a second copy gets a file of its own)."""
    return Counter(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in scp.files())


def _send(dest: str, **kw: object) -> SendConfig:
    retry = RetryPolicy(max_attempts=kw.pop("attempts", 8), initial_delay_s=0.2)  # type: ignore[arg-type]
    return SendConfig(destinations=(dest,), retry=retry, poll_interval_s=0.2, **kw)  # type: ignore[arg-type]


def test_each_study_results_arrive_once_and_valid(
    tmp_path: Path, archive: Path, model_dir: Path, runner: HyperCTRunner
) -> None:
    out = tmp_path / "out"
    uids = sorted(study_uid(next(p.iterdir())) for p in archive.iterdir())
    with StoreSCP(tmp_path / "pacs", extra_args=("+uf",)) as scp:
        dest = f"{scp.ae_title}@127.0.0.1:{scp.port}"
        cfg = BatchConfig(output=out, model=model_dir, archive=archive, show_progress=False, send=_send(dest))
        report = run_batch(cfg, runner=runner)
        assert report.outcomes == {"processed": 2}
        expected = _results(out, uids)
        n = len(expected)
        kinds = Counter(name.split("_", 1)[0] for _, name in expected.values())
        assert kinds["SR"] == kinds["SEG"] == kinds["TXT"] == 2 and kinds["PM"] >= 2, expected
        assert set(kinds) == {"SR", "SEG", "TXT", "PM"}  # and one map per positive finding
        assert report.sends == {"sent": n}
        assert _received(scp) == Counter(set(expected))  # exactly these objects, each once
        for path in scp.files():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            assert expected[str(ds.SOPInstanceUID)][0] == ds.StudyInstanceUID  # the study it belongs to
            errors, _ = dciodvfy(path)
            assert errors == [], (path.name, errors)
        # A rerun with the same destination: nothing to process, nothing sent again.
        again = run_batch(cfg, runner=runner)
        assert again.already_done == 2 and not again.outcomes
        assert again.sends == {"sent": n}
        assert _received(scp) == Counter(set(expected))
    sends = read_csv(out / "sends.csv")
    assert {(r["sop_instance_uid"], r["state"], r["destination"]) for r in sends} == {
        (sop, "sent", dest) for sop in expected
    }
    assert all(r["path"] == f"{expected[r['sop_instance_uid']][0]}/{Path(r['path']).name}" for r in sends)
    assert not [e for e in read_csv(out / "errors.csv") if e["kind"] == "send"]
    # The batch keeps the outbox alone (no node tables); its study view and `hyperct status` read it.
    assert not (out / "_batch" / "state.sqlite").exists()
    store = OutboxStore.open(out / "_batch" / "outbox.sqlite")
    try:
        assert store.counts() == {"sent": n}
        assert store.study_states() == {uid: "done" for uid in uids}
        tables = {r[0] for r in store.db.query("SELECT name FROM sqlite_master WHERE type='table'")}
        assert tables - {"sqlite_sequence"} == {"outbox"}
    finally:
        store.close()
    shown = CliRunner().invoke(cli, ["status", "--data-dir", str(out / "_batch")])
    assert shown.exit_code == 0, shown.output
    assert f"outbox: sent {n}" in shown.output and "studies: done 2" in shown.output


def test_destination_down_then_up_rerun_delivers_without_duplicates(
    tmp_path: Path, archive: Path, model_dir: Path
) -> None:
    out = tmp_path / "out"
    port = free_port()  # nothing listens yet: connection refused, a transient error
    dest = f"PACS@127.0.0.1:{port}"
    base = ["process", str(archive), str(out), "-m", str(model_dir), "--send-to", dest]
    base += ["--send-retry-delay", "0.2"]
    down = CliRunner().invoke(cli, [*base, "-q", "--send-wait", "1"])
    assert down.exit_code == 1, down.output  # processed, but results not delivered
    rows = read_csv(out / "sends.csv")
    n = len(_results(out, sorted(study_uid(next(p.iterdir())) for p in archive.iterdir())))
    assert len(rows) == n and {r["state"] for r in rows} == {"pending"}
    assert all(int(r["attempts"]) >= 1 and r["last_error"] for r in rows)
    with StoreSCP(tmp_path / "pacs", port=port, ae_title="PACS", extra_args=("+uf",)) as scp:
        up = CliRunner().invoke(cli, [*base, "--send-wait", "60"])
        assert up.exit_code == 0, up.output
        assert "already in the ledger (skipped; --force to redo): 2" in up.output  # not recomputed
        assert f"sends: {n} delivered, 0 pending, 0 failed" in up.output
        received = _received(scp)
        assert sorted(received.values()) == [1] * n
        assert set(received) == {r["sop_instance_uid"] for r in rows}
        third = CliRunner().invoke(cli, [*base, "-q"])
        assert third.exit_code == 0, third.output
        assert _received(scp) == received  # delivered objects are never sent again
    ledger = read_csv(out / "studies.csv")
    assert [r["outcome"] for r in ledger] == ["processed", "processed"]
    assert {r["state"] for r in read_csv(out / "sends.csv")} == {"sent"}


def test_rejected_sends_are_listed_and_never_stop_the_batch(
    tmp_path: Path, archive: Path, model_dir: Path, runner: HyperCTRunner
) -> None:
    out = tmp_path / "out"
    with StoreSCP(tmp_path / "pacs", refuse=True) as scp:  # association rejected: permanent
        dest = f"{scp.ae_title}@127.0.0.1:{scp.port}"
        report = run_batch(
            BatchConfig(output=out, model=model_dir, archive=archive, show_progress=False, send=_send(dest)),
            runner=runner,
        )
        assert scp.files() == []
    assert report.outcomes == {"processed": 2}
    n = len(_results(out, sorted(study_uid(next(p.iterdir())) for p in archive.iterdir())))
    assert report.sends == {"failed": n}
    errors = [e for e in read_csv(out / "errors.csv") if e["kind"] == "send"]
    assert len(errors) == n
    assert all(e["item"].startswith(dest + " ") and "failed after 1 attempt" in e["reason"] for e in errors)
    # A rerun against a working destination re-queues the failed sends (no recompute).
    with StoreSCP(tmp_path / "pacs2", extra_args=("+uf",)) as good:
        fixed = f"{good.ae_title}@127.0.0.1:{good.port}"
        report = run_batch(
            BatchConfig(output=out, model=model_dir, archive=archive, show_progress=False, send=_send(fixed)),
            runner=runner,
        )
        assert report.already_done == 2
        # The old destination's rows are retried too (still refused), the new one gets everything.
        assert report.sends == {"sent": n, "failed": n}
        assert sorted(_received(good).values()) == [1] * n


def test_enqueue_results_keeps_delivered_rows_and_requeues_the_rest(tmp_path: Path) -> None:
    state = OutboxStore.open(tmp_path / "outbox.sqlite", clock=lambda: 100.0)
    try:
        outputs = [("1.2.3.1", "S/SR_1.dcm"), ("1.2.3.2", "S/SEG_2.dcm")]
        assert state.enqueue("1.2.3", outputs, ["A@h:1", "B@h:2"]) == 4
        assert state.study_states() == {"1.2.3": "sending"}
        due = state.due()
        assert {(i.destination, i.sop_uid) for i in due} == {
            (d, s) for d in ("A@h:1", "B@h:2") for s in ("1.2.3.1", "1.2.3.2")
        }
        for item in due:
            if item.destination == "A@h:1":
                state.result(item, True, "ok", next_attempt_at=None)
            else:
                state.result(item, False, "rejected", next_attempt_at=None)
        assert state.counts() == {"sent": 2, "failed": 2}
        assert state.study_states() == {"1.2.3": "failed"}
        # Queued again (a study redone after a kill): delivered rows stay sent, failed ones re-queued.
        state.enqueue("1.2.3", outputs, ["A@h:1", "B@h:2"])
        assert state.counts() == {"sent": 2, "pending": 2}
        assert {i.destination for i in state.due()} == {"B@h:2"}
        assert state.study_states() == {"1.2.3": "sending"}
        # resend (--force): everything goes again, still one row per destination and object.
        state.enqueue("1.2.3", outputs, ["A@h:1", "B@h:2"], resend=True)
        assert state.counts() == {"pending": 4}
        assert len(state.rows()) == 4
    finally:
        state.close()


def test_requeue_outbox_makes_pending_due_and_retries_failed(tmp_path: Path) -> None:
    now = [100.0]
    state = OutboxStore.open(tmp_path / "outbox.sqlite", clock=lambda: now[0])
    try:
        state.enqueue("9.9", [("9.9.1", "x.dcm"), ("9.9.2", "y.dcm")], ["A@h:1"])
        first, second = state.due()
        state.result(first, False, "refused", next_attempt_at=1000.0)
        state.result(second, False, "rejected", next_attempt_at=None)
        assert state.due() == [] and state.next_due() == 1000.0
        now[0] = 200.0
        assert state.requeue() == 2
        assert [i.sop_uid for i in state.due()] == ["9.9.1", "9.9.2"]
        assert [i.attempts for i in state.due()] == [1, 0]  # failed rows get fresh attempts
        assert state.study_states() == {"9.9": "sending"}
    finally:
        state.close()


def test_outbox_of_an_earlier_batch_run_is_moved_into_the_outbox_file(tmp_path: Path) -> None:
    """Runs before the split kept their outbox in a node-schema ``state.sqlite``: its rows (sent and
    pending) move into ``outbox.sqlite`` once, and the old file is never read again."""
    legacy = NodeStore(tmp_path / "state.sqlite")
    legacy.studies.record(InstanceRecord("1.2.3", "1.2.3.4", "1.2", "1.2.840.10008.5.1.4.1.1.2", "CT",
                                         "1.2.840.10008.1.2.1", "P", "", True, False, "1.2.3/1.2.3.4.dcm", 1,
                                         "x", "A"))  # fmt: skip
    legacy.studies.complete_quiet(0.0, now=1e12)
    job = legacy.jobs.claim()
    assert job is not None
    legacy.jobs.finish(job, "processed", "", "1.2.3", [("1.2.3.9", "1.2.3/SR.dcm")], ["A@h:1", "B@h:2"])
    sent = next(i for i in legacy.outbox.due(now=1e12) if i.destination == "A@h:1")
    legacy.outbox.result(sent, True, "ok", next_attempt_at=None)
    legacy.close()
    store = OutboxStore.open(tmp_path / "outbox.sqlite", legacy=tmp_path / "state.sqlite")
    try:
        rows = {r["destination"]: (r["sop_uid"], r["path"], r["state"], r["attempts"]) for r in store.rows()}
        assert rows == {"A@h:1": ("1.2.3.9", "1.2.3/SR.dcm", "sent", 1), "B@h:2": ("1.2.3.9", "1.2.3/SR.dcm", "pending", 0)}
        assert not (tmp_path / "state.sqlite").exists() and (tmp_path / "state.sqlite.migrated").exists()
    finally:
        store.close()
    again = OutboxStore.open(tmp_path / "outbox.sqlite", legacy=tmp_path / "state.sqlite")
    assert len(again.rows()) == 2  # moved once
    again.close()
