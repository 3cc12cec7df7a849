"""HyperCT hypernetwork: task embedding → per-(layer, module-type) LoRA factors (spec §5.2–5.3).

Layout (L = 128 latent, r = 16):

* task table ``Embedding(K, 512)`` ~ N(0, 0.02²) → task encoder ``Linear(512→64) + LayerNorm(64)``;
* depth code ``LayerNorm(Embedding(num_layers, 32))``, type code ``LayerNorm(Embedding(6, 32))``
  (factorised module indicator, as in the released code: open point O-10);
* latent = concat[task 64 ‖ depth 32 ‖ type 32] = 128;
* trunk = mixer → 2 residual blocks → output projection to ``head_in_dim`` (4× expansion, SiLU,
  dropout 0.05 where spec Table 14 puts it);
* one head ``Linear(head_in → r·(d_in + d_out))`` per module *type* (O-11), shared across layers; the
  first ``r·d_in`` outputs are A (r × d_in), the rest B (d_out × r).

Head init follows the code (O-14): weight ~ N(0, 0.01²), A-bias ~ N(0, 0.01²), B-bias = 0, so
ΔW = B·A is *not* zero at initialisation; ``zero_init_b=True`` also zeroes the B rows of the weight
(standard-LoRA ΔW = 0 start), which is a deviation from the code.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

MODULE_TYPES: tuple[str, ...] = ("q", "k", "v", "o", "up", "down")
"""Fixed order of the module-type code table (index = row of ``Embedding(6, 32)``)."""

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""``{type: (A [..., L, r, d_in], B [..., L, d_out, r])}``; leading dim = batch or absent (one task)."""


@dataclass(frozen=True)
class HyperNetConfig:
    """Hypernetwork hyper-parameters; defaults are spec §5 with the ViT-B/16 geometry.

    ``head_in_dim`` is open point O-5 (paper 512, code 768); we default to the code's 768, see
    docs/model.md.
    """

    num_tasks: int = 25
    num_layers: int = 12
    hidden_size: int = 768
    intermediate_size: int = 3072
    rank: int = 16
    task_embed_dim: int = 512
    task_code_dim: int = 64
    depth_code_dim: int = 32
    type_code_dim: int = 32
    head_in_dim: int = 768
    expansion: int = 4
    num_res_blocks: int = 2
    dropout: float = 0.05
    target_types: tuple[str, ...] = MODULE_TYPES
    task_init_std: float = 0.02
    head_init_std: float = 0.01
    zero_init_b: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_types", tuple(self.target_types))
        unknown = [t for t in self.target_types if t not in MODULE_TYPES]
        if unknown or not self.target_types or len(set(self.target_types)) != len(self.target_types):
            raise ValueError(
                f"target_types must be distinct members of {MODULE_TYPES}, got {self.target_types}"
            )
        # keep the canonical order so factor flattening (PCA, spec §9.3) is stable
        object.__setattr__(self, "target_types", tuple(t for t in MODULE_TYPES if t in self.target_types))
        if self.num_tasks < 1 or self.num_layers < 1 or self.rank < 1:
            raise ValueError("num_tasks, num_layers and rank must be >= 1")

    @property
    def latent_dim(self) -> int:
        return self.task_code_dim + self.depth_code_dim + self.type_code_dim

    def dims(self, module_type: str) -> tuple[int, int]:
        """``(d_in, d_out)`` of the target linear of that type."""
        h, m = self.hidden_size, self.intermediate_size
        return {"q": (h, h), "k": (h, h), "v": (h, h), "o": (h, h), "up": (h, m), "down": (m, h)}[module_type]

    @property
    def lora_values_per_task(self) -> int:
        """Number of generated A and B entries for one task (spec §5.4: 2,654,208 for ViT-B)."""
        return self.num_layers * sum(self.rank * sum(self.dims(t)) for t in self.target_types)

    @classmethod
    def for_backbone(
        cls, hidden_size: int, intermediate_size: int, num_layers: int, **overrides: Any
    ) -> HyperNetConfig:
        return cls(
            hidden_size=hidden_size, intermediate_size=intermediate_size, num_layers=num_layers, **overrides
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_types"] = list(self.target_types)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HyperNetConfig:
        known = {f.name for f in fields(cls)}
        extra = set(data) - known
        if extra:
            raise ValueError(f"unknown HyperNetConfig fields: {sorted(extra)}")
        return cls(**{**data, "target_types": tuple(data.get("target_types", MODULE_TYPES))})


class _ResidualBlock(nn.Module):
    """z + [LayerNorm → Linear(L→4L) → SiLU → Dropout → Linear(4L→L) → SiLU → Dropout](z)."""

    def __init__(self, dim: int, expansion: int, dropout: float) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, expansion * dim),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(expansion * dim, dim),
            nn.SiLU(),
            nn.Dropout(dropout),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.body(z)


class HyperTrunk(nn.Module):
    """Mixer → residual blocks → output projection (spec Table 14)."""

    def __init__(self, cfg: HyperNetConfig) -> None:
        super().__init__()
        dim, wide, p = cfg.latent_dim, cfg.expansion * cfg.latent_dim, cfg.dropout
        self.mixer = nn.Sequential(
            nn.Dropout(p),
            nn.Linear(dim, wide),
            nn.SiLU(),
            nn.Dropout(p),
            nn.Linear(wide, dim),
            nn.SiLU(),
            nn.Dropout(p),
        )
        self.blocks = nn.ModuleList(
            [_ResidualBlock(dim, cfg.expansion, p) for _ in range(cfg.num_res_blocks)]
        )
        self.out_proj = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, wide),
            nn.SiLU(),
            nn.Dropout(p),
            nn.Linear(wide, cfg.head_in_dim),
            nn.SiLU(),
        )

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        z = self.mixer(latent)
        for block in self.blocks:
            z = block(z)
        return self.out_proj(z)


class HyperNetwork(nn.Module):
    """Generates per-sample LoRA factors for every (layer, module type) from a task id.

    ``forward(task_ids)`` always regenerates (training path, dropout active in train mode).
    ``factors(task_ids)`` uses a per-task cache in eval mode (spec §5.3 "computed once per task"); the
    cache is dropped on ``train()``, device/dtype moves, ``load_state_dict`` and whenever any parameter
    is modified in place (tracked through the tensors' version counters).
    """

    def __init__(self, cfg: HyperNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.use_cache = True
        self._cache: dict[int, Factors] = {}
        self._cache_stamp: tuple[int, ...] | None = None
        if cfg.seed is None:
            self._build()
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                self._build()

    def _build(self) -> None:
        cfg = self.cfg
        self.task_embedding = nn.Embedding(cfg.num_tasks, cfg.task_embed_dim)
        self.task_encoder = nn.Sequential(
            nn.Linear(cfg.task_embed_dim, cfg.task_code_dim), nn.LayerNorm(cfg.task_code_dim)
        )
        self.depth_embedding = nn.Embedding(cfg.num_layers, cfg.depth_code_dim)
        self.depth_norm = nn.LayerNorm(cfg.depth_code_dim)
        self.type_embedding = nn.Embedding(len(MODULE_TYPES), cfg.type_code_dim)
        self.type_norm = nn.LayerNorm(cfg.type_code_dim)
        self.trunk = HyperTrunk(cfg)
        self.heads = nn.ModuleDict(
            {t: nn.Linear(cfg.head_in_dim, cfg.rank * sum(cfg.dims(t))) for t in cfg.target_types}
        )
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        cfg = self.cfg
        nn.init.normal_(self.task_embedding.weight, mean=0.0, std=cfg.task_init_std)
        for t in cfg.target_types:
            head = self._head(t)
            n_a = cfg.rank * cfg.dims(t)[0]
            nn.init.normal_(head.weight, mean=0.0, std=cfg.head_init_std)
            nn.init.normal_(head.bias[:n_a], mean=0.0, std=cfg.head_init_std)
            nn.init.zeros_(head.bias[n_a:])
            if cfg.zero_init_b:
                nn.init.zeros_(head.weight[n_a:])
        # everything else keeps PyTorch defaults (Kaiming-uniform Linear, N(0,1) Embedding, LN (1, 0)) as in the code

    def _head(self, module_type: str) -> nn.Linear:
        head = self.heads[module_type]
        assert isinstance(head, nn.Linear)
        return head

    # -- generation ---------------------------------------------------------------------------------
    def latent(self, task_ids: torch.Tensor) -> torch.Tensor:
        """Trunk input ``[B, T, num_layers, 128]`` for the targeted types T."""
        cfg = self.cfg
        n, t_count, layers = task_ids.shape[0], len(cfg.target_types), cfg.num_layers
        task_code = self.task_encoder(self.task_embedding(task_ids))  # [B, 64]
        depth_code = self.depth_norm(self.depth_embedding.weight)  # [layers, 32]
        type_rows = torch.tensor([MODULE_TYPES.index(t) for t in cfg.target_types], device=task_ids.device)
        type_code = self.type_norm(self.type_embedding(type_rows))  # [T, 32]
        return torch.cat(
            [
                task_code[:, None, None, :].expand(n, t_count, layers, cfg.task_code_dim),
                depth_code[None, None, :, :].expand(n, t_count, layers, cfg.depth_code_dim),
                type_code[None, :, None, :].expand(n, t_count, layers, cfg.type_code_dim),
            ],
            dim=-1,
        )

    def forward(self, task_ids: torch.Tensor) -> Factors:
        """``task_ids [B] long`` → ``{type: (A [B, L, r, d_in], B [B, L, d_out, r])}``."""
        cfg = self.cfg
        if task_ids.dim() != 1:
            raise ValueError(f"task_ids must be 1-D [B], got shape {tuple(task_ids.shape)}")
        hidden = self.trunk(self.latent(task_ids.long()))  # [B, T, L, head_in]
        n, r = task_ids.shape[0], cfg.rank
        out: Factors = {}
        for i, t in enumerate(cfg.target_types):
            d_in, d_out = cfg.dims(t)
            o = self._head(t)(hidden[:, i])  # [B, L, r·(d_in + d_out)]
            a = o[..., : r * d_in].reshape(n, cfg.num_layers, r, d_in)
            b = o[..., r * d_in :].reshape(n, cfg.num_layers, d_out, r)
            out[t] = (a, b)
        return out

    def check_task_ids(self, task_ids: torch.Tensor) -> None:
        """Fail early on out-of-range ids (an embedding lookup on GPU would only assert)."""
        if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= self.cfg.num_tasks):
            raise IndexError(f"task ids must lie in [0, {self.cfg.num_tasks}), got {task_ids.tolist()}")

    def factors(self, task_ids: torch.Tensor) -> Factors:
        """Per-sample factors; cached per task in eval mode (no gradient to the hypernetwork then)."""
        self.check_task_ids(task_ids)
        if self.training or not self.use_cache:
            return self.forward(task_ids)
        ids = [int(i) for i in task_ids.tolist()]
        missing = sorted({i for i in ids if i not in self._valid_cache()})
        if missing:
            self._cache.update(self.task_factors_batch(missing))
        return {
            t: (
                torch.stack([self._cache[i][t][0] for i in ids]),
                torch.stack([self._cache[i][t][1] for i in ids]),
            )
            for t in self.cfg.target_types
        }

    @torch.no_grad()
    def task_factors_batch(self, task_ids: list[int]) -> dict[int, Factors]:
        """Detached factors for each listed task, ``{task: {type: (A [L,r,d_in], B [L,d_out,r])}}``."""
        was_training = self.training
        nn.Module.train(self, False)  # bypass our train(): it would drop the cache being filled
        try:
            device = self.task_embedding.weight.device
            full = self.forward(torch.tensor(task_ids, dtype=torch.long, device=device))
        finally:
            nn.Module.train(self, was_training)
        return {tid: {t: (a[j], b[j]) for t, (a, b) in full.items()} for j, tid in enumerate(task_ids)}

    def task_factors(self, task_id: int) -> Factors:
        """Detached eval-mode factors of one task, no batch dim (for folding / export / PCA)."""
        self.check_task_ids(torch.tensor([task_id]))
        return self.task_factors_batch([int(task_id)])[int(task_id)]

    # -- cache bookkeeping --------------------------------------------------------------------------
    def _stamp(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.parameters())

    def _valid_cache(self) -> dict[int, Factors]:
        stamp = self._stamp()
        if stamp != self._cache_stamp:
            self._cache.clear()
            self._cache_stamp = stamp
        return self._cache

    def clear_cache(self) -> None:
        self._cache.clear()
        self._cache_stamp = None

    def train(self, mode: bool = True) -> HyperNetwork:
        self.clear_cache()
        return super().train(mode)

    def _apply(self, fn: Any, recurse: bool = True) -> HyperNetwork:  # .to(), .cuda(), .half(), ...
        self.clear_cache()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.clear_cache()
        super()._load_from_state_dict(*args, **kwargs)

    # -- bookkeeping --------------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """Counts by component, matching the rows of spec §5.4 ("trunk" excludes the task table)."""

        def count(*modules: nn.Module) -> int:
            return sum(p.numel() for m in modules for p in m.parameters())

        trunk = count(
            self.task_encoder,
            self.depth_embedding,
            self.depth_norm,
            self.type_embedding,
            self.type_norm,
            self.trunk,
        )
        heads = {t: count(h) for t, h in self.heads.items()}
        table = count(self.task_embedding)
        return {
            "task_embedding": table,
            "trunk": trunk,
            **{f"head_{t}": n for t, n in heads.items()},
            "heads": sum(heads.values()),
            "hypernet": trunk + sum(heads.values()),
            "hypernet_with_table": trunk + sum(heads.values()) + table,
            "lora_values_per_task": self.cfg.lora_values_per_task,
        }

    def extra_repr(self) -> str:
        c = self.cfg
        return f"tasks={c.num_tasks}, layers={c.num_layers}, rank={c.rank}, head_in={c.head_in_dim}, types={c.target_types}"
