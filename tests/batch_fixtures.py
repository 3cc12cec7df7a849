"""Builders for the batch tests: synthetic studies of different patients and a messy archive."""

from __future__ import annotations

import csv
import os
import shutil
import zipfile
from pathlib import Path

import pydicom

from tests.app_fixtures import small_study


def study_dir(root: Path, seed: int, **overrides: object) -> Path:
    """One small synthetic study (its own patient) in ``root``; returns its ``<PatientID>_<Acc>`` folder."""
    small_study(root, seed=seed, **overrides)
    (folder,) = [p for p in root.iterdir() if p.is_dir()]
    return folder


def study_uid(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)


def zip_folder(folder: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder.parent).as_posix())
    return target


def strip_suffixes(folder: Path) -> None:
    """Archives often hold DICOM files without ``.dcm``."""
    for path in folder.rglob("*.dcm"):
        path.rename(path.with_suffix(""))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def copy_study(src: Path, dst: Path) -> Path:
    """Hard links where possible (studies are large, tests run on 2 shared cores)."""
    shutil.copytree(src, dst, copy_function=_link_or_copy)
    return dst


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
