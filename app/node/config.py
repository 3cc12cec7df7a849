"""Node configuration: the ``node:`` section of a YAML file, then environment, then CLI overrides.

One file configures everything (``hyperct serve --config node.yaml``); the file may be a dedicated
node file or ``app.yaml`` with a ``node:`` section (the app's own sections are read by
:mod:`app.config`). Overrides follow the usual precedence, file < environment < command line, so a
container can change a port without editing the file.

The sections are :mod:`operators.settings` models, like ``app.yaml`` and the training recipes:
unknown keys are refused by name (a typo must never silently fall back to a default), ``-`` and
``_`` are the same, and every value is validated once, when the configuration loads. The sections
the DICOM code runs on are that code's own settings, not copies: ``receiver`` is
:class:`app.dimse.receiver.ReceiverOptions`, ``outbox.retry`` :class:`app.dimse.sender.RetryPolicy`,
the ``tls`` sections :class:`app.dimse.network.TlsConfig`; destinations are
:class:`app.dimse.network.RemoteNode` values, parsed by the one address parser, so a destination
the sender could not use (``PACS@host name:104``, ``PACS@::1:104``) stops the node at start-up.

Environment overrides are ``HYPERCT_NODE_<SECTION>_<KEY>`` (``HYPERCT_NODE_RECEIVER_PORT=11113``),
values parsed as YAML scalars/lists (``HYPERCT_NODE_OUTBOX_DESTINATIONS='["PACS@127.0.0.1:4242"]'``);
lists may also be comma-separated text (``HYPERCT_NODE_RECEIVER_ALLOWED_CALLERS=PACS,MODALITY``).
A bad value is reported with its source: the file, the variable, or the command line.

Relative paths in the file (and the relative defaults ``node-data`` and ``models`` when a file is
given) are relative to the file's folder, so ``hyperct status -c node.yaml`` finds the same node
from any folder; paths from the environment or the command line are relative to the current folder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import Field, PrivateAttr, field_validator, model_serializer

from app.dimse.network import AETitle, RemoteNode, TlsConfig
from app.dimse.receiver import ReceiverOptions
from app.dimse.sender import RetryPolicy
from app.web.settings import WebSettings, is_loopback
from operators.settings import (
    CommaList,
    Settings,
    SettingsError,
    env_key,
    names_setting,
    read_yaml,
    resolve_paths,
    set_dotted,
)

logger = logging.getLogger(__name__)

ENV_PREFIX = "HYPERCT_NODE_"


class CompletionSettings(Settings):
    """When is a study complete, and what happens to instances that come later."""

    section: ClassVar[str] = "completion"

    quiet_period_s: float = Field(default=30.0, ge=0)
    late_arrivals: Literal["reprocess", "ignore"] = "reprocess"  # both logged
    poll_interval_s: float = Field(default=0.5, gt=0)


class WorkerSettings(Settings):
    """The in-process worker (models loaded once per process)."""

    section: ClassVar[str] = "worker"

    model: Path = Path("models")
    app_config: Path | None = None  # app.yaml for the pipeline; None = HOLOSCAN_CONFIG_PATH or the repo's
    max_job_attempts: int = Field(default=3, ge=1)
    #: Worker processes running jobs side by side (app/node/worker_pool.py); 1 = in the main process.
    #: Each loads the model: N × its memory, on the GPU too.
    processes: int = Field(default=1, ge=1, le=64)


class OutboxSettings(Settings):
    """Where results go (C-STORE SCU) and how often we try."""

    section: ClassVar[str] = "outbox"

    destinations: CommaList[RemoteNode] = ()  # AE@host:port, IPv6 as AE@[addr]:port
    calling_ae: AETitle = "HYPERCT"
    timeout_s: float = Field(default=30.0, gt=0)
    poll_interval_s: float = Field(default=1.0, gt=0)
    retry: RetryPolicy = RetryPolicy()
    tls: TlsConfig = TlsConfig()


class SpoolSettings(Settings):
    """What happens to received instances once a study's results are delivered."""

    section: ClassVar[str] = "spool"

    retention: Literal["delete", "keep"] = "keep"
    #: With ``retention: keep``: removed after this many days (0 = forever).
    keep_days: float = Field(default=7.0, ge=0)


class HealthSettings(Settings):
    """The probe listener: ``/healthz``, ``/readyz`` and ``/metrics`` only (the web stack of
    :mod:`app.web`, without the console). Kept apart from ``web`` so a container's probes have a
    port of their own; when ``web.auth`` is set, ``/readyz`` and ``/metrics`` need it here too."""

    section: ClassVar[str] = "health"

    bind: str = "127.0.0.1"
    port: int = Field(default=8081, ge=0, le=65535)  # 0 = disabled


class LoggingSettings(Settings):
    section: ClassVar[str] = "logging"

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    #: One JSON object per line (UIDs only, never patient names); the key is ``json``.
    as_json: bool = Field(default=False, alias="json")

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_serializer(mode="wrap")
    def _json_key(self, handler: Any) -> Any:
        data = handler(self)
        if isinstance(data, dict) and "as_json" in data:
            data["json"] = data.pop("as_json")
        return data


class NodeConfig(Settings):
    """Everything ``hyperct serve`` reads."""

    section: ClassVar[str] = "node"

    data_dir: Path = Path("node-data")  # state.sqlite, spool/, results/
    receiver: ReceiverOptions = ReceiverOptions()
    completion: CompletionSettings = CompletionSettings()
    worker: WorkerSettings = WorkerSettings()
    outbox: OutboxSettings = OutboxSettings()
    spool: SpoolSettings = SpoolSettings()
    health: HealthSettings = HealthSettings()
    web: WebSettings = WebSettings()
    logging: LoggingSettings = LoggingSettings()

    _source: str = PrivateAttr("defaults")

    @property
    def source(self) -> str:
        """The file this configuration was read from, or ``defaults``."""
        return self._source

    @property
    def data_path(self) -> Path:
        return self.data_dir

    def warnings(self) -> list[str]:
        """Settings that are valid but leave the node quietly useless, one line each: logged when
        the node starts and shown by ``hyperct status``, because nothing else would tell."""
        found = []
        if not self.outbox.destinations:
            found.append(
                "outbox.destinations is empty: results stay in the node's results/ folder and are "
                "never sent (add AE@host:port destinations)"
            )
        if not self.receiver.allowed_callers and not self.receiver.accept_any_caller:
            found.append("receiver.allowed-callers is empty: every association will be rejected")
        if self.health.port and not is_loopback(self.health.bind) and not self.web.auth.configured:
            found.append(
                f"health.bind {self.health.bind}: /readyz and /metrics (counts, no patient data) answer "
                "anyone who can reach the port (set web.auth, or bind 127.0.0.1)"
            )
        found += self.web.warnings()
        return found

    @classmethod
    def load(
        cls,
        path: Path | None = None,
        *,
        overrides: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> NodeConfig:
        """File (its ``node:`` section, or the whole file when it has none), then the environment,
        then ``overrides`` (dotted keys, e.g. ``{"receiver.port": 11113}``; None values are skipped)."""
        data = _file_data(Path(path)) if path is not None else {}
        sources: dict[tuple[str, ...], str] = {}  # the settings not from the file, and where from
        env = os.environ if environ is None else environ
        for name, text in sorted(env.items()):
            if name.startswith(ENV_PREFIX):
                dotted = env_key(cls, name[len(ENV_PREFIX) :])
                if dotted is None:
                    raise SettingsError(f"{name}: unknown setting {name[len(ENV_PREFIX) :].lower()!r}")
                set_dotted(data, dotted, _yaml_value(text), where=name)
                sources[_parts(dotted)] = name
        for dotted, value in (overrides or {}).items():
            if value is not None:
                if not names_setting(cls, dotted):
                    raise SettingsError(f"--{dotted}: unknown setting {dotted!r}")
                set_dotted(data, dotted, value, where=f"--{dotted}")
                sources[_parts(dotted)] = "command line"
        try:
            config = cls.from_dict(data)
        except SettingsError as exc:
            source = _source_of(exc.loc, sources) or (str(path) if path is not None else "")
            raise SettingsError(f"{source}: {exc}" if source else str(exc), exc.loc) from None
        config._source = str(path) if path is not None else "defaults"
        return config


def _file_data(path: Path) -> dict[str, Any]:
    """The node settings of a file: its ``node:`` section, or the whole file when it has none, with
    relative paths made relative to the file's folder."""
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise SettingsError(f"{path}: expected a mapping")
    data = raw.get("node", raw) or {}  # app.yaml with other sections: those are app.config's
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: 'node' must be a mapping")
    resolve_paths(NodeConfig, data, path.parent)
    return data


def _parts(dotted: str) -> tuple[str, ...]:
    return tuple(part.replace("-", "_") for part in dotted.split("."))


def _source_of(loc: tuple[str | int, ...], sources: dict[tuple[str, ...], str]) -> str | None:
    """Which environment variable or option set the setting at ``loc`` (None: the file, or a
    default): a message must name what the user has to change."""
    keys = tuple(str(part).replace("-", "_") for part in loc if isinstance(part, str))
    return next((source for parts, source in sources.items() if keys[: len(parts)] == parts), None)


def _yaml_value(text: str) -> Any:
    """An environment value as YAML (``11113``, ``true``, ``[a, b]``); text YAML cannot read stays text."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text
