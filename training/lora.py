"""Per-sample dynamic LoRA on the frozen DINOv3 linears, and folding for export (spec §5.1, §5.3).

Every target linear (``layer.{l}.attention.{q,k,v,o}_proj`` and ``layer.{l}.mlp.{up,down}_proj``) is
replaced by a :class:`LoRALinear` that *shares* the original weight and bias parameters (state-dict
keys are unchanged) and computes

    y = W x + b + s · B_b (A_b x)

where ``(A_b, B_b)`` are sample b's factors for that (layer, type). The factors of the forward pass in
progress live in a :class:`LoRAContext` owned by the model (no global state); outside
``context.use(...)`` the layer is exactly the frozen linear. The backbone sees ``B·N`` images; the
N images of sample b are consecutive, so the input is viewed as ``[B, N·seq, d]`` and all of them share
sample b's factors.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from training.hypernet import MODULE_TYPES, Factors

logger = logging.getLogger(__name__)

_TARGET_RE = re.compile(r"(?:^|\.)layer\.(\d+)\.(?:attention\.([qkvo])_proj|mlp\.(up|down)_proj)$")


def parse_target(name: str) -> tuple[int, str] | None:
    """``"model.layer.3.mlp.up_proj"`` → ``(3, "up")``; ``None`` if not a LoRA target."""
    match = _TARGET_RE.search(name)
    if match is None:
        return None
    return int(match.group(1)), match.group(2) or match.group(3)


def find_targets(
    module: nn.Module, types: tuple[str, ...] = MODULE_TYPES
) -> list[tuple[str, int, str, nn.Linear]]:
    """All target linears ``(qualified name, layer, type, module)`` in a DINOv3 model, in module order."""
    found = []
    for name, sub in module.named_modules():
        parsed = parse_target(name)
        if parsed is not None and isinstance(sub, nn.Linear) and parsed[1] in types:
            found.append((name, parsed[0], parsed[1], sub))
    return found


class LoRAContext:
    """Holds the factors (and scale) of the forward pass in progress; one instance per model."""

    def __init__(self) -> None:
        self.factors: Factors | None = None
        self.scale: float = 1.0

    def __deepcopy__(self, memo: dict[int, object]) -> LoRAContext:
        # a copied backbone (e.g. in fold_lora) gets its own idle context, never the live factors
        return LoRAContext()

    @contextmanager
    def use(self, factors: Factors | None, scale: float = 1.0) -> Iterator[None]:
        """Activate ``factors`` for the ``with`` body; restores the previous state (re-entrant)."""
        previous = (self.factors, self.scale)
        self.factors, self.scale = factors, float(scale)
        try:
            yield
        finally:
            self.factors, self.scale = previous


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``B (A x)`` for one layer; ``a [n, r, d_in]``/``b [n, d_out, r]`` per sample or unbatched ``[r, d_in]``.

    With per-sample factors, ``x [n·N, seq, d_in]`` is viewed as ``[n, N·seq, d_in]``: each sample's N
    images share its factors.
    """
    if a.dim() == 2:  # one task for every input
        return F.linear(F.linear(x, a), b)
    n = a.shape[0]
    if x.shape[0] % n != 0:
        raise ValueError(f"LoRA input batch {x.shape[0]} is not a multiple of the factor batch {n}")
    xs = x.reshape(n, -1, x.shape[-1])
    delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2))
    return delta.reshape(*x.shape[:-1], b.shape[-2])


class LoRALinear(nn.Linear):
    """A frozen ``nn.Linear`` plus the context's per-sample low-rank update for (layer, type)."""

    def __init__(self, base: nn.Linear, layer_idx: int, module_type: str, context: LoRAContext) -> None:
        nn.Module.__init__(self)  # share base's parameters; do not allocate new ones
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        if base.bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = base.bias
        self.layer_idx = layer_idx
        self.module_type = module_type
        self.lora_context = context  # plain attribute, not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        factors = self.lora_context.factors
        if factors is None or self.module_type not in factors:
            return y
        a, b = factors[self.module_type]
        a, b = (
            (a[self.layer_idx], b[self.layer_idx])
            if a.dim() == 3
            else (a[:, self.layer_idx], b[:, self.layer_idx])
        )
        return y + self.lora_context.scale * lora_delta(x, a.to(x.dtype), b.to(x.dtype))

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this layer's parameters (for folding/export)."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight = self.weight
        if self.bias is not None:
            plain.bias = self.bias
        return plain

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layer={self.layer_idx}, type={self.module_type}"


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def inject_lora(
    backbone: nn.Module, context: LoRAContext, types: tuple[str, ...] = MODULE_TYPES
) -> list[LoRALinear]:
    """Replace the target linears of ``backbone`` in place with :class:`LoRALinear` (weights shared).

    Without active factors the backbone computes exactly what it did before.
    """
    replaced = []
    for name, layer_idx, module_type, linear in find_targets(backbone, types):
        if isinstance(linear, LoRALinear):
            raise ValueError(f"{name} already carries LoRA")
        wrapped = LoRALinear(linear, layer_idx, module_type, context)
        _set_submodule(backbone, name, wrapped)
        replaced.append(wrapped)
    logger.debug("injected LoRA into %d linears (%s)", len(replaced), ", ".join(types))
    return replaced


def strip_lora(backbone: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALinear` in place by a plain ``nn.Linear`` sharing its parameters."""
    for name, sub in list(backbone.named_modules()):
        if isinstance(sub, LoRALinear):
            _set_submodule(backbone, name, sub.to_linear())
    return backbone


@torch.no_grad()
def fold_lora(backbone: nn.Module, factors: Factors, scale: float = 1.0) -> nn.Module:
    """Deep copy of ``backbone`` with ``W' = W + s·B·A`` folded into every target weight.

    ``factors`` are one task's ``{type: (A [L, r, d_in], B [L, d_out, r])}`` (a leading batch dim of 1
    is accepted). The copy holds plain ``nn.Linear`` modules only (no LoRA machinery, export-friendly),
    is frozen and in eval mode. The product is formed in float64 and cast back to the weight dtype.
    """
    merged = strip_lora(copy.deepcopy(backbone))
    folded = 0
    for name, layer_idx, module_type, linear in find_targets(merged):
        if module_type not in factors:
            continue
        a, b = factors[module_type]
        if a.dim() == 4:
            if a.shape[0] != 1:
                raise ValueError(f"fold_lora needs one task's factors, got a batch of {a.shape[0]}")
            a, b = a[0], b[0]
        a_l, b_l = a[layer_idx].to(torch.float64), b[layer_idx].to(torch.float64)
        w = linear.weight
        if tuple(b_l.shape[:1]) + tuple(a_l.shape[1:]) != tuple(w.shape):
            raise ValueError(
                f"{name}: factors {tuple(b_l.shape)}·{tuple(a_l.shape)} do not match weight {tuple(w.shape)}"
            )
        new_w = (w.to(torch.float64) + scale * (b_l @ a_l)).to(w.dtype)
        linear.weight = nn.Parameter(new_w, requires_grad=False)
        folded += 1
    logger.debug("folded LoRA into %d linears", folded)
    merged.requires_grad_(False)
    return merged.train(False)
