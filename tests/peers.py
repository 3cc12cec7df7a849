"""Real DICOM peers on loopback for tests (no tests here): DCMTK ``storescp``/``storescu``, Orthanc,
a pynetdicom Storage SCP with controllable status/TLS, and throwaway TLS certificates.

Every peer gets free ports and a temporary folder, waits until it answers before the ``with`` body
runs, and stops cleanly afterwards. A missing binary raises FileNotFoundError (tests never skip:
``make peers`` installs DCMTK, dicom3tools and Orthanc). DCMTK-based peers run with
``TCP_NODELAY=1`` (Debian's DCMTK keeps Nagle on: ~40 ms per C-STORE otherwise; see
docs/environment.md). ``dciodvfy`` lives in :mod:`tests.dicom_fixtures`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from pydicom.dataset import Dataset

__all__ = [
    "Orthanc",
    "PyStoreSCP",
    "StoreSCP",
    "TlsFiles",
    "free_port",
    "make_tls_files",
    "require_binary",
    "storescu",
    "wait_for_port",
]

LOOPBACK = "127.0.0.1"
_P = TypeVar("_P", bound="_Peer")
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")  # Orthanc lives in sbin, off a user's PATH


def require_binary(name: str) -> str:
    """Full path of ``name`` on PATH (or an sbin folder), else a FileNotFoundError saying what to do."""
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN))
    if found is None:
        raise FileNotFoundError(
            f"{name} is not installed: run `make peers` as root (DCMTK, dicom3tools, Orthanc)"
        )
    return found


def _nodelay_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    """A TCP port free on loopback right now (the OS picks it; tiny race with other processes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, *, proc: subprocess.Popen[bytes] | None = None, timeout_s: float = 15) -> None:
    """Block until something accepts TCP connections on loopback ``port``.

    Raises RuntimeError with the process's output if ``proc`` exits first, TimeoutError otherwise.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"peer exited with {proc.returncode} before listening on {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {LOOPBACK}:{port} after {timeout_s} s")


def _stop(proc: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    """SIGTERM, wait, SIGKILL only if it does not exit (Orthanc needs ~4 s to stop)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class _Peer:
    """Context-manager plumbing: ``start()``/``stop()`` and a temp folder removed on exit."""

    def __init__(self, folder: Path | None) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if folder is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"{type(self).__name__.lower()}-")
            folder = Path(self._tmp.name)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def stop(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self: _P) -> _P:
        try:
            self.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.stop()
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()


# --------------------------------------------------------------------------------------------------
# DCMTK
# --------------------------------------------------------------------------------------------------


class StoreSCP(_Peer):
    """DCMTK ``storescp`` writing what it receives into ``folder`` (a temp folder by default).

    ``bit_preserving`` (``+B``) writes each dataset exactly as received, so a test can compare bytes.
    storescp answers to any called AE title; ``refuse=True`` makes it reject every association
    (A-ASSOCIATE-RJ, permanent) — use Orthanc or :class:`PyStoreSCP` to test called-AE checks.
    ``log`` holds storescp's output after the ``with`` block.
    """

    def __init__(
        self,
        folder: Path | None = None,
        *,
        ae_title: str = "STORESCP",
        port: int | None = None,
        bit_preserving: bool = True,
        refuse: bool = False,
        accept_all_transfer_syntaxes: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(folder)
        self.ae_title = ae_title
        self.port = port or free_port()
        self.args = [
            "-aet",
            ae_title,
            "-od",
            str(self.folder),
            *(["+B"] if bit_preserving else []),
            *(["--refuse"] if refuse else []),
            *(["+xa"] if accept_all_transfer_syntaxes else []),
            *extra_args,
        ]
        self._proc: subprocess.Popen[bytes] | None = None
        self.log = ""

    @property
    def address(self) -> tuple[str, int]:
        return LOOPBACK, self.port

    def start(self) -> None:
        exe = require_binary("storescp")
        self._logfile = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            [exe, *self.args, str(self.port)],
            env=_nodelay_env(),
            stdout=self._logfile,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, proc=self._proc)

    def stop(self) -> None:
        if self._proc is not None:
            _stop(self._proc)
            self._logfile.seek(0)
            self.log = self._logfile.read().decode(errors="replace")
            self._logfile.close()
            self._proc = None

    def files(self) -> list[Path]:
        """Received files, sorted by name (storescp names them ``<modality>.<SOPInstanceUID>``)."""
        return sorted(p for p in self.folder.rglob("*") if p.is_file())


def storescu(
    host: str,
    port: int,
    aec: str,
    paths: Iterable[Path],
    *,
    aet: str = "STORESCU",
    required_only: bool = True,
    extra_args: Sequence[str] = (),
    timeout_s: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run DCMTK ``storescu`` (one association for all ``paths``) and return the finished process.

    ``required_only`` passes ``-R`` (propose only the SOP classes the files need): without it
    storescu cannot send SEG. The caller checks ``returncode``.
    """
    exe = require_binary("storescu")
    cmd = [exe, "-aet", aet, "-aec", aec, *(["-R"] if required_only else []), *extra_args, host, str(port)]
    cmd += [str(p) for p in paths]
    return subprocess.run(cmd, env=_nodelay_env(), capture_output=True, text=True, timeout=timeout_s)


# --------------------------------------------------------------------------------------------------
# Orthanc
# --------------------------------------------------------------------------------------------------


def _modality(value: Any) -> list[Any]:
    """Orthanc's ``[AET, host, port]`` from a RemoteNode-like object or an (aet, host, port) tuple."""
    if hasattr(value, "ae_title"):
        return [value.ae_title, value.host, int(value.port)]
    aet, host, port = value
    return [aet, host, int(port)]


class Orthanc(_Peer):
    """Orthanc 1.10 in the foreground with a temporary database and free HTTP and DICOM ports.

    ``modalities`` maps Orthanc's modality names to the peers it may send to (``RemoteNode`` or
    ``(aet, host, port)``). It checks the called AE title (``DicomCheckCalledAet``), so an
    association to another AE title is rejected. Orthanc cannot bind to loopback only; stopping it
    takes ~4 s, so share one instance per module where possible.
    """

    def __init__(
        self,
        folder: Path | None = None,
        *,
        aet: str = "ORTHANC",
        modalities: Mapping[str, Any] | None = None,
        http_port: int | None = None,
        dicom_port: int | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(folder)
        self.aet = aet
        self.http_port = http_port or free_port()
        self.dicom_port = dicom_port or free_port()
        self.config: dict[str, Any] = {
            "Name": "HYPERCT-TEST",
            "StorageDirectory": "db",
            "IndexDirectory": "db",
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomModalities": {k: _modality(v) for k, v in (modalities or {}).items()},
            "Plugins": [],
            "StableAge": 1,
            **(config or {}),
        }
        self._proc: subprocess.Popen[bytes] | None = None
        self.log = ""

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def address(self) -> tuple[str, int]:
        return LOOPBACK, self.dicom_port

    def start(self) -> None:
        exe = require_binary("Orthanc")
        cfg = self.folder / "orthanc.json"  # relative paths in it resolve from its folder
        cfg.write_text(json.dumps(self.config, indent=2))
        self._logfile = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            [exe, str(cfg)],
            env=_nodelay_env(),
            stdout=self._logfile,
            stderr=subprocess.STDOUT,
            cwd=self.folder,
        )
        deadline = time.monotonic() + 30
        while True:
            if self._proc.poll() is not None:
                self._collect_log()
                raise RuntimeError(f"Orthanc exited with {self._proc.returncode}:\n{self.log[-2000:]}")
            try:
                self.get("/system")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Orthanc HTTP on {self.url} not ready after 30 s") from None
                time.sleep(0.05)
        wait_for_port(self.dicom_port, proc=self._proc)

    def _collect_log(self) -> None:
        self._logfile.seek(0)
        self.log = self._logfile.read().decode(errors="replace")

    def stop(self) -> None:
        if self._proc is not None:
            _stop(self._proc)
            self._collect_log()
            self._logfile.close()
            self._proc = None

    # REST ------------------------------------------------------------------------------------------

    def request(
        self, method: str, path: str, body: bytes | str | None = None, timeout_s: float = 60
    ) -> bytes:
        data = body.encode() if isinstance(body, str) else body
        req = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=timeout_s) as rsp:
            return rsp.read()

    def get(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def post(self, path: str, body: Any) -> Any:
        payload = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return json.loads(self.request("POST", path, payload) or b"null")

    def upload(self, path: Path) -> dict[str, Any]:
        """POST a DICOM file to ``/instances``; Orthanc's answer (``ID``, ``ParentStudy``, ``Status``)."""
        return self.post("/instances", Path(path).read_bytes())

    def studies(self) -> list[str]:
        """Orthanc IDs of all studies."""
        return list(self.get("/studies"))

    def instances_of(self, study: str) -> list[dict[str, Any]]:
        """The instances (with ``MainDicomTags``) of the study with Orthanc ID ``study``."""
        return list(self.get(f"/studies/{study}/instances"))

    def instance_file(self, instance: str) -> bytes:
        """The stored DICOM file of an instance (Orthanc ID)."""
        return self.request("GET", f"/instances/{instance}/file")

    def store_to_modality(
        self, name: str, resource: str | Sequence[str], timeout_s: float = 120
    ) -> dict[str, Any]:
        """C-STORE a resource (Orthanc ID of a study/series/instance, or several) to a modality."""
        resources = [resource] if isinstance(resource, str) else list(resource)
        body = json.dumps({"Resources": resources, "Synchronous": True})
        return json.loads(self.request("POST", f"/modalities/{name}/store", body, timeout_s=timeout_s))

    def find_by_study_uid(self, uid: str) -> list[str]:
        """Orthanc IDs of the studies whose StudyInstanceUID is ``uid`` (empty if none)."""
        return list(self.post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": uid}}))

    def delete_all(self) -> None:
        """Delete every study (Orthanc ignores a re-sent instance otherwise)."""
        for study in self.studies():
            self.request("DELETE", f"/studies/{study}")


# --------------------------------------------------------------------------------------------------
# pynetdicom Storage SCP (status, AE-title and TLS control)
# --------------------------------------------------------------------------------------------------


@dataclass
class PyStoreSCP:
    """A pynetdicom Storage + Verification SCP in a thread, for behaviour DCMTK cannot show.

    ``status`` is returned for every C-STORE (an int, or a callable of the dataset); received
    datasets are kept in ``received``. ``require_called_aet`` rejects associations addressed to
    another AE title; ``ssl_context`` turns on TLS.
    """

    ae_title: str = "PYSCP"
    port: int = 0
    status: int | Callable[[Dataset], int] = 0x0000
    require_called_aet: bool = True
    ssl_context: ssl.SSLContext | None = None
    received: list[Dataset] = field(default_factory=list)
    calling_aets: list[str] = field(default_factory=list)
    #: per association: the (abstract syntax, transfer syntaxes) the requestor proposed
    requested_contexts: list[list[tuple[str, tuple[str, ...]]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self._server: Any = None
        self._lock = threading.Lock()

    @property
    def address(self) -> tuple[str, int]:
        return LOOPBACK, self.port

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received.append(ds)
            self.calling_aets.append(str(event.assoc.requestor.ae_title))
        return self.status(ds) if callable(self.status) else self.status

    def _on_requested(self, event: Any) -> None:
        proposed = [
            (str(cx.abstract_syntax), tuple(str(ts) for ts in cx.transfer_syntax))
            for cx in event.assoc.requestor.requested_contexts
        ]
        with self._lock:
            self.requested_contexts.append(proposed)

    def __enter__(self) -> PyStoreSCP:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = self.require_called_aet
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        self._server = ae.start_server(
            (LOOPBACK, self.port),
            block=False,
            ssl_context=self.ssl_context,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_REQUESTED, self._on_requested)],
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


# --------------------------------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA and two leaf certificates it signed (server: localhost/127.0.0.1; client)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    exe = require_binary("openssl")
    out = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {out.stderr.strip()}")


def make_tls_files(folder: Path, *, days: int = 2) -> TlsFiles:
    """Generate a P-256 CA plus server and client certificates with the ``openssl`` CLI.

    Extensions follow what Python's strict X.509 verification expects (CA basicConstraints critical,
    key identifiers, SAN for the server).
    """
    folder.mkdir(parents=True, exist_ok=True)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", str(days),
        "-subj", "/CN=HyperCT Test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
        cwd=folder,
    )  # fmt: skip
    for name, cn, usage, san in (
        ("server", "localhost", "serverAuth", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"),
        ("client", "HYPERCT client", "clientAuth", ""),
    ):
        (folder / f"{name}.ext").write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyAgreement\n"
            f"extendedKeyUsage={usage}\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid,issuer\n" + san
        )
        _openssl(
            "req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=folder
        )
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", str(days), "-extfile", f"{name}.ext",
            cwd=folder,
        )  # fmt: skip
    return TlsFiles(
        ca=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
    )
