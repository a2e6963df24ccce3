"""The Triton FlashAttention-2 kernels on CPU through Triton's interpreter: outputs and dq/dk/dv against naive
attention in fp32 and torch SDPA in fp16 (the interpreter has no bf16; bf16 is in test_attention_triton_gpu.py).

TRITON_INTERPRET must be in the environment before the kernels are defined; they are imported on first call,
so setting it here, at collection, is early enough. With CUDA present the compiled kernels are tested instead.
"""

import os

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip(
        "CUDA present: the compiled kernels are tested in test_attention_triton_gpu.py", allow_module_level=True
    )
os.environ["TRITON_INTERPRET"] = "1"

import torch.nn.functional as F

from impl.attention import attention, flash_attention_triton, naive_attention
from impl.attention.flash_triton import TritonConfig
from impl.common import assert_close_to_reference_error, tolerance

pytestmark = pytest.mark.triton

SMALL_BLOCKS = TritonConfig(block_m=16, block_n=16, bwd_block_m=16, bwd_block_n=32)  # several blocks per row/column

CASES = {  # (batch, q heads, k/v heads, seq, head_dim), dtype, causal
    "fp32-odd-len": ((1, 2, 2, 37, 32), torch.float32, False),
    "fp32-gqa-causal": ((1, 4, 2, 50, 24), torch.float32, True),
    "fp32-d128-mqa": ((1, 2, 1, 20, 128), torch.float32, True),
    "fp16-gqa-causal": ((1, 4, 2, 45, 64), torch.float16, True),
    "fp16-d16": ((1, 2, 1, 33, 16), torch.float16, False),
}


def make_qkv(shape, dtype=torch.float32, seed=0):
    b, hq, hkv, n, d = shape
    gens = [torch.Generator().manual_seed(seed + i) for i in range(3)]
    return [torch.randn(b, h, n, d, generator=g).to(dtype).requires_grad_() for h, g in zip((hq, hkv, hkv), gens)]


def sdpa(q, k, v, causal=False):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


def forward_backward(fn, q, k, v, grad_out, **kwargs):
    out = fn(q, k, v, **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def triton_small(q, k, v, causal=False):
    return flash_attention_triton(q, k, v, causal=causal, config=SMALL_BLOCKS)


@pytest.mark.parametrize("case", list(CASES))
def test_interpreted_kernels_match_reference(case):
    shape, dtype, causal = CASES[case]
    q, k, v = make_qkv(shape, dtype)
    grad_out = torch.randn(q.shape).to(dtype)
    ours = forward_backward(triton_small, q, k, v, grad_out, causal=causal)
    truth_inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    truth = forward_backward(naive_attention, *truth_inputs, grad_out.float(), causal=causal)
    if dtype == torch.float32:
        for name, a, b in zip(("out", "dq", "dk", "dv"), ours, truth):
            torch.testing.assert_close(a, b, **tolerance(dtype), msg=lambda m, name=name: f"{name}: {m}")
        return
    ref = forward_backward(sdpa, q, k, v, grad_out, causal=causal)
    for name, o, r, t in zip(("out", "dq", "dk", "dv"), ours, ref, truth):
        assert o.dtype == dtype
        assert_close_to_reference_error(o, r, t, name=name)


def test_front_and_default_blocks_match_sdpa():
    q, k, v = make_qkv((1, 2, 2, 40, 32))
    out = attention(q, k, v, causal=True, backend="triton")
    torch.testing.assert_close(out, sdpa(q, k, v, causal=True), **tolerance(torch.float32))


def test_negative_control_a_perturbed_value_breaks_the_match():
    q, k, v = make_qkv((1, 2, 2, 40, 32))
    v_moved = v.detach().clone()
    v_moved[0, 0, 3] += 0.1
    out = triton_small(q, k, v_moved)
    assert not torch.allclose(out, sdpa(q, k, v), **tolerance(torch.float32))


@pytest.mark.parametrize("name", ["block_m", "bwd_block_n"])
def test_config_blocks_must_be_powers_of_two(name):
    with pytest.raises(ValueError, match=rf"{name} must be a power of two >= 16 .*got 24"):
        TritonConfig(**{name: 24})
