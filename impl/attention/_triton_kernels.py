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
saved logsumexp LSE is in those units.

Masks cost a `where` only on the tiles they cut. Each program's loop range is split in three: a masked run
[lo, flo), whole unmasked tiles [flo, full_end) that every row sees, and a masked run [full_end, hi) (the
diagonal, the ragged tail, the next document); tiles outside [lo, hi) are never visited. Causal is bottom-right
aligned (query row i sits at key position i + n_k - n_q) and cuts these bounds in the kernel. With DOCS, the
document bounds come from the host (`RANGES`, per (batch, block): lo, flo, fhi, hi, see flash_triton.py) and
a masked tile compares the per-position document ids `DOC` of its rows and columns. A row that has seen no key
yet keeps m = -inf; its exponentials are taken against 0 instead, so that exp2(-inf - -inf) never appears.

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
def _q_block_keys(RANGES, pid_b, pid_m, start_m, n_q, n_k, CAUSAL: tl.constexpr, DOCS: tl.constexpr,
                  BLOCK_M: tl.constexpr):  # fmt: skip
    """Keys [lo, hi) that rows [start_m, +BLOCK_M) may see, and [flo, fhi) within them that every row sees."""
    lo, flo, fhi, hi = 0, 0, n_k, n_k
    if DOCS:
        r = RANGES + (pid_b * tl.cdiv(n_q, BLOCK_M) + pid_m) * 4
        lo, flo, fhi, hi = tl.load(r), tl.load(r + 1), tl.load(r + 2), tl.load(r + 3)
    if CAUSAL:  # the first row sees keys <= start_m + off, the last row keys < start_m + BLOCK_M + off
        hi = tl.minimum(hi, start_m + BLOCK_M + n_k - n_q)
        fhi = tl.minimum(fhi, start_m + n_k - n_q + 1)
    return lo, flo, fhi, hi


@triton.jit
def _fwd_steps(
    acc, l_i, m_i, q, K, V, DOC, rows, doc_q, off, qk_scale, lo, hi,
    CAUSAL: tl.constexpr, DOCS: tl.constexpr, MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Algorithm 1, lines 8-11, for the k/v blocks starting in [lo, hi). MASK: keys at or past hi, future keys
    and other documents' keys are hidden and loads checked; otherwise every score in them is visible."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load(K, cols, hi, HEAD_DIM, BLOCK_D, MASK)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N), unscaled
        if MASK:
            visible = cols[None, :] < hi
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + off)
            if DOCS:
                visible = visible & (doc_q[:, None] == tl.load(DOC + cols, mask=cols < hi, other=-1)[None, :])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # line 10: running row max, base-2 units
        m_ref = m_new
        if MASK:  # a row with no visible key so far: exp2 against 0, so that p = alpha = 0, not NaN
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s * qk_scale - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load(V, cols, hi, HEAD_DIM, BLOCK_D, MASK)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)  # line 11 (BLOCK_M, BLOCK_D)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def flash_fwd_kernel(
    Q, K, V, Out, LSE, DOC, RANGES, qk_scale, n_heads, GROUP, n_q, n_k,
    CAUSAL: tl.constexpr, DOCS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Algorithm 1 for q rows [pid_m * BLOCK_M, +BLOCK_M) of one (batch, q head): O and the base-2 logsumexp."""
    pid_m, pid_b = tl.program_id(0), tl.program_id(1) // n_heads
    q_base, kv_base, row_base = _program_bases(tl.program_id(1), n_heads, GROUP, n_q, n_k, HEAD_DIM)
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    q = _load(Q + q_base, rows, n_q, HEAD_DIM, BLOCK_D, True)  # (BLOCK_M, BLOCK_D)
    doc = DOC + pid_b.to(tl.int64) * n_k  # this batch row's document ids, (n_k,)
    doc_q = rows
    if DOCS:
        doc_q = tl.load(doc + n_k - n_q + rows, mask=rows < n_q, other=-2)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (base-2 scores)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # unnormalized output
    lo, flo, fhi, hi = _q_block_keys(RANGES, pid_b, pid_m, start_m, n_q, n_k, CAUSAL, DOCS, BLOCK_M)
    full_end = flo + (fhi - flo) // BLOCK_N * BLOCK_N
    args = (q, K + kv_base, V + kv_base, doc, rows, doc_q, n_k - n_q, qk_scale)
    acc, l_i, m_i = _fwd_steps(acc, l_i, m_i, *args, lo, flo, CAUSAL, DOCS, True, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
    acc, l_i, m_i = _fwd_steps(
        acc, l_i, m_i, *args, flo, full_end, CAUSAL, DOCS, False, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION
    )
    acc, l_i, m_i = _fwd_steps(
        acc, l_i, m_i, *args, full_end, hi, CAUSAL, DOCS, True, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION
    )

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # rows past n_q may see no key (l = 0): keep them finite, never stored
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
    dk, dv, k, v, Q, DO, LSE, DELTA, DOC, cols, doc_k, n_q, off, qk_scale, lo, hi,
    CAUSAL: tl.constexpr, DOCS: tl.constexpr, MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Algorithm 2, lines 9-16 without line 15 (dQ), transposed, for the q blocks starting in [lo, hi). MASK: the
    blocks may hold rows at or past hi or rows that cannot see some of these keys."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _load(Q, rows, hi, HEAD_DIM, BLOCK_D, MASK)  # (BLOCK_M, BLOCK_D)
        do = _load(DO, rows, hi, HEAD_DIM, BLOCK_D, MASK)
        if MASK:  # rows at or past hi: q = dO = 0 and L = D = 0, so they add exactly nothing below
            lse = tl.load(LSE + rows, mask=rows < hi, other=0.0)
            delta = tl.load(DELTA + rows, mask=rows < hi, other=0.0)
        else:
            lse, delta = tl.load(LSE + rows), tl.load(DELTA + rows)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # S^T: (BLOCK_N keys, BLOCK_M rows)
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])  # line 11: the forward's softmax, recomputed
        if MASK:
            if CAUSAL:
                p_t = tl.where(cols[:, None] <= rows[None, :] + off, p_t, 0.0)
            if DOCS:
                doc_q = tl.load(DOC + off + rows, mask=rows < hi, other=-2)
                p_t = tl.where(doc_k[:, None] == doc_q[None, :], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)  # line 12: dV += P^T dO
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # line 13: dP^T = (dO V^T)^T
        ds_t = p_t * (dp_t - delta[None, :])  # line 14: dS = P * (dP - D)
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)  # line 16: dK += dS^T Q (scaled at the end)
    return dk, dv


@triton.jit
def flash_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DOC, RANGES, sm_scale, qk_scale, n_heads, GROUP, n_q, n_k,
    CAUSAL: tl.constexpr, DOCS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Keys [pid_n * BLOCK_N, +BLOCK_N) of one q head: their dK, dV summed over the q rows that see them. K and V
    stay on chip (Algorithm 2, line 6); with GQA each q head writes its own dK/dV, summed by the caller.
    The rows are split like the forward's keys: [lo, flo) masked, whole tiles up to fhi unmasked, the rest masked."""
    pid_n, pid_b = tl.program_id(0), tl.program_id(1) // n_heads
    q_base, kv_base, row_base = _program_bases(tl.program_id(1), n_heads, GROUP, n_q, n_k, HEAD_DIM)
    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    k = _load(K + kv_base, cols, n_k, HEAD_DIM, BLOCK_D, True)  # (BLOCK_N, BLOCK_D); missing keys are never stored
    v = _load(V + kv_base, cols, n_k, HEAD_DIM, BLOCK_D, True)
    doc = DOC + pid_b.to(tl.int64) * n_k
    doc_k = cols
    if DOCS:
        doc_k = tl.load(doc + cols, mask=cols < n_k, other=-1)

    lo, flo, fhi, hi = 0, 0, n_q, n_q
    if DOCS:  # the rows of these keys' documents, from the host
        r = RANGES + (pid_b * tl.cdiv(n_k, BLOCK_N) + pid_n) * 4
        lo, flo, fhi, hi = tl.load(r), tl.load(r + 1), tl.load(r + 2), tl.load(r + 3)
    if CAUSAL:  # row i sees key j <= i + off: rows from start_n - off see some, from start_n + BLOCK_N - 1 - off all
        lo = tl.minimum(tl.maximum(lo, start_n - (n_k - n_q)), hi)
        all_see = tl.cdiv(start_n + BLOCK_N - 1 - (n_k - n_q), BLOCK_M) * BLOCK_M  # rounded up to a whole q tile
        flo = tl.minimum(tl.maximum(flo, all_see), hi)
        fhi = tl.maximum(fhi, flo)
    full_end = flo + (fhi - flo) // BLOCK_M * BLOCK_M

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    args = (k, v, Q + q_base, DO + q_base, LSE + row_base, DELTA + row_base, doc, cols, doc_k, n_q, n_k - n_q, qk_scale)
    dk, dv = _dkdv_steps(dk, dv, *args, lo, flo, CAUSAL, DOCS, True, HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION)
    dk, dv = _dkdv_steps(dk, dv, *args, flo, full_end, CAUSAL, DOCS, False, HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION)
    dk, dv = _dkdv_steps(dk, dv, *args, full_end, hi, CAUSAL, DOCS, True, HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION)

    dkv_base = tl.program_id(1).to(tl.int64) * n_k * HEAD_DIM  # DK, DV: (batch, q heads, n_k, HEAD_DIM)
    _store(DK + dkv_base, cols, n_k, dk * sm_scale, HEAD_DIM, BLOCK_D)  # line 18
    _store(DV + dkv_base, cols, n_k, dv, HEAD_DIM, BLOCK_D)


@triton.jit
def _dq_steps(
    dq, q, do, lse, delta, K, V, DOC, rows, doc_q, off, qk_scale, lo, hi,
    CAUSAL: tl.constexpr, DOCS: tl.constexpr, MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Algorithm 2, lines 9-15 for dQ alone, for the k/v blocks starting in [lo, hi); MASK as in `_fwd_steps`."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load(K, cols, hi, HEAD_DIM, BLOCK_D, MASK)  # (BLOCK_N, BLOCK_D)
        v = _load(V, cols, hi, HEAD_DIM, BLOCK_D, MASK)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASK:
            visible = cols[None, :] < hi
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + off)
            if DOCS:
                visible = visible & (doc_q[:, None] == tl.load(DOC + cols, mask=cols < hi, other=-1)[None, :])
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)  # line 15: dQ += dS K (scaled at the end)
    return dq


@triton.jit
def flash_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DOC, RANGES, sm_scale, qk_scale, n_heads, GROUP, n_q, n_k,
    CAUSAL: tl.constexpr, DOCS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """q rows [pid_m * BLOCK_M, +BLOCK_M) of one q head: dQ over the keys they see (no atomics: deterministic)."""
    pid_m, pid_b = tl.program_id(0), tl.program_id(1) // n_heads
    q_base, kv_base, row_base = _program_bases(tl.program_id(1), n_heads, GROUP, n_q, n_k, HEAD_DIM)
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    q = _load(Q + q_base, rows, n_q, HEAD_DIM, BLOCK_D, True)  # (BLOCK_M, BLOCK_D)
    do = _load(DO + q_base, rows, n_q, HEAD_DIM, BLOCK_D, True)
    lse = tl.load(LSE + row_base + rows, mask=rows < n_q, other=0.0)
    delta = tl.load(DELTA + row_base + rows, mask=rows < n_q, other=0.0)
    doc = DOC + pid_b.to(tl.int64) * n_k
    doc_q = rows
    if DOCS:
        doc_q = tl.load(doc + n_k - n_q + rows, mask=rows < n_q, other=-2)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, flo, fhi, hi = _q_block_keys(RANGES, pid_b, pid_m, start_m, n_q, n_k, CAUSAL, DOCS, BLOCK_M)
    full_end = flo + (fhi - flo) // BLOCK_N * BLOCK_N
    args = (q, do, lse, delta, K + kv_base, V + kv_base, doc, rows, doc_q, n_k - n_q, qk_scale)
    dq = _dq_steps(dq, *args, lo, flo, CAUSAL, DOCS, True, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
    dq = _dq_steps(dq, *args, flo, full_end, CAUSAL, DOCS, False, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
    dq = _dq_steps(dq, *args, full_end, hi, CAUSAL, DOCS, True, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
    _store(DQ + q_base, rows, n_q, dq * sm_scale, HEAD_DIM, BLOCK_D)
