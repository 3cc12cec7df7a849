"""DICOMweb STOW-RS receive: dicomweb-client posts a synthetic study and the node stores it exactly as
a C-STORE would (same store, durable before success, allow-list, no loops, conflicts); the response
lists each instance as PS3.18 §10.5.3 says (ReferencedSOPSequence, FailedSOPSequence with
FailureReason; 200, 202, 409), in JSON or XML; a malformed request is 400/415."""

from __future__ import annotations

import copy
import errno
import io
import json
import logging
from pathlib import Path
from xml.etree import ElementTree as ET

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from app.node.spool import DurableFs
from tests.dicom_fixtures import PATIENT_NAME, ct_series
from tests.web_fixtures import BEARER, TOKEN, call, web_node

AUTH = {"auth": {"token": TOKEN}}
BOUNDARY = "hyperct-test-boundary"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _multipart(parts: list[bytes], kinds: list[str] | None = None) -> bytes:
    out = b""
    for n, data in enumerate(parts):
        kind = (kinds or [])[n] if kinds and n < len(kinds) else "application/dicom"
        out += f"--{BOUNDARY}\r\nContent-Type: {kind}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def _post(url: str, body: bytes, *, path: str = "/dicomweb/studies", accept: str = "application/dicom+json",
          content_type: str = CONTENT_TYPE):  # type: ignore[no-untyped-def]  # fmt: skip
    return call(url, "POST", path, body=body,
                headers={"Authorization": BEARER, "Content-Type": content_type, "Accept": accept})  # fmt: skip


def _client(url: str) -> DICOMwebClient:
    return DICOMwebClient(url=f"{url}/dicomweb", headers={"Authorization": BEARER})


def _uids(seq: list[dict]) -> list[str]:
    return [item["00081155"]["Value"][0] for item in seq]


def test_dicomweb_client_stores_a_study_as_c_store_would(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    series = ct_series(12, seed=1)
    caplog.set_level(logging.DEBUG)
    with web_node(tmp_path, settings=AUTH) as node:
        response = _client(node.url).store_instances(series.datasets)
        refs = [str(item.ReferencedSOPInstanceUID) for item in response.ReferencedSOPSequence]
        assert sorted(refs) == sorted(series.by_uid())
        assert "FailedSOPSequence" not in response
        rows = node.store.db.query("SELECT * FROM instances ORDER BY sop_uid")
        assert len(rows) == 12 and {r["calling_ae"] for r in rows} == {"DICOMWEB"}
        assert all(r["triggers"] == 1 and r["own_output"] == 0 for r in rows)  # CT: it will be processed
        study = node.store.studies.get(series.study_instance_uid)
        assert study["state"] == "receiving" and study["trigger_count"] == 12
        for r in rows:  # stored as sent, the file is the spool's
            stored = pydicom.dcmread(tmp_path / "spool" / r["path"])
            assert stored.SOPInstanceUID == r["sop_uid"] and stored.PatientName == PATIENT_NAME
        # the same instances again: duplicates, success, nothing changes
        again = _client(node.url).store_instances(series.datasets[:3], study_instance_uid=series.study_instance_uid)
        assert len(again.ReferencedSOPSequence) == 3
        assert node.store.counts()["duplicates"] == 3
        assert node.handle.counters["instances_received"] == 15
    assert PATIENT_NAME not in caplog.text and str(PATIENT_NAME) not in caplog.text
    assert "STOW-RS from DICOMWEB: 12 stored, 0 failed" in caplog.text


def test_each_instance_is_answered_on_its_own(tmp_path: Path) -> None:
    series = ct_series(3, seed=2)
    good = [_bytes(ds) for ds in series.datasets]
    plan = copy.deepcopy(series.datasets[0])
    plan.SOPClassUID = plan.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.5"  # RT Plan: not ours
    plan.SOPInstanceUID = plan.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    mpeg = copy.deepcopy(series.datasets[1])
    mpeg.SOPInstanceUID = mpeg.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    del mpeg.PixelData
    mpeg.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: a syntax the receiver does not take
    mpeg_bytes = _bytes(mpeg)
    other_study = copy.deepcopy(series.datasets[2])
    other_study.StudyInstanceUID = generate_uid()  # the SOP Instance UID of an instance stored before
    with web_node(tmp_path, settings=AUTH) as node:
        first = _post(node.url, _multipart(good[:2]))
        assert first.status == 200 and first.headers["content-type"] == "application/dicom+json"
        reply = _post(node.url, _multipart([good[2], _bytes(plan), mpeg_bytes, b"not DICOM at all", _bytes(other_study)]))
        assert reply.status == 202, reply.text  # some stored, some not
        body = json.loads(reply.body)
        assert _uids(body["00081199"]["Value"]) == [str(series.datasets[2].SOPInstanceUID)]
        failed = {(item.get("00081155", {}).get("Value", [""])[0]): item["00081197"]["Value"][0]
                  for item in body["00081198"]["Value"]}  # fmt: skip
        assert failed == {
            str(plan.SOPInstanceUID): 0x0122,  # SOP class not supported
            str(mpeg.SOPInstanceUID): 0xC122,  # transfer syntax not supported
            "": 0xC210,  # cannot understand
        } | {str(other_study.SOPInstanceUID): 0xC212}  # the UID belongs to another study: refused, first kept
        assert node.store.counts()["instances"] == 3
        assert node.handle.counters["instances_failed"] == 4
        # all failed: 409; XML when asked for
        none = _post(node.url, _multipart([b"junk"]), accept="application/dicom+xml")
        assert none.status == 409 and none.headers["content-type"] == "application/dicom+xml"
        root = ET.fromstring(none.body)
        reason = root.find("./DicomAttribute[@keyword='FailedSOPSequence']/Item/DicomAttribute[@tag='00081197']/Value")
        assert reason is not None and reason.text == str(0xC210)
        # a study in the URL that the instance does not belong to
        wrong = _post(node.url, _multipart([_bytes(series.datasets[0])]), path=f"/dicomweb/studies/{generate_uid()}")
        assert wrong.status == 409 and json.loads(wrong.body)["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]


def test_malformed_requests_are_400_or_415(tmp_path: Path) -> None:
    part = _bytes(ct_series(1, seed=3).datasets[0])
    with web_node(tmp_path, settings=AUTH) as node:
        assert _post(node.url, part, content_type="application/dicom").status == 415
        assert _post(node.url, _multipart([part]),
                     content_type=f'multipart/related; type="application/dicom+xml"; boundary={BOUNDARY}').status == 415  # fmt: skip
        assert _post(node.url, _multipart([part]), content_type='multipart/related; type="application/dicom"').status == 400
        assert _post(node.url, _multipart([part])[:-20]).status == 400  # the closing boundary never came
        assert _post(node.url, f"--{BOUNDARY}--\r\n".encode()).status == 400  # no instance
        assert node.store.counts()["instances"] == 0


class _FailingFs(DurableFs):
    """A disk that fails the flush of the file: nothing may be acknowledged."""

    def __init__(self) -> None:
        self.steps: list[str] = []

    def fsync_file(self, fd: int) -> None:
        self.steps.append("fsync(file)")
        raise OSError(errno.EIO, "injected: I/O error")


class _SpyFs(DurableFs):
    def __init__(self) -> None:
        self.steps: list[str] = []

    def fsync_file(self, fd: int) -> None:
        self.steps.append("fsync(file)")
        super().fsync_file(fd)

    def fsync_dir(self, path: Path) -> None:
        self.steps.append("fsync(dir)")
        super().fsync_dir(path)


def test_durable_before_success_and_a_failed_flush_is_never_success(tmp_path: Path) -> None:
    series = ct_series(2, seed=4)
    spy = _SpyFs()
    with web_node(tmp_path / "ok", settings=AUTH, fs=spy) as node:
        assert _post(node.url, _multipart([_bytes(ds) for ds in series.datasets])).status == 200
        assert spy.steps.count("fsync(file)") == 2 and "fsync(dir)" in spy.steps  # before the answer
    failing = _FailingFs()
    with web_node(tmp_path / "broken", settings=AUTH, fs=failing) as node:
        reply = _post(node.url, _multipart([_bytes(series.datasets[0])]))
        assert reply.status == 409
        assert json.loads(reply.body)["00081198"]["Value"][0]["00081197"]["Value"] == [0xA700]
        assert node.store.counts()["instances"] == 0 and failing.steps == ["fsync(file)"]
        assert not list((tmp_path / "broken" / "spool").rglob("*.dcm"))


def test_the_c_store_allow_list_applies(tmp_path: Path) -> None:
    part = _multipart([_bytes(ct_series(1, seed=5).datasets[0])])
    with web_node(tmp_path / "a", settings=AUTH, allowed=("PACS",)) as node:
        reply = _post(node.url, part)
        assert reply.status == 403 and "DICOMWEB" in reply.text
        assert node.handle.counters["associations_rejected"] == 1 and node.store.counts()["instances"] == 0
        with pytest.raises(requests.HTTPError):
            _client(node.url).store_instances(ct_series(1, seed=6).datasets)
    with web_node(tmp_path / "b", settings=AUTH, allowed=("DICOMWEB@10.9.8.7",)) as node:
        assert _post(node.url, part).status == 403  # the right AE from another host
    with web_node(tmp_path / "c", settings={**AUTH, "stow-calling-ae": "WEBPACS"}, allowed=("WEBPACS@127.0.0.1",)) as node:
        assert _post(node.url, part).status == 200
        assert {r["calling_ae"] for r in node.store.db.query("SELECT calling_ae FROM instances")} == {"WEBPACS"}


@pytest.mark.peers
def test_orthanc_dicomweb_plugin_sends_a_study_to_the_node(tmp_path: Path) -> None:
    """Orthanc's DICOMweb plugin (Debian orthanc-dicomweb, `make test-peers`) as the STOW-RS client:
    a PACS pushing a study over DICOMweb, with a bearer token."""
    from tests.peers import Orthanc
    from tests.viewer_server import orthanc_dicomweb_config

    series = ct_series(6, seed=7)
    folder = tmp_path / "series"
    folder.mkdir()
    for n, ds in enumerate(series.datasets):
        ds.save_as(folder / f"{n}.dcm", enforce_file_format=True)
    with web_node(tmp_path / "node", settings=AUTH) as node:
        config = orthanc_dicomweb_config()
        config["DicomWeb"]["Servers"] = {
            "hyperct": {"Url": f"{node.url}/dicomweb/", "HttpHeaders": {"Authorization": BEARER}}
        }
        with Orthanc(tmp_path / "orthanc", config=config) as orthanc:
            for path in sorted(folder.iterdir()):
                orthanc.upload(path)
            (study,) = orthanc.studies()
            answer = orthanc.post("/dicom-web/servers/hyperct/stow", {"Resources": [study], "Synchronous": True})
            assert answer is None or "error" not in json.dumps(answer).lower(), answer
        rows = node.store.db.query("SELECT sop_uid, calling_ae FROM instances")
        assert sorted(r["sop_uid"] for r in rows) == sorted(series.by_uid())
        assert {r["calling_ae"] for r in rows} == {"DICOMWEB"}
