"""What one study's inference produced, in one place: the input of every result writer and of
``results.json``.

The writers (``sr_writer``, ``seg_writer``, ``text_report``) take a :class:`StudyResult` and nothing
from the model or the manifest directly, so they are testable without ONNX Runtime or Holoscan, and
the SR, the SEG, the text SR and ``results.json`` cannot disagree: they are all rendered from the same
object. ``results.json`` holds UIDs and model identity only, never patient attributes: it is copied
into logs, tickets and batch summaries, where names and IDs must not travel.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from operators.manifest import CodingScheme, Concept, ModelManifest, TaskEntry

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SALIENCY_THRESHOLD",
    "RESULTS_SCHEMA_VERSION",
    "CodingScheme",
    "Concept",
    "ModelInfo",
    "StudyResult",
    "TaskResult",
    "concept_from_dict",
    "decisions",
    "probabilities",
    "source_headers",
]

RESULTS_SCHEMA_VERSION = 1
#: Fraction of a map's maximum above which a voxel belongs to the attention segment, when the manifest
#: task gives no ``saliency_threshold`` (see ``docs/results.md``: relative, because attention maps are
#: not calibrated across studies).
DEFAULT_SALIENCY_THRESHOLD = 0.5


def _unit_interval(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {value!r}")
    return v


def _sigmoid(x: float) -> float:
    """Logistic function without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@dataclass(frozen=True, eq=False)
class TaskResult:
    """One task's output for one study.

    ``attention`` is the task's attention map already put back on the *source* geometry
    (``operators.preprocessing.model_map_to_source``): float ``[slices, rows, cols]`` in the slice order
    of :attr:`StudyResult.sop_instance_uids` (the ``Volume`` order), or None when the model gives none.
    ``present`` is the decision ``probability >= threshold`` (docs/evaluation.md §2.4).
    """

    key: str
    name: str
    group: str
    concept: Concept
    finding_site: Concept | None
    logit: float
    probability: float
    threshold: float
    present: bool
    saliency: bool = True
    attention: np.ndarray | None = field(default=None, repr=False)
    saliency_threshold: float | None = None
    index: int | None = None

    def __post_init__(self) -> None:
        where = f"TaskResult({self.key!r})"
        if not self.key:
            raise ValueError("TaskResult.key is empty")
        object.__setattr__(self, "probability", _unit_interval(self.probability, f"{where}.probability"))
        object.__setattr__(self, "threshold", _unit_interval(self.threshold, f"{where}.threshold"))
        if self.saliency_threshold is not None:
            object.__setattr__(
                self,
                "saliency_threshold",
                _unit_interval(self.saliency_threshold, f"{where}.saliency_threshold"),
            )
        logit = float(self.logit)
        if math.isnan(logit):
            raise ValueError(f"{where}.logit is NaN")
        object.__setattr__(self, "logit", logit)
        object.__setattr__(self, "present", bool(self.present))
        if self.attention is not None:
            a = np.asarray(self.attention)
            if a.ndim != 3 or not np.issubdtype(a.dtype, np.floating):
                raise ValueError(
                    f"{where}.attention must be a float array [slices, rows, cols], got {a.dtype} {a.shape}"
                )
            if not np.all(np.isfinite(a)):
                raise ValueError(f"{where}.attention has non-finite values")
            object.__setattr__(self, "attention", a)

    @property
    def decision(self) -> str:
        """``"present"`` or ``"absent"``."""
        return "present" if self.present else "absent"

    @property
    def effective_saliency_threshold(self) -> float:
        """The manifest's saliency threshold, else :data:`DEFAULT_SALIENCY_THRESHOLD`."""
        return DEFAULT_SALIENCY_THRESHOLD if self.saliency_threshold is None else self.saliency_threshold

    @classmethod
    def from_manifest(
        cls,
        task: TaskEntry,
        logit: float,
        *,
        probability: float | None = None,
        attention: np.ndarray | None = None,
        threshold: float | None = None,
    ) -> TaskResult:
        """Build from the manifest task entry: probability = sigmoid(logit) unless given, decision =
        probability >= threshold (the task's operating threshold unless ``threshold`` overrides it)."""
        p = _sigmoid(float(logit)) if probability is None else float(probability)
        thr = task.threshold if threshold is None else float(threshold)
        return cls(
            key=task.key,
            name=task.name,
            group=task.group,
            concept=task.concept,
            finding_site=task.finding_site,
            logit=float(logit),
            probability=p,
            threshold=thr,
            present=p >= thr,
            saliency=task.saliency,
            attention=attention,
            saliency_threshold=task.saliency_threshold,
            index=task.index,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON form (without the attention map itself; its shape only)."""

        def concept(c: Concept | None) -> dict[str, str] | None:
            if c is None:
                return None
            d = {"value": c.value, "scheme_designator": c.scheme_designator, "meaning": c.meaning}
            if c.scheme_version:
                d["scheme_version"] = c.scheme_version
            return d

        return {
            "key": self.key,
            "index": self.index,
            "name": self.name,
            "group": self.group,
            "concept": concept(self.concept),
            "finding_site": concept(self.finding_site),
            "logit": self.logit,
            "probability": self.probability,
            "threshold": self.threshold,
            "decision": self.decision,
            "saliency": self.saliency,
            "saliency_threshold": self.effective_saliency_threshold,
            "attention_shape": None if self.attention is None else list(self.attention.shape),
        }


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the model build that produced a result (from the manifest)."""

    name: str
    version: str
    manifest_sha256: str
    synthetic: bool = False
    coding_schemes: tuple[CodingScheme, ...] = ()
    intended_use: str = ""
    #: Task names of the full HyperCT task set that this model was not trained on (manifest
    #: ``not_covered``): shown as "not covered by this model", never as absent.
    not_covered: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("ModelInfo.name is empty")
        if not self.version:
            raise ValueError("ModelInfo.version is empty")
        sha = self.manifest_sha256.lower()
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ValueError(f"ModelInfo.manifest_sha256 must be 64 hex digits, got {self.manifest_sha256!r}")
        object.__setattr__(self, "manifest_sha256", sha)
        object.__setattr__(self, "coding_schemes", tuple(self.coding_schemes))
        object.__setattr__(self, "not_covered", tuple(self.not_covered))

    @classmethod
    def from_manifest(cls, manifest: ModelManifest, manifest_sha256: str) -> ModelInfo:
        return cls(
            name=manifest.name,
            version=manifest.version,
            manifest_sha256=manifest_sha256,
            synthetic=manifest.synthetic,
            coding_schemes=manifest.coding_schemes,
            intended_use=manifest.intended_use,
            not_covered=tuple(str(t.get("name", t.get("key"))) for t in manifest.extra.get("not_covered", ())),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "manifest_sha256": self.manifest_sha256,
            "synthetic": self.synthetic,
            "coding_schemes": [
                {
                    "designator": s.designator,
                    "name": s.name,
                    "responsible_organization": s.responsible_organization,
                    "version": s.version,
                }
                for s in self.coding_schemes
            ],
            "intended_use": self.intended_use,
            "not_covered": list(self.not_covered),
        }


@dataclass(frozen=True, eq=False)
class StudyResult:
    """All task results for the one selected series of a study.

    ``sop_instance_uids`` names the source instance of each slice, in the slice order of the attention
    maps (``Volume.sop_instance_uids``); for multi-frame CT, ``frame_numbers`` names the frame of each
    slice in its instance (``Volume.frame_numbers``; None for single-frame series). The SEG writer aligns
    frames by these, never by file order or InstanceNumber. ``key_images`` maps a finding's task key to
    its key image (``operators.key_images``) as a path relative to the folder of ``results.json``,
    which lists it with the finding.
    """

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]
    tasks: tuple[TaskResult, ...]
    model: ModelInfo
    frame_of_reference_uid: str | None = None
    frame_numbers: tuple[int, ...] | None = None
    selection: Mapping[str, Any] = field(default_factory=dict)
    outputs: Mapping[str, Any] = field(default_factory=dict)
    key_images: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.study_instance_uid:
            raise ValueError("StudyResult.study_instance_uid is empty")
        if not self.series_instance_uid:
            raise ValueError("StudyResult.series_instance_uid is empty")
        object.__setattr__(self, "sop_instance_uids", tuple(self.sop_instance_uids))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if not self.sop_instance_uids:
            raise ValueError("StudyResult.sop_instance_uids is empty")
        if self.frame_numbers is not None:
            object.__setattr__(self, "frame_numbers", tuple(self.frame_numbers))
            if len(self.frame_numbers) != len(self.sop_instance_uids):
                raise ValueError(
                    f"StudyResult.frame_numbers has {len(self.frame_numbers)} entries for "
                    f"{len(self.sop_instance_uids)} slices"
                )
        if len(set(self.slice_sources)) != len(self.sop_instance_uids):
            raise ValueError("StudyResult.sop_instance_uids (with frame_numbers) contains duplicates")
        if not self.tasks:
            raise ValueError("StudyResult.tasks is empty; a result has at least one task")
        keys = [t.key for t in self.tasks]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"StudyResult.tasks has duplicate keys {dupes}")
        object.__setattr__(self, "key_images", dict(self.key_images))
        unknown = sorted(set(self.key_images) - set(keys))
        if unknown:
            raise ValueError(f"StudyResult.key_images names tasks it does not have: {unknown}")
        n = len(self.sop_instance_uids)
        for t in self.tasks:
            if t.attention is not None and t.attention.shape[0] != n:
                raise ValueError(
                    f"TaskResult({t.key!r}).attention has {t.attention.shape[0]} slices, "
                    f"the selected series {n} (StudyResult.sop_instance_uids)"
                )

    @property
    def slice_sources(self) -> tuple[tuple[str, int | None], ...]:
        """(SOP Instance UID, frame number or None) of each slice."""
        frames = self.frame_numbers or (None,) * len(self.sop_instance_uids)
        return tuple(zip(self.sop_instance_uids, frames, strict=True))

    @property
    def instance_uids(self) -> tuple[str, ...]:
        """The distinct source instances, in the order their first slice appears."""
        return tuple(dict.fromkeys(self.sop_instance_uids))

    def task(self, key: str) -> TaskResult:
        for t in self.tasks:
            if t.key == key:
                return t
        raise KeyError(f"no task {key!r} in this result (tasks: {', '.join(t.key for t in self.tasks)})")

    @property
    def positive(self) -> tuple[TaskResult, ...]:
        return tuple(t for t in self.tasks if t.present)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": RESULTS_SCHEMA_VERSION,
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "frame_of_reference_uid": self.frame_of_reference_uid,
            "n_instances": len(self.instance_uids),
            "sop_instance_uids": list(self.sop_instance_uids),
            "frame_numbers": list(self.frame_numbers) if self.frame_numbers is not None else None,
            "selection": dict(self.selection),
            "model": self.model.to_dict(),
            "tasks": [{**t.to_dict(), "key_image": self.key_images.get(t.key)} for t in self.tasks],
            "outputs": dict(self.outputs),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """``results.json`` text. Floats are written with ``repr`` precision, so probabilities read back
        bit-identical to the float64 in the SR."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def with_outputs(self, **outputs: Any) -> StudyResult:
        """A copy with entries added to ``outputs`` (e.g. the SOP Instance UIDs / files written)."""
        return replace(self, outputs={**self.outputs, **outputs})


def concept_from_dict(d: Mapping[str, Any]) -> Concept:
    """Inverse of the JSON concept form (for tools that read ``results.json``)."""
    return Concept(
        value=str(d["value"]),
        scheme_designator=str(d["scheme_designator"]),
        meaning=str(d["meaning"]),
        scheme_version=d.get("scheme_version"),
    )


def decisions(result_json: str | Mapping[str, Any]) -> dict[str, str]:
    """``{task key: "present"|"absent"}`` from a ``results.json`` text or dict."""
    d = json.loads(result_json) if isinstance(result_json, str) else result_json
    return {t["key"]: t["decision"] for t in d["tasks"]}


def probabilities(result_json: str | Mapping[str, Any]) -> dict[str, float]:
    """``{task key: probability}`` from a ``results.json`` text or dict."""
    d = json.loads(result_json) if isinstance(result_json, str) else result_json
    return {t["key"]: float(t["probability"]) for t in d["tasks"]}


# --------------------------------------------------------------------------------------------------
# Source instances
# --------------------------------------------------------------------------------------------------

#: Type 2 Patient / Study attributes the writers copy; written empty when the source lacks them (highdicom
#: reads them unconditionally, and an absent Type 2 attribute is an error in the output).
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
)


def _header(ds: Any) -> Any:
    """A copy of ``ds`` without pixel data (writers need metadata only; keeps memory flat)."""
    from pydicom.dataset import Dataset

    out = Dataset()
    for elem in ds:
        if elem.tag.group == 0x7FE0 or elem.tag in (0x00281201, 0x00281202, 0x00281203):
            continue
        out.add(elem)
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    for kw in _TYPE2_COPIED:
        if kw not in out:
            setattr(out, kw, "")
    return out


def source_headers(result: StudyResult, datasets: Sequence[Any]) -> list[Any]:
    """The selected series' instances as pixel-free headers, one per instance, in the order of
    ``result.instance_uids`` (for a single-frame series: one per slice, in slice order).

    Every writer goes through here, so each refuses sources that do not belong to the result (wrong
    study or series, missing instances) with an error naming the attribute. Instances of the series
    that are not in the result (a localizer the volume left out) are ignored.
    """
    by_uid: dict[str, Any] = {}
    for ds in datasets:
        uid = str(ds.get("SOPInstanceUID", ""))
        if not uid:
            raise ValueError("a source instance has no SOPInstanceUID")
        if str(ds.get("StudyInstanceUID", "")) != result.study_instance_uid:
            raise ValueError(
                f"source SOP {uid}: StudyInstanceUID {ds.get('StudyInstanceUID')} differs from the "
                f"result's {result.study_instance_uid}"
            )
        if str(ds.get("SeriesInstanceUID", "")) != result.series_instance_uid:
            raise ValueError(
                f"source SOP {uid}: SeriesInstanceUID {ds.get('SeriesInstanceUID')} is not the selected "
                f"series {result.series_instance_uid}"
            )
        by_uid.setdefault(uid, ds)
    missing = [u for u in result.instance_uids if u not in by_uid]
    if missing:
        raise ValueError(
            f"{len(missing)} SOPInstanceUID(s) of the result are not among the source datasets, "
            f"first {missing[0]}"
        )
    extra = len(set(by_uid) - set(result.sop_instance_uids))
    if extra:  # e.g. a localizer stored in the same series, left out of the volume: not referenced
        logger.debug(
            "%d source instance(s) of series %s are not in the result; ignored",
            extra,
            result.series_instance_uid,
        )
    if result.frame_of_reference_uid:
        for_uids = {str(by_uid[u].get("FrameOfReferenceUID", "")) for u in result.instance_uids}
        if for_uids != {result.frame_of_reference_uid}:
            raise ValueError(
                f"source FrameOfReferenceUID {sorted(for_uids)} differs from the result's "
                f"{result.frame_of_reference_uid}"
            )
    return [_header(by_uid[u]) for u in result.instance_uids]
