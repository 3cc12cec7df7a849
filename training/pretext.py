"""Label-free warm start of a random-init backbone: its CLS token learns to describe its own image.

Why: HyperCT freezes a *pretrained* DINOv3. The tiny config backbones used by the demo recipe and the
tests are random, and a random frozen ViT's CLS token hardly depends on the image (docs/training.md
§8: pooled CLS of two different findings differ by ~3 % of the feature norm), so neither the LoRA
nor the head has anything to work with. Pretraining stands in for DINOv3's self-supervision at toy
scale: the CLS token of each training image is regressed (through a throw-away linear readout) onto
the image's own ``grid × grid`` block means per channel, standardised per block. No labels are used,
only the images of the training split. Afterwards the backbone is frozen as usual and stored in the
checkpoint like any config backbone.

This is a demo/test device, off by default (``model.pretext.steps: 0``); with a real DINOv3 folder it
is never needed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import DINOv3ViTModel

from training.config import PretextConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretextResult:
    """What the warm start did (recorded in the checkpoint's training-data summary)."""

    settings: dict[str, Any]
    images: int
    first_loss: float
    final_loss: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "note": "label-free block-mean regression on training images; not DINOv3"}


def block_targets(images: torch.Tensor, grid: int) -> torch.Tensor:
    """``[N, C, H, W]`` → ``[N, C·grid²]`` block means (the regression target before standardising)."""
    return F.adaptive_avg_pool2d(images.float(), grid).flatten(1)


def pretrain_backbone(
    vit: DINOv3ViTModel,
    images: np.ndarray,
    cfg: PretextConfig,
    *,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> PretextResult:
    """Train ``vit`` in place on ``images [N, 3, H, W]`` (model inputs, ImageNet-normalised).

    The backbone's ``requires_grad`` and train/eval state are restored afterwards (eval, frozen).
    Deterministic for a given ``seed`` and thread count.
    """
    if cfg.steps <= 0:
        raise ValueError("pretext.steps must be > 0 to pretrain")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"pretext images must be [N, C, H, W] with N > 0, got {images.shape}")
    t0 = time.perf_counter()
    x_all = torch.from_numpy(np.ascontiguousarray(images))
    with torch.no_grad():
        y_all = torch.cat(
            [block_targets(x_all[i : i + 256], cfg.grid) for i in range(0, x_all.shape[0], 256)]
        )
        y_all = (y_all - y_all.mean(0)) / (y_all.std(0) + 1e-3)
    gen = torch.Generator().manual_seed(seed)
    readout = nn.Linear(vit.config.hidden_size, y_all.shape[1])
    # In train mode DINOv3 draws RoPE augmentation (``pos_embed_rescale``) from the global torch RNG:
    # a private, seeded stream keeps the warm start reproducible wherever it is called from.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        nn.init.normal_(readout.weight, std=0.02)
        nn.init.zeros_(readout.bias)
        first, last = _fit(vit, readout, x_all, y_all, cfg, gen, progress)
    seconds = time.perf_counter() - t0
    logger.info("pretext warm start: %d steps on %d images, loss %.3f → %.3f (%.0f s)",
                cfg.steps, x_all.shape[0], first, last, seconds)  # fmt: skip
    return PretextResult(cfg.to_dict(), int(x_all.shape[0]), round(first, 4), round(last, 4), round(seconds, 1))


def _fit(
    vit: DINOv3ViTModel,
    readout: nn.Linear,
    x_all: torch.Tensor,
    y_all: torch.Tensor,
    cfg: PretextConfig,
    gen: torch.Generator,
    progress: Callable[[int, int, float], None] | None,
) -> tuple[float, float]:
    """The regression loop; returns the first and last batch loss. Leaves ``vit`` frozen in eval mode."""
    params = [*vit.parameters(), *readout.parameters()]
    for p in vit.parameters():
        p.requires_grad_(True)
    vit.train()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    first = last = float("nan")
    try:
        for step in range(cfg.steps):
            idx = torch.randint(0, x_all.shape[0], (min(cfg.batch_size, x_all.shape[0]),), generator=gen)
            cls = vit(pixel_values=x_all[idx].float()).last_hidden_state[:, 0]
            loss = F.mse_loss(readout(cls), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            last = float(loss.detach())
            if step == 0:
                first = last
            if progress is not None:
                progress(step + 1, cfg.steps, last)
    finally:
        for p in vit.parameters():
            p.requires_grad_(False)
        vit.eval()
    return first, last
