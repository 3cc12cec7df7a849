"""Orchestration: one synthetic study (primary axial CT + optional extra series) written to disk.

Layout (``OUT`` is the output folder)::

    OUT/labels.csv                                  one row per study (CT-RATE columns + keys)
    OUT/<PatientID>_<AccessionNumber>/findings.json ground truth of the study
    OUT/<PatientID>_<AccessionNumber>/02_axial/0001.dcm ...   primary thin non-contrast axial series
    OUT/<...>/01_scout  03_thick5mm  04_contrast  05_mr     extras, when asked for

Identifiers are deterministic: the same configuration always gives the same UIDs and files.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from synth.anatomy import Anatomy, sample_anatomy
from synth.codecs import require_tool, resolve_syntax
from synth.findings import plant
from synth.geometry import (
    MAX_SLICES,
    MIN_SLICES,
    Grid,
    PatientPosition,
    SeriesGeometry,
    default_pixel_spacing,
    default_slice_spacing,
)
from synth.phantom import Phantom
from synth.render import noise_sigma, noise_slice, render_hu_slice, to_stored
from synth.tasks import labels_for, normalise_finding_name
from synth.tissues import T
from synth.uids import short_hash, synth_uid
from synth.version import VERSION as __version__
from synth.writer import SeriesInfo, SeriesWriter, StudyInfo, build_header

log = logging.getLogger(__name__)

EXTRA_SERIES: tuple[str, ...] = ("scout", "thick", "contrast", "mr")
#: Series number and folder of each series kind (fixed, so a series is found at the same place in every study).
SERIES_LAYOUT: dict[str, tuple[int, str]] = {
    "scout": (1, "01_scout"),
    "axial": (2, "02_axial"),
    "thick": (3, "03_thick5mm"),
    "contrast": (4, "04_contrast"),
    "mr": (5, "05_mr"),
}
THICK_MM = 5.0
MR_SLICES, MR_SPACING, MR_MATRIX = 12, 8.0, 256


@dataclass(frozen=True)
class StudyConfig:
    """Everything that defines one synthetic study. ``None`` means "derive a sensible default"."""

    seed: int = 0
    findings: tuple[str, ...] = ()
    slices: int = 160
    slice_spacing: float | None = None  # default: ~320 mm / slices, 0.25 mm steps
    slice_thickness: float | None = None  # default: = slice_spacing
    pixel_spacing: float | None = None  # default: 384 mm / cols
    rows: int = 512
    cols: int = 512
    position: PatientPosition = PatientPosition.HFS
    contrast: bool = False
    transfer_syntax: str = "explicit"
    extras: tuple[str, ...] = ()
    centre_z: float | None = None  # default: the middle of this patient's lungs
    patient_name: str | None = None
    patient_id: str | None = None
    accession: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    study_folder: str | None = None
    threads: int | None = None

    def validated(self) -> StudyConfig:
        """A normalised copy (finding names, extras, position); ``ValueError`` on anything out of range."""
        if not MIN_SLICES <= self.slices <= MAX_SLICES:
            raise ValueError(f"slices must be {MIN_SLICES}..{MAX_SLICES}, got {self.slices}")
        for name, v in (("rows", self.rows), ("cols", self.cols)):
            if not 64 <= v <= 1024:
                raise ValueError(f"{name} must be 64..1024, got {v}")
        for name, fv, lo, hi in (
            ("slice_spacing", self.slice_spacing, 0.3, 10.0),
            ("slice_thickness", self.slice_thickness, 0.3, 10.0),
            ("pixel_spacing", self.pixel_spacing, 0.2, 10.0),
        ):
            if fv is not None and not (lo <= fv <= hi and math.isfinite(fv)):
                raise ValueError(f"{name} must be {lo}..{hi} mm, got {fv}")
        if self.seed < 0:
            raise ValueError("seed must be >= 0")
        findings = tuple(dict.fromkeys(normalise_finding_name(f) for f in self.findings))
        extras = tuple(dict.fromkeys(e.strip().lower() for e in self.extras if e.strip()))
        bad = [e for e in extras if e not in EXTRA_SERIES]
        if bad:
            raise ValueError(f"unknown extra series {', '.join(bad)}; valid: {', '.join(EXTRA_SERIES)}")
        syntax = resolve_syntax(self.transfer_syntax)
        position = PatientPosition(str(getattr(self.position, "value", self.position)).upper())
        return replace(self, findings=findings, extras=extras, transfer_syntax=syntax.key, position=position)


@dataclass
class SeriesResult:
    kind: str
    folder: Path
    series_uid: str
    series_number: int
    modality: str
    description: str
    files: list[Path]
    transfer_syntax: str
    frame_of_reference_uid: str
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self, root: Path) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "folder": self.folder.relative_to(root).as_posix(),
            "series_instance_uid": self.series_uid,
            "series_number": self.series_number,
            "modality": self.modality,
            "description": self.description,
            "instances": len(self.files),
            "transfer_syntax": self.transfer_syntax,
            "frame_of_reference_uid": self.frame_of_reference_uid,
            **self.info,
        }


@dataclass
class StudyResult:
    """What ``generate_study`` wrote: folders, UIDs, labels and the phantom (for further rendering)."""

    config: StudyConfig
    folder: Path
    study: StudyInfo
    phantom: Phantom
    geometry: SeriesGeometry
    series: list[SeriesResult]
    labels: dict[str, int]
    findings: list[dict[str, Any]]
    seconds: float

    @property
    def primary(self) -> SeriesResult:
        return next(s for s in self.series if s.kind == "axial")

    def label_row(self, root: Path) -> dict[str, Any]:
        """The labels CSV row (VolumeName = primary series folder relative to the dataset root)."""
        row: dict[str, Any] = {"VolumeName": self.primary.folder.relative_to(root).as_posix()}
        row.update(self.labels)
        row.update(
            StudyInstanceUID=self.study.study_uid,
            SeriesInstanceUID=self.primary.series_uid,
            AccessionNumber=self.study.accession,
            PatientID=self.study.patient_id,
        )
        return row


# ---------------------------------------------------------------------------------------------------
# geometry and identity
# ---------------------------------------------------------------------------------------------------
def study_geometry(cfg: StudyConfig, anatomy: Anatomy) -> SeriesGeometry:
    """The primary series geometry of ``cfg`` for this patient (defaults filled in)."""
    spacing = cfg.slice_spacing if cfg.slice_spacing is not None else default_slice_spacing(cfg.slices)
    thickness = cfg.slice_thickness if cfg.slice_thickness is not None else spacing
    ps = cfg.pixel_spacing if cfg.pixel_spacing is not None else default_pixel_spacing(cfg.cols)
    centre = cfg.centre_z if cfg.centre_z is not None else round(anatomy.scan_centre_z, 1)
    grid = Grid.axial(cfg.rows, cfg.cols, ps, cfg.slices, spacing, centre)
    return SeriesGeometry(grid, PatientPosition(cfg.position), thickness)


def make_phantom(cfg: StudyConfig) -> tuple[Phantom, SeriesGeometry]:
    """The study's phantom (findings planted inside the scanned range) and its primary geometry."""
    cfg = cfg.validated()
    anatomy = sample_anatomy(cfg.seed)
    geo = study_geometry(cfg, anatomy)
    z = geo.grid.z
    half = geo.thickness / 2.0
    ph = plant(Phantom(anatomy), list(cfg.findings), z_range=(z[0] - half, z[-1] + half))
    return ph, geo


def _fingerprint(cfg: StudyConfig, geo: SeriesGeometry) -> tuple[object, ...]:
    g = geo.grid
    return (
        cfg.seed,
        ",".join(sorted(cfg.findings)),
        g.rows,
        g.cols,
        g.row_spacing,
        g.col_spacing,
        g.z[0],
        g.z[-1],
        len(g.z),
        geo.thickness,
        geo.position.value,
        cfg.contrast,
    )


def study_info(cfg: StudyConfig, anatomy: Anatomy, geo: SeriesGeometry) -> StudyInfo:
    """Deterministic patient/study identity: the patient depends on the seed, the study on the whole config."""
    fp = _fingerprint(cfg, geo)
    day = dt.date(2024, 1, 1) + dt.timedelta(days=(cfg.seed * 37) % 700)
    minutes = 7 * 60 + (cfg.seed * 13 + len(cfg.findings) * 7) % (10 * 60)
    birth = day - dt.timedelta(days=int(anatomy.age * 365.25) + (cfg.seed * 11) % 300)
    accession = cfg.accession or f"SYN{short_hash('accession', *fp)}"
    return StudyInfo(
        patient_name=cfg.patient_name or f"SYNTHETIC^PHANTOM^{cfg.seed}",
        patient_id=cfg.patient_id or f"SYN{cfg.seed:06d}",
        patient_sex=anatomy.sex,
        patient_age=anatomy.age,
        patient_birth_date=birth.strftime("%Y%m%d"),
        patient_size_m=round(anatomy.height_cm / 100.0, 2),
        patient_weight_kg=anatomy.weight_kg,
        study_uid=cfg.study_uid or synth_uid("study", *fp),
        study_date=day.strftime("%Y%m%d"),
        study_time=f"{minutes // 60:02d}{minutes % 60:02d}00",
        accession=accession,
        study_id=short_hash("study-id", *fp, digits=6),
        comment=f"HyperCT synthetic phantom, seed {cfg.seed}",
    )


def _series_info(
    kind: str, study: StudyInfo, cfg: StudyConfig, geo: SeriesGeometry, for_uid: str
) -> SeriesInfo:
    number, folder = SERIES_LAYOUT[kind]
    base_uid = study.study_uid
    uid = cfg.series_uid if (kind == "axial" and cfg.series_uid) else synth_uid("series", base_uid, kind)
    hh, mm = int(study.study_time[:2]), int(study.study_time[2:4])
    t = hh * 60 + mm + {"scout": 0, "axial": 1, "thick": 1, "contrast": 4, "mr": 40}[kind]
    series_time = f"{(t // 60) % 24:02d}{t % 60:02d}00"
    thick = format(geo.thickness, "g")
    base = SeriesInfo(
        kind=kind,
        modality="CT",
        series_uid=uid,
        series_number=number,
        description="",
        frame_of_reference_uid=for_uid,
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        folder=folder,
        series_time=series_time,
        position=geo.position.value,
    )
    state = "WITH IV CONTRAST" if cfg.contrast else "NON-CONTRAST"
    if kind == "axial":
        return replace(base, description=f"CHEST {thick}mm {state} AXIAL", contrast=cfg.contrast)
    if kind == "thick":
        return replace(base, description=f"CHEST 5mm {state} AXIAL", contrast=cfg.contrast)
    if kind == "contrast":
        return replace(
            base,
            description=f"CHEST {thick}mm WITH IV CONTRAST AXIAL",
            contrast=True,
            protocol="CHEST CONTRAST",
        )
    if kind == "scout":
        return replace(
            base,
            description="TOPOGRAM AP",
            image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
            kernel="T20f",
            windows=((2048.0, 4096.0, "TOPOGRAM"),),
        )
    if kind == "mr":
        return replace(
            base,
            modality="MR",
            description="T1 SE AXIAL THORAX",
            image_type=("ORIGINAL", "PRIMARY", "OTHER"),
            protocol="THORAX T1",
            windows=((600.0, 1200.0, "T1"),),
        )
    raise ValueError(kind)


# ---------------------------------------------------------------------------------------------------
# the series writers
# ---------------------------------------------------------------------------------------------------
class _Stats:
    """Voxel counts and bounding boxes (mm) of the recorded finding masks on one grid."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self.lo: dict[str, np.ndarray] = {}
        self.hi: dict[str, np.ndarray] = {}

    def add(self, grid: Grid, z: float, masks: dict[str, np.ndarray]) -> None:
        for fid, m in masks.items():
            rows = np.nonzero(m.any(axis=1))[0]
            if rows.size == 0:
                continue
            cols = np.nonzero(m.any(axis=0))[0]
            y, x = grid.y, grid.x
            lo = np.array([x[cols[0]], y[rows[0]], z])
            hi = np.array([x[cols[-1]], y[rows[-1]], z])
            self.count[fid] = self.count.get(fid, 0) + int(m.sum())
            self.lo[fid] = np.minimum(self.lo.get(fid, lo), lo)
            self.hi[fid] = np.maximum(self.hi.get(fid, hi), hi)


def _write_axial(
    ph: Phantom,
    geo: SeriesGeometry,
    writer: SeriesWriter,
    *,
    contrast: bool,
    stream: int,
    record: bool,
    sub_samples: int = 1,
    threads: int = 1,
    on_slice: Callable[[int, np.ndarray], None] | None = None,
) -> _Stats:
    """Render and write every slice.

    Slices are rendered by ``threads`` workers (numpy releases the GIL on the big array operations) a
    few slices ahead; the main thread encodes headers in instance order and one more thread writes files.
    """
    grid = geo.grid
    stats = _Stats()
    sigma = noise_sigma(ph, grid, geo.thickness)
    workers = max(1, threads)

    def prepare(k: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        hu, cv = render_hu_slice(
            ph,
            grid,
            k,
            contrast=contrast,
            noise=False,
            thickness=geo.thickness,
            record=record,
            sub_samples=sub_samples,
        )
        hu += noise_slice(ph.seed, k, hu.shape, sigma, stream=stream)
        return to_stored(hu), cv.masks

    jobs = iter(enumerate(geo.instance_order(), start=1))
    ahead: deque[tuple[int, int, Future[tuple[np.ndarray, dict[str, np.ndarray]]]]] = deque()
    writes: deque[Future[Path]] = deque()
    with ThreadPoolExecutor(max_workers=workers) as render_pool, ThreadPoolExecutor(max_workers=1) as io_pool:

        def submit_next() -> None:
            nxt = next(jobs, None)
            if nxt is not None:
                ahead.append((nxt[0], nxt[1], render_pool.submit(prepare, nxt[1])))

        for _ in range(2 * workers):
            submit_next()
        while ahead:
            number, k, fut = ahead.popleft()
            stored, masks = fut.result()
            submit_next()
            if record:
                stats.add(grid, grid.z[k], masks)
            if on_slice is not None:
                on_slice(k, stored)
            data = writer.encode(number, geo.position_of(k), grid.z[k], geo.to_stored(stored))
            writes.append(io_pool.submit(writer.write_bytes, number, data))
            while len(writes) > 8:
                writes.popleft().result()
        for w in writes:
            w.result()
    return stats


def _scout_pixels(proj: np.ndarray, grid: Grid) -> tuple[np.ndarray, float, float]:
    """Resample the per-slice AP projections (z ascending, cols) to square pixels, top row most superior."""
    spacing = grid.col_spacing
    z = grid.z_array
    top, bottom = z[-1], z[0]
    n = min(1024, max(2, int(math.floor((top - bottom) / spacing)) + 1))
    zs = top - np.arange(n) * spacing
    idx = np.interp(zs, z, np.arange(len(z)))
    i0 = np.floor(idx).astype(int)
    i1 = np.minimum(i0 + 1, len(z) - 1)
    w = (idx - i0)[:, None]
    img = proj[i0] * (1 - w) + proj[i1] * w
    stored = np.clip(np.rint(img * 520.0), 0, 4095).astype(np.uint16)
    return stored, spacing, float(top)


def _mr_pixels(ph: Phantom, grid: Grid, k: int) -> np.ndarray:
    """A T1-like magnitude image: signal from the noise-free CT attenuation (fat bright, fluid and
    bone dark, flow voids in vessels), with Rician noise."""
    cv = ph.canvas(grid.x, grid.y, grid.z[k])
    hu = ph.hu_table(False)[cv.t]
    sig = np.interp(
        hu,
        [-1000, -900, -300, -130, -80, -20, 10, 45, 70, 180, 300, 600, 3071],
        [0, 20, 120, 950, 880, 300, 160, 380, 480, 650, 300, 40, 0],
    ).astype(np.float32)
    blood = np.isin(cv.t, (T.AORTA, T.HEART_BLOOD, T.VESSEL, T.PULM_ARTERY, T.CORONARY))
    sig[blood] = 40.0
    sig[np.isin(cv.t, (T.TABLE, T.TABLE_CORE))] = 0.0  # the MR table gives no signal
    rng = np.random.default_rng([ph.seed, 5, k])
    n1 = rng.normal(0.0, 18.0, sig.shape).astype(np.float32)
    n2 = rng.normal(0.0, 18.0, sig.shape).astype(np.float32)
    mag = np.sqrt((sig + n1) ** 2 + n2**2)
    return np.clip(np.rint(mag), 0, 4095).astype(np.uint16)


def generate_study(cfg: StudyConfig, out_dir: str | Path, *, phantom: Phantom | None = None) -> StudyResult:
    """Write one study under ``out_dir`` (see the module docstring for the layout) and its findings.json.

    ``phantom`` overrides the one derived from ``cfg`` (e.g. a hand-made positive/negative twin); it must
    be a phantom of ``cfg.seed``.
    """
    t0 = time.perf_counter()
    cfg = cfg.validated()
    syntax = resolve_syntax(cfg.transfer_syntax)
    if syntax.tool:
        require_tool(syntax.tool)
    if phantom is None:
        ph, geo = make_phantom(cfg)
    else:
        ph, geo = phantom, study_geometry(cfg, phantom.base_anatomy)
        cfg = replace(cfg, findings=tuple(phantom.finding_names))
    study = study_info(cfg, ph.base_anatomy, geo)
    root = Path(out_dir)
    folder = root / (cfg.study_folder or f"{study.patient_id}_{study.accession}")
    folder.mkdir(parents=True, exist_ok=True)
    threads = cfg.threads or min(4, os.cpu_count() or 1)
    for_uid = synth_uid("frame-of-reference", study.study_uid)
    grid = geo.grid
    results: list[SeriesResult] = []
    series_meta = {
        "rows": grid.rows,
        "columns": grid.cols,
        "pixel_spacing_mm": [grid.row_spacing, grid.col_spacing],
        "slice_thickness_mm": geo.thickness,
        "slice_spacing_mm": grid.slice_spacing,
        "position": geo.position.value,
        "z_range_mm": [grid.z[0], grid.z[-1]],
    }

    # primary axial series (+ the scout projection, accumulated on the way)
    info = _series_info("axial", study, cfg, geo, for_uid)
    header = build_header(
        study,
        info,
        grid.rows,
        grid.cols,
        (grid.row_spacing, grid.col_spacing),
        geo.orientation,
        geo.thickness,
        grid.slice_spacing,
    )
    writer = SeriesWriter(header, folder / info.folder, syntax)
    proj = np.zeros((len(grid.z), grid.cols), dtype=np.float32) if "scout" in cfg.extras else None

    def accumulate(k: int, stored: np.ndarray) -> None:
        if proj is not None:
            mu = np.maximum(stored.astype(np.float32) - 24.0, 0.0) * (0.0192 / 1000.0)
            proj[k] = mu.sum(axis=0) * grid.row_spacing

    stats = _write_axial(
        ph, geo, writer, contrast=cfg.contrast, stream=2, record=True, threads=threads, on_slice=accumulate
    )
    files = writer.close()
    results.append(
        SeriesResult(
            "axial",
            writer.folder,
            info.series_uid,
            info.series_number,
            "CT",
            info.description,
            files,
            syntax.key,
            for_uid,
            {**series_meta, "contrast": cfg.contrast},
        )
    )

    for kind in EXTRA_SERIES:
        if kind not in cfg.extras:
            continue
        info = _series_info(
            kind,
            study,
            cfg,
            geo,
            for_uid if kind != "mr" else synth_uid("frame-of-reference-mr", study.study_uid),
        )
        if kind in ("thick", "contrast"):
            if kind == "thick":
                cover = grid.z[-1] - grid.z[0]
                n = max(2, int(math.floor(cover / THICK_MM)) + 1)
                centre = 0.5 * (grid.z[0] + grid.z[-1])
                g2 = Grid.axial(
                    grid.rows, grid.cols, (grid.row_spacing, grid.col_spacing), n, THICK_MM, centre
                )
                geo2 = SeriesGeometry(g2, geo.position, THICK_MM)
                sub, contrast, stream = 3, cfg.contrast, 4
            else:
                geo2, sub, contrast, stream = geo, 1, True, 3
            g2 = geo2.grid
            header = build_header(
                study,
                info,
                g2.rows,
                g2.cols,
                (g2.row_spacing, g2.col_spacing),
                geo2.orientation,
                geo2.thickness,
                g2.slice_spacing,
            )
            w2 = SeriesWriter(header, folder / info.folder, syntax)
            _write_axial(
                ph, geo2, w2, contrast=contrast, stream=stream, record=False, sub_samples=sub, threads=threads
            )
            meta = {
                "rows": g2.rows,
                "columns": g2.cols,
                "pixel_spacing_mm": [g2.row_spacing, g2.col_spacing],
                "slice_thickness_mm": geo2.thickness,
                "slice_spacing_mm": g2.slice_spacing,
                "position": geo2.position.value,
                "z_range_mm": [g2.z[0], g2.z[-1]],
                "contrast": contrast,
            }
        elif kind == "scout":
            assert proj is not None
            pix, spacing, top = _scout_pixels(proj, grid)
            header = build_header(
                study,
                info,
                pix.shape[0],
                pix.shape[1],
                (spacing, grid.col_spacing),
                (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
                None,
                None,
            )
            w2 = SeriesWriter(header, folder / info.folder, syntax)
            w2.write(1, (float(grid.x[0]), 0.0, top), None, pix)
            meta = {"rows": int(pix.shape[0]), "columns": int(pix.shape[1]), "projection": "AP"}
        else:  # mr
            ps = grid.col_spacing * grid.cols / MR_MATRIX
            centre = float(ph.geo.heart.centre[2]) + 20.0
            g2 = Grid.axial(MR_MATRIX, MR_MATRIX, ps, MR_SLICES, MR_SPACING, round(centre, 1))
            geo2 = SeriesGeometry(g2, geo.position, 6.0)
            header = build_header(
                study, info, MR_MATRIX, MR_MATRIX, (ps, ps), geo2.orientation, 6.0, MR_SPACING
            )
            w2 = SeriesWriter(header, folder / info.folder, syntax)
            for number, k in enumerate(geo2.instance_order(), start=1):
                w2.write(number, geo2.position_of(k), g2.z[k], geo2.to_stored(_mr_pixels(ph, g2, k)))
            meta = {
                "rows": MR_MATRIX,
                "columns": MR_MATRIX,
                "pixel_spacing_mm": [ps, ps],
                "slice_thickness_mm": 6.0,
                "slice_spacing_mm": MR_SPACING,
                "z_range_mm": [g2.z[0], g2.z[-1]],
            }
        files = w2.close()
        results.append(
            SeriesResult(
                kind,
                w2.folder,
                info.series_uid,
                info.series_number,
                info.modality,
                info.description,
                files,
                syntax.key,
                info.frame_of_reference_uid,
                meta,
            )
        )

    # labels and ground truth
    present: list[str] = []
    findings_json = []
    for f in ph.findings:
        entry = f.to_json()
        n = stats.count.get(f.id, 0)
        entry["voxels_in_primary"] = n
        entry["visible"] = n > 0
        if n:
            entry["voxel_bbox_mm"] = {
                "min": [round(v, 2) for v in stats.lo[f.id].tolist()],
                "max": [round(v, 2) for v in stats.hi[f.id].tolist()],
            }
            present.append(f.name)
        else:
            log.warning("%s is planted but has no voxel in the primary series; its label is 0", f.id)
        findings_json.append(entry)
    labels = labels_for(present)
    results.sort(key=lambda s: s.series_number)
    result = StudyResult(
        cfg, folder, study, ph, geo, results, labels, findings_json, time.perf_counter() - t0
    )
    _write_findings_json(result, root)
    log.info("study %s: %d series, %.1f s", folder.name, len(results), result.seconds)
    return result


def generate_pair(cfg: StudyConfig, out_dir: str | Path) -> tuple[StudyResult, StudyResult]:
    """A positive study (``cfg.findings`` planted) and its negative twin: the same patient, grid and noise
    with nothing planted (findings are an add-on to the base phantom, so ``findings=()`` *is* the twin).
    Both get their own StudyInstanceUID and folder, and share the PatientID."""
    if not cfg.findings:
        raise ValueError("generate_pair needs at least one finding")
    pos = generate_study(cfg, out_dir)
    neg = generate_study(
        replace(cfg, findings=(), accession=None, study_uid=None, series_uid=None, study_folder=None), out_dir
    )
    return pos, neg


def _write_findings_json(res: StudyResult, root: Path) -> None:
    g = res.phantom.geo
    doc = {
        "schema": "hyperct-synth-findings/1",
        "generator": f"hyperct-node {__version__}",
        "coordinate_system": "DICOM patient coordinates (LPS), millimetres: +x patient left, +y posterior, +z superior",
        "seed": res.config.seed,
        "patient_id": res.study.patient_id,
        "patient_name": res.study.patient_name,
        "study_instance_uid": res.study.study_uid,
        "accession_number": res.study.accession,
        "primary_series": res.primary.folder.relative_to(root).as_posix(),
        "labels": res.labels,
        "findings": res.findings,
        "anatomy": {
            "cardiothoracic_ratio": round(g.cardiothoracic_ratio, 4),
            "heart_width_mm": round(g.heart_width, 2),
            "inner_thoracic_width_mm": round(g.inner_thoracic_width(float(g.heart.centre[2])), 2),
            "heart_centre_mm": [round(float(v), 2) for v in g.heart.centre],
            "parameters": {
                k: (round(v, 3) if isinstance(v, float) else v)
                for k, v in asdict(res.phantom.anatomy).items()
            },
        },
        "series": [s.summary(root) for s in res.series],
    }
    (res.folder / "findings.json").write_text(json.dumps(doc, indent=1))
