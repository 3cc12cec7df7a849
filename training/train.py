"""``hyperct train``: the HyperCT training loop (spec §6) with resumable checkpoints.

Per step: the padded batch goes through the model with **one valid task per scan**, drawn uniformly
from that scan's tasks with a label (scans without any are dropped from the batch); loss =
``BCEWithLogits`` averaged over the kept scans; AdamW (lr 1e-5, betas 0.9/0.95, wd 0); cosine schedule
stepped once per epoch. After each epoch the validation split is scored on every valid (scan, task)
pair and the epoch with the best **unweighted mean validation AUROC** is kept as ``best.pt``.

Speed (issue #13; docs/training.md §5): bf16 autocast and TF32 on CUDA by default
(:mod:`training.device`), loader workers with pinned memory and prefetch, the loader-vs-step ratio
measured every epoch, and data-parallel training over the processes ``torchrun`` starts
(:mod:`training.distributed`): each trains on its part of every batch, rank 0 writes the files.

Reproducibility: every random draw of an epoch (order, task sampling, augmentation, hypernetwork
dropout) comes from generators seeded by ``(seed, epoch)``, so a run resumed from ``last.pt`` repeats
the epochs it would have run, bit for bit on the same machine and thread count.

Outputs in ``out_dir`` (docs/training.md §Outputs): ``best.pt``, ``last.pt`` + ``last_state.pt``,
``metrics.csv``, ``config.yaml`` (resolved), ``splits.csv``, ``val_predictions.csv`` (best epoch),
``train_summary.json``.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from operators.preprocessing import PreprocessingConfig
from training.backbone import FrozenBackbone, build_backbone
from training.cache import InputCache
from training.config import ConfigError, RunConfig
from training.data import (
    SPLITS,
    BadData,
    Batch,
    DataError,
    EpochBatches,
    ScanDataset,
    ScanRecord,
    build_records,
    choose_tasks,
    collate,
    epoch_seed,
    prepare,
    resolve_tasks,
    split_records,
)
from training.device import (
    autocast,
    configure_cuda_math,
    resolve_loader_workers,
    resolve_precision,
)
from training.distributed import DataParallel, data_parallel
from training.metrics import auroc
from training.model import HyperCT, build_hyperct, load_checkpoint, save_checkpoint
from training.pretext import PretextResult, pretrain_backbone
from training.tasks import TaskRegistry

logger = logging.getLogger(__name__)

BEST, LAST, STATE = "best.pt", "last.pt", "last_state.pt"
METRICS_CSV, CONFIG_YAML, SPLITS_CSV = "metrics.csv", "config.yaml", "splits.csv"
VAL_PREDICTIONS, SUMMARY = "val_predictions.csv", "train_summary.json"


# --------------------------------------------------------------------------------------------------
# Small helpers


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def preprocessing_config(cfg: RunConfig) -> PreprocessingConfig:
    return PreprocessingConfig(**cfg.preprocessing) if cfg.preprocessing else PreprocessingConfig()


def build_model(cfg: RunConfig, tasks: Sequence[str], backbone: FrozenBackbone | None = None) -> HyperCT:
    """HyperCT over ``tasks`` (its task table has one row per task; ids via ``model.task_index``).

    ``backbone`` (e.g. after the pretext warm start) replaces the one the config names."""
    m = cfg.model
    source: dict[str, Any]
    if backbone is not None:
        source = {"backbone": backbone}
    elif m.backbone_path:
        source = {"backbone_path": m.backbone_path}
    else:
        source = {"backbone_config": m.backbone}
    return build_hyperct(
        **source,
        task_keys=list(tasks),
        lora_scale=m.lora_scale,
        seed=cfg.seed,
        attn_implementation=m.attn_implementation,
        head_in_dim=m.head_in_dim,
        rank=m.rank,
        zero_init_b=m.zero_init_b,
        target_types=tuple(m.target_types),
        dropout=m.dropout,
    )


def make_optimizer(
    params: Sequence[nn.Parameter], cfg: RunConfig, head: Sequence[nn.Parameter] = ()
) -> torch.optim.Optimizer:
    """AdamW; ``head`` parameters get ``optimizer.head_lr`` when it is set (else everything uses ``lr``)."""
    o = cfg.optimizer
    head_ids = {id(p) for p in head}
    groups: list[dict[str, Any]] = [{"params": [p for p in params if id(p) not in head_ids]}]
    if head_ids:
        groups.append({"params": [p for p in params if id(p) in head_ids], "lr": o.head_lr or o.lr})
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: RunConfig) -> torch.optim.lr_scheduler.LRScheduler:
    s = cfg.schedule
    if s.kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.t_max or cfg.epochs, eta_min=s.eta_min)
    if s.kind == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=s.step_size, gamma=s.gamma)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


class _Progress:
    """tqdm bar when enabled and installed; silent otherwise (CI logs stay readable)."""

    def __init__(self, enabled: bool, total: int, desc: str) -> None:
        self.bar: Any = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)
            except ImportError:  # pragma: no cover - tqdm is in the train extra
                self.bar = None

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _tensorboard(out_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional and not installed by default
        logger.debug("tensorboard not installed; metrics go to metrics.csv only")
        return None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


# --------------------------------------------------------------------------------------------------
# Prediction


def predict(
    model: HyperCT,
    dataset: ScanDataset,
    tasks: Sequence[str],
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    only_valid: bool = True,
    workers: int = 0,
    progress: bool = False,
    indices: Sequence[int] | None = None,
) -> np.ndarray:
    """Sigmoid probabilities ``[n_scans, K]`` for ``tasks``; NaN where not scored.

    One backbone pass per (scan, task) pair (spec §7); with ``only_valid`` only pairs with a valid
    label are scored (what metrics use). ``indices``: score only these scans (a process's shard of
    the validation split); the other rows stay NaN. Eval mode: the hypernetwork caches each task's
    factors. A scan's images are copied to the device once (pinned, asynchronously) and repeated
    there for its tasks; ``batch_size`` counts (scan, task) pairs. Inference mode and the run's
    autocast make a pass cheaper than a training forward.
    """
    device = torch.device(device)
    model.eval()
    labels = dataset.labels()
    n, k = len(dataset), len(tasks)
    scores = np.full((n, k), np.nan, dtype=np.float64)
    wanted_scans = list(range(n)) if indices is None else list(indices)
    if not wanted_scans:
        return scores
    ids = [model.task_index(t) for t in tasks]
    loader = DataLoader(dataset, batch_size=1, sampler=wanted_scans, collate_fn=collate, num_workers=workers,
                        pin_memory=device.type == "cuda")  # fmt: skip
    pending: list[tuple[torch.Tensor, torch.Tensor, int, int]] = []
    bar = _Progress(progress, len(wanted_scans), "predict")

    def flush() -> None:
        if not pending:
            return
        n_max = max(p[0].shape[0] for p in pending)
        images = torch.zeros(
            (len(pending), n_max, *pending[0][0].shape[1:]), dtype=torch.float32, device=device
        )
        mask = torch.zeros((len(pending), n_max), dtype=torch.bool, device=device)
        for b, (img, msk, _, _) in enumerate(pending):
            images[b, : img.shape[0]] = img
            mask[b, : msk.shape[0]] = msk
        task_ids = torch.tensor([ids[p[3]] for p in pending], dtype=torch.long, device=device)
        with autocast(device, precision):
            logits = model(images, mask, task_ids)
        probs = torch.sigmoid(logits.float()).cpu().numpy()
        for (_, _, i, j), p in zip(pending, probs, strict=True):
            scores[i, j] = float(p)
        pending.clear()

    with torch.inference_mode():
        for batch in loader:
            bar.update()
            if len(batch) == 0:
                continue
            i = int(batch.index[0])
            scan = batch.images[0].to(device, non_blocking=True)
            scan_mask = batch.mask[0].to(device, non_blocking=True)
            for j in (j for j in range(k) if not only_valid or labels[i, j] != -1):
                pending.append((scan, scan_mask, i, j))
                if len(pending) >= batch_size:
                    flush()
        flush()
    model.hypernet.clear_cache()  # its factors are inference tensors: never reuse them outside
    bar.close()
    return scores


def mean_auroc(
    labels: np.ndarray, scores: np.ndarray, tasks: Sequence[str]
) -> tuple[float, dict[str, float | None]]:
    """Per-task AUROC on valid labels and their unweighted mean over computable tasks (NaN if none)."""
    per: dict[str, float | None] = {}
    for j, t in enumerate(tasks):
        ok = (labels[:, j] != -1) & np.isfinite(scores[:, j])
        per[t] = auroc(labels[ok, j], scores[ok, j]) if ok.any() else None
    vals = [v for v in per.values() if v is not None]
    return (float(np.mean(vals)) if vals else math.nan), per


def subsample_images(
    images: torch.Tensor, mask: torch.Tensor, k: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per scan, ``k`` of its valid images, one drawn from each of ``k`` equal runs of consecutive
    images (stratified along z, in slice order) → ``[B, k, ...]``.

    ``data.train_images`` (training only). Stratifying makes the subset's mean a low-variance estimate
    of the whole scan's: a finding confined to the lung bases is seen in every step instead of in a
    random number of draws (docs/training.md §8). A scan with fewer valid images keeps all of them,
    padded with masked-out rows. One draw per scan from ``rng``, so a resumed epoch repeats it.
    ``images`` may already be on the training device; ``mask`` is on the CPU.
    """
    b, n = mask.shape
    if k >= n:
        return images, mask
    out = images.new_zeros((b, k, *images.shape[2:]))
    out_mask = torch.zeros((b, k), dtype=torch.bool)
    for i in range(b):
        valid = np.flatnonzero(mask[i].numpy())
        if valid.size <= k:
            pick = valid
        else:
            edges = np.linspace(0, valid.size, k + 1).astype(int)
            pick = valid[rng.integers(edges[:-1], edges[1:])]
        out[i, : pick.size] = images[i, torch.from_numpy(pick)]
        out_mask[i, : pick.size] = True
    return out, out_mask


# --------------------------------------------------------------------------------------------------
# Results


@dataclass
class TrainResult:
    """Where a run wrote its outputs and how it went."""

    out_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    tasks: list[str]
    best_epoch: int
    best_val_auroc: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    bad_samples: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    #: This process's rank under torchrun (0 alone writes files; 0 for a single process).
    rank: int = 0


def _write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        return
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    os.replace(tmp, path)


def write_predictions(
    path: Path, records: Sequence[ScanRecord], tasks: Sequence[str], scores: np.ndarray
) -> Path:
    """CSV: ``key, patient_id``, then ``label:<task>`` (1/0/-1) and ``score:<task>`` (probability or empty)."""
    rows = []
    for i, r in enumerate(records):
        row: dict[str, Any] = {"key": r.key, "patient_id": r.patient_id}
        for j, t in enumerate(tasks):
            row[f"label:{t}"] = int(r.labels[j])
        for j, t in enumerate(tasks):
            row[f"score:{t}"] = "" if not np.isfinite(scores[i, j]) else f"{scores[i, j]:.8g}"
        rows.append(row)
    _write_rows(path, rows)
    return path


def read_predictions(path: str | Path) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """``(keys, tasks, labels [n, K], scores [n, K])`` from :func:`write_predictions` output."""
    with Path(path).open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        tasks = [f.split(":", 1)[1] for f in fields if f.startswith("label:")]
        keys, labels, scores = [], [], []
        for row in reader:
            keys.append(row["key"])
            labels.append([float(row[f"label:{t}"]) for t in tasks])
            scores.append([float(row[f"score:{t}"]) if row[f"score:{t}"] else math.nan for t in tasks])
    k = len(tasks)
    return (
        keys,
        tasks,
        np.asarray(labels, dtype=float).reshape(-1, k),
        np.asarray(scores, dtype=float).reshape(-1, k),
    )


# --------------------------------------------------------------------------------------------------
# Data plumbing shared with evaluate/baselines


@dataclass
class PreparedData:
    """Records per split, the task list and the cache: everything a run's data needs."""

    tasks: list[str]
    splits: dict[str, list[ScanRecord]]
    cache: InputCache
    preprocessing: PreprocessingConfig
    bad: BadData


def make_cache(cfg: RunConfig, out_dir: Path) -> InputCache:
    where = cfg.data.cache_dir
    if where == "memory" or (where is None and cfg.data.kind == "synthetic"):
        return InputCache(None)
    return InputCache(Path(where) if where else out_dir / "cache")


def prepare_data(
    cfg: RunConfig,
    out_dir: Path,
    *,
    registry: TaskRegistry | None = None,
    records: Sequence[ScanRecord] | None = None,
    tasks: Sequence[str] | None = None,
    cache: InputCache | None = None,
    progress: bool = False,
    dp: DataParallel | None = None,
) -> PreparedData:
    """Records → patient split → cache filled (train entries with the augmentation margin).

    Under data parallelism (``dp``) a disk cache is filled by rank 0 alone while the others wait,
    then they find every entry there (no two processes preprocess the same volume); an in-memory
    cache belongs to its process, so each fills its own."""
    registry = registry or TaskRegistry.load()
    bad = BadData(skip=cfg.data.skip_bad)
    task_list = list(tasks) if tasks is not None else resolve_tasks(cfg.data, registry)
    if not task_list:
        raise DataError("no task to train: the label files name none of the registry's tasks")
    pre = preprocessing_config(cfg)
    recs = list(records) if records is not None else build_records(cfg.data, registry, task_list, bad, pre)
    usable = [r for r in recs if r.n_valid > 0]
    if len(usable) < len(recs):
        logger.info("%d scans have no valid label for the trained tasks; not used", len(recs) - len(usable))
    splits = split_records(usable, cfg.data.split, cfg.data.kind)
    cache = cache or make_cache(cfg, out_dir)
    dp = dp or DataParallel(torch.device("cpu"))
    if cache.root is None:
        splits = _fill_cache(cfg, splits, pre, cache, bad, progress=progress and dp.is_main)
    else:
        splits = dp.main_first(
            lambda: _fill_cache(cfg, splits, pre, cache, bad, progress=progress and dp.is_main)
        )
    if not splits["train"]:
        raise DataError("the training split is empty")
    return PreparedData(task_list, splits, cache, pre, bad)


def _fill_cache(
    cfg: RunConfig,
    splits: dict[str, list[ScanRecord]],
    pre: PreprocessingConfig,
    cache: InputCache,
    bad: BadData,
    *,
    progress: bool,
) -> dict[str, list[ScanRecord]]:
    """Every split's records in the cache; returns the readable ones per split."""
    bar = _Progress(progress, sum(len(v) for v in splits.values()), "cache")
    last = [0]

    def tick(done: int, total: int) -> None:
        bar.update(done - last[0])
        last[0] = done

    readable = {}
    for name in SPLITS:
        last[0] = 0  # prepare counts each split from zero
        readable[name] = prepare(
            splits[name],
            pre,
            cache,
            augment=cfg.data.augment and name == "train",
            workers=cfg.data.workers,
            bad=bad,
            progress=tick if progress else None,
        )
    bar.close()
    return readable


def pretext_images(dataset: ScanDataset, per_scan: int, seed: int) -> np.ndarray:
    """Up to ``per_scan`` random valid images of every scan in ``dataset`` (no labels), as float16."""
    rng = np.random.default_rng(seed)
    chunks: list[np.ndarray] = []
    for i in range(len(dataset)):
        sample = dataset[i]
        if sample is None or sample.images.shape[0] == 0:
            continue
        n = sample.images.shape[0]
        pick = np.sort(rng.choice(n, size=min(per_scan, n), replace=False))
        chunks.append(sample.images[pick].astype(np.float16))
    if not chunks:
        raise DataError("model.pretext: the training split has no readable images")
    return np.concatenate(chunks)


def warm_start_backbone(cfg: RunConfig, train_ds: ScanDataset) -> tuple[FrozenBackbone, PretextResult]:
    """The config backbone after the label-free pretext on training-split images (training.pretext)."""
    m = cfg.model
    backbone = build_backbone(m.backbone, seed=cfg.seed, attn_implementation=m.attn_implementation)
    images = pretext_images(train_ds, m.pretext.images_per_scan, cfg.seed)
    bar = _Progress(cfg.progress, m.pretext.steps, "pretext")
    result = pretrain_backbone(backbone.vit, images, m.pretext, seed=cfg.seed, preprocessing=train_ds.preprocessing,
                               progress=lambda _d, _t, loss: bar.update(loss=f"{loss:.4f}"))  # fmt: skip
    bar.close()
    return backbone, result


def _training_data_summary(cfg: RunConfig, data: PreparedData) -> dict[str, Any]:
    d = cfg.data
    out: dict[str, Any] = {
        "kind": d.kind,
        "scans": {s: len(v) for s, v in data.splits.items()},
        "patients": {s: len({r.patient_id for r in v}) for s, v in data.splits.items()},
        "split_seed": d.split.seed,
    }
    if d.kind == "synthetic":
        out["description"] = "synthetic phantoms rendered in memory (synth); no patient data"
        out["synthetic"] = {
            "findings": list(d.synthetic.findings),
            "n_studies": d.synthetic.n_studies,
            "seed": d.synthetic.seed,
            "twins": d.synthetic.twins,
            "geometry": d.synthetic.geometry,
        }
    return out


# --------------------------------------------------------------------------------------------------
# The loop


def _state_payload(
    epoch: int,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    best: dict[str, Any],
    history: list[dict[str, Any]],
    tasks: Sequence[str],
) -> dict[str, Any]:
    np_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]  # the legacy tuple
    return {
        "epoch": epoch,
        "tasks": list(tasks),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "best": dict(best),
        "history": history,
        "rng": {
            "python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(),
        },
    }


def _restore_rng(state: dict[str, Any]) -> None:
    rng = state.get("rng") or {}
    if "python" in rng:
        py = rng["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in rng:
        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])


@dataclass
class EpochStats:
    """What the training loop measured in one epoch; summed over processes by :meth:`summed`.

    ``step_s``: time from having a batch to the end of its optimiser step (the device synchronised by
    reading the loss). ``wait_s``: time the loop waited for the loader. ``load_s``: time the loader
    spent building the batches (in its workers, in parallel), from :attr:`Batch.load_seconds`."""

    loss_sum: float = 0.0
    samples: int = 0
    dropped: int = 0
    bad: int = 0
    steps: int = 0
    batches: int = 0
    images: int = 0
    step_s: float = 0.0
    wait_s: float = 0.0
    load_s: float = 0.0

    def summed(self, dp: DataParallel) -> EpochStats:
        values = dp.all_sum([getattr(self, f) for f in self.__dataclass_fields__])
        return EpochStats(
            *[type(getattr(self, f))(v) for f, v in zip(self.__dataclass_fields__, values, strict=True)]
        )

    def loader_ratio(self, workers: int) -> float | None:
        """Step time / the loader's time per batch (its workers build batches in parallel): ≥ 1 means
        the loader builds batches at least as fast as the device consumes them."""
        if not (self.steps and self.batches and self.load_s > 0):
            return None
        return (self.step_s / self.steps) / (self.load_s / self.batches / max(1, workers))

    def row(self, world: int, workers: int) -> dict[str, Any]:
        """The epoch's ``metrics.csv`` timing columns (per process, averaged over processes)."""
        ratio = self.loader_ratio(workers)
        per_batch = 1000.0 / self.batches if self.batches else math.nan
        return {
            "step_ms": round(1000.0 * self.step_s / self.steps, 2) if self.steps else None,
            "loader_ms": round(self.load_s * per_batch / max(1, workers), 2) if self.batches else None,
            "loader_wait_ms": round(self.wait_s * per_batch, 2) if self.batches else None,
            "loader_ratio": None if ratio is None else round(ratio, 3),
            "images_per_s": round(self.images * world / self.step_s, 1) if self.step_s > 0 else None,
        }


@dataclass
class Stepper:
    """Optimiser steps on this process's part of each global batch (the same steps on 1 or N processes).

    Streams: the task draw is made per position of the *global* batch from one generator every
    process shares, so a scan gets the same task whichever process trains it. Hypernetwork dropout
    and ``data.train_images`` subsets draw per step from per-process generators (rank 0's is the
    single-process one), so those draws differ between 1 and N processes."""

    net: nn.Module
    params: list[nn.Parameter]
    opt: torch.optim.Optimizer
    task_ids: np.ndarray
    cfg: RunConfig
    precision: str
    dp: DataParallel
    workers: int
    #: ``data.task_weights`` per task column (None: uniform, the paper)
    draw_weights: np.ndarray | None = None
    loss_fn: nn.Module = field(default_factory=nn.BCEWithLogitsLoss)

    def epoch(
        self, loader: DataLoader, batches: EpochBatches, epoch: int, bar: _Progress | None = None
    ) -> EpochStats:
        """One pass over ``loader`` (this process's parts of ``batches``' global batches for ``epoch``)."""
        bar = bar or _Progress(False, 0, "")
        seed, extra = self.cfg.seed, ((self.dp.rank,) if self.dp.rank else ())
        torch.manual_seed(epoch_seed(seed, epoch, 0, *extra))  # hypernetwork dropout
        task_rng = np.random.default_rng(epoch_seed(seed, epoch, 2))
        image_rng = np.random.default_rng(epoch_seed(seed, epoch, 3, *extra))
        stats = EpochStats()
        t_prev = time.perf_counter()
        for batch, members in zip(loader, batches.global_batches(), strict=True):
            t_got = time.perf_counter()
            stats.wait_s += t_got - t_prev
            stats.load_s += batch.load_seconds
            stats.batches += 1
            stats.bad += batch.dropped_bad
            keep, cols, target = choose_tasks(
                batch.labels.numpy(), _draws_for(batch, members, task_rng), self.draw_weights
            )
            stats.dropped += len(batch) - keep.size
            n_global = int(self.dp.all_sum([keep.size])[0]) if self.dp.distributed else keep.size
            if n_global:
                loss, images = (self._step(batch, keep, cols, target, n_global, image_rng) if keep.size
                                else self._idle_step())  # fmt: skip
                stats.loss_sum += loss * keep.size
                stats.samples += keep.size
                stats.images += images
                stats.steps += 1
                stats.step_s += time.perf_counter() - t_got
                postfix = {"loss": f"{loss:.4f}"}
                ratio = stats.loader_ratio(self.workers)
                if ratio is not None:
                    postfix["loader"] = f"{ratio:.2f}x"
                bar.update(1, **postfix)
            else:
                bar.update()
            t_prev = time.perf_counter()
        return stats

    def _step(self, batch: Batch, keep: np.ndarray, cols: np.ndarray, target: np.ndarray, n_global: int,
              image_rng: np.random.Generator) -> tuple[float, int]:  # fmt: skip
        """Forward/backward/step on the kept scans; returns (mean loss, images seen)."""
        device = self.dp.device
        images, mask = batch.images.to(device, non_blocking=True), batch.mask
        if keep.size < len(batch):
            idx = torch.from_numpy(keep)
            images, mask = images[idx.to(device)], mask[idx]
        if self.cfg.data.train_images:
            images, mask = subsample_images(images, mask, self.cfg.data.train_images, image_rng)
        n_images = int(mask.sum())
        ids = torch.from_numpy(self.task_ids[cols]).to(device, non_blocking=True)
        y = torch.from_numpy(target).to(device, non_blocking=True)
        with autocast(device, self.precision):
            logits = self.net(images, mask.to(device, non_blocking=True), ids)
        loss = self.loss_fn(logits.float(), y)
        # DDP averages gradients over processes: weigh each by its share of the global batch's kept
        # scans, so the average is the single-process mean
        self._update(loss * (keep.size * self.dp.world / n_global) if self.dp.distributed else loss)
        return float(loss.detach()), n_images

    def _idle_step(self) -> tuple[float, int]:
        """This process's part of the batch kept no scan: take part in the gradient average with zero."""
        device = self.dp.device
        h, w = preprocessing_config(self.cfg).image_size
        images = torch.zeros((1, 1, 3, h, w), device=device)
        mask = torch.ones((1, 1), dtype=torch.bool, device=device)
        with autocast(device, self.precision):
            logits = self.net(images, mask, torch.zeros(1, dtype=torch.long, device=device))
        self._update(logits.float().sum() * 0.0)
        return 0.0, 0

    def _update(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optimizer.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.params, self.cfg.optimizer.grad_clip)
        self.opt.step()


def task_draw_weights(cfg: RunConfig, tasks: Sequence[str]) -> np.ndarray | None:
    """``data.task_weights`` as one weight per task column (1 for a task not named), or None when
    none is set. A named task that is not trained is a config error, not a silent no-op."""
    weights = cfg.data.task_weights
    if not weights:
        return None
    unknown = sorted(set(weights) - set(tasks))
    if unknown:
        raise ConfigError(f"data.task_weights: {', '.join(unknown)} not among the trained tasks ({', '.join(tasks)})")
    return np.array([float(weights.get(t, 1.0)) for t in tasks])


def _draws_for(batch: Batch, members: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """The task draws of ``batch``'s scans: one uniform per position of the global batch ``members``
    (drawn by every process alike), picked at the positions of the scans this process loaded."""
    u = rng.random(len(members))
    position = {index: p for p, index in enumerate(members)}
    return u[[position[i] for i in batch.index.tolist()]]


def train_loader(
    dataset: Dataset, batches: EpochBatches, workers: int, cfg: RunConfig, device: torch.device
) -> DataLoader:
    """One loader for the whole run: workers persist across epochs (keys carry the epoch), batches
    are pinned on CUDA so their copies to the device overlap the step."""
    extra: dict[str, Any] = (
        {"persistent_workers": True, "prefetch_factor": cfg.data.prefetch_factor} if workers else {}
    )
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers,
                      pin_memory=device.type == "cuda", **extra)  # fmt: skip


def _validate(model: HyperCT, val_ds: ScanDataset, tasks: Sequence[str], cfg: RunConfig, dp: DataParallel,
              precision: str, workers: int) -> np.ndarray:  # fmt: skip
    """Validation scores of every scan: each process scores every N-th scan, all gather the rest."""
    mine = list(range(dp.rank, len(val_ds), dp.world))
    scores = predict(model, val_ds, tasks, batch_size=cfg.eval_batch_size, device=dp.device,
                     precision=precision, workers=workers, indices=mine)  # fmt: skip
    for rows, part in dp.all_gather((mine, scores[mine])):
        scores[rows] = part
    return scores


def _setup(cfg: RunConfig, dp: DataParallel) -> tuple[str, int]:
    """Seeds, threads and CUDA arithmetic for this process; returns (precision, loader workers)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    precision = resolve_precision(cfg.precision, dp.device)
    workers = resolve_loader_workers(cfg.data.loader_workers, dp.device, dp.local_world)
    if dp.device.type == "cuda":
        configure_cuda_math(cfg.tf32)
    if dp.is_main:
        logger.info(
            "device %s%s, precision %s%s, %d loader worker(s)%s",
            dp.device, f" (x{dp.world} processes)" if dp.distributed else "", precision,
            " (auto)" if cfg.precision == "auto" else "", workers,
            " per process, pinned memory" if dp.device.type == "cuda" else "",
        )  # fmt: skip
    return precision, workers


def _initial_model(
    cfg: RunConfig,
    out: Path,
    resume: bool,
    task_list: list[str],
    train_ds: ScanDataset,
    warm_backbone: tuple[FrozenBackbone, PretextResult] | None,
    dp: DataParallel,
) -> tuple[HyperCT, dict[str, Any] | None, dict[str, Any] | None]:
    """``(model, resume state or None, pretext summary or None)``: from ``last.pt`` when resuming.

    Under data parallelism every process builds (or warm-starts, or loads) the same model; DDP then
    copies rank 0's weights to the others, so any non-determinism between them does not matter."""
    if resume and (out / LAST).is_file() and (out / STATE).is_file():
        model, extra = load_checkpoint(out / LAST, backbone_path=cfg.model.backbone_path)
        if list(model.task_keys) != task_list:
            raise ValueError(
                f"cannot resume: {LAST} has tasks {list(model.task_keys)}, the config gives {task_list}"
            )
        state = torch.load(out / STATE, map_location="cpu", weights_only=True)
        if dp.is_main:
            logger.info("resuming %s after epoch %d", out.name, int(state["epoch"]))
        return model, state, extra.get("training_data", {}).get("pretext")
    if resume and dp.is_main:
        logger.warning("--resume: no %s in %s; starting from scratch", LAST, out.name)
    if warm_backbone is not None:
        return build_model(cfg, task_list, copy.deepcopy(warm_backbone[0])), None, warm_backbone[1].to_dict()
    if cfg.model.pretext.steps:
        quiet = cfg if dp.is_main else cfg.model_copy(update={"progress": False})
        backbone, pretext = warm_start_backbone(quiet, train_ds)
        return build_model(cfg, task_list, backbone), None, pretext.to_dict()
    return build_model(cfg, task_list), None, None


def _save_epoch(out: Path, model: HyperCT, extra: dict[str, Any], state: dict[str, Any], improved: bool,
                val: tuple[ScanDataset, Sequence[str], np.ndarray] | None, keep_all: bool) -> None:  # fmt: skip
    """Rank 0's files after an epoch: ``last.pt`` + state, ``best.pt`` and its predictions if improved."""
    epoch = int(extra["epoch"])
    save_checkpoint(model, out / LAST, extra=extra)
    torch.save(state, out / (STATE + ".tmp"))
    os.replace(out / (STATE + ".tmp"), out / STATE)
    if improved:
        save_checkpoint(model, out / BEST, extra=extra)
        if val is not None:
            write_predictions(out / VAL_PREDICTIONS, val[0].records, val[1], val[2])
    if keep_all:
        save_checkpoint(model, out / f"epoch_{epoch:03d}.pt", extra=extra)


def _log_epoch(
    cfg: RunConfig, row: dict[str, Any], improved: bool, device: torch.device, workers: int
) -> None:
    value = row.get("val_mean_auroc")
    ratio = row.get("loader_ratio")
    logger.info(
        "epoch %d/%d: loss %s, val mean AUROC %s%s (train %.1f s, val %.1f s; step %s ms, loader %s ms per "
        "batch, ratio %s, wait %s ms; %s images/s)",
        row["epoch"], cfg.epochs, "n/a" if row["train_loss"] is None else f"{row['train_loss']:.4f}",
        "n/a" if value is None else f"{value:.4f}", " *" if improved else "", row["train_seconds"],
        row["val_seconds"], row["step_ms"], row["loader_ms"], "n/a" if ratio is None else f"{ratio:.2f}",
        row["loader_wait_ms"], row["images_per_s"],
    )  # fmt: skip
    if device.type == "cuda" and ratio is not None and ratio < 1.0:
        logger.warning("the loader builds batches slower than the device steps (ratio %.2f): the GPU waits; "
                       "raise data.loader_workers (now %d)", ratio, workers)  # fmt: skip


def train(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    records: Sequence[ScanRecord] | None = None,
    tasks: Sequence[str] | None = None,
    cache: InputCache | None = None,
    registry: TaskRegistry | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    warm_backbone: tuple[FrozenBackbone, PretextResult] | None = None,
) -> TrainResult:
    """Train HyperCT as configured; returns where ``best.pt`` is. ``records``/``tasks``/``cache`` let
    tests and the demo inject data; ``resume`` continues from ``out_dir/last.pt``.

    ``warm_backbone``: a backbone already warm-started by :func:`warm_start_backbone` on the same
    training split (the pretext is label-free, so runs that differ only in labels can share one; it
    is copied, never modified). Without it, ``model.pretext.steps > 0`` runs the warm start here.

    Started by ``torchrun`` (``WORLD_SIZE`` > 1), this process trains its part of every batch with the
    others (:mod:`training.distributed`); rank 0 alone writes, and every process returns the same
    history. ``on_epoch`` is called on every process."""
    cfg.check_data_sources()
    with data_parallel(cfg.device) as dp:
        return _train(cfg, Path(out_dir), dp, resume=resume, records=records, tasks=tasks, cache=cache,
                      registry=registry, on_epoch=on_epoch, warm_backbone=warm_backbone)  # fmt: skip


def _train(
    cfg: RunConfig,
    out: Path,
    dp: DataParallel,
    *,
    resume: bool,
    records: Sequence[ScanRecord] | None,
    tasks: Sequence[str] | None,
    cache: InputCache | None,
    registry: TaskRegistry | None,
    on_epoch: Callable[[dict[str, Any]], None] | None,
    warm_backbone: tuple[FrozenBackbone, PretextResult] | None,
) -> TrainResult:
    out.mkdir(parents=True, exist_ok=True)
    precision, workers = _setup(cfg, dp)
    device = dp.device
    t_start = time.perf_counter()

    data = prepare_data(cfg, out, registry=registry, records=records, tasks=tasks, cache=cache,
                        progress=cfg.progress, dp=dp)  # fmt: skip
    task_list = data.tasks
    draw_weights = task_draw_weights(cfg, task_list)
    if dp.is_main:
        _write_rows(
            out / SPLITS_CSV,
            [{"key": r.key, "patient_id": r.patient_id, "split": s} for s in SPLITS for r in data.splits[s]],
        )
        cfg.save(out / CONFIG_YAML)

    train_ds = ScanDataset(data.splits["train"], data.preprocessing, data.cache, augment=cfg.data.augment,
                           seed=cfg.seed, skip_bad=cfg.data.skip_bad)  # fmt: skip
    val_ds = ScanDataset(data.splits["val"], data.preprocessing, data.cache, skip_bad=cfg.data.skip_bad)

    model, state, pretext_summary = _initial_model(cfg, out, resume, task_list, train_ds, warm_backbone, dp)
    start_epoch, history = 0, []
    best: dict[str, Any] = {"epoch": -1, "value": None}
    if state is not None:
        start_epoch, history, best = int(state["epoch"]), list(state["history"]), dict(state["best"])
    model.to(device)
    net = dp.wrap(model)
    opt = make_optimizer(model.trainable_parameters(), cfg, head=list(model.head.parameters()))
    sched = make_scheduler(opt, cfg)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _restore_rng(state)

    counts = model.parameter_counts()
    if dp.is_main:
        logger.info(
            "training %d tasks on %d/%d/%d scans (train/val/test), %d trainable parameters",
            len(task_list), len(data.splits["train"]), len(data.splits["val"]), len(data.splits["test"]),
            counts["trainable"],
        )  # fmt: skip
    batches = EpochBatches(len(train_ds), cfg.batch_size, cfg.seed, rank=dp.rank, world=dp.world)
    loader = train_loader(train_ds, batches, workers, cfg, device)
    stepper = Stepper(net, model.trainable_parameters(), opt, np.array([model.task_index(t) for t in task_list]),
                       cfg, precision, dp, workers, draw_weights)  # fmt: skip
    writer = _tensorboard(out) if dp.is_main else None
    base_extra = {
        "tasks": task_list,
        "preprocessing": data.preprocessing.to_dict(),
        "training_data": {
            **_training_data_summary(cfg, data),
            **({"pretext": pretext_summary} if pretext_summary else {}),
        },  # fmt: skip
        "run_name": cfg.name,
        "config": cfg.to_dict(),
    }
    bad_total = data.bad.count

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        net.train()
        batches.set_epoch(epoch)
        lr = opt.param_groups[0]["lr"]
        bar = _Progress(cfg.progress and dp.is_main, len(loader), f"epoch {epoch + 1}/{cfg.epochs}")
        stats = stepper.epoch(loader, batches, epoch, bar).summed(dp)
        bar.close()
        sched.step()
        bad_total += stats.bad
        t_val = time.perf_counter()

        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": stats.loss_sum / stats.samples if stats.samples else None,
            "train_samples": stats.samples,
            "dropped_no_valid_task": stats.dropped,
            "bad_samples": stats.bad,
        }
        val_scores = None
        evaluate_now = len(val_ds) > 0 and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs)
        if evaluate_now:
            val_scores = _validate(model, val_ds, task_list, cfg, dp, precision, workers)
            mean, per = mean_auroc(val_ds.labels(), val_scores, task_list)
            row["val_mean_auroc"] = None if math.isnan(mean) else mean
            row.update({f"val_auroc:{t}": v for t, v in per.items()})
        row["train_seconds"] = round(t_val - t0, 2)
        row["val_seconds"] = round(time.perf_counter() - t_val, 2)
        row.update(stats.row(dp.world, workers))
        row["seconds"] = round(time.perf_counter() - t0, 2)
        value = row.get("val_mean_auroc")
        improved = (value is not None and (best["value"] is None or value > best["value"])) or (
            best["value"] is None and value is None and (evaluate_now or len(val_ds) == 0)
        )
        if improved:
            best = {"epoch": epoch + 1, "value": value}
        row["best"] = int(improved)
        history.append(row)

        if dp.is_main:
            extra = {**base_extra, "epoch": epoch + 1, "val_mean_auroc": value, "best_epoch": best["epoch"]}
            state = _state_payload(epoch + 1, opt, sched, best, history, task_list)
            val = (val_ds, task_list, val_scores) if val_scores is not None else None
            _save_epoch(out, model, extra, state, improved, val, cfg.keep_epoch_checkpoints)
            _write_rows(out / METRICS_CSV, history)
            if writer is not None:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and k != "epoch":
                        writer.add_scalar(k.replace(":", "/"), v, epoch + 1)
            _log_epoch(cfg, row, improved, device, workers)
        if on_epoch is not None:
            on_epoch(row)
    if writer is not None:
        writer.close()
    if bad_total and dp.is_main:
        logger.warning("%d bad samples were skipped (see the warnings above)", bad_total)
    result = TrainResult(
        out_dir=out,
        best_checkpoint=out / BEST,
        last_checkpoint=out / LAST,
        tasks=task_list,
        best_epoch=int(best["epoch"]),
        best_val_auroc=best["value"],
        history=history,
        bad_samples=bad_total,
        splits={s: len(v) for s, v in data.splits.items()},
        rank=dp.rank,
    )
    if dp.is_main:
        summary = {
            "best_epoch": result.best_epoch,
            "best_val_mean_auroc": result.best_val_auroc,
            "tasks": task_list,
            "splits": result.splits,
            "bad_samples": bad_total,
            "bad_messages": data.bad.messages,
            "seconds": round(time.perf_counter() - t_start, 1),
            "parameters": counts,
            "device": str(device),
            "precision": precision,
            "processes": dp.world,
            "loader_workers": workers,
        }
        (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return result
