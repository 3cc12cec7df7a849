"""Many studies of different synthetic patients in one folder, with one labels CSV.

Each study gets its own seed (``seed + i``), body, geometry (within the ranges below unless
``vary_geometry`` is off) and, with ``random_findings``, an independent draw of every finding at its
prevalence. ``paired`` writes every positive study next to its negative twin (same patient, grid and
noise, no findings), which is the cleanest signal for learning a finding.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from synth.findings import FindingPlacementError
from synth.geometry import MAX_SLICES, MIN_SLICES, PatientPosition
from synth.labels import write_labels_csv
from synth.study import StudyConfig, StudyResult, generate_study
from synth.tasks import FINDING_NAMES, normalise_finding_name

log = logging.getLogger(__name__)

DEFAULT_PREVALENCE = 0.3
#: Geometry ranges of ``vary_geometry``: field of view, slice spacing choices, cranio-caudal coverage,
#: probability of a feet-first scan, jitter of the scan centre.
FOV_RANGE_MM = (340.0, 420.0)
SLICE_SPACINGS_MM = (1.0, 1.25, 1.5, 2.0, 2.5)
COVERAGE_RANGE_MM = (300.0, 345.0)
FFS_PROBABILITY = 0.2
CENTRE_JITTER_MM = 10.0


@dataclass(frozen=True)
class DatasetConfig:
    """``studies`` studies written under one folder (see the module docstring)."""

    studies: int
    base: StudyConfig = field(default_factory=StudyConfig)
    random_findings: bool = True
    prevalence: Mapping[str, float] = field(default_factory=dict)  # missing names: DEFAULT_PREVALENCE
    vary_geometry: bool = True
    paired: bool = False
    jobs: int = 1
    fov_range_mm: tuple[float, float] = FOV_RANGE_MM
    slice_spacings_mm: tuple[float, ...] = SLICE_SPACINGS_MM
    coverage_range_mm: tuple[float, float] = COVERAGE_RANGE_MM
    ffs_probability: float = FFS_PROBABILITY

    def prevalence_of(self, name: str) -> float:
        return float(self.prevalence.get(name, self.prevalence.get("*", DEFAULT_PREVALENCE)))


@dataclass
class DatasetResult:
    root: Path
    labels_csv: Path
    studies: list[StudyResult]


def parse_prevalence(text: str) -> dict[str, float]:
    """``"0.3"`` or ``"0.2,lung_nodule=0.5,emphysema=0.1"`` -> {"*": 0.2, "lung_nodule": 0.5, ...}."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, value = part.rpartition("=")
        key = normalise_finding_name(name) if name else "*"
        try:
            p = float(value)
        except ValueError:
            raise ValueError(f"prevalence {part!r} is not a number") from None
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"prevalence {part!r} must be within 0..1")
        out[key] = p
    return out


def study_config(dcfg: DatasetConfig, i: int) -> StudyConfig:
    """The configuration of study ``i`` (deterministic for the dataset seed)."""
    base = dcfg.base
    pair = dcfg.paired
    seed = base.seed + (i // 2 if pair else i)
    rng = np.random.default_rng([seed, 9])
    cfg = base
    if dcfg.studies > 1:  # identities given for one study must not repeat across patients
        cfg = replace(
            base,
            seed=seed,
            study_uid=None,
            series_uid=None,
            accession=None,
            patient_id=None,
            patient_name=None,
            study_folder=None,
        )
    if dcfg.random_findings:
        draws = rng.random(len(FINDING_NAMES))
        names = tuple(n for n, u in zip(FINDING_NAMES, draws, strict=True) if u < dcfg.prevalence_of(n))
    else:
        rng.random(len(FINDING_NAMES))
        names = base.findings
    if pair and i % 2 == 1:
        names = ()
    cfg = replace(cfg, findings=names)
    if dcfg.vary_geometry:
        fov = rng.uniform(*dcfg.fov_range_mm)
        spacing = float(rng.choice(dcfg.slice_spacings_mm))
        coverage = rng.uniform(*dcfg.coverage_range_mm)
        slices = int(min(MAX_SLICES, max(MIN_SLICES, round(coverage / spacing))))
        position = PatientPosition.FFS if rng.random() < dcfg.ffs_probability else PatientPosition.HFS
        from synth.anatomy import sample_anatomy

        centre = sample_anatomy(seed).scan_centre_z + rng.uniform(-CENTRE_JITTER_MM, CENTRE_JITTER_MM)
        cfg = replace(
            cfg,
            pixel_spacing=round(fov / cfg.cols, 3),
            slice_spacing=spacing,
            slice_thickness=spacing,
            slices=slices,
            position=position,
            centre_z=round(float(centre), 1),
        )
    return cfg


def _one(args: tuple[StudyConfig, str, bool]) -> StudyResult:
    cfg, out, lenient = args
    try:
        return generate_study(cfg, out)
    except FindingPlacementError as exc:  # random draw on an odd geometry: drop what cannot be placed
        if not lenient:
            raise
        log.warning("seed %d: %s; writing it without the unplaceable findings", cfg.seed, exc)
        keep = []
        for name in cfg.findings:
            try:
                from synth.study import make_phantom

                make_phantom(replace(cfg, findings=(name,)))
                keep.append(name)
            except FindingPlacementError:
                pass
        return generate_study(replace(cfg, findings=tuple(keep)), out)


def generate_dataset(
    dcfg: DatasetConfig, out_dir: str | Path, progress: Callable[[StudyResult], None] | None = None
) -> DatasetResult:
    """Write ``dcfg.studies`` studies and ``OUT/labels.csv``; ``progress`` is called after each study."""
    if dcfg.studies < 1:
        raise ValueError("studies must be >= 1")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    configs = [study_config(dcfg, i).validated() for i in range(dcfg.studies)]
    results: list[StudyResult] = []
    jobs = max(1, min(dcfg.jobs, os.cpu_count() or 1))
    lenient = dcfg.random_findings
    work = [(replace(c, threads=1 if jobs > 1 else c.threads), str(root), lenient) for c in configs]
    if jobs == 1:
        for w in work:
            results.append(_one(w))
            if progress:
                progress(results[-1])
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for res in pool.map(_one, work):
                results.append(res)
                if progress:
                    progress(res)
    csv_path = write_labels_csv(root / "labels.csv", [r.label_row(root) for r in results])
    return DatasetResult(root, csv_path, results)


def summary_rows(results: list[StudyResult]) -> list[dict[str, Any]]:
    """One dict per study for printing (folder, UID, series, slices, findings, seconds)."""
    rows = []
    for r in results:
        rows.append(
            {
                "study": r.folder.name,
                "study_uid": r.study.study_uid,
                "series": ", ".join(f"{s.folder.name} ({len(s.files)})" for s in r.series),
                "slices": len(r.primary.files),
                "position": r.geometry.position.value,
                "findings": ", ".join(r.phantom.finding_names) or "-",
                "findings_list": list(r.phantom.finding_names),
                "series_list": [(s.folder.name, len(s.files)) for s in r.series],
                "seconds": r.seconds,
            }
        )
    return rows
