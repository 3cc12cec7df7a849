"""The inbox: where the receiver puts instances — the node's :class:`~app.dimse.receiver.InstanceStore`.

:meth:`Inbox.put` is the durable path of a C-STORE: the spool file first (temp file → fdatasync →
rename → fsync of the folder, :mod:`app.node.spool`), then the row (:meth:`StudyStore.record`,
committed with ``synchronous=FULL``). It returns only when both are on disk, and raises when either
fails, leaving nothing recorded: the receiver then answers 0xA700 and the peer re-sends. Concurrent
associations share the folder flush and the commit (group commit), each still waiting for the flush
and the commit that cover its own instance.
"""

from __future__ import annotations

import logging
from typing import Any

from app.node.spool import Spool
from app.node.store import InstanceRecord, NodeStore, RecordResult

logger = logging.getLogger(__name__)


class Inbox:
    """Received instances into the spool and the node's database (see the module docstring)."""

    def __init__(self, spool: Spool, store: NodeStore, *, late_policy: str = "reprocess") -> None:
        self.spool = spool
        self.store = store
        self.late_policy = late_policy

    def check(self, instance: Any) -> None:
        """Raises ValueError when the UIDs cannot name a spool file (before anything is written)."""
        self.spool.path_for(instance.study_uid, instance.sop_uid)

    def put(self, instance: Any, data: bytes) -> RecordResult:
        """Store one instance durably (file, then row); returns the row's status: new, duplicate,
        replaced, or conflict (the SOP Instance UID belongs to another study: nothing kept)."""
        try:
            spooled = self.spool.write(instance.study_uid, instance.sop_uid, data)
        except Exception as exc:  # disk full, I/O error, permission
            self._note("spool", f"cannot write instance: {exc}", instance.study_uid, instance.sop_uid)
            raise
        record = InstanceRecord(**vars(instance), path=spooled.relpath, size=spooled.size, sha256=spooled.sha256)
        try:
            result = self.store.studies.record(record, late_policy=self.late_policy)
        except Exception:  # database full or broken
            if self._has_row(instance.sop_uid) is False:  # keep an older acknowledged copy
                self.spool.remove(spooled.path)
            raise
        if result.status == "conflict":
            self.spool.remove(spooled.path)
        return result

    def note_error(self, kind: str, message: str, study_uid: str | None = None, sop_uid: str | None = None) -> None:
        self._note(kind, message, study_uid, sop_uid)

    def _note(self, kind: str, message: str, study_uid: str | None, sop_uid: str | None) -> None:
        try:
            self.store.journal.add_error(kind, message, study_uid, sop_uid)
        except Exception:  # noqa: BLE001 - recording an error must not hide the original one
            logger.exception("could not record an error")

    def _has_row(self, sop_uid: str) -> bool | None:
        """Whether the database has a row for ``sop_uid`` (None when it cannot answer)."""
        try:
            return self.store.studies.has_instance(sop_uid)
        except Exception:  # noqa: BLE001
            return None
