"""Query and retrieve studies from a PACS: C-FIND at STUDY level, then C-GET or C-MOVE into a folder.

Used by ``hyperct process --from-pacs AE@host:port``. C-GET is the default: the instances come
back on the association we opened, so the PACS needs no route back to us (no move destination
configured at the PACS, no listening port here, nothing to open in a firewall). C-MOVE
(``--retrieve move``) is for the PACS that offer no C-GET: the PACS opens its own association to
our AE title at the host and port it has configured for it, where :class:`MoveReceiver` (one
storage SCP for the whole run) files each instance under the study being retrieved. The C-FIND keys
are the filters of a batch run (date range, modality, accession); results are de-duplicated by
StudyInstanceUID. pynetdicom does not set ``TCP_NODELAY`` itself, so the caller enables it once
(:func:`app.dimse.network.enable_tcp_nodelay`).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage

from app.dimse.negotiation import Negotiation
from app.dimse.network import RemoteNode, tls_args

logger = logging.getLogger(__name__)

FIND_MODEL = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve Information Model - FIND
GET_MODEL = "1.2.840.10008.5.1.4.1.2.2.3"  # Study Root Query/Retrieve Information Model - GET
MOVE_MODEL = "1.2.840.10008.5.1.4.1.2.2.2"  # Study Root Query/Retrieve Information Model - MOVE
#: C-MOVE failure statuses with the usual cause, said in the error (PS3.4 C.4.2.1.5).
MOVE_HINTS = {
    0xA801: "the PACS does not know our AE title as a move destination",
    0xA701: "the PACS is out of resources",
    0xA702: "the PACS is out of resources",
}
#: The CT classes the pipeline reads, retrieved in any transfer syntax (no transcoding at the PACS).
CT_IMAGE_CLASSES = (CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage)
PENDING = (0xFF00, 0xFF01)
_UID = re.compile(r"^[0-9.]{1,64}$")


class QueryError(ConnectionError):
    """The PACS could not be reached, refused the association, or answered with a failure.

    ``transient``: worth another try (no connection, no answer in time, an abort, a rejection the
    PACS itself calls transient); a permanent rejection (unknown AE title, say) is not.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class StudyQuery:
    """C-FIND keys; empty values match everything."""

    date_from: str = ""  # YYYYMMDD
    date_to: str = ""
    modalities: tuple[str, ...] = ()
    accessions: tuple[str, ...] = ()
    study_uids: tuple[str, ...] = ()

    def identifiers(self) -> Iterator[Dataset]:
        """One identifier per (modality, accession) combination; a UID list rides in each."""
        for modality in self.modalities or ("",):
            for accession in self.accessions or ("",):
                ds = Dataset()
                ds.QueryRetrieveLevel = "STUDY"
                ds.StudyInstanceUID = "\\".join(self.study_uids)
                ds.PatientID = ""
                ds.AccessionNumber = accession
                ds.StudyDate = f"{self.date_from}-{self.date_to}" if (self.date_from or self.date_to) else ""
                ds.ModalitiesInStudy = modality
                ds.NumberOfStudyRelatedInstances = ""
                yield ds


@dataclass(frozen=True)
class FoundStudy:
    """One C-FIND answer (no patient names)."""

    study_uid: str
    patient_id: str = ""
    accession: str = ""
    study_date: str = ""
    modalities: tuple[str, ...] = ()
    instances: int | None = None


@dataclass
class RetrieveReport:
    """What one C-GET or C-MOVE brought back."""

    files: list[Path] = field(default_factory=list)
    completed: int = 0
    failed: int = 0
    warning: int = 0
    status: int | None = None
    bytes: int = 0

    def update(self, status: Dataset) -> None:
        """Take the status and sub-operation counts of a C-GET / C-MOVE response."""
        self.status = int(status.Status)
        for attr, keyword in (
            ("completed", "NumberOfCompletedSuboperations"),
            ("failed", "NumberOfFailedSuboperations"),
            ("warning", "NumberOfWarningSuboperations"),
        ):
            value = status.get(keyword)
            if value is not None:
                setattr(self, attr, int(value))


def _values(ds: Dataset, keyword: str) -> tuple[str, ...]:
    value = ds.get(keyword, "")
    if value in (None, ""):
        return ()
    if isinstance(value, str):
        return tuple(v for v in value.split("\\") if v)
    return tuple(str(v) for v in value)


@contextmanager
def _association(ae: Any, node: RemoteNode, **kwargs: Any) -> Iterator[Any]:
    info = Negotiation()
    handlers = [*kwargs.pop("evt_handlers", []), *info.handlers()]
    try:
        assoc = ae.associate(
            node.host,
            node.port,
            ae_title=node.ae_title,
            tls_args=tls_args(node),
            evt_handlers=handlers,
            **kwargs,
        )
    except OSError as exc:
        raise QueryError(f"cannot connect to {node}: {exc}", transient=True) from exc
    if not assoc.is_established:
        info.settle(assoc)
        text, transient = info.failure(node, assoc)
        raise QueryError(text, transient=transient)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def find_studies(node: RemoteNode, query: StudyQuery, *, calling_ae: str = "HYPERCT") -> list[FoundStudy]:
    """C-FIND at STUDY level; every matching study once, in answer order."""
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(FIND_MODEL)
    found: dict[str, FoundStudy] = {}
    with _association(ae, node) as assoc:
        for identifier in query.identifiers():
            for status, answer in assoc.send_c_find(identifier, FIND_MODEL):
                if not status:
                    raise QueryError(f"C-FIND to {node}: no response (association aborted or timed out)")
                code = int(status.Status)
                if code in PENDING and answer is not None:
                    uid = str(answer.get("StudyInstanceUID", "") or "")
                    if not uid or uid in found:
                        continue
                    if query.study_uids and uid not in query.study_uids:
                        continue
                    n = answer.get("NumberOfStudyRelatedInstances", None)
                    found[uid] = FoundStudy(
                        study_uid=uid,
                        patient_id=str(answer.get("PatientID", "") or ""),
                        accession=str(answer.get("AccessionNumber", "") or ""),
                        study_date=str(answer.get("StudyDate", "") or ""),
                        modalities=_values(answer, "ModalitiesInStudy"),
                        instances=int(n) if n not in (None, "") else None,
                    )
                elif code != 0x0000:
                    raise QueryError(f"C-FIND to {node} failed with status 0x{code:04X}")
    logger.info("C-FIND at %s: %d studies", node, len(found))
    return list(found.values())


def get_study(
    node: RemoteNode,
    study_uid: str,
    folder: Path,
    *,
    calling_ae: str = "HYPERCT",
    max_bytes: int | None = None,
) -> RetrieveReport:
    """C-GET one study into ``folder`` (one file per instance, named by SOPInstanceUID).

    Stops accepting instances (answering "out of resources") once ``max_bytes`` is exceeded, so a
    huge study cannot fill the disk.
    """
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt

    if not _UID.match(study_uid):
        raise ValueError(f"not a UID: {study_uid!r}")
    folder.mkdir(parents=True, exist_ok=True)
    report = RetrieveReport()
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(GET_MODEL)
    roles = []
    for cx in StoragePresentationContexts:  # 120 storage classes + GET: within the 128-context limit
        uid = str(cx.abstract_syntax)
        if uid in CT_IMAGE_CLASSES:
            ae.add_requested_context(uid, ALL_TRANSFER_SYNTAXES)  # no transcoding at the PACS
        else:
            ae.add_requested_context(uid)
        roles.append(_scp_role(uid))

    def on_store(event: Any) -> int:
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        if not _UID.match(sop_uid):
            return 0xC211  # refused: cannot name a file after it
        data = event.encoded_dataset(include_meta=True)
        if max_bytes is not None and report.bytes + len(data) > max_bytes:
            return 0xA702  # refused: out of resources (the retrieval cache is full)
        path = folder / f"{sop_uid}.dcm"
        path.write_bytes(data)
        report.bytes += len(data)
        report.files.append(path)
        return 0x0000

    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    with _association(ae, node, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
        for status, _ in assoc.send_c_get(identifier, GET_MODEL):
            if not status:
                raise QueryError(f"C-GET of study {study_uid} from {node}: no response")
            report.update(status)
    logger.info(
        "C-GET study %s from %s: %d files (%d failed, status 0x%04X)",
        study_uid,
        node,
        len(report.files),
        report.failed,
        report.status or 0,
    )
    return report


class MoveReceiver:
    """The storage SCP that C-MOVE sends to: one per run, on ``port``, filing each instance under the
    folder of the study being retrieved (several at once: the prefetch workers).

    Only the PACS's AE title may call it (``require_calling_aet``); an instance of a study nobody
    is retrieving, or one beyond the study's byte bound, is refused. Files are named by
    SOPInstanceUID, as C-GET names them.
    """

    def __init__(self, ae_title: str, port: int, *, peer_ae: str, bind: str = "0.0.0.0") -> None:  # noqa: S104
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt

        self.ae_title, self.port = ae_title, port
        self._lock = threading.Lock()
        self._studies: dict[str, tuple[Path, RetrieveReport, int | None]] = {}
        ae = AE(ae_title=ae_title)
        ae.require_calling_aet = [peer_ae]
        for cx in StoragePresentationContexts:
            uid = str(cx.abstract_syntax)
            if uid in CT_IMAGE_CLASSES:
                ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)  # stored as the PACS holds them
            else:
                ae.add_supported_context(uid)
        try:
            self._server = ae.start_server(
                (bind, port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
            )
        except OSError as exc:
            raise QueryError(
                f"--move-port {port}: cannot listen for C-MOVE ({exc.strerror or exc})"
            ) from None
        logger.info("C-MOVE destination %s listening on port %d", ae_title, port)

    def _on_store(self, event: Any) -> int:
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        if not _UID.match(sop_uid):
            return 0xC211  # refused: cannot name a file after it
        try:
            study = str(event.dataset.StudyInstanceUID)
        except Exception:  # noqa: BLE001 - an unreadable dataset is refused, not a crash of the SCP
            return 0xC210  # cannot understand
        data = event.encoded_dataset(include_meta=True)
        with self._lock:
            entry = self._studies.get(study)
            if entry is None:
                logger.warning(
                    "C-MOVE: refused instance %s of study %s, which is not being retrieved", sop_uid, study
                )
                return 0xC212  # refused: no retrieval of that study in progress
            folder, report, max_bytes = entry
            if max_bytes is not None and report.bytes + len(data) > max_bytes:
                return 0xA702  # refused: out of resources (the retrieval cache is full)
            report.bytes += len(data)
        path = folder / f"{sop_uid}.dcm"
        path.write_bytes(data)
        with self._lock:
            report.files.append(path)
        return 0x0000

    def expect(self, study_uid: str, folder: Path, max_bytes: int | None) -> RetrieveReport:
        folder.mkdir(parents=True, exist_ok=True)
        report = RetrieveReport()
        with self._lock:
            self._studies[study_uid] = (folder, report, max_bytes)
        return report

    def done(self, study_uid: str) -> None:
        with self._lock:
            self._studies.pop(study_uid, None)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()


def move_study(
    node: RemoteNode,
    study_uid: str,
    folder: Path,
    receiver: MoveReceiver,
    *,
    calling_ae: str = "HYPERCT",
    max_bytes: int | None = None,
) -> RetrieveReport:
    """C-MOVE one study to ``receiver`` (our AE title at the PACS), which files it into ``folder``.

    The final C-MOVE response comes after the PACS's last sub-operation, so every instance it stored
    is on disk when this returns.
    """
    from pynetdicom import AE

    if not _UID.match(study_uid):
        raise ValueError(f"not a UID: {study_uid!r}")
    report = receiver.expect(study_uid, folder, max_bytes)
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(MOVE_MODEL)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    try:
        with _association(ae, node) as assoc:
            for status, _ in assoc.send_c_move(identifier, receiver.ae_title, MOVE_MODEL):
                if not status:
                    raise QueryError(
                        f"C-MOVE of study {study_uid} from {node}: no response (the PACS aborted or timed "
                        f"out: does it know {calling_ae} as a C-MOVE peer and destination?)"
                    )
                report.update(status)
    finally:
        receiver.done(study_uid)
    logger.info("C-MOVE study %s from %s to %s: %d files (%d failed, status 0x%04X)", study_uid, node,
                receiver.ae_title, len(report.files), report.failed, report.status or 0)  # fmt: skip
    return report


def _scp_role(uid: str) -> Any:
    from pynetdicom import build_role

    return build_role(uid, scp_role=True)
