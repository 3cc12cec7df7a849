"""``hyperct process --send-to`` / ``--send-stowrs``: a batch run's results go out through the node's
own outbox (C-STORE, or STOW-RS to a DICOMweb root).

One outbox implementation, and only the outbox: the batch keeps the outbox table alone in
``OUT/_batch/outbox.sqlite`` (:meth:`OutboxStore.open <app.node.store.OutboxStore.open>`; no
studies, instances or jobs — the ledger is the batch's record of those), queues each finished
study's SR, SEG and text SR with :meth:`OutboxStore.enqueue` (paths relative to OUT) and sends them
with :class:`~app.node.outbox.Outbox` — the same C-STORE SCU, per-destination association,
transient / permanent error split and :class:`~app.dimse.sender.RetryPolicy` backoff as
``hyperct serve``. An outbox thread sends while the batch runs; at the end
:meth:`BatchSender.drain` waits (bounded) for the rest. Because the rows are keyed by (destination,
SOP Instance UID) and the output UIDs are deterministic, a rerun resumes pending and failed sends
and never sends a delivered object again. ``hyperct status --data-dir OUT/_batch`` shows the rows
and each study's delivery. Runs from before this file existed kept their outbox in a node-schema
``OUT/_batch/state.sqlite``: its rows move into ``outbox.sqlite`` on the next run (the old file is
renamed ``state.sqlite.migrated``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.dimse.sender import RetryPolicy
from app.node.outbox import result_outputs

logger = logging.getLogger(__name__)

OUTBOX_DB = "outbox.sqlite"
LEGACY_STATE_DB = "state.sqlite"  # where earlier runs kept their outbox (a node-schema database)
SENDS_CSV = "sends.csv"
SEND_COLUMNS = (
    "study_instance_uid", "destination", "sop_instance_uid", "path", "state", "attempts", "last_error",
    "sent_at",
)  # fmt: skip


@dataclass(frozen=True)
class SendConfig:
    """Where a batch run's results go and how hard we try."""

    destinations: tuple[str, ...]
    calling_ae: str = "HYPERCT"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_s: float = 30.0
    wait_s: float = 300.0  # bounded drain at the end of the run
    poll_interval_s: float = 1.0
    resend: bool = False  # also send objects already delivered (``--force``)


class BatchSender:
    """The outbox of one OUT folder: queue per study, send in the background, drain at the end."""

    def __init__(self, cfg: SendConfig, output: Path, work_dir: Path) -> None:
        from app.dimse.network import RemoteNode
        from app.node.outbox import Outbox
        from app.node.store.outbox import OutboxStore
        from app.stowrs import check_stowrs_url, is_stowrs_destination

        for dest in cfg.destinations:  # a bad address fails before any study runs
            check_stowrs_url(dest) if is_stowrs_destination(dest) else RemoteNode.parse(dest)
        self.cfg = cfg
        self.output = Path(output)
        self.store = OutboxStore.open(Path(work_dir) / OUTBOX_DB, legacy=Path(work_dir) / LEGACY_STATE_DB)
        self.outbox = Outbox(
            self.store, self.output, cfg.retry, calling_ae=cfg.calling_ae, timeout_s=cfg.timeout_s
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        resumed = self.store.requeue()
        if resumed:
            logger.info("outbox: %d send(s) left by an earlier run are due again", resumed)

    def start(self) -> None:
        """Send in the background while the batch runs (the node's outbox loop)."""
        self._thread = threading.Thread(
            target=self.outbox.run, args=(self._stop, self.cfg.poll_interval_s), name="outbox", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the background loop; its current pass finishes and is recorded."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(60.0, self.cfg.timeout_s * 2))
            self._thread = None

    def enqueue(self, study_uid: str, summary: dict[str, Any]) -> int:
        """Queue a processed study's SR / SEG / text SR for every destination; returns the rows queued."""
        if summary.get("outcome") != "processed":
            return 0
        outputs = result_outputs(summary, self.output, self.output)
        return self.store.enqueue(study_uid, outputs, list(self.cfg.destinations), resend=self.cfg.resend)

    def queue_finished(self, study_uids: Iterable[str]) -> int:
        """Queue the results of studies this run skips (already in the ledger) for every destination
        that has none of their rows yet — results computed without ``--send-to``, or before a
        destination was added, go out without recomputing. Their ``results.json`` names the files.
        Returns the studies queued."""
        from operators.stages import RESULTS_FILE

        have = self.store.destinations()
        queued = 0
        for uid in study_uids:
            missing = [d for d in self.cfg.destinations if (uid, d) not in have]
            results = self.output / uid / RESULTS_FILE
            if not missing or not results.is_file():
                continue  # nothing new, or a study without results (not processed)
            try:
                files = json.loads(results.read_text()).get("outputs", {}).get("files", {})
                outputs = result_outputs({"files": files}, self.output, self.output)
                self.store.enqueue(uid, outputs, missing)
            except (OSError, ValueError, KeyError) as exc:  # one study's results must not stop the run
                logger.error("study %s: its results could not be queued for sending: %s", uid, exc)
                continue
            queued += 1
        if queued:
            logger.info("outbox: results of %d finished study(ies) queued for new destinations", queued)
        return queued

    def drain(self, on_pass: Callable[[dict[str, int]], None] | None = None) -> dict[str, int]:
        """Stop the background loop, then send what is left for at most ``wait_s`` seconds."""
        self.stop()
        return self.outbox.drain(
            self.cfg.wait_s, poll_interval_s=min(self.cfg.poll_interval_s, 0.5), on_pass=on_pass
        )

    def counts(self) -> dict[str, int]:
        return self.store.counts()

    def rows(self) -> list[dict[str, Any]]:
        """Every outbox row for ``sends.csv``."""
        return [
            {
                "study_instance_uid": r["study_uid"],
                "destination": r["destination"],
                "sop_instance_uid": r["sop_uid"],
                "path": r["path"],
                "state": r["state"],
                "attempts": r["attempts"],
                "last_error": r["last_error"] or "",
                "sent_at": _iso(r["sent_at"]),
            }
            for r in self.store.rows()
        ]

    def close(self) -> None:
        self.stop()
        self.store.close()


def send_errors(rows: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """``errors.csv`` rows (kind ``send``) for every send kept as failed."""
    return [
        {
            "kind": "send",
            "item": f"{r['destination']} {r['path']}",
            "reason": f"failed after {r['attempts']} attempt(s): {r['last_error']}",
        }
        for r in rows
        if r["state"] == "failed"
    ]


def _iso(ts: float | None) -> str:
    if not ts:
        return ""
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")
