"""Node configuration (file < environment < command line), the serve/jobs CLIs, TLS on the receiver,
spool retention, and the outbox classification — without a model."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread
from typer.testing import CliRunner

from app.cli import cli
from app.dimse.network import RemoteNode, TlsConfig
from app.dimse.receiver import DicomReceiver, ReceiverOptions
from app.dimse.sender import RetryPolicy, send_files
from app.node.config import NodeConfig
from app.node.inbox import Inbox
from app.node.outbox import Outbox
from app.node.service import NodeService
from app.node.spool import Spool
from app.node.store import InstanceRecord, NodeStore
from operators.settings import SettingsError
from tests.dicom_fixtures import ct_series, write_series
from tests.node_fixtures import ROOT, SCU_AE
from tests.peers import LOOPBACK, free_port, make_tls_files


def test_file_then_environment_then_cli(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "series-selection": {"min-slices": 10},  # other sections of app.yaml are left alone
                "node": {
                    "data-dir": "d",
                    "receiver": {"port": 1000, "allowed-callers": ["A", "B@127.0.0.1"]},
                    "completion": {"quiet-period-s": 5},
                    "outbox": {"destinations": ["PACS@127.0.0.1:104"], "retry": {"max-attempts": 3}},
                },
            }
        )
    )
    env = {"HYPERCT_NODE_RECEIVER_PORT": "2000", "HYPERCT_NODE_OUTBOX_RETRY_INITIAL_DELAY_S": "1.5",
           "HYPERCT_NODE_COMPLETION_LATE_ARRIVALS": "ignore"}  # fmt: skip
    cfg = NodeConfig.load(path, environ=env, overrides={"receiver.port": 3000, "receiver.ae_title": None})
    assert cfg.receiver.port == 3000
    assert cfg.receiver.ae_title == "HYPERCT"
    assert [str(c) for c in cfg.receiver.allowed_callers] == ["A", "B@127.0.0.1"]
    assert cfg.completion.quiet_period_s == 5.0 and cfg.completion.late_arrivals == "ignore"
    assert cfg.outbox.retry.max_attempts == 3 and cfg.outbox.retry.initial_delay_s == 1.5
    assert NodeConfig.load(path, environ=env).receiver.port == 2000
    assert NodeConfig.load(None, environ={}).completion.quiet_period_s == 30.0  # the documented default


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"node": {"reciever": {}}}, "unknown key 'reciever'"),
        ({"node": {"receiver": {"prot": 1}}}, "unknown key 'prot'"),
        ({"node": {"completion": {"late-arrivals": "maybe"}}}, "reprocess or ignore"),
        ({"node": {"outbox": {"destinations": ["nowhere"]}}}, "AE@host:port"),
        ({"node": {"receiver": {"allowed-callers": ["A@host:104"]}}}, "an allow-list entry is AE or AE@host"),
        ({"node": {"logging": {"level": "LOUD"}}}, "node.logging.level: must be DEBUG, INFO"),
    ],
)
def test_bad_settings_are_refused_by_name(tmp_path: Path, data: dict, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=message):
        NodeConfig.load(path, environ={})
    with pytest.raises(ValueError, match="unknown setting"):
        NodeConfig.load(None, environ={"HYPERCT_NODE_RECEIVER_NOPE": "1"})


@pytest.mark.parametrize(
    ("destination", "message"),
    [
        ("PACS@host name:104", "host 'host name' is empty or contains spaces"),
        ("PACS@::1:104", "write IPv6 hosts in brackets, AE@[addr]:port"),
        ("PACS@[::1]104", "IPv6 host must be written [addr]:port"),
        ("PACS@host:0", "port 0 is outside 1-65535"),
    ],
)
def test_a_destination_the_sender_cannot_use_is_refused_when_the_config_loads(
    tmp_path: Path, destination: str, message: str
) -> None:
    """One parser: what the node file accepts is what the outbox can send to (#12: the node once
    accepted these, and every outbox pass then raised, leaving later destinations unsent)."""
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({"node": {"outbox": {"destinations": ["GOOD@127.0.0.1:104", destination]}}}))
    with pytest.raises(SettingsError, match=r"node\.outbox\.destinations\[1\]: .*" + re.escape(message)):
        NodeConfig.load(path, environ={})
    with pytest.raises(SettingsError, match=re.escape(message)):
        NodeConfig.load(None, environ={"HYPERCT_NODE_OUTBOX_DESTINATIONS": f'["{destination}"]'})
    bad = CliRunner().invoke(cli, ["serve", "--print-config", "-d", destination])
    assert bad.exit_code == 2 and message in bad.output


@pytest.mark.parametrize("option", ["--send-to", "--from-pacs", "--allow"])
def test_cli_addresses_go_through_the_same_parser(tmp_path: Path, option: str) -> None:
    bad = "PACS@::1:104" if option != "--allow" else "PACS@::1"
    args = {
        "--send-to": ["process", str(tmp_path), str(tmp_path / "out"), "--send-to", bad],
        "--from-pacs": ["process", str(tmp_path / "out"), "--from-pacs", bad],
        "--allow": ["serve", "--print-config", "--allow", bad],
    }[option]
    result = CliRunner().invoke(cli, args, env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert result.exit_code == 2 and "write IPv6 hosts in brackets" in result.output, result.output


def test_addresses_are_parsed_once_and_print_back() -> None:
    cfg = NodeConfig.load(
        None,
        environ={"HYPERCT_NODE_RECEIVER_ALLOWED_CALLERS": "PACS, MOD@[::1]"},
        overrides={"outbox.destinations": ["PACS@[::1]:104", "ARCHIVE@pacs.example:11112"]},
    )
    assert [(d.ae_title, d.host, d.port) for d in cfg.outbox.destinations] == [
        ("PACS", "::1", 104),
        ("ARCHIVE", "pacs.example", 11112),
    ]
    assert [(c.ae_title, c.host) for c in cfg.receiver.allowed_callers] == [("PACS", None), ("MOD", "::1")]
    printed = cfg.to_dict()
    assert printed["outbox"]["destinations"] == ["PACS@[::1]:104", "ARCHIVE@pacs.example:11112"]
    assert printed["receiver"]["allowed_callers"] == ["PACS", "MOD@[::1]"]
    assert NodeConfig.from_dict(printed) == cfg  # --print-config output loads back unchanged


def test_serve_help_explains_every_option_and_prints_config(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["serve", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert result.exit_code == 0
    for option in ("--config", "--data-dir", "--ae-title", "--bind", "--port", "--allow", "--model", "--destination",
                   "--quiet-period", "--late-arrivals", "--retention", "--health-port", "--log-json"):  # fmt: skip
        assert option in result.output
    assert "setting receiver.port" in result.output
    printed = CliRunner().invoke(cli, ["serve", "--print-config", "--port", "4321", "-d", "P@127.0.0.1:5"])
    assert printed.exit_code == 0, printed.output
    node = yaml.safe_load(printed.output)["node"]
    assert node["receiver"]["port"] == 4321 and node["outbox"]["destinations"] == ["P@127.0.0.1:5"]
    bad = CliRunner().invoke(cli, ["serve", "--late-arrivals", "sometimes"])
    assert bad.exit_code == 2 and "reprocess or ignore" in bad.output


# --------------------------------------------------------------------------------------------------
# User errors: exit 2, one line naming the culprit, no traceback, before anything is created (#19)
# --------------------------------------------------------------------------------------------------


def _one_line_error(exit_code: int, output: str) -> str:
    """The single ``error: ...`` line of a refused command (exit 2, nothing else, no traceback)."""
    assert exit_code == 2, output
    assert "Traceback" not in output, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


def _node_file(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "node.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("command", [["serve"], ["status"], ["jobs", "list"]])
def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path: Path, command: list[str]) -> None:
    path = _node_file(tmp_path, "node:\n  receiver:\n    port: 1\n   bind: 127.0.0.1\n")
    result = CliRunner().invoke(cli, [*command, "-c", str(path)])
    line = _one_line_error(result.exit_code, result.output)
    assert f"{path}: line 4, column 4: YAML syntax error" in line


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ('node:\n  receiver:\n    port: "eleven"\n', {},
         "{file}: node.receiver.port: expected an integer, got 'eleven'"),
        ("node:\n  completion:\n    quiet-period-s: soon\n", {},
         "{file}: node.completion.quiet-period-s: expected a number, got 'soon'"),
        ("node:\n  receiver:\n    port: 11112\n", {"HYPERCT_NODE_RECEIVER_PORT": "abc"},
         "error: HYPERCT_NODE_RECEIVER_PORT: node.receiver.port: expected an integer, got 'abc'"),
    ],
)  # fmt: skip
def test_a_value_of_the_wrong_type_names_its_key_and_source(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    """The file's name for a value from the file, the variable's for one from the environment
    (never the file's: the file was right)."""
    path = _node_file(tmp_path, text)
    result = CliRunner().invoke(cli, ["serve", "-c", str(path), "--print-config"], env=env)
    assert message.format(file=path) in _one_line_error(result.exit_code, result.output)


def test_jobs_list_refuses_an_unknown_state_naming_the_valid_ones(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["jobs", "list", "--data-dir", str(tmp_path), "--state", "bogus"])
    line = _one_line_error(result.exit_code, result.output)
    assert "'bogus'" in line
    assert "queued, running, done, not-processed, failed, superseded" in line


def _serve(folder: Path, settings: dict) -> subprocess.CompletedProcess[str]:
    """``hyperct serve`` in its own process (it installs signal handlers and logging)."""
    path = _node_file(folder, yaml.safe_dump({"node": settings}))
    return subprocess.run(  # noqa: S603 - our own CLI
        [sys.executable, "-m", "app.cli", "serve", "-c", str(path)],
        cwd=folder, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize("taken", ["receiver", "health"])
def test_serve_refuses_a_port_in_use_naming_port_and_setting(tmp_path: Path, taken: str) -> None:
    with socket.socket() as other:
        other.bind((LOOPBACK, 0))
        other.listen()
        busy = other.getsockname()[1]
        ports = {"receiver": free_port(), "health": free_port(), taken: busy}
        done = _serve(tmp_path, {"data-dir": "nd", "receiver": {"port": ports["receiver"]},
                                 "health": {"port": ports["health"]}})  # fmt: skip
    line = _one_line_error(done.returncode, done.stderr)
    assert f"{taken}.port {busy}: {LOOPBACK}:{busy} is already in use" in line
    assert not (tmp_path / "nd").exists(), "checked before the node created anything"


def test_serve_refuses_a_missing_model_before_listening(tmp_path: Path) -> None:
    done = _serve(tmp_path, {"data-dir": "nd", "receiver": {"port": free_port()}, "health": {"port": 0}})
    line = _one_line_error(done.returncode, done.stderr)
    models = tmp_path / "models"
    assert f"worker.model: {models}: no manifest.json here or in {models / 'hyperct'}" in line
    assert not (tmp_path / "nd").exists()


def test_relative_paths_in_the_file_are_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not to the shell's folder: ``status -c`` must find the same node from anywhere; values from
    the environment or the command line stay relative to where they are typed."""
    conf = tmp_path / "conf"
    path = _node_file(conf, "node:\n  data-dir: nd\n  receiver:\n    tls: {certificate: certs/node.pem}\n"
                            "  outbox:\n    tls: {ca: /etc/ca.pem}\n")  # fmt: skip
    cfg = NodeConfig.load(path, environ={})
    assert cfg.data_path == conf / "nd"
    assert cfg.worker.model == conf / "models"  # a relative default, too, is the file's
    assert cfg.receiver.tls.certificate == conf / "certs" / "node.pem"
    assert cfg.outbox.tls.ca == Path("/etc/ca.pem")
    from_env = NodeConfig.load(
        path, environ={"HYPERCT_NODE_DATA_DIR": "here"}, overrides={"worker.model": "m"}
    )
    assert from_env.data_path == Path("here") and from_env.worker.model == Path("m")
    assert NodeConfig.load(None, environ={}).data_path == Path("node-data")  # no file: the current folder

    NodeStore(conf / "nd" / "state.sqlite").close()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    shown = CliRunner().invoke(cli, ["status", "-c", "../conf/node.yaml"])
    assert shown.exit_code == 0, shown.output
    assert "queue depth: 0" in shown.output


def test_a_node_that_would_never_send_says_so(
    tmp_path: Path, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No outbox.destinations: results never leave, so the start-up log and ``hyperct status`` warn."""
    settings = {"receiver": {"port": free_port(), "allowed-callers": ["PACS"]}, "health": {"port": 0},
                "worker": {"model": str(model_dir)}}  # fmt: skip
    path = _node_file(tmp_path, yaml.safe_dump({"node": settings}))
    cfg = NodeConfig.load(path, environ={})
    (warning,) = cfg.warnings()
    assert warning.startswith("outbox.destinations is empty: results stay")
    service = NodeService(cfg)
    with caplog.at_level("WARNING", logger="app.node.service"):
        service.start()
        service.shutdown()
    assert warning in caplog.messages
    shown = CliRunner().invoke(cli, ["status", "-c", str(path)])
    assert shown.exit_code == 0 and f"warning: {warning}" in shown.output, shown.output
    as_json = CliRunner().invoke(cli, ["status", "-c", str(path), "--json"])
    assert __import__("json").loads(as_json.output)["warnings"] == [warning]
    sending = NodeConfig.load(path, environ={}, overrides={"outbox.destinations": ["PACS@127.0.0.1:104"]})
    assert sending.warnings() == []


def test_tls_receiver_with_mutual_authentication(tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path / "tls")
    series = ct_series(n_slices=2, seed=4)
    files = write_series(tmp_path / "series", series.datasets)
    spool, state = Spool(tmp_path / "spool"), NodeStore(tmp_path / "state.sqlite")
    server_tls = TlsConfig(tls.server_cert, tls.server_key, tls.ca, require_client_cert=True)
    rx = DicomReceiver(
        ReceiverOptions(port=free_port(), allowed_callers=[SCU_AE], tls=server_tls),
        Inbox(spool, state),
    )
    rx.start()
    try:
        with_cert = RemoteNode(
            "HYPERCT", "localhost", rx.port, tls=TlsConfig(tls.client_cert, tls.client_key, tls.ca)
        )
        report = send_files(with_cert, files, calling_ae=SCU_AE, timeout_s=10)
        assert report.ok, report.error
        without_cert = RemoteNode("HYPERCT", "localhost", rx.port, tls=TlsConfig(ca=tls.ca))
        refused = send_files(without_cert, files, calling_ae=SCU_AE, timeout_s=10)
        assert not refused.ok
        plain = send_files(RemoteNode("HYPERCT", LOOPBACK, rx.port), files, calling_ae=SCU_AE, timeout_s=10)
        assert not plain.ok
    finally:
        rx.stop()
    assert state.db.query("SELECT COUNT(*) FROM instances")[0][0] == 2
    state.close()


def _record(state: NodeStore, spool: Spool, study: str, sop: str) -> None:
    f = spool.write(study, sop, b"x")
    state.studies.record(
        InstanceRecord(
            study,
            sop,
            "1.2",
            "1.2.840.10008.5.1.4.1.1.2",
            "CT",
            "1.2.840.10008.1.2.1",
            "P",
            "",
            True,
            False,
            f.relpath,
            f.size,
            f.sha256,
            "A",
        )  # fmt: skip
    )


@pytest.mark.parametrize(
    ("retention", "keep_days", "removed"), [("delete", 7.0, 1), ("keep", 7.0, 0), ("keep", 0.0, 0)]
)
def test_spool_retention(tmp_path: Path, retention: str, keep_days: float, removed: int) -> None:
    cfg = NodeConfig.load(None, environ={}, overrides={"data_dir": str(tmp_path), "spool.retention": retention,
                                                       "spool.keep_days": keep_days})  # fmt: skip
    service = NodeService(cfg)
    service.store, service.spool = NodeStore(tmp_path / "state.sqlite"), Spool(tmp_path / "spool")
    _record(service.store, service.spool, "1.2.3", "1.2.3.4")
    (job,) = service.store.studies.complete_quiet(0.0, now=time.time() + 1)
    claimed = service.store.jobs.claim()
    assert claimed is not None and claimed.id == job
    service.store.jobs.finish(claimed, "processed", "", "results/1", [], [])
    assert service.housekeeping() == removed
    assert (tmp_path / "spool" / "1.2.3").exists() == (removed == 0)
    if retention == "keep" and keep_days:
        assert service.housekeeping(now=time.time() + keep_days * 86400 + 1) == 1  # after N days
    service.store.close()


def test_outbox_retries_transient_and_fails_permanent_errors(tmp_path: Path) -> None:
    """Against a fake sender: transient errors back off, permanent ones and exhausted attempts fail."""
    from app.dimse.sender import FileResult, SendReport, TransientSendError

    state, spool = NodeStore(tmp_path / "state.sqlite"), Spool(tmp_path / "spool")
    _record(state, spool, "1.2.3", "1.2.3.4")
    state.studies.complete_quiet(0.0, now=time.time() + 1)
    job = state.jobs.claim()
    assert job is not None
    series = ct_series(n_slices=1, seed=2)
    (result_file,) = write_series(tmp_path / "results", series.datasets)
    sop = str(dcmread(result_file).SOPInstanceUID)
    state.jobs.finish(
        job, "processed", "", "results", [(sop, "results/CT0000.dcm")], ["A@127.0.0.1:1", "B@127.0.0.1:2"]
    )
    calls: list[str] = []

    def sender(node: RemoteNode, paths: list[Path], **_: object) -> SendReport:
        calls.append(node.ae_title)
        transient = node.ae_title == "A"
        err = TransientSendError("refused") if transient else None
        results = tuple(
            FileResult(p, sop, None, None, None if transient else 0xC000, "x", transient) for p in paths
        )
        return SendReport(node, results, err)

    outbox = Outbox(
        state.outbox, tmp_path, RetryPolicy(max_attempts=2, initial_delay_s=100, factor=2), sender=sender
    )
    assert outbox.run_once() == 2
    rows = {r["destination"]: dict(r) for r in state.db.query("SELECT * FROM outbox")}
    assert rows["B@127.0.0.1:2"]["state"] == "failed"  # a failure status is permanent
    assert (
        rows["A@127.0.0.1:1"]["state"] == "pending"
        and rows["A@127.0.0.1:1"]["next_attempt_at"] > time.time() + 90
    )
    assert outbox.run_once() == 0  # not due yet
    assert outbox.run_once(now=time.time() + 101) == 1
    assert (
        state.db.query("SELECT state FROM outbox WHERE destination='A@127.0.0.1:1'")[0][0] == "failed"
    )  # exhausted
    assert state.studies.rows()[0]["state"] == "failed"
    assert calls == ["A", "B", "A"]
    state.close()


def test_outbox_sends_to_the_good_destinations_when_one_is_bad(tmp_path: Path) -> None:
    """A row whose destination cannot be parsed (queued before configurations refused it) fails
    alone, permanently; the same pass still delivers to the destinations before and after it."""
    from app.dimse.sender import FileResult, SendReport

    state, spool = NodeStore(tmp_path / "state.sqlite"), Spool(tmp_path / "spool")
    _record(state, spool, "1.2.3", "1.2.3.4")
    state.studies.complete_quiet(0.0, now=time.time() + 1)
    job = state.jobs.claim()
    assert job is not None
    destinations = ["A@127.0.0.1:1", "BAD@host name:104", "C@[::1]:3"]
    state.jobs.finish(job, "processed", "", "results", [("1.2.3.9", "results/SR.dcm")], destinations)
    calls: list[str] = []

    def sender(node: RemoteNode, paths: list[Path], **_: object) -> SendReport:
        calls.append(str(node))
        return SendReport(node, tuple(FileResult(p, "1.2.3.9", None, None, 0x0000) for p in paths))

    outbox = Outbox(state.outbox, tmp_path, RetryPolicy(), sender=sender)
    assert outbox.run_once() == 3
    assert calls == ["A@127.0.0.1:1", "C@[::1]:3"]
    rows = {r["destination"]: dict(r) for r in state.db.query("SELECT * FROM outbox")}
    assert rows["A@127.0.0.1:1"]["state"] == "sent" and rows["C@[::1]:3"]["state"] == "sent"
    assert rows["BAD@host name:104"]["state"] == "failed"
    assert "contains spaces" in rows["BAD@host name:104"]["last_error"]
    assert (outbox.sent, outbox.failed) == (2, 1)
    state.close()


def test_jobs_purge_forgets_finished_studies_and_their_files(tmp_path: Path) -> None:
    state, spool = NodeStore(tmp_path / "state.sqlite"), Spool(tmp_path / "spool")
    _record(state, spool, "1.2.3", "1.2.3.4")
    _record(state, spool, "1.2.5", "1.2.5.6")
    state.studies.complete_quiet(0.0, now=time.time() + 1)
    job = state.jobs.claim()
    assert job is not None and job.study_uid == "1.2.3"
    (tmp_path / "results" / str(job.id)).mkdir(parents=True)
    state.jobs.finish(job, "processed", "", f"results/{job.id}", [], [])
    state.close()
    config = ["--data-dir", str(tmp_path)]
    kept = CliRunner().invoke(cli, ["jobs", "purge", *config])  # finished less than 30 days ago: kept
    assert kept.exit_code == 0 and "purged 0" in kept.output
    purged = CliRunner().invoke(cli, ["jobs", "purge", *config, "--older-than-days", "0"])
    assert purged.exit_code == 0 and "purged 1" in purged.output, purged.output
    assert not (tmp_path / "spool" / "1.2.3").exists() and not (tmp_path / "results" / str(job.id)).exists()
    assert (tmp_path / "spool" / "1.2.5").exists()  # still queued: untouched
    listing = CliRunner().invoke(cli, ["jobs", "list", *config, "--json"])
    assert [j["study_uid"] for j in __import__("json").loads(listing.output)] == ["1.2.5"]


def test_a_not_processed_study_is_one_state_everywhere(tmp_path: Path) -> None:
    """A run that ends ``not-processed`` (an MR-only study) is stored with the outcome's spelling; the
    job states, the late-arrival rule, retry and purge used ``not_processed`` and never matched it
    (issue #19): the job could not be listed by state nor retried, a late CT left the study alone,
    and purge kept it forever."""
    state, spool = NodeStore(tmp_path / "state.sqlite"), Spool(tmp_path / "spool")
    _record(state, spool, "1.2.3", "1.2.3.4")
    state.studies.complete_quiet(0.0, now=time.time() + 1)
    job = state.jobs.claim()
    assert job is not None
    assert state.jobs.finish(job, "not-processed", "modality MR is not CT", "results/1", [], []) == "not-processed"
    state.close()
    config = ["--data-dir", str(tmp_path)]
    for spelling in ("not-processed", "not_processed"):  # the older spelling is still understood
        listed = CliRunner().invoke(cli, ["jobs", "list", *config, "--state", spelling])
        assert listed.exit_code == 0 and "not-processed" in listed.output and "1.2.3" in listed.output, listed.output
    status = CliRunner().invoke(cli, ["status", *config])
    assert "jobs: not-processed 1" in status.output and "not_processed" not in status.output, status.output
    purged = CliRunner().invoke(cli, ["jobs", "purge", *config, "--older-than-days", "0"])
    assert purged.exit_code == 0 and "purged 1" in purged.output, purged.output

    state = NodeStore(tmp_path / "state.sqlite")
    for uid in ("1.2.7", "1.2.8"):
        _record(state, spool, uid, f"{uid}.1")
    state.studies.complete_quiet(0.0, now=time.time() + 1)
    for _ in range(2):
        job = state.jobs.claim()
        assert job is not None
        state.jobs.finish(job, "not-processed", "modality MR is not CT", f"results/{job.id}", [], [])
    assert state.jobs.retry(job.id) == f"job {job.id + 1} queued"  # finished: it may run again

    def study(uid: str) -> dict:
        return next(dict(r) for r in state.studies.rows() if r["study_uid"] == uid)

    generation = study("1.2.7")["generation"]
    _record(state, spool, "1.2.7", "1.2.7.2")  # a late CT instance: the study is processed again
    assert (study("1.2.7")["state"], study("1.2.7")["generation"]) == ("receiving", generation + 1)
    state.close()
