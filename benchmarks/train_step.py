"""Training-step benchmark: step time, images/s, the loader's time per batch and their ratio, one
validation pass, and the projected hours of a 20-epoch run on whatever device is present.

It runs the training loop's own code (``training.train.Stepper`` over ``train_loader``: disk cache →
crop + normalise → collate → pinned copy → bf16/fp32 step) on random cached scans of the real
geometry (55 images of 3 × 144², cached 164² with the augmentation margin), so the figures are the
ones ``hyperct train`` logs per epoch. The weights are random (``--config``: ``tiny`` = 2 layers,
hidden 32; ``demo``; ``vitb16`` = ViT-B/16, the paper's backbone), which does not change the cost.
The cache files were just written, so they are read from the page cache: a run whose cache (≈ 210
GiB for CT-RATE) does not fit in memory also waits for the disk.

Projection: ``steps × (step + loader wait)`` per epoch (the time the loop really spends per batch),
20 epochs of 18,213 and of 24,128 (CT-RATE, one reconstruction per scan) training scans, plus
validation (every epoch: ``val scans × 18 tasks`` pairs, one backbone pass each, spec §7; val scans
= 1/7 of the training scans for a 70/10/20 split, 1/9 for CT-RATE's official split).

    .venv/bin/python benchmarks/train_step.py --config tiny --steps 4            # CPU smoke run, < 1 min
    .venv/bin/python benchmarks/train_step.py --config vitb16 --steps 40         # on a GPU: auto = bf16, workers
    .venv/bin/python benchmarks/train_step.py --config vitb16 --precision fp32 --workers 0 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("benchmarks.train_step")

EPOCHS = 20
RUNS = ((18_213, 7, "18,213 scans (70/10/20 split)"), (24_128, 9, "CT-RATE 24,128 scans (official split)"))
VAL_TASKS = 18


@dataclass(frozen=True)
class RandomScan:
    """A scan source that is always in the cache (the benchmark writes it there first)."""

    n: int

    def identity(self) -> str:
        return f"benchmark-random-scan:{self.n}"

    def describe(self) -> str:
        return self.identity()

    def load(self) -> Any:
        raise RuntimeError(f"{self.identity()} is not cached")


def _config(args: argparse.Namespace, tasks: list[str]) -> Any:
    from training.config import load_config

    overrides = [
        "data.kind=synthetic", f"model.backbone={args.config}", f"batch_size={args.batch}",
        f"eval_batch_size={args.eval_batch}", f"device={args.device}", f"precision={args.precision}",
        f"data.loader_workers={args.workers}", "data.augment=true", "progress=false", "seed=0",
        f"model.head_in_dim={args.head_in_dim}", f"data.tasks=[{', '.join(tasks)}]",
    ]  # fmt: skip
    return load_config(None, overrides)


def _cached_records(cfg: Any, n_scans: int, images: int, root: Path) -> tuple[list[Any], Any, Any]:
    """``n_scans`` random uint16 scans written to a disk cache as training entries (with margin)."""
    from training.cache import CachedInput, InputCache, train_margin
    from training.data import ScanRecord
    from training.train import preprocessing_config

    pre = preprocessing_config(cfg)
    margin = train_margin(pre)
    h, w = pre.image_size
    cache = InputCache(root)
    rng = np.random.default_rng(0)
    records = []
    for i in range(n_scans):
        scaled = rng.integers(0, 65535, (images, 3, h + 2 * margin[0], w + 2 * margin[1]), dtype=np.uint16)
        source = RandomScan(i)
        cache.put(source.identity(), pre, CachedInput(scaled, margin), margin=margin)
        labels = rng.integers(0, 2, len(cfg.data.tasks) or 1).astype(np.float32)
        records.append(ScanRecord(f"scan{i}", f"p{i}", labels, source, f"benchmark scan {i}"))
    return records, pre, cache


def _val_pair_ms(model: Any, cfg: Any, dp: Any, precision: str, images: int, reps: int) -> float:
    """One validation forward of ``eval_batch_size`` (scan, task) pairs, as ``predict`` runs it."""
    import torch

    from training.device import autocast
    from training.train import preprocessing_config

    h, w = preprocessing_config(cfg).image_size
    x = torch.randn((cfg.eval_batch_size, images, 3, h, w), device=dp.device)
    mask = torch.ones((cfg.eval_batch_size, images), dtype=torch.bool, device=dp.device)
    ids = torch.zeros(cfg.eval_batch_size, dtype=torch.long, device=dp.device)
    model.eval()
    times = []
    with torch.inference_mode():
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            with autocast(dp.device, precision):
                model(x, mask, ids).float().cpu()
            times.append(time.perf_counter() - t0)
    model.train()
    return 1000.0 * float(np.median(times[1:])) / cfg.eval_batch_size


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up epoch, then ``--epochs`` measured epochs of ``--steps`` steps each."""
    import torch

    from training.data import EpochBatches, ScanDataset
    from training.device import configure_cuda_math, resolve_device, resolve_loader_workers, resolve_precision
    from training.distributed import DataParallel
    from training.tasks import TaskRegistry
    from training.train import Stepper, build_model, make_optimizer, train_loader

    tasks = list(TaskRegistry.load().keys)[:VAL_TASKS]
    cfg = _config(args, tasks)
    dp = DataParallel(resolve_device(cfg.device))
    precision = resolve_precision(cfg.precision, dp.device)
    workers = resolve_loader_workers(cfg.data.loader_workers, dp.device)
    if dp.device.type == "cuda":
        configure_cuda_math(cfg.tf32)
    with tempfile.TemporaryDirectory(prefix="hyperct-train-step-") as tmp:
        records, pre, cache = _cached_records(cfg, args.batch * args.steps, args.images, Path(tmp))
        dataset = ScanDataset(records, pre, cache, augment=True, seed=0)
        batches = EpochBatches(len(dataset), args.batch, cfg.seed)
        loader = train_loader(dataset, batches, workers, cfg, dp.device)
        model = build_model(cfg, tasks).to(dp.device)
        opt = make_optimizer(model.trainable_parameters(), cfg, head=list(model.head.parameters()))
        ids = np.array([model.task_index(t) for t in tasks])
        stepper = Stepper(model, model.trainable_parameters(), opt, ids, cfg, precision, dp, workers)
        stats = []
        for epoch in range(args.epochs + 1):  # epoch 0 warms up (workers start, kernels are chosen)
            batches.set_epoch(epoch)
            stats.append(stepper.epoch(loader, batches, epoch))
        val_ms = _val_pair_ms(model, cfg, dp, precision, args.images, reps=2)
        peak = torch.cuda.max_memory_allocated(dp.device) / 2**30 if dp.device.type == "cuda" else None
    measured = stats[1]
    for s in stats[2:]:
        for f in measured.__dataclass_fields__:
            setattr(measured, f, getattr(measured, f) + getattr(s, f))
    row = measured.row(1, workers)
    return {
        "device": str(dp.device) if dp.device.type == "cpu" else torch.cuda.get_device_name(dp.device),
        "config": args.config,
        "precision": precision,
        "batch": args.batch,
        "images_per_scan": args.images,
        "loader_workers": workers,
        "steps_measured": measured.steps,
        **row,
        "val_pair_ms": round(val_ms, 2),
        "eval_batch_pairs": cfg.eval_batch_size,
        "peak_gpu_gib": None if peak is None else round(peak, 1),
    }


def project(result: dict[str, Any], batch: int) -> list[dict[str, Any]]:
    """Hours for :data:`EPOCHS` epochs of each run in :data:`RUNS` at the measured per-batch time."""
    per_batch_s = (result["step_ms"] + result["loader_wait_ms"]) / 1000.0
    out = []
    for scans, val_div, label in RUNS:
        steps = -(-scans // batch)
        val_pairs = round(scans / val_div) * VAL_TASKS
        train_h = EPOCHS * steps * per_batch_s / 3600
        val_h = EPOCHS * val_pairs * result["val_pair_ms"] / 1000.0 / 3600
        out.append({"run": label, "steps_per_epoch": steps, "train_hours": round(train_h, 2),
                    "val_hours": round(val_h, 2), "val_pairs_per_epoch": val_pairs})  # fmt: skip
    return out


def report(result: dict[str, Any], projection: list[dict[str, Any]]) -> None:
    ratio = result["loader_ratio"]
    print(f"device {result['device']}, backbone {result['config']}, precision {result['precision']}, "
          f"batch {result['batch']} x {result['images_per_scan']} images, {result['loader_workers']} loader "
          f"worker(s), {result['steps_measured']} steps measured")  # fmt: skip
    print(
        f"  train step          {result['step_ms']:9.1f} ms per batch   {result['images_per_s']:8.1f} images/s"
    )
    print(f"  loader              {result['loader_ms']:9.1f} ms per batch   (wait in the loop "
          f"{result['loader_wait_ms']:.1f} ms per batch)")  # fmt: skip
    print(f"  loader ratio        {ratio:9.2f}   step / loader time per batch; >= 1 keeps the device fed")
    print(f"  validation pass     {result['val_pair_ms']:9.1f} ms per (scan, task) pair "
          f"(batches of {result['eval_batch_pairs']} pairs, inference mode)")  # fmt: skip
    if result["peak_gpu_gib"] is not None:
        print(f"  peak GPU memory     {result['peak_gpu_gib']:9.1f} GiB")
    print(f"projected for {EPOCHS} epochs at {result['step_ms'] + result['loader_wait_ms']:.1f} ms per batch "
          "(step + loader wait):")  # fmt: skip
    for p in projection:
        print(f"  {p['run']:<40} {p['steps_per_epoch']:6d} steps/epoch  training {p['train_hours']:8.2f} h"
              f"  + validation {p['val_hours']:7.2f} h ({p['val_pairs_per_epoch']} pairs/epoch, "
              f"{p['val_hours'] / p['train_hours']:.2f}x training)")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny", help="backbone config: tiny, demo, tiny_demo, vitb16")
    ap.add_argument(
        "--head-in-dim", type=int, default=None, help="hypernetwork input (default: 32 tiny, 768 vitb16)"
    )
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--workers", default="auto", help="loader workers (auto: 0 on the CPU, more on CUDA)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--eval-batch", type=int, default=8, help="(scan, task) pairs per validation pass")
    ap.add_argument("--images", type=int, default=55, help="images per scan")
    ap.add_argument("--steps", type=int, default=8, help="steps per measured epoch")
    ap.add_argument("--epochs", type=int, default=1, help="measured epochs after one warm-up epoch")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if args.head_in_dim is None:
        args.head_in_dim = 768 if args.config == "vitb16" else 32
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    result = measure(args)
    projection = project(result, args.batch)
    report(result, projection)
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.json:
        args.json.write_text(
            json.dumps({**result, "projection": projection}, indent=2) + "\n", encoding="utf-8"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
