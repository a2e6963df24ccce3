"""The compiled Triton FlashAttention-2 kernels on CUDA, forward and backward, judged in every dtype against SDPA's
own error from an fp64 truth (naive attention), at the benchmark's lengths and head dims and at odd ones.

Run this file alone, first, on a new GPU: `pytest tests/test_attention_triton_gpu.py -x`. An illegal memory
access poisons the CUDA context, so every later test in the process would fail with it; the tests go from the
smallest launch to the largest, synchronize after each kernel call so that a fault is reported by the test that
caused it, and `-x` stops there.
"""

import pytest
import torch
import torch.nn.functional as F

from impl.attention import attention, flash_attention_triton, naive_attention
from impl.common import assert_close_to_reference_error

pytestmark = [pytest.mark.gpu, pytest.mark.triton]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SHAPES = {  # (batch, q heads, k/v heads, seq, head_dim): lengths and head dims off every tile
    "d64-odd": (2, 8, 8, 1000, 64),
    "d128-gqa": (1, 8, 2, 1537, 128),
    "d80-mqa": (1, 4, 1, 513, 80),
}
BENCH_LENGTHS = (1024, 2048, 4096, 8192, 16384)  # benches/bench_attention.py's full sweep, at head_dim 64 and 128


def make_qkv(shape, dtype, seed=0):
    b, hq, hkv, n, d = shape
    gens = [torch.Generator().manual_seed(seed + i) for i in range(3)]
    return [
        torch.randn(b, h, n, d, generator=g).to("cuda", dtype).requires_grad_() for h, g in zip((hq, hkv, hkv), gens)
    ]


def forward_backward(fn, q, k, v, grad_out, **kwargs):
    out = fn(q, k, v, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    torch.cuda.synchronize()  # a fault in the kernels surfaces here, in the test that launched them
    return (out, *grads)


def sdpa(q, k, v, causal=False):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


def check_within_sdpa_error(shape, dtype, causal):
    q, k, v = make_qkv(shape, dtype)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to("cuda", dtype)
    ours = forward_backward(flash_attention_triton, q, k, v, grad_out, causal=causal)
    ref = forward_backward(sdpa, q, k, v, grad_out, causal=causal)
    del q, k, v  # the fp64 truth below materializes (heads, N, N) several times over: free what we can
    truth_inputs = [t.detach().double().requires_grad_() for t in make_qkv(shape, dtype)]
    truth = forward_backward(naive_attention, *truth_inputs, grad_out.double(), causal=causal)
    for name, o, r, t in zip(("out", "dq", "dk", "dv"), ours, ref, truth):
        assert o.dtype == dtype and o.shape == t.shape, f"{name}: {o.dtype} {tuple(o.shape)}"
        assert torch.isfinite(o).all(), f"{name}: {int((~torch.isfinite(o)).sum())} non-finite values"
        assert_close_to_reference_error(o, r, t, name=name)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_smallest_launch_runs(dtype):
    """One program per kernel, every mask on: the first thing to fail if an address is wrong."""
    check_within_sdpa_error((1, 2, 1, 37, 24), dtype, causal=True)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_compiled_kernels_within_sdpa_error(shape, dtype, causal):
    check_within_sdpa_error(shape, dtype, causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("seq_len", BENCH_LENGTHS)
def test_benchmark_shapes_within_sdpa_error(seq_len, head_dim, causal):
    """bf16 at the benchmark's lengths; few heads, so the fp64 truth stays a few GB and a second or so."""
    heads = 2 if seq_len <= 4096 else 1
    check_within_sdpa_error((1, heads, heads, seq_len, head_dim), torch.bfloat16, causal)


def test_auto_backend_is_triton_on_cuda_and_deterministic():
    q, k, v = make_qkv(SHAPES["d128-gqa"], torch.bfloat16)
    grad_out = torch.randn(q.shape, device="cuda").to(torch.bfloat16)
    first = forward_backward(attention, q, k, v, grad_out, causal=True)
    second = forward_backward(flash_attention_triton, q, k, v, grad_out, causal=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n_q", [8192, 5, 1], ids=["prefill", "decode-5", "decode-1"])
def test_packed_documents_at_the_benchmark_length_within_sdpa_error(n_q):
    """bf16, 8192 keys in ragged documents (boundaries off every tile, two of length 1), causal, GQA; the queries
    are the last n_q. The kernels skip the tiles outside each block's documents; SDPA gets the dense mask."""
    n_k, lengths = 8192, (1, 700, 3000, 1, 2500, 1990)
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).cuda()[None]
    allowed = (ids[:, n_k - n_q :, None] == ids[:, None, :]) & torch.ones(n_k, n_k, device="cuda").tril().bool()[
        n_k - n_q :
    ]
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    shapes = ((1, 4, n_q, 64), (1, 2, n_k, 64), (1, 2, n_k, 64), (1, 4, n_q, 64))
    q, k, v, grad_out = (torch.randn(s, generator=g).to("cuda", torch.bfloat16) for s, g in zip(shapes, gens))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ours = forward_backward(flash_attention_triton, q, k, v, grad_out, causal=True, document_ids=ids)
    ref = forward_backward(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], enable_gqa=True),
        q, k, v, grad_out,
    )  # fmt: skip
    truth_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    truth = forward_backward(naive_attention, *truth_inputs, grad_out.double(), causal=True, document_ids=ids)
    for name, o, r, t in zip(("out", "dq", "dk", "dv"), ours, ref, truth):
        assert torch.isfinite(o).all(), f"{name}: {int((~torch.isfinite(o)).sum())} non-finite values"
        assert_close_to_reference_error(o, r, t, name=name)
