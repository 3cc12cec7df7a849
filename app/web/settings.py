"""The node file's ``web:`` section: where the console, DICOMweb STOW-RS and the probes listen, who
may use them and over what.

Import-light on purpose (pydantic only): ``hyperct status`` and ``hyperct jobs`` load the node file
and must not pay for Starlette or uvicorn. The security rules live with the settings, so that the
check that refuses to start (:meth:`WebSettings.problem`) and the warnings ``hyperct status`` prints
read the same facts:

* **loopback unless configured**: ``bind`` defaults to ``127.0.0.1``;
* **no open door by accident**: bound to any other address the node refuses to start unless
  ``auth`` holds a token or a user name and password;
* **secrets stay secret**: the token and the password are :class:`pydantic.SecretStr`, so
  ``--print-config`` and logs show ``**********``.
"""

from __future__ import annotations

import ipaddress
from typing import ClassVar

from pydantic import Field, SecretStr, field_validator, model_validator

from app.dimse.network import AETitle, TlsConfig
from operators.settings import Settings

__all__ = ["WebAuth", "WebSettings", "is_loopback"]


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``127.0.0.0/8``, ``::1``, ``localhost``); any other
    name or address (``0.0.0.0``, a host name) counts as exposed."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class WebAuth(Settings):
    """Who may use the web listener: a bearer token (Prometheus, scripts, a DICOMweb client), HTTP
    basic auth (a browser), or both. Compared in constant time. Empty: no authentication, which the
    node accepts only on loopback."""

    section: ClassVar[str] = "web.auth"

    token: SecretStr | None = None
    username: str | None = None
    password: SecretStr | None = None

    @field_validator("token")
    @classmethod
    def _long_enough(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and len(token.get_secret_value()) < 16:
            raise ValueError("expected at least 16 characters (a guessable token is no lock)")
        return token

    @model_validator(mode="after")
    def _pairs(self) -> WebAuth:
        if (self.username is None) != (self.password is None):
            missing = "password" if self.password is None else "username"
            raise ValueError(f"{missing} is missing: give both username and password, or neither")
        return self

    @property
    def configured(self) -> bool:
        return self.token is not None or self.username is not None

    @property
    def basic(self) -> bool:
        return self.username is not None


class WebSettings(Settings):
    """The web listener: operator console, DICOMweb STOW-RS, ``/healthz`` ``/readyz`` ``/metrics``."""

    section: ClassVar[str] = "web"

    enabled: bool = False
    bind: str = "127.0.0.1"  # loopback unless the site opens it on purpose (then auth is required)
    port: int = Field(default=8080, ge=0, le=65535)  # 0: any free port (tests)
    auth: WebAuth = WebAuth()
    tls: TlsConfig = TlsConfig()  # certificate + key: HTTPS; ca + require-client-cert: client certificates
    #: The calling AE title a STOW-RS request stands for in ``receiver.allowed-callers`` (``DICOMWEB``
    #: or ``DICOMWEB@host``) and in the instances' records: HTTP carries no AE title.
    stow_calling_ae: AETitle = "DICOMWEB"
    #: Seconds between the console's checks for changes (server-sent events).
    live_interval_s: float = Field(default=1.0, gt=0)

    @property
    def exposed(self) -> bool:
        return not is_loopback(self.bind)

    @property
    def https(self) -> bool:
        return bool(self.tls.certificate and self.tls.key)

    def problem(self) -> str | None:
        """Why the web listener must not start as configured (None: it may)."""
        if self.enabled and self.exposed and not self.auth.configured:
            return (
                f"web.bind {self.bind}: the console and STOW-RS would be open to the network without "
                "authentication; set web.auth (token, or username and password) or bind 127.0.0.1"
            )
        if (self.tls.certificate is None) != (self.tls.key is None):
            return "web.tls: give both certificate and key, or neither"
        return None

    def warnings(self) -> list[str]:
        """Valid but risky: credentials over plain HTTP on the network."""
        if self.enabled and self.exposed and self.auth.configured and not self.https:
            return [
                f"web.bind {self.bind} without web.tls: credentials and images travel unencrypted "
                "(set web.tls certificate and key, or put a TLS proxy in front)"
            ]
        return []
