"""Node configuration (file < environment < command line), the serve/jobs CLIs, TLS on the receiver,
spool retention, and the outbox classification — without a model."""

from __future__ import annotations

import re
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
from tests.node_fixtures import SCU_AE
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
