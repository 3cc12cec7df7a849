"""``hyperct process --from-pacs``: C-FIND with filters and C-GET into a bounded cache, against Orthanc."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pydicom
import pytest

from app.app import run_graph
from app.batch.filters import StudyFilter
from app.batch.pacs import pacs_source
from app.batch.runner import BatchConfig, run_batch
from app.dimse.network import RemoteNode
from app.dimse.query import StudyQuery, find_studies, get_study
from app.pipeline import Pipeline
from operators.model_runner import HyperCTRunner
from tests.app_fixtures import TINY_TASKS
from tests.batch_fixtures import read_csv, study_dir, study_uid
from tests.peers import LOOPBACK, Orthanc, free_port

pytestmark = pytest.mark.peers
CALLING_AE = "HYPERCT"
MOVE_PORT = free_port()  # where Orthanc sends C-MOVE sub-operations for CALLING_AE


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("studies")
    out = {"a": study_dir(root / "a", 30, slices=60), "b": study_dir(root / "b", 31, slices=60)}
    out["mr"] = study_dir(root / "mr", 32, slices=60, extras=("mr",))
    shutil.rmtree(out["mr"] / "02_axial")
    return out


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, studies: dict[str, Path]):
    """Orthanc holding two CT studies and one MR-only study; it knows our AE (FIND/GET allowed, and as
    a C-MOVE destination at MOVE_PORT)."""
    peer = Orthanc(
        tmp_path_factory.mktemp("orthanc"),
        modalities={"hyperct": (CALLING_AE, LOOPBACK, MOVE_PORT)},
        config={"DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True},
    )
    with peer:
        for folder in studies.values():
            for path in sorted(folder.rglob("*.dcm")):
                peer.upload(path)
        yield peer


def _node(orthanc: Orthanc) -> str:
    host, port = orthanc.address
    return f"{orthanc.aet}@{host}:{port}"


def _header(folder: Path) -> pydicom.Dataset:
    return pydicom.dcmread(next(folder.rglob("*.dcm")), stop_before_pixels=True)


def test_c_find_applies_modality_and_accession_and_c_get_retrieves(orthanc, studies, tmp_path: Path) -> None:
    from app.dimse.network import enable_tcp_nodelay

    enable_tcp_nodelay()
    node = RemoteNode.parse(_node(orthanc))
    ct = {s.study_uid for s in find_studies(node, StudyQuery(modalities=("CT",)), calling_ae=CALLING_AE)}
    assert ct == {study_uid(studies["a"]), study_uid(studies["b"])}
    acc = str(_header(studies["b"]).AccessionNumber)
    (only,) = find_studies(node, StudyQuery(accessions=(acc,)), calling_ae=CALLING_AE)
    assert only.study_uid == study_uid(studies["b"]) and only.accession == acc
    date = str(_header(studies["a"]).StudyDate)
    dated = find_studies(node, StudyQuery(date_from=date, date_to=date), calling_ae=CALLING_AE)
    assert study_uid(studies["a"]) in {s.study_uid for s in dated}

    got = get_study(node, study_uid(studies["a"]), tmp_path / "get", calling_ae=CALLING_AE)
    sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in studies["a"].rglob("*.dcm")}
    assert {p.stem for p in got.files} == sent and got.failed == 0
    capped = get_study(
        node, study_uid(studies["a"]), tmp_path / "capped", calling_ae=CALLING_AE, max_bytes=100_000
    )
    assert 0 < len(capped.files) < len(sent) and capped.failed > 0  # the cache bound refuses the rest


def test_a_transient_association_failure_is_retried_and_a_permanent_rejection_is_not(
    orthanc, studies, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A busy or unreachable PACS costs a pause, not the study; an AE title it refuses fails at once."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    import app.batch.pacs as pacs
    import app.dimse.query as query

    monkeypatch.setattr(pacs, "RETRY_DELAYS_S", (0.01, 0.01))
    uid = study_uid(studies["a"])
    # nothing listens: three tries, then the error that says so
    closed = pacs_source(f"NOBODY@{LOOPBACK}:{free_port()}", calling_ae=CALLING_AE)
    with caplog.at_level("WARNING", logger="app.batch.pacs"), pytest.raises(query.QueryError) as err:
        closed._fetch(uid, tmp_path / "closed")
    assert err.value.transient and "cannot connect" in str(err.value)
    retries = [r.getMessage().split(" failed")[0] for r in caplog.records if r.name == "app.batch.pacs"]
    assert retries == [f"study {uid}: try 1", f"study {uid}: try 2"]

    # a PACS that answers on the second try: the study is retrieved whole
    calls: list[str] = []
    real_get = query.get_study

    def flaky_get(*args: object, **kwargs: object) -> object:
        calls.append("get")
        if len(calls) == 1:
            raise query.QueryError("busy", transient=True)
        return real_get(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(query, "get_study", flaky_get)
    files = pacs_source(_node(orthanc), calling_ae=CALLING_AE)._fetch(uid, tmp_path / "flaky")
    assert len(calls) == 2 and len(files) == len(list(studies["a"].rglob("*.dcm")))
    monkeypatch.setattr(query, "get_study", real_get)

    # an SCP that refuses our called AE title: a permanent A-ASSOCIATE-RJ, one try, the reason named
    scp = AE(ae_title="STRICT")
    scp.require_called_aet = True
    scp.add_supported_context(Verification)
    port = free_port()
    server = scp.start_server((LOOPBACK, port), block=False)
    try:
        caplog.clear()
        with caplog.at_level("WARNING", logger="app.batch.pacs"), pytest.raises(query.QueryError) as err:
            pacs_source(f"WRONG@{LOOPBACK}:{port}", calling_ae=CALLING_AE)._fetch(uid, tmp_path / "strict")
    finally:
        server.shutdown()
    assert not err.value.transient and not [r for r in caplog.records if r.name == "app.batch.pacs"]
    assert "rejected the association permanently" in str(err.value)
    assert "called AE title not recognised" in str(err.value)


def test_process_from_pacs_equals_hyperct_run(orthanc, studies, model_dir: Path, tmp_path: Path) -> None:
    runner = HyperCTRunner(model_dir)
    out = tmp_path / "out"
    report = run_batch(
        BatchConfig(
            output=out,
            model=model_dir,
            filters=StudyFilter(modalities=frozenset({"CT"})),
            show_progress=False,
        ),
        runner=runner,
        source=pacs_source(_node(orthanc), calling_ae=CALLING_AE),
    )
    assert report.studies_found == 2 and report.outcomes == {"processed": 2}
    rows = read_csv(out / "findings.csv")
    assert len(rows) == 2 * len(TINY_TASKS)
    for key in ("a", "b"):
        (summary,) = run_graph(studies[key], tmp_path / f"run-{key}", Pipeline(model_dir, runner=runner))
        expected = json.loads((tmp_path / f"run-{key}" / summary["files"]["results"]).read_text())
        got = {
            r["task_key"]: float(r["probability"])
            for r in rows
            if r["study_instance_uid"] == study_uid(studies[key])
        }
        assert got == {t["key"]: t["probability"] for t in expected["tasks"]}
    cache = out / "_batch" / "cache" / "pacs"
    assert not cache.exists() or not any(cache.iterdir()), "retrieved studies are removed once recorded"


def test_c_move_gives_the_same_findings_as_c_get(orthanc, studies, model_dir: Path, tmp_path: Path) -> None:
    """``--retrieve move``: Orthanc sends each study to our AE title at MOVE_PORT (its configured
    destination), where one storage SCP for the run files it under the study being retrieved."""
    runner = HyperCTRunner(model_dir)
    outs = {}
    for method in ("get", "move"):
        outs[method] = out = tmp_path / method
        source = pacs_source(
            _node(orthanc),
            calling_ae=CALLING_AE,
            retrieve=method,
            move_port=MOVE_PORT if method == "move" else None,
            move_bind=LOOPBACK,
        )
        cfg = BatchConfig(output=out, model=model_dir, workers=2, show_progress=False)
        report = run_batch(cfg, runner=runner, source=source)
        assert report.outcomes == {"processed": 2, "not-processed": 1}, (method, report.outcomes)
        assert not any((out / "_batch" / "cache" / "pacs").iterdir())
    assert (outs["move"] / "findings.csv").read_bytes() == (outs["get"] / "findings.csv").read_bytes()
    # The run's C-MOVE destination is closed: the port is free again.
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect((LOOPBACK, MOVE_PORT))


def test_c_move_to_an_ae_the_pacs_does_not_know_says_so(
    orthanc, studies, model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    source = pacs_source(
        _node(orthanc), calling_ae="STRANGER", retrieve="move", move_port=free_port(), move_bind=LOOPBACK
    )
    cfg = BatchConfig(
        output=out, model=model_dir, filters=StudyFilter(modalities=frozenset({"CT"})), show_progress=False
    )
    report = run_batch(cfg, source=source)
    assert report.outcomes == {"failed": 2}, report.outcomes
    reasons = [e["reason"] for e in read_csv(out / "errors.csv") if e["kind"] == "study"]
    assert len(reasons) == 2, reasons
    for reason in reasons:
        # Orthanc aborts a C-MOVE from an AE title it does not know (others answer 0xA801): either
        # way the reason names the C-MOVE and what to check at the PACS.
        assert "C-MOVE" in reason, reason
        assert (
            "does not know our AE title as a move destination" in reason or "does it know STRANGER" in reason
        ), reason


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--from-pacs", "PACS@127.0.0.1:104", "--retrieve", "move"], "--retrieve move needs --move-port"),
        (["--from-pacs", "PACS@127.0.0.1:104", "--retrieve", "find"], "--retrieve find: expected get or move"),
        (["--move-port", "11113"], "--retrieve and --move-port go with --from-pacs"),
        (["--from-pacs", "PACS@127.0.0.1:104", "--retrieve", "move", "--move-port", "11113", "--engine", "ray"],
         "--retrieve move needs the local engine"),
    ],
)  # fmt: skip
def test_retrieve_options_are_checked_before_work(tmp_path: Path, args: list[str], why: str) -> None:
    from typer.testing import CliRunner

    from app.cli import cli

    out = tmp_path / "out"
    archive = [] if "--from-pacs" in args else [str(tmp_path)]
    done = CliRunner().invoke(
        cli, ["process", *archive, str(out), *args], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"}
    )
    assert done.exit_code == 2 and why in done.output, done.output
    assert not out.exists()
