"""Contribution-weighted attention maps computed inside the exported graph (no gradients).

Why this method: serving runs ONNX Runtime without autograd, so Grad-CAM (spec §9.2) is not an option
there. The HyperCT head is ``LayerNorm → Linear`` on the masked mean ``m = (1/M) Σ_i c_i`` of the
per-image CLS vectors, and LayerNorm only subtracts a scalar mean and divides by a scalar std, so the
logit splits *exactly* into a constant plus one term per image::

    logit = b + w·β + Σ_i contrib_i,
    contrib_i = (1 / (M · σ(m))) · Σ_d w_d γ_d (c_{i,d} − mean_d(c_i)),   σ(m) = sqrt(var_d(m) + eps)

(``γ, β`` the LayerNorm affine, ``w, b`` the Linear; ``M`` = number of valid images; padded images
have weight 0). For each image we take the last block's CLS→patch attention, averaged over heads,
registers and CLS excluded, renormalised to sum 1 over the patches, and weight it by that image's
positive contribution::

    raw_i = mask_i · max(contrib_i, 0) · a_i           (logit units spread over the patch grid)
    attention = raw / max(raw)   over the whole study  (0 everywhere if no image pushes the logit up)

It is an **attention map**, not a lesion outline or segmentation: it shows which patches the CLS token
of the images that raise the score attended to.

Also here: the factored export module (one graph for all tasks), the readable reference implementation
the tests compare the graph against, and the pointing game.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import DINOv3ViTModel

from operators.preprocessing import PreprocessingConfig, normalize_images
from training.export_vit import rope_tables, vit_cls_forward
from training.hypernet import Factors
from training.lora import LoRAContext, inject_lora, strip_lora
from training.model import ClassifierHead, HyperCT, masked_mean

logger = logging.getLogger(__name__)

ATTENTION_METHOD = "cls_attention_x_positive_contribution"
ATTENTION_DESCRIPTION = (
    "Attention map, NOT a lesion outline: last-block CLS-to-patch attention (eager softmax weights, "
    "mean over heads, CLS and register tokens excluded, renormalised to sum 1 over the patches) of each "
    "image, multiplied by max(0, that image's exact additive contribution to the logit through the "
    "LayerNorm+Linear head), zero for padded images (mask False), then divided by the maximum over "
    "the study (all zeros when no image raises the logit). Range [0, 1]."
)


# --------------------------------------------------------------------------------------------------
# The maths shared by every graph.


def image_contributions(
    cls: torch.Tensor, mask: torch.Tensor, head: ClassifierHead
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cls [N, D]``, ``mask [N]`` → ``(logit [1], contrib [N])`` with ``logit = const + Σ contrib``.

    The weights are those of :func:`masked_mean` (incl. its "no valid image → image 0" fallback), so
    the decomposition is exact for the logit the model outputs.
    """
    valid = mask.to(torch.bool)
    pooled = masked_mean(cls.unsqueeze(0), valid.unsqueeze(0))[0]  # m [D]
    logit = head(pooled.unsqueeze(0)).reshape(1)
    weights = valid.to(cls.dtype)
    first = (torch.arange(cls.shape[0], device=cls.device) == 0).to(cls.dtype)
    weights = torch.where(valid.any(), weights, first)
    weights = weights / weights.sum()  # 1/M on the images that make up m
    norm, fc = head.norm, head.fc
    sigma = torch.sqrt(pooled.var(dim=-1, unbiased=False) + norm.eps)
    gain = fc.weight[0] * norm.weight  # w ⊙ γ  [D]
    centred = cls - cls.mean(dim=-1, keepdim=True)  # c_i − mean_d(c_i)
    contrib = weights * (centred @ gain) / sigma  # [N]
    return logit, contrib


def attention_map(
    cls_attention: torch.Tensor, contrib: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int]
) -> torch.Tensor:
    """``cls_attention [N, P]`` (head-mean CLS→patch) × positive contribution → ``[N, gh, gw]`` in [0, 1]."""
    attn = cls_attention / cls_attention.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    weight = torch.relu(contrib) * mask.to(torch.bool).to(contrib.dtype)
    raw = attn * weight.unsqueeze(-1)
    peak = raw.max()
    scaled = raw / torch.where(peak > 0, peak, torch.ones_like(peak))
    return scaled.reshape(-1, grid[0], grid[1])


def _grid(images: torch.Tensor, patch_size: int) -> tuple[int, int]:
    return int(images.shape[-2]) // patch_size, int(images.shape[-1]) // patch_size


def _patch_size(vit: DINOv3ViTModel) -> int:
    p = vit.config.patch_size
    return int(p if isinstance(p, int) else p[0])


class _GraphForward(nn.Module):
    """The backbone pass of the task modules: transformers' forward, or with ``image_size`` the
    export forward of ``training/export_vit.py`` (RoPE tables for that size as buffers)."""

    vit: DINOv3ViTModel
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def _init_graph(self, vit: DINOv3ViTModel, image_size: tuple[int, int] | None) -> None:
        self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
        if self.image_size is not None:
            cos, sin = rope_tables(vit, self.image_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def _cls_and_attention(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cls [N, D], head-mean CLS→patch attention [N, P])`` of the last block."""
        prefix = 1 + int(self.vit.config.num_register_tokens)
        if self.image_size is None:
            out = self.vit(pixel_values=images, output_attentions=True)
            return out.last_hidden_state[:, 0], out.attentions[-1][:, :, 0, prefix:].mean(dim=1)
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"images are {tuple(images.shape[-2:])}, this module is for {self.image_size}")
        cls, row = vit_cls_forward(self.vit, images, self.rope_cos, self.rope_sin)
        return cls, row[:, :, prefix:].mean(dim=1)


class AttributedTaskModel(_GraphForward):
    """One task's merged backbone + head: ``images [N,3,H,W], mask [N] → (logit [1], attention [N,gh,gw])``.

    The graph exported per task in the ``merged`` format. Needs eager attention (softmax weights).
    With ``image_size`` the backbone runs the export forward (``training/export_vit.py``: fixed
    image size, fewer graph nodes, same outputs); without it, transformers' own forward (the
    PyTorch reference the export's self-check compares against).
    """

    def __init__(
        self, vit: DINOv3ViTModel, head: ClassifierHead, *, image_size: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        if vit.config._attn_implementation != "eager":
            vit.set_attn_implementation("eager")
        self.vit = vit
        self.head = head
        self.num_prefix_tokens = 1 + int(vit.config.num_register_tokens)
        self.patch_size = _patch_size(vit)
        self._init_graph(vit, image_size)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> AttributedTaskModel:  # noqa: ARG002 - inference only
        return super().train(False)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cls, cls_attention = self._cls_and_attention(images)
        logit, contrib = image_contributions(cls, mask, self.head)
        return logit, attention_map(cls_attention, contrib, mask, _grid(images, self.patch_size))


class FactoredHyperCTModel(_GraphForward):
    """All tasks in one graph: frozen weights + every task's LoRA factors, picked by a ``task`` input.

    ``forward(images [N,3,H,W], mask [N], task int64 [1]) → (logit [1], attention [N,gh,gw])``. The
    factors are stacked per module type (``A [T, L, r, d_in]``, ``B [T, L, d_out, r]``) and gathered by
    ``task``; each target linear adds ``s·B(Ax)`` (training/lora.py), so there is one copy of the
    backbone weights for all tasks (≈ 0.6 GB for ViT-B/25 tasks instead of 8.6 GB merged).
    ``image_size`` as for :class:`AttributedTaskModel`.
    """

    def __init__(
        self, model: HyperCT, task_rows: Sequence[int], *, image_size: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        import copy

        vit = strip_lora(copy.deepcopy(model.backbone.vit))
        assert isinstance(vit, DINOv3ViTModel)
        vit.set_attn_implementation("eager")
        self.context = LoRAContext()
        self.types = tuple(model.hypernet.cfg.target_types)
        inject_lora(vit, self.context, self.types)
        self.vit = vit
        self.head = copy.deepcopy(model.head)
        self.scale = float(model.lora_scale)
        per_task = model.hypernet.task_factors_batch([int(r) for r in task_rows])
        for t in self.types:
            a = torch.stack([per_task[int(r)][t][0] for r in task_rows]).contiguous()
            b = torch.stack([per_task[int(r)][t][1] for r in task_rows]).contiguous()
            self.register_buffer(f"lora_a_{t}", a)
            self.register_buffer(f"lora_b_{t}", b)
        self.num_tasks = len(task_rows)
        self.num_prefix_tokens = 1 + int(vit.config.num_register_tokens)
        self.patch_size = _patch_size(vit)
        self._init_graph(vit, image_size)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FactoredHyperCTModel:  # noqa: ARG002 - inference only
        return super().train(False)

    def task_factors(self, task: torch.Tensor) -> Factors:
        """Factors of the task(s) in ``task`` (first element), ``{type: (A [L,r,d_in], B [L,d_out,r])}``."""
        row = task.reshape(-1)[:1].to(torch.long)
        return {
            t: (
                getattr(self, f"lora_a_{t}").index_select(0, row)[0],
                getattr(self, f"lora_b_{t}").index_select(0, row)[0],
            )
            for t in self.types
        }

    def forward(
        self, images: torch.Tensor, mask: torch.Tensor, task: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with self.context.use(self.task_factors(task), self.scale):
            cls, cls_attention = self._cls_and_attention(images)
        logit, contrib = image_contributions(cls, mask, self.head)
        return logit, attention_map(cls_attention, contrib, mask, _grid(images, self.patch_size))


# --------------------------------------------------------------------------------------------------
# Reference implementation (what the tests hold the graphs to).


@torch.no_grad()
def reference_attention_maps(
    model: HyperCT, task: int | str, images: torch.Tensor, mask: torch.Tensor
) -> tuple[float, np.ndarray]:
    """Readable float64 re-implementation of the method on the *unmerged* HyperCT (LoRA side path).

    Independent of the export code path: runs ``HyperCT`` itself with the hypernetwork's factors and
    eager attention, then loops over images with the formula of the module docstring. Returns
    ``(logit, attention [N, gh, gw])``.
    """
    row = model.task_index(task)
    backbone = model.backbone
    previous = backbone.attn_implementation
    backbone.set_attn_implementation("eager")
    try:
        factors = model.lora_factors(torch.tensor([row]))
        with model.lora_context.use(factors, model.lora_scale):
            out = backbone(images, output_attentions=True)
    finally:
        backbone.set_attn_implementation(previous)
    cls = out.last_hidden_state[:, 0].double()
    last = out.attentions[-1].double()  # [N, heads, T, T]
    n = images.shape[0]
    valid = [bool(v) for v in mask]
    members = [i for i in range(n) if valid[i]] or [0]
    m = cls[members].mean(dim=0)
    gamma, beta = model.head.norm.weight.double(), model.head.norm.bias.double()
    w, b = model.head.fc.weight[0].double(), model.head.fc.bias[0].double()
    sigma = torch.sqrt(((m - m.mean()) ** 2).mean() + model.head.norm.eps)
    logit = float(b + (w * (gamma * (m - m.mean()) / sigma + beta)).sum())
    prefix = backbone.num_prefix_tokens
    patch = _patch_size(backbone.vit)
    gh, gw = images.shape[-2] // patch, images.shape[-1] // patch
    raw = np.zeros((n, gh * gw))
    for i in range(n):
        if not valid[i]:
            continue
        contrib = float((w * gamma * (cls[i] - cls[i].mean())).sum() / (len(members) * sigma))
        a = last[i, :, 0, prefix:].mean(dim=0)
        raw[i] = max(contrib, 0.0) * (a / a.sum()).numpy()
    peak = raw.max()
    maps = raw / peak if peak > 0 else raw
    return logit, maps.reshape(n, gh, gw)


# --------------------------------------------------------------------------------------------------
# Pointing game.


@dataclass(frozen=True)
class PointingCase:
    """A positive study: model input plus the ground-truth finding mask in model pixel space.

    ``images [N,3,H,W]`` float32 (normalised), ``mask [N]`` bool, ``target [N,H,W]`` bool.
    """

    images: np.ndarray
    mask: np.ndarray
    target: np.ndarray
    name: str = ""


@dataclass
class PointingResult:
    """Hits per task; ``score`` = hits / evaluable cases (cases whose map is not all zero)."""

    task: str
    hits: int
    evaluable: int
    cases: int
    details: list[dict[str, Any]] = field(default_factory=list)

    @property
    def score(self) -> float | None:
        return self.hits / self.evaluable if self.evaluable else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "score": self.score,
            "hits": self.hits,
            "evaluable": self.evaluable,
            "cases": self.cases,
        }


def pointing_hit(attention: np.ndarray, target: np.ndarray) -> tuple[bool, tuple[int, int, int]] | None:
    """Is the map's maximum inside the finding?  ``attention [N,gh,gw]``, ``target [N,H,W]`` bool.

    The arg-max patch (first one on ties) is a hit when any ground-truth pixel of that image lies in
    that patch's ``H/gh × W/gw`` pixel square. ``None`` when the map is all zero (nothing to point at).
    """
    if not np.any(attention > 0):
        return None
    n, gh, gw = attention.shape
    i, r, c = np.unravel_index(int(np.argmax(attention)), attention.shape)
    ph, pw = target.shape[1] // gh, target.shape[2] // gw
    hit = bool(target[i, r * ph : (r + 1) * ph, c * pw : (c + 1) * pw].any())
    return hit, (int(i), int(r), int(c))


def pointing_game(
    model_dir: str | Path,
    cases: Sequence[PointingCase],
    *,
    tasks: Sequence[str] | None = None,
) -> dict[str, PointingResult]:
    """Pointing game of an exported model on positive cases: one :class:`PointingResult` per task.

    Runs the model exactly as served (ONNX Runtime through :class:`operators.model_runner.HyperCTRunner`).
    """
    from operators.model_runner import HyperCTRunner

    runner = HyperCTRunner(Path(model_dir))
    keys = list(tasks) if tasks is not None else [t.key for t in runner.manifest.tasks]
    results = {k: PointingResult(task=k, hits=0, evaluable=0, cases=len(cases)) for k in keys}
    for case in cases:
        outputs = runner.run(case.images, case.mask, tasks=keys)
        for k in keys:
            attention = outputs[k].attention
            if attention is None:
                raise ValueError(f"model {runner.manifest.name} has no attention output: no pointing game")
            got = pointing_hit(attention, case.target)
            res = results[k]
            if got is None:
                res.details.append({"case": case.name, "hit": None})
                continue
            res.evaluable += 1
            res.hits += int(got[0])
            res.details.append({"case": case.name, "hit": got[0], "argmax": got[1]})
    return results


def blob_cases(
    count: int,
    *,
    n_images: int = 6,
    size: int = 144,
    radius: float = 10.0,
    seed: int = 0,
) -> list[PointingCase]:
    """Simple phantoms: noisy soft-tissue discs with one bright focal blob in one image.

    A stand-in for ``synth`` volumes when only the pointing-game mechanics matter. Images are in
    [0, 1] (HU window) and then ImageNet-normalised like the real preprocessing (its default config).
    """
    config = PreprocessingConfig()
    lo, hi = config.hu_window
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) / (0.42 * size)) ** 2 + ((xx - size / 2) / (0.46 * size)) ** 2 <= 1
    out = []
    for k in range(count):
        hu = np.full((n_images, 3, size, size), -1000.0, dtype=np.float32)
        hu[:, :, body] = 40.0
        hu += rng.normal(0.0, 20.0, hu.shape).astype(np.float32)
        target = np.zeros((n_images, size, size), dtype=bool)
        i = int(rng.integers(n_images))
        cy, cx = rng.uniform(0.3 * size, 0.7 * size, 2)
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        hu[i, :, blob] = 900.0
        target[i] = blob
        unit = np.clip((hu - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
        images = normalize_images(unit, config)
        out.append(PointingCase(images, np.ones(n_images, dtype=bool), target, name=f"blob_{k}"))
    return out
