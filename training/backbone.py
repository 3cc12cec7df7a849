"""Frozen DINOv3 ViT backbone (spec §4).

The backbone is either the user's local download of ``facebook/dinov3-vitb16-pretrain-lvd1689m``
(gated licence, never downloaded by this project) or a randomly initialised ``DINOv3ViTModel`` built
from one of the JSON configs in ``training/configs/`` (real ViT-B/16 geometry for counting, tiny ones for
tests and the demo). Either way it is wrapped in :class:`FrozenBackbone`, which keeps every weight frozen
and the module in ``eval()`` even when a parent calls ``train()``: the paper trains only the hypernetwork
and head, and eval mode keeps DINOv3's RoPE coordinate augmentation and stochastic depth off.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DINOv3ViTConfig, DINOv3ViTModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""Bundled backbone configs (HF ``DINOv3ViTConfig`` fields, JSON)."""

PRETRAINED_REPO_ID = "facebook/dinov3-vitb16-pretrain-lvd1689m"
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclass
class BackboneSpec:
    """Where a backbone comes from; embedded in checkpoints so a model can be rebuilt.

    Exactly one of ``pretrained_path`` (a local HF folder) or ``vit_config`` (a full
    ``DINOv3ViTConfig`` dict, random init with ``seed``) is set. ``config_name`` is informational.
    """

    pretrained_path: str | None = None
    vit_config: dict[str, Any] | None = None
    config_name: str | None = None
    seed: int = 0
    attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        if (self.pretrained_path is None) == (self.vit_config is None):
            raise ValueError("BackboneSpec needs exactly one of pretrained_path or vit_config")
        _check_attn(self.attn_implementation)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneSpec:
        return cls(**data)


@dataclass(frozen=True)
class BackboneGeometry:
    """The dimensions the hypernetwork needs to know about."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    patch_size: int
    num_register_tokens: int

    @classmethod
    def from_config(cls, config: DINOv3ViTConfig) -> BackboneGeometry:
        patch = config.patch_size if isinstance(config.patch_size, int) else int(config.patch_size[0])
        return cls(
            hidden_size=int(config.hidden_size),
            intermediate_size=int(config.intermediate_size),
            num_layers=int(config.num_hidden_layers),
            num_heads=int(config.num_attention_heads),
            patch_size=patch,
            num_register_tokens=int(config.num_register_tokens),
        )


def _check_attn(name: str) -> None:
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {name!r}")


def available_configs() -> list[str]:
    """Names of the bundled configs (``vitb16``, ``tiny``, ...)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def resolve_config_file(name_or_path: str | Path) -> Path:
    """A bundled config name (``"tiny"``) or a path to a JSON file → the JSON file."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".json" and candidate.is_file():
        return candidate
    bundled = CONFIG_DIR / f"{name_or_path}.json"
    if bundled.is_file():
        return bundled
    raise FileNotFoundError(
        f"backbone config {str(name_or_path)!r} is neither a JSON file nor a bundled config "
        f"(bundled: {', '.join(available_configs())})"
    )


def load_vit_config(
    source: str | Path | dict[str, Any] | DINOv3ViTConfig, attn_implementation: str = "sdpa"
) -> DINOv3ViTConfig:
    """Build a ``DINOv3ViTConfig`` from a bundled name, a JSON path, a dict or a config."""
    _check_attn(attn_implementation)
    if isinstance(source, DINOv3ViTConfig):
        data = source.to_dict()
    elif isinstance(source, dict):
        data = dict(source)
    else:
        data = json.loads(resolve_config_file(source).read_text())
    data.pop("transformers_version", None)
    config = DINOv3ViTConfig.from_dict(data)
    if config.model_type != "dinov3_vit":
        raise ValueError(f"expected a dinov3_vit config, got model_type={config.model_type!r}")
    config._attn_implementation = attn_implementation
    return config


def vit_config_dict(config: DINOv3ViTConfig) -> dict[str, Any]:
    """JSON-safe config dict without derived/runtime fields (for checkpoints)."""
    data = json.loads(config.to_json_string(use_diff=False))
    for key in ("transformers_version", "stage_names", "out_features", "out_indices", "_attn_implementation"):
        data.pop(key, None)
    return data


class FrozenBackbone(nn.Module):
    """A ``DINOv3ViTModel`` that is always frozen and always in eval mode.

    ``train(True)`` from a parent is ignored so that the hypernetwork can train (dropout on) while the
    backbone stays deterministic; ``requires_grad_(True)`` is ignored for the same reason. Gradients
    still flow *through* the backbone to the LoRA factors.
    """

    def __init__(self, vit: DINOv3ViTModel, spec: BackboneSpec) -> None:
        super().__init__()
        self.vit = vit
        self.spec = spec
        self.vit.requires_grad_(False)
        self.train(False)

    # -- frozen / eval-only -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> FrozenBackbone:  # noqa: ARG002 - mode deliberately ignored
        """Stay in eval mode whatever the parent asks (spec §4: backbone kept in eval())."""
        return super().train(False)

    def requires_grad_(self, requires_grad: bool = True) -> FrozenBackbone:
        """Keep the weights frozen; ``requires_grad_(True)`` is a no-op here."""
        if requires_grad:
            logger.debug("FrozenBackbone.requires_grad_(True) ignored: the backbone stays frozen")
        for p in self.parameters():
            p.requires_grad = False
        return self

    # -- geometry -----------------------------------------------------------------------------------
    @property
    def config(self) -> DINOv3ViTConfig:
        return self.vit.config

    @property
    def geometry(self) -> BackboneGeometry:
        return BackboneGeometry.from_config(self.vit.config)

    @property
    def hidden_size(self) -> int:
        return int(self.vit.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.vit.config.num_hidden_layers)

    @property
    def num_prefix_tokens(self) -> int:
        """CLS + register tokens (RoPE and the patch grid skip them)."""
        return 1 + int(self.vit.config.num_register_tokens)

    @property
    def attn_implementation(self) -> str:
        return str(self.vit.config._attn_implementation)

    def set_attn_implementation(self, name: str) -> None:
        """``"sdpa"`` (fast, default) or ``"eager"`` (needed for attention weights)."""
        _check_attn(name)
        self.vit.set_attn_implementation(name)
        self.spec.attn_implementation = name

    # -- forward ------------------------------------------------------------------------------------
    def forward(
        self, pixel_values: torch.Tensor, output_attentions: bool = False
    ) -> BaseModelOutputWithPooling:
        """Run DINOv3 on already ImageNet-normalised images ``[n, 3, H, W]``."""
        if output_attentions and self.attn_implementation != "eager":
            raise ValueError(
                "attention weights need attn_implementation='eager' "
                f"(current: {self.attn_implementation!r}); call set_attn_implementation('eager')"
            )
        return self.vit(pixel_values=pixel_values, output_attentions=output_attentions)

    def cls_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLS token after the final LayerNorm, ``[n, hidden]`` (spec §4 "feature per image")."""
        hidden = self.forward(pixel_values).last_hidden_state
        assert hidden is not None
        return hidden[:, 0]

    @torch.no_grad()
    def fingerprint(self) -> str:
        """SHA-256 of the weights (names, dtypes, shapes, bytes): detects a checkpoint/backbone mismatch."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.vit.state_dict().items()):
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def build_backbone(
    config: str | Path | dict[str, Any] | DINOv3ViTConfig = "tiny",
    *,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> FrozenBackbone:
    """Randomly initialised backbone from a config, reproducible from ``seed``.

    The global RNG is left untouched (``fork_rng``) so building a model never changes other seeds.
    """
    vit_config = load_vit_config(config, attn_implementation)
    name = config if isinstance(config, str) and not str(config).endswith(".json") else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = DINOv3ViTModel(vit_config)
    spec = BackboneSpec(
        vit_config=vit_config_dict(vit_config),
        config_name=name,
        seed=seed,
        attn_implementation=attn_implementation,
    )
    logger.info(
        "built random-init DINOv3 backbone %s (hidden %d, %d layers, seed %d)",
        name or "<custom>",
        vit_config.hidden_size,
        vit_config.num_hidden_layers,
        seed,
    )
    return FrozenBackbone(vit, spec)


def check_pretrained_folder(path: str | Path) -> Path:
    """Validate a local HF download folder; raise a clear error naming the path otherwise."""
    folder = Path(path).expanduser()
    expected = (
        f"a local download of {PRETRAINED_REPO_ID} (a folder with config.json and "
        f"model.safetensors, e.g. from `huggingface-cli download {PRETRAINED_REPO_ID} --local-dir DIR` "
        "after accepting the DINOv3 licence)"
    )
    if not folder.exists():
        raise FileNotFoundError(f"DINOv3 backbone folder {str(folder)!r} does not exist; expected {expected}")
    if not folder.is_dir():
        raise FileNotFoundError(f"DINOv3 backbone path {str(folder)!r} is not a folder; expected {expected}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"DINOv3 backbone folder {str(folder)!r} has no config.json; expected {expected}"
        )
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        raise FileNotFoundError(
            f"DINOv3 backbone folder {str(folder)!r} has no weights ({' / '.join(_WEIGHT_FILES)}); expected {expected}"
        )
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise ValueError(f"DINOv3 backbone folder {str(folder)!r}: unreadable config.json ({exc})") from exc
    if model_type != "dinov3_vit":
        raise ValueError(
            f"DINOv3 backbone folder {str(folder)!r}: config.json has model_type={model_type!r}, "
            f"expected 'dinov3_vit' ({expected})"
        )
    return folder


def load_pretrained_backbone(path: str | Path, *, attn_implementation: str = "sdpa") -> FrozenBackbone:
    """Load the user's local DINOv3 download (never touches the network)."""
    _check_attn(attn_implementation)
    folder = check_pretrained_folder(path)
    try:
        vit = DINOv3ViTModel.from_pretrained(
            str(folder), local_files_only=True, attn_implementation=attn_implementation, dtype=torch.float32
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"could not load a DINOv3ViTModel from {str(folder)!r}: {exc}") from exc
    if not isinstance(vit, DINOv3ViTModel):  # pragma: no cover - from_pretrained returns cls
        raise ValueError(f"{str(folder)!r} did not load as a DINOv3ViTModel")
    geometry = BackboneGeometry.from_config(vit.config)
    if (geometry.hidden_size, geometry.num_layers, geometry.patch_size) != (768, 12, 16):
        logger.warning(
            "backbone at %s is not ViT-B/16 (%s); HyperCT was specified for ViT-B/16", folder, geometry
        )
    spec = BackboneSpec(pretrained_path=str(path), attn_implementation=attn_implementation)
    logger.info("loaded pretrained DINOv3 backbone from %s", folder)
    return FrozenBackbone(vit, spec)


def backbone_from_spec(spec: BackboneSpec, *, pretrained_path: str | Path | None = None) -> FrozenBackbone:
    """Rebuild a backbone from a checkpoint's spec; ``pretrained_path`` overrides the stored folder."""
    if pretrained_path is not None or spec.pretrained_path is not None:
        path = pretrained_path if pretrained_path is not None else spec.pretrained_path
        assert path is not None
        return load_pretrained_backbone(path, attn_implementation=spec.attn_implementation)
    assert spec.vit_config is not None
    backbone = build_backbone(spec.vit_config, seed=spec.seed, attn_implementation=spec.attn_implementation)
    backbone.spec.config_name = spec.config_name
    return backbone
