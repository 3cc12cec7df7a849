"""CT-RATE as published, and the proof that training and serving give the model the same input.

One synthetic study is written as a DICOM series (what the node serves) and as CT-RATE NIfTI in
both releases (what training reads). The training data path (``ctrate_records`` → cache →
``ScanDataset``) and the serving path (``load_dicom_series`` → ``preprocess``) must then produce the
same images, left-right and head-feet included; a flipped or transposed voxel array must not.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from operators.preprocessing import PreprocessingConfig, preprocess
from operators.volume import load_dicom_series
from synth.geometry import PatientPosition
from synth.study import StudyConfig, generate_study
from tests.ctrate_fixtures import (
    break_axes,
    metadata_row,
    read_series,
    volume_path,
    write_csvs,
    write_volume,
)
from training.cache import InputCache
from training.config import SplitConfig
from training.data import BadData, DataError, ScanDataset, split_records
from training.data.ctrate import OrientationError, ctrate_records
from training.evaluate import per_scan
from training.metrics import evaluate
from training.tasks import TaskRegistry

REG = TaskRegistry.load()
TASKS = ["cardiomegaly", "pleural_effusion"]
PRE = PreprocessingConfig()  # the serving default: the input a model built today sees


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """A head-first and a feet-first study (square 128 px slices, 90 slices), as DICOM files."""
    out = tmp_path_factory.mktemp("dicom")
    files = {}
    for position in (PatientPosition.HFS, PatientPosition.FFS):
        cfg = StudyConfig(
            seed=7, findings=("cardiomegaly",), slices=90, rows=128, cols=128, position=position
        )
        files[position.value] = generate_study(cfg, out / position.value).primary.files
    return files


def serving_input(files: list[Path]) -> np.ndarray:
    return preprocess(load_dicom_series([str(f) for f in files]), PRE).images


def training_input(dataset: Path, tmp: Path, **kwargs: object) -> np.ndarray:
    recs = ctrate_records(dataset, REG, TASKS, **kwargs)  # type: ignore[arg-type]
    assert len(recs) == 1
    return ScanDataset(recs, PRE, InputCache(tmp / "cache"))[0].images


def assert_same_input(train: np.ndarray, serve: np.ndarray) -> None:
    """Same images within the cache's uint16 quantisation (≈ 3e-5 after normalisation)."""
    assert train.shape == serve.shape
    np.testing.assert_allclose(train, serve, atol=1e-3, rtol=0)


def write_dataset(root: Path, files: list[Path], release: str, how: str | None = None) -> Path:
    s = read_series(files)
    name = "valid_1_a_1.nii.gz"
    voxels = None if how is None else break_axes(s.stored, how)
    write_volume(volume_path(root / "dataset", name, release), s, release, voxels=voxels)
    write_csvs(root / "dataset", {name: (metadata_row(name, s), {"Cardiomegaly": 1})})
    return root / "dataset"


@pytest.mark.parametrize("position", ["HFS", "FFS"])
@pytest.mark.parametrize("release", ["original", "fixed"])
def test_training_and_serving_see_the_same_image(
    studies: dict[str, list[Path]], tmp_path: Path, release: str, position: str
) -> None:
    files = studies[position]
    dataset = write_dataset(tmp_path, files, release)
    assert_same_input(training_input(dataset, tmp_path), serving_input(files))


@pytest.mark.parametrize("how", ["flip-lr", "flip-hf", "transpose"])
def test_a_flipped_or_transposed_volume_fails_the_comparison(
    studies: dict[str, list[Path]], tmp_path: Path, how: str
) -> None:
    files = studies["HFS"]
    dataset = write_dataset(tmp_path, files, "original", how)
    train, serve = training_input(dataset, tmp_path), serving_input(files)
    with pytest.raises(AssertionError):
        assert_same_input(train, serve)
    assert float(np.abs(train - serve).mean()) > 0.05  # not a rounding difference: a different image


def test_auto_release_decides_per_file_from_the_header(
    studies: dict[str, list[Path]], tmp_path: Path
) -> None:
    files = studies["HFS"]
    dataset = write_dataset(tmp_path, files, "original")
    write_dataset(tmp_path, files, "fixed")  # both releases present: the fixed one is read
    recs = ctrate_records(dataset, REG, TASKS)
    assert "valid_fixed" in Path(recs[0].source.path).parts  # type: ignore[attr-defined]
    # a fixed file copied into a plain folder is still recognised by its header (int16, geometry = metadata)
    fixed = volume_path(dataset, "valid_1_a_1.nii.gz", "fixed")
    shutil.copy(fixed, volume_path(dataset, "valid_1_a_1.nii.gz", "original"))
    shutil.rmtree(dataset / "valid_fixed")
    assert_same_input(training_input(dataset, tmp_path), serving_input(files))
    # an original file under *_fixed contradicts its folder
    write_dataset(tmp_path / "other", files, "original")
    other = tmp_path / "other" / "dataset"
    (other / "valid").rename(other / "valid_fixed")
    rec = ctrate_records(other, REG, TASKS)[0]
    with pytest.raises(OrientationError, match=r"valid_1_a_1\.nii\.gz: lies in a \*_fixed folder"):
        rec.source.load()
    # insisting on the fixed release with an original file is refused, not silently rescaled twice
    (other / "valid_fixed").rename(other / "valid")
    rec = ctrate_records(other, REG, TASKS, release="fixed")[0]
    with pytest.raises(OrientationError, match="fixed release's header must match the metadata"):
        rec.source.load()


def test_orientation_that_cannot_be_established_is_refused(
    studies: dict[str, list[Path]], tmp_path: Path
) -> None:
    dataset = write_dataset(tmp_path, studies["HFS"], "original")
    meta = dataset / "metadata" / "validation_metadata.csv"
    text = meta.read_text()
    meta.write_text(text.replace('"[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]"', ""))
    rec = ctrate_records(dataset, REG, TASKS, reconstructions="all")[0]
    with pytest.raises(OrientationError, match=r"valid_1_a_1\.nii\.gz: orientation cannot be established: "
                       r"ImageOrientationPatient \(empty\) is not 6 numbers \(validation_metadata\.csv: row 1"):  # fmt: skip
        rec.source.load()
    with pytest.raises(DataError, match="scan valid_1_a: no reconstruction has usable geometry: valid_1_a_1.nii.gz: "
                       "ImageOrientationPatient"):  # fmt: skip
        ctrate_records(dataset, REG, TASKS)
    bad = BadData(skip=True)
    assert ctrate_records(dataset, REG, TASKS, bad=bad) == [] and bad.count == 1
    meta.write_text(
        text.replace('"[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]"', "").replace("ImageOrientationPatient", "IOP")
    )
    with pytest.raises(
        DataError, match=r"validation_metadata\.csv: missing column\(s\) ImageOrientationPatient"
    ):
        ctrate_records(dataset, REG, TASKS)
    meta.write_text(text.replace(",-1024.0,", ",n/a,"))
    with pytest.raises(DataError, match=r"row 1 \(line 2\), column RescaleIntercept: 'n/a' is not a number"):
        ctrate_records(dataset, REG, TASKS)
    meta.write_text(text.replace(",128,128,", ",128,96,"))  # Rows that the array does not have
    with pytest.raises(OrientationError, match="128 x 128 voxels in-plane, but the metadata says Columns 96"):
        ctrate_records(dataset, REG, TASKS)[0].source.load()


def _tiny_dataset(root: Path, files: list[Path]) -> Path:
    """train_1 (scan a: recons 1, 2), train_2, valid_1 (scan a: recons 1, 2; recon 1 without geometry)."""
    s = read_series(files)
    rows = {}
    for name in ("train_1_a_1", "train_1_a_2", "train_2_a_1", "valid_1_a_1", "valid_1_a_2"):
        n = f"{name}.nii.gz"
        write_volume(volume_path(root, n, "original"), s, "original")
        meta = metadata_row(n, s)
        if name == "valid_1_a_1":
            meta["ZSpacing"] = ""
        rows[n] = (meta, {"Cardiomegaly": int(name.startswith("train_1"))})
    write_csvs(root, rows)
    return root


def test_reconstructions_splits_and_per_scan_scores(studies: dict[str, list[Path]], tmp_path: Path) -> None:
    dataset = _tiny_dataset(tmp_path / "dataset", studies["HFS"])
    one = ctrate_records(tmp_path, REG, TASKS)  # the parent of dataset/ works too
    assert [r.key for r in one] == ["train_1_a_1.nii.gz", "train_2_a_1.nii.gz", "valid_1_a_2.nii.gz"]
    every = ctrate_records(dataset, REG, TASKS, reconstructions="all")
    assert [r.scan for r in every] == ["train_1_a", "train_1_a", "train_2_a", "valid_1_a", "valid_1_a"]
    assert len(ctrate_records(dataset, REG, TASKS, splits=["valid"])) == 1

    splits = split_records(every, SplitConfig(train=0.5, val=0.5, test=0.0), "ctrate")
    assert {r.patient_id for r in splits["test"]} == {"valid_1"}  # CT-RATE's validation set is held out
    assert {r.patient_id for r in splits["train"] + splits["val"]} == {"train_1", "train_2"}
    assert splits["val"] and splits["train"]

    labels = np.stack([r.labels for r in every]).astype(float)
    scores = np.array([[0.2, 0.5], [0.4, 0.5], [0.1, 0.5], [0.3, 0.5], [0.5, 0.5]])
    scans, patients, y, p = per_scan(every, labels, scores)
    assert scans == ["train_1_a", "train_2_a", "valid_1_a"] and patients == ["train_1", "train_2", "valid_1"]
    np.testing.assert_allclose(p[:, 0], [0.3, 0.1, 0.4])
    assert y.shape == (3, 2)


def test_labels_and_metadata_are_found_per_split_or_named(
    studies: dict[str, list[Path]], tmp_path: Path
) -> None:
    dataset = _tiny_dataset(tmp_path / "dataset", studies["HFS"])
    (dataset / "metadata" / "validation_metadata.csv").unlink()
    with pytest.raises(DataError, match=r"CT-RATE metadata CSV\(s\) not found under dataset/: "
                       r"metadata/validation_metadata\.csv"):  # fmt: skip
        ctrate_records(dataset, REG, TASKS)
    recs = ctrate_records(dataset, REG, TASKS, splits=["train"])
    assert [r.patient_id for r in recs] == ["train_1", "train_2"]
    moved = tmp_path / "elsewhere.csv"
    (dataset / "metadata" / "train_metadata.csv").rename(moved)
    with pytest.raises(DataError, match=r"^x\.csv: metadata file not found"):
        ctrate_records(dataset, REG, TASKS, splits=["train"], metadata=[moved.with_name("x.csv")])
    assert len(ctrate_records(dataset, REG, TASKS, splits=["train"], metadata=[moved])) == 2
    partial = tmp_path / "partial.csv"
    partial.write_text("".join(ln for ln in moved.read_text().splitlines(True) if "train_1_a_1" not in ln))
    with pytest.raises(
        DataError, match=r"row 1 \(line 2\): volume train_1_a_1\.nii\.gz has no row in the metadata"
    ):
        ctrate_records(dataset, REG, TASKS, splits=["train"], metadata=[partial])


def test_bootstrap_resamples_patients_not_volumes() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60).astype(float)
    s = np.clip(y * 0.3 + rng.normal(0.4, 0.25, 60), 0, 1)
    twice_y, twice_s = np.repeat(y, 2)[:, None], np.repeat(s, 2)[:, None]
    patients = [f"p{i:03d}" for i in np.repeat(np.arange(60), 2)]  # sorted like the rows
    by_patient = evaluate(twice_y, twice_s, ["t"], n_bootstrap=200, patients=patients).tasks[0].auroc_ci
    by_volume = evaluate(twice_y, twice_s, ["t"], n_bootstrap=200).tasks[0].auroc_ci
    once = evaluate(y[:, None], s[:, None], ["t"], n_bootstrap=200).tasks[0].auroc_ci
    assert by_patient is not None and by_volume is not None and once is not None
    # two volumes of one patient are one draw: the CI is that of the patients, not a narrower one
    assert by_patient.lower == pytest.approx(once.lower) and by_patient.upper == pytest.approx(once.upper)
    assert by_volume.upper - by_volume.lower < 0.9 * (once.upper - once.lower)


def test_the_ctrate_recipe_trains_and_evaluates_on_the_official_split(
    studies: dict[str, list[Path]], tmp_path: Path
) -> None:
    """``hyperct train ctrate`` + ``hyperct evaluate`` wiring: official split, per-scan scores, patients."""
    from training.config import load_config
    from training.evaluate import evaluate_checkpoint
    from training.train import train

    s = read_series(studies["HFS"])
    rows = {}
    for i, name in enumerate(["train_1_a_1", "train_2_a_1", "train_3_a_1", "train_4_a_1", "train_5_a_1",
                              "valid_1_a_1", "valid_1_a_2", "valid_2_a_1", "valid_3_b_1", "valid_4_a_1"]):  # fmt: skip
        n = f"{name}.nii.gz"
        write_volume(volume_path(tmp_path / "dataset", n, "fixed"), s, "fixed")
        j = i - (name == "valid_1_a_2")  # two reconstructions of one scan: one report, one label
        rows[n] = (metadata_row(n, s), {"Cardiomegaly": j % 2, "Pleural effusion": (j // 2) % 2})
    write_csvs(tmp_path / "dataset", rows)
    small = {"spacing_mm": [8.0, 8.0, 8.0], "image_size": [48, 48], "n_slices": 45, "train_jitter_mm": 16.0}
    cfg = load_config(
        "ctrate",
        [f"data.root={tmp_path / 'dataset'}", "data.ctrate.reconstructions=all", "data.split.val=0.4",
         "data.workers=0", "model.backbone=tiny", "model.head_in_dim=32", "epochs=1", "batch_size=4",
         "progress=false", "device=cpu"],
        extra={"preprocessing": small},
    )  # fmt: skip
    run = train(cfg, tmp_path / "run")
    splits = (tmp_path / "run" / "splits.csv").read_text()
    assert all(f"valid_{p},test" in splits for p in (1, 2, 3, 4)) and "train_1," in splits
    out = evaluate_checkpoint(run.best_checkpoint, cfg, tmp_path / "eval", n_bootstrap=50, roc_plots=False)
    assert out.result.n_scans == 4  # valid_1_a's two reconstructions are one scan
    assert out.result.config.bootstrap_unit.startswith("patient (4 patients)")
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "unit: patient (4 patients)" in report and "| overall |" in report.lower()
