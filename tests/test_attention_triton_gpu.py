"""The compiled Triton FlashAttention-2 kernels on CUDA: bf16/fp16 judged against SDPA's own error from an fp32
truth, fp32 against naive attention, at lengths and head dims the interpreter is too slow for."""

import pytest
import torch
import torch.nn.functional as F

from impl.attention import attention, flash_attention_triton, naive_attention
from impl.common import assert_close_to_reference_error

pytestmark = [pytest.mark.gpu, pytest.mark.triton]

SHAPES = {  # (batch, q heads, k/v heads, seq, head_dim)
    "d64-odd": (2, 8, 8, 1000, 64),
    "d128-gqa": (1, 8, 2, 1537, 128),
    "d80-mqa": (1, 4, 1, 513, 80),
}


def make_qkv(shape, dtype):
    b, hq, hkv, n, d = shape
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    return [
        torch.randn(b, h, n, d, generator=g).to("cuda", dtype).requires_grad_() for h, g in zip((hq, hkv, hkv), gens)
    ]


def forward_backward(fn, q, k, v, grad_out, **kwargs):
    out = fn(q, k, v, **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def sdpa(q, k, v, causal=False):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_compiled_kernels_within_sdpa_error(shape, dtype, causal):
    q, k, v = make_qkv(shape, dtype)
    grad_out = torch.randn(q.shape, device="cuda").to(dtype)
    truth_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    truth = forward_backward(naive_attention, *truth_inputs, grad_out.double(), causal=causal)
    ours = forward_backward(flash_attention_triton, q, k, v, grad_out, causal=causal)
    ref = forward_backward(sdpa, q, k, v, grad_out, causal=causal)
    for name, o, r, t in zip(("out", "dq", "dk", "dv"), ours, ref, truth):
        assert o.dtype == dtype
        assert_close_to_reference_error(o, r, t, name=name)


def test_auto_backend_is_triton_on_cuda_and_deterministic():
    q, k, v = make_qkv(SHAPES["d128-gqa"], torch.bfloat16)
    grad_out = torch.randn(q.shape, device="cuda").to(torch.bfloat16)
    first = forward_backward(attention, q, k, v, grad_out, causal=True)
    second = forward_backward(flash_attention_triton, q, k, v, grad_out, causal=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
