"""Training loop contracts on tiny data: task sampling, batching, resume, cache, bad data, config, CLI."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from operators.preprocessing import PreprocessingConfig, preprocess
from operators.volume import Volume
from training.cache import InputCache, train_margin
from training.config import ConfigError, RunConfig, load_config, parse_override
from training.data import (
    DataError,
    ScanDataset,
    ScanRecord,
    choose_tasks,
    collate,
    design_studies,
    prepare,
    sample_tasks,
    synthetic_records,
)
from training.tasks import TaskRegistry
from training.train import read_predictions, subsample_images, task_draw_weights, train

ROOT = Path(__file__).resolve().parents[1]
REG = TaskRegistry.load()
TASKS = ["cardiomegaly", "pleural_effusion", "consolidation"]
# A coarse grid (8 mm voxels, 48 x 48 x 45) keeps these tests to seconds; the contracts do not depend on it.
SMALL = {"spacing_mm": [8.0, 8.0, 8.0], "image_size": [48, 48], "n_slices": 45, "train_jitter_mm": 16.0}


def small_config(**extra: object) -> RunConfig:
    overrides = [
        "data.kind=synthetic",
        "data.synthetic.n_studies=12",
        "data.synthetic.findings=[pleural_effusion, consolidation, cardiomegaly]",
        f"data.tasks=[{', '.join(TASKS)}]",
        "data.split={train: 0.5, val: 0.25, test: 0.25, seed: 3}",
        "model.backbone=tiny",
        "model.head_in_dim=32",
        "epochs=2",
        "batch_size=4",
        "eval_batch_size=6",
        "optimizer.lr=3e-4",
        "progress=false",
        "seed=5",
    ]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides, extra={"preprocessing": SMALL})


# --------------------------------------------------------------------------------------------------
# Task sampling and batching (spec §6)


def test_sampling_never_picks_a_missing_label_and_drops_scans_without_one() -> None:
    labels = np.array(
        [
            [1, -1, -1, 0],
            [-1, -1, -1, -1],  # no valid task: dropped
            [0, 1, -1, 1],
            [-1, -1, 1, -1],
        ],
        dtype=np.float32,
    )
    rng = np.random.default_rng(0)
    seen: dict[int, set[int]] = {0: set(), 2: set(), 3: set()}
    for _ in range(300):
        keep, tasks, target = sample_tasks(labels, rng)
        assert keep.tolist() == [0, 2, 3]
        assert np.all(labels[keep, tasks] != -1)
        np.testing.assert_array_equal(target, labels[keep, tasks])
        for b, t in zip(keep, tasks, strict=True):
            seen[int(b)].add(int(t))
    assert seen == {0: {0, 3}, 2: {0, 1, 3}, 3: {2}}  # uniform over each scan's valid tasks: all reached
    keep, tasks, target = sample_tasks(np.full((3, 2), -1.0), rng)
    assert keep.size == tasks.size == target.size == 0


def test_sampling_is_uniform_over_valid_tasks() -> None:
    labels = np.tile(np.array([[1, -1, 0, 1]], dtype=np.float32), (6000, 1))
    _, tasks, _ = sample_tasks(labels, np.random.default_rng(1))
    counts = np.bincount(tasks, minlength=4)
    assert counts[1] == 0
    assert np.all(np.abs(counts[[0, 2, 3]] / 6000 - 1 / 3) < 0.03)


def test_task_weights_draw_tasks_in_proportion_among_the_valid_ones() -> None:
    labels = np.tile(np.array([[1, -1, 0, 1]], dtype=np.float32), (8000, 1))
    weights = np.array([1.0, 5.0, 3.0, 1.0])  # task 1 has no label here: its weight does not count
    _, tasks, target = choose_tasks(labels, np.random.default_rng(1).random(8000), weights)
    counts = np.bincount(tasks, minlength=4) / 8000
    assert counts[1] == 0
    np.testing.assert_allclose(counts[[0, 2, 3]], [0.2, 0.6, 0.2], atol=0.02)
    np.testing.assert_array_equal(target, labels[0, tasks])
    # equal weights are the uniform draw, draw for draw
    u = np.random.default_rng(2).random(8000)
    np.testing.assert_array_equal(choose_tasks(labels, u, np.ones(4))[1], choose_tasks(labels, u)[1])


def test_task_weights_must_name_trained_tasks() -> None:
    synthetic = ["data.kind=synthetic"]
    cfg = load_config(None, [*synthetic, "data.tasks=[cardiomegaly, emphysema]", "data.task_weights={emphysema: 2}"])
    assert cfg.data.task_weights == {"emphysema": 2.0}
    weights = task_draw_weights(cfg, ["cardiomegaly", "emphysema"])
    assert weights is not None and weights.tolist() == [1.0, 2.0]
    assert task_draw_weights(load_config(None, synthetic), ["cardiomegaly"]) is None
    with pytest.raises(ConfigError, match="data.task_weights: hiatal_hernia not in data.tasks"):
        load_config(None, [*synthetic, "data.tasks=[cardiomegaly]", "data.task_weights={hiatal_hernia: 2}"])
    # tasks found in the data (data.tasks empty): checked when the run knows them
    loose = load_config(None, [*synthetic, "data.task_weights={hiatal_hernia: 2}"])
    with pytest.raises(ConfigError, match="data.task_weights: hiatal_hernia not among the trained tasks"):
        task_draw_weights(loose, ["cardiomegaly"])
    with pytest.raises(ConfigError, match="data.task_weights"):
        load_config(None, [*synthetic, "data.task_weights={emphysema: 0}"])


def test_collate_pads_and_masks(tmp_path: Path) -> None:
    pre = PreprocessingConfig(**SMALL)
    recs = synthetic_records(design_studies(2, ("cardiomegaly",), preprocessing=pre), REG, ["cardiomegaly"])
    ds = ScanDataset(recs, pre, InputCache(None))
    a, b = ds[0], ds[1]
    assert a is not None and b is not None
    short = type(b)(b.images[:-2], b.mask[:-2], b.labels, b.index)
    batch = collate([a, None, short])
    assert batch.dropped_bad == 1
    assert batch.images.shape[:2] == (2, a.n_images)
    assert batch.mask[1].sum() == short.n_images and not batch.mask[1, short.n_images :].any()
    assert torch.all(batch.images[1, short.n_images :] == 0)


# --------------------------------------------------------------------------------------------------
# Cache


@dataclass(frozen=True)
class CountingSource:
    """A volume source that counts how often it is read (to prove cache hits)."""

    volume_seed: int
    counter: list[int]

    def identity(self) -> str:
        return f"counting:{self.volume_seed}"

    def describe(self) -> str:
        return f"counting volume {self.volume_seed}"

    def load(self) -> Volume:
        self.counter[0] += 1
        rng = np.random.default_rng(self.volume_seed)
        hu = rng.normal(-500, 300, (40, 48, 48)).astype(np.float32)
        hu[:, 10:38, 10:38] += 600.0
        affine = np.diag([8.0, 8.0, 8.0, 1.0])
        return Volume(hu=hu, affine=affine)


@dataclass(frozen=True)
class BrokenSource:
    name: str

    def identity(self) -> str:
        return f"broken:{self.name}"

    def describe(self) -> str:
        return self.name

    def load(self) -> Volume:
        raise OSError(f"{self.name}: truncated file")


def test_cache_hit_avoids_rereading_and_matches_serving(tmp_path: Path) -> None:
    pre = PreprocessingConfig(**SMALL)
    counter = [0]
    src = CountingSource(1, counter)
    rec = ScanRecord("k1", "p1", np.array([1.0], dtype=np.float32), src, "labels.csv: row 1 (line 2)")
    cache = InputCache(tmp_path / "cache")
    ds = ScanDataset([rec], pre, cache)
    first = ds[0]
    assert counter[0] == 1 and cache.stats.misses == 1
    second = ds[0]
    assert counter[0] == 1 and cache.stats.hits == 1  # served from disk, the volume was not read again
    fresh = ScanDataset([rec], pre, InputCache(tmp_path / "cache"))[0]  # a new process: disk hit
    assert counter[0] == 1
    assert first is not None and second is not None and fresh is not None
    served = preprocess(src.load(), pre)
    np.testing.assert_allclose(first.images, served.images, atol=1e-4)  # uint16 cache ≈ serving input
    np.testing.assert_array_equal(first.images, fresh.images)
    # a different preprocessing config is a different key
    other = PreprocessingConfig(**{**SMALL, "n_slices": 42})
    ScanDataset([rec], other, cache)[0]
    assert counter[0] == 3


def test_augmented_crop_equals_serving_window_at_zero_shift(tmp_path: Path) -> None:
    pre = PreprocessingConfig(**SMALL)
    src = CountingSource(2, [0])
    cache = InputCache(None)
    margin = train_margin(pre)
    assert margin == (2, 2)
    entry = cache.get(src.identity(), pre, src.load, margin=margin)
    served = preprocess(src.load(), pre)
    np.testing.assert_allclose(entry.window(pre), served.images, atol=1e-4)
    flipped = entry.window(pre, flip=True)
    np.testing.assert_allclose(flipped, served.images[..., ::-1], atol=1e-4)
    shifted = entry.window(pre, shift=(1, -2))
    assert shifted.shape == served.images.shape
    with pytest.raises(ValueError, match="exceeds the cached margin"):
        entry.window(pre, shift=(3, 0))


# --------------------------------------------------------------------------------------------------
# Bad data


def test_unreadable_volume_error_names_file_and_row(tmp_path: Path) -> None:
    pre = PreprocessingConfig(**SMALL)
    good = ScanRecord(
        "a", "p1", np.array([1.0], dtype=np.float32), CountingSource(3, [0]), "labels.csv: row 1 (line 2)"
    )
    broken = ScanRecord(
        "b", "p2", np.array([0.0], dtype=np.float32), BrokenSource("b.nii.gz"), "labels.csv: row 2 (line 3)"
    )
    with pytest.raises(
        DataError, match=r"labels\.csv: row 2 \(line 3\): cannot read b\.nii\.gz: b\.nii\.gz: truncated file"
    ):
        prepare([good, broken], pre, InputCache(None))
    with pytest.raises(DataError, match=r"labels\.csv: row 2 \(line 3\)"):
        ScanDataset([broken], pre, InputCache(None))[0]
    assert ScanDataset([broken], pre, InputCache(None), skip_bad=True)[0] is None


def test_training_skip_bad_goes_on_and_counts(tmp_path: Path) -> None:
    cfg = small_config(epochs=1)
    pre = PreprocessingConfig(**SMALL)
    recs = synthetic_records(
        design_studies(8, ("cardiomegaly", "pleural_effusion", "consolidation"), preprocessing=pre),
        REG,
        TASKS,
    )
    broken = ScanRecord(
        "bad",
        "SYN000001",
        np.array([1, 0, 0], dtype=np.float32),
        BrokenSource("bad.dcm"),
        "labels.csv: row 9 (line 10)",
    )
    with pytest.raises(DataError, match=r"row 9 \(line 10\): cannot read bad\.dcm"):
        train(cfg, tmp_path / "strict", records=[*recs, broken], tasks=TASKS)
    skip = load_config(None, ["data.skip_bad=true"], extra={**cfg.to_dict()})
    result = train(skip, tmp_path / "skip", records=[*recs, broken], tasks=TASKS)
    assert result.bad_samples == 1
    summary = json.loads((tmp_path / "skip" / "train_summary.json").read_text())
    assert summary["bad_samples"] == 1 and "row 9" in summary["bad_messages"][0]


# --------------------------------------------------------------------------------------------------
# The loop: outputs, resume


def _metrics(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_train_writes_outputs_and_resume_continues_identically(tmp_path: Path) -> None:
    cache = InputCache(None)
    straight = train(small_config(), tmp_path / "straight", cache=cache)
    out = tmp_path / "straight"
    for name in (
        "best.pt",
        "last.pt",
        "last_state.pt",
        "metrics.csv",
        "config.yaml",
        "splits.csv",
        "val_predictions.csv",
    ):
        assert (out / name).is_file(), name
    rows = _metrics(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[1]["lr"]) < float(rows[0]["lr"])  # cosine, stepped per epoch
    keys, tasks, labels, scores = read_predictions(out / "val_predictions.csv")
    assert tasks == TASKS and len(keys) == straight.splits["val"]
    assert np.all(np.isfinite(scores[labels != -1]))
    with (out / "splits.csv").open() as fh:
        split_rows = list(csv.DictReader(fh))
    by_patient: dict[str, set[str]] = {}
    for r in split_rows:
        by_patient.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(v) == 1 for v in by_patient.values())
    resolved = load_config(out / "config.yaml")
    assert resolved.to_dict() == small_config().to_dict()

    # a run killed after epoch 1, then resumed: epoch 2 must match the straight run exactly
    run = tmp_path / "resumed"
    with pytest.raises(_Stop):
        train(small_config(), run, cache=cache, on_epoch=_stop_after_first)
    assert [r["epoch"] for r in _metrics(run / "metrics.csv")] == ["1"]
    resumed = train(small_config(), run, cache=cache, resume=True)
    a, b = _metrics(out / "metrics.csv"), _metrics(run / "metrics.csv")
    assert [r["epoch"] for r in b] == ["1", "2"]
    for key in ("train_loss", "val_mean_auroc", "lr", "train_samples"):
        assert a[1][key] == b[1][key], key
    assert resumed.best_epoch == straight.best_epoch


class _Stop(Exception):
    """Simulates a run killed after an epoch's checkpoints were written."""


def _stop_after_first(row: dict[str, object]) -> None:
    if row["epoch"] == 1:
        raise _Stop


# --------------------------------------------------------------------------------------------------
# Config and CLI


def test_config_overrides_and_errors(tmp_path: Path) -> None:
    cfg = load_config("demo", ["optimizer.lr=1e-3", "data.split.seed=7", "model.target_types=[q, v]"])
    assert cfg.optimizer.lr == 1e-3 and cfg.data.split.seed == 7 and cfg.model.target_types == ("q", "v")
    assert parse_override("optimizer.betas=[0.8, 0.9]") == ("optimizer.betas", [0.8, 0.9])
    with pytest.raises(ConfigError, match="optimizer: unknown key .lrr."):
        load_config(None, ["optimizer.lrr=1"])
    with pytest.raises(ConfigError, match="epochs: expected an integer"):
        load_config(None, ["epochs=two"])
    with pytest.raises(ConfigError, match=r"data\.split: train \+ val \+ test must be 1"):
        load_config(None, ["data.split.val=0.5"])
    with pytest.raises(ConfigError, match="preprocessing: unknown key"):
        load_config(None, ["data.kind=synthetic"], extra={"preprocessing": {"spacing": [1, 1, 1]}})
    with pytest.raises(ConfigError, match="data.root: is required for data.kind=ctrate"):
        load_config("paper")
    assert RunConfig().optimizer.betas == (0.9, 0.95) and RunConfig().epochs == 20  # paper defaults


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys, typer; from app.commands import train as t; app = typer.Typer(); "
        "app.command('train')(t.train); app.command('evaluate')(t.evaluate); app.command('baselines')(t.baselines); "
        "sys.argv = ['hyperct', *sys.argv[1:]]; app()"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_cli_help_and_bad_options_exit_2(tmp_path: Path) -> None:
    for cmd in ("train", "evaluate", "baselines"):
        res = _cli(cmd, "--help")
        assert res.returncode == 0, res.stderr
        assert "Usage" in res.stdout
    assert _cli("train", "demo", "--out", str(tmp_path), "--device", "tpu").returncode == 2
    assert _cli("train", "demo", "--out", str(tmp_path), "--epochs", "0").returncode == 2
    res = _cli("train", "demo", "--out", str(tmp_path), "--set", "optimizer.lrr=1")
    assert res.returncode == 2 and "optimizer: unknown key 'lrr'" in res.stderr
    res = _cli("baselines", "demo", "--out", str(tmp_path), "--methods", "mgda")
    assert res.returncode == 2


def test_command_module_does_not_import_torch_at_import() -> None:
    code = "import sys, app.commands.train; print(','.join(m for m in ('torch', 'training') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == ""


def test_train_images_subsamples_valid_images_only_and_reproducibly() -> None:
    """``data.train_images``: k of each scan's *valid* images, one from each z-third (stratified), in
    slice order, same draw for the same seed."""
    images = torch.arange(2 * 6, dtype=torch.float32).reshape(2, 6, 1, 1, 1).expand(2, 6, 3, 2, 2).clone()
    mask = torch.tensor([[True] * 6, [True, True, False, False, False, False]])
    out, m = subsample_images(images, mask, 3, np.random.default_rng(5))
    again, _ = subsample_images(images, mask, 3, np.random.default_rng(5))
    assert out.shape == (2, 3, 3, 2, 2) and torch.equal(out, again)
    first = out[0, :, 0, 0, 0].tolist()
    assert m[0].all() and first == sorted(first) and len(set(first)) == 3 and all(0 <= v < 6 for v in first)
    draws = [
        subsample_images(images, mask, 3, np.random.default_rng(s))[0][0, :, 0, 0, 0].tolist()
        for s in range(40)
    ]
    assert all(d[0] in (0, 1) and d[1] in (2, 3) and d[2] in (4, 5) for d in draws)  # one per stratum
    assert {d[0] for d in draws} == {0.0, 1.0}  # and random within it
    assert m[1].tolist() == [True, True, False]  # only 2 valid images: both kept, the rest masked out
    assert out[1, :2, 0, 0, 0].tolist() == [6.0, 7.0]
    with pytest.raises(ConfigError, match="data.train_images"):
        load_config(None, ["data.train_images=-1"])
