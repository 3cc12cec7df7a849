"""DICOMweb STOW-RS receive (PS3.18 §10.5 Store Transaction): ``POST /dicomweb/studies[/{study}]``.

Why it is a second door to the same room, not a second room: every instance goes through
:func:`app.dimse.receiver.store_encoded` into the node's :class:`~app.dimse.receiver.InstanceStore`
(the inbox), exactly like a C-STORE. So the rules are the receiver's, not copies of them: the
header is parsed (no pixels), the bytes are stored as sent, the spool file and its row are on disk
(fsync, SQLite ``synchronous=FULL``) before the instance is listed as stored; only CT images that are
not our own output start processing (no loops); a study whose instances disagree on the patient is
quarantined. What C-STORE decides at association time is decided here per request and per part:

* the **allow-list**: a request stands for the calling AE ``web.stow-calling-ae`` (``DICOMWEB``) from
  the client's address and must be admitted by ``receiver.allowed-callers`` (or
  ``accept-any-caller``), else 403 — counted with the rejected associations;
* the **presentation context**: the part's SOP class must be one the receiver accepts
  (FailureReason 0x0122 otherwise) and its transfer syntax one the receiver accepts (0xC122).

The body (``multipart/related; type="application/dicom"``, each part a PS3.10 file) is parsed as it
streams in (:class:`MultipartRelated`), one part in memory at a time, and each part is stored before
the next is read. The answer is the Store Instances Response Module (PS3.18 §10.5.3):
``ReferencedSOPSequence`` for stored instances, ``FailedSOPSequence`` with ``FailureReason`` for the
others; HTTP 200 when all were stored, 202 when some were, 409 when none was, in
``application/dicom+json`` (or ``application/dicom+xml`` when the client asks for it).
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.message import Message
from typing import Any
from xml.etree import ElementTree as ET

import anyio.to_thread
from pydicom import dcmread
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset

from app.dimse.receiver import (
    STORAGE_SOP_CLASSES,
    SUCCESS,
    TRANSFER_SYNTAXES,
    InstanceStore,
    ReceiverOptions,
    StoreOutcome,
    store_encoded,
)

logger = logging.getLogger(__name__)

#: FailureReason values a STOW-RS response uses besides the receiver's C-STORE statuses (PS3.18
#: §10.5.3, from PS3.4 Annex B and the Storage Commitment reasons).
SOP_CLASS_NOT_SUPPORTED = 0x0122
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
STUDY_MISMATCH = 0xA900  # "data set does not match": the instance belongs to another study than the URL's
#: One part is held in memory while it is stored; a larger part is refused (413).
MAX_PART_BYTES = 2 * 1024**3
_MAX_HEADER_BYTES = 16 * 1024
DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"


class StowError(ValueError):
    """The request as a whole is unusable; ``status`` is the HTTP answer (400, 413, 415)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Part:
    headers: dict[str, str]
    body: bytes


def boundary_of(content_type: str) -> bytes:
    """The boundary of a ``multipart/related; type="application/dicom"`` body; :class:`StowError`
    (415) for another media type or a ``type`` other than application/dicom (metadata + bulk data
    requests are not supported), 400 without a boundary."""
    msg = Message()
    msg["content-type"] = content_type or "application/octet-stream"
    if msg.get_content_type() != "multipart/related":
        raise StowError(415, f"expected multipart/related; type=\"application/dicom\", got {content_type!r}")
    kind = str(msg.get_param("type") or "application/dicom").lower()
    if kind != "application/dicom":
        raise StowError(415, f"only application/dicom parts are accepted (type={kind!r})")
    boundary = msg.get_param("boundary")
    if not boundary or not isinstance(boundary, str):
        raise StowError(400, "multipart/related without a boundary")
    return boundary.encode("latin-1")


class MultipartRelated:
    """An incremental multipart (RFC 2046 / RFC 2387) parser: :meth:`feed` bytes as they arrive and
    get back the parts completed so far; :meth:`close` checks that the closing delimiter came."""

    def __init__(self, boundary: bytes, *, max_part_bytes: int = MAX_PART_BYTES) -> None:
        self.delimiter = b"\r\n--" + boundary
        self.max_part = max_part_bytes
        self._buf = bytearray(b"\r\n")  # the first delimiter has no CRLF of its own before it
        self._state = "preamble"
        self._headers: dict[str, str] = {}
        self._scan = 0

    def feed(self, chunk: bytes) -> list[Part]:
        self._buf += chunk
        parts: list[Part] = []
        while True:
            if self._state in ("preamble", "body"):
                at = self._buf.find(self.delimiter, self._scan)
                if at < 0:
                    self._scan = max(0, len(self._buf) - len(self.delimiter))
                    if self._state == "preamble":  # nothing before the first delimiter is kept
                        del self._buf[: self._scan]
                        self._scan = 0
                    elif len(self._buf) > self.max_part:
                        raise StowError(413, f"a part is larger than {self.max_part} bytes")
                    return parts
                if self._state == "body":
                    parts.append(Part(self._headers, bytes(self._buf[:at])))
                del self._buf[: at + len(self.delimiter)]
                self._scan, self._state = 0, "delimiter"
            elif self._state == "delimiter":
                if len(self._buf) < 2:
                    return parts
                if self._buf[:2] == b"--":
                    self._state = "done"
                    return parts
                end = self._buf.find(b"\r\n")
                if end < 0:
                    return parts
                if self._buf[:end].strip(b" \t"):
                    raise StowError(400, "malformed multipart: text after a boundary delimiter")
                del self._buf[: end + 2]
                self._state = "headers"
            elif self._state == "headers":
                if self._buf[:2] == b"\r\n":  # a part without headers
                    del self._buf[:2]
                    self._headers, self._state = {}, "body"
                    continue
                end = self._buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buf) > _MAX_HEADER_BYTES:
                        raise StowError(400, "malformed multipart: part headers too long")
                    return parts
                self._headers = _headers(bytes(self._buf[:end]))
                del self._buf[: end + 4]
                self._state = "body"
            else:  # done: the epilogue is ignored
                self._buf.clear()
                return parts

    def close(self) -> None:
        if self._state != "done":
            raise StowError(400, "malformed multipart: the closing boundary is missing")


def _headers(block: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in block.decode("latin-1").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out


@dataclass
class StowResult:
    """The per-instance outcomes of one request, and the response the standard asks for."""

    outcomes: list[StoreOutcome] = field(default_factory=list)

    @property
    def stored(self) -> list[StoreOutcome]:
        return [o for o in self.outcomes if o.status == SUCCESS]

    @property
    def failed(self) -> list[StoreOutcome]:
        return [o for o in self.outcomes if o.status != SUCCESS]

    @property
    def http_status(self) -> int:
        """200 all stored, 202 some stored, 409 none stored (PS3.18 §10.5.3, Table 10.5.3-1)."""
        if not self.outcomes or not self.stored:
            return 409
        return 202 if self.failed else 200

    def dataset(self) -> Dataset:
        """The Store Instances Response Module."""
        ds = Dataset()
        if self.failed:
            ds.FailedSOPSequence = [
                _item(o.sop_class_uid, o.sop_uid, FailureReason=o.status) for o in self.failed
            ]
        if self.stored:
            ds.ReferencedSOPSequence = [_item(o.sop_class_uid, o.sop_uid) for o in self.stored]
        return ds


def _item(sop_class: str, sop_uid: str, **extra: Any) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class or None
    item.ReferencedSOPInstanceUID = sop_uid or None
    for key, value in extra.items():
        setattr(item, key, value)
    return item


def wants_xml(accept: str) -> bool:
    """Whether the client asked for XML (and not JSON): JSON is the default answer."""
    kinds = [part.split(";")[0].strip().lower() for part in (accept or "").split(",")]
    return DICOM_XML in kinds and DICOM_JSON not in kinds


def native_xml(ds: Dataset) -> bytes:
    """``ds`` in the Native DICOM Model (PS3.19 Annex A), enough for a STOW-RS response (sequences,
    UIDs, numbers)."""
    root = ET.Element("NativeDicomModel", {"xml:space": "preserve"})
    _xml_attributes(root, ds)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8")


def _xml_attributes(parent: ET.Element, ds: Dataset) -> None:
    for elem in ds:
        tag = f"{elem.tag.group:04X}{elem.tag.element:04X}"
        attr = ET.SubElement(parent, "DicomAttribute", {"tag": tag, "vr": elem.VR, "keyword": keyword_for_tag(elem.tag)})
        if elem.VR == "SQ":
            for n, item in enumerate(elem.value, start=1):
                _xml_attributes(ET.SubElement(attr, "Item", {"number": str(n)}), item)
        elif elem.value is not None and elem.value != "":
            values = elem.value if isinstance(elem.value, list | tuple) else [elem.value]
            for n, value in enumerate(values, start=1):
                ET.SubElement(attr, "Value", {"number": str(n)}).text = str(value)


class StowReceiver:
    """Stores the parts of STOW-RS requests in the node's inbox under the receiver's rules."""

    def __init__(self, store: InstanceStore, options: ReceiverOptions, *, calling_ae: str,
                 counters: Counter) -> None:  # fmt: skip
        self.store = store
        self.options = options
        self.calling_ae = calling_ae
        self.counters = counters

    def admits(self, host: str) -> bool:
        """The C-STORE allow-list, for a request standing for ``calling_ae`` at ``host``; a refusal is
        logged (AE and host only) and counted with the rejected associations."""
        if self.options.admits(self.calling_ae, host):
            return True
        self.counters["associations_rejected"] += 1
        logger.warning("STOW-RS from %r at %s rejected: calling AE not in the allow-list", self.calling_ae, host)
        return False

    async def receive(self, chunks: AsyncIterator[bytes], content_type: str, study_uid: str | None = None) -> StowResult:
        """Parse the body as it arrives and store each part before reading on (StowError: 400/413/415)."""
        parser = MultipartRelated(boundary_of(content_type))
        result = StowResult()
        async for chunk in chunks:
            for part in parser.feed(chunk):
                result.outcomes.append(await anyio.to_thread.run_sync(self.store_part, part, study_uid))
        parser.close()
        if not result.outcomes:
            raise StowError(400, "the request holds no instance")
        logger.info(
            "STOW-RS from %s: %d stored, %d failed", self.calling_ae, len(result.stored), len(result.failed)
        )
        return result

    def store_part(self, part: Part, study_uid: str | None = None) -> StoreOutcome:
        """One part: a PS3.10 file checked as a presentation context would be, then stored."""
        kind = part.headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
        data = _ps310(part.body)
        meta = _meta(data)
        if meta is None or kind != "application/dicom":
            why = f"part is {kind}, not application/dicom" if kind != "application/dicom" else "not a DICOM PS3.10 file"
            return self._fail(StoreOutcome(0xC210, message=why), "")
        sop_class, sop_uid, syntax, study = meta
        if syntax not in TRANSFER_SYNTAXES:
            return self._fail(StoreOutcome(TRANSFER_SYNTAX_NOT_SUPPORTED, sop_class, sop_uid,
                                           f"transfer syntax {syntax} is not accepted"), study)  # fmt: skip
        if sop_class not in _ACCEPTED_SOP_CLASSES:
            return self._fail(StoreOutcome(SOP_CLASS_NOT_SUPPORTED, sop_class, sop_uid,
                                           f"SOP class {sop_class} is not accepted"), study)  # fmt: skip
        if study_uid is not None and study != study_uid:
            return self._fail(StoreOutcome(STUDY_MISMATCH, sop_class, sop_uid,
                                           f"instance of study {study}, posted to study {study_uid}"), study)  # fmt: skip
        return store_encoded(self.store, data, transfer_syntax=syntax, calling_ae=self.calling_ae,
                             counters=self.counters)  # fmt: skip

    def _fail(self, outcome: StoreOutcome, study_uid: str) -> StoreOutcome:
        self.counters["instances_failed"] += 1
        logger.warning("STOW-RS instance %s refused (0x%04X): %s", outcome.sop_uid or "?", outcome.status, outcome.message)
        self.store.note_error("receive", f"STOW-RS: {outcome.message}", study_uid or None, outcome.sop_uid or None)
        return outcome


_ACCEPTED_SOP_CLASSES = frozenset(STORAGE_SOP_CLASSES.values())


def _ps310(data: bytes) -> bytes:
    """The part as a PS3.10 file. Some clients (dicomweb-client, through pydicom's ``dcmwrite``) send
    the file meta group without the 128-byte preamble and ``DICM``; those are added, the dataset's
    bytes stay as sent, so the spool file reads like any other."""
    if data[128:132] == b"DICM":
        return data
    if data[:4] == b"DICM":
        return bytes(128) + data
    if data[:2] == b"\x02\x00" and data[4:6].isalpha():  # a (0002,eeee) element, explicit VR: the file meta
        return bytes(128) + b"DICM" + data
    return data


def _meta(data: bytes) -> tuple[str, str, str, str] | None:
    """SOP class, SOP instance, transfer syntax and study of a PS3.10 file (header only), or None."""
    if data[128:132] != b"DICM":
        return None
    try:
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True,
                     specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"])  # fmt: skip
        meta = ds.file_meta
        syntax = str(meta.TransferSyntaxUID)
    except Exception:  # noqa: BLE001 - a part we cannot read is this part's failure
        return None
    sop_class = str(ds.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", ""))
    sop_uid = str(ds.get("SOPInstanceUID", "") or meta.get("MediaStorageSOPInstanceUID", ""))
    return sop_class, sop_uid, syntax, str(ds.get("StudyInstanceUID", ""))


def response_body(result: StowResult, accept: str) -> tuple[bytes, str]:
    """The response's bytes and media type."""
    ds = result.dataset()
    if wants_xml(accept):
        return native_xml(ds), DICOM_XML
    return json.dumps(ds.to_json_dict()).encode(), DICOM_JSON
