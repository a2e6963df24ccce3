"""Naive attention, softmax(Q K^T * scale) V with the N x N score matrix materialized.

"Attention Is All You Need" (Vaswani et al., 2017), equation 1. The baseline every other backend is checked
against, and the one whose memory grows as N^2.
"""

import torch

from impl.attention._checks import check_qkv, repeat_kv


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, scale: float | None = None
) -> torch.Tensor:
    """Attention over (batch, heads, seq, head_dim) inputs; k/v may have fewer heads than q (GQA)."""
    scale = check_qkv(q, k, v, causal, scale)
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Nq, Nk)
    if causal:
        n = q.shape[2]
        future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v  # (B, H, Nq, D)
