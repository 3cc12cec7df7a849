"""Synthetic training data from the ``synth`` phantom, rendered in memory (no DICOM written).

Each study is a :class:`SyntheticStudy`: a patient seed (body habitus, noise level, vessel trees), the
finding names planted, and the grid it is rendered on. Its labels are the planted findings mapped to
CT-RATE columns (``synth.tasks``); rendering refuses a study in which a planted finding has no
voxel on the grid, so a label can never claim something the volume does not show.

**Study design.** With ``twins=True`` (default) studies come in pairs of one patient: finding subset S
(each finding with probability ``prevalence``) and its complement. Both twins share body, noise field
and grid, so for every finding the positives and negatives match in body size, noise and slice count
exactly, and nothing but the finding can separate them. Twins share a PatientID, so the
patient-level split keeps them together.

**Geometry.** ``model``: rendered straight on (a slightly larger copy of) the model grid, 2.5 mm
pixels, 2 mm slices — resampling is then almost the identity and rendering is cheapest.
``varied`` (held-out sets): per study 2.0–3.0 mm pixels, 1.5–3.0 mm slices, random in-plane and
cranio-caudal offsets, and head-first or feet-first, so preprocessing really resamples and reorients.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from operators.preprocessing import PreprocessingConfig
from operators.volume import Volume
from training.data.labels import DataError, column_lookup, label_vector, normalise_column
from training.data.records import ScanRecord
from training.tasks import TaskRegistry

logger = logging.getLogger(__name__)

#: Findings the phantom plants that are large enough to survive 2.5 mm pixels / 2 mm slices and that
#: the tiny backbone learns within the test budget (docs/training.md, "What the demo model learns").
VISIBLE_FINDINGS: tuple[str, ...] = (
    "pleural_effusion",
    "consolidation",
    "cardiomegaly",
    "pericardial_effusion",
)

MODEL_PIXEL_MM, MODEL_SLICE_MM = 2.5, 2.0
MODEL_ROWS, MODEL_SLICES = 152, 171  # the default 144 x 165 window plus a few voxels for re-centring
#: Extra voxels rendered around the model window so re-centring on the body/lungs stays inside.
MODEL_PAD = (8, 6)


@dataclass(frozen=True)
class SyntheticStudy:
    """Everything that defines one in-memory synthetic study (its identity is this, hashed)."""

    patient_seed: int
    findings: tuple[str, ...]
    study: int = 0
    pixel_mm: float = MODEL_PIXEL_MM
    slice_mm: float = MODEL_SLICE_MM
    rows: int = MODEL_ROWS
    slices: int = MODEL_SLICES
    offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    feet_first: bool = False

    @property
    def patient_id(self) -> str:
        return f"SYN{self.patient_seed:06d}"

    @property
    def key(self) -> str:
        return f"{self.patient_id}_{self.study}"

    def identity(self) -> str:
        return "synthetic:" + json.dumps(asdict(self), sort_keys=True)

    def describe(self) -> str:
        return f"synthetic study {self.key} ({', '.join(self.findings) or 'no findings'})"

    def load(self) -> Volume:
        return render_study(self)


def render_study(study: SyntheticStudy) -> Volume:
    """Render the phantom on the study's grid → :class:`Volume` (HU, LPS affine, canonical order)."""
    return render_study_with_masks(study)[0]


def render_study_with_masks(study: SyntheticStudy) -> tuple[Volume, dict[str, np.ndarray]]:
    """:func:`render_study` plus, per CT-RATE column the planted findings make positive, the bool
    voxel mask of those findings (same array order as ``Volume.hu``): the ground truth that attention
    maps are scored against (``training/saliency.py``)."""
    from synth.anatomy import sample_anatomy
    from synth.findings import FindingPlacementError, plant
    from synth.geometry import Grid
    from synth.phantom import Phantom
    from synth.render import render_volume

    anatomy = sample_anatomy(study.patient_seed)
    dx, dy, dz = study.offset_mm
    grid = Grid.axial(
        study.rows, study.rows, study.pixel_mm, study.slices, study.slice_mm,
        centre_z=round(anatomy.scan_centre_z + dz, 1), centre_xy=(dx, dy),
    )  # fmt: skip
    half = study.slice_mm / 2.0
    try:
        phantom = plant(Phantom(anatomy), list(study.findings), z_range=(grid.z[0] - half, grid.z[-1] + half))
    except FindingPlacementError as exc:
        raise DataError(f"{study.describe()}: {exc}") from None
    rendered = render_volume(phantom, grid, masks=True)
    shown = {f.name for f in phantom.findings if rendered.masks[f.id].any()}
    hidden = sorted(set(study.findings) - shown)
    if hidden:
        raise DataError(f"{study.describe()}: planted {', '.join(hidden)} has no voxel on the grid")
    hu = rendered.hu
    affine = np.eye(4)
    affine[0, 0], affine[1, 1], affine[2, 2] = grid.col_spacing, grid.row_spacing, study.slice_mm
    affine[:3, 3] = [grid.x[0], grid.y[0], grid.z[0]]
    columns = sorted({c for cols in rendered.finding_tasks.values() for c in cols})
    masks = {c: rendered.task_mask(c) for c in columns}
    if study.feet_first:  # stored columns run toward patient right (FFS), as the DICOM writer does
        hu = hu[:, :, ::-1]
        masks = {c: m[:, :, ::-1] for c, m in masks.items()}
        affine[0, 0] = -grid.col_spacing
        affine[0, 3] = grid.x[-1]
    return Volume(hu=np.ascontiguousarray(hu), affine=affine), {
        c: np.ascontiguousarray(m) for c, m in masks.items()
    }


def design_studies(
    n_studies: int,
    findings: Sequence[str] = VISIBLE_FINDINGS,
    *,
    prevalence: float = 0.5,
    seed: int = 0,
    twins: bool = True,
    geometry: str = "model",
    preprocessing: PreprocessingConfig | None = None,
) -> list[SyntheticStudy]:
    """``n_studies`` study specs (pairs of twins when ``twins``); patients ``seed·100000 + i``.

    Different ``seed`` values give disjoint patients, which is how held-out sets are made. ``model``
    geometry renders on ``preprocessing``'s grid (default config: 2.5 mm, 2 mm) plus a small pad.
    """
    from synth.tasks import normalise_finding_name

    names = tuple(normalise_finding_name(f) for f in findings)
    if geometry not in ("model", "varied"):
        raise ValueError(f"geometry must be 'model' or 'varied', got {geometry!r}")
    studies: list[SyntheticStudy] = []
    i = 0
    while len(studies) < n_studies:
        patient = seed * 100000 + i
        rng = np.random.default_rng([patient, 7919])
        pick = rng.random(len(names)) < prevalence
        subsets = [pick, ~pick] if twins else [pick]
        geo = _geometry(rng, geometry, preprocessing)
        for s, chosen in enumerate(subsets):
            if len(studies) < n_studies:
                found = tuple(n for n, c in zip(names, chosen, strict=True) if c)
                studies.append(SyntheticStudy(patient_seed=patient, findings=found, study=s, **geo))
        i += 1
    return studies


def _geometry(rng: np.random.Generator, kind: str, pre: PreprocessingConfig | None) -> dict[str, Any]:
    if kind == "model":
        if pre is None or pre == PreprocessingConfig():
            return {}
        sx, sy, sz = pre.spacing_mm
        if abs(sx - sy) > 1e-6:
            raise ValueError("synthetic 'model' geometry needs square pixels (spacing_mm x == y)")
        size = max(pre.image_size)
        return {
            "pixel_mm": sx,
            "slice_mm": sz,
            "rows": size + MODEL_PAD[0],
            "slices": pre.n_slices + MODEL_PAD[1],
        }
    pixel = float(rng.choice([2.0, 2.25, 2.75, 3.0]))
    slice_mm = float(rng.choice([1.5, 2.5, 3.0]))
    fov, cover = 380.0, 350.0
    return {
        "pixel_mm": pixel,
        "slice_mm": slice_mm,
        "rows": int(math.ceil(fov / pixel)),
        "slices": int(math.ceil(cover / slice_mm)),
        "offset_mm": tuple(float(v) for v in rng.uniform([-15.0, -15.0, -10.0], [15.0, 15.0, 10.0])),
        "feet_first": bool(rng.random() < 0.5),
    }


def synthetic_records(
    studies: Sequence[SyntheticStudy], registry: TaskRegistry, tasks: Sequence[str]
) -> list[ScanRecord]:
    """Records with labels from the planted findings (every trained task is labelled: 1 or 0)."""
    from synth.tasks import CT_RATE_COLUMNS, labels_for

    lookup = column_lookup(registry)
    col_to_key = {c: lookup[normalise_column(c)] for c in CT_RATE_COLUMNS if normalise_column(c) in lookup}
    unknown = [t for t in tasks if t not in col_to_key.values()]
    if unknown:
        raise DataError(f"synthetic data cannot label task(s) {', '.join(unknown)} (no CT-RATE column)")
    out = []
    for st in studies:
        labels = {
            col_to_key[c]: float(v) for c, v in labels_for(list(st.findings)).items() if c in col_to_key
        }
        out.append(ScanRecord(st.key, st.patient_id, label_vector(labels, tasks), st, f"synthetic {st.key}"))
    return out


def tasks_for_findings(findings: Sequence[str], registry: TaskRegistry) -> list[str]:
    """Registry keys of the CT-RATE columns the given findings make positive, in registry order."""
    from synth.tasks import FINDING_TASKS, normalise_finding_name

    lookup = column_lookup(registry)
    keys = {lookup[normalise_column(c)] for f in findings for c in FINDING_TASKS[normalise_finding_name(f)]}
    return [k for k in registry.keys if k in keys]


def study_digest(studies: Sequence[SyntheticStudy]) -> str:
    """Short hash of a study list (recorded with a run so the data can be regenerated)."""
    h = hashlib.sha256()
    for s in studies:
        h.update(s.identity().encode())
    return h.hexdigest()[:16]
