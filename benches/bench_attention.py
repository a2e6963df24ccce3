"""Attention: naive (N x N scores), eager and torch.compile'd, against torch SDPA, the tiled PyTorch
FlashAttention and the Triton FlashAttention-2 kernels (CUDA only), swept over sequence length; forward,
backward, and forward+backward. Dao et al., "FlashAttention" (2022) and "FlashAttention-2" (2023).

Conventions, the same in every row:
- inputs (batch, heads, seq_len, head_dim), made on the device by torch.randn with a generator there, one seed
  per tensor; fp32 on CPU, bf16 on CUDA, non-causal.
- flops: impl.common.roofline.attention_flops for the pass (backward 2.5x, forward+backward 3.5x the forward).
  bytes: every input read once and every output written once: forward q, k, v read and out written (4
  tensors); backward q, k, v, out, dout read and dq, dk, dv written (8); forward+backward q, k, v, dout read
  and out, dq, dk, dv written (8). The renderer turns them into % of roof / % of peak and the bound.
- expected: torch SDPA on the same inputs (fp32 on CPU; on CUDA the bf16 SDPA output), computed outside the
  timed call; every row shows max abs/rel error against it and fails beyond the dtype's tolerance. Backward
  rows compare dq, dk, dv; forward+backward rows out, dq, dk, dv.
- L2 flushed before every timed call on CUDA (flush_l2=True).
- "naive (compiled)": torch.compile of naive attention, at the first seq_len under --size smoke and up to
  1024 under small (compile time on a small CPU box), up to 2048 under full (the GPU run has a time budget).
Recorded target: on CPU, the tiled forward+backward peak at N=4096 at most 1/8 of naive's (the GPU targets,
Triton forward >= 0.8x and backward >= 0.6x of SDPA-flash, read off the table's speed-up vs sdpa column).

Packed attention (groups attention-packed-forward, attention-packed-forward-backward): one row of fixed total
length N (smoke 256, small 1024, full 8192) holding D documents of equal length N / D, causal within each; the
swept parameter is the live fraction, the share of the N x N causal triangle (N (N + 1) / 2 pairs) that the
document mask leaves, D (N/D) (N/D + 1) / 2 pairs: 1, ~1/2, ~1/4, ... Variants on the same inputs: ours tiled
(PyTorch) and ours Triton (CUDA only: on CPU the interpreter is no timing, the row is recorded as skipped) with
`document_ids`, both skipping the tiles the mask empties; SDPA with the dense (B, 1, N, N) boolean mask, built
outside the timed call (the reference and the baseline); FlexAttention with a document block mask, compiled
(its backward is CUDA-only: skipped on CPU). flops count the live pairs only (4 * B * H * live * head_dim per
forward, 2.5x that for the backward), so TFLOP/s is useful work; a kernel that skips empty tiles keeps it flat
as the live fraction falls while the dense-mask reference's time stays that of the whole square.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from impl.attention import flash_attention_torch, flash_attention_triton, naive_attention
from impl.common import MemoryMeter, resolve_device
from impl.common.roofline import attention_flops

SWEEPS = {
    "head_dim": {"smoke": [64], "small": [64], "full": [64, 128]},
    "documents": {"smoke": [1, 4], "small": [1, 2, 4, 8, 16], "full": [1, 2, 4, 8, 16, 32, 64]},
}
SEQ_LENS = {"smoke": [64, 128], "small": [256, 512, 1024, 2048, 4096], "full": [1024, 2048, 4096, 8192, 16384]}
COMPILED_MAX_SEQ_LEN = {"smoke": 64, "small": 1024, "full": 2048}  # compile time bounds the compiled sweep
CPU_BATCH, CPU_HEADS = 1, 2
GPU_TOKENS, GPU_HIDDEN = 16384, 2048  # as in the FlashAttention-2 paper: batch = 16k / N, heads = 2048 / head_dim
CPU_TARGET_SEQ_LEN, CPU_TARGET_RATIO = 4096, 1 / 8
COMPILED = "naive (compiled)"


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


# COMPILED runs naive_attention: the bench fixture compiles it (test_backward compiles its forward itself).
PROVIDERS = {
    "naive": naive_attention,
    COMPILED: naive_attention,
    "sdpa": sdpa,
    "flash_torch": flash_torch,
    "flash_triton": flash_attention_triton,
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """(provider, seq_len) pairs: flash_triton only on CUDA (on CPU the kernels run only under the interpreter,
    in tests), the compiled variant only up to COMPILED_MAX_SEQ_LEN."""
    if "provider" in metafunc.fixturenames:
        device = resolve_device(metafunc.config.getoption("--device"))
        size = metafunc.config.getoption("--size")  # resolved once, in the root conftest
        pairs = [
            pytest.param(p, n, id=f"{p.replace(' ', '_')}-seq_len={n}")
            for p in PROVIDERS
            if device.type == "cuda" or p != "flash_triton"
            for n in SEQ_LENS[size]
            if p != COMPILED or n <= COMPILED_MAX_SEQ_LEN[size]
        ]
        metafunc.parametrize(("provider", "seq_len"), pairs)


def _fresh_dynamo(provider: str) -> None:
    """Compiled rows share code objects (the fixture's wrapper, naive_attention): without a reset, the ninth row
    would hit dynamo's recompile limit (8) and silently run eagerly."""
    if provider == COMPILED:
        torch._dynamo.reset()


def _batch_heads(device, seq_len, head_dim):
    if device.type == "cuda":  # enough (batch, head) programs to fill the GPU at every length
        return max(1, GPU_TOKENS // seq_len), GPU_HIDDEN // head_dim
    return CPU_BATCH, CPU_HEADS


def _randn(shape, device, dtype, seed, requires_grad=False):
    """torch.randn made on the device itself (no host-side tensor to copy), one seed per tensor."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=g, device=device, dtype=dtype).requires_grad_(requires_grad)


def _inputs(seq_len, head_dim, device, requires_grad):
    """q, k, v, and dout (the gradient flowing into the output), each of shape (batch, heads, seq_len, head_dim)."""
    batch, heads = _batch_heads(device, seq_len, head_dim)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = (batch, heads, seq_len, head_dim)
    q, k, v = (_randn(shape, device, dtype, seed, requires_grad) for seed in range(3))
    return q, k, v, _randn(shape, device, dtype, 3)


def _reference(q, k, v, grad_out, pass_):
    """SDPA's result for the pass, outside any timed call: out; (dq, dk, dv); or (out, dq, dk, dv)."""
    if pass_ == "forward":
        with torch.no_grad():
            return sdpa(q, k, v)
    out = sdpa(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return grads if pass_ == "backward" else (out.detach(), *grads)


def _measure(bench, fn, provider, q, pass_, expected):
    """Bench `fn` on inputs shaped like `q`, with the pass's FLOPs and bytes, against SDPA's `expected`."""
    batch, heads, seq_len, head_dim = q.shape
    return bench(
        fn,
        variant=provider,
        params={"seq_len": seq_len, "head_dim": head_dim, "heads": heads, "batch": batch},
        sweep="seq_len",
        dtype=q.dtype,
        baseline=provider == "naive",
        reference=provider == "sdpa",
        flops=attention_flops(batch, heads, seq_len, seq_len, head_dim, pass_=pass_),
        bytes=(4 if pass_ == "forward" else 8) * q.numel() * q.element_size(),
        expected=expected,
        flush_l2=True,
        compile=provider == COMPILED and pass_ != "backward",  # the backward's forward is compiled outside
    )


def _fwd_bwd_peak(attn, q, k, v, grad_out):
    with MemoryMeter(q.device) as mem:
        torch.autograd.grad(attn(q, k, v), (q, k, v), grad_out)
    return mem.peak


@pytest.mark.benchmark(group="attention-forward")
def test_forward(bench, device, provider, seq_len, head_dim):
    _fresh_dynamo(provider)
    q, k, v, grad_out = _inputs(seq_len, head_dim, device, requires_grad=False)
    attn = PROVIDERS[provider]

    def fn():
        with torch.no_grad():
            return attn(q, k, v)

    _measure(bench, fn, provider, q, "forward", _reference(q, k, v, grad_out, "forward"))


@pytest.mark.benchmark(group="attention-backward")
def test_backward(bench, device, provider, seq_len, head_dim):
    _fresh_dynamo(provider)
    q, k, v, grad_out = _inputs(seq_len, head_dim, device, requires_grad=True)
    expected = _reference(q, k, v, grad_out, "backward")
    attn = PROVIDERS[provider]
    if provider == COMPILED:  # compile the forward here: its backward (AOTAutograd's) is what gets timed
        try:
            attn = torch.compile(naive_attention)
            out = attn(q, k, v)
        except Exception as err:
            bench.skip(
                f"torch.compile failed: {type(err).__name__}: {str(err)[:200]}",
                variant=provider,
                params={"seq_len": seq_len, "head_dim": head_dim},
                sweep="seq_len",
                dtype=q.dtype,
            )
    else:
        out = attn(q, k, v)  # the forward, outside the measured call

    def fn():  # autograd.grad, not .backward(): no .grad accumulates, so there is nothing to reset
        return torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)

    _measure(bench, fn, provider, q, "backward", expected)


@pytest.mark.benchmark(group="attention-forward-backward")
def test_forward_backward(bench, device, provider, seq_len, head_dim):
    _fresh_dynamo(provider)
    q, k, v, grad_out = _inputs(seq_len, head_dim, device, requires_grad=True)
    attn = PROVIDERS[provider]

    def fn():
        out = attn(q, k, v)
        return (out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out))

    info = _measure(bench, fn, provider, q, "forward+backward", _reference(q, k, v, grad_out, "forward+backward"))
    if device.type == "cpu" and provider == "flash_torch" and seq_len == CPU_TARGET_SEQ_LEN and not info["oom"]:
        ratio = info["peak_bytes"] / _fwd_bwd_peak(naive_attention, q, k, v, grad_out)
        info["metrics"]["peak / naive peak"] = ratio
        info["metrics"][f"CPU target <= {CPU_TARGET_RATIO:g}"] = "met" if ratio <= CPU_TARGET_RATIO else "missed"


# ---- packed (document-masked) attention ----------------------------------------------------------------------
PACKED_LEN = {"smoke": 256, "small": 1024, "full": 8192}
PACKED_HEAD_DIM = 64
PACKED_PROVIDERS = ("flash_torch", "flash_triton", "sdpa (dense mask)", "flex_attention")


def _packed_inputs(device, size, documents, requires_grad):
    """q, k, v, dout (batch, heads, N, 64), the (B, N) document ids and the (B, 1, N, N) dense causal mask."""
    n = PACKED_LEN[size]
    batch, heads = _batch_heads(device, n, PACKED_HEAD_DIM)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = (batch, heads, n, PACKED_HEAD_DIM)
    q, k, v = (_randn(shape, device, dtype, seed, requires_grad) for seed in range(3))
    ids = (torch.arange(n, device=device) // (n // documents)).expand(batch, n).contiguous()
    dense = (ids[:, :, None] == ids[:, None, :]) & torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return q, k, v, _randn(shape, device, dtype, 3), ids, dense[:, None]


def _flex(q, k, v, ids):
    """FlexAttention with the same documents as a block mask (built here, outside the timed call)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        return (ids[b, q_idx] == ids[b, kv_idx]) & (kv_idx <= q_idx)

    block_mask = create_block_mask(mask_mod, q.shape[0], None, q.shape[2], k.shape[2], device=q.device)
    return lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask)


def _packed_attn(provider, q, k, v, ids, dense):
    if provider == "flash_torch":  # smaller tiles than the dense group's: the skipping works at tile granularity
        block = 256 if q.is_cuda else 128
        return lambda q, k, v: flash_attention_torch(q, k, v, causal=True, document_ids=ids, block_q=block,
                                                     block_k=block)  # fmt: skip
    if provider == "flash_triton":
        return lambda q, k, v: flash_attention_triton(q, k, v, causal=True, document_ids=ids)
    if provider == "flex_attention":
        return _flex(q, k, v, ids)
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)


def _packed_row(bench, provider, q, documents, pass_, fn, expected, reason=None):
    batch, heads, n, head_dim = q.shape
    length = n // documents
    live = documents * length * (length + 1) // 2  # query-key pairs the mask leaves, per (batch, head)
    fraction = live / (n * (n + 1) / 2)
    row = dict(variant=provider, params={"live_fraction": round(fraction, 4), "documents": documents, "seq_len": n,
               "head_dim": head_dim, "heads": heads, "batch": batch}, sweep="live_fraction", dtype=q.dtype,
               baseline=provider == "sdpa (dense mask)", reference=provider == "sdpa (dense mask)")  # fmt: skip
    if reason:
        bench.skip(reason, **row)
    # attention_flops over a 1 x live "matrix": 4 * B * H * live * head_dim (x2.5 backward), the live pairs only
    flops = attention_flops(batch, heads, 1, live, head_dim, pass_=pass_)
    return bench(fn, **row, flops=flops, bytes=(4 if pass_ == "forward" else 8) * q.numel() * q.element_size(),
                 expected=expected, flush_l2=True, compile=provider == "flex_attention")  # fmt: skip


def _packed_skip_reason(provider, device, backward):
    if provider == "flash_triton" and device.type != "cuda":
        return "the Triton kernels run on CPU only through the interpreter, which is no timing"
    if provider == "flex_attention" and backward and device.type != "cuda":
        return "FlexAttention has no backward on CPU"
    return None


@pytest.mark.parametrize("packed_provider", PACKED_PROVIDERS)
@pytest.mark.benchmark(group="attention-packed-forward")
def test_packed_forward(bench, device, size, packed_provider, documents):
    q, k, v, _, ids, dense = _packed_inputs(device, size, documents, requires_grad=False)
    reason = _packed_skip_reason(packed_provider, device, backward=False)
    attn = None if reason else _packed_attn(packed_provider, q, k, v, ids, dense)
    with torch.no_grad():
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)

    def fn():
        with torch.no_grad():
            return attn(q, k, v)

    _packed_row(bench, packed_provider, q, documents, "forward", fn, expected, reason)


@pytest.mark.parametrize("packed_provider", PACKED_PROVIDERS)
@pytest.mark.benchmark(group="attention-packed-forward-backward")
def test_packed_forward_backward(bench, device, size, packed_provider, documents):
    q, k, v, grad_out, ids, dense = _packed_inputs(device, size, documents, requires_grad=True)
    reason = _packed_skip_reason(packed_provider, device, backward=True)
    attn = None if reason else _packed_attn(packed_provider, q, k, v, ids, dense)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    expected = (out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out))

    def fn():
        out = attn(q, k, v)
        return (out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out))

    _packed_row(bench, packed_provider, q, documents, "forward+backward", fn, expected, reason)
