"""``hyperct baselines``: the paper's two reference points on the same split and budget (spec §7, O-12).

* **HPS (hard parameter sharing, equal weighting)** — the frozen backbone, masked-mean CLS over the
  images, one linear head per task (a ``Linear(hidden, K)``), trained with the equal-weighted masked
  BCE: per task the mean BCE over that task's valid labels in the batch, summed over tasks (LibMTL's
  EW). The backbone is frozen, as in the released baseline script's default (O-12).
* **STL LoRA** — one model per task: standard LoRA (rank 16, scale 1.0, A Kaiming-uniform, B = 0) on
  the same target linears as HyperCT (q, k, v, o, up, down of every block) plus HyperCT's head
  (LayerNorm → Linear), trained on that task's valid labels only.

"Same budget": the run config's epochs, batch size, optimiser, LR schedule, augmentation, seeds and
best-epoch rule (mean validation AUROC; STL: that task's validation AUROC). Each method is then
evaluated on the test split with :mod:`training.metrics`, and one comparison table is written with
:func:`training.report.write_comparison` (plus HyperCT when a checkpoint is given).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from training.backbone import FrozenBackbone, build_backbone, load_pretrained_backbone
from training.cache import InputCache
from training.config import RunConfig
from training.data import BadData, ScanDataset, ScanRecord, collate, epoch_seed
from training.device import autocast, resolve_device, resolve_loader_workers
from training.evaluate import evaluate_checkpoint
from training.hypernet import MODULE_TYPES
from training.lora import LoRAContext, inject_lora
from training.metrics import EvaluationResult, evaluate
from training.model import ClassifierHead, masked_mean
from training.report import write_comparison, write_report
from training.tasks import TaskRegistry
from training.train import (
    PreparedData,
    _Progress,
    _write_rows,
    make_optimizer,
    make_scheduler,
    mean_auroc,
    prepare_data,
    seed_everything,
    write_predictions,
)

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("hps", "stl")
METHOD_NAMES = {"hps": "HPS (EW, frozen)", "stl": "STL LoRA", "hyperct": "HyperCT"}
COMPARISON_MD = "comparison.md"


def make_backbone(cfg: RunConfig) -> FrozenBackbone:
    """The same frozen backbone HyperCT is built with (same config/folder and seed → same weights)."""
    m = cfg.model
    if m.backbone_path:
        return load_pretrained_backbone(m.backbone_path, attn_implementation=m.attn_implementation)
    return build_backbone(m.backbone, seed=cfg.seed, attn_implementation=m.attn_implementation)


class HPSModel(nn.Module):
    """Frozen backbone → masked-mean CLS → one linear head per task: ``(images, mask) → logits [B, K]``."""

    def __init__(self, backbone: FrozenBackbone, num_tasks: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.Linear(backbone.geometry.hidden_size, num_tasks)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n = images.shape[:2]
        with torch.no_grad():
            cls = self.backbone.cls_features(images.reshape(b * n, *images.shape[2:])).reshape(b, n, -1)
        return self.heads(masked_mean(cls, mask.to(torch.bool)))


class LoRATaskModel(nn.Module):
    """A private copy of the frozen backbone with standard static LoRA + HyperCT's head: ``→ logits [B]``."""

    def __init__(
        self, backbone: FrozenBackbone, *, rank: int = 16, scale: float = 1.0,
        target_types: Sequence[str] = MODULE_TYPES, seed: int = 0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.backbone = copy.deepcopy(backbone)
        self.context = LoRAContext()
        inject_lora(self.backbone.vit, self.context, tuple(target_types))
        geo = self.backbone.geometry
        h, m = geo.hidden_size, geo.intermediate_size
        dims = {"q": (h, h), "k": (h, h), "v": (h, h), "o": (h, h), "up": (h, m), "down": (m, h)}
        self.scale = float(scale)
        self.lora_a = nn.ParameterDict()
        self.lora_b = nn.ParameterDict()
        gen = torch.Generator().manual_seed(seed)
        for t in target_types:
            d_in, d_out = dims[t]
            bound = 1.0 / math.sqrt(d_in)  # PEFT's kaiming_uniform_(a=sqrt(5)) bound
            a = (torch.rand(geo.num_layers, rank, d_in, generator=gen) * 2 - 1) * bound
            self.lora_a[t] = nn.Parameter(a)
            self.lora_b[t] = nn.Parameter(torch.zeros(geo.num_layers, d_out, rank))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.head = ClassifierHead(h)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.lora_a.values(), *self.lora_b.values(), *self.head.parameters()]

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n = images.shape[:2]
        factors = {t: (self.lora_a[t], self.lora_b[t]) for t in self.lora_a}
        with self.context.use(factors, self.scale):
            cls = self.backbone.cls_features(images.reshape(b * n, *images.shape[2:])).reshape(b, n, -1)
        return self.head(masked_mean(cls, mask.to(torch.bool))).squeeze(-1)


# --------------------------------------------------------------------------------------------------
# A small shared fit/predict loop


def _predict(
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    dataset: ScanDataset,
    k: int,
    cfg: RunConfig,
    device: torch.device,
) -> np.ndarray:
    """Probabilities ``[n, k]`` (all tasks of a scan from one pass; NaN for bad samples)."""
    scores = np.full((len(dataset), k), np.nan)
    loader = DataLoader(dataset, batch_size=cfg.eval_batch_size, shuffle=False, collate_fn=collate)
    with torch.no_grad():
        for batch in loader:
            if len(batch) == 0:
                continue
            with autocast(device, cfg.precision):
                logits = forward(batch.images.to(device), batch.mask.to(device))
            p = torch.sigmoid(logits.float()).cpu().numpy().reshape(len(batch), -1)
            scores[batch.index.numpy()] = p
    return scores


def _fit(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    step_loss: Callable[[Any], torch.Tensor | None],
    predict_val: Callable[[], float],
    train_ds: ScanDataset,
    cfg: RunConfig,
    label: str,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Train with the run's epochs/optimiser/schedule; keep the state of the best validation epoch."""
    opt = make_optimizer(params, cfg)
    sched = make_scheduler(opt, cfg)
    best_value, best_state = -math.inf, None
    history: list[dict[str, Any]] = []
    workers = resolve_loader_workers(cfg.data.loader_workers, resolve_device(cfg.device))
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        torch.manual_seed(epoch_seed(cfg.seed, epoch, 0))
        train_ds.set_epoch(epoch)
        order = np.random.default_rng(epoch_seed(cfg.seed, epoch, 1)).permutation(len(train_ds)).tolist()
        loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=order, collate_fn=collate,
                            num_workers=workers)  # fmt: skip
        total, steps = 0.0, 0
        bar = _Progress(cfg.progress, len(loader), f"{label} {epoch + 1}/{cfg.epochs}")
        for batch in loader:
            bar.update()
            if len(batch) == 0:
                continue
            loss = step_loss(batch)
            if loss is None:
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optimizer.grad_clip > 0:
                nn.utils.clip_grad_norm_(params, cfg.optimizer.grad_clip)
            opt.step()
            total += float(loss.detach())
            steps += 1
        bar.close()
        sched.step()
        model.eval()
        value = predict_val()
        row = {"epoch": epoch + 1, "train_loss": total / steps if steps else None,
               "val_mean_auroc": None if math.isnan(value) else value, "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
        history.append(row)
        if best_state is None or (not math.isnan(value) and value > best_value):
            best_value = value if not math.isnan(value) else best_value
            best_state = {
                k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")
            }
        logger.info("%s epoch %d/%d: loss %s, val AUROC %s", label, epoch + 1, cfg.epochs,
                    row["train_loss"], row["val_mean_auroc"])  # fmt: skip
    assert best_state is not None
    return best_state, history


def _single_task(ds: ScanDataset, j: int) -> ScanDataset:
    """The scans of ``ds`` with a valid label for task ``j``, labels reduced to that one column."""
    recs = [
        ScanRecord(r.key, r.patient_id, r.labels[j : j + 1].copy(), r.source, r.origin)
        for r in ds.records
        if r.labels[j] != -1
    ]
    out = ScanDataset(
        recs, ds.preprocessing, ds.cache, augment=ds.augment, seed=ds.seed, skip_bad=ds.skip_bad
    )
    return out


# --------------------------------------------------------------------------------------------------
# The methods


def train_hps(
    cfg: RunConfig, data: PreparedData, device: torch.device
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Train HPS; returns (validation scores, test scores, history)."""
    seed_everything(cfg.seed)
    k = len(data.tasks)
    model = HPSModel(make_backbone(cfg), k).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        model.heads.reset_parameters()
    train_ds, val_ds, test_ds = _datasets(cfg, data)

    def step_loss(batch: Any) -> torch.Tensor | None:
        y = batch.labels.to(device)
        valid = y != -1
        if not bool(valid.any()):
            return None
        with autocast(device, cfg.precision):
            logits = model(batch.images.to(device), batch.mask.to(device)).float()
        per = nn.functional.binary_cross_entropy_with_logits(logits, y.clamp(min=0), reduction="none")
        losses = [per[valid[:, j], j].mean() for j in range(k) if bool(valid[:, j].any())]
        return torch.stack(losses).sum()

    def val() -> float:
        if len(val_ds) == 0:
            return math.nan
        return mean_auroc(val_ds.labels(), _predict(model, val_ds, k, cfg, device), data.tasks)[0]

    best, history = _fit(model, list(model.heads.parameters()), step_loss, val, train_ds, cfg, "hps")
    model.load_state_dict(best, strict=False)
    model.eval()
    val_scores = _predict(model, val_ds, k, cfg, device) if len(val_ds) else np.zeros((0, k))
    return val_scores, _predict(model, test_ds, k, cfg, device), history


def train_stl(
    cfg: RunConfig, data: PreparedData, device: torch.device
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Train one LoRA model per task; returns (validation scores, test scores [n, K], history)."""
    k = len(data.tasks)
    train_ds, val_ds, test_ds = _datasets(cfg, data)
    backbone = make_backbone(cfg)
    val_scores = np.full((len(val_ds), k), np.nan)
    test_scores = np.full((len(test_ds), k), np.nan)
    history: list[dict[str, Any]] = []
    loss_fn = nn.BCEWithLogitsLoss()
    for j, task in enumerate(data.tasks):
        seed_everything(cfg.seed)
        t_train, t_val = _single_task(train_ds, j), _single_task(val_ds, j)
        if len(t_train) == 0:
            logger.warning("stl %s: no training labels; skipped", task)
            continue
        model = LoRATaskModel(
            backbone, rank=cfg.model.rank, scale=1.0, target_types=cfg.model.target_types, seed=cfg.seed + j
        ).to(device)

        def step_loss(batch: Any, model: LoRATaskModel = model) -> torch.Tensor:
            with autocast(device, cfg.precision):
                logits = model(batch.images.to(device), batch.mask.to(device)).float()
            return loss_fn(logits, batch.labels[:, 0].to(device))

        def val(model: LoRATaskModel = model, t_val: ScanDataset = t_val, task: str = task) -> float:
            if len(t_val) == 0:
                return math.nan
            return mean_auroc(t_val.labels(), _predict(model, t_val, 1, cfg, device), [task])[0]

        best, hist = _fit(model, model.trainable_parameters(), step_loss, val, t_train, cfg, f"stl:{task}")
        model.load_state_dict(best, strict=False)
        model.eval()
        history += [{"task": task, **h} for h in hist]
        if len(val_ds):
            val_scores[:, j] = _predict(model, val_ds, 1, cfg, device)[:, 0]
        test_scores[:, j] = _predict(model, test_ds, 1, cfg, device)[:, 0]
        del model
    return val_scores, test_scores, history


def _datasets(cfg: RunConfig, data: PreparedData) -> tuple[ScanDataset, ScanDataset, ScanDataset]:
    s = data.splits
    mk = ScanDataset
    return (
        mk(
            s["train"],
            data.preprocessing,
            data.cache,
            augment=cfg.data.augment,
            seed=cfg.seed,
            skip_bad=cfg.data.skip_bad,
        ),
        mk(s["val"], data.preprocessing, data.cache, skip_bad=cfg.data.skip_bad),
        mk(s["test"], data.preprocessing, data.cache, skip_bad=cfg.data.skip_bad),
    )


@dataclass
class BaselineResults:
    """Per-method evaluation results and where the comparison table is."""

    results: dict[str, EvaluationResult]
    comparison: Path
    out_dir: Path
    histories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def run_baselines(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    methods: Sequence[str] = METHODS,
    hyperct_checkpoint: str | Path | None = None,
    n_bootstrap: int = 1000,
    records: Sequence[ScanRecord] | None = None,
    tasks: Sequence[str] | None = None,
    cache: InputCache | None = None,
    registry: TaskRegistry | None = None,
) -> BaselineResults:
    """Train and evaluate the baselines on ``cfg``'s split; write ``<out>/<method>/`` and ``comparison.md``."""
    cfg.check_data_sources()
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    registry = registry or TaskRegistry.load()
    device = resolve_device(cfg.device)
    data = prepare_data(
        cfg, out, registry=registry, records=records, tasks=tasks, cache=cache, progress=cfg.progress
    )
    test = data.splits["test"]
    if not test:
        raise ValueError("the test split is empty: baselines are compared on it")
    groups = {t: registry.by_key(t).group for t in data.tasks}
    short = {t: registry.by_key(t).short_name or t for t in data.tasks}
    y_test = np.stack([r.labels for r in test]).astype(float)
    y_val = np.stack([r.labels for r in data.splits["val"]]).astype(float) if data.splits["val"] else None
    results: dict[str, EvaluationResult] = {}
    histories: dict[str, list[dict[str, Any]]] = {}
    for method in methods:
        t0 = time.perf_counter()
        fn = train_hps if method == "hps" else train_stl
        val_scores, test_scores, hist = fn(cfg, data, device)
        # a scan's prediction for a task without a valid label is not needed (and metrics ignore it)
        result = evaluate(
            y_test, np.where(y_test == -1, np.nan, test_scores), data.tasks, groups=groups,
            val_true=y_val, val_score=None if y_val is None else np.where(y_val == -1, np.nan, val_scores),
            n_bootstrap=n_bootstrap,
        )  # fmt: skip
        mdir = out / method
        write_report(result, mdir, title=f"Baseline {METHOD_NAMES[method]}", task_labels=short)
        write_predictions(mdir / "predictions.csv", test, data.tasks, test_scores)
        _write_rows(mdir / "metrics.csv", hist)
        results[METHOD_NAMES[method]] = result
        histories[method] = hist
        logger.info("%s: test mean AUROC %s (%.0f s)", METHOD_NAMES[method],
                    result.means["overall"]["auroc"].value, time.perf_counter() - t0)  # fmt: skip
    ordered: dict[str, EvaluationResult] = {}
    if hyperct_checkpoint is not None:
        ck = Path(hyperct_checkpoint)
        ck = ck / "best.pt" if ck.is_dir() else ck
        ev = evaluate_checkpoint(ck, cfg, out / "hyperct", records=test, cache=data.cache, registry=registry,
                                 n_bootstrap=n_bootstrap, title="HyperCT (same test split)")  # fmt: skip
        ordered[METHOD_NAMES["hyperct"]] = ev.result
    ordered.update(results)
    comparison = write_comparison(
        out / COMPARISON_MD, ordered, title="HyperCT vs baselines (test split, AUROC)", tasks=data.tasks,
        groups=groups, task_labels=short, show_ci=True,
    )  # fmt: skip
    bad = data.bad if isinstance(data.bad, BadData) else None
    if bad is not None and bad.count:
        logger.warning("%d bad samples skipped", bad.count)
    return BaselineResults(results=ordered, comparison=comparison, out_dir=out, histories=histories)
