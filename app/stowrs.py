"""STOW-RS: results go to a DICOMweb server, reported exactly like a C-STORE send.

Why a sender of its own and not ``dicomweb-client``'s ``store_instances``: that one decodes and
re-encodes every dataset (ours go out as the bytes we wrote, as over DIMSE), retries inside the call
(the outbox owns retries and their backoff), and raises on HTTP 409 before the answer's
FailedSOPSequence can say which instance failed and why. Here one POST carries a group of files as
``multipart/related; type="application/dicom"`` (PS3.18 §10.5), and the answer becomes a
:class:`~app.dimse.sender.SendReport`, so :class:`~app.node.outbox.Outbox` keeps rows, retries and
failures the same for both protocols:

* HTTP 200: every instance stored. 202: stored except those in FailedSOPSequence; a WarningReason
  in ReferencedSOPSequence is a warning status (stored). 409: none stored; each FailureReason is
  the DIMSE status it names (0xA7xx out of resources: transient).
* Connection errors, timeouts, 408, 429 and 5xx are transient; other 4xx (400, 401, 403, 404,
  413, 415) are permanent: a retry would get the same answer.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from app.dimse.sender import FileResult, PermanentSendError, SendReport, TransientSendError

logger = logging.getLogger(__name__)

TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_FILES_PER_REQUEST = 64
_SUCCESS, _WARNING = 0x0000, 0xB000


def is_stowrs_destination(text: str) -> bool:
    """A destination of the outbox is a DICOMweb root when it is an http(s) URL, else ``AE@host:port``."""
    return text.startswith(("http://", "https://"))


def check_stowrs_url(url: str) -> str:
    """The DICOMweb root without a trailing slash; ValueError (one line) for what cannot be one."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"{url}: expected an http(s):// URL of a DICOMweb root (…/dicom-web)")
    if parsed.username or parsed.password:
        raise ValueError(f"{parsed.scheme}://…@{parsed.hostname}: credentials in the URL would be stored "
                         "in the outbox and its logs; use a server that trusts this host")  # fmt: skip
    if parsed.query or parsed.fragment:
        raise ValueError(f"{url}: a DICOMweb root has no query or fragment")
    return url.rstrip("/")


def _sop_uids(path: Path) -> tuple[str, str, str]:
    from pydicom import dcmread

    ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "SOPClassUID"])
    return str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)


def _multipart(parts: Sequence[bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = bytearray()
    for part in parts:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        body += part
        body += b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return bytes(body), f'multipart/related; type="application/dicom"; boundary={boundary}'


def _answer(response: Any) -> dict[str, Any]:
    """The Store Instances Response (DICOM JSON) as ``{tag: element}``; {} when there is none."""
    try:
        data = response.json()
    except ValueError:
        return {}
    if isinstance(data, list):  # some servers wrap the one dataset in a list
        data = data[0] if data else {}
    return data if isinstance(data, dict) else {}


def _items(answer: dict[str, Any], tag: str) -> dict[str, int | None]:
    """SOP Instance UID -> its reason code (FailureReason 00081197 / WarningReason 00081196)."""
    out: dict[str, int | None] = {}
    for item in answer.get(tag, {}).get("Value", []) or []:
        uid = (item.get("00081155", {}).get("Value") or [None])[0]
        if uid is None:
            continue
        reason = item.get("00081197", item.get("00081196", {})).get("Value") or [None]
        out[str(uid)] = int(reason[0]) if reason[0] is not None else None
    return out


def _failure(status: int | None, http: int) -> tuple[str, bool]:
    if status is None:
        return f"HTTP {http}, no FailureReason", http in TRANSIENT_HTTP
    transient = 0xA700 <= status <= 0xA7FF
    kind = "out of resources" if transient else "refused"
    return f"server {kind}: FailureReason 0x{status:04X} (HTTP {http})", transient


def _post(url: str, files: list[tuple[Path, tuple[str, str, str]]], timeout_s: float) -> list[FileResult]:
    import requests

    def result(path: Path, uids: tuple[str, str, str], **kw: Any) -> FileResult:
        return FileResult(path, *uids, **kw)

    body, content_type = _multipart([p.read_bytes() for p, _ in files])
    try:
        response = requests.post(
            f"{url}/studies",
            data=body,
            headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
            timeout=timeout_s,
        )
    except requests.RequestException as exc:
        why = f"cannot reach {url}: {type(exc).__name__}"
        return [result(p, u, error=why, transient=True) for p, u in files]
    http = response.status_code
    answer = _answer(response)
    failed = _items(answer, "00081198")  # FailedSOPSequence
    warned = _items(answer, "00081199")  # ReferencedSOPSequence (WarningReason when present)
    results = []
    for path, uids in files:
        uid = uids[0]
        if http in (200, 202) and uid not in failed:
            status = _WARNING if warned.get(uid) else _SUCCESS
            results.append(result(path, uids, status=status))
        elif uid in failed:
            message, transient = _failure(failed[uid], http)
            results.append(result(path, uids, status=failed[uid], error=message, transient=transient))
        else:
            reason = response.reason or ""
            results.append(
                result(path, uids, error=f"HTTP {http} {reason}".strip(), transient=http in TRANSIENT_HTTP)
            )
    return results


def stow_files(url: str, files: Sequence[Path], *, timeout_s: float = 30.0, **_: Any) -> SendReport:
    """STOW-RS ``files`` to the DICOMweb root ``url`` (POST ``{url}/studies``, up to
    :data:`MAX_FILES_PER_REQUEST` a request). Never raises for network or server problems: the
    report says what was stored, as :func:`~app.dimse.sender.send_files` does (``calling_ae`` and
    the other DIMSE keywords are accepted and ignored)."""
    started = time.monotonic()
    url = check_stowrs_url(url)
    readable: list[tuple[Path, tuple[str, str, str]]] = []
    results: dict[Path, FileResult] = {}
    for path in map(Path, files):
        try:
            readable.append((path, _sop_uids(path)))
        except Exception as exc:  # noqa: BLE001 - an unreadable file is a permanent per-file failure
            results[path] = FileResult(path, None, None, None, error=f"cannot read header: {exc}")
    for i in range(0, len(readable), MAX_FILES_PER_REQUEST):
        group = readable[i : i + MAX_FILES_PER_REQUEST]
        results.update((r.path, r) for r in _post(url, group, timeout_s))
    ordered = tuple(results[Path(p)] for p in files)
    undelivered = [r for r in ordered if not r.delivered]
    error: TransientSendError | PermanentSendError | None = None
    if undelivered:
        summary = "; ".join(f"{r.sop_instance_uid or r.path.name}: {r.error}" for r in undelivered[:3])
        text = f"{len(undelivered)} of {len(ordered)} files not stored at {url}: {summary}"
        error = (
            TransientSendError(text) if any(r.transient for r in undelivered) else PermanentSendError(text)
        )
    report = SendReport(url, ordered, error, time.monotonic() - started)
    logger.info("STOW-RS: %d/%d files stored at %s in %.2f s", len(report.delivered), len(ordered), url,
                report.elapsed_s)  # fmt: skip
    return report
