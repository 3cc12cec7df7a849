"""app.dimse.sender against real peers on loopback: DCMTK storescp (byte-identical datasets),
Orthanc (found over REST, unknown called AE rejected), a pynetdicom SCP with chosen statuses; plus
error classification and the retry policy."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import (
    BasicTextSRStorage,
    Comprehensive3DSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    SegmentationStorage,
    generate_uid,
)
from pynetdicom.dsutils import split_dataset

from app.dimse.network import RemoteNode
from app.dimse.sender import (
    PermanentSendError,
    RetryPolicy,
    SendReport,
    TransientSendError,
    echo,
    send_files,
)
from operators.seg_writer import write_seg
from operators.sr_writer import write_sr
from operators.text_report import write_text_sr
from tests.dicom_fixtures import CTSeries, ct_series, dciodvfy, study_result, write_series
from tests.peers import LOOPBACK, Orthanc, PyStoreSCP, StoreSCP, free_port

KEYS = ("pleural_effusion", "lung_nodule")


# --------------------------------------------------------------------------------------------------
# Data: a tiny CT series and the app's SR, SEG and Basic Text SR for it
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def series() -> CTSeries:
    return ct_series(n_slices=4, rows=24, cols=20)


@pytest.fixture(scope="module")
def ct_files(series: CTSeries, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_series(tmp_path_factory.mktemp("ct"), series.datasets)


@pytest.fixture(scope="module")
def result_files(series: CTSeries, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """[SR (TID 1500), SEG, Basic Text SR], as the application writes them."""
    out = tmp_path_factory.mktemp("results")
    result = study_result(series, {"pleural_effusion": 0.9, "lung_nodule": 0.8}, keys=KEYS)
    seg = write_seg(result, series.datasets, out)
    assert seg is not None
    return [write_sr(result, series.datasets, out), seg, write_text_sr(result, series.datasets, out)]


@pytest.fixture(scope="module")
def jpegls_file(series: CTSeries, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CT instance whose file says JPEG-LS (the fragment is not a real codestream: it never gets
    sent, the peer refuses the transfer syntax during negotiation)."""
    ds = copy.deepcopy(series.datasets[0])
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(60) + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    path = tmp_path_factory.mktemp("jls") / "CT_JLS.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _dataset_bytes(path: Path) -> bytes:
    """The encoded dataset after the file meta (the part a C-STORE carries)."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def _uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# --------------------------------------------------------------------------------------------------
# DCMTK storescp
# --------------------------------------------------------------------------------------------------


def test_send_ct_sr_seg_to_storescp_arrive_byte_identical(
    ct_files: list[Path], result_files: list[Path]
) -> None:
    files = [*ct_files, *result_files]
    with StoreSCP(ae_title="DEST") as scp:
        dest = RemoteNode("DEST", LOOPBACK, scp.port)
        assert echo(dest)
        report = send_files(dest, files, calling_ae="HYPERCT", timeout_s=10)
        received = {_uid(p): (_dataset_bytes(p), dciodvfy(p)[0]) for p in scp.files()}
    assert report.ok and report.error is None
    assert [r.path for r in report.results] == files
    assert all(r.status == 0x0000 and r.error is None for r in report.results)
    assert {r.sop_class_uid for r in report.results} == {
        CTImageStorage,
        Comprehensive3DSRStorage,
        SegmentationStorage,
        BasicTextSRStorage,
    }
    assert len(received) == len(files)
    for src in files:
        data, errors = received[_uid(src)]
        assert data == _dataset_bytes(src), src.name
        assert errors == [], src.name  # still valid objects at the destination


def test_destination_down_is_transient(ct_files: list[Path]) -> None:
    dest = RemoteNode("NOBODY", LOOPBACK, free_port())  # nothing listens
    report = send_files(dest, ct_files, timeout_s=5)
    assert isinstance(report.error, TransientSendError)
    assert report.transient and not report.ok
    assert not report.delivered and len(report.undelivered) == len(ct_files)
    assert all(r.transient and r.status is None for r in report.results)
    assert "cannot connect to NOBODY@127.0.0.1" in str(report.error)
    with pytest.raises(TransientSendError):
        report.raise_for_status()
    assert not echo(dest, timeout_s=5)


def test_refused_association_is_permanent(ct_files: list[Path]) -> None:
    with StoreSCP(ae_title="DEST", refuse=True) as scp:
        report = send_files(RemoteNode("DEST", LOOPBACK, scp.port), ct_files, timeout_s=5)
        assert not scp.files()
    assert isinstance(report.error, PermanentSendError)
    assert "rejected the association permanently (source: service user" in str(report.error)
    assert not report.transient and not report.delivered


def test_dropped_association_is_transient(ct_files: list[Path]) -> None:
    with StoreSCP(ae_title="DEST", extra_args=["--abort-during"]) as scp:
        report = send_files(RemoteNode("DEST", LOOPBACK, scp.port), ct_files, timeout_s=5)
    assert isinstance(report.error, TransientSendError)
    assert "dropped the association" in str(report.error)
    assert not report.delivered and all(r.transient for r in report.undelivered)


def test_unsupported_transfer_syntax(ct_files: list[Path], jpegls_file: Path) -> None:
    with StoreSCP(ae_title="DEST", accept_all_transfer_syntaxes=False) as scp:
        dest = RemoteNode("DEST", LOOPBACK, scp.port)
        only = send_files(dest, [jpegls_file], timeout_s=5)
        mixed = send_files(dest, [ct_files[0], jpegls_file], timeout_s=5)
    assert isinstance(only.error, PermanentSendError)
    assert "accepted none of the proposed presentation contexts" in str(only.error)
    assert isinstance(mixed.error, PermanentSendError)
    assert [r.delivered for r in mixed.results] == [True, False]
    assert "not accepted by peer" in (mixed.results[1].error or "")


def test_unreadable_file_fails_alone(ct_files: list[Path], tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    missing = tmp_path / "missing.dcm"
    with StoreSCP(ae_title="DEST") as scp:
        report = send_files(RemoteNode("DEST", LOOPBACK, scp.port), [junk, *ct_files, missing], timeout_s=5)
        assert len(scp.files()) == len(ct_files)
    assert [r.delivered for r in report.results] == [False, *[True] * len(ct_files), False]
    assert "cannot read header" in (report.results[0].error or "")
    assert isinstance(report.error, PermanentSendError)
    assert "2 of 6 files not stored" in str(report.error)


# --------------------------------------------------------------------------------------------------
# pynetdicom SCP: proposed contexts, statuses, called AE
# --------------------------------------------------------------------------------------------------


def test_proposes_exactly_what_the_files_need(ct_files: list[Path], result_files: list[Path]) -> None:
    with PyStoreSCP(ae_title="PYSCP") as scp:
        report = send_files(
            RemoteNode("PYSCP", LOOPBACK, scp.port), [ct_files[0], *result_files], calling_ae="ME"
        )
        assert report.ok, report.error
        assert scp.calling_aets == ["ME"] * 4
    (proposed,) = scp.requested_contexts  # one association
    assert sorted(proposed) == sorted(
        (sop, (ts,))
        for sop in (CTImageStorage, Comprehensive3DSRStorage, SegmentationStorage, BasicTextSRStorage)
        for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    )


@pytest.mark.parametrize(
    ("status", "error_type", "delivered"),
    [
        (0xC000, PermanentSendError, False),  # cannot understand
        (0xA900, PermanentSendError, False),  # dataset does not match SOP class
        (0xA700, TransientSendError, False),  # out of resources: may clear up
        (0xB000, type(None), True),  # coercion of data elements: stored, with a warning
    ],
)
def test_file_status_classification(
    ct_files: list[Path], status: int, error_type: type, delivered: bool
) -> None:
    with PyStoreSCP(ae_title="PYSCP", status=status) as scp:
        report = send_files(RemoteNode("PYSCP", LOOPBACK, scp.port), ct_files, timeout_s=5)
    assert isinstance(report.error, error_type)
    assert [r.status for r in report.results] == [status] * len(ct_files)
    assert all(r.delivered is delivered for r in report.results)
    assert report.ok is delivered
    assert len(report.warnings) == (len(ct_files) if status == 0xB000 else 0)
    if not delivered:
        assert f"0x{status:04X}" in str(report.error)


def test_partial_refusal_keeps_delivered_files(ct_files: list[Path]) -> None:
    refused = _uid(ct_files[1])
    with PyStoreSCP(ae_title="PYSCP", status=lambda ds: 0xC001 if ds.SOPInstanceUID == refused else 0) as scp:
        report = send_files(RemoteNode("PYSCP", LOOPBACK, scp.port), ct_files, timeout_s=5)
    assert [r.sop_instance_uid for r in report.undelivered] == [refused]
    assert len(report.delivered) == len(ct_files) - 1
    assert isinstance(report.error, PermanentSendError)
    assert f"1 of {len(ct_files)} files not stored" in str(report.error)


def test_unknown_called_ae_is_permanent(ct_files: list[Path]) -> None:
    with PyStoreSCP(ae_title="PYSCP") as scp:
        report = send_files(RemoteNode("WRONG", LOOPBACK, scp.port), ct_files, timeout_s=5)
        assert not scp.received
    assert isinstance(report.error, PermanentSendError)
    assert "rejected the association permanently" in str(report.error)
    assert "reason: called AE title not recognised" in str(report.error)
    with pytest.raises(PermanentSendError):
        report.raise_for_status()


def test_more_than_128_contexts_split_into_associations(series: CTSeries, tmp_path: Path) -> None:
    """65 SOP classes x (own TS + implicit fallback) = 130 contexts: two associations, all delivered."""
    from pynetdicom import AllStoragePresentationContexts

    classes = [cx.abstract_syntax for cx in AllStoragePresentationContexts][:65]
    paths = []
    for n, sop_class in enumerate(classes):
        ds = copy.deepcopy(series.datasets[0])
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        paths.append(tmp_path / f"{n}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    with PyStoreSCP(ae_title="PYSCP") as scp:
        report = send_files(RemoteNode("PYSCP", LOOPBACK, scp.port), paths, timeout_s=10)
    assert report.ok, report.error
    assert [len(p) for p in scp.requested_contexts] == [128, 2]
    assert len(scp.received) == 65


# --------------------------------------------------------------------------------------------------
# Orthanc
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def orthanc() -> Iterator[Orthanc]:
    with Orthanc(aet="ORTHANC") as peer:
        yield peer


def test_send_to_orthanc_found_over_rest(
    orthanc: Orthanc, series: CTSeries, ct_files: list[Path], result_files: list[Path]
) -> None:
    files = [*ct_files, *result_files]
    report: SendReport = send_files(RemoteNode("ORTHANC", *orthanc.address), files, timeout_s=10)
    assert report.ok, report.error
    (study,) = orthanc.find_by_study_uid(series.study_instance_uid)
    instances = orthanc.instances_of(study)
    stored = {i["MainDicomTags"]["SOPInstanceUID"]: i["ID"] for i in instances}
    assert set(stored) == {r.sop_instance_uid for r in report.results}
    sr = result_files[0]
    assert _dataset_bytes_of(orthanc.instance_file(stored[_uid(sr)]), sr.parent) == _dataset_bytes(sr)


def _dataset_bytes_of(data: bytes, folder: Path) -> bytes:
    tmp = folder / ".from_orthanc.dcm"
    tmp.write_bytes(data)
    try:
        return _dataset_bytes(tmp)
    finally:
        tmp.unlink()


def test_orthanc_rejects_unknown_called_ae(orthanc: Orthanc, ct_files: list[Path]) -> None:
    report = send_files(RemoteNode("NOT_ORTHANC", *orthanc.address), ct_files, timeout_s=10)
    assert isinstance(report.error, PermanentSendError)
    assert "rejected the association" in str(report.error)


# --------------------------------------------------------------------------------------------------
# Retry policy
# --------------------------------------------------------------------------------------------------


def test_retry_policy_defaults() -> None:
    policy = RetryPolicy()
    assert [policy.delay(a) for a in range(1, 10)] == [10, 20, 40, 80, 160, 320, 640, 1280, 2560]
    assert policy.delay(10) == 3600 and policy.delay(10_000) == 3600  # capped, no overflow
    assert not policy.exhausted(7) and policy.exhausted(8) and policy.exhausted(9)


def test_retry_policy_custom_and_validation() -> None:
    policy = RetryPolicy(max_attempts=3, initial_delay_s=1.5, factor=3, max_delay_s=10)
    assert [policy.delay(a) for a in (1, 2, 3, 4)] == [1.5, 4.5, 10, 10]
    assert policy.exhausted(3) and not policy.exhausted(2)
    with pytest.raises(ValueError, match="attempt is 1-based"):
        policy.delay(0)
    with pytest.raises(ValueError, match="max_attempts: must be >= 1, got 0"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="factor: must be >= 1, got 0.5"):
        RetryPolicy(factor=0.5)
    with pytest.raises(ValueError, match="jitter: must be < 1, got 1.5"):
        RetryPolicy(jitter=1.5)


def test_retry_policy_jitter_is_deterministic_with_a_seed() -> None:
    a = RetryPolicy(jitter=0.2, seed=7)
    b = RetryPolicy(jitter=0.2, seed=7)
    c = RetryPolicy(jitter=0.2, seed=8)
    delays = [a.delay(n) for n in range(1, 9)]
    assert delays == [b.delay(n) for n in range(1, 9)]
    assert delays != [c.delay(n) for n in range(1, 9)]
    plain = [RetryPolicy().delay(n) for n in range(1, 9)]
    assert delays != plain
    assert all(0.8 * p <= d <= 1.2 * p for d, p in zip(delays, plain, strict=True))
    assert RetryPolicy(jitter=0.5, seed=1, max_delay_s=100).delay(30) <= 100  # never above the cap
