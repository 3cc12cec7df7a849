"""DICOM networking building blocks shared by the node, batch processing and the sender.

- :func:`enable_tcp_nodelay`: the one process-wide patch that turns Nagle's algorithm off on every
  socket pynetdicom creates (it never does so itself; against DCMTK-based peers each C-STORE then
  stalls ~40 ms on the delayed ACK: 23 s instead of 4 s for a 300-slice series).
- :class:`TlsConfig`: DICOM TLS (certificate, key, CA, optional mutual authentication) as
  :class:`ssl.SSLContext` objects for pynetdicom's ``ssl_context`` / ``tls_args``.
- :class:`RemoteNode`: a peer AE (``AE@host:port``), and :class:`AllowedCaller`, an allow-list entry
  (``AE`` or ``AE@host``): the one address syntax of the node file, the CLI (``--destination``,
  ``--allow``, ``--from-pacs``, ``--send-to``) and the sender, read by one parser
  (:func:`parse_address`) and validated once, where it is configured. IPv6 hosts are written in
  brackets (``PACS@[::1]:104``); ``PACS@::1:104`` is refused, not guessed at. Both are pydantic
  field types: a configuration holds the parsed values and prints them back as text.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, cast

from pydantic import AfterValidator

from operators.settings import Settings

LOGGER = logging.getLogger(__name__)

__all__ = [
    "AETitle",
    "AllowedCaller",
    "RemoteNode",
    "TlsConfig",
    "enable_tcp_nodelay",
    "parse_address",
    "set_tcp_nodelay",
    "validate_ae_title",
]

_NODELAY_LOCK = threading.Lock()
_NODELAY_MARK = "_hyperct_tcp_nodelay"


def set_tcp_nodelay(sock: socket.socket | None) -> None:
    """Disable Nagle's algorithm on a TCP socket (a no-op for None and other socket kinds)."""
    if (
        sock is not None
        and sock.family in (socket.AF_INET, socket.AF_INET6)
        and sock.type == socket.SOCK_STREAM
    ):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def enable_tcp_nodelay() -> None:
    """Make pynetdicom set ``TCP_NODELAY`` on every socket it creates, as requestor and acceptor.

    pynetdicom has no socket-options hook, so three methods are wrapped (once per process; calling
    this again does nothing):

    - ``AssociationSocket._create_socket``: the requestor's socket (``AE.associate``), set before
      ``connect`` so the TLS handshake and the A-ASSOCIATE-RQ already go out without delay;
    - ``AssociationServer.server_bind``: the listening socket (Linux copies the option to accepted
      sockets, so the server-side TLS handshake is covered too);
    - ``AssociationServer.get_request``: every accepted socket explicitly, for platforms that do not
      inherit the option.

    A DIMSE message is written as several small PDVs; with Nagle on, the last segment waits for the
    peer's delayed ACK (~40 ms) on every C-STORE. See docs/environment.md ("TCP_NODELAY").

    The same call installs the one other pynetdicom patch, :func:`_return_stolen_responses`, so every
    place that sets up pynetdicom (receiver, sender, query) gets both.
    """
    from pynetdicom.transport import AddressInformation, AssociationServer, AssociationSocket

    with _NODELAY_LOCK:
        if getattr(AssociationSocket._create_socket, _NODELAY_MARK, False):
            return

        create_socket = AssociationSocket._create_socket
        server_bind = AssociationServer.server_bind
        get_request = AssociationServer.get_request

        def _create_socket(self: AssociationSocket, address: AddressInformation) -> socket.socket:
            sock = create_socket(self, address)
            set_tcp_nodelay(sock)
            return sock

        def _server_bind(self: AssociationServer) -> None:
            set_tcp_nodelay(self.socket)
            server_bind(self)

        def _get_request(self: AssociationServer) -> tuple[socket.socket, tuple[str, int]]:
            client_socket, address = get_request(self)
            set_tcp_nodelay(client_socket)
            return client_socket, address

        wrappers: list[tuple[Any, Any]] = [
            (_create_socket, create_socket),
            (_server_bind, server_bind),
            (_get_request, get_request),
        ]
        for wrapper, original in wrappers:
            wrapper.__doc__ = original.__doc__
            wrapper.__wrapped__ = original
            setattr(wrapper, _NODELAY_MARK, True)
        AssociationSocket._create_socket = _create_socket  # type: ignore[method-assign]
        AssociationServer.server_bind = _server_bind  # type: ignore[method-assign]
        AssociationServer.get_request = _get_request  # type: ignore[method-assign]
        LOGGER.debug("pynetdicom sockets now set TCP_NODELAY")
    _return_stolen_responses()


_STOLEN_MARK = "_hyperct_returns_responses"


def _return_stolen_responses() -> None:
    """Hand a DIMSE response that pynetdicom's association reactor took back to the waiting call.

    pynetdicom 3.0 pauses its reactor thread around each ``send_c_store``/``send_c_find``/... with a
    flag the sender polls (``_is_paused``) that can still read True from the reactor's previous pause
    while the reactor is already past its checkpoint. The reactor then takes the response off the
    DIMSE queue, logs "Received unexpected C-STORE service message" and drops it; the sender waits
    for the DIMSE timeout, aborts, and the outbox re-sends an instance the peer had stored (seen under
    CPU load with three concurrent studies; pynetdicom issue 875 reports the same for C-FIND). The
    reactor only serves requests, so a response it gets is always some ``send_*`` call's: put it back
    on the queue, where that call is blocked waiting for it. Installed with the TCP_NODELAY patch.
    """
    from pynetdicom.association import Association

    serve_request = Association._serve_request
    if getattr(serve_request, _STOLEN_MARK, False):
        return

    def _serve_request(self: Association, msg: Any, context_id: int) -> None:
        if not msg.is_valid_request and not self._sent_release and msg.is_valid_response:
            self.dimse.msg_queue.put((context_id, msg))
            return
        serve_request(self, msg, context_id)

    _serve_request.__doc__ = serve_request.__doc__
    _serve_request.__wrapped__ = serve_request  # type: ignore[attr-defined]
    setattr(_serve_request, _STOLEN_MARK, True)
    Association._serve_request = _serve_request  # type: ignore[method-assign]


# --------------------------------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------------------------------


def _readable(path: Path | None, what: str) -> Path:
    if path is None:
        raise ValueError(f"TLS {what} is required but not configured")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TLS {what} file not found: {path}")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"TLS {what} file is not readable: {path}")
    return path


class TlsConfig(Settings):
    """DICOM TLS settings (PS3.15 Annex B): our certificate and key, the CA that signs peers.

    ``require_client_cert`` makes the server demand and verify a client certificate (mutual
    authentication). ``verify_hostname`` checks the server certificate against the host we connect
    to; turn it off only where hospital certificates do not name the host. The node file's
    ``receiver.tls`` and ``outbox.tls`` sections are this model.
    """

    section: ClassVar[str] = "tls"

    certificate: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    require_client_cert: bool = False
    verify_hostname: bool = True

    @property
    def configured(self) -> bool:
        """Anything to do: our certificate and key, or a CA to verify peers with."""
        return bool((self.certificate and self.key) or self.ca)

    def server_context(self) -> ssl.SSLContext:
        """Context for an SCP (``AE.start_server(..., ssl_context=...)``)."""
        cert = _readable(self.certificate, "certificate")
        key = _readable(self.key, "key")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load_cert_chain(ctx, cert, key)
        if self.require_client_cert:
            self._load_ca(ctx, _readable(self.ca, "CA (needed to verify client certificates)"))
            ctx.verify_mode = ssl.CERT_REQUIRED
        elif self.ca is not None:
            self._load_ca(ctx, _readable(self.ca, "CA"))
            ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """Context for an SCU (``AE.associate(..., tls_args=(context, hostname))``).

        The server is always verified: against ``ca`` if given, else the system trust store. Our
        certificate and key are presented when both are configured (mutual authentication).
        """
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = self.verify_hostname
        ctx.verify_mode = ssl.CERT_REQUIRED
        if self.ca is not None:
            self._load_ca(ctx, _readable(self.ca, "CA"))
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if (self.certificate is None) != (self.key is None):
            missing = "key" if self.key is None else "certificate"
            raise ValueError(f"TLS client {missing} is missing: give both certificate and key, or neither")
        if self.certificate is not None:
            self._load_cert_chain(ctx, _readable(self.certificate, "certificate"), _readable(self.key, "key"))
        return ctx

    @staticmethod
    def _load_cert_chain(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
        try:
            ctx.load_cert_chain(certfile=os.fspath(cert), keyfile=os.fspath(key))
        except ssl.SSLError as exc:
            raise ValueError(f"TLS certificate {cert} and key {key} cannot be loaded: {exc}") from exc

    @staticmethod
    def _load_ca(ctx: ssl.SSLContext, ca: Path) -> None:
        try:
            ctx.load_verify_locations(cafile=os.fspath(ca))
        except ssl.SSLError as exc:
            raise ValueError(f"TLS CA file {ca} cannot be loaded: {exc}") from exc


# --------------------------------------------------------------------------------------------------
# Remote nodes
# --------------------------------------------------------------------------------------------------

_AE_FORBIDDEN = re.compile(r"[\\\x00-\x1f\x7f]")


def validate_ae_title(ae_title: str, what: str = "AE title") -> str:
    """Return ``ae_title`` without its non-significant leading/trailing spaces, or raise ValueError.

    PS3.5 AE (Application Entity): 1-16 characters of the default repertoire, no backslash, no
    control characters, not only spaces.
    """
    if not isinstance(ae_title, str):
        raise ValueError(f"{what} must be a string, not {type(ae_title).__name__}")
    value = ae_title.strip(" ")
    if not value:
        raise ValueError(f"{what} is empty")
    if len(value) > 16:
        raise ValueError(f"{what} {value!r} is {len(value)} characters long; at most 16 are allowed")
    if _AE_FORBIDDEN.search(value):
        raise ValueError(f"{what} {value!r} contains a backslash or a control character")
    if not value.isascii():
        raise ValueError(f"{what} {value!r} contains non-ASCII characters")
    return value


#: An AE title field of a configuration: validated (and stripped) by :func:`validate_ae_title`.
AETitle = Annotated[str, AfterValidator(validate_ae_title)]


def _validate_port(port: object, what: str = "port") -> int:
    if isinstance(port, bool) or not isinstance(port, int):
        raise ValueError(f"{what} must be an integer, not {port!r}")
    if not 1 <= port <= 65535:
        raise ValueError(f"{what} {port} is outside 1-65535")
    return port


def _validate_host(host: object, what: str = "host") -> str:
    if not isinstance(host, str) or not host.strip() or any(c.isspace() for c in host):
        raise ValueError(f"{what} {host!r} is empty or contains spaces")
    return host


def parse_address(text: str, *, port: bool) -> tuple[str, str | None, int | None]:
    """``AE@host:port`` (``port=True``) or ``AE`` / ``AE@host`` (``port=False``) → (AE, host, port).

    The one parser of peer addresses. IPv6 hosts go in brackets (``AE@[::1]:104``, ``AE@[::1]``);
    an unbracketed one is refused because ``AE@::1:104`` cannot be told from a port. Values are
    checked by :class:`RemoteNode` / :class:`AllowedCaller`; raises ValueError saying what is wrong.
    """
    what = "remote node" if port else "allowed caller"
    form = "AE@host:port" if port else "AE or AE@host"
    if not isinstance(text, str):
        raise ValueError(f"{what} must be text of the form {form}, not {text!r}")
    ae, sep, address = text.strip().rpartition("@")
    if not sep:
        if port:
            raise ValueError(f"{what} {text!r} is not of the form {form} (no '@')")
        return text, None, None
    port_text = ""
    if address.startswith("["):
        host, close, rest = address[1:].partition("]")
        if not close or (port and not rest.startswith(":")) or (not port and rest):
            raise ValueError(f"{what} {text!r}: IPv6 host must be written [addr]{':port' if port else ''}")
        port_text = rest[1:]
    elif port:
        host, sep, port_text = address.rpartition(":")
        if not sep:
            raise ValueError(f"{what} {text!r} has no port (expected {form})")
        if ":" in host:
            raise ValueError(f"{what} {text!r}: write IPv6 hosts in brackets, AE@[addr]:port")
    else:
        host = address
        if ":" in host:
            head, _, tail = host.rpartition(":")
            if tail.isdigit() and ":" not in head:
                raise ValueError(f"{what} {text!r} has a port: an allow-list entry is {form}")
            raise ValueError(f"{what} {text!r}: write IPv6 hosts in brackets, AE@[addr]")
    if not host:
        raise ValueError(f"{what} {text!r} has no host (expected {form})")
    if not port:
        return ae, host, None
    if not port_text.isdigit():
        raise ValueError(f"{what} {text!r}: port {port_text!r} is not a number")
    return ae, host, int(port_text)


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _text_schema(cls: Any, parse: Any) -> Any:
    """Pydantic schema of an address type: parsed from text (or taken as is), written back as text."""
    from pydantic_core import core_schema

    def validate(value: Any) -> Any:
        return value if isinstance(value, cls) else parse(value)

    return core_schema.no_info_plain_validator_function(
        validate, serialization=core_schema.to_string_ser_schema()
    )


@dataclass(frozen=True)
class RemoteNode:
    """A peer Application Entity: AE title, host, port and optional TLS."""

    ae_title: str
    host: str
    port: int
    tls: TlsConfig | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", validate_ae_title(self.ae_title, "called AE title"))
        _validate_host(self.host)
        _validate_port(self.port)

    @classmethod
    def parse(cls, text: str, tls: TlsConfig | None = None) -> RemoteNode:
        """Parse ``AE@host:port`` (IPv6 hosts in brackets: ``AE@[::1]:104``)."""
        ae, host, port = parse_address(text, port=True)
        try:
            return cls(ae_title=ae, host=host or "", port=port or 0, tls=tls)
        except ValueError as exc:
            raise ValueError(f"remote node {text!r}: {exc}") from None

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        return _text_schema(cls, cls.parse)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def __str__(self) -> str:
        return f"{self.ae_title}@{_format_host(self.host)}:{self.port}"  # round-trips through parse()


def tls_args(node: RemoteNode) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for a requestor: the client context and the name the server
    certificate must match (None where the node's TLS settings skip the hostname check)."""
    if node.tls is None:
        return None
    hostname = node.host if node.tls.verify_hostname else None
    return node.tls.client_context(), cast(str, hostname)


@dataclass(frozen=True)
class AllowedCaller:
    """One allow-list entry: ``AE`` (from any host) or ``AE@host`` (that host only)."""

    ae_title: str
    host: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", validate_ae_title(self.ae_title, "allowed calling AE title"))
        if self.host is not None:
            _validate_host(self.host)

    @classmethod
    def parse(cls, text: str) -> AllowedCaller:
        ae, host, _ = parse_address(text, port=False)
        try:
            return cls(ae, host)
        except ValueError as exc:
            raise ValueError(f"allowed caller {text!r}: {exc}") from None

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        return _text_schema(cls, cls.parse)

    def matches(self, ae_title: str, host: str) -> bool:
        return ae_title.strip() == self.ae_title and (self.host is None or self.host == host)

    def __str__(self) -> str:
        return self.ae_title if self.host is None else f"{self.ae_title}@{_format_host(self.host)}"
