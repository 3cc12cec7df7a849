"""Training at the speed of the card (issue #13), on the CPU: device and precision resolution, the
epoch's batches split over processes, and data-parallel training under torchrun (2 processes, gloo)
on the tiny synthetic config of ``test_training``."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_training import ROOT, TASKS, _cli, small_config
from training.config import ConfigError, load_config
from training.data import EpochBatches, choose_tasks, epoch_seed, sample_tasks
from training.device import autocast, resolve_device, resolve_loader_workers, resolve_precision
from training.model import load_checkpoint

CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# Device, precision, loader workers


def test_precision_auto_is_fp32_on_the_cpu_and_bf16_on_cuda() -> None:
    assert load_config(None, ["data.kind=synthetic"]).precision == "auto"  # the default
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("auto", torch.device("cuda", 0)) == "bf16"  # resolution only, no device needed
    assert resolve_precision("fp32", torch.device("cuda", 0)) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"  # explicit: taken as given (with a warning)
    with autocast(CPU, "auto"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(CPU, "bf16"):
        assert torch.is_autocast_enabled("cpu")
    assert load_config("paper", ["data.root=/x"]).precision == "fp32"  # the paper keeps the code's fp32
    assert load_config("paper", ["data.root=/x"]).tf32 is False
    assert load_config("ctrate", ["data.root=/x"]).precision == "auto"


def test_bad_precision_device_and_workers_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match=r"^precision: must be auto, fp32 or bf16, got 'fp16'$"):
        load_config(None, ["data.kind=synthetic", "precision=fp16"])
    with pytest.raises(ConfigError, match="precision: must be auto, fp32 or bf16"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ConfigError, match=r"data\.loader_workers: must be auto or an integer >= 0, got -1"):
        load_config(None, ["data.kind=synthetic", "data.loader_workers=-1"])
    assert resolve_loader_workers("auto", CPU) == 0
    assert resolve_loader_workers(3, CPU) == 3
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else CPU)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device: 'cuda' requested but torch sees no CUDA device"):
            resolve_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_cuda_without_cuda_and_unknown_precision_exit_2(tmp_path: Path) -> None:
    res = _cli("train", "demo", "--out", str(tmp_path), "--device", "cuda")
    assert res.returncode == 2
    assert "error: device: 'cuda' requested but torch sees no CUDA device" in res.stderr
    assert "Traceback" not in res.stderr
    res = _cli("train", "demo", "--out", str(tmp_path), "--precision", "fp16")
    assert res.returncode == 2 and "fp16" in res.stderr


# --------------------------------------------------------------------------------------------------
# The epoch's batches on 1 or N processes


def test_processes_split_every_global_batch_and_draw_the_same_tasks() -> None:
    """Each process takes a contiguous part of every single-process batch: together they see each scan
    once per epoch, in the single-process batches; the task draws follow the global position."""
    single = EpochBatches(23, 5, seed=7)
    parts = [EpochBatches(23, 5, seed=7, rank=r, world=3) for r in range(3)]
    for epoch in (0, 4):
        for b in (single, *parts):
            b.set_epoch(epoch)
        expected = single.global_batches()
        order = np.random.default_rng(epoch_seed(7, epoch, 1)).permutation(23).tolist()
        assert sum(expected, []) == order  # the order the loop always used
        per_rank = [list(p) for p in parts]
        assert all(len(steps) == len(expected) == len(single) for steps in per_rank)
        for step, batch in enumerate(expected):
            joined = [i for r in range(3) for (e, i) in per_rank[r][step] if e == epoch]
            assert joined == batch
        assert sorted(i for steps in per_rank for part in steps for _, i in part) == list(range(23))
    labels = np.array([[1, 0, -1], [-1, -1, -1], [0, -1, 1], [1, 1, 1]], dtype=np.float32)
    u = np.random.default_rng(3).random(4)
    whole = choose_tasks(labels, u)
    assert [x.tolist() for x in whole] == [x.tolist() for x in sample_tasks(labels, np.random.default_rng(3))]
    tail = choose_tasks(labels[2:], u[2:])  # another process's part: same tasks for the same scans
    assert tail[1].tolist() == whole[1][-2:].tolist()


# --------------------------------------------------------------------------------------------------
# torchrun: 2 processes, gloo, the CLI

# Runs `hyperct train` as torchrun starts it, recording which (epoch, scan) each process loads.
DRIVER = """
import json, os, sys
from training.data import dataset

_getitem = dataset.ScanDataset.__getitem__

def _recording(self, key):
    if isinstance(key, tuple):  # training keys are (epoch, index)
        with open(os.path.join(os.environ["RECORD_DIR"], f"rank{os.environ['RANK']}.jsonl"), "a") as fh:
            fh.write(json.dumps(list(key)) + "\\n")
    return _getitem(self, key)

dataset.ScanDataset.__getitem__ = _recording
from app.cli import main
sys.argv = ["hyperct", *sys.argv[1:]]
main()
"""


def _torchrun(tmp: Path, recipe: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    driver = tmp / "driver.py"
    driver.write_text(DRIVER, encoding="utf-8")
    records = out.with_name(out.name + "-records")
    records.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RECORD_DIR": str(records), "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(driver), "train", str(recipe), "--out", str(out), *args]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _loaded(records: Path, rank: int) -> list[tuple[int, int]]:
    lines = (records / f"rank{rank}.jsonl").read_text().splitlines()
    return [tuple(json.loads(line)) for line in lines]  # type: ignore[misc]


@pytest.mark.slow
def test_torchrun_two_processes_train_resume_and_write_once(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    cfg = small_config(**{"data.cache_dir": str(tmp_path / "cache"), "batch_size": 5, "schedule.t_max": 2,
                          "data.synthetic.n_studies": 20})  # fmt: skip
    recipe = cfg.save(tmp_path / "recipe.yaml")
    straight, run = tmp_path / "straight", tmp_path / "run"

    res = _torchrun(tmp_path, recipe, straight)
    summary = json.loads(res.stdout)  # rank 0 alone prints the summary
    assert summary["best_checkpoint"] == "best.pt" and summary["tasks"] == TASKS
    for name in ("best.pt", "last.pt", "last_state.pt", "metrics.csv", "config.yaml", "splits.csv",
                 "val_predictions.csv", "train_summary.json"):  # fmt: skip
        assert (straight / name).is_file(), name
    model, extra = load_checkpoint(straight / "best.pt")
    assert list(model.task_keys) == TASKS and extra["epoch"] == summary["best_epoch"]
    assert load_checkpoint(straight / "last.pt")[1]["epoch"] == 2
    info = json.loads((straight / "train_summary.json").read_text())
    assert info["processes"] == 2 and info["precision"] == "fp32" and info["device"] == "cpu"

    n_train = sum(1 for r in _rows(straight / "splits.csv") if r["split"] == "train")
    rows = _rows(straight / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for r in rows:
        assert int(r["train_samples"]) == n_train  # every scan has a valid task here
        assert float(r["loader_ratio"]) > 0 and float(r["step_ms"]) > 0 and float(r["images_per_s"]) > 0
    # each epoch: every training scan exactly once over the two processes, in the single-process batches
    records = straight.with_name("straight-records")
    for epoch in (0, 1):
        seen = {rank: [i for e, i in _loaded(records, rank) if e == epoch] for rank in (0, 1)}
        assert sorted(seen[0] + seen[1]) == list(range(n_train)), epoch
        for rank in (0, 1):
            expected = EpochBatches(n_train, 5, cfg.seed, rank=rank, world=2)
            expected.set_epoch(epoch)
            assert seen[rank] == [i for part in expected for _, i in part]

    # killed after epoch 1 (here: a run of 1 epoch), then resumed: epoch 2 as in the straight run
    _torchrun(tmp_path, recipe, run, "--epochs", "1")
    assert [r["epoch"] for r in _rows(run / "metrics.csv")] == ["1"]
    _torchrun(tmp_path, recipe, run, "--resume")
    resumed = _rows(run / "metrics.csv")
    assert [r["epoch"] for r in resumed] == ["1", "2"]
    for key in ("train_loss", "val_mean_auroc", "lr", "train_samples"):
        assert [r[key] for r in resumed] == [r[key] for r in rows], key
    loaded = _loaded(run.with_name("run-records"), 0) + _loaded(run.with_name("run-records"), 1)
    assert sorted(i for e, i in loaded if e == 1) == list(
        range(n_train)
    )  # epoch 2 ran once, after the resume
    assert sorted(i for e, i in loaded if e == 0) == list(range(n_train))  # and epoch 1 was not repeated
    assert torch.load(run / "last_state.pt", weights_only=True)["epoch"] == 2
    print(f"3 torchrun launches in {time.perf_counter() - t0:.1f} s")


# --------------------------------------------------------------------------------------------------
# On a GPU (`make test-gpu`; never in CI)


@pytest.mark.gpu
def test_cuda_trains_under_bf16_autocast_with_tf32_and_reports_the_loader_ratio(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Runs only with ``-m gpu`` (``make test-gpu``; never CI coverage). On a GPU host, no CUDA in
    torch is a failure (the one-line device error), not a skip."""
    from training.cache import InputCache
    from training.model import HyperCT
    from training.train import train

    seen: list[tuple[bool, torch.dtype, str]] = []
    forward = HyperCT.forward

    def spy(self: HyperCT, images: torch.Tensor, mask: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        if self.training:
            seen.append(
                (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"), images.device.type)
            )
        return forward(self, images, mask, task_ids)

    monkeypatch.setattr(HyperCT, "forward", spy)
    caplog.set_level("INFO", logger="training")
    cfg = small_config(device="cuda", **{"data.loader_workers": 2})
    train(cfg, tmp_path / "run", cache=InputCache(None))
    assert seen and all(on and dtype == torch.bfloat16 and where == "cuda" for on, dtype, where in seen)
    assert torch.get_float32_matmul_precision() == "high"
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert "TF32 matmuls and cuDNN convolutions on" in caplog.text
    info = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert info["precision"] == "bf16" and info["loader_workers"] == 2 and info["device"].startswith("cuda")
    with (tmp_path / "run" / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert all(float(r["loader_ratio"]) > 0 and float(r["step_ms"]) > 0 for r in rows)
    assert "ratio" in caplog.text
