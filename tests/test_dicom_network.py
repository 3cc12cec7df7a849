"""app.dimse.network: AE/remote-node validation, TLS contexts (real handshakes against a
pynetdicom SCP with a throwaway CA) and the TCP_NODELAY patch on real associations."""

from __future__ import annotations

import re
import socket
import ssl
from pathlib import Path

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationServer, AssociationSocket

from app.dimse.network import (
    AllowedCaller,
    RemoteNode,
    TlsConfig,
    enable_tcp_nodelay,
    parse_address,
    validate_ae_title,
)
from app.dimse.sender import echo, send_files
from tests.dicom_fixtures import ct_series, write_series
from tests.peers import LOOPBACK, PyStoreSCP, TlsFiles, free_port, make_tls_files

# --------------------------------------------------------------------------------------------------
# RemoteNode / AE titles
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ae", "host", "port"),
    [
        ("PACS@pacs.hospital.example:104", "PACS", "pacs.hospital.example", 104),
        ("STORE_SCP@127.0.0.1:11112", "STORE_SCP", "127.0.0.1", 11112),
        ("A@[::1]:4242", "A", "::1", 4242),
        ("  SIXTEEN_CHARS_AE@h:65535 ", "SIXTEEN_CHARS_AE", "h", 65535),
        ("MY AE@h:1", "MY AE", "h", 1),
    ],
)
def test_parse_valid(text: str, ae: str, host: str, port: int) -> None:
    node = RemoteNode.parse(text)
    assert (node.ae_title, node.host, node.port, node.tls) == (ae, host, port, None)
    assert RemoteNode.parse(str(node)) == node  # __str__ round-trips


def test_str_and_tls() -> None:
    tls = TlsConfig(ca=Path("ca.pem"))
    node = RemoteNode.parse("PACS@[::1]:104", tls=tls)
    assert str(node) == "PACS@[::1]:104"
    assert node.tls is tls
    assert node.address == ("::1", 104)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("PACS-host:104", "no '@'"),
        ("PACS@host", "no port"),
        ("PACS@host:", "port '' is not a number"),
        ("PACS@host:abc", "port 'abc' is not a number"),
        ("PACS@host:0", "outside 1-65535"),
        ("PACS@host:65536", "outside 1-65535"),
        ("PACS@:104", "no host"),
        ("PACS@::1:104", "IPv6 hosts in brackets"),
        ("PACS@[::1]104", "IPv6 host must be written"),
        ("@host:104", "called AE title is empty"),
        ("   @host:104", "called AE title is empty"),
        ("SEVENTEEN_CHARS_A@host:104", "17 characters long; at most 16"),
        ("BAD\\AE@host:104", "backslash"),
        ("BAD\tAE@host:104", "control character"),
        ("ÄRZTE@host:104", "non-ASCII"),
    ],
)
def test_parse_errors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        RemoteNode.parse(text)


@pytest.mark.parametrize(
    ("text", "ae", "host"),
    [
        ("PACS", "PACS", None),
        (" PACS @10.0.0.5", "PACS", "10.0.0.5"),
        ("MOD@[::1]", "MOD", "::1"),
        ("A@h.example", "A", "h.example"),
    ],
)
def test_allowed_caller_uses_the_same_parser(text: str, ae: str, host: str | None) -> None:
    caller = AllowedCaller.parse(text)
    assert (caller.ae_title, caller.host) == (ae, host)
    assert AllowedCaller.parse(str(caller)) == caller
    assert caller.matches(f"{ae} ", host or "192.0.2.1") and not caller.matches("OTHER", host or "x")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("PACS@::1", "write IPv6 hosts in brackets, AE@[addr]"),
        ("PACS@host:104", "has a port: an allow-list entry is AE or AE@host"),
        ("PACS@host name", "contains spaces"),
        ("PACS@", "has no host"),
        ("SEVENTEEN_CHARS_A", "at most 16"),
        ("PACS@[::1", "IPv6 host must be written [addr]"),
    ],
)
def test_allowed_caller_errors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        AllowedCaller.parse(text)


def test_parse_address_is_the_one_parser() -> None:
    assert parse_address("PACS@[fe80::1]:104", port=True) == ("PACS", "fe80::1", 104)
    assert parse_address("PACS", port=False) == ("PACS", None, None)
    with pytest.raises(ValueError, match="host 'a b' is empty or contains spaces"):
        RemoteNode.parse("PACS@a b:104")


def test_constructor_validates_too() -> None:
    with pytest.raises(ValueError, match="port 70000 is outside"):
        RemoteNode("PACS", "host", 70000)
    with pytest.raises(ValueError, match="port must be an integer"):
        RemoteNode("PACS", "host", "104")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="host 'a b' is empty or contains spaces"):
        RemoteNode("PACS", "a b", 104)
    assert RemoteNode(" PACS ", "h", 104).ae_title == "PACS"  # spaces are not significant
    assert validate_ae_title("X" * 16) == "X" * 16


# --------------------------------------------------------------------------------------------------
# TLS contexts
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def test_server_context_settings(tls: TlsFiles) -> None:
    plain = TlsConfig(tls.server_cert, tls.server_key).server_context()
    assert plain.minimum_version == ssl.TLSVersion.TLSv1_2
    assert plain.verify_mode == ssl.CERT_NONE
    mutual = TlsConfig(tls.server_cert, tls.server_key, tls.ca, require_client_cert=True).server_context()
    assert mutual.verify_mode == ssl.CERT_REQUIRED
    assert mutual.minimum_version == ssl.TLSVersion.TLSv1_2


def test_client_context_settings(tls: TlsFiles) -> None:
    ctx = TlsConfig(tls.client_cert, tls.client_key, tls.ca).client_context()
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname is True
    assert TlsConfig(ca=tls.ca, verify_hostname=False).client_context().check_hostname is False


def test_tls_errors_name_the_file(tls: TlsFiles, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="TLS certificate is required"):
        TlsConfig(key=tls.server_key).server_context()
    with pytest.raises(ValueError, match="TLS key is required"):
        TlsConfig(certificate=tls.server_cert).server_context()
    missing = tmp_path / "nope.pem"
    with pytest.raises(FileNotFoundError, match=r"TLS certificate file not found: .*nope\.pem"):
        TlsConfig(missing, tls.server_key).server_context()
    with pytest.raises(ValueError, match="CA \\(needed to verify client certificates\\) is required"):
        TlsConfig(tls.server_cert, tls.server_key, require_client_cert=True).server_context()
    with pytest.raises(FileNotFoundError, match="TLS CA file not found"):
        TlsConfig(ca=missing).client_context()
    with pytest.raises(ValueError, match="TLS client key is missing"):
        TlsConfig(certificate=tls.client_cert, ca=tls.ca).client_context()
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ValueError, match=r"garbage\.pem .* cannot be loaded"):
        TlsConfig(garbage, tls.server_key).server_context()
    with pytest.raises(ValueError, match=r"TLS CA file .*garbage\.pem cannot be loaded"):
        TlsConfig(ca=garbage).client_context()
    wrong_key = TlsConfig(tls.server_cert, tls.client_key)  # key of another certificate
    with pytest.raises(ValueError, match=r"server\.pem and key .*client\.key cannot be loaded"):
        wrong_key.server_context()


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_series(tmp_path_factory.mktemp("ct"), ct_series(3, 16, 16).datasets)


def test_tls_send_with_mutual_auth(tls: TlsFiles, ct_files: list[Path]) -> None:
    server = TlsConfig(tls.server_cert, tls.server_key, tls.ca, require_client_cert=True)
    client = TlsConfig(tls.client_cert, tls.client_key, tls.ca)
    with PyStoreSCP(ae_title="TLSSCP", ssl_context=server.server_context()) as scp:
        node = RemoteNode("TLSSCP", LOOPBACK, scp.port, tls=client)
        assert echo(node)
        report = send_files(node, ct_files, timeout_s=10)
        assert report.ok, report.error
        assert sorted(str(ds.SOPInstanceUID) for ds in scp.received) == sorted(
            r.sop_instance_uid for r in report.results
        )


def test_tls_without_client_certificate_fails_when_required(tls: TlsFiles, ct_files: list[Path]) -> None:
    server = TlsConfig(tls.server_cert, tls.server_key, tls.ca, require_client_cert=True)
    with PyStoreSCP(ae_title="TLSSCP", ssl_context=server.server_context()) as scp:
        node = RemoteNode("TLSSCP", LOOPBACK, scp.port, tls=TlsConfig(ca=tls.ca))
        report = send_files(node, ct_files, timeout_s=5)
        assert not report.ok
        assert report.error is not None and "TLS" in str(report.error)
        assert not report.delivered and not scp.received
        assert not echo(node, timeout_s=5)


def test_tls_client_rejects_server_from_another_ca(
    tls: TlsFiles, tmp_path: Path, ct_files: list[Path]
) -> None:
    other = make_tls_files(tmp_path / "other")
    with PyStoreSCP(
        ae_title="TLSSCP", ssl_context=TlsConfig(tls.server_cert, tls.server_key).server_context()
    ) as scp:
        trusted_other = RemoteNode("TLSSCP", LOOPBACK, scp.port, tls=TlsConfig(ca=other.ca))
        assert not send_files(trusted_other, ct_files, timeout_s=5).delivered
        trusted = RemoteNode("TLSSCP", LOOPBACK, scp.port, tls=TlsConfig(ca=tls.ca))
        assert send_files(trusted, ct_files, timeout_s=5).ok  # server auth only, no client cert
        assert len(scp.received) == len(ct_files)


# --------------------------------------------------------------------------------------------------
# TCP_NODELAY
# --------------------------------------------------------------------------------------------------


def _nodelay(sock: socket.socket) -> bool:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_enable_tcp_nodelay_is_idempotent() -> None:
    enable_tcp_nodelay()
    patched = (AssociationSocket._create_socket, AssociationServer.server_bind, AssociationServer.get_request)
    enable_tcp_nodelay()
    enable_tcp_nodelay()
    assert (
        AssociationSocket._create_socket,
        AssociationServer.server_bind,
        AssociationServer.get_request,
    ) == patched
    for fn in patched:  # wrapped exactly once
        assert not hasattr(fn.__wrapped__, "__wrapped__")  # type: ignore[attr-defined]


def test_real_association_sockets_have_tcp_nodelay() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as plain:
        assert not _nodelay(plain)  # the kernel default: the checks below can fail
    enable_tcp_nodelay()
    acceptor_sockets: list[bool] = []

    def on_open(event: evt.Event) -> None:
        acceptor_sockets.append(_nodelay(event.assoc.dul.socket.socket))

    scp = AE(ae_title="ECHOSCP")
    scp.add_supported_context(Verification)
    port = free_port()
    server = scp.start_server((LOOPBACK, port), block=False, evt_handlers=[(evt.EVT_CONN_OPEN, on_open)])
    try:
        assert _nodelay(server.socket)  # listening socket
        scu = AE(ae_title="ECHOSCU")
        scu.add_requested_context(Verification)
        assoc = scu.associate(LOOPBACK, port, ae_title="ECHOSCP")
        assert assoc.is_established
        try:
            assert _nodelay(assoc.dul.socket.socket)  # requestor socket
            assert assoc.send_c_echo().Status == 0x0000
        finally:
            assoc.release()
    finally:
        server.shutdown()
    assert acceptor_sockets == [True]  # accepted socket


def test_a_response_taken_by_the_reactor_goes_back_to_the_waiting_call() -> None:
    """The pynetdicom pause race: a C-STORE-RSP the reactor takes is put back on the DIMSE queue (not
    dropped, which made the sender time out and re-send an instance the peer had stored); requests
    are still served as before."""
    import queue
    from types import SimpleNamespace

    from pynetdicom.association import Association
    from pynetdicom.dimse_primitives import C_STORE

    enable_tcp_nodelay()
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.Status = 0x0000
    assert rsp.is_valid_response and not rsp.is_valid_request
    fake = SimpleNamespace(_sent_release=False, dimse=SimpleNamespace(msg_queue=queue.Queue()))
    Association._serve_request(fake, rsp, 3)  # type: ignore[arg-type]
    assert fake.dimse.msg_queue.get_nowait() == (3, rsp)

    # Requests (and anything during release) still go to pynetdicom's own handler.
    assert Association._serve_request.__wrapped__.__module__ == "pynetdicom.association"  # type: ignore[attr-defined]
