"""Input checks shared by every attention backend, and the grouped-query head mapping."""

import math

import torch

from impl.common.checks import check_bool, is_number


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None) -> float:
    """Validate (batch, heads, seq, head_dim) inputs; return the softmax scale (1/sqrt(head_dim) by default)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
        if t.shape[0] != q.shape[0]:
            raise ValueError(f"{name} batch must equal q batch ({q.shape[0]}), got {t.shape[0]}")
        if t.shape[-1] != q.shape[-1]:
            raise ValueError(f"{name} head_dim must equal q head_dim ({q.shape[-1]}), got {t.shape[-1]}")
    if v.shape[1:3] != k.shape[1:3]:
        raise ValueError(f"v (heads, seq) must equal k's {tuple(k.shape[1:3])}, got {tuple(v.shape[1:3])}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q heads ({q.shape[1]}) must be divisible by k/v heads, got {k.shape[1]} k/v heads")
    if q.shape[-1] < 1:
        raise ValueError(f"q head_dim must be >= 1, got {q.shape[-1]} (shape {tuple(q.shape)})")
    check_bool("causal", causal)
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal attention needs equal q and k seq lengths, got q {q.shape[2]} and k {k.shape[2]}")
    if scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    if not is_number(scale) or not 0 < scale < math.inf:
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")
    return float(scale)


def repeat_kv(x: torch.Tensor, n_q_heads: int) -> torch.Tensor:
    """Grouped-query attention: q head h reads k/v head h // (n_q_heads // n_kv_heads), as in torch SDPA."""
    return x.repeat_interleave(n_q_heads // x.shape[1], dim=1)  # (B, Hq, N, D)
