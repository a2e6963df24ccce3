"""FlashAttention in plain PyTorch: tiled online softmax, backward recomputed from the saved logsumexp.

Dao et al., "FlashAttention-2" (2023), Algorithm 1 (forward) and Algorithm 2 (backward). The forward walks k/v
in blocks, keeping per-row running max m, normalizer l and unnormalized output; it saves only O and the
logsumexp L = m + log l. The backward recomputes each score tile from q, k and L:
P = exp(S - L), dV += P^T dO, dP = dO V^T, dS = P * (dP - D) with D = rowsum(dO * O), dQ += dS K, dK += dS^T Q.
No N x N tensor exists at any time: the largest temporary is one (block_q, block_k) tile per head.

Masks (see `_checks.py`): causal is bottom-right aligned (query i sits at key position i + Nk - Nq). Documents
are contiguous runs of keys, so the keys a q block can see form one range [lo, hi): from the first key of its
first row's document to the last key of its last row's document, cut at the causal diagonal. `_live_tiles`
computes these ranges once per call (torch.searchsorted over the document ids) and lists the tiles inside them;
the forward and the backward visit only those, so the work falls with the live fraction of the N x N square.
Inside a tile the causal, document and dense boolean masks set scores to -inf. A row that sees no key at all
(possible only with a dense mask) gives 0 and no gradient, as torch SDPA does.

Grouped-query attention keeps k/v at their own head count: q is viewed as (B, Hkv, G, N, D) and each k/v tile
broadcasts over the G query heads of its group; dK and dV sum over that group.
"""

from dataclasses import dataclass

import torch

from impl.attention._checks import check_masks, check_qkv
from impl.common.checks import check_positive_int


@dataclass(frozen=True)
class _Masks:
    causal: bool
    offset: int  # Nk - Nq: key position of query 0
    document_ids: torch.Tensor | None  # (B, Nk) long
    mask: torch.Tensor | None  # (B or 1, Hkv or 1, G or 1, Nq, Nk) bool, expanded over Nq and Nk
    device: torch.device

    def tile(self, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor | None:
        """The (B or 1, Hkv or 1, G or 1, q1 - q0, k1 - k0) visibility of one tile, None if all of it is visible."""
        allowed = None if self.mask is None else self.mask[..., q0:q1, k0:k1]
        if self.causal and k1 - 1 > q0 + self.offset:  # the tile straddles the diagonal
            rows = torch.arange(q0 + self.offset, q1 + self.offset, device=self.device)[:, None]
            future = torch.arange(k0, k1, device=self.device)[None, :] > rows
            allowed = ~future if allowed is None else allowed & ~future
        if self.document_ids is not None:
            doc_q = self.document_ids[:, q0 + self.offset : q1 + self.offset, None]
            same = (doc_q == self.document_ids[:, None, k0:k1])[:, None, None]  # (B, 1, 1, bq, bk)
            allowed = same if allowed is None else allowed & same
        return allowed


def _live_tiles(n_q: int, n_k: int, masks: _Masks, block_q: int, block_k: int) -> list[tuple[int, int, int, int]]:
    """(q0, q1, k0, k1) of every tile holding a key some row of the q block may see, grouped by q block."""
    starts = list(range(0, n_q, block_q))
    ends = [min(s + block_q, n_q) for s in starts]
    lo, hi = [0] * len(starts), [n_k] * len(starts)
    if masks.document_ids is not None:  # key range [first key of the first row's doc, last key of the last row's)
        ids = masks.document_ids.contiguous()
        first = ids[:, [s + masks.offset for s in starts]]  # (B, blocks): document of each block's first row
        last = ids[:, [e - 1 + masks.offset for e in ends]]
        lo = torch.searchsorted(ids, first).amin(0).tolist()  # tiles span the batch: the union of its ranges
        hi = torch.searchsorted(ids, last, right=True).amax(0).tolist()
    if masks.causal:
        hi = [min(h, e + masks.offset) for h, e in zip(hi, ends)]
    blocks = zip(starts, ends, lo, hi)
    return [(q0, q1, k0, min(k0 + block_k, h)) for q0, q1, first, h in blocks for k0 in range(first, h, block_k)]


def _scores(q_blk, k_blk, scale, allowed):
    """One (B, Hkv, G, bq, bk) tile of scores in the accumulation dtype, hidden keys at -inf."""
    ctype = _acc_dtype(q_blk.dtype)
    s = (q_blk.to(ctype) @ k_blk.to(ctype).transpose(-2, -1)) * scale
    return s if allowed is None else s.masked_fill(~allowed, float("-inf"))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Tiles accumulate in fp32 (fp64 for fp64 inputs), whatever the input precision."""
    return torch.promote_types(dtype, torch.float32)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, masks, tiles):
        b, hq, n, d = q.shape
        hkv = k.shape[1]
        ctype = _acc_dtype(q.dtype)
        qg = q.view(b, hkv, hq // hkv, n, d)  # (B, Hkv, G, N, D)
        kg, vg = k.unsqueeze(2), v.unsqueeze(2)  # (B, Hkv, 1, Nk, D)
        m = torch.full(qg.shape[:-1], float("-inf"), dtype=ctype, device=q.device)  # running row max
        denom = torch.zeros_like(m)  # running softmax normalizer, sum of exp(s - m)
        acc = torch.zeros(qg.shape, dtype=ctype, device=q.device)  # unnormalized output
        for q0, q1, k0, k1 in tiles:
            s = _scores(qg[..., q0:q1, :], kg[..., k0:k1, :], scale, masks.tile(q0, q1, k0, k1))
            m_old = m[..., q0:q1]
            m_new = torch.maximum(m_old, s.amax(-1))
            m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)  # a row with nothing visible yet: exp(-inf) = 0
            p = torch.exp(s - m_safe[..., None])
            alpha = torch.exp(m_old - m_safe)  # rescales what was accumulated under the old max
            denom[..., q0:q1] = alpha * denom[..., q0:q1] + p.sum(-1)
            acc[..., q0:q1, :] = alpha[..., None] * acc[..., q0:q1, :] + p @ vg[..., k0:k1, :].to(ctype)
            m[..., q0:q1] = m_new
        out = (acc / denom.clamp_min(torch.finfo(ctype).tiny)[..., None]).to(q.dtype)  # rows seeing nothing: 0
        lse = (m + torch.log(denom)).nan_to_num(nan=float("inf"), neginf=float("inf"))  # those rows: P = exp(-inf)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.masks, ctx.tiles = scale, masks, tiles
        return out.view(b, hq, n, d)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        scale, masks = ctx.scale, ctx.masks
        ctype = lse.dtype
        qg, kg, vg = q.view(out.shape), k.unsqueeze(2), v.unsqueeze(2)
        do = grad_out.reshape(out.shape)  # (B, Hkv, G, N, D)
        delta = (do.to(ctype) * out.to(ctype)).sum(-1)  # D_i = rowsum(dO * O), (B, Hkv, G, N)
        dq = torch.zeros(qg.shape, dtype=ctype, device=q.device)
        dk = torch.zeros(k.shape, dtype=ctype, device=q.device)
        dv = torch.zeros(v.shape, dtype=ctype, device=q.device)
        for q0, q1, k0, k1 in ctx.tiles:  # the forward's live tiles; each adds its share to dQ, dK and dV
            q_blk, do_blk = qg[..., q0:q1, :], do[..., q0:q1, :].to(ctype)
            k_blk, v_blk = kg[..., k0:k1, :], vg[..., k0:k1, :].to(ctype)
            p = torch.exp(_scores(q_blk, k_blk, scale, masks.tile(q0, q1, k0, k1)) - lse[..., q0:q1, None])
            dv[:, :, k0:k1] += (p.transpose(-2, -1) @ do_blk).sum(2)
            dp = do_blk @ v_blk.transpose(-2, -1)
            ds = p * (dp - delta[..., q0:q1, None]) * scale
            dq[..., q0:q1, :] += ds @ k_blk.to(ctype)
            dk[:, :, k0:k1] += (ds.transpose(-2, -1) @ q_blk.to(ctype)).sum(2)
        dq = dq.to(q.dtype).view(grad_out.shape)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None


def _group_mask(mask: torch.Tensor, shape: tuple[int, ...], n_kv_heads: int) -> torch.Tensor:
    """A mask broadcastable to (B, Hq, Nq, Nk), expanded over Nq and Nk (no copy) and split as (B, Hkv, G, ...)."""
    mask = mask.expand(mask.shape[0], mask.shape[1], *shape[2:])
    if mask.shape[1] == 1:
        return mask.unsqueeze(2)
    return mask.unflatten(1, (n_kv_heads, shape[1] // n_kv_heads))


def flash_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    document_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    block_q: int = 128,
    block_k: int = 128,
) -> torch.Tensor:
    """Tiled attention over (batch, heads, seq, head_dim); O(N) memory in forward and backward (O(N^2) bits for a
    dense `mask`, which the caller holds). Masks as in `impl.attention.attention`; empty tiles are skipped."""
    scale = check_qkv(q, k, v, causal, scale)
    document_ids, mask = check_masks(q, k, document_ids, cu_seqlens, mask)
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        check_positive_int(name, block)
    n_q, n_k = q.shape[2], k.shape[2]
    masks = _Masks(
        causal=causal,
        offset=n_k - n_q,
        document_ids=None if document_ids is None else document_ids.long(),
        mask=None if mask is None else _group_mask(mask, (q.shape[0], q.shape[1], n_q, n_k), k.shape[1]),
        device=q.device,
    )
    tiles = _live_tiles(n_q, n_k, masks, block_q, block_k)
    return _FlashAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), scale, masks, tiles)
