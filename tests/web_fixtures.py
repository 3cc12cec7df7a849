"""Helpers for the web tests (no tests here): the node's web listener in-process on a free loopback
port over a real store and inbox (no model: milliseconds), a processed job with its results folder
made through the store's own API, and a small HTTP client that shows redirects and headers as sent.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.dimse.receiver import ReceiverOptions
from app.node.inbox import Inbox
from app.node.spool import DurableFs, Spool
from app.node.store import InstanceRecord, NodeStore
from app.web.app import NodeHandle, probe_app, web_app
from app.web.server import WebServer
from app.web.settings import WebSettings
from operators.key_images import KeyImageMeta, render_key_image
from tests.peers import LOOPBACK

TOKEN = "t0ken-for-the-web-tests-0123456789"
USER, PASSWORD = "operator", "correct horse battery staple"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def basic(user: str = USER, password: str = PASSWORD) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


BEARER = f"Bearer {TOKEN}"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def cookie(self, name: str) -> str | None:
        for part in self.headers.get("set-cookie", "").split(","):
            key, _, rest = part.strip().partition("=")
            if key == name:
                return rest.split(";")[0]
        return None


def call(url: str, method: str = "GET", path: str = "/", *, headers: dict[str, str] | None = None,
         body: bytes | None = None, timeout_s: float = 30) -> Reply:  # fmt: skip
    """One request, no redirect followed, no credentials added."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or LOOPBACK, parts.port, timeout=timeout_s)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


@dataclass
class WebNode:
    """A web listener over a real store, spool and inbox in ``folder``."""

    url: str
    store: NodeStore
    data_dir: Path
    handle: NodeHandle
    server: WebServer

    def get(self, path: str, auth: str | None = BEARER, **headers: str) -> Reply:
        return call(self.url, "GET", path, headers={**({"Authorization": auth} if auth else {}), **headers})

    def page_token(self, path: str = "/jobs", auth: str = BEARER) -> str:
        """The CSRF cookie a console page sets (the form carries the same value)."""
        reply = self.get(path, auth)
        token = reply.cookie("hyperct_csrf")
        assert token, reply.headers
        return token

    def post_form(self, path: str, fields: dict[str, str], *, token: str | None, auth: str | None = BEARER,
                  **headers: str) -> Reply:  # fmt: skip
        h = {"Content-Type": "application/x-www-form-urlencoded", **headers}
        if auth:
            h["Authorization"] = auth
        if token:
            h["Cookie"] = f"hyperct_csrf={token}"
        return call(self.url, "POST", path, headers=h, body=urllib.parse.urlencode(fields).encode())


@contextlib.contextmanager
def web_node(folder: Path, *, settings: dict[str, Any] | None = None, fs: DurableFs | None = None,
             allowed: tuple[str, ...] = ("DICOMWEB",), probes_only: bool = False) -> Iterator[WebNode]:  # fmt: skip
    """The web listener (``probes_only``: the probe listener) on a free loopback port."""
    folder.mkdir(parents=True, exist_ok=True)
    store = NodeStore(folder / "state.sqlite")
    inbox = Inbox(Spool(folder / "spool", fs=fs), store)
    cfg = WebSettings.from_dict({"enabled": True, "port": 0, "live-interval-s": 0.2, **(settings or {})})
    handle = NodeHandle(
        store=store, data_dir=folder, live=lambda: True, ready=lambda: True, inbox=inbox,
        receiver=ReceiverOptions(allowed_callers=allowed), status=lambda: {},
    )  # fmt: skip
    app = probe_app(handle, cfg) if probes_only else web_app(handle, cfg)
    server = WebServer(app, LOOPBACK, 0, tls=cfg.tls, on_stop=handle.closing.set)
    server.start()
    try:
        yield WebNode(server.url, store, folder, handle, server)
    finally:
        server.stop()
        store.close()


def record(store: NodeStore, study_uid: str, sop_uid: str, *, triggers: bool = True) -> None:
    store.studies.record(InstanceRecord(
        study_uid=study_uid, sop_uid=sop_uid, series_uid=f"{study_uid}.1", sop_class_uid=CT_IMAGE, modality="CT",
        transfer_syntax="1.2.840.10008.1.2.1", patient_id="HCT-TEST", issuer="", triggers=triggers,
        own_output=False, path=f"{study_uid}/{sop_uid}.dcm", size=1, sha256=sop_uid, calling_ae="STORESCU",
    ))  # fmt: skip


def processed_job(store: NodeStore, data_dir: Path, study_uid: str, *, destination: str = "PACS@127.0.0.1:1",
                  key_image_listed: str | None = None) -> int:  # fmt: skip
    """A study received, completed, processed (results.json with one positive finding and its key
    image, rendered by the node's renderer) and queued for ``destination``; returns the job id."""
    record(store, study_uid, f"{study_uid}.1.1")
    store.studies.complete_quiet(0.0, now=time.time() + 1)
    job = store.jobs.claim()
    assert job is not None
    folder = data_dir / "results" / str(job.id) / study_uid
    (folder / "key_images").mkdir(parents=True)
    attention = np.zeros((4, 16, 16), np.float32)
    attention[2, 6:10, 6:10] = 1.0
    png = render_key_image(np.full((4, 16, 16), 40.0, np.float32), attention,
                           KeyImageMeta("Pleural effusion", 0.91, 0.5, synthetic=True))  # fmt: skip
    (folder / "key_images" / "pleural_effusion.png").write_bytes(png)
    tasks = [
        {"key": "pleural_effusion", "name": "Pleural effusion", "group": "radiology", "probability": 0.91,
         "threshold": 0.5, "decision": "present", "key_image": key_image_listed or "key_images/pleural_effusion.png"},
        {"key": "lung_nodule", "name": "Lung nodule", "group": "radiology", "probability": 0.12, "threshold": 0.5,
         "decision": "absent", "key_image": None},
    ]  # fmt: skip
    model = {"name": "hyperct-tiny-test", "version": "0.0.1", "synthetic": True}
    (folder / "results.json").write_text(json.dumps({"study_instance_uid": study_uid, "model": model, "tasks": tasks}))
    result_file = folder / "sr.dcm"
    result_file.write_bytes(b"not sent in these tests")
    store.jobs.finish(job, "processed", "", f"results/{job.id}", [(f"{study_uid}.9.1", str(result_file.relative_to(data_dir)))],
                      [destination])  # fmt: skip
    return job.id


def fail_sends(store: NodeStore, detail: str = "connection refused") -> int:
    """Every pending outbox row failed (the destination is down and attempts are spent)."""
    items = store.outbox.due(now=time.time() + 10)
    for item in items:
        store.outbox.result(item, False, detail, next_attempt_at=None)
    return len(items)


def png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.size
