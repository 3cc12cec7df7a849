"""Node configuration: the ``node:`` section of a YAML file, then environment, then CLI overrides.

One file configures everything (``hyperct serve --config node.yaml``); the file may be a dedicated
node file or ``app.yaml`` with a ``node:`` section (the app's own sections are read by
:mod:`app.config`). Overrides follow the usual precedence, file < environment < command line, so a
container can change a port without editing the file. Unknown keys are refused by name, like
``app.yaml``: a typo must never silently fall back to a default.

Environment overrides are ``HYPERCT_NODE_<SECTION>_<KEY>`` (``HYPERCT_NODE_RECEIVER_PORT=11113``),
values parsed as YAML scalars/lists (``HYPERCT_NODE_OUTBOX_DESTINATIONS='["PACS@127.0.0.1:4242"]'``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

ENV_PREFIX = "HYPERCT_NODE_"


@dataclass
class TlsSettings:
    """DICOM TLS files (all paths); ``require_client_cert`` turns on mutual authentication."""

    certificate: str | None = None
    key: str | None = None
    ca: str | None = None
    require_client_cert: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.certificate and self.key)


@dataclass
class ReceiverSettings:
    """The C-STORE/C-ECHO SCP."""

    ae_title: str = "HYPERCT"
    bind: str = "127.0.0.1"  # loopback unless the site opens it on purpose
    port: int = 11112
    #: Calling AEs allowed to associate: "AE" or "AE@host" (host checked too). Empty: nobody, unless
    #: ``accept_any_caller`` (for a closed test bench only).
    allowed_callers: list[str] = field(default_factory=list)
    accept_any_caller: bool = False
    max_pdu: int = 131072
    max_associations: int = 16
    tls: TlsSettings = field(default_factory=TlsSettings)


@dataclass
class CompletionSettings:
    """When is a study complete, and what happens to instances that come later."""

    quiet_period_s: float = 30.0
    late_arrivals: str = "reprocess"  # reprocess | ignore (both logged)
    poll_interval_s: float = 0.5


@dataclass
class WorkerSettings:
    """The in-process worker (models loaded once per process)."""

    model: str = "models"
    app_config: str | None = None  # app.yaml for the pipeline; None = HOLOSCAN_CONFIG_PATH or the repo's
    max_job_attempts: int = 3


@dataclass
class RetrySettings:
    """Outbox backoff: delay = initial × factor^(attempt-1), capped; failed after ``max_attempts``."""

    max_attempts: int = 8
    initial_delay_s: float = 10.0
    factor: float = 2.0
    max_delay_s: float = 3600.0


@dataclass
class OutboxSettings:
    """Where results go (C-STORE SCU) and how often we try."""

    destinations: list[str] = field(default_factory=list)  # "AE@host:port"
    calling_ae: str = "HYPERCT"
    timeout_s: float = 30.0
    poll_interval_s: float = 1.0
    retry: RetrySettings = field(default_factory=RetrySettings)
    tls: TlsSettings = field(default_factory=TlsSettings)


@dataclass
class SpoolSettings:
    """What happens to received instances once a study's results are delivered."""

    retention: str = "keep"  # delete | keep
    keep_days: float = 7.0  # with retention keep: removed after this many days (0 = forever)


@dataclass
class HealthSettings:
    """Liveness/readiness and Prometheus metrics over HTTP (stdlib)."""

    bind: str = "127.0.0.1"
    port: int = 8081  # 0 = disabled


@dataclass
class LoggingSettings:
    level: str = "INFO"
    json: bool = False  # one JSON object per line (UIDs only, never patient names)


@dataclass
class NodeConfig:
    """Everything ``hyperct serve`` reads."""

    data_dir: str = "node-data"  # state.sqlite, spool/, results/
    receiver: ReceiverSettings = field(default_factory=ReceiverSettings)
    completion: CompletionSettings = field(default_factory=CompletionSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    spool: SpoolSettings = field(default_factory=SpoolSettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    source: str = "defaults"

    # ------------------------------------------------------------------------------------------
    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> NodeConfig:
        cfg = cls(source=source)
        _apply(cfg, data, "node")
        cfg.validate()
        return cfg

    @classmethod
    def load(
        cls,
        path: Path | None = None,
        *,
        overrides: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> NodeConfig:
        """File (its ``node:`` section, or the whole file when it has none), then the environment,
        then ``overrides`` (dotted keys, e.g. ``{"receiver.port": 11113}``)."""
        data: dict[str, Any] = {}
        source = "defaults"
        if path is not None:
            raw = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(raw, dict):
                raise ValueError(f"{path}: expected a mapping")
            data = raw.get("node", raw) or {}  # app.yaml with other sections: those are app.config's
            if not isinstance(data, dict):
                raise ValueError(f"{path}: 'node' must be a mapping")
            source = str(path)
        cfg = cls(source=source)
        _apply(cfg, data, "node")
        env = os.environ if environ is None else environ
        for key, value in env.items():
            if key.startswith(ENV_PREFIX):
                _set_dotted(cfg, _env_key(cfg, key[len(ENV_PREFIX) :]), yaml.safe_load(value), key)
        for dotted, value in (overrides or {}).items():
            if value is not None:
                _set_dotted(cfg, dotted, value, f"--{dotted}")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.completion.late_arrivals not in ("reprocess", "ignore"):
            raise ValueError(
                f"completion.late_arrivals must be reprocess or ignore, not {self.completion.late_arrivals!r}"
            )
        if self.spool.retention not in ("delete", "keep"):
            raise ValueError(f"spool.retention must be delete or keep, not {self.spool.retention!r}")
        if self.completion.quiet_period_s < 0:
            raise ValueError("completion.quiet_period_s must be >= 0")
        if not 1 <= len(self.receiver.ae_title) <= 16:
            raise ValueError("receiver.ae_title must have 1 to 16 characters")
        for caller in self.receiver.allowed_callers:
            if not caller or len(caller.split("@")[0]) > 16:
                raise ValueError(f"receiver.allowed_callers: bad entry {caller!r} (AE or AE@host)")
        for dest in self.outbox.destinations:
            parse_destination(dest)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source", None)
        return out


def parse_destination(text: str) -> tuple[str, str, int]:
    """``AE@host:port`` → (ae, host, port); raises ValueError naming the entry."""
    try:
        ae, rest = text.split("@", 1)
        host, port = rest.rsplit(":", 1)
        if not ae or not host or len(ae) > 16:
            raise ValueError
        return ae, host, int(port)
    except ValueError:
        raise ValueError(f"destination {text!r} is not AE@host:port") from None


def _fields(obj: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj) if f.name != "source"}


def _apply(obj: Any, data: Mapping[str, Any], where: str) -> None:
    known = _fields(obj)
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in known:
            raise ValueError(f"{where}: unknown key {raw_key!r} (known: {sorted(known)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ValueError(f"{where}.{raw_key}: expected a mapping")
            _apply(current, value, f"{where}.{raw_key}")
        else:
            setattr(obj, key, _coerce(current, value, f"{where}.{raw_key}"))


def _coerce(current: Any, value: Any, where: str) -> Any:
    if value is None:
        return None
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if isinstance(current, int) and not isinstance(current, bool):
        return int(value)
    if isinstance(current, float):
        return float(value)
    if isinstance(current, list):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return [str(v) for v in value]
    return str(value) if not isinstance(value, str) else value


def _env_key(cfg: NodeConfig, rest: str) -> str:
    """``RECEIVER_ALLOWED_CALLERS`` → ``receiver.allowed_callers`` (sections matched first)."""
    lower = rest.lower()
    for name, f in _fields(cfg).items():
        if dataclasses.is_dataclass(getattr(cfg, name)) and lower.startswith(name + "_"):
            sub = getattr(cfg, name)
            tail = lower[len(name) + 1 :]
            for sub_name in _fields(sub):
                if dataclasses.is_dataclass(getattr(sub, sub_name)) and tail.startswith(sub_name + "_"):
                    return f"{name}.{sub_name}.{tail[len(sub_name) + 1 :]}"
            return f"{name}.{tail}"
        del f
    return lower


def _set_dotted(cfg: NodeConfig, dotted: str, value: Any, where: str) -> None:
    parts = dotted.replace("-", "_").split(".")
    obj: Any = cfg
    for part in parts[:-1]:
        if part not in _fields(obj) or not dataclasses.is_dataclass(getattr(obj, part)):
            raise ValueError(f"{where}: unknown setting {dotted!r}")
        obj = getattr(obj, part)
    if parts[-1] not in _fields(obj) or dataclasses.is_dataclass(getattr(obj, parts[-1])):
        raise ValueError(f"{where}: unknown setting {dotted!r}")
    setattr(obj, parts[-1], _coerce(getattr(obj, parts[-1]), value, where))
