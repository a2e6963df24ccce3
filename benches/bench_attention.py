"""Attention: naive (N x N scores) against torch SDPA, the tiled PyTorch FlashAttention and the Triton
FlashAttention-2 kernels (CUDA only), swept over sequence length; forward, backward, and forward+backward.

Dao et al., "FlashAttention" (2022) and "FlashAttention-2" (2023). FLOPs are the analytic count of the two
matmuls, 4 * B * H * N^2 * D for the forward, 2.5x that for the backward (five matmuls, one recomputed).
Recorded targets: on CPU, the tiled forward+backward peak at N=4096 at most 1/8 of naive's; on CUDA, the
TFLOP/s as a share of the H200's 989 TFLOP/s dense bf16 peak (the table's "speed-up vs sdpa" column gives
the Triton-vs-SDPA-flash ratios the GPU targets name: forward >= 0.8, backward >= 0.6).
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from impl.attention import flash_attention_torch, flash_attention_triton, naive_attention
from impl.common import MemoryMeter, resolve_device

SWEEPS = {
    "seq_len": {"smoke": [64, 128], "small": [256, 512, 1024, 2048, 4096], "full": [1024, 2048, 4096, 8192, 16384]},
    "head_dim": {"smoke": [64], "small": [64], "full": [64, 128]},
}
CPU_BATCH, CPU_HEADS = 1, 2
GPU_TOKENS, GPU_HIDDEN = 16384, 2048  # as in the FlashAttention-2 paper: batch = 16k / N, heads = 2048 / head_dim
H200_BF16_TFLOPS = 989.0
CPU_TARGET_SEQ_LEN, CPU_TARGET_RATIO = 4096, 1 / 8


def sdpa(q, k, v):
    """torch SDPA; on CUDA pinned to its FlashAttention backend, the one the GPU targets compare with."""
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        context = sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    else:
        context = contextlib.nullcontext()
    with context:
        return F.scaled_dot_product_attention(q, k, v)


def flash_torch(q, k, v):
    # Larger tiles on CUDA, where each tile step is a handful of kernel launches; memory stays O(N) either way.
    block = 1024 if q.is_cuda else 256
    return flash_attention_torch(q, k, v, block_q=block, block_k=block)


PROVIDERS = {"naive": naive_attention, "sdpa": sdpa, "flash_torch": flash_torch, "flash_triton": flash_attention_triton}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """flash_triton is a provider only on CUDA (on CPU the kernels run only under the interpreter, in tests)."""
    if "provider" in metafunc.fixturenames:
        on_cuda = resolve_device(metafunc.config.getoption("--device")).type == "cuda"
        metafunc.parametrize("provider", [p for p in PROVIDERS if on_cuda or p != "flash_triton"])


def _batch_heads(device, seq_len, head_dim):
    if device.type == "cuda":  # enough (batch, head) programs to fill the GPU at every length
        return max(1, GPU_TOKENS // seq_len), GPU_HIDDEN // head_dim
    return CPU_BATCH, CPU_HEADS


def _inputs(seq_len, head_dim, device, requires_grad):
    batch, heads = _batch_heads(device, seq_len, head_dim)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (batch, heads, seq_len, head_dim)
    return [torch.randn(shape, generator=g).to(device, dtype).requires_grad_(requires_grad) for _ in range(3)]


def _measure(bench, fn, provider, q, flops_factor):
    """Bench `fn` on inputs shaped like `q`; FLOPs are flops_factor x the forward's 4 * B * H * N^2 * D."""
    batch, heads, seq_len, head_dim = q.shape
    info = bench(
        fn,
        variant=provider,
        params={"seq_len": seq_len, "head_dim": head_dim, "heads": heads, "batch": batch},
        sweep="seq_len",
        dtype=q.dtype,
        baseline=provider == "naive",
        reference=provider == "sdpa",
        flops=flops_factor * 4 * batch * heads * seq_len**2 * head_dim,
    )
    if bench.device.type == "cuda" and info.get("throughput") is not None:  # known only once timed
        info["metrics"]["% of H200 bf16 peak"] = 100 * info["throughput"] / H200_BF16_TFLOPS
    return info


def _fwd_bwd_peak(attn, q, k, v, grad_out):
    with MemoryMeter(q.device) as mem:
        torch.autograd.grad(attn(q, k, v), (q, k, v), grad_out)
    return mem.peak


@pytest.mark.benchmark(group="attention-forward")
def test_forward(bench, device, provider, seq_len, head_dim):
    q, k, v = _inputs(seq_len, head_dim, device, requires_grad=False)
    attn = PROVIDERS[provider]

    def fn():
        with torch.no_grad():
            return attn(q, k, v)

    _measure(bench, fn, provider, q, 1.0)


@pytest.mark.benchmark(group="attention-backward")
def test_backward(bench, device, provider, seq_len, head_dim):
    q, k, v = _inputs(seq_len, head_dim, device, requires_grad=True)
    grad_out = torch.randn_like(q)
    out = PROVIDERS[provider](q, k, v)  # the forward, outside the measured call

    def fn():
        return torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)

    _measure(bench, fn, provider, q, 2.5)


@pytest.mark.benchmark(group="attention-forward-backward")
def test_forward_backward(bench, device, provider, seq_len, head_dim):
    q, k, v = _inputs(seq_len, head_dim, device, requires_grad=True)
    grad_out = torch.randn_like(q)
    attn = PROVIDERS[provider]

    def fn():
        out = attn(q, k, v)
        return torch.autograd.grad(out, (q, k, v), grad_out)

    info = _measure(bench, fn, provider, q, 3.5)
    if device.type == "cpu" and provider == "flash_torch" and seq_len == CPU_TARGET_SEQ_LEN and not info["oom"]:
        ratio = info["peak_bytes"] / _fwd_bwd_peak(naive_attention, q, k, v, grad_out)
        info["metrics"]["peak / naive peak"] = ratio
        info["metrics"][f"CPU target <= {CPU_TARGET_RATIO:g}"] = "met" if ratio <= CPU_TARGET_RATIO else "missed"
