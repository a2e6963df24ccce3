"""FlashAttention in plain PyTorch: tiled online softmax, backward recomputed from the saved logsumexp.

Dao et al., "FlashAttention-2" (2023), Algorithm 1 (forward) and Algorithm 2 (backward). The forward walks k/v
in blocks, keeping per-row running max m, normalizer l and unnormalized output; it saves only O and the
logsumexp L = m + log l. The backward recomputes each score tile from q, k and L:
P = exp(S - L), dV += P^T dO, dP = dO V^T, dS = P * (dP - D) with D = rowsum(dO * O), dQ += dS K, dK += dS^T Q.
No N x N tensor exists at any time: the largest temporary is one (block_q, block_k) tile per head.

Grouped-query attention keeps k/v at their own head count: q is viewed as (B, Hkv, G, N, D) and each k/v tile
broadcasts over the G query heads of its group; dK and dV sum over that group.
"""

import torch

from impl.attention._checks import check_qkv
from impl.common.checks import check_positive_int


def _scores(q_blk, k_blk, scale, causal, q0, k0):
    """One (B, Hkv, G, bq, bk) tile of scores in the accumulation dtype, future keys masked to -inf when causal."""
    ctype = _acc_dtype(q_blk.dtype)
    s = (q_blk.to(ctype) @ k_blk.to(ctype).transpose(-2, -1)) * scale
    if causal and k0 + k_blk.shape[-2] - 1 > q0:
        rows = torch.arange(q0, q0 + q_blk.shape[-2], device=s.device)[:, None]
        cols = torch.arange(k0, k0 + k_blk.shape[-2], device=s.device)[None, :]
        s = s.masked_fill(cols > rows, float("-inf"))
    return s


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Tiles accumulate in fp32 (fp64 for fp64 inputs), whatever the input precision."""
    return torch.promote_types(dtype, torch.float32)


def _key_blocks(q0, n_q, n_k, block_k, causal):
    """Start offsets of the k blocks a q block at rows [q0, q0 + n_q) must visit."""
    stop = min(n_k, q0 + n_q) if causal else n_k
    return range(0, stop, block_k)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, block_q, block_k):
        b, hq, n, d = q.shape
        hkv, n_k = k.shape[1], k.shape[2]
        ctype = _acc_dtype(q.dtype)
        qg = q.view(b, hkv, hq // hkv, n, d)  # (B, Hkv, G, N, D)
        kg, vg = k.unsqueeze(2), v.unsqueeze(2)  # (B, Hkv, 1, Nk, D)
        out = torch.empty_like(qg)
        lse = torch.empty(qg.shape[:-1], dtype=ctype, device=q.device)  # (B, Hkv, G, N)
        for q0 in range(0, n, block_q):
            q_blk = qg[..., q0 : q0 + block_q, :]
            m = torch.full(q_blk.shape[:-1], float("-inf"), dtype=ctype, device=q.device)  # running row max
            denom = torch.zeros_like(m)  # running softmax normalizer, sum of exp(s - m)
            acc = torch.zeros(q_blk.shape, dtype=ctype, device=q.device)
            for k0 in _key_blocks(q0, q_blk.shape[-2], n_k, block_k, causal):
                s = _scores(q_blk, kg[..., k0 : k0 + block_k, :], scale, causal, q0, k0)
                m_new = torch.maximum(m, s.amax(-1))
                p = torch.exp(s - m_new[..., None])
                alpha = torch.exp(m - m_new)  # rescales what was accumulated under the old max
                denom = alpha * denom + p.sum(-1)
                acc = alpha[..., None] * acc + p @ vg[..., k0 : k0 + block_k, :].to(ctype)
                m = m_new
            out[..., q0 : q0 + block_q, :] = (acc / denom[..., None]).to(q.dtype)
            lse[..., q0 : q0 + block_q] = m + torch.log(denom)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.block_q, ctx.block_k = causal, scale, block_q, block_k
        return out.view(b, hq, n, d)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale, block_q, block_k = ctx.causal, ctx.scale, ctx.block_q, ctx.block_k
        ctype = lse.dtype
        qg, kg, vg = q.view(out.shape), k.unsqueeze(2), v.unsqueeze(2)
        n, n_k = qg.shape[-2], k.shape[2]
        do = grad_out.reshape(out.shape)  # (B, Hkv, G, N, D)
        delta = (do.to(ctype) * out.to(ctype)).sum(-1)  # D_i = rowsum(dO * O), (B, Hkv, G, N)
        dq = torch.zeros(qg.shape, dtype=ctype, device=q.device)
        dk = torch.zeros(k.shape, dtype=ctype, device=q.device)
        dv = torch.zeros(v.shape, dtype=ctype, device=q.device)
        for k0 in range(0, n_k, block_k):
            k_blk, v_blk = kg[..., k0 : k0 + block_k, :], vg[..., k0 : k0 + block_k, :].to(ctype)
            q_start = (k0 // block_q) * block_q if causal else 0  # q blocks entirely above the diagonal see nothing
            for q0 in range(q_start, n, block_q):
                q_blk, do_blk = qg[..., q0 : q0 + block_q, :], do[..., q0 : q0 + block_q, :].to(ctype)
                p = torch.exp(_scores(q_blk, k_blk, scale, causal, q0, k0) - lse[..., q0 : q0 + block_q, None])
                dv[:, :, k0 : k0 + block_k] += (p.transpose(-2, -1) @ do_blk).sum(2)
                dp = do_blk @ v_blk.transpose(-2, -1)
                ds = p * (dp - delta[..., q0 : q0 + block_q, None]) * scale
                dq[..., q0 : q0 + block_q, :] += ds @ k_blk.to(ctype)
                dk[:, :, k0 : k0 + block_k] += (ds.transpose(-2, -1) @ q_blk.to(ctype)).sum(2)
        dq = dq.to(q.dtype).view(grad_out.shape)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def flash_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
) -> torch.Tensor:
    """Tiled attention over (batch, heads, seq, head_dim); O(N) memory in forward and backward."""
    scale = check_qkv(q, k, v, causal, scale)
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        check_positive_int(name, block)
    return _FlashAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), causal, scale, block_q, block_k)
