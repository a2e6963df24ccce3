"""Attention backends behind one front: naive, tiled FlashAttention in PyTorch, FlashAttention-2 in Triton, SDPA.

`attention(q, k, v, causal=..., scale=..., backend=...)` takes (batch, heads, seq, head_dim) tensors; k/v may
have fewer heads than q (grouped-query attention) and, with causal=True, more positions than q (a decode step
over a KV cache: the causal mask is bottom-right aligned). Documents packed into one row are kept apart by
`document_ids` (B, Nk) or `cu_seqlens`, an arbitrary boolean `mask` goes to the backends that read one (naive,
torch, sdpa; Triton refuses it by name); `_checks.py` defines them. The tiled and Triton backends visit only the
tiles the causal and document masks leave live, so packed attention costs the live area, not the N x N square.
`backend="auto"` picks Triton on CUDA (SDPA when a dense `mask` is given) and the tiled PyTorch version elsewhere.
"""

import torch
import torch.nn.functional as F

from impl.attention._checks import check_masks, check_qkv, dense_mask
from impl.attention.flash_torch import flash_attention_torch
from impl.attention.flash_triton import flash_attention_triton
from impl.attention.naive import naive_attention
from impl.common.checks import check_one_of

__all__ = ["attention", "flash_attention_torch", "flash_attention_triton", "naive_attention"]

BACKENDS = ("auto", "naive", "torch", "triton", "sdpa")


def _sdpa(q, k, v, *, causal: bool, scale: float, document_ids, mask) -> torch.Tensor:
    """torch SDPA; anything but plain square causal attention goes in as an explicit boolean mask."""
    gqa = q.shape[1] != k.shape[1]
    if document_ids is None and mask is None and (not causal or q.shape[2] == k.shape[2]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    allowed = dense_mask(q.shape[2], k.shape[2], causal=causal, document_ids=document_ids, mask=mask, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    document_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T * scale + log(allowed)) v through the chosen backend: auto, naive, torch, triton or sdpa."""
    check_one_of("backend", backend, BACKENDS)
    scale = check_qkv(q, k, v, causal, scale)
    document_ids, mask = check_masks(q, k, document_ids, cu_seqlens, mask)
    if backend == "auto":
        backend = ("sdpa" if mask is not None else "triton") if q.is_cuda else "torch"
    masks = {name: m for name, m in (("document_ids", document_ids), ("mask", mask)) if m is not None}
    if backend == "naive":
        return naive_attention(q, k, v, causal=causal, scale=scale, **masks)
    if backend == "torch":
        return flash_attention_torch(q, k, v, causal=causal, scale=scale, **masks)
    if backend == "triton":
        return flash_attention_triton(q, k, v, causal=causal, scale=scale, **masks)
    return _sdpa(q, k, v, causal=causal, scale=scale, document_ids=document_ids, mask=mask)
