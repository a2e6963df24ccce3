"""FlashAttention-2 kernels in Triton: forward, and the backward split into a dK/dV kernel and a dQ kernel.

Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning" (2023), Algorithms 1
and 2. Laid out after the Triton tutorial `06-fused-attention.py`. Scores are kept in base 2: the softmax scale
is multiplied by log2(e) once so that exp becomes exp2, and the saved logsumexp LSE is in those units.

Tensors are contiguous (batch, heads, seq, head_dim); one program handles one row block of one (batch, q head).
A q head h reads k/v head h // GROUP (grouped-query attention). Rows, columns and head_dim beyond the true sizes
are masked, so neither the sequence length nor head_dim has to be a multiple of a block.

Imported lazily by `flash_triton.py`: `@triton.jit` reads TRITON_INTERPRET when these kernels are defined.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _tile_ptrs(base, rows, offs_d, head_dim):
    """Pointers to a (rows, head_dim) tile of one contiguous (seq, head_dim) matrix."""
    return base + rows[:, None] * head_dim + offs_d[None, :]


@triton.jit
def _tile_mask(rows, offs_d, n_rows, head_dim):
    """Which entries of that tile exist (rows and columns past the true sizes do not)."""
    return (rows[:, None] < n_rows) & (offs_d[None, :] < head_dim)


@triton.jit
def _valid(rows, cols, n_k, CAUSAL: tl.constexpr):
    """(rows, cols) scores that exist: a real key, and not in the future if causal. Padding rows (past n_q) are
    left in: their q and dO load as zeros, so they contribute nothing, and they are never stored."""
    keep = cols[None, :] < n_k
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None])
    return keep


@triton.jit
def flash_fwd_kernel(
    Q, K, V, Out, LSE, qk_scale, n_heads, GROUP, n_q, n_k, head_dim,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: offsets may pass 2^31
    kv_bh = (pid_bh // n_heads) * (n_heads // GROUP) + (pid_bh % n_heads) // GROUP
    q_base, kv_base = pid_bh * n_q * head_dim, kv_bh * n_k * head_dim
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n, offs_d = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    q_ptrs = _tile_ptrs(Q + q_base, rows, offs_d, head_dim)
    q_mask = _tile_mask(rows, offs_d, n_q, head_dim)
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (base-2 scores)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # unnormalized output
    hi = n_k
    if CAUSAL:  # keys past the block's last row are all in the future
        hi = tl.minimum((pid_m + 1) * BLOCK_M, n_k)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = _tile_ptrs(K + kv_base, cols, offs_d, head_dim)
        kv_mask = _tile_mask(cols, offs_d, n_k, head_dim)
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(_valid(rows, cols, n_k, CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = _tile_ptrs(V + kv_base, cols, offs_d, head_dim)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    o_ptrs = _tile_ptrs(Out + q_base, rows, offs_d, head_dim)
    o_mask = _tile_mask(rows, offs_d, n_q, head_dim)
    tl.store(o_ptrs, (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=o_mask)
    tl.store(LSE + pid_bh * n_q + rows, m_i + tl.math.log2(l_i), mask=rows < n_q)


@triton.jit
def flash_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, sm_scale, qk_scale, n_heads, GROUP, n_q, n_k, head_dim,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One k/v block of one q head: dV = sum P^T dO, dK = scale * sum dS^T Q over the q blocks that see it."""
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    kv_bh = (pid_bh // n_heads) * (n_heads // GROUP) + (pid_bh % n_heads) // GROUP
    q_base, kv_base = pid_bh * n_q * head_dim, kv_bh * n_k * head_dim
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m, offs_d = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D)
    k_ptrs = _tile_ptrs(K + kv_base, cols, offs_d, head_dim)
    kv_mask = _tile_mask(cols, offs_d, n_k, head_dim)
    v_ptrs = _tile_ptrs(V + kv_base, cols, offs_d, head_dim)
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:  # q blocks that end before these keys start see none of them
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for start_m in range(lo, n_q, BLOCK_M):
        rows = start_m + offs_m
        q_ptrs = _tile_ptrs(Q + q_base, rows, offs_d, head_dim)
        q_mask = _tile_mask(rows, offs_d, n_q, head_dim)
        do_ptrs = _tile_ptrs(DO + q_base, rows, offs_d, head_dim)
        q = tl.load(q_ptrs, mask=q_mask, other=0.0)
        do = tl.load(do_ptrs, mask=q_mask, other=0.0)
        lse = tl.load(LSE + pid_bh * n_q + rows, mask=rows < n_q, other=0.0)
        delta = tl.load(DELTA + pid_bh * n_q + rows, mask=rows < n_q, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(_valid(rows, cols, n_k, CAUSAL), s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])  # the forward's softmax, recomputed
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)

    dk_ptrs = _tile_ptrs(DK + pid_bh * n_k * head_dim, cols, offs_d, head_dim)
    dkv_mask = _tile_mask(cols, offs_d, n_k, head_dim)
    dv_ptrs = _tile_ptrs(DV + pid_bh * n_k * head_dim, cols, offs_d, head_dim)
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=dkv_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=dkv_mask)


@triton.jit
def flash_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, sm_scale, qk_scale, n_heads, GROUP, n_q, n_k, head_dim,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One q block of one q head: dQ = scale * sum dS K over the k blocks it sees (no atomics: deterministic)."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: offsets may pass 2^31
    kv_bh = (pid_bh // n_heads) * (n_heads // GROUP) + (pid_bh % n_heads) // GROUP
    q_base, kv_base = pid_bh * n_q * head_dim, kv_bh * n_k * head_dim
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n, offs_d = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    q_ptrs = _tile_ptrs(Q + q_base, rows, offs_d, head_dim)
    q_mask = _tile_mask(rows, offs_d, n_q, head_dim)
    do_ptrs = _tile_ptrs(DO + q_base, rows, offs_d, head_dim)
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    do = tl.load(do_ptrs, mask=q_mask, other=0.0)
    lse = tl.load(LSE + pid_bh * n_q + rows, mask=rows < n_q, other=0.0)
    delta = tl.load(DELTA + pid_bh * n_q + rows, mask=rows < n_q, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = n_k
    if CAUSAL:  # keys past the block's last row are all in the future
        hi = tl.minimum((pid_m + 1) * BLOCK_M, n_k)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = _tile_ptrs(K + kv_base, cols, offs_d, head_dim)
        kv_mask = _tile_mask(cols, offs_d, n_k, head_dim)
        v_ptrs = _tile_ptrs(V + kv_base, cols, offs_d, head_dim)
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(_valid(rows, cols, n_k, CAUSAL), s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    dq_ptrs = _tile_ptrs(DQ + q_base, rows, offs_d, head_dim)
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)
