"""``--from-dicomweb URL``: the studies of a batch run are listed by QIDO-RS and fetched by WADO-RS.

The same shape as ``--from-pacs`` (:mod:`app.batch.pacs`), over HTTP with the ``dicomweb-client``
library: the listing sends the date range, modality, accession and StudyInstanceUID filters to the
server (paged with ``limit``/``offset``, so a 500,000-study archive is never one answer), the same
:class:`~app.batch.filters.StudyFilter` checks each answer again here, and each study is fetched
by whoever prepares it — a prefetch thread of the local engine, or the Ray task on a worker — into
``OUT/_batch/cache/dicomweb/<StudyInstanceUID>/``, deleted once the study is recorded.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable, Iterator
from functools import partial
from itertools import product
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from app.batch.filters import StudyFilter
from app.batch.index import StudyRow
from app.batch.runner import BatchConfig, BatchReport, StudyJob, retrieval_jobs

logger = logging.getLogger(__name__)

PAGE = 500  # QIDO-RS answers per request
TIMEOUT_S = 60.0
FIELDS = ("StudyInstanceUID", "PatientID", "AccessionNumber", "StudyDate", "ModalitiesInStudy")
_TAGS = {
    "StudyInstanceUID": "0020000D",
    "PatientID": "00100020",
    "AccessionNumber": "00080050",
    "StudyDate": "00080020",
    "ModalitiesInStudy": "00080061",
}


def _client(url: str, timeout_s: float = TIMEOUT_S) -> Any:
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(url.rstrip("/"), timeout=timeout_s)


def _check_url(url: str) -> None:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"--from-dicomweb {url}: expected an http(s):// URL of a DICOMweb root")


def check_server(url: str, *, timeout_s: float = 10.0) -> None:
    """One QIDO-RS request (``limit=1``): ConnectionError in one line when nothing answers at ``url``
    or it is not a DICOMweb root, before the run indexes or loads anything."""
    import requests

    _check_url(url)
    try:
        client = _client(url, timeout_s)
        # dicomweb-client retries with exponential back-off (≈ 30 s to give up on a refused
        # connection): right for fetches in a long run, wrong for the one check at start.
        client.set_http_retry_params(retry=False)
        client.search_for_studies(limit=1, fields=["StudyInstanceUID"])
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise ConnectionError(
            f"the DICOMweb server at {url} answered HTTP {status} to QIDO-RS (is this its DICOMweb root?)"
        ) from None
    except (requests.RequestException, OSError) as exc:
        text = str(exc)
        errno = re.search(r"\[Errno -?\d+\] [^'\")]+", text)  # requests nests urllib3's reason deep
        reason = errno.group(0) if errno else (text.splitlines()[0][:200] if text else type(exc).__name__)
        raise ConnectionError(f"cannot reach the DICOMweb server at {url}: {reason}") from None


def _text(answer: dict[str, Any], keyword: str) -> str:
    values = answer.get(_TAGS[keyword], {}).get("Value") or []
    return str(values[0]).strip() if values else ""


def _all(answer: dict[str, Any], keyword: str) -> tuple[str, ...]:
    values = answer.get(_TAGS[keyword], {}).get("Value") or []
    return tuple(sorted({str(v).strip().upper() for v in values if str(v).strip()}))


def queries(filters: StudyFilter) -> list[dict[str, str]]:
    """QIDO-RS search filters of a batch filter: one query per modality × accession × UID listed."""
    base: dict[str, str] = {}
    if filters.date_from or filters.date_to:
        base["StudyDate"] = f"{filters.date_from}-{filters.date_to}"
    axes: list[list[tuple[str, str] | None]] = [
        [("ModalitiesInStudy", m) for m in sorted(filters.modalities)] or [None],
        [("AccessionNumber", a) for a in sorted(filters.accessions)] or [None],
        [("StudyInstanceUID", u) for u in sorted(filters.study_uids)] or [None],
    ]
    return [{**base, **dict(kv for kv in combo if kv is not None)} for combo in product(*axes)]


def search_studies(url: str, filters: StudyFilter, *, page: int = PAGE) -> list[StudyRow]:
    """Every study the server lists for ``filters``, de-duplicated by StudyInstanceUID, in a stable order."""
    client = _client(url)
    found: dict[str, StudyRow] = {}
    for query in queries(filters):
        offset = 0
        while True:
            answers = client.search_for_studies(
                search_filters=query, fields=list(FIELDS), limit=page, offset=offset
            )
            for answer in answers:
                uid = _text(answer, "StudyInstanceUID")
                if uid and uid not in found:
                    found[uid] = StudyRow(
                        uid,
                        _text(answer, "PatientID"),
                        _text(answer, "AccessionNumber"),
                        _text(answer, "StudyDate"),
                        _all(answer, "ModalitiesInStudy"),
                        0,
                        0,
                    )
            if len(answers) < page:
                break
            offset += len(answers)
    return sorted(found.values(), key=lambda s: (s.study_date, s.study_uid))


def _instances(url: str, study_uid: str) -> Iterator[Any]:
    """The study's instances as the server stores them (``transfer-syntax=*``: no transcoding)."""
    instances: Iterator[Any] = _client(url).iter_study(study_uid, media_types=(("application/dicom", "*"),))
    return instances


def fetch_study(url: str, study_uid: str, folder: Path, *, max_bytes: int | None = None) -> list[Path]:
    """WADO-RS the whole study into ``folder`` (one file per instance); raises when nothing came or
    the study would not fit in ``max_bytes`` (``--cache-gb``)."""
    import pydicom

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    files: list[Path] = []
    total = 0
    for ds in _instances(url, study_uid):
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        files.append(path)
        total += path.stat().st_size
        if max_bytes is not None and total > max_bytes:
            shutil.rmtree(folder, ignore_errors=True)
            raise ValueError(f"study larger than the cache limit ({max_bytes / 1e9:.1f} GB, --cache-gb)")
    if not files:
        raise ConnectionError(f"WADO-RS at {url} brought no instance of the study")
    return files


def dicomweb_source(
    url: str, *, max_cache_bytes: int | None = None
) -> Callable[[BatchConfig, BatchReport], list[StudyJob]]:
    """A job source for :func:`app.batch.runner.run_batch` that lists the studies at ``url``."""
    _check_url(url)

    def source(cfg: BatchConfig, report: BatchReport) -> list[StudyJob]:
        cache = cfg.work_dir / "cache" / "dicomweb"
        shutil.rmtree(cache, ignore_errors=True)  # leftovers of an interrupted run
        rows = search_studies(url, cfg.filters)
        report.studies_found = len(rows)
        fetch = partial(fetch_study, url, max_bytes=max_cache_bytes)
        jobs = retrieval_jobs(rows, cfg, report, cache, fetch)
        logger.info("%d studies from %s to process", len(jobs), url)
        return jobs

    return source
