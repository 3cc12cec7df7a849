"""Settings of the pipeline's writers (``app.yaml`` section ``outputs``), kept import-light.

The configuration loader imports this without pulling in the writers themselves (highdicom).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WriterOptions:
    """What to write (``app.yaml`` section ``outputs``)."""

    seg: bool = True
    segmentation_type: str = "BINARY"  # or FRACTIONAL
    text_report: bool = True  # Basic Text SR for PACS that do not render Comprehensive 3D SR

    def __post_init__(self) -> None:
        if self.segmentation_type not in ("BINARY", "FRACTIONAL"):
            raise ValueError(f"outputs.segmentation-type must be BINARY or FRACTIONAL, not {self.segmentation_type!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> WriterOptions:
        if not data:
            return cls()
        known = {"seg", "segmentation_type", "text_report"}
        kwargs = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"outputs: unknown key(s) {unknown} (known: seg, segmentation-type, text-report)")
        return cls(**kwargs)
