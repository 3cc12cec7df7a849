"""Volume load operator: the selected series → HU volume with its LPS geometry, checked.

We use our own pydicom reader (:func:`operators.volume.load_dicom_series`) instead of the SDK's
``DICOMSeriesToVolumeOperator``: the SDK's takes the depth spacing from the first two slices and
never checks for missing slices, gantry tilt or mixed acquisitions, and ``benchmarks/pipeline.py``
measures it slower than SimpleITK. Every refusal names its reason; a refused study ends
"not processed", the others go on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from monai.deploy.core import Fragment

from operators.case_stage import CaseStageOperator
from operators.study_case import Outcome, StudyCase
from operators.volume import Volume, VolumeError, load_dicom_series

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VolumeChecks:
    """Sanity checks on a loaded CT volume (``app.yaml`` section ``volume-checks``)."""

    min_z_extent_mm: float = 120.0
    lung_hu_range: tuple[float, float] = (-950.0, -600.0)
    min_lung_fraction: float = 0.01

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> VolumeChecks:
        if not data:
            return cls()
        names = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name not in names:
                raise ValueError(f"volume-checks: unknown key {key!r} (known: {sorted(names)})")
            kwargs[name] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)


def check_volume(volume: Volume, checks: VolumeChecks) -> str | None:
    """The reason a volume cannot be a chest CT for HyperCT, or None when it can."""
    n = volume.shape[0]
    z_extent = float(np.linalg.norm(volume.affine[:3, 2])) * max(n - 1, 0)
    if z_extent < checks.min_z_extent_mm:
        return f"the series covers {z_extent:.0f} mm along the body, less than {checks.min_z_extent_mm:.0f} mm"
    middle = volume.hu[n // 4 : max(n // 4 + 1, 3 * n // 4)]
    lo, hi = checks.lung_hu_range
    fraction = float(np.count_nonzero((middle >= lo) & (middle <= hi))) / middle.size
    if fraction < checks.min_lung_fraction:
        return (
            f"no lungs found: {fraction:.1%} of the central slices lie in {lo:g}..{hi:g} HU "
            f"(need {checks.min_lung_fraction:.0%}); not a chest CT or wrong rescale"
        )
    return None


def load_case_volume(case: StudyCase, checks: VolumeChecks) -> None:
    """Fill ``case.volume`` or stop the case with the reason."""
    try:
        volume = load_dicom_series(case.series_datasets)
    except VolumeError as exc:
        case.stop(Outcome.NOT_PROCESSED, f"series refused: {exc}")
        return
    reason = check_volume(volume, checks)
    if reason is not None:
        case.stop(Outcome.NOT_PROCESSED, f"series refused: {reason}")
        return
    case.volume = volume
    logger.info(
        "study %s: volume %s voxels, spacing %s mm",
        case.study_instance_uid,
        "x".join(map(str, volume.shape)),
        ", ".join(f"{s:.3g}" for s in volume.spacing),
    )


class VolumeLoaderOperator(CaseStageOperator):
    """``cases`` → ``cases`` with ``volume`` (HU float32, LPS affine) for each active study."""

    stage = "volume-load"

    def __init__(self, fragment: Fragment, *args: Any, checks: VolumeChecks | None = None, **kwargs: Any) -> None:
        self.checks = checks or VolumeChecks()
        super().__init__(fragment, *args, **kwargs)

    def process(self, case: StudyCase) -> None:
        load_case_volume(case, self.checks)
