"""Series selection: which series of a study HyperCT should see, with rules kept as data.

The SDK's selector cannot express "no contrast agent", "chest or unspecified body part" or
"at least N slices", ranks only by instance count and crashes without PatientPosition, so we keep
our own. Rules are a plain mapping (``app.yaml`` section ``series-selection`` or a JSON file);
every series gets a verdict with the reasons it was refused, so "not processed" is always
explained. Training's DICOM dataset uses the same code, so a model is trained on the series the
node will pick.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import pydicom
from pydantic import Field, field_validator
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    MediaStorageDirectoryStorage,
)

from operators.dicom_values import MalformedAttributeError, integer, number, numbers
from operators.multiframe import summary_header
from operators.settings import Settings

logger = logging.getLogger(__name__)

#: Header tags read for selection (pixel data is never read here).
HEADER_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID",
    "IssuerOfPatientID", "Modality", "ImageType", "SliceThickness", "ContrastBolusAgent",
    "ContrastBolusRoute", "BodyPartExamined", "SeriesDescription", "StudyDescription",
    "ImageOrientationPatient", "ImagePositionPatient", "PatientPosition", "SeriesNumber",
    "AccessionNumber", "StudyDate", "NumberOfFrames", "Rows", "Columns", "InstanceNumber",
    "FrameOfReferenceUID", "AcquisitionNumber", "ContrastBolusAgentSequence",
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
]  # fmt: skip

CT_IMAGE_STORAGE = str(CTImageStorage)
ENHANCED_CT_IMAGE_STORAGE = str(EnhancedCTImageStorage)
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = str(LegacyConvertedEnhancedCTImageStorage)
DICOMDIR_SOP_CLASS = str(MediaStorageDirectoryStorage)


class SelectionRules(Settings):
    """What makes a series eligible for HyperCT; defaults suit non-contrast chest CT.

    ``body_parts`` lists accepted BodyPartExamined values (case-insensitive); an absent or empty
    value is accepted when ``allow_unspecified_body_part`` is true (many scanners leave it empty).
    ``contrast``: "forbid" refuses a series with ContrastBolusAgent set (or a description saying
    contrast), "ignore" does not look. ``enhanced_image_type_required`` replaces
    ``image_type_required`` for Enhanced CT, whose ImageType Value 3 is an image flavor such as VOLUME
    rather than the plane (PS3.3 C.8.16.1.3): its axial plane is checked from the orientation only.
    Built from ``app.yaml`` (section ``series-selection``) or a training recipe with
    :meth:`from_dict`: hyphenated or underscored keys, unknown keys refused.
    """

    section: ClassVar[str] = "series-selection"

    modalities: tuple[str, ...] = ("CT",)
    sop_classes: tuple[str, ...] = (
        CT_IMAGE_STORAGE,
        ENHANCED_CT_IMAGE_STORAGE,
        LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE,
    )
    image_type_required: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    enhanced_image_type_required: tuple[str, ...] = ("ORIGINAL", "PRIMARY")
    image_type_forbidden: tuple[str, ...] = ("LOCALIZER", "DERIVED", "SECONDARY", "MIP", "MPR")
    slice_thickness_mm: tuple[float, float] = (0.5, 3.0)
    min_slices: int = Field(default=50, ge=1)
    contrast: Literal["forbid", "ignore"] = "forbid"
    contrast_description_words: tuple[str, ...] = ("contrast", "c+", "arterial", "venous", "cta")
    body_parts: tuple[str, ...] = ("CHEST", "THORAX", "LUNG", "CHEST_ABDOMEN", "CHESTABDOMEN", "TORSO")
    allow_unspecified_body_part: bool = True
    max_axial_deviation_deg: float = 10.0

    @field_validator("slice_thickness_mm")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= value[0] <= value[1]:
            raise ValueError(f"need 0 <= low <= high, got {list(value)}")
        return value

    def to_dict(self, *, hyphenated: bool = True) -> dict[str, Any]:
        """As ``app.yaml`` writes it (hyphenated keys), for results.json."""
        return super().to_dict(hyphenated=hyphenated)


@dataclass
class SeriesSummary:
    """What selection needs to know about one series, read from headers only."""

    study_instance_uid: str
    series_instance_uid: str
    modality: str = ""
    sop_class_uid: str = ""
    image_type: tuple[str, ...] = ()
    slice_thickness_mm: float | None = None
    contrast_agent: str = ""
    body_part: str = ""
    series_description: str = ""
    series_number: int | None = None
    orientation: tuple[float, ...] | None = None
    patient_id: str = ""
    files: list[Path] = field(default_factory=list)
    n_frames: int = 0
    #: Malformed numeric values met in its headers (file, attribute, value): the series is refused.
    malformed: list[str] = field(default_factory=list)

    @property
    def n_instances(self) -> int:
        return len(self.files)

    def describe(self) -> str:
        desc = self.series_description or "no description"
        frames = f", {self.n_frames} frames" if self.n_frames != self.n_instances else ""
        return (
            f"series {self.series_number} '{desc}' ({self.modality}, {self.n_instances} instances{frames}, "
            f"{self.series_instance_uid})"
        )


@dataclass
class SeriesVerdict:
    """One series and why it was or was not eligible."""

    series: SeriesSummary
    reasons: list[str]

    @property
    def eligible(self) -> bool:
        return not self.reasons


@dataclass
class SelectionResult:
    """The chosen series (or None) and the verdict for every series of the study."""

    selected: SeriesSummary | None
    verdicts: list[SeriesVerdict]
    why: str

    @property
    def outcome(self) -> str:
        return "selected" if self.selected is not None else "no-eligible-series"

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "why": self.why,
            "selected_series_instance_uid": self.selected.series_instance_uid if self.selected else None,
            "series": [
                {
                    "series_instance_uid": v.series.series_instance_uid,
                    "series_number": v.series.series_number,
                    "description": v.series.series_description,
                    "modality": v.series.modality,
                    "instances": v.series.n_instances,
                    "slice_thickness_mm": v.series.slice_thickness_mm,
                    "eligible": v.eligible,
                    "reasons": v.reasons,
                }
                for v in self.verdicts
            ],
        }


def _str(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


class _Reader:
    """Numeric header values through ``operators.dicom_values``; a malformed one is noted, not raised,
    so the series is refused with that reason (``SeriesSummary.malformed``) instead of a traceback."""

    def __init__(self, ds: Dataset, where: str) -> None:
        self.ds, self.where = ds, where
        self.malformed: list[str] = []

    def number(self, keyword: str) -> float | None:
        try:
            return number(self.ds, keyword, self.where)
        except MalformedAttributeError as exc:
            self.malformed.append(str(exc))
            return None

    def integer(self, keyword: str, default: int | None = None) -> int | None:
        try:
            return integer(self.ds, keyword, self.where, default)
        except MalformedAttributeError as exc:
            self.malformed.append(str(exc))
            return default

    def numbers(self, keyword: str, count: int) -> tuple[float, ...] | None:
        try:
            return numbers(self.ds, keyword, self.where, count)
        except MalformedAttributeError as exc:
            self.malformed.append(str(exc))
            return None


def read_header(path: Path) -> Dataset | None:
    """Header-only read; None for non-DICOM files (logged at debug level, never raised)."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError) as e:
        logger.debug("skipping %s: not readable as DICOM (%s)", path.name, e)
        return None


def summarize_series(items: Iterable[tuple[Path, Dataset]]) -> list[SeriesSummary]:
    """Group (path, header) pairs into series summaries, in a stable order (series number, UID).

    Multi-frame CT keeps SliceThickness, ImageOrientationPatient and the contrast agent in functional
    groups; they are read from there (``operators.multiframe.summary_header``), so an Enhanced CT
    series meets the same rules as any other.
    """
    series: dict[tuple[str, str], SeriesSummary] = {}
    for path, instance in items:
        ds = summary_header(instance)
        study = _str(ds, "StudyInstanceUID")
        uid = _str(ds, "SeriesInstanceUID")
        if not study or not uid or _str(ds, "SOPClassUID") == DICOMDIR_SOP_CLASS:
            continue
        s = series.get((study, uid))
        read = _Reader(ds, path.name)
        if s is None:
            s = series[(study, uid)] = SeriesSummary(
                study_instance_uid=study,
                series_instance_uid=uid,
                modality=_str(ds, "Modality").upper(),
                sop_class_uid=_str(ds, "SOPClassUID"),
                image_type=tuple(str(v).upper() for v in (ds.get("ImageType") or [])),
                slice_thickness_mm=read.number("SliceThickness"),
                contrast_agent=_str(ds, "ContrastBolusAgent"),
                body_part=_str(ds, "BodyPartExamined").upper(),
                series_description=_str(ds, "SeriesDescription"),
                series_number=read.integer("SeriesNumber"),
                orientation=read.numbers("ImageOrientationPatient", 6),
                patient_id=_str(ds, "PatientID"),
            )
        s.files.append(path)
        s.n_frames += max(1, read.integer("NumberOfFrames", 1) or 1)
        s.malformed.extend(read.malformed)
    return sorted(
        series.values(), key=lambda s: (s.study_instance_uid, s.series_number or 0, s.series_instance_uid)
    )


def scan_folder(folder: Path) -> list[SeriesSummary]:
    """Header-only scan of every file under ``folder`` (any layout, any suffix)."""
    pairs = []
    for root, _dirs, names in os.walk(folder):
        for name in sorted(names):
            path = Path(root) / name
            ds = read_header(path)
            if ds is not None:
                pairs.append((path, ds))
    return summarize_series(pairs)


#: "non-contrast", "without contrast", "w/o IV contrast", "no contrast", "sans contraste" say the opposite.
_NEGATED_CONTRAST = re.compile(r"\b(non|no|without|w/o|wo|sans|nat)[\s\-_]*(iv[\s\-_]*)?contr?ast[a-z]*")


def _axial_deviation_deg(orientation: tuple[float, ...] | None) -> float | None:
    if orientation is None or len(orientation) != 6:
        return None
    r, c = orientation[:3], orientation[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    norm = math.sqrt(sum(v * v for v in n)) or 1.0
    return math.degrees(math.acos(min(1.0, abs(n[2]) / norm)))


def _sop_class_name(uid: str) -> str:
    if not uid:
        return "missing"
    name = UID(uid).name
    return name if name != uid else f"{uid} (unknown)"


def evaluate_series(s: SeriesSummary, rules: SelectionRules) -> list[str]:
    """Every rule the series breaks, in words an imaging-IT team can act on (empty = eligible)."""
    reasons: list[str] = []
    if s.malformed:
        more = f" (and {len(s.malformed) - 1} more)" if len(s.malformed) > 1 else ""
        reasons.append(f"malformed header value: {s.malformed[0]}{more}")
    if s.modality not in rules.modalities:
        reasons.append(f"modality {s.modality or 'missing'} is not {'/'.join(rules.modalities)}")
    if rules.sop_classes and s.sop_class_uid not in rules.sop_classes:
        accepted = ", ".join(_sop_class_name(u) for u in rules.sop_classes)
        reasons.append(f"SOP class {_sop_class_name(s.sop_class_uid)} is not one of {accepted}")
    required = (
        rules.enhanced_image_type_required
        if s.sop_class_uid == ENHANCED_CT_IMAGE_STORAGE
        else rules.image_type_required
    )
    missing = [t for t in required if t not in s.image_type]
    if missing:
        reasons.append(f"ImageType {'/'.join(s.image_type) or 'missing'} lacks {'/'.join(missing)}")
    forbidden = [t for t in rules.image_type_forbidden if t in s.image_type]
    if forbidden:
        reasons.append(f"ImageType contains {'/'.join(forbidden)}")
    lo, hi = rules.slice_thickness_mm
    if s.slice_thickness_mm is None:
        reasons.append("SliceThickness is missing")
    elif not lo <= s.slice_thickness_mm <= hi:
        reasons.append(f"slice thickness {s.slice_thickness_mm:g} mm is outside {lo:g}-{hi:g} mm")
    if s.n_frames < rules.min_slices:
        reasons.append(f"{s.n_frames} slices, fewer than {rules.min_slices}")
    if rules.contrast == "forbid":
        if s.contrast_agent:
            reasons.append(f"contrast agent given ({s.contrast_agent})")
        else:
            desc = _NEGATED_CONTRAST.sub(" ", s.series_description.lower())
            words = [
                w for w in rules.contrast_description_words if w in desc.split() or (len(w) > 3 and w in desc)
            ]
            if words:
                reasons.append(f"series description suggests contrast ({words[0]!r})")
    if s.body_part:
        if s.body_part not in rules.body_parts:
            reasons.append(f"body part {s.body_part} is not chest")
    elif not rules.allow_unspecified_body_part:
        reasons.append("BodyPartExamined is missing")
    dev = _axial_deviation_deg(s.orientation)
    if dev is None:
        reasons.append("ImageOrientationPatient is missing")
    elif dev > rules.max_axial_deviation_deg:
        reasons.append(f"slices are {dev:.0f} degrees off axial")
    return reasons


def select_series(series: Sequence[SeriesSummary], rules: SelectionRules | None = None) -> SelectionResult:
    """Pick the best eligible series: thinnest slices, then most slices (frames), then lowest series number."""
    rules = rules or SelectionRules()
    verdicts = [SeriesVerdict(s, evaluate_series(s, rules)) for s in series]
    eligible = [v.series for v in verdicts if v.eligible]
    for v in verdicts:
        if not v.eligible:
            logger.info("not eligible: %s: %s", v.series.describe(), "; ".join(v.reasons))
    if not series:
        return SelectionResult(None, verdicts, "the study holds no readable DICOM series")
    if not eligible:
        parts = [f"{v.series.describe()}: {'; '.join(v.reasons)}" for v in verdicts]
        return SelectionResult(None, verdicts, "no eligible series. " + " | ".join(parts))
    best = min(
        eligible,
        key=lambda s: (
            s.slice_thickness_mm or math.inf,
            -s.n_frames,
            s.series_number or 0,
            s.series_instance_uid,
        ),
    )
    why = (
        f"selected {best.describe()}: thinnest eligible slices ({best.slice_thickness_mm:g} mm)"
        f"{', most slices' if len(eligible) > 1 else ''} among {len(eligible)} eligible of {len(series)} series"
    )
    logger.info(why)
    return SelectionResult(best, verdicts, why)
