"""Naive and tiled PyTorch attention against torch SDPA: outputs and dq/dk/dv, fp32 tight, fp16/bf16 judged
against the reference's own low-precision error; causal, odd lengths, GQA, head dims; determinism."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from impl.attention import attention, flash_attention_torch, naive_attention
from impl.common import assert_close_to_reference_error, tolerance

# (batch, q heads, k/v heads, seq, head_dim): lengths that are not multiples of the 16/32 blocks used below.
SHAPES = {
    "mha-odd": (2, 4, 4, 37, 32),
    "gqa": (1, 4, 2, 50, 16),
    "mqa-d64": (1, 4, 1, 33, 64),
    "one-token": (1, 2, 2, 1, 24),
}
BLOCKS = dict(block_q=16, block_k=32)


def make_qkv(shape, dtype=torch.float32, device="cpu", seed=0):
    b, hq, hkv, n, d = shape
    tensors = []
    for i, heads in enumerate((hq, hkv, hkv)):
        g = torch.Generator().manual_seed(seed + i)
        tensors.append(torch.randn(b, heads, n, d, generator=g).to(device, dtype).requires_grad_())
    return tensors


def sdpa(q, k, v, causal=False):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


def forward_backward(fn, q, k, v, grad_out, **kwargs):
    out = fn(q, k, v, **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def tiled(q, k, v, causal=False):
    return flash_attention_torch(q, k, v, causal=causal, **BLOCKS)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("impl", [naive_attention, tiled], ids=["naive", "tiled"])
def test_fp32_matches_sdpa_outputs_and_grads(impl, shape, causal):
    q, k, v = make_qkv(shape)
    grad_out = torch.randn(q.shape)
    ours = forward_backward(impl, q, k, v, grad_out, causal=causal)
    ref = forward_backward(sdpa, q, k, v, grad_out, causal=causal)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        torch.testing.assert_close(a, b, **tolerance(torch.float32), msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tiled_matches_naive_in_fp32(causal):
    q, k, v = make_qkv((2, 4, 2, 77, 32))
    grad_out = torch.randn(q.shape)
    ours = forward_backward(tiled, q, k, v, grad_out, causal=causal)
    ref = forward_backward(naive_attention, q, k, v, grad_out, causal=causal)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **tolerance(torch.float32))


def test_negative_control_a_perturbed_key_breaks_the_match():
    q, k, v = make_qkv(SHAPES["gqa"])
    k_moved = k.detach().clone()
    k_moved[0, 1, 7] += 0.1  # one key of one k/v head
    out = flash_attention_torch(q, k_moved, v, **BLOCKS)
    assert not torch.allclose(out, sdpa(q, k, v), **tolerance(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_low_precision_error_within_sdpa_error(dtype, causal):
    q, k, v = make_qkv((1, 4, 2, 70, 32), dtype)
    grad_out = torch.randn(q.shape).to(dtype)
    truth_inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    truth = forward_backward(naive_attention, *truth_inputs, grad_out.float(), causal=causal)
    ours = forward_backward(tiled, q, k, v, grad_out, causal=causal)
    ref = forward_backward(sdpa, q, k, v, grad_out, causal=causal)
    for name, o, r, t in zip(("out", "dq", "dk", "dv"), ours, ref, truth):
        assert o.dtype == dtype
        assert_close_to_reference_error(o, r, t, name=name)


@pytest.mark.parametrize("backend", ["auto", "naive", "torch", "sdpa"])
def test_front_dispatches_to_equal_backends(backend):
    q, k, v = make_qkv(SHAPES["gqa"])
    out = attention(q, k, v, causal=True, scale=0.3, backend=backend)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, ref, **tolerance(torch.float32))


def test_tiled_backward_is_bitwise_repeatable():
    q, k, v = make_qkv((1, 4, 2, 97, 32))
    grad_out = torch.randn(q.shape)
    first = forward_backward(tiled, q, k, v, grad_out, causal=True)
    second = forward_backward(tiled, q, k, v, grad_out, causal=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 60),
    block_q=st.integers(3, 40),
    block_k=st.integers(3, 40),
    groups=st.sampled_from([1, 2, 3, 6]),
    causal=st.booleans(),
)
def test_any_block_sizes_give_the_naive_result(n, block_q, block_k, groups, causal):
    """Property: tiling changes only the order of the sums, never the result (checked in fp64)."""
    q, k, v = make_qkv((1, 6, 6 // groups, n, 8), torch.float64)
    grad_out = torch.randn(q.shape, dtype=torch.float64)
    ours = forward_backward(flash_attention_torch, q, k, v, grad_out, causal=causal, block_q=block_q, block_k=block_k)
    ref = forward_backward(naive_attention, q, k, v, grad_out, causal=causal)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **tolerance(torch.float64))
