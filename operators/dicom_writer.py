"""DICOM result writer operator: SEG, then the TID 1500 SR that references it, then the text SR.

One operator writes all three because they depend on each other (the SR's region groups point at
the SEG's segments) and share the same source headers. The work is in
:mod:`operators.seg_writer`, :mod:`operators.sr_writer` and :mod:`operators.text_report`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai.deploy.core import Fragment

from operators.case_stage import CaseStageOperator
from operators.seg_writer import build_seg
from operators.sr_writer import build_sr, save
from operators.study_case import StudyCase
from operators.text_report import build_text_sr

logger = logging.getLogger(__name__)


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


def study_folder(case: StudyCase) -> Path:
    """Each study's results go to ``OUT/<StudyInstanceUID>/``."""
    return case.output_folder / case.study_instance_uid


def write_case_dicom(case: StudyCase, options: WriterOptions) -> None:
    """Write the DICOM results of one processed study and record their paths in ``case.files``."""
    folder = study_folder(case)
    sources = case.series_datasets
    seg = None
    if options.seg:
        seg = build_seg(case.result, sources, segmentation_type=options.segmentation_type)
        if seg is not None:
            case.files["seg"] = str(save(seg, folder, "SEG").relative_to(case.output_folder))
    sr = build_sr(case.result, sources, segmentation=seg)
    case.files["sr"] = str(save(sr, folder, "SR").relative_to(case.output_folder))
    if options.text_report:
        text = build_text_sr(case.result, sources)
        case.files["text_sr"] = str(save(text, folder, "TXT").relative_to(case.output_folder))


class DicomResultWriterOperator(CaseStageOperator):
    """``cases`` → ``cases``; writes SEG (when a finding is positive), SR and text SR per study."""

    stage = "dicom-writers"

    def __init__(self, fragment: Fragment, *args: Any, options: WriterOptions | None = None, **kwargs: Any) -> None:
        self.options = options or WriterOptions()
        super().__init__(fragment, *args, **kwargs)

    def process(self, case: StudyCase) -> None:
        write_case_dicom(case, self.options)
