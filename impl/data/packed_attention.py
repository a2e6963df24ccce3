"""Attention over packed rows with the document-causal mask (Krell et al. 2021, section 3.2), and a forward
of the project's GPT over packed rows.

Three ways to keep documents apart, all equal to running each document alone:

- `naive`: softmax(q k^T * scale + log M) v with the (rows, T, T) mask M materialized;
- `sdpa`: torch `scaled_dot_product_attention` with the same boolean mask as `attn_mask`;
- `segments`: the varlen idea of FlashAttention's `flash_attn_varlen_func` (cu_seqlens): cut every row at
  its document boundaries and call the project's `attention()` front with causal=True once per segment, so
  any of its backends (naive, tiled torch, Triton, SDPA) serves without knowing about masks. Segments of
  equal length are batched into one call.

`gpt_packed_forward` runs `impl.gpt.GPT`'s own modules with the packed position ids and the masked attention,
because `GPT.forward` takes neither position ids nor a mask.
"""

import math

import torch
import torch.nn.functional as F

from impl.attention import attention
from impl.common.checks import check_one_of, check_tensor
from impl.data.packing import document_mask

METHODS = ("naive", "sdpa", "segments")


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_ids: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, floating=True)
    check_tensor("document_ids", document_ids, integer=True)
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must share one (rows, heads, seq_len, head_dim) shape, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    expected = (q.shape[0], q.shape[2])
    if tuple(document_ids.shape) != expected:
        raise ValueError(f"document_ids must have shape (rows, seq_len) = {expected}, got {tuple(document_ids.shape)}")


def _segments(document_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of every run of equal document ids, padding runs included."""
    ids = document_ids.tolist()
    out = []
    for r, row in enumerate(ids):
        start = 0
        for t in range(1, len(row) + 1):
            if t == len(row) or row[t] != row[start]:
                out.append((r, start, t))
                start = t
    return out


def _by_segments(q, k, v, document_ids, backend):
    out = torch.empty_like(q)
    by_length: dict[int, list[tuple[int, int]]] = {}
    for r, s, e in _segments(document_ids):
        by_length.setdefault(e - s, []).append((r, s))
    for n, starts in by_length.items():
        qs, ks, vs = (torch.stack([t[r, :, s : s + n] for r, s in starts]) for t in (q, k, v))  # (segs, H, n, D)
        ys = attention(qs, ks, vs, causal=True, backend=backend)
        for (r, s), y in zip(starts, ys):
            out[r, :, s : s + n] = y
    return out


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    document_ids: torch.Tensor,
    *,
    method: str = "sdpa",
    backend: str = "auto",
) -> torch.Tensor:
    """Document-causal attention of q, k, v (rows, heads, T, head_dim) given document_ids (rows, T);
    `method` is naive, sdpa or segments, `backend` the attention front's backend for segments."""
    check_one_of("method", method, METHODS)
    _check(q, k, v, document_ids)
    if method == "segments":
        return _by_segments(q, k, v, document_ids, backend)
    mask = document_mask(document_ids)[:, None]  # (rows, 1, T, T), broadcast over heads
    if method == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (rows, heads, T, T)
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v


def gpt_packed_forward(
    model,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    document_ids: torch.Tensor,
    *,
    method: str = "sdpa",
    backend: str = "auto",
) -> torch.Tensor:
    """Logits (rows, T, vocab) of an `impl.gpt.GPT` over packed rows: its modules, in its order, with the packed
    position ids and `packed_attention` in place of plain causal attention."""
    from impl.gpt import GPT

    if not isinstance(model, GPT):
        raise TypeError(f"model must be an impl.gpt.GPT, got {type(model).__name__}")
    for name, t in (("input_ids", input_ids), ("position_ids", position_ids), ("document_ids", document_ids)):
        if not isinstance(t, torch.Tensor) or t.shape != input_ids.shape or t.dim() != 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a (rows, seq_len) tensor shaped like input_ids, got {shape}")
    tr = model.transformer
    x = tr.drop(tr.wte(input_ids) + tr.wpe(position_ids))  # (rows, T, C)
    B, T, C = x.shape
    for block in tr.h:
        att = block.attn
        q, k, v = att.c_attn(block.ln_1(x)).split(C, dim=2)  # 3 x (rows, T, C)
        q, k, v = (t.view(B, T, att.n_head, C // att.n_head).transpose(1, 2) for t in (q, k, v))  # (rows, H, T, D)
        y = packed_attention(q, k, v, document_ids, method=method, backend=backend)
        x = x + att.resid_dropout(att.c_proj(y.transpose(1, 2).reshape(B, T, C)))
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(tr.ln_f(x))  # (rows, T, vocab)
