"""Test helpers (no tests here): a small, IOD-complete synthetic CT series written with pydicom, the
25-task manifest of ``training/tasks.json`` and :class:`StudyResult` objects for the result writers.

Independent of ``synth`` on purpose: the writers' tests need a few slices with full patient/study
attributes and an InstanceNumber order that differs from the geometric order, in milliseconds.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from operators.manifest import CodingScheme, Concept, TaskEntry
from operators.results import ModelInfo, StudyResult, TaskResult
from operators.volume import Volume, load_dicom_series

ROOT = Path(__file__).resolve().parents[1]
TASKS_JSON = ROOT / "training" / "tasks.json"
PATIENT_NAME = "Phantom^Hyper^CT"
PATIENT_ID = "HCT-TEST-0001"


@dataclass(frozen=True)
class CTSeries:
    """A synthetic CT series: datasets in *file* order (shuffled), and the loaded volume."""

    datasets: list[Dataset]
    volume: Volume

    @property
    def study_instance_uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)

    @property
    def series_instance_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.datasets[0].FrameOfReferenceUID)

    def by_uid(self) -> dict[str, Dataset]:
        return {str(ds.SOPInstanceUID): ds for ds in self.datasets}


def _ds(v: float) -> str:
    return f"{v:.6g}"


def ct_series(
    n_slices: int = 12,
    rows: int = 32,
    cols: int = 28,
    *,
    spacing: tuple[float, float, float] = (1.5, 1.25, 2.5),
    seed: int = 0,
    study_uid: str | None = None,
    with_pixels: bool = True,
    patient_id: str = PATIENT_ID,
) -> CTSeries:
    """A feet-first-like series: InstanceNumber 1 is the *top* slice, so instance order is the reverse
    of the geometric (Volume) order, and the datasets come back shuffled. ``spacing`` is (column step,
    row step, slice step) in mm. ``with_pixels=False`` gives headers only (for large geometry tests)."""
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    for_uid = generate_uid()
    si, sj, sk = spacing
    origin = np.array([-(cols - 1) / 2 * si, -(rows - 1) / 2 * sj, -100.0])
    now = datetime.datetime(2026, 5, 4, 10, 11, 12)
    datasets = []
    yy, xx = np.mgrid[0:rows, 0:cols]
    body = ((xx - cols / 2) / (cols / 2.2)) ** 2 + ((yy - rows / 2) / (rows / 2.4)) ** 2 <= 1.0
    for k in range(n_slices):
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyDate = now.strftime("%Y%m%d")
        ds.SeriesDate = ds.StudyDate
        ds.ContentDate = ds.StudyDate
        ds.StudyTime = now.strftime("%H%M%S")
        ds.SeriesTime = ds.StudyTime
        ds.ContentTime = ds.StudyTime
        ds.AccessionNumber = "ACC0001"
        ds.Modality = "CT"
        ds.Manufacturer = "Phantom Scanners Inc"
        ds.ReferringPhysicianName = "Referrer^Rita"
        ds.StudyDescription = "CT CHEST"
        ds.SeriesDescription = "CHEST 2.5mm"
        ds.PatientName = PATIENT_NAME
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19600101"
        ds.PatientSex = "O"
        ds.PatientAge = "066Y"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = _ds(sk)
        ds.KVP = "120"
        ds.PatientPosition = "FFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "S1"
        ds.SeriesNumber = 2
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = n_slices - k  # top slice first
        ds.ImagePositionPatient = [_ds(v) for v in origin + np.array([0.0, 0.0, k * sk])]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.PixelSpacing = [_ds(sj), _ds(si)]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "-600"
        ds.WindowWidth = "1500"
        if with_pixels:
            hu = np.where(body, 40.0, -1000.0) + rng.normal(0, 5, (rows, cols))
            ds.PixelData = np.rint(hu + 1024).astype(np.int16).tobytes()
        datasets.append(ds)
    order = rng.permutation(n_slices)
    shuffled = [datasets[i] for i in order]
    volume = load_dicom_series(shuffled) if with_pixels else _header_volume(shuffled)
    return CTSeries(datasets=shuffled, volume=volume)


def _header_volume(datasets: Sequence[Dataset]) -> Volume:
    """Geometry-only Volume (zero HU) for header-only series: order by position along z."""
    ordered = sorted(datasets, key=lambda d: float(d.ImagePositionPatient[2]))
    sj, si = (float(v) for v in ordered[0].PixelSpacing)
    sk = float(ordered[1].ImagePositionPatient[2]) - float(ordered[0].ImagePositionPatient[2])
    affine = np.diag([si, sj, sk, 1.0])
    affine[:3, 3] = [float(v) for v in ordered[0].ImagePositionPatient]
    return Volume(
        hu=np.zeros((len(ordered), 1, 1), dtype=np.int16),  # geometry and slice order only
        affine=affine,
        sop_instance_uids=tuple(str(d.SOPInstanceUID) for d in ordered),
        series_instance_uid=str(ordered[0].SeriesInstanceUID),
        frame_of_reference_uid=str(ordered[0].FrameOfReferenceUID),
        study_instance_uid=str(ordered[0].StudyInstanceUID),
    )


def write_series(folder: Path, datasets: Iterable[Dataset]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, ds in enumerate(datasets):
        path = folder / f"CT{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------
# Manifest and results
# --------------------------------------------------------------------------------------------------


def task_entries(keys: Sequence[str] | None = None, *, threshold: float = 0.5) -> tuple[TaskEntry, ...]:
    """Manifest task entries for ``keys`` (default: all 25) with the real concepts of tasks.json.

    Built as :class:`TaskEntry` directly rather than through ``parse_manifest``, so these tests follow
    the task concepts and not the (separately tested) manifest schema."""
    data = json.loads(TASKS_JSON.read_text())
    out = []
    for t in data["tasks"]:
        if keys is not None and t["key"] not in keys:
            continue
        site = t.get("finding_site")
        out.append(
            TaskEntry(
                index=t["index"],
                key=t["key"],
                name=t["name"],
                group=t["group"],
                definition=t["definition"],
                concept=Concept(
                    t["concept"]["value"], t["concept"]["scheme_designator"], t["concept"]["meaning"]
                ),
                file=f"{t['key']}.onnx",
                sha256=hashlib.sha256(t["key"].encode()).hexdigest(),
                threshold=threshold,
                saliency=bool(t.get("saliency", True)),
                finding_site=Concept(site["value"], site["scheme_designator"], site["meaning"])
                if site
                else None,
            )
        )
    if keys is not None and len(out) != len(set(keys)):
        raise KeyError(f"unknown task keys in {keys}")
    return tuple(out)


def coding_schemes() -> tuple[CodingScheme, ...]:
    data = json.loads(TASKS_JSON.read_text())
    return tuple(
        CodingScheme(s["designator"], s["name"], s.get("responsible_organization", ""), s.get("version", ""))
        for s in data["coding_schemes"]
    )


def model_info(*, synthetic: bool = True, sha: str | None = None, version: str = "0.0.1") -> ModelInfo:
    return ModelInfo(
        name="hyperct-test",
        version=version,
        manifest_sha256=sha or hashlib.sha256(f"hyperct-test {version}".encode()).hexdigest(),
        synthetic=synthetic,
        coding_schemes=coding_schemes(),
        intended_use="tests",
    )


def blob(
    shape: tuple[int, int, int], centre: tuple[float, float, float], radius: float, dtype: type = np.float32
) -> np.ndarray:
    """A Gaussian attention blob [k, j, i] (max 1 at ``centre`` (k, j, i)), built separably: fast even
    at 300 x 512 x 512."""
    g = [
        np.exp(-((np.arange(n, dtype=np.float32) - c) ** 2) / (2 * radius**2)).astype(dtype)
        for n, c in zip(shape, centre, strict=True)
    ]
    return g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]


def study_result(
    series: CTSeries,
    probabilities: Mapping[str, float],
    *,
    keys: Sequence[str] | None = None,
    model: ModelInfo | None = None,
    attention: Mapping[str, np.ndarray] | None = None,
) -> StudyResult:
    """A StudyResult with the given probabilities (tasks not named get 0.1) and attention maps (tasks
    with saliency and no explicit map get a blob in the volume centre)."""
    vol = series.volume
    n = vol.shape[0]
    rows, cols = int(series.datasets[0].Rows), int(series.datasets[0].Columns)
    tasks = []
    for t in task_entries(keys):
        p = float(probabilities.get(t.key, 0.1))
        logit = float(np.log(p / (1 - p))) if 0 < p < 1 else (50.0 if p >= 1 else -50.0)
        amap = None
        if attention is not None and t.key in attention:
            amap = attention[t.key]
        elif t.saliency:
            amap = blob((n, rows, cols), (n / 2, rows / 2, cols / 3), max(2.0, rows / 8))
        tasks.append(TaskResult.from_manifest(t, logit, probability=p, attention=amap))
    assert vol.sop_instance_uids is not None
    return StudyResult(
        study_instance_uid=series.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
        frame_of_reference_uid=series.frame_of_reference_uid,
        sop_instance_uids=vol.sop_instance_uids,
        frame_numbers=vol.frame_numbers,
        tasks=tuple(tasks),
        model=model or model_info(),
    )


# --------------------------------------------------------------------------------------------------
# External validators
# --------------------------------------------------------------------------------------------------


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) of dicom3tools' ``dciodvfy`` (it reports on stderr; "Error" lines are errors)."""
    if shutil.which("dciodvfy") is None:
        raise FileNotFoundError("dciodvfy (dicom3tools) is not installed: run `make peers` as root")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = [ln.strip() for ln in (out.stderr + out.stdout).splitlines() if ln.strip()]
    return [ln for ln in lines if ln.startswith("Error")], [ln for ln in lines if ln.startswith("Warning")]
