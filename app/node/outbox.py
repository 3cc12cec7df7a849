"""The outbox: results go to every destination by C-STORE (or STOW-RS to a DICOMweb root, an
``http(s)://`` destination: :mod:`app.stowrs`), retried with backoff, never forgotten.

Why persistent: a PACS that is down for maintenance must get the results when it comes back, also
across node restarts. Each (destination, result SOP Instance UID) is one row, so a reprocess of the
same study (same deterministic UIDs) replaces the pending row instead of sending twice. A transient
error (connection refused, timeout, 0xA7xx) is retried after ``RetryPolicy.delay(attempt)``; a
permanent one (association rejected, a failure status) or ``max_attempts`` spent marks the row
*failed*: kept, visible in ``hyperct jobs show`` / ``hyperct status``, re-queued by
``hyperct jobs retry``.

The node queues rows when a job finishes (:meth:`JobStore.finish`); ``hyperct process --send-to``
queues a batch study's results with :meth:`OutboxStore.enqueue` into an outbox file of its own
under its OUT folder and sends them with this same class (:meth:`Outbox.drain` at the end).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.dimse.network import RemoteNode, TlsConfig
from app.dimse.sender import RetryPolicy, send_files
from app.node.store.outbox import OutboxItem, OutboxStore
from app.stowrs import check_stowrs_url, is_stowrs_destination, stow_files
from operators.study_case import dicom_file_keys

logger = logging.getLogger(__name__)


def result_outputs(summary: dict[str, Any], output: Path, data_dir: Path) -> list[tuple[str, str]]:
    """``(SOP Instance UID, path relative to data_dir)`` of a processed study's DICOM results (SR,
    SEG, Parametric Maps, text SR: :func:`~operators.study_case.dicom_file_keys`; ``summary["files"]``
    paths are relative to ``output``), each fsynced with its folder first: the outbox must still
    find them after a power loss."""
    outputs = []
    for key in dicom_file_keys(summary["files"]):
        path = output / summary["files"][key]
        _fsync(path)
        outputs.append((_sop_uid(path), path.relative_to(data_dir).as_posix()))
    for folder in {output / p for p in (Path(r).parent for r in summary["files"].values())}:
        _fsync(folder)
    return outputs


def _sop_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Outbox:
    """Sends due outbox rows; :meth:`run_once` is one pass, :meth:`run` loops until stopped."""

    def __init__(
        self,
        store: OutboxStore,
        data_dir: Path,
        policy: RetryPolicy,
        *,
        calling_ae: str = "HYPERCT",
        timeout_s: float = 30.0,
        tls: TlsConfig | None = None,
        sender: Callable[..., Any] = send_files,
    ) -> None:
        self.store = store
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
        items = self.store.due(now=now)
        by_dest: dict[str, list[OutboxItem]] = defaultdict(list)
        for item in items:
            by_dest[item.destination].append(item)
        for dest, group in by_dest.items():
            self._send(dest, group)
        return len(items)

    def _send(self, dest: str, group: list[OutboxItem]) -> None:
        paths = [self.data_dir / item.path for item in group]
        try:
            target: RemoteNode | str = (
                check_stowrs_url(dest) if is_stowrs_destination(dest) else RemoteNode.parse(dest, tls=self.tls)
            )
        except ValueError as exc:
            # Configurations refuse such addresses when they load; a row queued before that (or by
            # hand) fails alone, permanently, and the other destinations of this pass still go out.
            for item in group:
                self.store.result(item, False, f"bad destination: {exc}", next_attempt_at=None)
                self.failed += 1
            logger.error("outbox: %d send(s) to %r failed: %s", len(group), dest, exc)
            return
        if isinstance(target, str):
            report = stow_files(target, paths, timeout_s=self.timeout_s)
        else:
            report = self.sender(target, paths, calling_ae=self.calling_ae, timeout_s=self.timeout_s)
        by_path = {Path(r.path): r for r in report.results}
        now = time.time()
        for item, path in zip(group, paths, strict=True):
            result = by_path.get(path)
            attempt = item.attempts + 1
            if result is not None and result.delivered:
                self.store.result(item, True, f"stored by {dest}", next_attempt_at=None, now=now)
                self.sent += 1
                continue
            detail = (result.error if result is not None else None) or str(report.error or "not sent")
            transient = result.transient if result is not None else bool(report.transient)
            if transient and not self.policy.exhausted(attempt):
                at = now + self.policy.delay(attempt)
                self.store.result(item, False, detail, next_attempt_at=at, now=now)
                logger.warning("send of %s to %s failed (attempt %d), retry in %.0f s: %s",
                               item.sop_uid, dest, attempt, at - now, detail)  # fmt: skip
            else:
                self.store.result(item, False, detail, next_attempt_at=None, now=now)
                self.failed += 1
                logger.error("send of %s to %s failed after %d attempt(s), kept as failed: %s",
                             item.sop_uid, dest, attempt, detail)  # fmt: skip

    def drain(
        self,
        timeout_s: float,
        *,
        poll_interval_s: float = 0.5,
        on_pass: Callable[[dict[str, int]], None] | None = None,
    ) -> dict[str, int]:
        """Send until nothing is pending or ``timeout_s`` has passed (rows waiting for a retry are
        waited for, within the bound); ``on_pass`` gets the row counts by state after each pass.
        Returns the final counts (``pending`` left are kept for the next run)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - same as run(): logged, the rows stay pending
                logger.exception("outbox pass failed")
            counts = self.store.counts()
            if on_pass is not None:
                on_pass(counts)
            left = deadline - time.monotonic()
            if not counts.get("pending") or left <= 0:
                return counts
            due = self.store.next_due()
            wait = poll_interval_s if due is None else max(due - time.time(), 0.0)
            time.sleep(min(max(wait, 0.05), left))

    def run(self, stop: threading.Event, poll_interval_s: float = 1.0) -> None:
        """Loop until ``stop`` is set (the current batch always finishes and is recorded)."""
        while not stop.is_set():
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - keep sending other results; the error is logged
                logger.exception("outbox pass failed")
            stop.wait(poll_interval_s)
