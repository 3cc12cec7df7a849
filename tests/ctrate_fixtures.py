"""Write DICOM series out as CT-RATE does: both releases, the per-split CSVs, reconstructions.

How the files are made follows what the dataset documents (docs/training.md §CT-RATE):

* **original**: the DICOM stored values (not HU) as float voxels, arranged ``[column, row, slice]``
  with slices ordered along row × column, under a placeholder header (identity affine, unit spacing);
* **fixed**: the same voxel order, HU as int16, and the header the dataset's ``fix_metadata.py``
  writes from the metadata row (spacing, ImageOrientationPatient, ImagePositionPatient);
* **metadata**: the DICOM header values in CT-RATE's column names and text formats.

``break_axes`` damages the voxel order on purpose (a flip or a transpose) so tests can show that a
wrong orientation does not slip through.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

LABELS_HEADER = ["VolumeName", "Pleural effusion", "Cardiomegaly"]
METADATA_HEADER = [
    "VolumeName", "Manufacturer", "PatientPosition", "ImagePositionPatient", "ImageOrientationPatient",
    "Rows", "Columns", "XYSpacing", "RescaleIntercept", "RescaleSlope", "NumberofSlices", "ZSpacing",
]  # fmt: skip


@dataclass(frozen=True)
class SeriesArrays:
    """A DICOM series as CT-RATE's converter saw it: stored values ``[i, j, k]`` + the header values."""

    stored: np.ndarray
    slope: float
    intercept: float
    orientation: list[float]
    first_position: list[float]
    pixel_spacing: list[float]
    z_spacing: float
    patient_position: str


def read_series(files: Sequence[Path]) -> SeriesArrays:
    """Stack a single-frame series along row × column (the order ``fix_metadata.py`` assumes)."""
    datasets = [pydicom.dcmread(f) for f in files]
    iop = [float(v) for v in datasets[0].ImageOrientationPatient]
    normal = np.cross(iop[:3], iop[3:])
    datasets.sort(key=lambda ds: float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])))
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    z = float(np.median(np.diff(positions @ normal)))
    stored = np.stack([ds.pixel_array.T for ds in datasets], axis=2)  # [column, row, slice]
    first = datasets[0]
    return SeriesArrays(
        stored=stored,
        slope=float(first.RescaleSlope),
        intercept=float(first.RescaleIntercept),
        orientation=iop,
        first_position=positions[0].tolist(),
        pixel_spacing=[float(v) for v in first.PixelSpacing],
        z_spacing=z,
        patient_position=str(first.get("PatientPosition", "HFS")),
    )


def break_axes(stored: np.ndarray, how: str) -> np.ndarray:
    """The voxel array damaged on purpose: ``flip-lr``, ``flip-hf`` or ``transpose``."""
    if how == "flip-lr":
        return stored[::-1]
    if how == "flip-hf":
        return stored[:, :, ::-1]
    if how == "transpose":
        return stored.transpose(1, 0, 2)
    raise ValueError(how)


def metadata_row(name: str, s: SeriesArrays) -> dict[str, str]:
    return {
        "VolumeName": name,
        "Manufacturer": "SYNTHETIC",
        "PatientPosition": s.patient_position,
        "ImagePositionPatient": repr([float(v) for v in s.first_position]),
        "ImageOrientationPatient": repr([float(v) for v in s.orientation]),
        "Rows": str(s.stored.shape[1]),
        "Columns": str(s.stored.shape[0]),
        "XYSpacing": repr([float(v) for v in s.pixel_spacing]),
        "RescaleIntercept": repr(s.intercept),
        "RescaleSlope": repr(s.slope),
        "NumberofSlices": str(s.stored.shape[2]),
        "ZSpacing": repr(s.z_spacing),
    }


def fixed_affine_ras(s: SeriesArrays) -> np.ndarray:
    """The NIfTI (RAS) affine ``fix_metadata.py`` gives: LPS direction [row, col, row × col] · spacing."""
    row, col = np.asarray(s.orientation[:3]), np.asarray(s.orientation[3:])
    lps = np.eye(4)
    lps[:3, :3] = np.stack([row, col, np.cross(row, col)], axis=1) * [
        s.pixel_spacing[1], s.pixel_spacing[0], s.z_spacing,
    ]  # fmt: skip
    lps[:3, 3] = s.first_position
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def write_volume(path: Path, s: SeriesArrays, release: str, *, voxels: np.ndarray | None = None) -> Path:
    """One NIfTI of ``release`` (``original`` or ``fixed``); ``voxels`` replaces the stored array."""
    import nibabel as nib

    stored = s.stored if voxels is None else voxels
    if release == "original":
        img = nib.Nifti1Image(stored.astype(np.float32), np.eye(4))
    elif release == "fixed":
        hu = np.rint(stored.astype(np.float64) * s.slope + s.intercept).astype(np.int16)
        img = nib.Nifti1Image(hu, fixed_affine_ras(s))
    else:
        raise ValueError(release)
    img.header.set_slope_inter(1.0, 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def volume_path(dataset: Path, name: str, release: str) -> Path:
    """``dataset/valid[_fixed]/valid_1/valid_1_a/valid_1_a_1.nii.gz`` for ``valid_1_a_1.nii.gz``."""
    split, patient, scan, _ = name.removesuffix(".nii.gz").split("_")
    top = f"{split}_fixed" if release == "fixed" else split
    return dataset / top / f"{split}_{patient}" / f"{split}_{patient}_{scan}" / name


def write_csvs(dataset: Path, rows: dict[str, tuple[dict[str, str], dict[str, int]]]) -> None:
    """Per-split label and metadata CSVs under CT-RATE's names: ``{VolumeName: (metadata, labels)}``."""
    names = {"train": ("train_predicted_labels.csv", "train_metadata.csv"),
             "valid": ("valid_predicted_labels.csv", "validation_metadata.csv")}  # fmt: skip
    for split, (label_file, meta_file) in names.items():
        mine = {n: v for n, v in rows.items() if n.startswith(f"{split}_")}
        if not mine:
            continue
        (dataset / "multi_abnormality_labels").mkdir(parents=True, exist_ok=True)
        (dataset / "metadata").mkdir(parents=True, exist_ok=True)
        with (dataset / "multi_abnormality_labels" / label_file).open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(LABELS_HEADER)
            for n, (_, labels) in mine.items():
                w.writerow([n, *(labels.get(c, 0) for c in LABELS_HEADER[1:])])
        with (dataset / "metadata" / meta_file).open("w", newline="") as fh:
            dw = csv.DictWriter(fh, METADATA_HEADER)
            dw.writeheader()
            for meta, _ in mine.values():
                dw.writerow(meta)
