"""Who may use the web listener, and which requests may change state.

* **Authentication** (:class:`SecurityMiddleware`): with ``web.auth`` configured, every path but
  ``/healthz`` (a liveness probe must answer without secrets) needs ``Authorization: Bearer <token>``
  or HTTP basic auth; anything else gets 401 with a ``WWW-Authenticate`` challenge. Secrets are
  compared with :func:`hmac.compare_digest` on their SHA-256 digests (constant time, whatever the
  lengths). Failures are logged with the client's address only.
* **Cross-site requests** (the same middleware): a browser names where a request comes from
  (``Sec-Fetch-Site``, ``Origin``); any request that can change state (not GET/HEAD/OPTIONS) coming
  from another site is refused with 403 before it reaches a handler, STOW-RS included. A browser
  holding basic-auth credentials would otherwise send them along with a forged form.
* **CSRF token** (:func:`csrf_token`, :func:`csrf_ok`): the console's forms (retry, purge) also
  carry a double-submit token: a random value in an HttpOnly, SameSite=Strict cookie and the same
  value in a hidden field; both must match. Belt and braces with the origin check, for browsers that
  send neither header.
* **Response headers**: no framing, no sniffing, no referrer to other sites, pages not cached, and a content
  security policy that allows only the node's own scripts, styles and images.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from app.web.settings import WebAuth

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Paths answered without credentials: liveness only (it says nothing but "the loop runs").
OPEN_PATHS = frozenset({"/healthz"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_COOKIE = "hyperct_csrf"
CSRF_FIELD = "csrf"
REALM = "HyperCT Node"

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    # same-origin, not no-referrer: under no-referrer a browser sends "Origin: null" with the
    # console's own form posts, which the cross-site rule would then refuse.
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
)


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8")).digest()


class Credentials:
    """The configured secrets, kept as digests (constant-time comparison of equal-length values)."""

    def __init__(self, auth: WebAuth) -> None:
        self.configured = auth.configured
        self.basic = auth.basic
        self._token = _digest(auth.token.get_secret_value()) if auth.token is not None else None
        self._user = _digest(auth.username) if auth.username is not None else None
        self._password = _digest(auth.password.get_secret_value()) if auth.password is not None else None

    def accepts(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header value carries the configured token or user/password."""
        if not self.configured:
            return True
        if not authorization:
            return False
        scheme, _, value = authorization.strip().partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == "bearer" and self._token is not None:
            return hmac.compare_digest(_digest(value), self._token)
        if scheme == "basic" and self._user is not None and self._password is not None:
            try:
                user, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            user_ok = hmac.compare_digest(_digest(user), self._user)
            password_ok = hmac.compare_digest(_digest(password), self._password)
            return bool(sep) and user_ok and password_ok  # both compared: no early exit on the user
        return False

    def challenge(self) -> bytes:
        """The ``WWW-Authenticate`` value: basic (a browser then asks) when configured, else bearer."""
        scheme = "Basic" if self.basic else "Bearer"
        return f'{scheme} realm="{REALM}", charset="UTF-8"'.encode()


def cross_site(headers: dict[bytes, bytes], scheme: str, host: str) -> str | None:
    """Why a state-changing request is refused as cross-site, or None. A browser's ``Sec-Fetch-Site``
    says it directly; otherwise ``Origin`` must be this listener (``scheme://host``). Requests
    without either (curl, dicomweb-client, Orthanc) come from no browser and pass."""
    site = headers.get(b"sec-fetch-site", b"").decode("latin-1").lower()
    if site and site not in ("same-origin", "none"):
        return f"Sec-Fetch-Site {site}"
    origin = headers.get(b"origin", b"").decode("latin-1")
    if origin and origin.lower() != f"{scheme}://{host}".lower():
        return f"Origin {origin}"
    return None


class SecurityMiddleware:
    """ASGI middleware: authentication, the cross-site rule and the response headers (see the
    module docstring). Pure ASGI, so streamed uploads (STOW-RS) and server-sent events pass through
    untouched."""

    def __init__(self, app: ASGIApp, credentials: Credentials, *, https: bool = False) -> None:
        self.app = app
        self.credentials = credentials
        self.https = https

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        path, method = scope.get("path", ""), scope.get("method", "GET")
        client = (scope.get("client") or ("?", 0))[0]
        if path not in OPEN_PATHS and not self.credentials.accepts(
            headers.get(b"authorization", b"").decode("latin-1") or None
        ):
            logger.warning("web: %s %s from %s: not authenticated (401)", method, path, client)
            await _plain(send, 401, "authentication required\n",
                         [(b"www-authenticate", self.credentials.challenge())])  # fmt: skip
            return
        if method not in SAFE_METHODS:
            host = headers.get(b"host", b"").decode("latin-1")
            why = cross_site(headers, "https" if self.https else scope.get("scheme", "http"), host)
            if why is not None:
                logger.warning("web: %s %s from %s refused: cross-site request (%s)", method, path, client, why)
                await _plain(send, 403, "cross-site request refused\n", [])
                return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = list(SECURITY_HEADERS)
                names = {k.lower() for k, _ in message.get("headers", [])}
                if b"cache-control" not in names:
                    extra.append((b"cache-control", b"no-store"))
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, with_headers)


async def _plain(send: Send, status: int, text: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = text.encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                    *SECURITY_HEADERS, (b"cache-control", b"no-store"), *headers],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_token(cookies: dict[str, str]) -> tuple[str, bool]:
    """The request's CSRF token (from its cookie) and whether it is new (then set the cookie)."""
    token = cookies.get(CSRF_COOKIE, "")
    if len(token) >= 32:
        return token, False
    return new_csrf_token(), True


def csrf_ok(cookies: dict[str, str], form: dict[str, str]) -> bool:
    """The double-submit check: the form's token equals the cookie's (constant time)."""
    cookie, field = cookies.get(CSRF_COOKIE, ""), form.get(CSRF_FIELD, "")
    return bool(cookie) and len(cookie) >= 32 and hmac.compare_digest(_digest(cookie), _digest(field))
