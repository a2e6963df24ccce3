"""Naive attention, softmax(Q K^T * scale) V with the N x N score matrix materialized.

"Attention Is All You Need" (Vaswani et al., 2017), equation 1. The baseline every other backend is checked
against, and the one whose memory grows as N^2. A query row whose mask hides every key gives 0 (and no
gradient), as torch SDPA and the tiled backends do.
"""

import torch

from impl.attention._checks import check_masks, check_qkv, dense_mask, repeat_kv


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    document_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over (batch, heads, seq, head_dim) inputs; k/v may have fewer heads than q (GQA). The masks are
    those of `impl.attention.attention` (causal bottom-right aligned, document ids, cumulative lengths, boolean)."""
    scale = check_qkv(q, k, v, causal, scale)
    document_ids, mask = check_masks(q, k, document_ids, cu_seqlens, mask)
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Nq, Nk)
    allowed = dense_mask(
        q.shape[2], k.shape[2], causal=causal, document_ids=document_ids, mask=mask, device=q.device
    )
    if allowed is None:
        return torch.softmax(scores, dim=-1) @ v  # (B, H, Nq, D)
    blind = ~allowed.any(-1, keepdim=True)  # rows that see no key (a dense mask only): 0, as torch SDPA gives
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(blind, 0.0)
    return torch.softmax(scores, dim=-1).masked_fill(blind, 0.0) @ v
