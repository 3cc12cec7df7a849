"""CT-RATE as published: both releases, per-split CSVs, reconstructions, orientation from evidence.

What the dataset ships (docs/training.md §CT-RATE holds the sources) under its ``dataset/`` folder:

* volumes ``{train,valid}/<s>_<patient>/<s>_<patient>_<scan>/<s>_<patient>_<scan>_<recon>.nii.gz``
  (the *original* release) and the same tree under ``train_fixed/`` and ``valid_fixed/`` (the
  *fixed* release, re-issued in 2025);
* labels ``multi_abnormality_labels/{train,valid}_predicted_labels.csv`` (``VolumeName`` + 18 columns);
* metadata ``metadata/{train,validation}_metadata.csv`` (note ``validation_``): ``VolumeName``,
  ``RescaleSlope``, ``RescaleIntercept``, ``XYSpacing`` (``"[row, col]"``), ``ZSpacing``,
  ``ImageOrientationPatient`` and ``ImagePositionPatient`` (``"[...]"``) among 44 DICOM columns.

Orientation, by release (the evidence is the dataset's own ``fix_metadata.py``, which made the fixed
release from the original arrays without moving a voxel):

* **original**: header geometry is a placeholder and values are raw stored pixels. The array axes
  are (DICOM column, DICOM row, slice) with slices along row × column; geometry and HU are rebuilt
  from the metadata row exactly as ``fix_metadata.py`` does. Without a usable
  ``ImageOrientationPatient``, ``XYSpacing`` or ``ZSpacing`` the orientation cannot be established
  and the volume is refused.
* **fixed**: the header holds that same geometry and the values are HU (int16); the metadata
  slope/intercept must *not* be applied again (CT-CLIP issue #50). The header is trusted only when it
  agrees with the metadata row (spacing and direction); otherwise the volume is refused.

``release: auto`` decides per file from the header: integer voxels whose header geometry matches the
metadata row are the fixed release, anything else the original; a file under ``*_fixed/`` that does
not look fixed is refused as contradictory.

Reconstructions: ``train_1_a_1`` and ``train_1_a_2`` are two kernels of scan ``train_1_a``.
``one-per-scan`` keeps the lowest reconstruction number that has a label row, a metadata row with
usable geometry and a file; ``all`` keeps every one. Either way a record's ``scan_id`` is the scan,
evaluation scores per scan and splits keep patients whole.
"""

from __future__ import annotations

import ast
import csv
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from operators.volume import Volume, VolumeError, load_nifti
from training.data.labels import BadData, DataError, LabelRow, label_vector, merge_labels, read_label_csv
from training.data.records import ScanRecord
from training.tasks import TaskRegistry

logger = logging.getLogger(__name__)

Release = Literal["auto", "original", "fixed"]
Reconstructions = Literal["one-per-scan", "all"]

#: CT-RATE's own splits and the file names it uses for each (labels say ``valid``, metadata ``validation``).
CTRATE_SPLITS: dict[str, tuple[str, str]] = {
    "train": ("multi_abnormality_labels/train_predicted_labels.csv", "metadata/train_metadata.csv"),
    "valid": ("multi_abnormality_labels/valid_predicted_labels.csv", "metadata/validation_metadata.csv"),
}

VOLUME_NAME = re.compile(
    r"^(?P<split>[A-Za-z]+)_(?P<patient>[A-Za-z0-9]+)_(?P<scan>[A-Za-z0-9]+)_(?P<recon>\d+)(?:\.nii(?:\.gz)?)?$"
)
#: Metadata columns every CT-RATE release needs: rescale for the original, geometry for both.
METADATA_COLUMNS = (
    "VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing", "ImageOrientationPatient",
)  # fmt: skip
_SPACING_RTOL = 0.01  # header vs metadata spacing
_DIRECTION_ATOL = 1e-3  # header vs metadata direction cosines


class OrientationError(VolumeError):
    """The orientation of a CT-RATE volume cannot be established from its header and metadata."""


@dataclass(frozen=True)
class VolumeName:
    """``train_1234_a_2.nii.gz`` = CT-RATE split ``train``, patient 1234, scan ``a``, reconstruction 2."""

    split: str
    patient: str
    scan: str
    recon: int

    @classmethod
    def parse(cls, name: str) -> VolumeName:
        m = VOLUME_NAME.match(Path(name).name)
        if m is None:
            raise ValueError(
                f"{name!r} does not follow CT-RATE's <split>_<patient>_<scan>_<reconstruction>.nii.gz"
            )
        return cls(m.group("split"), m.group("patient"), m.group("scan"), int(m.group("recon")))

    @property
    def patient_id(self) -> str:
        return f"{self.split}_{self.patient}"  # train_ and valid_ numbering are separate in CT-RATE

    @property
    def scan_id(self) -> str:
        return f"{self.patient_id}_{self.scan}"


def ctrate_patient_id(volume_name: str) -> str:
    """``train_1234_a_2.nii.gz`` → ``train_1234``; ``ValueError`` if the name does not follow CT-RATE."""
    return VolumeName.parse(volume_name).patient_id


def official_split(patient_id: str) -> str | None:
    """CT-RATE's own split of a patient id (``train``/``valid``), None for other names."""
    head = patient_id.split("_", 1)[0]
    return head if head in CTRATE_SPLITS else None


# --------------------------------------------------------------------------------------------------
# Metadata


@dataclass(frozen=True)
class Metadata:
    """The columns of one metadata row the loader uses, parsed, with what is wrong with them."""

    slope: float
    intercept: float
    #: (column, row, slice) spacing in mm = the array's (i, j, k) voxel size; None when unusable.
    spacing: tuple[float, float, float] | None
    #: ImageOrientationPatient (row cosine, column cosine); None when absent or unusable.
    orientation: tuple[float, ...] | None
    #: ImagePositionPatient of the first slice; None when absent.
    position: tuple[float, float, float] | None
    where: str
    #: (Columns, Rows) = the array's (i, j) extent; None when the row does not say.
    matrix: tuple[int, int] | None = None
    #: Why the geometry cannot be rebuilt from this row, naming column and value (empty = usable).
    problems: tuple[str, ...] = ()

    def direction(self) -> np.ndarray:
        """LPS unit vectors of increasing i (along a row), j (down a column) and k (row × column)."""
        assert self.orientation is not None
        row, col = np.asarray(self.orientation[:3]), np.asarray(self.orientation[3:])
        return np.stack([row, col, np.cross(row, col)], axis=1)

    def affine(self) -> np.ndarray:
        """Index (i, j, k) → LPS mm, as the dataset's ``fix_metadata.py`` writes the fixed headers."""
        assert self.spacing is not None
        a = np.eye(4)
        a[:3, :3] = self.direction() * np.asarray(self.spacing)
        a[:3, 3] = self.position if self.position is not None else (0.0, 0.0, 0.0)
        return a


def _float(text: Any) -> float | None:
    try:
        v = float(str(text).strip())
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _vector(text: Any, n: int) -> tuple[float, ...] | None:
    """``"[1, 0, 0, 0, 1, 0]"`` → 6 floats; None if absent, malformed or of another length."""
    if text is None or not str(text).strip():
        return None
    try:
        value = ast.literal_eval(str(text).strip())
    except (ValueError, SyntaxError):
        return None
    if not isinstance(value, (list, tuple)) or len(value) != n:
        return None
    nums = [_float(v) for v in value]
    return None if any(v is None for v in nums) else tuple(nums)  # type: ignore[arg-type]


def _orientation(text: Any) -> tuple[tuple[float, ...] | None, str | None]:
    """ImageOrientationPatient, or None and why not."""
    iop = _vector(text, 6)
    if iop is None:
        return None, f"ImageOrientationPatient {_shown(text)} is not 6 numbers"
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        return None, f"ImageOrientationPatient {_shown(text)} is not two orthogonal unit vectors"
    return iop, None


def _spacing(xy: Any, z: Any) -> tuple[tuple[float, float, float] | None, list[str]]:
    """(column, row, slice) spacing in mm, or None and why not."""
    pair, zs = _vector(xy, 2), _float(z)
    why = []
    if pair is None or min(pair) <= 0:
        why.append(f"XYSpacing {_shown(xy)} is not two positive numbers")
    if zs is None or zs <= 0:
        why.append(f"ZSpacing {_shown(z)} is not a positive number")
    if why or pair is None or zs is None:
        return None, why
    row_step, col_step = pair  # DICOM PixelSpacing order
    return (col_step, row_step, zs), []


def _shown(text: Any) -> str:
    return "(empty)" if text is None or not str(text).strip() else repr(str(text).strip())


def _matrix(columns: Any, rows: Any) -> tuple[int, int] | None:
    c, r = _float(columns), _float(rows)
    return None if c is None or r is None else (int(c), int(r))


def read_metadata(paths: Sequence[str | Path]) -> dict[str, Metadata]:
    """``{VolumeName: Metadata}`` from CT-RATE metadata CSVs (train and validation taken as shipped)."""
    out: dict[str, Metadata] = {}
    for path in paths:
        file = Path(path)
        if not file.is_file():
            raise DataError(f"{file.name}: metadata file not found")
        with file.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = {f.strip().casefold(): f for f in (reader.fieldnames or [])}
            missing = [n for n in METADATA_COLUMNS if n.casefold() not in fields]
            if missing:
                raise DataError(
                    f"{file.name}: missing column(s) {', '.join(missing)} (header: {', '.join(fields.values())})"
                )

            def cell(row: dict[str, str], column: str, fields: dict[str, str] = fields) -> str | None:
                key = fields.get(column.casefold())
                return None if key is None else row.get(key)

            for n, row in enumerate(reader, start=1):
                where = f"{file.name}: row {n} (line {reader.line_num})"
                name = (cell(row, "VolumeName") or "").strip()
                if not name:
                    raise DataError(f"{where}: empty VolumeName")
                rescale = {c: _float(cell(row, c)) for c in ("RescaleSlope", "RescaleIntercept")}
                for column, value in rescale.items():
                    if value is None:
                        raise DataError(
                            f"{where}, column {column}: {_shown(cell(row, column))} is not a number"
                        )
                if name in out:
                    raise DataError(f"{where}: VolumeName {name} also in {out[name].where}")
                spacing, spacing_why = _spacing(cell(row, "XYSpacing"), cell(row, "ZSpacing"))
                orientation, orientation_why = _orientation(cell(row, "ImageOrientationPatient"))
                out[name] = Metadata(
                    slope=rescale["RescaleSlope"],  # type: ignore[arg-type]
                    intercept=rescale["RescaleIntercept"],  # type: ignore[arg-type]
                    spacing=spacing,
                    orientation=orientation,
                    position=_vector(cell(row, "ImagePositionPatient"), 3),  # type: ignore[arg-type]
                    where=where,
                    matrix=_matrix(cell(row, "Columns"), cell(row, "Rows")),
                    problems=tuple(spacing_why + ([orientation_why] if orientation_why else [])),
                )
    return out


# --------------------------------------------------------------------------------------------------
# One volume


def _header_matches(affine_lps: np.ndarray, meta: Metadata) -> list[str]:
    """How a header's geometry disagrees with the metadata row (empty = it agrees)."""
    assert meta.spacing is not None and meta.orientation is not None
    spacing = np.linalg.norm(affine_lps[:3, :3], axis=0)
    out = []
    if not np.allclose(spacing, meta.spacing, rtol=_SPACING_RTOL):
        out.append(f"header spacing {np.round(spacing, 4).tolist()} mm vs metadata {list(meta.spacing)}")
    elif not np.allclose(affine_lps[:3, :3] / spacing, meta.direction(), atol=_DIRECTION_ATOL):
        d = np.round(affine_lps[:3, :3] / spacing, 3)
        out.append(
            f"header direction {d.T.tolist()} vs metadata ImageOrientationPatient {list(meta.orientation)}"
        )
    return out


@dataclass(frozen=True)
class CtRateSource:
    """One CT-RATE NIfTI with its metadata row; loads into a :class:`Volume` in LPS, in HU."""

    path: str
    meta: Metadata
    release: Release = "auto"

    def identity(self) -> str:
        st = Path(self.path).stat()
        m = self.meta
        return (
            f"ctrate:{Path(self.path).as_posix()}:{st.st_size}:{st.st_mtime_ns}:{self.release}:"
            f"{m.slope}:{m.intercept}:{m.spacing}:{m.orientation}:{m.position}"
        )

    def describe(self) -> str:
        return Path(self.path).name

    def in_fixed_folder(self) -> bool:
        return any(part.endswith("_fixed") for part in Path(self.path).parent.parts)

    def load(self) -> Volume:
        problems = self.meta.problems
        if problems:
            raise OrientationError(
                f"{self.describe()}: orientation cannot be established: {'; '.join(problems)} "
                f"({self.meta.where})"
            )
        import nibabel as nib  # training extra only

        img: Any = nib.load(self.path)
        if self.meta.matrix is not None and tuple(img.shape[:2]) != self.meta.matrix:
            raise OrientationError(
                f"{self.describe()}: {img.shape[0]} x {img.shape[1]} voxels in-plane, but the metadata says "
                f"Columns {self.meta.matrix[0]} x Rows {self.meta.matrix[1]} ({self.meta.where})"
            )
        header_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(img.affine, dtype=np.float64)
        integer = np.issubdtype(img.get_data_dtype(), np.integer)
        disagreements = _header_matches(header_lps, self.meta)
        release = self.release
        if release == "auto":
            release = "fixed" if integer and not disagreements else "original"
            if release == "original" and self.in_fixed_folder():
                why = "; ".join(disagreements) or f"{img.get_data_dtype()} voxels, not int16 HU"
                raise OrientationError(
                    f"{self.describe()}: lies in a *_fixed folder but its header is not the fixed release's ({why})"
                )
        if release == "fixed":
            if disagreements:
                raise OrientationError(
                    f"{self.describe()}: the fixed release's header must match the metadata: "
                    f"{'; '.join(disagreements)} ({self.meta.where})"
                )
            logger.debug("%s: fixed release, header geometry, values already HU", self.describe())
            return load_nifti(self.path)
        logger.debug("%s: original release, geometry and rescale from %s", self.describe(), self.meta.where)
        raw = load_nifti(self.path, slope=self.meta.slope, intercept=self.meta.intercept)
        return Volume(hu=raw.hu, affine=self.meta.affine())


# --------------------------------------------------------------------------------------------------
# The dataset


@dataclass(frozen=True)
class CtRateFiles:
    """The CSVs a run reads and where its volumes are (found under the dataset folder, or given)."""

    labels: tuple[Path, ...]
    metadata: tuple[Path, ...]
    volumes: Path
    splits: tuple[str, ...]


def dataset_folder(root: str | Path) -> Path:
    """CT-RATE's ``dataset/`` folder: ``root`` itself or ``root/dataset``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"CT-RATE folder {root.name!r} does not exist")
    nested = root / "dataset"
    return nested if nested.is_dir() and not (root / "metadata").is_dir() else root


def find_files(
    root: str | Path,
    splits: Sequence[str] = (),
    labels: Sequence[str | Path] = (),
    metadata: Sequence[str | Path] = (),
) -> CtRateFiles:
    """The per-split label and metadata CSVs as CT-RATE ships them; given paths win over discovery.

    ``splits`` empty = every CT-RATE split whose label CSV is there (a download of ``valid`` alone works).
    """
    folder = dataset_folder(root)
    unknown = [s for s in splits if s not in CTRATE_SPLITS]
    if unknown:
        raise DataError(f"data.ctrate.splits: unknown CT-RATE split(s) {', '.join(unknown)} (train, valid)")
    if not splits and not labels:  # every split whose labels were downloaded
        splits = [s for s, (label_file, _) in CTRATE_SPLITS.items() if (folder / label_file).is_file()]
        if not splits:
            raise DataError(
                f"no CT-RATE label CSV under {folder.name}/ "
                f"({', '.join(f for f, _ in CTRATE_SPLITS.values())}); give them with data.labels"
            )
    elif not splits:
        splits = list(CTRATE_SPLITS)

    def discover(kind: int, what: str) -> tuple[Path, ...]:
        paths = [folder / CTRATE_SPLITS[s][kind] for s in splits]
        missing = [p.relative_to(folder).as_posix() for p in paths if not p.is_file()]
        if missing:
            raise DataError(
                f"CT-RATE {what} CSV(s) not found under {folder.name}/: {', '.join(missing)} "
                f"(give them with data.{what} or download them with the volumes)"
            )
        return tuple(paths)

    return CtRateFiles(
        labels=tuple(map(Path, labels)) or discover(0, "labels"),
        metadata=tuple(map(Path, metadata)) or discover(1, "metadata"),
        volumes=folder,
        splits=tuple(splits),
    )


def _index_volumes(root: Path) -> dict[str, dict[str, Path]]:
    """``{file name: {"fixed"|"original": path}}``: a ``*_fixed`` folder holds the fixed release."""
    index: dict[str, dict[str, Path]] = {}
    for dirpath, _dirs, names in os.walk(root):
        kind = (
            "fixed"
            if any(p.endswith("_fixed") for p in Path(dirpath).relative_to(root).parts)
            else "original"
        )
        for name in names:
            if name.endswith((".nii.gz", ".nii")):
                index.setdefault(name, {}).setdefault(kind, Path(dirpath) / name)
    return index


def _pick_path(found: dict[str, Path], release: Release) -> Path | None:
    if release == "original":
        return found.get("original")
    if release == "fixed":
        return found.get("fixed") or found.get("original")  # a flat copy of fixed files: the header decides
    return found.get("fixed") or found.get("original")


def _read_labels(
    files: Sequence[Path], registry: TaskRegistry, bad: BadData, extra_labels: Sequence[str | Path]
) -> dict[str, LabelRow]:
    rows: dict[str, LabelRow] = {}
    for path in files:
        _, _, part = read_label_csv(path, registry, key_columns=("VolumeName",), bad=bad)
        for key, row in part.items():
            if key in rows:
                bad.report(f"{row.where}: VolumeName {key} also in {rows[key].where}")
                continue
            rows[key] = row
    extras = [
        read_label_csv(p, registry, key_columns=("VolumeName",), bad=bad, require_label=False)[2]
        for p in extra_labels
    ]
    return merge_labels(rows, extras, bad)


def ctrate_records(
    root: str | Path,
    registry: TaskRegistry,
    tasks: Sequence[str],
    *,
    labels: Sequence[str | Path] = (),
    metadata: Sequence[str | Path] = (),
    extra_labels: Sequence[str | Path] = (),
    splits: Sequence[str] = (),
    release: Release = "auto",
    reconstructions: Reconstructions = "one-per-scan",
    bad: BadData | None = None,
) -> list[ScanRecord]:
    """One :class:`ScanRecord` per kept volume, in label-file order."""
    bad = bad or BadData()
    files = find_files(root, splits, labels, metadata)
    rows = _read_labels(files.labels, registry, bad, extra_labels)
    meta = read_metadata(files.metadata)
    index = _index_volumes(files.volumes)

    candidates: dict[str, list[tuple[VolumeName, ScanRecord]]] = {}
    unusable_why: dict[str, list[str]] = {}
    other_splits = 0
    for key, row in rows.items():
        name = key if key.endswith((".nii", ".nii.gz")) else f"{key}.nii.gz"
        try:
            parsed = VolumeName.parse(name)
        except ValueError as exc:
            bad.report(f"{row.where}: {exc}")
            continue
        if parsed.split not in files.splits:
            other_splits += 1
            continue
        found = index.get(name, {})
        path = _pick_path(found, release)
        if path is None:
            where = "" if release == "auto" or not found else f" in the {release} release"
            bad.report(f"{row.where}: volume {name} not found{where} under {files.volumes.name}/")
            continue
        m = meta.get(name) or meta.get(key)
        if m is None:
            bad.report(f"{row.where}: volume {name} has no row in the metadata CSV(s)")
            continue
        if m.problems and reconstructions == "one-per-scan":
            logger.info(
                "%s: not used for scan %s (%s; %s)", name, parsed.scan_id, "; ".join(m.problems), m.where
            )
            unusable_why.setdefault(parsed.scan_id, []).append(f"{name}: {'; '.join(m.problems)} ({m.where})")
            candidates.setdefault(parsed.scan_id, [])
            continue
        source = CtRateSource(str(path), m, release)
        record = ScanRecord(key, parsed.patient_id, label_vector(row.labels, tasks), source, row.where,
                            scan_id=parsed.scan_id)  # fmt: skip
        candidates.setdefault(parsed.scan_id, []).append((parsed, record))

    records: list[ScanRecord] = []
    unusable = 0
    for scan, options in candidates.items():
        if not options:
            unusable += 1
            bad.report(
                f"scan {scan}: no reconstruction has usable geometry: {' | '.join(unusable_why[scan])}"
            )
            continue
        if reconstructions == "all":
            records.extend(r for _, r in options)
        else:
            records.append(min(options, key=lambda o: o[0].recon)[1])
    n_volumes = sum(len(v) for v in candidates.values())
    if other_splits:
        logger.info(
            "CT-RATE: %d labelled volumes of other splits than %s not read",
            other_splits,
            "/".join(files.splits),
        )
    logger.info(
        "CT-RATE (%s release, %s): %d volumes of %d scans kept from %d labelled rows",
        release, reconstructions, len(records), len(candidates) - unusable, len(rows),
    )  # fmt: skip
    if reconstructions == "one-per-scan" and n_volumes > len(records):
        logger.info("CT-RATE: %d further reconstructions not used (one per scan)", n_volumes - len(records))
    return records
