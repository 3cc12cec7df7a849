"""The DINOv3 forward the exported graphs are traced from: same maths, fewer and cheaper ONNX nodes.

``transformers``' ``DINOv3ViTModel`` forward is written for any image size and every output; traced
as is, each attention block carries a RoPE chain (split off the prefix tokens, ``rotate_half`` by
slicing, negating and concatenating, concatenate the prefix back: 9 nodes for q and for k) and the
last block runs all of its tokens through the MLP although only the CLS row reaches the outputs.
On the 2-core Intel CI VM that made ONNX Runtime slower than PyTorch eager (``docs/export.md`` §5).
The exported models have a fixed image size, so here:

* **RoPE tables are initializers** for that grid, computed by the model's own
  ``rope_embeddings`` in eval mode (its coordinate shift/jitter/rescale augmentations are train-only)
  and padded with cos = 1, sin = 0 rows for the CLS and register tokens, with ``rotate_half``'s sign
  folded into sin: ``x·cos + swap(x)·sin`` over all tokens, where ``swap`` (exchange the two halves of
  each head) is one reversed ``Slice``. Bit-identical to the transformers rotation in fp32.
* **Tokens stay 2-D** (``[N·T, D]``) between blocks, so every linear is one ``Gemm`` with its bias
  inside, instead of a 3-D ``MatMul`` plus a separate bias ``Add`` that ONNX Runtime does not fuse.
* **The last block computes only what the outputs read**: keys and values of every token, the CLS
  query, attention row, MLP and final norm (exact: rows of a block only mix in the attention).

``vit_cls_forward`` returns the final-norm CLS feature and the last block's CLS attention row,
which is all the merged and factored graphs use (``training/attention.py``).
"""

from __future__ import annotations

import torch
from transformers import DINOv3ViTModel
from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTAttention


def rope_tables(vit: DINOv3ViTModel, image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of shape ``[T, hidden]`` for every token of an ``image_size`` image, all heads.

    ``T`` = prefix tokens + patches. Prefix rows are the identity rotation (cos 1, sin 0); the first
    half of each head's sin is negated, so ``x·cos + swap_halves(x)·sin`` equals transformers'
    ``x·cos + rotate_half(x)·sin`` on the patches and leaves CLS/registers unchanged. Tiled over the
    heads so the products broadcast over the image axis only (ONNX Runtime's fast broadcast case).
    """
    rope = vit.rope_embeddings
    was_training = rope.training
    rope.train(False)  # pos_embed_shift/jitter/rescale only apply in training
    try:
        with torch.no_grad():
            probe = torch.zeros(1, 3, *image_size, dtype=torch.float32)
            cos, sin = rope(probe)  # [P, head_dim], computed exactly as the eager forward does
    finally:
        rope.train(was_training)
    prefix = 1 + int(vit.config.num_register_tokens)
    heads = int(vit.config.num_attention_heads)
    head_dim = cos.shape[-1]
    half = head_dim // 2
    cos = torch.cat([torch.ones(prefix, head_dim), cos.float()])
    sin = torch.cat([torch.zeros(prefix, head_dim), sin.float()])
    sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
    return cos.repeat(1, heads).contiguous(), sin.repeat(1, heads).contiguous()


def _rotate(x: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x [n, T, hidden]``: the halves of each head swapped by one reversed slice."""
    n, t, d = x.shape
    swapped = x.reshape(n, t, heads, 2, d // heads // 2).flip(3).reshape(n, t, d)
    return x * cos + swapped * sin


def _attention_block(
    attn: DINOv3ViTAttention, h: torch.Tensor, n: int, t: int, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """One ``DINOv3ViTAttention`` on 2-D tokens ``h [n·T, D]`` (eager softmax, no mask, no dropout)."""
    heads, head_dim = int(attn.num_heads), int(attn.head_dim)
    q = _rotate(attn.q_proj(h).reshape(n, t, -1), heads, cos, sin).reshape(n, t, heads, head_dim)
    k = _rotate(attn.k_proj(h).reshape(n, t, -1), heads, cos, sin).reshape(n, t, heads, head_dim)
    q, k = q.transpose(1, 2), k.permute(0, 2, 3, 1)  # [n, H, T, hd], [n, H, hd, T]
    v = attn.v_proj(h).reshape(n, t, heads, head_dim).transpose(1, 2)
    weights = torch.softmax(torch.matmul(q, k) * attn.scaling, dim=-1)
    out = torch.matmul(weights, v).transpose(1, 2).reshape(n * t, heads * head_dim)
    return attn.o_proj(out)


def vit_cls_forward(
    vit: DINOv3ViTModel, images: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``images [N,3,H,W]`` → ``(cls [N, D], cls_attention [N, heads, T])`` of an eval-mode DINOv3.

    ``cls`` is ``last_hidden_state[:, 0]`` (after the final norm) and ``cls_attention`` the last
    block's softmax row of the CLS query (``attentions[-1][:, :, 0]``), as ``DINOv3ViTModel`` gives
    them; ``cos``/``sin`` from :func:`rope_tables` for this image size. Drop-path and dropout are
    identities here (inference only).
    """
    x = vit.embeddings(images.to(vit.embeddings.patch_embeddings.weight.dtype))  # [n, T, D]
    n, t, d = x.shape
    x = x.reshape(n * t, d)
    *blocks, last = vit.model.layer
    for layer in blocks:
        x = x + layer.layer_scale1(_attention_block(layer.attention, layer.norm1(x), n, t, cos, sin))
        x = x + layer.layer_scale2(layer.mlp(layer.norm2(x)))
    # last block: keys/values of every token, everything else for the CLS row only
    attn = last.attention
    heads, head_dim = int(attn.num_heads), int(attn.head_dim)
    h = last.norm1(x)
    k = _rotate(attn.k_proj(h).reshape(n, t, d), heads, cos, sin)
    k = k.reshape(n, t, heads, head_dim).permute(0, 2, 3, 1)  # [n, H, hd, T]
    v = attn.v_proj(h).reshape(n, t, heads, head_dim).transpose(1, 2)  # [n, H, T, hd]
    q = attn.q_proj(h.reshape(n, t, d)[:, 0]).reshape(n, heads, 1, head_dim)  # CLS: no rotation
    weights = torch.softmax(torch.matmul(q, k) * attn.scaling, dim=-1)  # [n, H, 1, T]
    cls = x.reshape(n, t, d)[:, 0] + last.layer_scale1(
        attn.o_proj(torch.matmul(weights, v).reshape(n, heads * head_dim))
    )
    cls = cls + last.layer_scale2(last.mlp(last.norm2(cls)))
    return vit.norm(cls), weights.reshape(n, heads, t)
