"""Study completion: a study is complete after a quiet period with no new instance.

DICOM has no "end of study" message, and an association may carry part of a study or several
studies, so the node uses what every peer uses (mercure, Orthanc's ``StableAge``, the MONAI
Informatics Gateway): an inactivity timer per StudyInstanceUID, default 30 s. Association release
is deliberately *not* a signal: PACS routinely split a study across associations.

Late arrivals (a CT instance for a study already complete, processing or done) follow
``completion.late_arrivals``: ``reprocess`` sends the study back to *receiving* with a new
generation, so it is processed again one quiet period later and results of the superseded run are
not sent; ``ignore`` keeps the instance in the spool and only logs. Both are logged with the UIDs
(see :meth:`app.node.store.StudyStore.record`, which applies the policy in the same
transaction that records the instance).
"""

from __future__ import annotations

import logging

from app.node.store import StudyStore

logger = logging.getLogger(__name__)


class Scheduler:
    """Turns quiet studies into queued jobs (one transaction per tick)."""

    def __init__(self, studies: StudyStore, quiet_period_s: float) -> None:
        self.studies = studies
        self.quiet_period_s = quiet_period_s

    def tick(self, now: float | None = None) -> list[int]:
        """Queue jobs for every study quiet for the period; returns the new job ids."""
        return self.studies.complete_quiet(self.quiet_period_s, now=now)
