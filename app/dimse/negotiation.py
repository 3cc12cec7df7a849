"""Why an association request failed, in words, and whether another try may succeed.

pynetdicom only logs the reason; both of our requestors (the sender, and the C-FIND/C-GET/C-MOVE
client of ``app.dimse.query``) observe the negotiation through these event handlers instead, so a
permanent A-ASSOCIATE-RJ (unknown AE title) fails at once while a refused connection, a timeout, an
abort or a transient rejection is retried.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pynetdicom import evt
from pynetdicom.pdu import A_ASSOCIATE_RJ

from app.dimse.network import RemoteNode

_RJ_SOURCES = {1: "service user", 2: "service provider (ACSE)", 3: "service provider (presentation)"}
_RJ_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


@dataclass
class Negotiation:
    """What the association events told us: did the connection open, did the peer reject."""

    connected: bool = False
    reject: tuple[int, int, int] | None = None  # A-ASSOCIATE-RJ (result, source, reason)

    def handlers(self) -> list[evt.EventHandlerType]:
        """pynetdicom ``evt_handlers`` that fill this record; pass them to ``ae.associate``."""

        def on_open(event: evt.Event) -> None:
            self.connected = True

        def on_acse(event: evt.Event) -> None:
            rj = event.primitive  # type: ignore[attr-defined]
            if getattr(rj, "result", None) in (0x01, 0x02):
                self.reject = (int(rj.result), int(rj.result_source), int(rj.diagnostic))

        def on_pdu(event: evt.Event) -> None:
            # A peer that closes the connection right after its A-ASSOCIATE-RJ (DCMTK does) can make
            # pynetdicom report an abort instead of the rejection; the PDU itself is still seen here.
            rj = event.pdu
            if isinstance(rj, A_ASSOCIATE_RJ) and self.reject is None:
                self.reject = (int(rj.result or 0), int(rj.source or 0), int(rj.reason_diagnostic or 0))

        return [(evt.EVT_CONN_OPEN, on_open), (evt.EVT_ACSE_RECV, on_acse), (evt.EVT_PDU_RECV, on_pdu)]

    def settle(self, assoc: Any) -> None:
        """Let the reactor finish decoding what the peer sent before :meth:`failure` reads it."""
        if not assoc.is_established and self.connected and self.reject is None:
            assoc.dul.join(timeout=2)

    def failure(self, node: RemoteNode, assoc: Any) -> tuple[str, bool]:
        """``(message, transient)`` for an association that was not established. Only a permanent
        rejection, or no usable presentation context, is permanent."""
        if self.reject is not None:
            result, source, reason = self.reject
            how = "permanently" if result == 0x01 else "transiently"
            text = (
                f"{node} rejected the association {how} (source: {_RJ_SOURCES.get(source, source)}; "
                f"reason: {_RJ_REASONS.get((source, reason), reason)})"
            )
            return text, result != 0x01
        tls = " (TLS)" if node.tls else ""
        if not self.connected:
            return f"cannot connect to {node}{tls}: refused, unreachable, timed out or handshake failed", True
        if assoc.is_aborted and assoc.rejected_contexts and not assoc.accepted_contexts:
            return f"{node} accepted none of the proposed presentation contexts", False
        return f"{node}{tls} aborted the association or did not answer in time", True
