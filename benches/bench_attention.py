"""Attention: the naive N x N softmax against torch SDPA, swept over sequence length.

Forward, and forward+backward, on (batch, heads, seq, head_dim) inputs. FLOPs are the analytic count of the
two matmuls (4 * B * H * N^2 * D forward; backward is 2.5x forward), halved when causal.
"""

import math

import pytest
import torch
import torch.nn.functional as F

SWEEPS = {
    "seq_len": {"smoke": [64, 128], "small": [256, 512, 1024, 2048, 4096], "full": [1024, 2048, 4096, 8192, 16384]}
}
BATCH, HEADS, HEAD_DIM = 1, 4, 64


def naive(q, k, v):
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, N, N)
    return torch.softmax(scores, dim=-1) @ v


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


PROVIDERS = {"naive": naive, "sdpa": sdpa}


def _inputs(seq_len, device, dtype, requires_grad):
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (BATCH, HEADS, seq_len, HEAD_DIM)
    return [torch.randn(shape, generator=g).to(device, dtype).requires_grad_(requires_grad) for _ in range(3)]


def _dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _flops(seq_len):
    return 4 * BATCH * HEADS * seq_len**2 * HEAD_DIM


@pytest.mark.benchmark(group="attention-forward")
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_forward(bench, device, provider, seq_len):
    dtype = _dtype(device)
    q, k, v = _inputs(seq_len, device, dtype, requires_grad=False)
    attn = PROVIDERS[provider]

    def fn():
        with torch.no_grad():
            return attn(q, k, v)

    bench(
        fn,
        variant=provider,
        params={"seq_len": seq_len, "head_dim": HEAD_DIM, "heads": HEADS, "batch": BATCH},
        sweep="seq_len",
        dtype=dtype,
        baseline=provider == "naive",
        reference=provider == "sdpa",
        flops=_flops(seq_len),
    )


@pytest.mark.benchmark(group="attention-forward-backward")
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_forward_backward(bench, device, provider, seq_len):
    dtype = _dtype(device)
    q, k, v = _inputs(seq_len, device, dtype, requires_grad=True)
    grad_out = torch.randn_like(q)
    attn = PROVIDERS[provider]

    def fn():
        out = attn(q, k, v)
        return torch.autograd.grad(out, (q, k, v), grad_out)

    bench(
        fn,
        variant=provider,
        params={"seq_len": seq_len, "head_dim": HEAD_DIM, "heads": HEADS, "batch": BATCH},
        sweep="seq_len",
        dtype=dtype,
        baseline=provider == "naive",
        reference=provider == "sdpa",
        flops=3.5 * _flops(seq_len),
    )
