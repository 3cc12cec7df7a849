"""Application configuration: the app's own sections of ``app.yaml`` as typed values.

``app.yaml`` serves two readers: holoscan-cli's packager (``application``, ``resources``) and this
app (``series-selection``, ``volume-checks``, ``outputs``, ``inference``). Keys are hyphenated like
the packager's. Unknown keys in our sections are refused, naming the key, so a typo never silently
falls back to a default. The sections are :mod:`operators.settings` models, like every other
configuration of the project.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, PrivateAttr

from operators.ort_session import SessionOptions
from operators.series_selection import SelectionRules
from operators.settings import Settings, SettingsError, WriterOptions, read_yaml
from operators.volume import VolumeChecks

logger = logging.getLogger(__name__)

#: app.yaml at the repository root (in a MAP: HOLOSCAN_CONFIG_PATH, /var/holoscan/app.yaml).
REPO_APP_YAML = Path(__file__).resolve().parents[1] / "app.yaml"


class InferenceOptions(Settings):
    """ONNX Runtime placement and memory (``app.yaml`` section ``inference``)."""

    section: ClassVar[str] = "inference"

    device: Literal["auto", "cpu", "cuda"] = "auto"
    tensorrt: bool = False
    threads: int = Field(default=0, ge=0)  # 0 = usable cores
    max_resident_sessions: int | None = Field(default=None, ge=1)  # None = derived from the memory budget
    memory_budget_mb: float | None = Field(default=None, gt=0)

    def session_options(self) -> SessionOptions:
        return SessionOptions(device=self.device, use_tensorrt=self.tensorrt, intra_op_threads=self.threads)


class AppConfig(Settings):
    """Everything the pipeline reads from ``app.yaml`` besides the packager's sections."""

    series_selection: SelectionRules = SelectionRules()
    volume_checks: VolumeChecks = VolumeChecks()
    outputs: WriterOptions = WriterOptions()
    inference: InferenceOptions = InferenceOptions()
    #: holoscan-cli's packager sections and the node's (``app/node/config.py``): not read here.
    application: dict[str, Any] | None = Field(default=None, exclude=True)
    resources: dict[str, Any] | None = Field(default=None, exclude=True)
    node: dict[str, Any] | None = Field(default=None, exclude=True)

    _source: str = PrivateAttr("defaults")

    @property
    def source(self) -> str:
        """The file this configuration was read from, or ``defaults``."""
        return self._source

    @classmethod
    def load(cls, path: Path | None = None) -> AppConfig:
        """From ``path``, else ``HOLOSCAN_CONFIG_PATH``, else the repository's ``app.yaml``, else defaults."""
        candidates = [path] if path is not None else []
        if os.environ.get("HOLOSCAN_CONFIG_PATH"):
            candidates.append(Path(os.environ["HOLOSCAN_CONFIG_PATH"]))
        candidates.append(REPO_APP_YAML)
        for candidate in candidates:
            if candidate is not None and Path(candidate).is_file():
                data = read_yaml(Path(candidate)) or {}
                if not isinstance(data, dict):
                    raise SettingsError(f"{candidate}: expected a mapping of sections")
                try:
                    config = cls.from_dict(data)
                except SettingsError as exc:
                    raise SettingsError(f"{candidate}: {exc}") from None
                config._source = str(candidate)
                logger.info("configuration from %s", candidate)
                return config
            if path is not None and candidate == path:
                raise FileNotFoundError(f"configuration file {path} does not exist")
        return cls()
