"""FlashAttention-2 in Triton: the autograd wrapper around the kernels in `_triton_kernels.py`.

Dao, "FlashAttention-2" (2023). The forward saves O and the base-2 logsumexp; the backward computes
D = rowsum(dO * O), then dK/dV with one program per k block and dQ with one program per q block (two passes,
no atomics, so the result is deterministic). Grouped-query attention: each q head writes its own dK/dV, summed
over the heads of its group afterwards. Tiles and warps come from `TritonConfig.default(head_dim, dtype)`.

Masks: causal is bottom-right aligned (Nq <= Nk, a decode step over a KV cache). Packed documents come as
`document_ids` (or `cu_seqlens`); since each document is a contiguous run of positions, the keys a q block can
see form one range, and `_doc_ranges` computes it on the host with torch.searchsorted, per (batch, block): the
range [lo, hi) any row of the block sees and the range [flo, fhi) all of them see (empty when the block spans
two documents). The forward and dQ kernels visit only the k tiles in [lo, hi), unmasked inside [flo, fhi); the
dK/dV kernel does the same over q rows for its k block. A dense boolean `mask` is not taken: the kernels read
per-position document ids, never an Nq x Nk mask.

The kernels are compiled for CUDA tensors; CPU tensors run through Triton's interpreter, which needs
TRITON_INTERPRET=1 in the environment before the kernels are first used (they are imported on first call).
"""

from dataclasses import dataclass

import torch

from impl.attention._checks import check_masks, check_qkv
from impl.common.checks import check_int

DELTA_ROWS = 64  # rows of O and dO per program of the D = rowsum(dO * O) kernel
_BLOCK_FIELDS = ("block_m", "block_n", "bwd_block_m", "bwd_block_n", "dq_block_m", "dq_block_n")


@dataclass(frozen=True)
class TritonConfig:
    block_m: int = 128  # forward: q rows per program
    block_n: int = 64  # forward: keys per inner step (divides block_m, so the causal diagonal starts on a step)
    bwd_block_m: int = 32  # dK/dV: q rows per inner step
    bwd_block_n: int = 128  # dK/dV: keys per program (a multiple of bwd_block_m)
    dq_block_m: int = 128  # dQ: q rows per program
    dq_block_n: int = 32  # dQ: keys per inner step (divides dq_block_m)
    num_warps: int = 4  # forward
    bwd_num_warps: int = 4  # dK/dV and dQ
    num_stages: int = 3  # software pipelining depth of every inner loop (ignored by the interpreter)

    @classmethod
    def default(cls, head_dim: int, dtype: torch.dtype) -> "TritonConfig":
        """Tiles for Hopper (sm_90) at this (head_dim, dtype).

        fp16/bf16: every matmul has 128 rows in its first dimension (forward and dQ: 128 q rows; dK/dV: 128 keys,
        transposed), two m64 warp-group MMAs, with short 32- or 64-wide inner steps so that P, dS and the
        pipelined k/v (or q/dO) tiles stay small; as in the Triton tutorial 06. Eight warps above head_dim 64
        keep the fp32 accumulators at 64 registers a thread each (dK and dV: 2 x 128 x 128 floats).
        fp32: tiles take twice the bytes and the dots run on FMA units: halve them, pipeline two deep.
        """
        warps = 4 if head_dim <= 64 else 8
        if dtype == torch.float32:
            return cls(64, 32, 32, 64, 64, 32, num_warps=warps, bwd_num_warps=warps, num_stages=2)
        return cls(num_warps=warps, bwd_num_warps=warps)

    def __post_init__(self):
        for name in _BLOCK_FIELDS:
            value = check_int(name, getattr(self, name), low=16)
            if value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's minimum), got {value}")
        for outer, inner in (("block_m", "block_n"), ("bwd_block_n", "bwd_block_m"), ("dq_block_m", "dq_block_n")):
            if getattr(self, outer) < getattr(self, inner):
                raise ValueError(
                    f"{outer} must be >= {inner} (the causal diagonal must start on a step), "
                    f"got {getattr(self, outer)} < {getattr(self, inner)}"
                )


def _kernels():
    """The kernel module, imported on first use so that TRITON_INTERPRET is read then, not at package import."""
    from impl.attention import _triton_kernels

    return _triton_kernels


def _doc_ranges(ids: torch.Tensor, n_q: int, block: int, by_queries: bool) -> torch.Tensor:
    """(B, blocks, 4) int32 [lo, flo, fhi, hi] per block of `block` queries (key positions: the keys its rows
    may see, and those all of its rows see) or of `block` keys (query rows, likewise). Queries are the last n_q
    of the n_k positions; `ids` is (B, n_k), non-decreasing along each row."""
    n_k = ids.shape[1]
    off = n_k - n_q
    n = n_q if by_queries else n_k
    first = torch.arange(0, n, block, device=ids.device)
    last = (first + block).clamp_max(n) - 1
    if by_queries:
        first, last = first + off, last + off
    doc_first, doc_last = ids[:, first], ids[:, last]  # (B, blocks): the documents at the block's two ends
    lo = torch.searchsorted(ids, doc_first)  # first position of the first document
    hi = torch.searchsorted(ids, doc_last, right=True)  # one past the last position of the last document
    if not by_queries:  # positions to query rows
        lo, hi = (lo - off).clamp(0, n_q), (hi - off).clamp(0, n_q)
    fhi = torch.where(doc_first == doc_last, hi, lo)  # one document: all rows see all of it; else none see all
    return torch.stack([lo, lo, fhi, hi], dim=-1).to(torch.int32).contiguous()


def _launch_args(q, k, causal, docs):
    _, hq, n, d = q.shape
    return dict(
        n_heads=hq,
        GROUP=hq // k.shape[1],
        n_q=n,
        n_k=k.shape[2],
        CAUSAL=causal,
        DOCS=docs,
        HEAD_DIM=d,
        BLOCK_D=max(16, 1 << (d - 1).bit_length()),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 inputs get fp32 dots, not TF32
    )


class _FlashAttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, document_ids, config):
        kern = _kernels()
        b, hq, n, _ = q.shape
        docs = document_ids is not None
        ids = document_ids if docs else torch.zeros(1, dtype=torch.int32, device=q.device)  # unread placeholder
        ranges = _doc_ranges(ids, n, config.block_m, True) if docs else ids
        out = torch.empty_like(q)
        lse = torch.empty(b, hq, n, dtype=torch.float32, device=q.device)  # base-2 logsumexp of scaled scores
        kern.flash_fwd_kernel[(_cdiv(n, config.block_m), b * hq)](
            q, k, v, out, lse, ids, ranges, scale * kern.LOG2E, **_launch_args(q, k, causal, docs),
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse, ids)
        ctx.causal, ctx.scale, ctx.docs, ctx.config = causal, scale, docs, config
        return out

    @staticmethod
    def backward(ctx, grad_out):
        kern = _kernels()
        q, k, v, out, lse, ids = ctx.saved_tensors
        config, scale, docs = ctx.config, ctx.scale, ctx.docs
        b, hq, n, d = q.shape
        hkv, n_k = k.shape[1], k.shape[2]
        args = _launch_args(q, k, ctx.causal, docs)
        warps = dict(num_warps=config.bwd_num_warps, num_stages=config.num_stages)
        do = grad_out.contiguous()
        delta = torch.empty_like(lse)  # D_i = rowsum(dO * O), (B, Hq, N)
        kern.flash_bwd_delta_kernel[(_cdiv(b * hq * n, DELTA_ROWS),)](
            out, do, delta, b * hq * n, HEAD_DIM=d, BLOCK_D=args["BLOCK_D"], BLOCK=DELTA_ROWS
        )
        dq = torch.empty_like(q)
        # One dK/dV per q head; with GQA they are summed over the group below, so keep them in fp32.
        dkv_dtype = k.dtype if hq == hkv else torch.float32
        dk = torch.empty(b, hq, n_k, d, dtype=dkv_dtype, device=q.device)
        dv = torch.empty_like(dk)
        common = (q, k, v, do, lse, delta)
        ranges = _doc_ranges(ids, n, config.bwd_block_n, False) if docs else ids
        kern.flash_bwd_dkdv_kernel[(_cdiv(n_k, config.bwd_block_n), b * hq)](
            *common, dk, dv, ids, ranges, scale, scale * kern.LOG2E, **args,
            BLOCK_M=config.bwd_block_m, BLOCK_N=config.bwd_block_n, **warps,
        )  # fmt: skip
        ranges = _doc_ranges(ids, n, config.dq_block_m, True) if docs else ids
        kern.flash_bwd_dq_kernel[(_cdiv(n, config.dq_block_m), b * hq)](
            *common, dq, ids, ranges, scale, scale * kern.LOG2E, **args,
            BLOCK_M=config.dq_block_m, BLOCK_N=config.dq_block_n, **warps,
        )  # fmt: skip
        if hq != hkv:
            dk = dk.view(b, hkv, hq // hkv, n_k, d).sum(2).to(k.dtype)  # (B, Hkv, Nk, D)
            dv = dv.view(b, hkv, hq // hkv, n_k, d).sum(2).to(v.dtype)
        return dq, dk, dv, None, None, None, None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _interpreting() -> bool:
    """Whether the kernels run under Triton's CPU interpreter (decided when they are first imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_kernels().flash_fwd_kernel, InterpretedFunction)


def flash_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    document_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    config: TritonConfig | None = None,
) -> torch.Tensor:
    """FlashAttention-2 over (batch, heads, seq, head_dim) fp16/bf16/fp32 tensors, head_dim 16..128. Causal
    (bottom-right) and document masks as in `impl.attention.attention`; tiles a document mask empties are skipped."""
    scale = check_qkv(q, k, v, causal, scale)
    if mask is not None:
        raise ValueError(
            f"mask is not supported by the Triton kernels, which take document_ids (or cu_seqlens), not a dense "
            f"boolean mask; got a mask of shape {tuple(mask.shape)} (use backend='torch', 'sdpa' or 'naive')"
        )
    document_ids, _ = check_masks(q, k, document_ids, cu_seqlens, None)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q must be float16, bfloat16 or float32 for the Triton kernels, got {q.dtype}")
    if not 16 <= q.shape[-1] <= 128:
        raise ValueError(f"q head_dim must be in 16..128 for the Triton kernels, got {q.shape[-1]}")
    if not q.is_cuda and not _interpreting():
        raise ValueError(
            f"q must be a CUDA tensor, or TRITON_INTERPRET=1 must be set before the kernels are first used to run "
            f"them on CPU; got device {q.device} without the interpreter"
        )
    if config is None:
        config = TritonConfig.default(q.shape[-1], q.dtype)
    if document_ids is not None:
        document_ids = document_ids.to(torch.int32).contiguous()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _FlashAttentionTriton.apply(q, k, v, causal, scale, document_ids, config)
