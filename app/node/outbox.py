"""The outbox: results go to every destination by C-STORE, retried with backoff, never forgotten.

Why persistent: a PACS that is down for maintenance must get the results when it comes back, also
across node restarts. Each (destination, result SOP Instance UID) is one row, so a reprocess of the
same study (same deterministic UIDs) replaces the pending row instead of sending twice. A transient
error (connection refused, timeout, 0xA7xx) is retried after ``RetryPolicy.delay(attempt)``; a
permanent one (association rejected, a failure status) or ``max_attempts`` spent marks the row
*failed*: kept, visible in ``hyperct jobs show`` / ``hyperct status``, re-queued by
``hyperct jobs retry``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.node.state import OutboxItem, State
from operators.dicom_network import RemoteNode, TlsConfig
from operators.dicom_sender import RetryPolicy, send_files

logger = logging.getLogger(__name__)


class Outbox:
    """Sends due outbox rows; :meth:`run_once` is one pass, :meth:`run` loops until stopped."""

    def __init__(
        self,
        state: State,
        data_dir: Path,
        policy: RetryPolicy,
        *,
        calling_ae: str = "HYPERCT",
        timeout_s: float = 30.0,
        tls: TlsConfig | None = None,
        sender: Callable[..., Any] = send_files,
    ) -> None:
        self.state = state
        self.data_dir = Path(data_dir)
        self.policy = policy
        self.calling_ae = calling_ae
        self.timeout_s = timeout_s
        self.tls = tls
        self.sender = sender
        self.sent = 0
        self.failed = 0

    def run_once(self, now: float | None = None) -> int:
        """Send every due row (grouped per destination, one association each); returns rows handled."""
        now = time.time() if now is None else now
        items = self.state.due_outbox(now=now)
        by_dest: dict[str, list[OutboxItem]] = defaultdict(list)
        for item in items:
            by_dest[item.destination].append(item)
        for dest, group in by_dest.items():
            self._send(dest, group)
        return len(items)

    def _send(self, dest: str, group: list[OutboxItem]) -> None:
        node = RemoteNode.parse(dest, tls=self.tls)
        paths = [self.data_dir / item.path for item in group]
        report = self.sender(node, paths, calling_ae=self.calling_ae, timeout_s=self.timeout_s)
        by_path = {Path(r.path): r for r in report.results}
        now = time.time()
        for item, path in zip(group, paths, strict=True):
            result = by_path.get(path)
            attempt = item.attempts + 1
            if result is not None and result.delivered:
                self.state.outbox_result(item, True, f"stored by {dest}", next_attempt_at=None, now=now)
                self.sent += 1
                continue
            detail = (result.error if result is not None else None) or str(report.error or "not sent")
            transient = result.transient if result is not None else bool(report.transient)
            if transient and not self.policy.exhausted(attempt):
                at = now + self.policy.delay(attempt)
                self.state.outbox_result(item, False, detail, next_attempt_at=at, now=now)
                logger.warning("send of %s to %s failed (attempt %d), retry in %.0f s: %s",
                               item.sop_uid, dest, attempt, at - now, detail)  # fmt: skip
            else:
                self.state.outbox_result(item, False, detail, next_attempt_at=None, now=now)
                self.failed += 1
                logger.error("send of %s to %s failed after %d attempt(s), kept as failed: %s",
                             item.sop_uid, dest, attempt, detail)  # fmt: skip

    def run(self, stop: threading.Event, poll_interval_s: float = 1.0) -> None:
        """Loop until ``stop`` is set (the current batch always finishes and is recorded)."""
        while not stop.is_set():
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - keep sending other results; the error is logged
                logger.exception("outbox pass failed")
            stop.wait(poll_interval_s)
