"""The node's C-STORE / C-ECHO SCP (pynetdicom): small handlers with explicit status codes.

Why each rule:

* **Durable before success.** 0x0000 goes back only after :meth:`InstanceStore.put` returned, and
  a store returns only once the instance is on disk, a power loss included (the node's
  :class:`app.node.inbox.Inbox`: temp file, fsync, rename, fsync of the folder, then its row
  committed in SQLite with synchronous=FULL). A sender that got success may delete its copy. When
  anything on that path fails the answer is 0xA700 (out of resources), never success, and nothing
  is recorded: the sender keeps the instance and retries. The receiver knows the store only through
  the small :class:`InstanceStore` protocol, not the node's database.
* **Raw bytes.** The dataset is written as it arrived (``event.encoded_dataset()``), never decoded
  and re-encoded: faster, and the stored file is byte-for-byte what the PACS sent. Only the header
  is parsed (no pixels) to learn the study, patient and kind.
* **No loops, no mixing.** Only CT images trigger processing; the node's own SR/SEG/maps (recognised by
  :func:`operators.uids.is_own_output`) and any other SR/SEG are stored but never trigger. The
  state quarantines a study whose instances disagree on PatientID/issuer.
* **Allow-list at association.** Unknown calling AEs (and, when configured, known AEs from another
  host) are rejected with A-ASSOCIATE-RJ "calling AE title not recognised" before any data flows;
  an association addressed to another called AE gets "called AE title not recognised". Both are
  logged (AE titles and host only) and counted: a peer configured with our address but the wrong
  AE title must be visible from this side too, not only in the peer's log.
* **One bad instance fails alone.** An instance that cannot be parsed gets 0xC210 (cannot
  understand); the association and the rest of the study go on.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from pydantic import Field
from pydicom import dcmread
from pydicom.uid import (
    JPEG2000,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # generated at import

from app.dimse.network import AETitle, AllowedCaller, TlsConfig, enable_tcp_nodelay
from operators.settings import CommaList, Settings
from operators.uids import is_own_output

logger = logging.getLogger(__name__)

# C-STORE statuses (PS3.4 Annex B.2.3)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC210
#: The SOP Instance UID already belongs to another study: refused, the first one stays.
UID_CONFLICT = 0xC212
# A-ASSOCIATE-RJ reasons given by the service user (PS3.8 Table 9-21)
CALLING_AE_UNKNOWN = 0x03
CALLED_AE_UNKNOWN = 0x07

#: Storage SOP classes a chest CT study brings (plus results and dose reports that travel with it).
STORAGE_SOP_CLASSES: dict[str, str] = {
    "CT Image": CTImageStorage,
    "Enhanced CT Image": EnhancedCTImageStorage,
    "Legacy Converted Enhanced CT Image": "1.2.840.10008.5.1.4.1.1.2.2",
    "Secondary Capture Image": "1.2.840.10008.5.1.4.1.1.7",
    "Multi-frame Grayscale Word Secondary Capture": "1.2.840.10008.5.1.4.1.1.7.3",
    "Multi-frame True Color Secondary Capture": "1.2.840.10008.5.1.4.1.1.7.4",
    "Basic Text SR": "1.2.840.10008.5.1.4.1.1.88.11",
    "Enhanced SR": "1.2.840.10008.5.1.4.1.1.88.22",
    "Comprehensive SR": "1.2.840.10008.5.1.4.1.1.88.33",
    "Comprehensive 3D SR": "1.2.840.10008.5.1.4.1.1.88.34",
    "X-Ray Radiation Dose SR": "1.2.840.10008.5.1.4.1.1.88.67",
    "Key Object Selection": "1.2.840.10008.5.1.4.1.1.88.59",
    "Segmentation": "1.2.840.10008.5.1.4.1.1.66.4",
    "Parametric Map": "1.2.840.10008.5.1.4.1.1.30",
    "Grayscale Softcopy Presentation State": "1.2.840.10008.5.1.4.1.1.11.1",
    "Encapsulated PDF": "1.2.840.10008.5.1.4.1.1.104.1",
}
#: Uncompressed first (preferred when a peer proposes several), then the common compressed ones.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)
#: Only these SOP classes can start processing (and only when not our own output).
TRIGGER_SOP_CLASSES = frozenset({CTImageStorage, EnhancedCTImageStorage, "1.2.840.10008.5.1.4.1.1.2.2"})
_HEADER_TAGS = (
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality", "PatientID",
    "IssuerOfPatientID", "Manufacturer", "ManufacturerDeviceClassUID", "DeviceUID", "ContentSequence",
)  # fmt: skip


class ReceiverOptions(Settings):
    """The SCP's settings (the node file's ``receiver`` section).

    ``allowed_callers``: calling AEs allowed to associate, ``AE`` or ``AE@host`` (host checked too).
    Empty: nobody, unless ``accept_any_caller`` (for a closed test bench only).
    """

    section: ClassVar[str] = "receiver"

    ae_title: AETitle = "HYPERCT"
    bind: str = "127.0.0.1"  # loopback unless the site opens it on purpose
    port: int = Field(default=11112, ge=0, le=65535)  # 0: any free port (tests)
    allowed_callers: CommaList[AllowedCaller] = ()
    accept_any_caller: bool = False
    max_pdu: int = Field(default=131072, ge=0)
    max_associations: int = Field(default=16, ge=1)
    tls: TlsConfig = TlsConfig()

    def admits(self, calling_ae: str, host: str) -> bool:
        """Whether ``calling_ae`` at ``host`` may store here: the allow-list of C-STORE, also asked
        for a DICOMweb STOW-RS request (which stands for a configured calling AE)."""
        return self.accept_any_caller or any(c.matches(calling_ae, host) for c in self.allowed_callers)


@dataclass(frozen=True)
class ReceivedInstance:
    """What the handler learned from one instance's header (no pixels): its identity and kind."""

    study_uid: str
    sop_uid: str
    series_uid: str
    sop_class_uid: str
    modality: str
    transfer_syntax: str
    patient_id: str
    issuer: str
    triggers: bool
    own_output: bool
    calling_ae: str


class Stored(Protocol):
    """What :meth:`InstanceStore.put` answers: ``status`` new | duplicate | replaced | conflict."""

    @property
    def status(self) -> str: ...
    @property
    def message(self) -> str: ...


class InstanceStore(Protocol):
    """Where the receiver puts instances (the node's is :class:`app.node.inbox.Inbox`)."""

    def check(self, instance: ReceivedInstance) -> None:
        """Raise ValueError when the instance cannot be stored, before anything is written."""

    def put(self, instance: ReceivedInstance, data: bytes) -> Stored:
        """Store ``data`` (file meta + dataset as received) durably — file and record on disk, a
        power loss included — before returning; raise on any failure, leaving nothing recorded.
        ``conflict``: the SOP Instance UID belongs to another study; nothing was kept."""

    def note_error(
        self, kind: str, message: str, study_uid: str | None = None, sop_uid: str | None = None
    ) -> None:
        """Keep a note of an instance that could not be stored (must not raise)."""


@dataclass(frozen=True)
class StoreOutcome:
    """The answer to one instance: its status (the C-STORE status, also a STOW-RS FailureReason),
    what could be read of its identity (empty when nothing could), and why it failed."""

    status: int
    sop_class_uid: str = ""
    sop_uid: str = ""
    message: str = ""


def store_encoded(store: InstanceStore, raw: bytes, *, transfer_syntax: str, calling_ae: str,
                  request_uid: str | None = None, counters: Counter | None = None) -> StoreOutcome:  # fmt: skip
    """Store one encoded instance (file meta + dataset, as received) under the receiver's rules:
    header parsed (no pixels), identity checked, durable in ``store`` before success; counted.

    The one path of C-STORE and DICOMweb STOW-RS, so both give the same answers: 0xC210 for an
    instance that cannot be understood (or whose SOP Instance UID is not ``request_uid``), 0xA700
    when the store fails (nothing recorded), 0xC212 for a SOP Instance UID of another study."""
    counters = counters if counters is not None else Counter()
    try:
        header = read_header(raw)
        sop_class, sop_uid = str(header.get("SOPClassUID", "")), str(header.get("SOPInstanceUID", ""))
    except Exception as exc:  # noqa: BLE001 - any parse problem is this instance's failure only
        header, sop_class, sop_uid = None, "", request_uid or ""
        problem: Exception | None = exc
    else:
        problem = None
    instance: ReceivedInstance | None = None
    if header is not None:
        try:
            instance = describe_instance(header, transfer_syntax, calling_ae)
            if request_uid is not None and instance.sop_uid != request_uid:
                raise ValueError(
                    f"dataset SOPInstanceUID {instance.sop_uid} differs from the request's {request_uid}"
                )
            store.check(instance)
        except Exception as exc:  # noqa: BLE001
            problem = exc
    if problem is not None or instance is None:
        counters["instances_failed"] += 1
        logger.warning("instance %s from %s not understood: %s", sop_uid or "?", calling_ae, problem)
        store.note_error("receive", f"cannot understand instance: {problem}", None, sop_uid or None)
        return StoreOutcome(CANNOT_UNDERSTAND, sop_class, sop_uid, f"cannot understand instance: {problem}")
    try:
        result = store.put(instance, raw)
    except Exception as exc:  # noqa: BLE001 - disk or database full, I/O error: never success
        counters["instances_failed"] += 1
        logger.error("cannot store %s of study %s: %s", instance.sop_uid, instance.study_uid, exc)
        return StoreOutcome(OUT_OF_RESOURCES, sop_class, sop_uid, f"cannot store: {exc}")
    if result.status == "conflict":
        counters["instances_failed"] += 1
        logger.error("%s", result.message)
        return StoreOutcome(UID_CONFLICT, sop_class, sop_uid, result.message)
    counters["instances_received"] += 1
    counters[f"instances_{result.status}"] += 1
    logger.debug("stored %s (%s) of study %s from %s", instance.sop_uid, result.status, instance.study_uid,
                 calling_ae)  # fmt: skip
    return StoreOutcome(SUCCESS, sop_class, sop_uid)


class StoreHandler:
    """``EVT_C_STORE``: the store makes it durable, then we answer; see the module docstring."""

    def __init__(self, store: InstanceStore, *, counters: Counter | None = None) -> None:
        self.store = store
        self.counters = counters if counters is not None else Counter()

    def __call__(self, event: evt.Event) -> int:
        calling_ae = event.assoc.requestor.ae_title.strip()
        request_uid = str(getattr(event.request, "AffectedSOPInstanceUID", ""))  # a C-STORE request
        try:
            raw = event.encoded_dataset(include_meta=True)
        except Exception as exc:  # noqa: BLE001
            self.counters["instances_failed"] += 1
            logger.warning("instance %s from %s not understood: %s", request_uid, calling_ae, exc)
            self.store.note_error("receive", f"cannot understand instance: {exc}", None, request_uid)
            return CANNOT_UNDERSTAND
        return store_encoded(
            self.store, raw, transfer_syntax=str(event.context.transfer_syntax), calling_ae=calling_ae,
            request_uid=request_uid, counters=self.counters,
        ).status  # fmt: skip


def read_header(source: Any) -> Any:
    """The header of an encoded instance (bytes or a path), without pixel data."""
    if isinstance(source, bytes | bytearray):
        source = io.BytesIO(source)
    return dcmread(source, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS))


def describe_instance(header: Any, transfer_syntax: str, calling_ae: str) -> ReceivedInstance:
    """The identity and kind of an instance (raises if the UIDs are missing)."""
    sop_class = str(header.get("SOPClassUID", ""))
    own = is_own_output(header)
    modality = str(header.get("Modality", ""))
    return ReceivedInstance(
        study_uid=str(header.StudyInstanceUID),
        sop_uid=str(header.SOPInstanceUID),
        series_uid=str(header.get("SeriesInstanceUID", "")),
        sop_class_uid=sop_class,
        modality=modality,
        transfer_syntax=transfer_syntax,
        patient_id=str(header.get("PatientID", "")),
        issuer=str(header.get("IssuerOfPatientID", "")),
        triggers=sop_class in TRIGGER_SOP_CLASSES and not own and modality == "CT",
        own_output=own,
        calling_ae=calling_ae,
    )


class DicomReceiver:
    """The SCP: start/stop a pynetdicom server with our contexts, allow-list and handlers."""

    def __init__(self, options: ReceiverOptions, store: InstanceStore,
                 store_handler: Callable[[evt.Event], int] | None = None) -> None:  # fmt: skip
        self.options = options
        self.counters: Counter = Counter()
        self.store_handler = store_handler or StoreHandler(store, counters=self.counters)
        self._server: Any = None
        self._lock = threading.Lock()

    # -- handlers ---------------------------------------------------------------------------------
    def handle_requested(self, event: evt.Event) -> None:
        """Reject associations addressed to another AE title, then unknown calling AEs (or known
        AEs from the wrong host), before negotiation."""
        primitive = event.assoc.requestor.primitive
        assert primitive is not None  # EVT_REQUESTED fires once the A-ASSOCIATE-RQ has arrived
        calling = str(primitive.calling_ae_title).strip()
        called = str(primitive.called_ae_title).strip()
        host = str(event.assoc.requestor.address)
        if called != self.options.ae_title:
            why = f"called AE {called!r} is not ours ({self.options.ae_title!r})"
            self._reject(event, CALLED_AE_UNKNOWN, why, calling, host)
        elif not self.options.admits(calling, host):
            self._reject(event, CALLING_AE_UNKNOWN, "calling AE not in the allow-list", calling, host)

    def _reject(self, event: evt.Event, reason: int, why: str, calling: str, host: str) -> None:
        """A-ASSOCIATE-RJ (rejected-permanent, service-user, ``reason``), logged and counted."""
        self.counters["associations_rejected"] += 1
        logger.warning("association from %r at %s rejected: %s", calling, host, why)
        event.assoc.acse.send_reject(0x01, 0x01, reason)
        event.assoc.kill()  # waits until the DUL has sent the A-ASSOCIATE-RJ (as pynetdicom's own checks do)

    @staticmethod
    def handle_echo(event: evt.Event) -> int:
        return SUCCESS

    def _store(self, event: evt.Event) -> int:
        return self.store_handler(event)

    # -- life cycle -------------------------------------------------------------------------------
    def make_ae(self) -> AE:
        ae = AE(ae_title=self.options.ae_title)
        ae.maximum_pdu_size = self.options.max_pdu
        ae.maximum_associations = self.options.max_associations
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 60
        for sop_class in STORAGE_SOP_CLASSES.values():
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification)
        return ae

    def start(self) -> None:
        enable_tcp_nodelay()
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self.handle_requested),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self._store),
        ]
        ssl_context = self.options.tls.server_context() if self.options.tls.configured else None
        self._server = self.make_ae().start_server(
            (self.options.bind, self.options.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=ssl_context,
        )
        logger.info(
            "receiver %s listening on %s:%d%s", self.options.ae_title, self.options.bind, self.port,
            " (TLS)" if ssl_context else "",
        )  # fmt: skip

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server is not None else self.options.port

    @property
    def running(self) -> bool:
        return self._server is not None

    def stop(self) -> None:
        """Stop accepting; associations in progress are aborted (their unacknowledged instances are
        re-sent by the peer, nothing acknowledged is lost)."""
        with self._lock:
            if self._server is not None:
                self._server.shutdown()
                self._server = None
