"""FlashAttention-2 kernels in Triton: the forward, and the backward as D = rowsum(dO * O), a dK/dV kernel and a
dQ kernel.

Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning" (2023): the forward is
Algorithm 1 (one program per q block, online softmax over the k/v blocks, lines 4-16), the backward Algorithm 2
split in two so that neither pass needs atomics: dK/dV with one program per k/v block looping over q blocks
(lines 6-18 without line 15's dQ update), then dQ with one program per q block looping over k/v blocks.
Laid out after the Triton tutorial `06-fused-attention.py`; as there, the dK/dV loop works on transposed
tiles (S^T = K Q^T is (keys, q rows)) so that each matmul's first dimension is the program's large key block,
the shape Hopper's warp-group MMA wants, while the loop steps over few q rows at a time.

Scores are kept in base 2: the softmax scale is multiplied by log2(e) once so that exp becomes exp2, and the
saved logsumexp LSE is in those units. Causal masking costs a `where` only on the blocks that straddle the
diagonal (and the ragged last block of a length that is not a multiple of the tile): blocks entirely in the
past are processed unmasked and blocks entirely in the future are never visited.

Tensors are contiguous (batch, heads, seq, HEAD_DIM); a q head h reads k/v head h // GROUP (grouped-query
attention). Rows past the true length and columns past HEAD_DIM (padded to the power of two BLOCK_D) load as
zeros and are never stored, so neither the length nor head_dim has to be a multiple of a block.

Imported lazily by `flash_triton.py`: `@triton.jit` reads TRITON_INTERPRET when these kernels are defined.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _load(base, rows, n_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """A (rows, BLOCK_D) tile of a contiguous (seq, HEAD_DIM) matrix; rows >= n_rows and padding columns are 0.
    The mask is compiled out where the rows are known to exist and head_dim is a power of two."""
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = base + rows[:, None] * HEAD_DIM + offs_d[None, :]
    if CHECK_ROWS:
        tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    elif BLOCK_D != HEAD_DIM:
        tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _store(base, rows, n_rows, tile, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store the existing rows and columns of a (rows, BLOCK_D) tile."""
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = base + rows[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _program_bases(pid_bh, n_heads, GROUP, n_q, n_k, HEAD_DIM: tl.constexpr):
    """Element offsets of this (batch, q head)'s q-shaped matrices, of its k/v head's matrices, and of its rows
    in the (batch, heads, seq) LSE / D vectors. int64: they may pass 2^31 at long lengths."""
    pid_bh = pid_bh.to(tl.int64)
    kv_bh = (pid_bh // n_heads) * (n_heads // GROUP) + (pid_bh % n_heads) // GROUP
    return pid_bh * n_q * HEAD_DIM, kv_bh * n_k * HEAD_DIM, pid_bh * n_q


@triton.jit
def _fwd_steps(
    acc, l_i, m_i, q, K, V, rows, n_k, qk_scale, lo, hi,
    CAUSAL: tl.constexpr, MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Algorithm 1, lines 8-11, for the k/v blocks starting in [lo, hi). MASK: the blocks may hold future or
    missing keys, so scores are masked and loads checked; otherwise every score in them is visible."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load(K, cols, n_k, HEAD_DIM, BLOCK_D, MASK)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N), unscaled
        if MASK:
            visible = cols[None, :] < n_k
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # line 10: running row max, base-2 units
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load(V, cols, n_k, HEAD_DIM, BLOCK_D, MASK)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)  # line 11 (BLOCK_M, BLOCK_D)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def flash_fwd_kernel(
    Q, K, V, Out, LSE, qk_scale, n_heads, GROUP, n_q, n_k,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Algorithm 1 for q rows [pid_m * BLOCK_M, +BLOCK_M) of one (batch, q head): O and the base-2 logsumexp."""
    pid_m = tl.program_id(0)
    q_base, kv_base, row_base = _program_bases(tl.program_id(1), n_heads, GROUP, n_q, n_k, HEAD_DIM)
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    q = _load(Q + q_base, rows, n_q, HEAD_DIM, BLOCK_D, True)  # (BLOCK_M, BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (base-2 scores)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # unnormalized output
    if CAUSAL:  # keys before start_m are in every row's past; the diagonal blocks end at the block's last row
        split, hi = start_m, tl.minimum(start_m + BLOCK_M, n_k)
    else:  # only the ragged last block has missing keys
        split, hi = n_k - n_k % BLOCK_N, n_k
    args = (q, K + kv_base, V + kv_base, rows, n_k, qk_scale)
    acc, l_i, m_i = _fwd_steps(acc, l_i, m_i, *args, 0, split, CAUSAL, False, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
    acc, l_i, m_i = _fwd_steps(acc, l_i, m_i, *args, split, hi, CAUSAL, True, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)

    _store(Out + q_base, rows, n_q, acc / l_i[:, None], HEAD_DIM, BLOCK_D)  # lines 13 and 15
    tl.store(LSE + row_base + rows, m_i + tl.math.log2(l_i), mask=rows < n_q)  # lines 14 and 16: L = m + log2(l)


@triton.jit
def flash_bwd_delta_kernel(Out, DO, DELTA, n_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
    """Algorithm 2, line 4: D_i = rowsum(dO_i * O_i) over all (batch, head, row) rows, in fp32."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: rows * HEAD_DIM may pass 2^31
    o = _load(Out, rows, n_rows, HEAD_DIM, BLOCK_D, True).to(tl.float32)
    do = _load(DO, rows, n_rows, HEAD_DIM, BLOCK_D, True).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, 1), mask=rows < n_rows)


@triton.jit
def _dkdv_steps(
    dk, dv, k, v, Q, DO, LSE, DELTA, cols, n_q, qk_scale, lo, hi,
    CAUSAL: tl.constexpr, MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Algorithm 2, lines 9-16 without line 15 (dQ), transposed, for the q blocks starting in [lo, hi). MASK: the blocks
    may hold rows past n_q or rows that cannot see some of these keys."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _load(Q, rows, n_q, HEAD_DIM, BLOCK_D, MASK)  # (BLOCK_M, BLOCK_D)
        do = _load(DO, rows, n_q, HEAD_DIM, BLOCK_D, MASK)
        if MASK:  # missing rows: q = dO = 0 and L = D = 0, so they add exactly nothing below
            lse = tl.load(LSE + rows, mask=rows < n_q, other=0.0)
            delta = tl.load(DELTA + rows, mask=rows < n_q, other=0.0)
        else:
            lse, delta = tl.load(LSE + rows), tl.load(DELTA + rows)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # S^T: (BLOCK_N keys, BLOCK_M rows)
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])  # line 11: the forward's softmax, recomputed
        if CAUSAL and MASK:
            p_t = tl.where(cols[:, None] <= rows[None, :], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)  # line 12: dV += P^T dO
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # line 13: dP^T = (dO V^T)^T
        ds_t = p_t * (dp_t - delta[None, :])  # line 14: dS = P * (dP - D)
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)  # line 16: dK += dS^T Q (scaled at the end)
    return dk, dv


@triton.jit
def flash_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, sm_scale, qk_scale, n_heads, GROUP, n_q, n_k,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Keys [pid_n * BLOCK_N, +BLOCK_N) of one q head: their dK, dV summed over the q rows that see them. K and V
    stay on chip (Algorithm 2, line 6); with GQA each q head writes its own dK/dV, summed by the caller."""
    pid_n = tl.program_id(0)
    q_base, kv_base, row_base = _program_bases(tl.program_id(1), n_heads, GROUP, n_q, n_k, HEAD_DIM)
    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    k = _load(K + kv_base, cols, n_k, HEAD_DIM, BLOCK_D, True)  # (BLOCK_N, BLOCK_D); missing keys are never stored
    v = _load(V + kv_base, cols, n_k, HEAD_DIM, BLOCK_D, True)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    args = (k, v, Q + q_base, DO + q_base, LSE + row_base, DELTA + row_base, cols, n_q, qk_scale)
    lo = 0
    if CAUSAL:  # rows before start_n see none of these keys; the next BLOCK_N rows see part of them
        diag_end = tl.minimum(start_n + BLOCK_N, n_q)
        dk, dv = _dkdv_steps(dk, dv, *args, start_n, diag_end, CAUSAL, True, HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION)
        lo = start_n + BLOCK_N
    full_end = n_q - n_q % BLOCK_M  # q blocks from here on are ragged
    dk, dv = _dkdv_steps(dk, dv, *args, lo, full_end, CAUSAL, False, HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION)
    tail = tl.maximum(lo, full_end)
    dk, dv = _dkdv_steps(dk, dv, *args, tail, n_q, CAUSAL, True, HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION)

    dkv_base = tl.program_id(1).to(tl.int64) * n_k * HEAD_DIM  # DK, DV: (batch, q heads, n_k, HEAD_DIM)
    _store(DK + dkv_base, cols, n_k, dk * sm_scale, HEAD_DIM, BLOCK_D)  # line 18
    _store(DV + dkv_base, cols, n_k, dv, HEAD_DIM, BLOCK_D)


@triton.jit
def _dq_steps(
    dq, q, do, lse, delta, K, V, rows, n_k, qk_scale, lo, hi,
    CAUSAL: tl.constexpr, MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Algorithm 2, lines 9-15 for dQ alone, for the k/v blocks starting in [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load(K, cols, n_k, HEAD_DIM, BLOCK_D, MASK)  # (BLOCK_N, BLOCK_D)
        v = _load(V, cols, n_k, HEAD_DIM, BLOCK_D, MASK)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASK:
            visible = cols[None, :] < n_k
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None])
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)  # line 15: dQ += dS K (scaled at the end)
    return dq


@triton.jit
def flash_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, sm_scale, qk_scale, n_heads, GROUP, n_q, n_k,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """q rows [pid_m * BLOCK_M, +BLOCK_M) of one q head: dQ over the keys they see (no atomics: deterministic)."""
    pid_m = tl.program_id(0)
    q_base, kv_base, row_base = _program_bases(tl.program_id(1), n_heads, GROUP, n_q, n_k, HEAD_DIM)
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    q = _load(Q + q_base, rows, n_q, HEAD_DIM, BLOCK_D, True)  # (BLOCK_M, BLOCK_D)
    do = _load(DO + q_base, rows, n_q, HEAD_DIM, BLOCK_D, True)
    lse = tl.load(LSE + row_base + rows, mask=rows < n_q, other=0.0)
    delta = tl.load(DELTA + row_base + rows, mask=rows < n_q, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if CAUSAL:  # as in the forward: unmasked past, masked diagonal, future skipped
        split, hi = start_m, tl.minimum(start_m + BLOCK_M, n_k)
    else:
        split, hi = n_k - n_k % BLOCK_N, n_k
    args = (q, do, lse, delta, K + kv_base, V + kv_base, rows, n_k, qk_scale)
    dq = _dq_steps(dq, *args, 0, split, CAUSAL, False, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
    dq = _dq_steps(dq, *args, split, hi, CAUSAL, True, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
    _store(DQ + q_base, rows, n_q, dq * sm_scale, HEAD_DIM, BLOCK_D)
