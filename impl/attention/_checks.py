"""Input checks shared by every attention backend, the masks they take, and the grouped-query head mapping.

Masks, in the order a backend combines them (a key is visible when all that are given allow it):
- `causal`: query i sees keys j <= i + (Nk - Nq), bottom-right aligned, so that a decode step whose Nq queries
  are the last Nq of Nk cached positions sees exactly its past (as flash-attn >= 2.1 and FlexAttention do; SDPA's
  `is_causal` is top-left aligned and equal only when Nq == Nk). Causal needs Nq <= Nk.
- `document_ids` (B, Nk), integers non-decreasing along each row: a key is visible only to queries of the same
  document. The queries are the last Nq positions, so their ids are document_ids[:, Nk - Nq:].
- `cu_seqlens` (D + 1,), the varlen form of FlashAttention: 0 = c_0 < c_1 < ... < c_D = Nk, document d holding
  positions [c_d, c_{d+1}) of every row; the same as document_ids = [0]*(c_1-c_0) + [1]*(c_2-c_1) + ...
- `mask` (boolean, broadcastable to (B, Hq, Nq, Nk), True = may attend): anything else, on the backends that
  read a dense mask (naive, sdpa, torch).
"""

import itertools
import math

import torch

from impl.common.checks import check_bool, check_tensor, is_number, show


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
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(
            f"causal attention needs no more queries than keys (bottom-right aligned), got q {q.shape[2]} and "
            f"k {k.shape[2]}"
        )
    if scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    if not is_number(scale) or not 0 < scale < math.inf:
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")
    return float(scale)


def repeat_kv(x: torch.Tensor, n_q_heads: int) -> torch.Tensor:
    """Grouped-query attention: q head h reads k/v head h // (n_q_heads // n_kv_heads), as in torch SDPA."""
    return x.repeat_interleave(n_q_heads // x.shape[1], dim=1)  # (B, Hq, N, D)


def check_masks(
    q: torch.Tensor,
    k: torch.Tensor,
    document_ids: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Validate the optional masks of `attention`; return (document_ids as (B, Nk) long or None, mask or None)."""
    b, n_k = q.shape[0], k.shape[2]
    if document_ids is not None and cu_seqlens is not None:
        raise ValueError("give document_ids or cu_seqlens, not both (they say the same thing), got both")
    if (document_ids is not None or cu_seqlens is not None) and q.shape[2] > n_k:
        raise ValueError(
            f"document masks need no more queries than keys (the queries are the last Nq keys), got q {q.shape[2]} "
            f"and k {n_k}"
        )
    if cu_seqlens is not None:
        document_ids = cu_seqlens_to_document_ids(cu_seqlens, n_k, q.device).expand(b, n_k)
    elif document_ids is not None:
        check_tensor("document_ids", document_ids, shape=(b, n_k), integer=True, device=q.device)
        drops = (document_ids[:, 1:] < document_ids[:, :-1]).nonzero()
        if len(drops):
            row, pos = drops[0].tolist()
            raise ValueError(
                "document_ids must be non-decreasing along each row (documents are contiguous runs), got "
                f"{document_ids[row, pos].item()} then {document_ids[row, pos + 1].item()} at row {row}, "
                f"positions {pos} and {pos + 1}"
            )
    if mask is not None:
        check_tensor("mask", mask, dtype=torch.bool, device=q.device)
        full = (b, q.shape[1], q.shape[2], n_k)
        if mask.dim() != 4 or any(m not in (1, n) for m, n in zip(mask.shape, full)):
            raise ValueError(f"mask must be 4-D and broadcastable to (B, Hq, Nq, Nk) = {full}, got {tuple(mask.shape)}")
    return document_ids, mask


def cu_seqlens_to_document_ids(cu_seqlens: torch.Tensor, total: int, device: torch.device) -> torch.Tensor:
    """(1, total) document ids from cumulative lengths 0 = c_0 < c_1 < ... < c_D = total."""
    check_tensor("cu_seqlens", cu_seqlens, dim=1, integer=True, device=device)
    c = cu_seqlens.tolist()
    if len(c) < 2 or c[0] != 0 or c[-1] != total or any(b <= a for a, b in itertools.pairwise(c)):
        raise ValueError(
            f"cu_seqlens must start at 0, strictly increase and end at the key length {total}, got {show(c)}"
        )
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return torch.repeat_interleave(torch.arange(len(c) - 1, device=device), lengths)[None]


def dense_mask(
    n_q: int,
    n_k: int,
    *,
    causal: bool,
    document_ids: torch.Tensor | None,
    mask: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """The boolean (B or 1, Hq or 1, Nq, Nk) mask all given masks allow (True = may attend), None if none."""
    allowed = mask
    if causal:
        tri = torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril(n_k - n_q)[None, None]
        allowed = tri if allowed is None else allowed & tri
    if document_ids is not None:
        same = (document_ids[:, n_k - n_q :, None] == document_ids[:, None, :])[:, None]  # (B, 1, Nq, Nk)
        allowed = same if allowed is None else allowed & same
    return allowed
