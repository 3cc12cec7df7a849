"""Test helpers (no tests here): a small numpy chest phantom, and writers for it as a DICOM series
(pydicom) or a NIfTI file (nibabel). Deliberately independent of ``synth``.

Geometry values are chosen exactly representable in float32 and in short DS strings, so that DICOM,
NIfTI (float32 sform) and in-memory volumes describe bit-identical grids.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from operators.volume import Volume

INTERCEPT = -1024.0


def lps_affine(spacing_ijk: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    """Axis-aligned HFS-like affine: i -> +x (L), j -> +y (P), k -> +z (S)."""
    a = np.diag([*map(float, spacing_ijk), 1.0])
    a[:3, 3] = origin
    return a


def chest_phantom(
    shape_kji: tuple[int, int, int] = (150, 200, 200),
    spacing_ijk: Sequence[float] = (2.0, 2.0, 2.5),
    *,
    body_offset_mm: tuple[float, float] = (0.0, 0.0),
    lung_z_mm: float | None = None,
    lung_half_length_mm: float = 120.0,
    table_mm: float = 0.0,
    marker_ijk: tuple[int, int, int] | None = None,
    marker_radius: int = 1,
) -> Volume:
    """An elliptic body (40 HU, in a -100 HU fat layer) with two ellipsoid lungs (-850 HU), a heart
    (55 HU, left of the midline: the phantom is not left-right symmetric), a spine (400 HU), an
    optional patient table slab (100 HU) under the back and an optional bright marker cube (1000 HU).

    The image centre is at LPS x = y = 0; the scan's z centre at 0 unless the lungs are put elsewhere.
    """
    nk, nj, ni = shape_kji
    si, sj, sk = spacing_ijk
    origin = (-(ni - 1) / 2 * si, -(nj - 1) / 2 * sj, -(nk - 1) / 2 * sk)
    affine = lps_affine(spacing_ijk, origin)
    x = origin[0] + np.arange(ni) * si
    y = origin[1] + np.arange(nj) * sj
    z = origin[2] + np.arange(nk) * sk
    bx, by = body_offset_mm
    xx, yy = np.meshgrid(x - bx, y - by, indexing="xy")  # [j, i]
    body = (xx / 160.0) ** 2 + (yy / 110.0) ** 2 <= 1.0
    spine = ((xx / 18.0) ** 2 + ((yy - 75.0) / 18.0) ** 2) <= 1.0
    hu = np.full(shape_kji, -1000.0, dtype=np.float32)
    base = np.where(body, 40.0, -1000.0).astype(np.float32)
    base[body & ((xx / 148.0) ** 2 + (yy / 98.0) ** 2 > 1.0)] = -100.0
    base[spine] = 400.0
    if table_mm > 0:
        table = (yy >= 110.0) & (yy < 110.0 + table_mm) & (np.abs(x[None, :]) <= 190.0)
        base[table] = 100.0
    hu[:] = base
    lz = 0.0 if lung_z_mm is None else lung_z_mm
    for k in range(nk):
        t = ((z[k] - lz) / lung_half_length_mm) ** 2
        if t >= 1:
            continue
        for side in (-75.0, 75.0):
            lung = ((xx - side) / 55.0) ** 2 + ((yy + 5.0) / 70.0) ** 2 <= 1.0 - t
            hu[k][lung & body] = -850.0
        th = ((z[k] - lz + 40.0) / 60.0) ** 2
        if th < 1:
            heart = ((xx - 25.0) / 60.0) ** 2 + ((yy + 25.0) / 50.0) ** 2 <= 1.0 - th
            hu[k][heart] = 55.0
    if marker_ijk is not None:
        i, j, k = marker_ijk
        r = marker_radius
        hu[k - r : k + r + 1, j - r : j + r + 1, i - r : i + r + 1] = 1000.0
    return Volume(hu=hu, affine=affine)


def flip_volume(volume: Volume, axes_ijk: Sequence[int]) -> Volume:
    """The same patient grid stored with the given index axes reversed (e.g. FFS: i and k)."""
    hu = volume.hu
    affine = volume.affine.copy()
    n_ijk = (volume.shape[2], volume.shape[1], volume.shape[0])
    for m in axes_ijk:
        hu = np.flip(hu, axis=2 - m)
        affine[:3, 3] = affine[:3, 3] + affine[:3, m] * (n_ijk[m] - 1)
        affine[:3, m] = -affine[:3, m]
    return Volume(hu=np.ascontiguousarray(hu), affine=affine)


def _ds(v: float) -> str:
    text = f"{v:.10g}"
    assert len(text) <= 16, text
    return text


def ct_datasets(
    volume: Volume,
    *,
    series_uid: str | None = None,
    study_uid: str | None = None,
    for_uid: str | None = None,
) -> list[Dataset]:
    """One CT Image Storage dataset per k slice (InstanceNumber k + 1), int16 stored, intercept -1024."""
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    for_uid = for_uid or generate_uid()
    a = volume.affine
    si, sj, _ = volume.spacing
    row_dir = a[:3, 0] / si
    col_dir = a[:3, 1] / sj
    out = []
    for k in range(volume.shape[0]):
        stored = np.rint(volume.hu[k] - INTERCEPT).astype(np.int16)
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = for_uid
        ds.Modality = "CT"
        ds.PatientID = "PHANTOM"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(v) for v in a[:3, 3] + a[:3, 2] * k]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [_ds(sj), _ds(si)]
        ds.SliceThickness = _ds(float(volume.spacing[2]))
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = _ds(INTERCEPT)
        ds.RescaleSlope = "1"
        ds.PixelData = stored.tobytes()
        out.append(ds)
    return out


def write_datasets(folder: Path, datasets: Sequence[Dataset]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, ds in enumerate(datasets):
        path = folder / f"IM{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_nifti_ras(path: Path, volume: Volume) -> Path:
    """Write ``volume`` as a NIfTI stored in RAS+ array order (axes increasing toward R, A, S), the way
    many NIfTI tools lay CT out: both in-plane axes are reversed against an HFS DICOM series."""
    import nibabel as nib

    ras_like = flip_volume(volume, (0, 1))  # i -> R, j -> A for an HFS-aligned input
    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ras_like.affine
    data = np.ascontiguousarray(ras_like.hu.transpose(2, 1, 0))
    nib.save(nib.Nifti1Image(data, affine_ras), str(path))
    return path


def read_pixels(path: Path) -> np.ndarray:
    return pydicom.dcmread(path).pixel_array


def permute_volume(volume: Volume, order_ijk: Sequence[int]) -> Volume:
    """The same patient grid stored with its index axes permuted: new index axis n is old axis
    ``order_ijk[n]`` (e.g. (2, 1, 0) stores an axial stack as sagittal-like slices)."""
    order = list(order_ijk)
    affine = volume.affine.copy()
    affine[:3, :3] = volume.affine[:3, order]
    hu = volume.hu.transpose([2 - order[2 - a] for a in range(3)])
    return Volume(hu=np.ascontiguousarray(hu), affine=affine)
