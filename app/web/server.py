"""A web listener: an ASGI application served by uvicorn in a thread of the node's process.

Why a thread and not uvicorn's own process model: the console, the probes and STOW-RS must see the
live node (the receiver's counters, the inbox that stores instances, whether the model is loaded),
and the node is one process with its state in one SQLite file. The socket is bound here, before the
thread starts, so a port in use is an error of ``hyperct serve`` start-up (one line naming the
setting), not a log line of a thread; port 0 (tests) gives any free port, read back from
:attr:`WebServer.port`. uvicorn is told to leave logging and signals alone: the node configured
logging already, and SIGTERM belongs to the node (the thread is not the main thread, so uvicorn
installs no handler). Its access log is off: the node logs what matters (401s, refusals, actions)
with addresses and UIDs only.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn

from app.dimse.network import TlsConfig

logger = logging.getLogger(__name__)

#: Seconds uvicorn waits for open requests (an event stream, an upload) when the node stops.
GRACEFUL_S = 3


def bind_socket(bind: str, port: int) -> socket.socket:
    """A listening TCP socket on ``bind:port`` (IPv4 or IPv6 by the address), ``SO_REUSEADDR`` as
    servers do; raises OSError (address in use, no such address) for the caller to explain."""
    family = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bind, port))
        sock.listen(128)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


class WebServer:
    """uvicorn serving ``app`` on ``bind:port`` (HTTPS with ``tls``) in a daemon thread."""

    def __init__(self, app: Any, bind: str, port: int, *, name: str = "web", tls: TlsConfig | None = None,
                 on_stop: Callable[[], None] | None = None) -> None:  # fmt: skip
        self.name = name
        self.tls = tls if tls is not None and tls.certificate and tls.key else None
        context = self.tls.server_context() if self.tls is not None else None  # bad files: fail now
        self._socket = bind_socket(bind, port)
        factory: Callable[[Any, Any], ssl.SSLContext] | None = None
        if context is not None:
            factory = lambda config, default, ctx=context: ctx  # noqa: E731 - uvicorn's hook
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=GRACEFUL_S,
            ssl_context_factory=factory,
            server_header=False,
        )
        self._server = uvicorn.Server(config)
        self._on_stop = on_stop
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._socket])
        except Exception:  # noqa: BLE001 - the node goes on without its web face, loudly
            logger.exception("%s listener stopped", self.name)

    @property
    def port(self) -> int:
        return int(self._socket.getsockname()[1])

    @property
    def url(self) -> str:
        host = self._socket.getsockname()[0]
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._server.started:
            raise RuntimeError(f"the {self.name} listener did not start")

    def stop(self) -> None:
        if self._on_stop is not None:
            self._on_stop()
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=GRACEFUL_S + 5)
        self._socket.close()
