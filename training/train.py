"""``hyperct train``: the HyperCT training loop (spec §6) with resumable checkpoints.

Per step: the padded batch goes through the model with **one valid task per scan**, drawn uniformly
from that scan's tasks with a label (scans without any are dropped from the batch); loss =
``BCEWithLogits`` averaged over the kept scans; AdamW (lr 1e-5, betas 0.9/0.95, wd 0); cosine schedule
stepped once per epoch. After each epoch the validation split is scored on every valid (scan, task)
pair and the epoch with the best **unweighted mean validation AUROC** is kept as ``best.pt``.

Reproducibility: every random draw of an epoch (order, task sampling, augmentation, hypernetwork
dropout) comes from generators seeded by ``(seed, epoch)``, so a run resumed from ``last.pt`` repeats
the epochs it would have run, bit for bit on the same machine and thread count.

Outputs in ``out_dir`` (docs/training.md §Outputs): ``best.pt``, ``last.pt`` + ``last_state.pt``,
``metrics.csv``, ``config.yaml`` (resolved), ``splits.csv``, ``val_predictions.csv`` (best epoch),
``train_summary.json``.
"""

from __future__ import annotations

import contextlib
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
from torch.utils.data import DataLoader

from operators.preprocessing import PreprocessingConfig
from training.backbone import FrozenBackbone, build_backbone
from training.cache import InputCache
from training.config import RunConfig
from training.data import (
    SPLITS,
    BadData,
    DataError,
    ScanDataset,
    ScanRecord,
    build_records,
    collate,
    prepare,
    resolve_tasks,
    sample_tasks,
    split_records,
)
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


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A 63-bit seed for one (run seed, epoch, stream): independent of everything that ran before."""
    return int(
        np.random.SeedSequence([seed, epoch, stream]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
) -> np.ndarray:
    """Sigmoid probabilities ``[n_scans, K]`` for ``tasks``; NaN where not scored.

    One backbone pass per (scan, task) pair (spec §7); with ``only_valid`` only pairs with a valid
    label are scored (what metrics use). Eval mode: the hypernetwork caches each task's factors.
    """
    device = torch.device(device)
    model.eval()
    labels = dataset.labels()
    n, k = len(dataset), len(tasks)
    scores = np.full((n, k), np.nan, dtype=np.float64)
    if n == 0:
        return scores
    ids = [model.task_index(t) for t in tasks]
    loader = DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=collate, num_workers=workers)
    pending: list[tuple[torch.Tensor, torch.Tensor, int, int]] = []
    bar = _Progress(progress, n, "predict")

    def flush() -> None:
        if not pending:
            return
        n_max = max(p[0].shape[0] for p in pending)
        images = torch.zeros((len(pending), n_max, *pending[0][0].shape[1:]), dtype=torch.float32)
        mask = torch.zeros((len(pending), n_max), dtype=torch.bool)
        for b, (img, msk, _, _) in enumerate(pending):
            images[b, : img.shape[0]] = img
            mask[b, : msk.shape[0]] = msk
        task_ids = torch.tensor([ids[p[3]] for p in pending], dtype=torch.long)
        with torch.no_grad(), autocast(device, precision):
            logits = model(images.to(device), mask.to(device), task_ids.to(device))
        probs = torch.sigmoid(logits.float()).cpu().numpy()
        for (_, _, i, j), p in zip(pending, probs, strict=True):
            scores[i, j] = float(p)
        pending.clear()

    for batch in loader:
        bar.update()
        if len(batch) == 0:
            continue
        i = int(batch.index[0])
        wanted = [j for j in range(k) if not only_valid or labels[i, j] != -1]
        for j in wanted:
            pending.append((batch.images[0], batch.mask[0], i, j))
            if len(pending) >= batch_size:
                flush()
    flush()
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
) -> PreparedData:
    """Records → patient split → cache filled (train entries with the augmentation margin)."""
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
    bar = _Progress(progress, len(usable), "cache")
    last = [0]

    def tick(done: int, total: int) -> None:
        bar.update(done - last[0])
        last[0] = done

    for name in SPLITS:
        splits[name] = prepare(
            splits[name],
            pre,
            cache,
            augment=cfg.data.augment and name == "train",
            workers=cfg.data.workers,
            bad=bad,
            progress=tick if progress else None,
        )
    bar.close()
    if not splits["train"]:
        raise DataError("the training split is empty")
    return PreparedData(task_list, splits, cache, pre, bad)


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
    result = pretrain_backbone(backbone.vit, images, m.pretext, seed=cfg.seed,
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
    np_state = np.random.get_state()
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
    is copied, never modified). Without it, ``model.pretext.steps > 0`` runs the warm start here."""
    cfg.check_data_sources()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    t_start = time.perf_counter()

    data = prepare_data(
        cfg, out, registry=registry, records=records, tasks=tasks, cache=cache, progress=cfg.progress
    )
    task_list = data.tasks
    _write_rows(
        out / SPLITS_CSV,
        [{"key": r.key, "patient_id": r.patient_id, "split": s} for s in SPLITS for r in data.splits[s]],
    )
    cfg.save(out / CONFIG_YAML)

    train_ds = ScanDataset(data.splits["train"], data.preprocessing, data.cache, augment=cfg.data.augment,
                           seed=cfg.seed, skip_bad=cfg.data.skip_bad)  # fmt: skip
    val_ds = ScanDataset(data.splits["val"], data.preprocessing, data.cache, skip_bad=cfg.data.skip_bad)

    start_epoch = 0
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": -1, "value": None}
    if resume and (out / LAST).is_file() and (out / STATE).is_file():
        model, extra = load_checkpoint(out / LAST, backbone_path=cfg.model.backbone_path)
        pretext_summary = extra.get("training_data", {}).get("pretext")
        if list(model.task_keys) != task_list:
            raise ValueError(
                f"cannot resume: {LAST} has tasks {list(model.task_keys)}, the config gives {task_list}"
            )
        state = torch.load(out / STATE, map_location="cpu", weights_only=True)
        start_epoch, history, best = int(state["epoch"]), list(state["history"]), dict(state["best"])
        logger.info("resuming %s after epoch %d", out.name, start_epoch)
    else:
        if resume:
            logger.warning("--resume: no %s in %s; starting from scratch", LAST, out.name)
        backbone, pretext_summary = None, None
        if warm_backbone is not None:
            backbone, pretext = copy.deepcopy(warm_backbone[0]), warm_backbone[1]
            pretext_summary = pretext.to_dict()
        elif cfg.model.pretext.steps:
            backbone, pretext = warm_start_backbone(cfg, train_ds)
            pretext_summary = pretext.to_dict()
        model, state = build_model(cfg, task_list, backbone), None
    model.to(device)
    opt = make_optimizer(model.trainable_parameters(), cfg, head=list(model.head.parameters()))
    sched = make_scheduler(opt, cfg)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _restore_rng(state)

    counts = model.parameter_counts()
    logger.info(
        "training %d tasks on %d/%d/%d scans (train/val/test), %d trainable parameters, device %s, %s",
        len(task_list), len(data.splits["train"]), len(data.splits["val"]), len(data.splits["test"]),
        counts["trainable"], device, cfg.precision,
    )  # fmt: skip
    task_ids = np.array([model.task_index(t) for t in task_list])
    loss_fn = nn.BCEWithLogitsLoss()
    writer = _tensorboard(out)
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
        model.train()
        torch.manual_seed(epoch_seed(cfg.seed, epoch, 0))  # hypernetwork dropout
        train_ds.set_epoch(epoch)
        order = np.random.default_rng(epoch_seed(cfg.seed, epoch, 1)).permutation(len(train_ds)).tolist()
        task_rng = np.random.default_rng(epoch_seed(cfg.seed, epoch, 2))
        image_rng = np.random.default_rng(epoch_seed(cfg.seed, epoch, 3))
        loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=order, collate_fn=collate,
                            num_workers=cfg.data.loader_workers, persistent_workers=False)  # fmt: skip
        lr = opt.param_groups[0]["lr"]
        total_loss, n_seen, n_dropped, n_bad = 0.0, 0, 0, 0
        bar = _Progress(cfg.progress, len(loader), f"epoch {epoch + 1}/{cfg.epochs}")
        for batch in loader:
            n_bad += batch.dropped_bad
            if len(batch) == 0:
                bar.update()
                continue
            keep, cols, target = sample_tasks(batch.labels.numpy(), task_rng)
            n_dropped += len(batch) - keep.size
            if keep.size == 0:
                bar.update()
                continue
            idx = torch.from_numpy(keep)
            images, mask = batch.images[idx], batch.mask[idx]
            if cfg.data.train_images:
                images, mask = subsample_images(images, mask, cfg.data.train_images, image_rng)
            images = images.to(device, non_blocking=True)
            mask = mask.to(device)
            ids = torch.from_numpy(task_ids[cols]).to(device)
            y = torch.from_numpy(target).to(device)
            with autocast(device, cfg.precision):
                logits = model(images, mask, ids)
            loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optimizer.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.trainable_parameters(), cfg.optimizer.grad_clip)
            opt.step()
            total_loss += float(loss.detach()) * keep.size
            n_seen += keep.size
            bar.update(loss=f"{float(loss.detach()):.4f}")
        bar.close()
        sched.step()
        bad_total += n_bad

        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": total_loss / n_seen if n_seen else None,
            "train_samples": n_seen,
            "dropped_no_valid_task": n_dropped,
            "bad_samples": n_bad,
        }
        val_scores = None
        evaluate_now = len(val_ds) > 0 and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs)
        if evaluate_now:
            val_scores = predict(model, val_ds, task_list, batch_size=cfg.eval_batch_size, device=device,
                                 precision=cfg.precision, workers=cfg.data.loader_workers)  # fmt: skip
            mean, per = mean_auroc(val_ds.labels(), val_scores, task_list)
            row["val_mean_auroc"] = None if math.isnan(mean) else mean
            row.update({f"val_auroc:{t}": v for t, v in per.items()})
        row["seconds"] = round(time.perf_counter() - t0, 2)
        value = row.get("val_mean_auroc")
        improved = (value is not None and (best["value"] is None or value > best["value"])) or (
            best["value"] is None and value is None and (evaluate_now or len(val_ds) == 0)
        )
        if improved:
            best = {"epoch": epoch + 1, "value": value}
        row["best"] = int(improved)
        history.append(row)

        extra = {**base_extra, "epoch": epoch + 1, "val_mean_auroc": value, "best_epoch": best["epoch"]}
        save_checkpoint(model, out / LAST, extra=extra)
        torch.save(_state_payload(epoch + 1, opt, sched, best, history, task_list), out / (STATE + ".tmp"))
        os.replace(out / (STATE + ".tmp"), out / STATE)
        if improved:
            save_checkpoint(model, out / BEST, extra=extra)
            if val_scores is not None:
                write_predictions(out / VAL_PREDICTIONS, val_ds.records, task_list, val_scores)
        if cfg.keep_epoch_checkpoints:
            save_checkpoint(model, out / f"epoch_{epoch + 1:03d}.pt", extra=extra)
        _write_rows(out / METRICS_CSV, history)
        if writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    writer.add_scalar(k.replace(":", "/"), v, epoch + 1)
        logger.info(
            "epoch %d/%d: loss %s, val mean AUROC %s%s (%.1f s)",
            epoch + 1, cfg.epochs,
            "n/a" if row["train_loss"] is None else f"{row['train_loss']:.4f}",
            "n/a" if value is None else f"{value:.4f}", " *" if improved else "", row["seconds"],
        )  # fmt: skip
        if on_epoch is not None:
            on_epoch(row)
    if writer is not None:
        writer.close()
    if bad_total:
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
    )
    summary = {
        "best_epoch": result.best_epoch,
        "best_val_mean_auroc": result.best_val_auroc,
        "tasks": task_list,
        "splits": result.splits,
        "bad_samples": bad_total,
        "bad_messages": data.bad.messages,
        "seconds": round(time.perf_counter() - t_start, 1),
        "parameters": counts,
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return result
