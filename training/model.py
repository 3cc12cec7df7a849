"""HyperCT: frozen DINOv3 + hypernetwork-generated per-sample LoRA + shared head (spec §4–§5).

``HyperCT.forward(images [B, N, 3, H, W], mask [B, N], task_ids [B]) -> logits [B]``:

1. the hypernetwork turns each sample's task id into LoRA factors for all target linears;
2. the ``B·N`` images (already ImageNet-normalised triplets from ``operators/preprocessing.py``,
   flattened consecutively: sample b owns rows ``b·N … b·N+N-1``) go through the frozen backbone with
   sample b's LoRA on every token of its N images;
3. the final-norm CLS of each image is mean-pooled over the valid images (no valid image → the first
   image, as the released code does);
4. a shared, trainable ``LayerNorm → Linear(hidden → 1)`` head gives one logit per (scan, task).

For export, :meth:`HyperCT.merged_task_model` folds one task's LoRA into a copy of the backbone and
returns a :class:`MergedTaskModel` (plain DINOv3 + head, no hypernetwork).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DINOv3ViTModel

from training.backbone import (
    BackboneSpec,
    FrozenBackbone,
    backbone_from_spec,
    build_backbone,
    load_pretrained_backbone,
    vit_config_dict,
)
from training.hypernet import MODULE_TYPES, Factors, HyperNetConfig, HyperNetwork
from training.lora import LoRAContext, find_targets, fold_lora, inject_lora

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "hyperct-checkpoint"
CHECKPOINT_VERSION = 1


def default_task_keys(num_tasks: int) -> tuple[str, ...]:
    """Placeholder keys when no registry keys are given (``task_00`` …)."""
    return tuple(f"task_{i:02d}" for i in range(num_tasks))


@dataclass
class HyperCTConfig:
    """Everything needed to rebuild a :class:`HyperCT` (embedded in checkpoints)."""

    backbone: BackboneSpec
    hypernet: HyperNetConfig
    task_keys: tuple[str, ...]
    lora_scale: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone.to_dict(),
            "hypernet": self.hypernet.to_dict(),
            "task_keys": list(self.task_keys),
            "lora_scale": float(self.lora_scale),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HyperCTConfig:
        return cls(
            backbone=BackboneSpec.from_dict(data["backbone"]),
            hypernet=HyperNetConfig.from_dict(data["hypernet"]),
            task_keys=tuple(data["task_keys"]),
            lora_scale=float(data.get("lora_scale", 1.0)),
        )


class ClassifierHead(nn.Module):
    """Shared ``LayerNorm(hidden) → Linear(hidden → 1)`` head (code's ``mlp_head``; not LoRA-adapted)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.fc = nn.Linear(hidden_size, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(features))


def masked_mean(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``features [B, N, D]`` over ``mask [B, N]``; an all-False row uses image 0 (code behaviour).

    Written without Python branches on tensor values so that it traces/exports with a dynamic N.
    """
    weights = mask.to(features.dtype)
    first = (torch.arange(features.shape[1], device=features.device) == 0).to(features.dtype)
    weights = torch.where(mask.any(dim=1, keepdim=True), weights, first.expand_as(weights))
    return (features * weights.unsqueeze(-1)).sum(dim=1) / weights.sum(dim=1, keepdim=True)


class HyperCT(nn.Module):
    """Multi-task chest-CT classifier: one frozen backbone, task-conditioned LoRA, one shared head.

    The backbone is modified in place: its target linears become LoRA-aware (weights shared, identical
    output while no factors are active). Trainable parameters: hypernetwork (incl. task table) + head.
    """

    def __init__(
        self,
        backbone: FrozenBackbone | DINOv3ViTModel,
        hypernet: HyperNetwork,
        *,
        task_keys: Sequence[str] | None = None,
        lora_scale: float = 1.0,
        head: ClassifierHead | None = None,
    ) -> None:
        super().__init__()
        if isinstance(backbone, DINOv3ViTModel):
            spec = BackboneSpec(
                vit_config=vit_config_dict(backbone.config),
                attn_implementation=backbone.config._attn_implementation,
            )
            backbone = FrozenBackbone(backbone, spec)
        cfg, geo = hypernet.cfg, backbone.geometry
        if (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) != (
            geo.hidden_size,
            geo.intermediate_size,
            geo.num_layers,
        ):
            raise ValueError(
                f"hypernetwork geometry (hidden {cfg.hidden_size}, mlp {cfg.intermediate_size}, {cfg.num_layers} layers) "
                f"does not match the backbone (hidden {geo.hidden_size}, mlp {geo.intermediate_size}, {geo.num_layers} layers)"
            )
        keys = tuple(task_keys) if task_keys is not None else default_task_keys(cfg.num_tasks)
        if len(keys) != cfg.num_tasks or len(set(keys)) != len(keys):
            raise ValueError(f"need {cfg.num_tasks} distinct task keys, got {len(keys)}")
        self.backbone = backbone
        self.hypernet = hypernet
        self.head = head if head is not None else ClassifierHead(geo.hidden_size)
        self.task_keys = keys
        self.lora_scale = float(lora_scale)
        self.lora_context = LoRAContext()
        injected = inject_lora(backbone.vit, self.lora_context, cfg.target_types)
        expected = cfg.num_layers * len(cfg.target_types)
        if len(injected) != expected:
            raise ValueError(
                f"found {len(injected)} LoRA target linears in the backbone, expected {expected}"
            )
        logger.info(
            "HyperCT: %d tasks, LoRA r=%d on %d linears (%s), head_in=%d, scale=%g",
            cfg.num_tasks,
            cfg.rank,
            expected,
            ",".join(cfg.target_types),
            cfg.head_in_dim,
            self.lora_scale,
        )

    # -- config / bookkeeping -----------------------------------------------------------------------
    @property
    def config(self) -> HyperCTConfig:
        return HyperCTConfig(
            backbone=copy.deepcopy(self.backbone.spec),
            hypernet=self.hypernet.cfg,
            task_keys=self.task_keys,
            lora_scale=self.lora_scale,
        )

    @property
    def num_tasks(self) -> int:
        return self.hypernet.cfg.num_tasks

    def task_index(self, task: int | str) -> int:
        """Row of the task table for a task key (or a validated index)."""
        if isinstance(task, str):
            try:
                return self.task_keys.index(task)
            except ValueError:
                raise KeyError(
                    f"task {task!r} is not covered by this model ({', '.join(self.task_keys)})"
                ) from None
        if not 0 <= int(task) < self.num_tasks:
            raise IndexError(f"task index {task} out of range [0, {self.num_tasks})")
        return int(task)

    def requires_grad_(self, requires_grad: bool = True) -> HyperCT:
        """Applies to the trainable parts only; the backbone stays frozen."""
        super().requires_grad_(requires_grad)
        self.backbone.requires_grad_(False)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """State of the hypernetwork (incl. task table) and head; the frozen backbone is left out."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def parameter_counts(self) -> dict[str, int]:
        counts = self.hypernet.parameter_counts()
        counts["head"] = sum(p.numel() for p in self.head.parameters())
        counts["backbone"] = sum(p.numel() for p in self.backbone.parameters())
        counts["backbone_targets"] = sum(m.weight.numel() for *_, m in find_targets(self.backbone.vit))
        counts["trainable"] = sum(p.numel() for p in self.trainable_parameters())
        return counts

    # -- forward ------------------------------------------------------------------------------------
    def lora_factors(self, task_ids: torch.Tensor) -> Factors:
        """Per-sample factors (regenerated in train mode, cached per task in eval mode)."""
        return self.hypernet.factors(task_ids.to(self.hypernet.task_embedding.weight.device))

    def image_features(self, images: torch.Tensor, factors: Factors | None) -> torch.Tensor:
        """CLS features ``[B, N, hidden]`` of ``images [B, N, 3, H, W]`` under per-sample ``factors``."""
        b, n = images.shape[:2]
        flat = images.reshape(b * n, *images.shape[2:])  # consecutive: sample b = rows b·N … b·N+N-1
        with self.lora_context.use(factors, self.lora_scale):
            cls = self.backbone.cls_features(flat)
        return cls.reshape(b, n, -1)

    def forward(self, images: torch.Tensor, mask: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """``images [B, N, 3, H, W]`` float (normalised), ``mask [B, N]`` bool, ``task_ids [B]`` long → ``[B]``."""
        if images.dim() != 5:
            raise ValueError(f"images must be [B, N, 3, H, W], got {tuple(images.shape)}")
        if mask.shape != images.shape[:2] or task_ids.shape != images.shape[:1]:
            raise ValueError(
                f"shape mismatch: images {tuple(images.shape)}, mask {tuple(mask.shape)}, task_ids {tuple(task_ids.shape)}"
            )
        features = self.image_features(images, self.lora_factors(task_ids))
        pooled = masked_mean(features, mask.to(torch.bool))
        return self.head(pooled).squeeze(-1)

    # -- merged (export) path -----------------------------------------------------------------------
    def merged_backbone(self, task: int | str, *, attn_implementation: str | None = None) -> DINOv3ViTModel:
        """A frozen eval-mode ``DINOv3ViTModel`` copy with task's ``W + s·B·A`` folded in."""
        factors = self.hypernet.task_factors(self.task_index(task))
        vit = fold_lora(self.backbone.vit, factors, self.lora_scale)
        assert isinstance(vit, DINOv3ViTModel)
        if attn_implementation is not None:
            vit.set_attn_implementation(attn_implementation)
        return vit

    def merged_task_model(self, task: int | str, *, return_attention: bool = False) -> MergedTaskModel:
        """Single-task, hypernetwork-free model for export (see :class:`MergedTaskModel`)."""
        return MergedTaskModel(
            self.merged_backbone(task, attn_implementation="eager" if return_attention else None),
            copy.deepcopy(self.head),
            return_attention=return_attention,
        )


class MergedTaskModel(nn.Module):
    """One task's folded backbone + the shared head: ``images [N, 3, H, W], mask [N] → logit [1]``.

    Export-friendly: no hypernetwork, no LoRA side path, no Python control flow on tensor values
    (dynamic N). With ``return_attention=True`` (needs eager attention) it also returns the last
    block's CLS→patch attention averaged over heads, ``[N, num_patches]``.
    """

    def __init__(
        self, backbone: DINOv3ViTModel, head: ClassifierHead, *, return_attention: bool = False
    ) -> None:
        super().__init__()
        if return_attention and backbone.config._attn_implementation != "eager":
            backbone.set_attn_implementation("eager")
        self.backbone = backbone
        self.head = head
        self.return_attention = return_attention
        self.num_prefix_tokens = 1 + int(backbone.config.num_register_tokens)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> MergedTaskModel:  # noqa: ARG002 - inference-only module
        return super().train(False)

    def forward(
        self, images: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.backbone(pixel_values=images, output_attentions=self.return_attention)
        cls = out.last_hidden_state[:, 0]
        logit = self.head(masked_mean(cls.unsqueeze(0), mask.to(torch.bool).unsqueeze(0))).reshape(1)
        if not self.return_attention:
            return logit
        attention = out.attentions[-1][:, :, 0, self.num_prefix_tokens :].mean(dim=1)  # [N, patches]
        return logit, attention


# -- construction -------------------------------------------------------------------------------------
def build_hyperct(
    backbone: FrozenBackbone | None = None,
    *,
    backbone_config: str | Path | dict[str, Any] | None = None,
    backbone_path: str | Path | None = None,
    task_keys: Sequence[str] | None = None,
    num_tasks: int | None = None,
    lora_scale: float = 1.0,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    **hypernet_overrides: Any,
) -> HyperCT:
    """Build a HyperCT from a backbone object, a bundled/JSON config (random init) or a local folder.

    ``hypernet_overrides`` are :class:`HyperNetConfig` fields (``head_in_dim``, ``rank``,
    ``target_types``, ``zero_init_b``, …). The hypernetwork and head are initialised from ``seed``
    without touching the global RNG.
    """
    if sum(x is not None for x in (backbone, backbone_config, backbone_path)) != 1:
        raise ValueError("give exactly one of backbone, backbone_config or backbone_path")
    if backbone_path is not None:
        backbone = load_pretrained_backbone(backbone_path, attn_implementation=attn_implementation)
    elif backbone_config is not None:
        backbone = build_backbone(backbone_config, seed=seed, attn_implementation=attn_implementation)
    assert backbone is not None
    if task_keys is not None:
        task_keys = tuple(task_keys)
        if num_tasks is not None and num_tasks != len(task_keys):
            raise ValueError(f"num_tasks={num_tasks} but {len(task_keys)} task keys")
        num_tasks = len(task_keys)
    geo = backbone.geometry
    cfg = HyperNetConfig.for_backbone(
        geo.hidden_size,
        geo.intermediate_size,
        geo.num_layers,
        num_tasks=num_tasks if num_tasks is not None else 25,
        seed=hypernet_overrides.pop("seed", seed),
        **hypernet_overrides,
    )
    hypernet = HyperNetwork(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        head = ClassifierHead(geo.hidden_size)
    return HyperCT(backbone, hypernet, task_keys=task_keys, lora_scale=lora_scale, head=head)


# -- checkpoints --------------------------------------------------------------------------------------
def save_checkpoint(
    model: HyperCT,
    path: str | Path,
    *,
    include_backbone: bool | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write trainable weights + the config that rebuilds the model (atomic rename).

    ``include_backbone=None`` stores the backbone weights only when the backbone is a random-init
    config backbone (tiny/demo); a pretrained folder is referenced by path, with a fingerprint that
    :func:`load_checkpoint` checks. ``extra`` must be plain data (epoch, metrics, …).
    """
    path = Path(path)
    spec = model.backbone.spec
    if include_backbone is None:
        include_backbone = spec.pretrained_path is None
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().to("cpu").clone() for k, v in model.trainable_state_dict().items()},
        "backbone_fingerprint": model.backbone.fingerprint(),
        "extra": dict(extra or {}),
    }
    if include_backbone:
        payload["backbone_state_dict"] = {
            k: v.detach().to("cpu").clone() for k, v in model.backbone.vit.state_dict().items()
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    logger.info(
        "saved HyperCT checkpoint to %s (backbone weights %s)",
        path,
        "included" if include_backbone else "referenced",
    )
    return path


def load_checkpoint(
    path: str | Path,
    *,
    backbone_path: str | Path | None = None,
    map_location: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    strict_backbone: bool = True,
) -> tuple[HyperCT, dict[str, Any]]:
    """Rebuild a :class:`HyperCT` from :func:`save_checkpoint`; returns ``(model, extra)``.

    ``backbone_path`` overrides the stored DINOv3 folder (checkpoints move between machines). A
    backbone whose weights differ from the one trained with raises ``ValueError`` unless
    ``strict_backbone=False`` (then it only warns).
    """
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not a HyperCT checkpoint")
    if int(payload.get("version", 0)) > CHECKPOINT_VERSION:
        raise ValueError(f"{str(path)!r} has checkpoint version {payload['version']} > {CHECKPOINT_VERSION}")
    config = HyperCTConfig.from_dict(payload["config"])
    if attn_implementation is not None:
        config.backbone.attn_implementation = attn_implementation
    backbone = backbone_from_spec(config.backbone, pretrained_path=backbone_path)
    if "backbone_state_dict" in payload:
        backbone.vit.load_state_dict(payload["backbone_state_dict"])
    stored, actual = payload.get("backbone_fingerprint"), backbone.fingerprint()
    if stored != actual:
        message = (
            f"backbone weights differ from the ones {str(path)!r} was trained with "
            f"(sha256 {actual[:12]}… != {str(stored)[:12]}…)"
        )
        if strict_backbone:
            raise ValueError(message)
        logger.warning(message)
    model = HyperCT(
        backbone,
        HyperNetwork(config.hypernet),
        task_keys=config.task_keys,
        lora_scale=config.lora_scale,
    )
    result = model.load_state_dict(payload["state_dict"], strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("backbone.")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{str(path)!r}: missing keys {missing}, unexpected keys {result.unexpected_keys}")
    model.to(map_location)
    return model, dict(payload.get("extra", {}))


__all__ = [
    "MODULE_TYPES",
    "ClassifierHead",
    "HyperCT",
    "HyperCTConfig",
    "MergedTaskModel",
    "build_hyperct",
    "default_task_keys",
    "load_checkpoint",
    "masked_mean",
    "save_checkpoint",
]
