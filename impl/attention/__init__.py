"""Attention backends behind one front: naive, tiled FlashAttention in PyTorch, FlashAttention-2 in Triton, SDPA.

`attention(q, k, v, causal=..., scale=..., backend=...)` takes (batch, heads, seq, head_dim) tensors; k/v may
have fewer heads than q (grouped-query attention). `backend="auto"` picks Triton on CUDA and the tiled PyTorch
version elsewhere.
"""

import torch
import torch.nn.functional as F

from impl.attention._checks import check_qkv
from impl.attention.flash_torch import flash_attention_torch
from impl.attention.flash_triton import flash_attention_triton
from impl.attention.naive import naive_attention
from impl.common.checks import check_one_of

__all__ = ["attention", "flash_attention_torch", "flash_attention_triton", "naive_attention"]

BACKENDS = ("auto", "naive", "torch", "triton", "sdpa")


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T * scale) v through the chosen backend: auto, naive, torch, triton or sdpa."""
    check_one_of("backend", backend, BACKENDS)
    scale = check_qkv(q, k, v, causal, scale)
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    if backend == "naive":
        return naive_attention(q, k, v, causal=causal, scale=scale)
    if backend == "torch":
        return flash_attention_torch(q, k, v, causal=causal, scale=scale)
    if backend == "triton":
        return flash_attention_triton(q, k, v, causal=causal, scale=scale)
    return _sdpa(q, k, v, causal=causal, scale=scale)
