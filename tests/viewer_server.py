"""OHIF v3 served on loopback against Orthanc's DICOMweb plugin, for ``tests/test_viewer_ohif.py``
(no tests here; ``make viewer-setup`` installs what it needs, see ``viewer/README.md``).

:class:`ViewerServer` is a small HTTP server on a free loopback port that serves the prebuilt OHIF
app (``viewer/node_modules/@ohif/app/dist``) with our ``viewer/app-config.js`` in place of its
default one, and forwards ``/dicom-web/...`` to Orthanc's DICOMweb root. One origin for the app and
the data: Orthanc 1.10 sends no CORS headers, so a browser would refuse OHIF's cross-origin DICOMweb
calls. The ``Host`` header is forwarded unchanged, so the BulkDataURIs the DICOMweb plugin writes into
metadata point back at this server. Every request that fails (status >= 400) is kept in ``failures``.

:func:`orthanc_dicomweb_config` is the Orthanc configuration fragment that loads the Debian
``orthanc-dicomweb`` plugin (``tests.peers.Orthanc(config=...)``). Missing pieces raise
FileNotFoundError naming the command that installs them: the viewer test never skips.
"""

from __future__ import annotations

import http.client
import mimetypes
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from tests.peers import LOOPBACK, free_port

ROOT = Path(__file__).resolve().parents[1]
VIEWER = ROOT / "viewer"
OHIF_DIST = VIEWER / "node_modules" / "@ohif" / "app" / "dist"
APP_CONFIG = VIEWER / "app-config.js"
DICOMWEB_ROOT = "/dicom-web/"
#: Where Debian's orthanc-dicomweb package puts the plugin (a symlink to the versioned .so).
DICOMWEB_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc", "/usr/local/share/orthanc/plugins")
SETUP_HINT = (
    "run `make viewer-setup` (as root: apt-get installs orthanc-dicomweb, chromium; npm ci in viewer/)"
)

_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm",
          ".css": "text/css", ".json": "application/json", ".svg": "image/svg+xml",
          ".woff2": "font/woff2", ".html": "text/html; charset=utf-8", ".map": "application/json"}  # fmt: skip
#: Request headers passed on to Orthanc (the rest are the browser's business).
_FORWARD = ("accept", "content-type", "range", "host", "if-none-match", "if-modified-since")
#: Response headers passed back (hop-by-hop headers and Content-Length are ours to set).
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "upgrade"}


def dicomweb_plugin() -> Path:
    """Path of Orthanc's DICOMweb plugin, else FileNotFoundError with the fix."""
    for folder in DICOMWEB_PLUGIN_DIRS:
        for lib in sorted(Path(folder).glob("libOrthancDicomWeb.so*")):
            return lib
    raise FileNotFoundError(
        f"Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb) is missing: {SETUP_HINT}"
    )


def orthanc_dicomweb_config() -> dict[str, Any]:
    """Orthanc configuration keys that enable DICOMweb at ``/dicom-web/`` (QIDO-RS, WADO-RS, STOW-RS).

    No ``Host`` key: the plugin then builds BulkDataURIs from each request's Host header, which the
    viewer server forwards (a fixed host would send the browser to Orthanc's own port)."""
    return {
        "Plugins": [str(dicomweb_plugin())],
        "DicomWeb": {
            "Enable": True,
            "Root": DICOMWEB_ROOT,
            "EnableWado": True,
            "WadoRoot": "/wado",
            "Ssl": False,
        },
    }


def require_ohif() -> Path:
    """The installed OHIF dist folder, else FileNotFoundError with the fix."""
    if not (OHIF_DIST / "index.html").is_file():
        raise FileNotFoundError(f"OHIF is not installed in {OHIF_DIST.relative_to(ROOT)}: {SETUP_HINT}")
    return OHIF_DIST


class ViewerServer:
    """OHIF's static files plus a reverse proxy of ``/dicom-web/`` to ``orthanc_url`` on loopback."""

    def __init__(self, orthanc_url: str, *, port: int | None = None, dist: Path | None = None,
                 app_config: Path = APP_CONFIG) -> None:  # fmt: skip
        self.dist = dist or require_ohif()
        self.app_config = app_config
        self.port = port or free_port()
        target = urlsplit(orthanc_url)
        self._target = (target.hostname or LOOPBACK, target.port or 80)
        self.failures: list[tuple[str, str, int]] = []
        self.requests = 0
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    # -- serving --------------------------------------------------------------------------------------

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests += 1
            if status >= 400:
                self.failures.append((method, path, status))

    def _static(self, handler: BaseHTTPRequestHandler, head: bool) -> None:
        path = urlsplit(handler.path).path
        if path == "/app-config.js":
            file = self.app_config
        else:
            file = (self.dist / path.lstrip("/")).resolve()
            if not file.is_relative_to(self.dist.resolve()) or not file.is_file():
                # the app's own routes (/viewer, /segmentation, ...) are client-side: serve index.html
                file = self.dist / "index.html"
        body = file.read_bytes()
        handler.send_response(200)
        ctype = _TYPES.get(file.suffix) or mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        handler.send_header("Content-Type", ctype)
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Cache-Control", "no-store")
        handler.end_headers()
        if not head:
            handler.wfile.write(body)
        self._record(handler.command, handler.path, 200)

    def _proxy(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        headers = {k: v for k, v in handler.headers.items() if k.lower() in _FORWARD}
        conn = http.client.HTTPConnection(*self._target, timeout=120)
        try:
            conn.request(handler.command, handler.path, body=body, headers=headers)
            rsp = conn.getresponse()
            data = rsp.read()
        finally:
            conn.close()
        handler.send_response(rsp.status)
        for k, v in rsp.getheaders():
            if k.lower() not in _HOP:
                handler.send_header(k, v)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)
        self._record(handler.command, handler.path, rsp.status)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _go(self) -> None:
                try:
                    if urlsplit(self.path).path.startswith((DICOMWEB_ROOT, "/wado")):
                        server._proxy(self)
                    elif self.command in ("GET", "HEAD"):
                        server._static(self, head=self.command == "HEAD")
                    else:
                        self.send_error(405)
                        server._record(self.command, self.path, 405)
                except (BrokenPipeError, ConnectionResetError):  # the browser went away mid-answer
                    pass

            do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _go

            def log_message(self, format: str, *args: Any) -> None:  # quiet: failures are recorded
                pass

        return Handler

    def start(self) -> None:
        self._httpd = ThreadingHTTPServer((LOOPBACK, self.port), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="ohif-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> ViewerServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def require_chromium() -> str:
    """Path of the system Chromium (Debian package ``chromium``), else FileNotFoundError with the fix."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise FileNotFoundError(f"chromium is not installed: {SETUP_HINT}")
    return found
