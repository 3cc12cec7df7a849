"""``hyperct process --send-stowrs URL``: results go to a DICOMweb server by STOW-RS through the same
outbox as C-STORE (once, retried, resumed by a rerun), and each answer of the server is read the way
PS3.18 means it (200, 202 with FailedSOPSequence, 409, 4xx, 5xx)."""

from __future__ import annotations

import http.server
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from typer.testing import CliRunner

from app.batch.runner import BatchConfig, run_batch
from app.batch.send import SendConfig
from app.cli import cli
from app.dimse.sender import RetryPolicy
from app.stowrs import check_stowrs_url, stow_files
from operators.model_runner import HyperCTRunner
from operators.study_case import dicom_file_keys
from tests.batch_fixtures import read_csv, study_dir
from tests.peers import Orthanc, free_port
from tests.viewer_server import DICOMWEB_ROOT, orthanc_dicomweb_config

ROOT_PATH = DICOMWEB_ROOT.rstrip("/")


@pytest.fixture(scope="module")
def runner(model_dir: Path) -> HyperCTRunner:
    return HyperCTRunner(model_dir)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two short eligible studies of two patients."""
    arch = tmp_path_factory.mktemp("archive")
    for i in range(2):
        study_dir(arch / f"s{i}", 60 + i, slices=60)
    return arch


def _results(out: Path) -> dict[str, str]:
    """SOP Instance UID -> StudyInstanceUID of every DICOM result the run wrote."""
    found = {}
    for results in out.glob("*/results.json"):
        files = json.loads(results.read_text())["outputs"]["files"]
        for key in dicom_file_keys(files):
            ds = pydicom.dcmread(out / files[key], stop_before_pixels=True)
            found[str(ds.SOPInstanceUID)] = str(ds.StudyInstanceUID)
    return found


def _stored(orthanc: Orthanc) -> dict[str, str]:
    """SOP Instance UID -> StudyInstanceUID of everything Orthanc holds."""
    held = {}
    for instance in orthanc.get("/instances?expand"):
        tags = orthanc.get(f"/instances/{instance['ID']}/simplified-tags")
        held[tags["SOPInstanceUID"]] = tags["StudyInstanceUID"]
    return held


@pytest.mark.peers
def test_down_then_up_each_result_stored_once_with_its_study(
    tmp_path: Path, archive: Path, model_dir: Path, runner: HyperCTRunner
) -> None:
    """The server is down for the first run (sends stay pending, nothing is lost); the rerun, with
    Orthanc's DICOMweb plugin up at that URL, stores every result once and recomputes nothing; a
    third run sends nothing again."""
    port = free_port()
    url = f"http://127.0.0.1:{port}{ROOT_PATH}"
    out = tmp_path / "out"
    send = SendConfig(
        destinations=(url,), retry=RetryPolicy(max_attempts=50, initial_delay_s=0.2), poll_interval_s=0.2,
        wait_s=1.0,
    )  # fmt: skip
    cfg = BatchConfig(output=out, model=model_dir, archive=archive, show_progress=False, send=send)
    first = run_batch(cfg, runner=runner)
    assert first.outcomes == {"processed": 2}
    expected = _results(out)
    assert first.sends == {"pending": len(expected)}, first.sends
    assert {r["state"] for r in read_csv(out / "sends.csv")} == {"pending"}
    assert all("cannot reach" in r["last_error"] for r in read_csv(out / "sends.csv"))

    with Orthanc(tmp_path / "orthanc", http_port=port, config=orthanc_dicomweb_config()) as orthanc:
        again = run_batch(cfg, runner=runner)
        assert again.already_done == 2 and not again.outcomes
        assert again.sends == {"sent": len(expected)}, again.sends
        assert _stored(orthanc) == expected  # every result, in the study it belongs to
        assert len(orthanc.get("/instances")) == len(expected)  # each once
        third = run_batch(cfg, runner=runner)
        assert third.sends == {"sent": len(expected)}
        assert len(orthanc.get("/instances")) == len(expected)
    sends = read_csv(out / "sends.csv")
    assert {(r["sop_instance_uid"], r["state"], r["destination"]) for r in sends} == {
        (sop, "sent", url) for sop in expected
    }
    assert min(int(r["attempts"]) for r in sends) >= 2  # the failed tries are on record


# -- each answer of a STOW-RS server -------------------------------------------------------------------


class _Server(http.server.ThreadingHTTPServer):
    answer: tuple[int, dict[str, Any] | None] = (200, None)
    bodies: list[bytes]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.server.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        status, body = self.server.answer
        payload = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.bodies = []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three small DICOM files (CT slices stand in for results: the sender reads headers only)."""
    folder = study_dir(tmp_path_factory.mktemp("stow") / "s", 70, slices=50)
    return sorted(folder.rglob("*.dcm"))[:3]


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _ref(uid: str, reason: int | None = None, tag: str = "00081197") -> dict[str, Any]:
    item: dict[str, Any] = {"00081155": {"vr": "UI", "Value": [uid]}}
    if reason is not None:
        item[tag] = {"vr": "US", "Value": [reason]}
    return item


def test_200_stores_all_and_the_files_go_out_unchanged(server: _Server, files: list[Path]) -> None:
    url = f"http://127.0.0.1:{server.server_port}/dicom-web"
    report = stow_files(url, files)
    assert report.ok and len(report.delivered) == 3
    (body,) = server.bodies
    for path in files:  # the bytes we wrote, not a re-encoding
        assert path.read_bytes() in body


def test_202_failed_instances_are_told_apart(server: _Server, files: list[Path]) -> None:
    a, b, c = (_uid(p) for p in files)
    server.answer = (202, {
        "00081198": {"vr": "SQ", "Value": [_ref(b, 0xA700), _ref(c, 0xC000)]},
        "00081199": {"vr": "SQ", "Value": [_ref(a, 0xB000, "00081196")]},
    })  # fmt: skip
    report = stow_files(f"http://127.0.0.1:{server.server_port}/dicom-web", files)
    ra, rb, rc = report.results
    assert ra.delivered and ra.category == "Warning"
    assert not rb.delivered and rb.transient and "0xA700" in (rb.error or "")  # out of resources
    assert not rc.delivered and not rc.transient and "0xC000" in (rc.error or "")
    assert report.transient  # one of them may still go through


@pytest.mark.parametrize(
    ("status", "transient"), [(409, False), (400, False), (415, False), (503, True), (429, True)]
)
def test_http_errors_are_transient_or_permanent(
    server: _Server, files: list[Path], status: int, transient: bool
) -> None:
    server.answer = (status, None)
    report = stow_files(f"http://127.0.0.1:{server.server_port}/dicom-web", files)
    assert not report.delivered
    assert all(r.transient is transient and f"HTTP {status}" in (r.error or "") for r in report.results)
    assert report.transient is transient


def test_nothing_listening_is_transient(files: list[Path]) -> None:
    report = stow_files(f"http://127.0.0.1:{free_port()}/dicom-web", files)
    assert report.transient and all("cannot reach" in (r.error or "") for r in report.results)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://pacs/dicom-web", "expected an http(s):// URL"),
        ("http://user:secret@pacs/dicom-web", "credentials in the URL"),
        ("http://pacs/dicom-web?x=1", "no query"),
    ],
)
def test_bad_urls_are_refused_before_work(tmp_path: Path, url: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        check_stowrs_url(url)
    args = ["process", str(tmp_path), str(tmp_path / "out"), "--send-stowrs", url]
    done = CliRunner().invoke(cli, args, env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert done.exit_code == 2 and why in done.output, done.output
    assert "secret" not in done.output
    assert not (tmp_path / "out").exists()
