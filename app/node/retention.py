"""Forgetting finished studies: their rows, spool folder and results folders, in that order.

One function for ``hyperct jobs purge`` and the console's purge button, so both forget the same
studies the same way: the rows go in one transaction first (a crash then leaves only folders that
nothing points at), then the folders.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from app.node.store import NodeStore

logger = logging.getLogger(__name__)

#: Study states purge forgets by default; ``failed`` only when asked (a failure is kept for a human).
FINISHED = ("done", "not-processed", "stored")


def purge_finished(store: NodeStore, data_dir: Path, *, older_than_days: float,
                   include_failed: bool = False) -> dict[str, list[int]]:  # fmt: skip
    """Forget studies finished at least ``older_than_days`` ago; returns ``{study_uid: [job ids]}``."""
    states = (*FINISHED, *(("failed",) if include_failed else ()))
    forgotten = store.purge(older_than_s=older_than_days * 86400.0, states=states)
    for uid, job_ids in forgotten.items():
        shutil.rmtree(Path(data_dir) / "spool" / uid, ignore_errors=True)
        for jid in job_ids:
            shutil.rmtree(Path(data_dir) / "results" / str(jid), ignore_errors=True)
    if forgotten:
        logger.info("purged %d study(ies) finished more than %g day(s) ago", len(forgotten), older_than_days)
    return forgotten
