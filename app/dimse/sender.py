"""C-STORE SCU: send result files (SR, SEG, CT, …) to a remote node, report per-file status.

The node sends from a persistent outbox outside the application graph, so the main API is the
function :func:`send_files`. It never raises for what the network or the peer does: every outcome is
in the :class:`SendReport`, whose ``error`` classifies it as transient (retry later with a
:class:`RetryPolicy`) or permanent (retrying cannot help). ``report.raise_for_status()`` turns that
into an exception for callers that prefer one.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

from pydantic import Field
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from app.dimse.negotiation import Negotiation
from app.dimse.network import RemoteNode, enable_tcp_nodelay, tls_args, validate_ae_title
from operators.settings import Settings

LOGGER = logging.getLogger(__name__)

__all__ = [
    "FileResult",
    "PermanentSendError",
    "RetryPolicy",
    "SendError",
    "SendReport",
    "TransientSendError",
    "echo",
    "send_files",
]

MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are the odd numbers 1-255


class SendError(Exception):
    """Sending failed; ``transient`` says whether a later retry may succeed."""

    transient: bool = False


class TransientSendError(SendError):
    """Connection refused/reset/timed out, association dropped or peer out of resources: retry."""

    transient = True


class PermanentSendError(SendError):
    """Association rejected permanently (e.g. unknown called AE), or the peer refused the files."""

    transient = False


@dataclass(frozen=True)
class FileResult:
    """What happened to one file. ``status`` is the peer's DIMSE status, None when never sent."""

    path: Path
    sop_instance_uid: str | None
    sop_class_uid: str | None
    transfer_syntax_uid: str | None
    status: int | None = None
    error: str | None = None
    transient: bool = False  # for an undelivered file: may a retry deliver it?

    @property
    def category(self) -> str:
        """``Success``, ``Warning``, ``Failure`` (pynetdicom's categories) or ``Not sent``."""
        return "Not sent" if self.status is None else code_to_category(self.status)

    @property
    def delivered(self) -> bool:
        """Stored by the peer (success or warning status)."""
        return self.category in (STATUS_SUCCESS, STATUS_WARNING)


@dataclass(frozen=True)
class SendReport:
    """Per-file results of one :func:`send_files` call and the overall classified error."""

    destination: RemoteNode | str  # a peer AE, or a DICOMweb root (app/stowrs.py)
    results: tuple[FileResult, ...]
    error: SendError | None = None
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and all(r.delivered for r in self.results)

    @property
    def transient(self) -> bool:
        """Not everything was delivered, and retrying may help."""
        return self.error is not None and self.error.transient

    @property
    def delivered(self) -> tuple[FileResult, ...]:
        return tuple(r for r in self.results if r.delivered)

    @property
    def undelivered(self) -> tuple[FileResult, ...]:
        return tuple(r for r in self.results if not r.delivered)

    @property
    def warnings(self) -> tuple[FileResult, ...]:
        return tuple(r for r in self.results if r.category == STATUS_WARNING)

    def raise_for_status(self) -> None:
        if self.error is not None:
            raise self.error


# --------------------------------------------------------------------------------------------------
# Retry policy
# --------------------------------------------------------------------------------------------------


class RetryPolicy(Settings):
    """Exponential backoff for the outbox: ``initial_delay_s * factor**(attempt-1)``, capped.

    ``jitter`` spreads each delay uniformly by ±``jitter`` (a fraction) so that many jobs failing
    together do not retry together; with ``seed`` set the jitter is a pure function of
    ``(seed, attempt)``, which makes it reproducible (tests, restarts). The node file's
    ``outbox.retry`` section is this model.
    """

    section: ClassVar[str] = "retry"

    max_attempts: int = Field(default=8, ge=1)
    initial_delay_s: float = Field(default=10.0, ge=0)
    factor: float = Field(default=2.0, ge=1)
    max_delay_s: float = Field(default=3600.0, ge=0)
    jitter: float = Field(default=0.0, ge=0, lt=1)
    seed: int | None = None

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based) before the next one."""
        if attempt < 1:
            raise ValueError(f"attempt is 1-based, not {attempt}")
        # Cap the exponent before computing so huge attempt numbers cannot overflow.
        base = self.initial_delay_s
        for _ in range(attempt - 1):
            base *= self.factor
            if base >= self.max_delay_s:
                break
        base = min(base, self.max_delay_s)
        if self.jitter:
            rng = random.Random(f"{self.seed}:{attempt}") if self.seed is not None else random
            base *= 1.0 + rng.uniform(-self.jitter, self.jitter)
        return min(base, self.max_delay_s)

    def exhausted(self, attempts: int) -> bool:
        """True once ``attempts`` attempts have been made and no further one is allowed."""
        return attempts >= self.max_attempts


# --------------------------------------------------------------------------------------------------
# Sending
# --------------------------------------------------------------------------------------------------


@dataclass
class _File:
    path: Path
    sop_class: UID
    sop_instance: UID
    transfer_syntax: UID


def _read_header(path: Path) -> _File:
    """SOP class/instance and transfer syntax from the file meta (falls back to the dataset)."""
    meta = read_file_meta_info(path)
    sop_class = meta.get("MediaStorageSOPClassUID")
    sop_instance = meta.get("MediaStorageSOPInstanceUID")
    ts = meta.get("TransferSyntaxUID")
    if not (sop_class and sop_instance):
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
        sop_class = sop_class or ds.get("SOPClassUID")
        sop_instance = sop_instance or ds.get("SOPInstanceUID")
    missing = [
        name
        for name, value in (
            ("SOPClassUID", sop_class),
            ("SOPInstanceUID", sop_instance),
            ("TransferSyntaxUID", ts),
        )
        if not value
    ]
    if missing:
        raise InvalidDicomError(f"{path.name} lacks {', '.join(missing)}")
    return _File(path, UID(str(sop_class)), UID(str(sop_instance)), UID(str(ts)))


def _contexts_for(files: Sequence[_File]) -> list[tuple[UID, UID]]:
    """(SOP class, transfer syntax) pairs to propose, one per presentation context, in file order.

    Each file's own transfer syntax is proposed so it can go out unchanged; uncompressed files also
    get Implicit VR Little Endian (every SCP must accept it) as a fallback pynetdicom converts to.
    """
    pairs: dict[tuple[UID, UID], None] = {}
    for f in files:
        pairs[(f.sop_class, f.transfer_syntax)] = None
    for f in files:
        if not f.transfer_syntax.is_compressed and not f.transfer_syntax.is_deflated:
            pairs[(f.sop_class, ImplicitVRLittleEndian)] = None
    return list(pairs)


def _batches(files: Sequence[_File]) -> list[list[_File]]:
    """Split files so that no association needs more than 128 presentation contexts."""
    batches: list[list[_File]] = []
    current: list[_File] = []
    contexts: set[tuple[UID, UID]] = set()
    for f in files:
        needed = set(_contexts_for([f]))
        if current and len(contexts | needed) > MAX_CONTEXTS:
            batches.append(current)
            current, contexts = [], set()
        current.append(f)
        contexts |= needed
    if current:
        batches.append(current)
    return batches


def _associate(
    destination: RemoteNode, calling_ae: str, contexts: Sequence[tuple[UID, UID]], timeout_s: float
) -> tuple[Association, Negotiation]:
    enable_tcp_nodelay()
    ae = AE(ae_title=validate_ae_title(calling_ae, "calling AE title"))
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    ae.requested_contexts = [build_context(sop, ts) for sop, ts in contexts]
    info = Negotiation()
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        tls_args=tls_args(destination),
        evt_handlers=info.handlers(),
    )
    info.settle(assoc)
    return assoc, info


def _association_error(destination: RemoteNode, assoc: Association, info: Negotiation) -> SendError:
    """Classify a failed association: only a permanent A-ASSOCIATE-RJ or no usable context is permanent."""
    text, transient = info.failure(destination, assoc)
    return TransientSendError(text) if transient else PermanentSendError(text)


def _file_error(status: int) -> tuple[str, bool]:
    """(message, transient) for a failure status; 0xA7xx (out of resources) may clear up."""
    transient = 0xA700 <= status <= 0xA7FF
    kind = "out of resources" if transient else "refused"
    return f"peer {kind}: status 0x{status:04X}", transient


def _send_batch(
    destination: RemoteNode, batch: Sequence[_File], calling_ae: str, timeout_s: float
) -> tuple[list[FileResult], SendError | None]:
    assoc, info = _associate(destination, calling_ae, _contexts_for(batch), timeout_s)
    if not assoc.is_established:
        error = _association_error(destination, assoc, info)
        LOGGER.warning("association with %s failed: %s", destination, error)
        return [_not_sent(f, str(error), error.transient) for f in batch], error
    results: list[FileResult] = []
    try:
        for i, f in enumerate(batch):
            result = _send_one(assoc, f) if assoc.is_established else None
            if result is not None and not (result.status is None and result.transient):
                results.append(result)
                continue
            # No response, or the association is gone: pynetdicom has aborted it; stop here.
            why = result.error if result is not None else "association no longer established"
            error = TransientSendError(f"{destination} dropped the association: {why}")
            LOGGER.warning("%s (after %d of %d files)", error, i, len(batch))
            results += [_not_sent(g, str(error), True) for g in batch[i:]]
            return results, error
    finally:
        if assoc.is_established:
            assoc.release()
    return results, None


def _send_one(assoc: Association, f: _File) -> FileResult:
    base = _not_sent(f, None, False)
    try:
        ds = dcmread(f.path)
    except (OSError, InvalidDicomError) as exc:
        return replace(base, error=f"cannot read {f.path.name}: {exc}")
    try:
        status_ds: Dataset = assoc.send_c_store(ds)
    except ValueError as exc:  # no accepted presentation context for this SOP class/TS
        return replace(base, error=f"not accepted by peer: {exc}")
    except RuntimeError:  # the association ended between our check and the send
        return replace(base, error="association no longer established", transient=True)
    if "Status" not in status_ds:
        why = "aborted" if assoc.is_aborted else "no C-STORE response (timeout or connection lost)"
        return replace(base, error=why, transient=True)
    status = int(status_ds.Status)
    category = code_to_category(status)
    if category == STATUS_SUCCESS:
        LOGGER.debug("stored %s", f.sop_instance)
        return replace(base, status=status)
    if category == STATUS_WARNING:
        LOGGER.info("stored %s with warning status 0x%04X", f.sop_instance, status)
        return replace(base, status=status, error=f"warning status 0x{status:04X}")
    message, transient = _file_error(status)
    LOGGER.warning("%s: %s", f.sop_instance, message)
    return replace(base, status=status, error=message, transient=transient)


def _not_sent(f: _File, error: str | None, transient: bool) -> FileResult:
    return FileResult(
        f.path, str(f.sop_instance), str(f.sop_class), str(f.transfer_syntax), None, error, transient
    )


def _overall_error(results: Sequence[FileResult]) -> SendError | None:
    undelivered = [r for r in results if not r.delivered]
    if not undelivered:
        return None
    summary = "; ".join(f"{r.sop_instance_uid or r.path.name}: {r.error}" for r in undelivered[:3])
    more = f" (and {len(undelivered) - 3} more)" if len(undelivered) > 3 else ""
    text = f"{len(undelivered)} of {len(results)} files not stored: {summary}{more}"
    if any(r.transient for r in undelivered):
        return TransientSendError(text)
    return PermanentSendError(text)


def send_files(
    destination: RemoteNode,
    files: Sequence[Path],
    *,
    calling_ae: str = "HYPERCT",
    timeout_s: float = 30,
) -> SendReport:
    """C-STORE ``files`` to ``destination`` on one association (more if >128 contexts are needed).

    Proposes exactly the SOP classes and transfer syntaxes the files have (headers only are read to
    learn them) and sends every file in its own transfer syntax, so datasets arrive unchanged. Never
    raises for network or peer problems: see :class:`SendReport` (``error`` is the classified
    outcome, ``undelivered`` the files to retry). An unreadable file is a permanent per-file failure.
    """
    started = time.monotonic()
    headers: list[_File] = []
    results: dict[Path, FileResult] = {}
    for path in map(Path, files):
        try:
            headers.append(_read_header(path))
        except (OSError, InvalidDicomError, ValueError) as exc:
            LOGGER.error("cannot send %s: %s", path, exc)
            results[path] = FileResult(path, None, None, None, error=f"cannot read header: {exc}")
    association_error: SendError | None = None
    for batch in _batches(headers):
        batch_results, association_error = _send_batch(destination, batch, calling_ae, timeout_s)
        results.update((r.path, r) for r in batch_results)
        if association_error is not None:
            rest = headers[headers.index(batch[-1]) + 1 :]
            results.update(
                (f.path, _not_sent(f, str(association_error), association_error.transient)) for f in rest
            )
            break
    ordered = tuple(results[Path(p)] for p in files)
    error = association_error if association_error is not None else _overall_error(ordered)
    report = SendReport(destination, ordered, error, time.monotonic() - started)
    LOGGER.info(
        "sent %d/%d files to %s in %.2f s%s",
        len(report.delivered),
        len(ordered),
        destination,
        report.elapsed_s,
        f": {error}" if error else "",
    )
    return report


def echo(destination: RemoteNode, calling_ae: str = "HYPERCT", *, timeout_s: float = 10) -> bool:
    """C-ECHO ``destination``: True when it answers with success."""
    enable_tcp_nodelay()
    ae = AE(ae_title=validate_ae_title(calling_ae, "calling AE title"))
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    ae.add_requested_context(Verification)
    assoc = ae.associate(
        destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args(destination)
    )
    if not assoc.is_established:
        LOGGER.info("C-ECHO to %s: no association", destination)
        return False
    try:
        status = assoc.send_c_echo()
        return int(status.get("Status", -1)) == 0x0000
    finally:
        if assoc.is_established:
            assoc.release()
