"""``--from-pacs``: the studies of a batch run come from a C-FIND and are retrieved one at a time.

Each study is fetched (C-GET) by the prefetch worker that prepares it, into
``OUT/_batch/cache/pacs/<StudyInstanceUID>/``, and deleted once its results are recorded, so the
cache never holds more than the prefetch queue (``--prefetch`` + 1 studies) and no study larger
than ``--cache-gb``. The C-FIND applies the date, modality and accession filters at the PACS; the
same :class:`~app.batch.filters.StudyFilter` then checks each answer again here.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path

from app.batch.filters import StudyFilter
from app.batch.index import StudyRow
from app.batch.runner import BatchConfig, BatchReport, StudyJob

logger = logging.getLogger(__name__)


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


def pacs_source(
    spec: str, *, calling_ae: str = "HYPERCT", max_cache_bytes: int | None = None
) -> Callable[[BatchConfig, BatchReport], list[StudyJob]]:
    """A job source for :func:`app.batch.runner.run_batch` that queries ``spec`` (``AE@host:port``)."""
    from app.dimse.network import RemoteNode, enable_tcp_nodelay
    from app.dimse.query import find_studies, get_study

    node = RemoteNode.parse(spec)  # ValueError names what is wrong with the address

    def source(cfg: BatchConfig, report: BatchReport) -> list[StudyJob]:
        enable_tcp_nodelay()
        cache = cfg.work_dir / "cache" / "pacs"
        shutil.rmtree(cache, ignore_errors=True)  # leftovers of an interrupted run
        found = find_studies(node, query_for(cfg.filters), calling_ae=calling_ae)  # type: ignore[arg-type]
        report.studies_found = len(found)
        jobs = []
        for study in found:
            row = StudyRow(
                study.study_uid, study.patient_id, study.accession, study.study_date, study.modalities, 0, 0
            )
            why = cfg.filters.why_excluded(row)
            if why is not None:
                report.excluded[why] += 1
                continue
            folder = cache / study.study_uid

            def fetch(uid: str = study.study_uid, folder: Path = folder) -> list[Path]:
                got = get_study(node, uid, folder, calling_ae=calling_ae, max_bytes=max_cache_bytes)
                if not got.files:
                    raise ConnectionError(
                        f"C-GET from {node} brought no instance (status 0x{got.status or 0:04X}, {got.failed} failed)"
                    )
                if got.failed:
                    logger.warning("study %s: %d instance(s) not retrieved", uid, got.failed)
                return list(got.files)

            jobs.append(
                StudyJob(
                    study.study_uid,
                    study.patient_id,
                    study.accession,
                    study.study_date,
                    files=fetch,
                    release=partial(shutil.rmtree, folder, ignore_errors=True),
                    retrieve=True,
                )
            )
        logger.info("%d studies from %s to process", len(jobs), node)
        return jobs

    return source
