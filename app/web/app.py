"""The node's web application (Starlette): probes, metrics, the operator console and DICOMweb STOW-RS.

Two listeners are built from it (:func:`probe_app`, :func:`web_app`): the probe listener
(``health:`` in the node file) serves only ``/healthz``, ``/readyz`` and ``/metrics``; the web
listener (``web:``) serves those and everything else. Both go through the same
:class:`~app.web.security.SecurityMiddleware`, so the rules of ``web.auth`` hold on either.

The application knows the node only through :class:`NodeHandle` (the service that composes it is
never imported): its store (a connection of its own, as ``hyperct jobs`` opens one), its data
folder, its probes and live facts, and the inbox the receiver stores into.

State changes are POSTs: ``/jobs/{id}/retry`` (:meth:`JobStore.retry`, as ``hyperct jobs retry``)
and ``/purge`` (:func:`app.node.retention.purge_finished`, as ``hyperct jobs purge``), each with the
CSRF token of its form; they answer with a redirect to a page that says what happened.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from app.dimse.receiver import InstanceStore, ReceiverOptions
from app.node.retention import purge_finished
from app.node.store import NodeStore, StateError
from app.web.console import Console
from app.web.metrics import metrics_registry, metrics_text
from app.web.security import CSRF_COOKIE, Credentials, SecurityMiddleware, csrf_ok, csrf_token
from app.web.settings import WebSettings
from app.web.stow import StowError, StowReceiver, response_body
from app.web.templates import CSS, JS

logger = logging.getLogger(__name__)

__all__ = ["NodeHandle", "probe_app", "web_app"]


@dataclass
class NodeHandle:
    """What the web stack needs of the node.

    ``store``: a connection of the web's own (reads and operator actions, like the CLI's);
    ``counters``: the receiver's counters, read by ``/metrics`` and counted into by STOW-RS;
    ``status``: live facts the database does not hold (receiver listening, worker loaded, outbox
    destinations); ``inbox`` and ``receiver``: where STOW-RS stores and under which allow-list
    (None: no STOW-RS)."""

    store: NodeStore
    data_dir: Path
    live: Callable[[], bool]
    ready: Callable[[], bool]
    counters: Counter = field(default_factory=Counter)
    status: Callable[[], dict[str, Any]] = dict
    warnings: list[str] = field(default_factory=list)
    inbox: InstanceStore | None = None
    receiver: ReceiverOptions | None = None
    #: Set when the listener stops: open event streams end instead of holding the shutdown.
    closing: threading.Event = field(default_factory=threading.Event)


def _probe_routes(node: NodeHandle) -> list[Route]:
    registry = metrics_registry(node.store.counts, lambda: dict(node.counters))

    def check(probe: Callable[[], bool], name: str) -> Callable[[Request], Response]:
        def endpoint(request: Request) -> Response:
            try:
                ok = bool(probe())
            except Exception:  # noqa: BLE001 - a probe must get an answer
                logger.exception("%s probe failed", name)
                ok = False
            return PlainTextResponse("ok\n" if ok else "not ok\n", status_code=200 if ok else 503)

        return endpoint

    def metrics(request: Request) -> Response:
        body, kind = metrics_text(registry, request.headers.get("accept", ""))
        return Response(body, headers={"Content-Type": kind})

    return [
        Route("/healthz", check(node.live, "liveness"), methods=["GET", "HEAD"]),
        Route("/readyz", check(node.ready, "readiness"), methods=["GET", "HEAD"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]


def _secured(app: Starlette, settings: WebSettings) -> SecurityMiddleware:
    return SecurityMiddleware(app, Credentials(settings.auth), https=settings.https)


def probe_app(node: NodeHandle, settings: WebSettings) -> SecurityMiddleware:
    """The probe listener: ``/healthz``, ``/readyz``, ``/metrics``."""
    return _secured(Starlette(routes=_probe_routes(node)), settings)


def web_app(node: NodeHandle, settings: WebSettings) -> SecurityMiddleware:
    """The web listener: the probes, the console, its actions and live events, STOW-RS."""
    console = Console(node.store, node.data_dir, status=node.status, warnings=node.warnings,
                      stow_ae=settings.stow_calling_ae if node.inbox is not None else None)  # fmt: skip
    stow = (
        StowReceiver(node.inbox, node.receiver, calling_ae=settings.stow_calling_ae, counters=node.counters)
        if node.inbox is not None and node.receiver is not None
        else None
    )

    async def page(request: Request, render: Callable[..., str | None], *args: Any) -> Response:
        token, new = csrf_token(request.cookies)
        message = request.query_params.get("msg", "")[:300]
        html = await run_in_threadpool(render, *args, csrf=token, message=message)
        response = HTMLResponse(html) if html is not None else PlainTextResponse("not found\n", status_code=404)
        if new:
            response.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="strict", secure=settings.https, path="/")
        return response

    async def status_page(request: Request) -> Response:
        return await page(request, console.status_page)

    async def studies_page(request: Request) -> Response:
        return await page(request, console.studies_page)

    async def study_page(request: Request) -> Response:
        return await page(request, console.study_page, request.path_params["study_uid"])

    async def jobs_page(request: Request) -> Response:
        return await page(request, console.jobs_page, request.query_params.get("state"))

    async def job_page(request: Request) -> Response:
        return await page(request, console.job_page, request.path_params["job_id"])

    async def outbox_page(request: Request) -> Response:
        return await page(request, console.outbox_page)

    async def api_status(request: Request) -> Response:
        return JSONResponse(json.loads(json.dumps(await run_in_threadpool(console.facts), default=str)))

    async def form(request: Request) -> dict[str, str] | None:
        """The urlencoded form of a console action, or None when its CSRF token does not match."""
        body = (await request.body())[:10_000].decode("utf-8", "replace")
        fields = {k: v[0] for k, v in urllib.parse.parse_qs(body).items()}
        if not csrf_ok(request.cookies, fields):
            logger.warning("web: %s %s refused: CSRF token missing or wrong", request.method, request.url.path)
            return None
        return fields

    def back(path: str, message: str) -> Response:
        return RedirectResponse(f"{path}?{urllib.parse.urlencode({'msg': message})}", status_code=303)

    async def retry(request: Request) -> Response:
        if await form(request) is None:
            return PlainTextResponse("CSRF token missing or wrong\n", status_code=403)
        job_id = request.path_params["job_id"]
        try:
            done = await run_in_threadpool(node.store.jobs.retry, job_id)
        except StateError as exc:
            return back(f"/jobs/{job_id}", f"not retried: {exc}")
        logger.info("web: job %d retried: %s", job_id, done)
        return back(f"/jobs/{job_id}", done)

    async def purge(request: Request) -> Response:
        fields = await form(request)
        if fields is None:
            return PlainTextResponse("CSRF token missing or wrong\n", status_code=403)
        try:
            days = float(fields.get("older_than_days", "30"))
        except ValueError:
            return back("/studies", "not purged: older than days must be a number")
        if not days >= 0:
            return back("/studies", "not purged: older than days must be >= 0")
        forgotten = await run_in_threadpool(
            lambda: purge_finished(node.store, node.data_dir, older_than_days=days,
                                   include_failed=fields.get("include_failed") == "1")  # fmt: skip
        )
        return back("/studies", f"purged {len(forgotten)} study(ies)")

    async def events(request: Request) -> Response:
        """Server-sent events: ``change`` whenever :meth:`NodeStore.fingerprint` moves (and once at
        the start, for what changed between the page and the stream)."""

        async def stream() -> AsyncIterator[bytes]:
            yield b"retry: 2000\n\n"
            last: Any = None
            quiet_since = time.monotonic()
            while not node.closing.is_set():
                now = await run_in_threadpool(node.store.fingerprint)
                if now != last:
                    last, quiet_since = now, time.monotonic()
                    yield b"event: change\ndata: {}\n\n"
                elif time.monotonic() - quiet_since > 15:
                    quiet_since = time.monotonic()
                    yield b": keep-alive\n\n"
                await anyio.sleep(settings.live_interval_s)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})  # fmt: skip

    async def key_image(request: Request) -> Response:
        name = request.path_params["name"]
        path = None
        if name.endswith(".png"):
            path = await run_in_threadpool(console.key_image, request.path_params["job_id"], name[: -len(".png")])
        if path is None:
            return PlainTextResponse("not found\n", status_code=404)
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        body, kind = {"console.css": (CSS, "text/css"), "console.js": (JS, "text/javascript")}.get(name, (None, ""))
        if body is None:
            return PlainTextResponse("not found\n", status_code=404)
        return Response(body, media_type=kind, headers={"Cache-Control": "private, max-age=300"})

    async def stow_rs(request: Request) -> Response:
        if stow is None:
            return PlainTextResponse("STOW-RS is not enabled\n", status_code=404)
        client = request.client.host if request.client else ""
        if not stow.admits(client):
            return PlainTextResponse(
                f"calling AE {stow.calling_ae!r} from {client} is not in receiver.allowed-callers\n", status_code=403
            )
        try:
            result = await stow.receive(request.stream(), request.headers.get("content-type", ""),
                                        request.path_params.get("study_uid"))  # fmt: skip
        except StowError as exc:
            logger.warning("STOW-RS from %s refused (%d): %s", client, exc.status, exc)
            return PlainTextResponse(f"{exc}\n", status_code=exc.status)
        body, kind = response_body(result, request.headers.get("accept", ""))
        return Response(body, status_code=result.http_status, media_type=kind)

    routes = [
        *_probe_routes(node),
        Route("/", status_page),
        Route("/studies", studies_page),
        Route("/studies/{study_uid}", study_page),
        Route("/jobs", jobs_page),
        Route("/jobs/{job_id:int}", job_page),
        Route("/jobs/{job_id:int}/retry", retry, methods=["POST"]),
        Route("/outbox", outbox_page),
        Route("/purge", purge, methods=["POST"]),
        Route("/events", events),
        Route("/api/status", api_status),
        Route("/key-images/{job_id:int}/{name}", key_image),
        Route("/static/{name}", static),
        Route("/favicon.ico", lambda request: Response(status_code=204)),  # browsers ask; no icon, no 404
        Route("/dicomweb/studies", stow_rs, methods=["POST"]),
        Route("/dicomweb/studies/{study_uid}", stow_rs, methods=["POST"]),
    ]
    return _secured(Starlette(routes=routes), settings)
