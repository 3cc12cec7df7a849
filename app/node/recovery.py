"""Start-up recovery: resume every study after a crash, and rebuild the state from the spool.

Why this is enough after ``kill -9`` or a power loss: every acknowledged instance is a durable
spool file *and* a committed row (see :mod:`app.node.spool`); every state change is one
transaction. So at start-up only three things can be out of step, and each has one fix:

* half-written temporaries (never acknowledged: the sender still has them) → deleted;
* jobs that were ``running`` → re-queued (results use deterministic UIDs, so a rerun replaces and
  never duplicates at the destination);
* spool files without a row (a crash between rename and commit, or a lost/deleted database) →
  adopted: their header is read and they are recorded like a new arrival, so their study completes
  after one quiet period and is processed. With the whole database lost this rebuilds everything;
  results already delivered are delivered again with the same UIDs (the PACS replaces them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from app.node.spool import Spool, sha256_file
from app.node.store import InstanceRecord, NodeStore

logger = logging.getLogger(__name__)

RECOVERED_AE = "(recovered)"


@dataclass(frozen=True)
class RecoveryReport:
    temporaries_removed: int
    jobs_requeued: int
    instances_adopted: int
    unreadable: int


def recover(store: NodeStore, spool: Spool, *, late_policy: str = "reprocess") -> RecoveryReport:
    """Bring the state in line with the spool (idempotent; run before the receiver starts)."""
    from pydicom.filereader import read_file_meta_info

    from app.dimse.receiver import describe_instance, read_header

    removed = spool.clean_temporaries()
    requeued = store.jobs.requeue_interrupted()
    known = store.studies.paths()
    adopted = unreadable = 0
    for path in spool.files():
        rel = spool.relpath(path)
        if rel in known:
            continue
        try:
            ts = str(read_file_meta_info(path).get("TransferSyntaxUID", ""))
            instance = describe_instance(read_header(path), ts, RECOVERED_AE)
            if spool.relpath(spool.path_for(instance.study_uid, instance.sop_uid)) != rel:
                raise ValueError("file name does not match its UIDs")
        except Exception as exc:  # noqa: BLE001 - leave it in place, say so, go on
            unreadable += 1
            logger.error("spool file %s cannot be adopted: %s", rel, exc)
            store.journal.add_error("recovery", f"spool file {rel} cannot be adopted: {exc}")
            continue
        rec = InstanceRecord(**vars(instance), path=rel, size=path.stat().st_size, sha256=sha256_file(path))
        store.studies.record(rec, late_policy=late_policy)
        adopted += 1
    report = RecoveryReport(removed, requeued, adopted, unreadable)
    if removed or requeued or adopted or unreadable:
        logger.warning(
            "recovery: %d temporary file(s) removed, %d job(s) re-queued, %d instance(s) adopted from the "
            "spool, %d unreadable", removed, requeued, adopted, unreadable,
        )  # fmt: skip
    return report
