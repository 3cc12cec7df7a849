"""Application configuration: the app's own sections of ``app.yaml`` as typed values.

``app.yaml`` serves two readers: holoscan-cli's packager (``application``, ``resources``) and this
app (``series-selection``, ``volume-checks``, ``outputs``, ``inference``). Keys are hyphenated like
the packager's. Unknown keys in our sections are refused, naming the key, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from operators.ort_session import SessionOptions
from operators.series_selection import SelectionRules
from operators.settings import WriterOptions
from operators.volume import VolumeChecks

logger = logging.getLogger(__name__)

#: app.yaml at the repository root (in a MAP: HOLOSCAN_CONFIG_PATH, /var/holoscan/app.yaml).
REPO_APP_YAML = Path(__file__).resolve().parents[1] / "app.yaml"
PACKAGER_SECTIONS = {"application", "resources"}
APP_SECTIONS = {"series-selection", "volume-checks", "outputs", "inference"}
#: Read by other loaders from the same file (``node``: ``app/node/config.py``); skipped here.
OTHER_SECTIONS = {"node"}


@dataclass(frozen=True)
class InferenceOptions:
    """ONNX Runtime placement and memory (``app.yaml`` section ``inference``)."""

    device: str = "auto"  # auto | cpu | cuda
    tensorrt: bool = False
    threads: int = 0  # 0 = usable cores
    max_resident_sessions: int | None = None  # None = derived from the memory budget
    memory_budget_mb: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> InferenceOptions:
        if not data:
            return cls()
        kwargs = {str(k).replace("-", "_"): v for k, v in data.items()}
        known = {"device", "tensorrt", "threads", "max_resident_sessions", "memory_budget_mb"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"inference: unknown key(s) {unknown} (known: {sorted(known)})")
        return cls(**kwargs)

    def session_options(self) -> SessionOptions:
        return SessionOptions(device=self.device, use_tensorrt=self.tensorrt, intra_op_threads=self.threads)


@dataclass(frozen=True)
class AppConfig:
    """Everything the pipeline reads from ``app.yaml`` besides the packager's sections."""

    selection: SelectionRules = field(default_factory=SelectionRules)
    volume_checks: VolumeChecks = field(default_factory=VolumeChecks)
    outputs: WriterOptions = field(default_factory=WriterOptions)
    inference: InferenceOptions = field(default_factory=InferenceOptions)
    source: str = "defaults"

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> AppConfig:
        unknown = sorted(set(data) - PACKAGER_SECTIONS - APP_SECTIONS - OTHER_SECTIONS)
        if unknown:
            raise ValueError(f"{source}: unknown section(s) {unknown} (known: {sorted(PACKAGER_SECTIONS | APP_SECTIONS | OTHER_SECTIONS)})")
        return cls(
            selection=SelectionRules.from_dict(data.get("series-selection")),
            volume_checks=VolumeChecks.from_dict(data.get("volume-checks")),
            outputs=WriterOptions.from_dict(data.get("outputs")),
            inference=InferenceOptions.from_dict(data.get("inference")),
            source=source,
        )

    @classmethod
    def load(cls, path: Path | None = None) -> AppConfig:
        """From ``path``, else ``HOLOSCAN_CONFIG_PATH``, else the repository's ``app.yaml``, else defaults."""
        candidates = [path] if path is not None else []
        if os.environ.get("HOLOSCAN_CONFIG_PATH"):
            candidates.append(Path(os.environ["HOLOSCAN_CONFIG_PATH"]))
        candidates.append(REPO_APP_YAML)
        for candidate in candidates:
            if candidate is not None and Path(candidate).is_file():
                data = yaml.safe_load(Path(candidate).read_text()) or {}
                if not isinstance(data, dict):
                    raise ValueError(f"{candidate}: expected a mapping of sections")
                logger.info("configuration from %s", candidate)
                return cls.from_dict(data, source=str(candidate))
            if path is not None and candidate == path:
                raise FileNotFoundError(f"configuration file {path} does not exist")
        return cls()
