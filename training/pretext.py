"""Label-free warm start of a random-init backbone: its CLS token learns to describe its own image.

Why: HyperCT freezes a *pretrained* DINOv3. The tiny config backbones used by the demo recipe and the
tests are random, and a random frozen ViT's CLS token hardly depends on the image (docs/training.md
§8: pooled CLS of two different findings differ by ~3 % of the feature norm), so neither the LoRA
nor the head has anything to work with. Pretraining stands in for DINOv3's self-supervision at toy
scale: the CLS token of each training image is regressed (through a throw-away linear readout) onto
the image's own ``grid × grid`` block means per channel and, when ``fraction_grid`` is set, the shares of
the middle channel's pixels below / above HU thresholds on a finer grid (what tells emphysema, calcified
plaques or metal: a block mean hardly moves for them), each target standardised. No labels are used,
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

from operators.preprocessing import PreprocessingConfig
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
        return {
            **asdict(self),
            "note": "label-free regression of block statistics of training images; not DINOv3",
        }


def block_targets(images: torch.Tensor, grid: int) -> torch.Tensor:
    """``[N, C, H, W]`` → ``[N, C·grid²]`` block means (the regression target before standardising)."""
    return F.adaptive_avg_pool2d(images.float(), grid).flatten(1)


def _unit_hu(images: torch.Tensor, preprocessing: PreprocessingConfig | None) -> torch.Tensor:
    """The middle channel of ``[N, 3, H, W]`` model inputs back in HU, ``[N, 1, H, W]``."""
    pre = preprocessing or PreprocessingConfig()
    c = images.shape[1] // 2
    lo, hi = pre.hu_window
    unit = images[:, c : c + 1].float() * float(pre.normalize_std[c]) + float(pre.normalize_mean[c])
    return lo + unit * (hi - lo)


#: Outside air: pixels whose 3 × 3 mean is below this (HU), connected to the image border.
OUTSIDE_AIR_HU = -940.0


def outside_air(hu: torch.Tensor, threshold: float = OUTSIDE_AIR_HU) -> torch.Tensor:
    """``[N, 1, H, W]`` HU → bool mask of the air around the body: a flood fill (8-connected) of the
    pixels whose 3 × 3 mean is below ``threshold`` from the image border, dilated by one pixel (the
    noisy rim). Air inside the body (airways, gas, low-attenuation lung) is not reached."""
    air = F.avg_pool2d(hu.float(), 3, stride=1, padding=1, count_include_pad=False) < threshold
    seed = torch.zeros_like(air)
    seed[..., 0, :] = seed[..., -1, :] = True
    seed[..., :, 0] = seed[..., :, -1] = True
    out = (seed & air).float()
    airf = air.float()
    while True:
        nxt = out
        for _ in range(8):
            nxt = F.max_pool2d(nxt, 3, stride=1, padding=1) * airf
        if torch.equal(nxt, out):
            break
        out = nxt
    return F.max_pool2d(out, 3, stride=1, padding=1) > 0


def _indicators(hu: torch.Tensor, cfg: PretextConfig) -> list[torch.Tensor]:
    out = []
    inner = ~outside_air(hu) if any(f.interior for f in cfg.fractions) else None
    for f in cfg.fractions:
        inside = torch.ones_like(hu, dtype=torch.bool)
        if f.interior and inner is not None:
            inside &= inner
        if f.below_hu is not None:
            inside &= hu < f.below_hu
        if f.above_hu is not None:
            inside &= hu > f.above_hu
        out.append(inside.float())
    return out


def fraction_targets(
    images: torch.Tensor,
    cfg: PretextConfig,
    preprocessing: PreprocessingConfig | None = None,
    indicators: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """``[N, 3, H, W]`` model inputs → per entry of ``cfg.fractions``, the share of each block's
    middle-channel pixels below / above its HU threshold(s), read back through ``preprocessing``'s
    normalisation and window: ``[N, Σ grid²]`` (``[N, 0]`` without fractions). ``indicators``: the
    per-pixel masks when already computed (``_indicators``)."""
    if not cfg.fractions:
        return images.new_zeros((images.shape[0], 0), dtype=torch.float32)
    if indicators is None:
        indicators = _indicators(_unit_hu(images, preprocessing), cfg)
    return torch.cat(
        [F.adaptive_avg_pool2d(m, f.grid).flatten(1) for m, f in zip(indicators, cfg.fractions, strict=True)],
        1,
    )


def pretext_targets(
    images: torch.Tensor,
    cfg: PretextConfig,
    preprocessing: PreprocessingConfig | None = None,
    indicators: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The CLS token's unstandardised regression target: block means, then the voxel fractions."""
    fractions = fraction_targets(images, cfg, preprocessing, indicators)
    return torch.cat([block_targets(images, cfg.grid), fractions], 1)


def patch_targets(
    images: torch.Tensor,
    patch: int,
    cfg: PretextConfig,
    preprocessing: PreprocessingConfig | None = None,
    indicators: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The patch tokens' target (``patch_weight``): per ``patch × patch`` patch, its per-channel means and
    its share of pixels beyond each fraction threshold, ``[N, patches, 3 + len(fractions)]`` (row-major,
    the order of the ViT's patch tokens)."""
    if indicators is None:
        indicators = _indicators(_unit_hu(images, preprocessing), cfg)
    maps = [images.float(), *indicators]
    return F.avg_pool2d(torch.cat(maps, 1), patch).flatten(2).transpose(1, 2)


def target_weights(cfg: PretextConfig, n_columns: int) -> torch.Tensor | None:
    """Per column of :func:`pretext_targets`, its weight in the CLS loss (1 per block mean, each
    fraction's ``weight`` for its ``grid²`` columns), normalised to mean 1; None when every weight is
    1 (the plain mean squared error, whose bytes earlier warm starts were built with)."""
    if all(f.weight == 1.0 for f in cfg.fractions):
        return None
    fractions = [torch.full((f.grid**2,), f.weight) for f in cfg.fractions]
    w = torch.cat([torch.ones(n_columns - sum(len(x) for x in fractions)), *fractions])
    return w / w.mean()


def _standardise(y: torch.Tensor, dims: int | tuple[int, ...]) -> torch.Tensor:
    return (y - y.mean(dims)) / (y.std(dims) + 1e-3)


def pretrain_backbone(
    vit: DINOv3ViTModel,
    images: np.ndarray,
    cfg: PretextConfig,
    *,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
    preprocessing: PreprocessingConfig | None = None,
) -> PretextResult:
    """Train ``vit`` in place on ``images [N, 3, H, W]`` (model inputs, ImageNet-normalised by
    ``preprocessing``, default the serving defaults: the HU thresholds are read back through it).

    The backbone's ``requires_grad`` and train/eval state are restored afterwards (eval, frozen).
    Deterministic for a given ``seed`` and thread count.
    """
    if cfg.steps <= 0:
        raise ValueError("pretext.steps must be > 0 to pretrain")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"pretext images must be [N, C, H, W] with N > 0, got {images.shape}")
    t0 = time.perf_counter()
    x_all = torch.from_numpy(np.ascontiguousarray(images))
    chunks = range(0, x_all.shape[0], 256)
    patch = vit.config.patch_size if isinstance(vit.config.patch_size, int) else int(vit.config.patch_size[0])
    with torch.no_grad():
        ys, ps = [], []
        for i in chunks:
            x = x_all[i : i + 256]
            ind = _indicators(_unit_hu(x, preprocessing), cfg) if cfg.fractions else []
            ys.append(pretext_targets(x, cfg, preprocessing, ind))
            if cfg.patch_weight > 0:
                ps.append(patch_targets(x, patch, cfg, preprocessing, ind))
        y_all = _standardise(torch.cat(ys), 0)
        p_all = _standardise(torch.cat(ps), (0, 1)) if cfg.patch_weight > 0 else None
    gen = torch.Generator().manual_seed(seed)
    readout = nn.Linear(vit.config.hidden_size, y_all.shape[1])
    # In train mode DINOv3 draws RoPE augmentation (``pos_embed_rescale``) from the global torch RNG:
    # a private, seeded stream keeps the warm start reproducible wherever it is called from.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        nn.init.normal_(readout.weight, std=0.02)
        nn.init.zeros_(readout.bias)
        patch_readout = None
        if p_all is not None:
            patch_readout = nn.Linear(vit.config.hidden_size, p_all.shape[2])
            nn.init.normal_(patch_readout.weight, std=0.02)
            nn.init.zeros_(patch_readout.bias)
        first, last = _fit(vit, readout, x_all, y_all, cfg, gen, progress, patch_readout, p_all,
                           target_weights(cfg, y_all.shape[1]))  # fmt: skip
    seconds = time.perf_counter() - t0
    logger.info("pretext warm start: %d steps on %d images, loss %.3f → %.3f (%.0f s)",
                cfg.steps, x_all.shape[0], first, last, seconds)  # fmt: skip
    return PretextResult(
        cfg.to_dict(), int(x_all.shape[0]), round(first, 4), round(last, 4), round(seconds, 1)
    )


def _fit(
    vit: DINOv3ViTModel,
    readout: nn.Linear,
    x_all: torch.Tensor,
    y_all: torch.Tensor,
    cfg: PretextConfig,
    gen: torch.Generator,
    progress: Callable[[int, int, float], None] | None,
    patch_readout: nn.Linear | None = None,
    p_all: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[float, float]:
    """The regression loop; returns the first and last batch loss (the CLS term plus the weighted
    patch term, if any). Leaves ``vit`` frozen in eval mode."""
    params = [
        *vit.parameters(),
        *readout.parameters(),
        *(patch_readout.parameters() if patch_readout else ()),
    ]
    prefix = 1 + int(getattr(vit.config, "num_register_tokens", 0))
    for p in vit.parameters():
        p.requires_grad_(True)
    vit.train()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    first = last = float("nan")
    try:
        for step in range(cfg.steps):
            idx = torch.randint(0, x_all.shape[0], (min(cfg.batch_size, x_all.shape[0]),), generator=gen)
            hidden = vit(pixel_values=x_all[idx].float()).last_hidden_state
            if weights is None:
                loss = F.mse_loss(readout(hidden[:, 0]), y_all[idx])
            else:
                loss = ((readout(hidden[:, 0]) - y_all[idx]).square() * weights).mean()
            if patch_readout is not None and p_all is not None:
                loss = loss + cfg.patch_weight * F.mse_loss(patch_readout(hidden[:, prefix:]), p_all[idx])
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
