"""The three data layouts on tiny files: CT-RATE NIfTI + CSVs, DICOM folders via series selection, synthetic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from operators.preprocessing import PreprocessingConfig
from training.cache import InputCache
from training.config import load_config
from training.data import (
    BadData,
    DataError,
    ScanDataset,
    build_records,
    design_studies,
    prepare,
    resolve_tasks,
)
from training.data.ctrate import ctrate_records
from training.data.synthetic import render_study
from training.tasks import TaskRegistry

REG = TaskRegistry.load()
SMALL = PreprocessingConfig(
    spacing_mm=(8.0, 8.0, 8.0), image_size=(48, 48), n_slices=45, train_jitter_mm=16.0
)


def _nifti(path: Path, seed: int) -> None:
    """An original-release CT-RATE volume: raw stored values as floats under a placeholder header."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    stored = np.clip(rng.normal(24, 200, (40, 40, 30)), 0, None).astype(np.float32)  # raw, intercept -1024
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(stored, np.eye(4)), path)


def _ctrate(tmp_path: Path) -> tuple[Path, Path, Path]:
    vols = tmp_path / "dataset" / "train"
    for name in ("train_1_a_1", "train_1_b_1", "train_2_a_1", "train_3_b_1"):
        patient = "_".join(name.split("_")[:2])
        _nifti(vols / patient / f"{patient}_{name.split('_')[2]}" / f"{name}.nii.gz", hash(name) % 1000)
    labels = tmp_path / "multi_abnormality_labels.csv"
    labels.write_text(
        "VolumeName,Medical material,Pleural effusion,Cardiomegaly\n"
        "train_1_a_1.nii.gz,0,1,0\ntrain_1_b_1.nii.gz,0,1,0\ntrain_2_a_1.nii.gz,1,0,0\ntrain_3_b_1.nii.gz,0,0,1\n"
    )
    meta = tmp_path / "train_metadata.csv"
    iop = '"[1, 0, 0, 0, 1, 0]"'
    meta.write_text(
        "VolumeName,RescaleSlope,RescaleIntercept,XYSpacing,ZSpacing,ImageOrientationPatient\n"
        f'train_1_a_1.nii.gz,1,-1024,"[8.0, 8.0]",8.0,{iop}\ntrain_1_b_1.nii.gz,1,-1024,"[8.0, 8.0]",8.0,{iop}\n'
        f'train_2_a_1.nii.gz,1,-1024,"[8.0, 8.0]",8.0,{iop}\ntrain_3_b_1.nii.gz,1,-1024,"[6.0, 6.0]",5.0,{iop}\n'
    )
    return tmp_path / "dataset", labels, meta


def _records(root: Path, labels: Path, meta: Path, tasks: list[str], **kw: object) -> list:
    return ctrate_records(root, REG, tasks, labels=[labels], metadata=[meta], **kw)  # type: ignore[arg-type]


def test_ctrate_layout_records_patients_rescale_and_spacing(tmp_path: Path) -> None:
    root, labels, meta = _ctrate(tmp_path)
    tasks = ["medical_material", "cardiomegaly", "pleural_effusion"]
    recs = _records(root, labels, meta, tasks)
    assert [r.patient_id for r in recs] == ["train_1", "train_1", "train_2", "train_3"]
    assert [r.scan for r in recs] == ["train_1_a", "train_1_b", "train_2_a", "train_3_b"]
    np.testing.assert_array_equal(recs[0].labels, [0, 0, 1])  # registry order, not CSV order
    vol = recs[0].source.load()
    assert -1500 < float(vol.hu.mean()) < -500  # raw + intercept = HU
    np.testing.assert_allclose(recs[3].source.load().spacing, [6.0, 6.0, 5.0])  # geometry from the metadata
    cache = InputCache(tmp_path / "cache")
    assert len(prepare(recs, SMALL, cache)) == 4
    assert ScanDataset(recs, SMALL, cache)[1] is not None and cache.stats.hits == 1


def test_ctrate_bad_rows_name_the_labels_file(tmp_path: Path) -> None:
    root, labels, meta = _ctrate(tmp_path)
    labels.write_text(labels.read_text() + "train_9_a_1.nii.gz,0,0,1\n")
    with pytest.raises(
        DataError,
        match=r"multi_abnormality_labels\.csv: row 5 \(line 6\): volume train_9_a_1\.nii\.gz not found",
    ):
        _records(root, labels, meta, ["cardiomegaly"])
    bad = BadData(skip=True)
    assert len(_records(root, labels, meta, ["cardiomegaly"], bad=bad)) == 4
    assert bad.count == 1
    # a corrupt volume is found when it is read, with the labels row in the message
    (root / "train" / "train_2" / "train_2_a" / "train_2_a_1.nii.gz").write_bytes(b"not a nifti")
    recs = _records(root, labels, meta, ["cardiomegaly"], bad=BadData(skip=True))
    with pytest.raises(
        DataError, match=r"multi_abnormality_labels\.csv: row 3 \(line 4\): cannot read train_2_a_1\.nii\.gz"
    ):
        prepare(recs, SMALL, InputCache(None))


def test_dicom_layout_uses_series_selection(tmp_path: Path) -> None:
    from synth import DatasetConfig, StudyConfig, generate_dataset

    base = StudyConfig(
        seed=11, rows=64, cols=64, slices=50, pixel_spacing=6.0, slice_spacing=3.0, extras=("thick",)
    )
    ds = generate_dataset(
        DatasetConfig(studies=3, base=base, random_findings=False, vary_geometry=False), tmp_path / "dicom"
    )
    cfg = load_config(None, ["data.kind=synthetic_dicom", f"data.root={tmp_path / 'dicom'}"])
    tasks = resolve_tasks(cfg.data, REG)
    assert len(tasks) == 18  # every CT-RATE column of the synthetic labels.csv
    recs = build_records(cfg.data, REG, tasks)
    assert len(recs) == 3
    primary = {r.primary.series_uid for r in ds.studies}
    assert {r.source.series_instance_uid for r in recs} == primary  # the thin axial, never the 5 mm series
    assert all(len(r.source.files) == 50 for r in recs)
    assert len({r.patient_id for r in recs}) == 3
    vol = recs[0].source.load()
    assert vol.hu.shape == (50, 64, 64)
    # a study the selector refuses is reported with the selector's reason
    strict = load_config(
        None,
        [
            "data.kind=synthetic_dicom",
            f"data.root={tmp_path / 'dicom'}",
            "data.series_selection={min-slices: 60}",
        ],
    )
    with pytest.raises(
        DataError, match=r"labels\.csv: row 1 \(line 2\): study .*: no eligible series.*fewer than 60"
    ):
        build_records(strict.data, REG, tasks)


def test_synthetic_in_memory_studies_are_matched_twins(tmp_path: Path) -> None:
    studies = design_studies(6, ("pleural_effusion", "cardiomegaly"), preprocessing=SMALL)
    assert [s.patient_id for s in studies[:2]] == [studies[0].patient_id] * 2
    for a, b in zip(studies[::2], studies[1::2], strict=True):
        assert set(a.findings).isdisjoint(b.findings)  # complementary: every finding positive in one twin
        assert set(a.findings) | set(b.findings) == {"pleural_effusion", "cardiomegaly"}
        assert (a.rows, a.slices, a.pixel_mm) == (b.rows, b.slices, b.pixel_mm)
    held = design_studies(4, ("cardiomegaly",), seed=1, twins=False, geometry="varied")
    assert not {s.patient_id for s in held} & {s.patient_id for s in studies}
    vol = render_study(held[0])
    assert vol.hu.shape[0] == held[0].slices
