"""``--from-pacs``: the studies of a batch run come from a C-FIND and are retrieved one at a time.

Each study is fetched (C-GET, or C-MOVE with ``--retrieve move``) by the prefetch worker that
prepares it, into
``OUT/_batch/cache/pacs/<StudyInstanceUID>/``, and deleted once its results are recorded, so the
cache never holds more than the prefetch queue (``--prefetch`` + 1 studies) and no study larger
than ``--cache-gb``. The C-FIND applies the date, modality and accession filters at the PACS; the
same :class:`~app.batch.filters.StudyFilter` then checks each answer again here. A retrieval whose
association fails for a passing reason (no connection, no answer in time, an abort, a transient
rejection) is tried again after a pause, ``RETRY_DELAYS_S``; a permanent rejection is not.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from app.batch.filters import StudyFilter
from app.batch.index import StudyRow
from app.batch.runner import BatchConfig, BatchReport, StudyJob, retrieval_jobs

logger = logging.getLogger(__name__)

#: Pauses before the second and third try of a study's retrieval whose association failed transiently
#: (a PACS busy with other associations, a loaded host): a batch should not lose a study to that.
RETRY_DELAYS_S = (2.0, 10.0)


def query_for(filters: StudyFilter) -> object:
    """The C-FIND keys of a batch filter."""
    from app.dimse.query import StudyQuery

    return StudyQuery(
        date_from=filters.date_from,
        date_to=filters.date_to,
        modalities=tuple(sorted(filters.modalities)),
        accessions=tuple(sorted(filters.accessions)),
        study_uids=tuple(sorted(filters.study_uids)),
    )


RETRIEVE_METHODS = ("get", "move")


class PacsSource:
    """A job source for :func:`app.batch.runner.run_batch` that queries a PACS; ``close()`` (called
    by ``run_batch`` at the end) stops the C-MOVE destination when there is one."""

    def __init__(
        self,
        spec: str,
        *,
        calling_ae: str = "HYPERCT",
        max_cache_bytes: int | None = None,
        retrieve: str = "get",
        move_port: int | None = None,
        move_bind: str = "0.0.0.0",  # noqa: S104 - the PACS is another host; only its AE title may call
    ) -> None:
        from app.dimse.network import RemoteNode

        self.node = RemoteNode.parse(spec)  # ValueError names what is wrong with the address
        if retrieve not in RETRIEVE_METHODS:
            raise ValueError(f"--retrieve {retrieve}: expected get or move")
        if retrieve == "move" and not move_port:
            raise ValueError(
                "--retrieve move needs --move-port: the port the PACS sends our AE title's instances to"
            )
        self.calling_ae, self.max_cache_bytes = calling_ae, max_cache_bytes
        self.retrieve, self.move_port, self.move_bind = retrieve, move_port, move_bind
        self._receiver: Any = None

    def close(self) -> None:
        if self._receiver is not None:
            self._receiver.close()
            self._receiver = None

    def _retrieve(self, uid: str, folder: Path) -> Any:
        from app.dimse.query import QueryError, get_study, move_study

        node, calling_ae, max_bytes = self.node, self.calling_ae, self.max_cache_bytes
        for attempt, delay in enumerate((*RETRY_DELAYS_S, None), start=1):
            try:
                if self.retrieve == "move":
                    return move_study(
                        node, uid, folder, self._receiver, calling_ae=calling_ae, max_bytes=max_bytes
                    )
                return get_study(node, uid, folder, calling_ae=calling_ae, max_bytes=max_bytes)
            except QueryError as exc:
                if not exc.transient or delay is None:
                    raise
                logger.warning("study %s: try %d failed (%s); again in %g s", uid, attempt, exc, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _fetch(self, uid: str, folder: Path) -> list[Path]:
        from app.dimse.query import MOVE_HINTS

        node, calling_ae = self.node, self.calling_ae
        got = self._retrieve(uid, folder)
        verb = "C-MOVE" if self.retrieve == "move" else "C-GET"
        if not got.files:
            hint = MOVE_HINTS.get(got.status or 0, "") if self.retrieve == "move" else ""
            if self.retrieve == "move" and not hint and got.failed:
                hint = f"can the PACS reach {calling_ae} at this host's port {self.move_port}?"
            raise ConnectionError(
                f"{verb} from {node} brought no instance (status 0x{got.status or 0:04X}, {got.failed} failed)"
                + (f": {hint}" if hint else "")
            )
        if got.failed:
            logger.warning("study %s: %d instance(s) not retrieved", uid, got.failed)
        return list(got.files)

    def __call__(self, cfg: BatchConfig, report: BatchReport) -> list[StudyJob]:
        from app.dimse.network import enable_tcp_nodelay
        from app.dimse.query import MoveReceiver, find_studies

        node, calling_ae = self.node, self.calling_ae
        enable_tcp_nodelay()
        cache = cfg.work_dir / "cache" / "pacs"
        shutil.rmtree(cache, ignore_errors=True)  # leftovers of an interrupted run
        if self.retrieve == "move" and cfg.ray is not None:
            raise ValueError(
                "--retrieve move needs the local engine: the PACS sends to one host and port, while Ray "
                "tasks retrieve on any node (use C-GET or --from-dicomweb with --engine ray)"
            )
        if self.retrieve == "move" and self._receiver is None:
            assert self.move_port is not None
            self._receiver = MoveReceiver(
                calling_ae, self.move_port, peer_ae=node.ae_title, bind=self.move_bind
            )
        found = find_studies(node, query_for(cfg.filters), calling_ae=calling_ae)  # type: ignore[arg-type]
        report.studies_found = len(found)
        rows = [
            StudyRow(s.study_uid, s.patient_id, s.accession, s.study_date, s.modalities, 0, 0) for s in found
        ]
        jobs = retrieval_jobs(rows, cfg, report, cache, self._fetch)
        logger.info("%d studies from %s to process", len(jobs), node)
        return jobs


def pacs_source(
    spec: str,
    *,
    calling_ae: str = "HYPERCT",
    max_cache_bytes: int | None = None,
    retrieve: str = "get",
    move_port: int | None = None,
    move_bind: str = "0.0.0.0",  # noqa: S104 - see PacsSource
) -> PacsSource:
    """A job source that queries ``spec`` (``AE@host:port``) and retrieves by C-GET or C-MOVE."""
    return PacsSource(
        spec,
        calling_ae=calling_ae,
        max_cache_bytes=max_cache_bytes,
        retrieve=retrieve,
        move_port=move_port,
        move_bind=move_bind,
    )
