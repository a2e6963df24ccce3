"""Masked attention on every backend: causal with fewer queries than keys (bottom-right aligned, a decode step
over a KV cache), packed documents (`document_ids`, or `cu_seqlens`) and a dense boolean `mask`; outputs and
dq/dk/dv of naive, tiled PyTorch (small tiles: many per row), SDPA through the front and Triton (through its
interpreter on CPU) against two references on the same inputs:
- torch SDPA with an explicit boolean mask built here from the document lengths (torch.block_diag of ones and
  torch.tril), independently of the package's `dense_mask`;
- FlexAttention with a document block mask from `create_block_mask`. Its forward runs on CPU (eagerly); its
  backward does not ("FlexAttention does not support backward on CPU", torch 2.13), so gradients against it are
  checked under @pytest.mark.gpu.
fp32 is compared with tolerance(float32); bf16 (fp16 for Triton: the interpreter multiplies bf16 as integers,
see test_attention_triton.py) within a factor of SDPA's own low-precision error from the fp64 truth.
Tile skipping is observed, not assumed: NaN planted in one document's values reaches the outputs and gradients
of other documents iff a backend visits a tile holding those keys (P = 0 there, but 0 * NaN = NaN).
Negative controls: no document mask, a document boundary shifted by one, a perturbed key, a backend that visits
every tile.
"""

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the Triton kernels are first imported (on first call)

from impl.attention import attention, flash_attention_torch, flash_attention_triton
from impl.attention.flash_triton import TritonConfig
from impl.common import assert_close_to_reference_error, tolerance

TRITON_BLOCKS = TritonConfig(block_m=32, block_n=16, bwd_block_m=16, bwd_block_n=32, dq_block_m=32, dq_block_n=16)
on_cpu_interpreter = [
    pytest.mark.triton,
    pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the GPU test below runs the compiled kernels"),
]
BACKENDS = {
    "naive": lambda q, k, v, **kw: attention(q, k, v, backend="naive", **kw),
    "torch": lambda q, k, v, **kw: flash_attention_torch(q, k, v, block_q=16, block_k=8, **kw),
    "torch-front": lambda q, k, v, **kw: attention(q, k, v, backend="torch", **kw),  # default tiles: one per row
    "sdpa": lambda q, k, v, **kw: attention(q, k, v, backend="sdpa", **kw),
    "triton": lambda q, k, v, **kw: flash_attention_triton(q, k, v, config=TRITON_BLOCKS, **kw),
}
BACKEND_PARAMS = [pytest.param(b, marks=on_cpu_interpreter if b == "triton" else ()) for b in BACKENDS]
DENSE_BACKENDS = ["naive", "torch", "torch-front", "sdpa"]  # those that read a dense boolean mask

# (batch, q heads, k/v heads, Nq, Nk, causal, document lengths per batch row or None); head_dim 16 throughout.
# Lengths are off every tile, documents of length 1 included; decode-5's queries cross a document boundary.
RAGGED = [(1, 12, 1, 7, 13, 3), (20, 16, 1)]
CASES = {
    "docs-causal": (2, 4, 2, 37, 37, True, RAGGED),
    "docs-full": (2, 4, 2, 37, 37, False, RAGGED),
    "decode-1": (2, 4, 2, 1, 37, True, RAGGED),
    "decode-5": (2, 4, 2, 5, 37, True, RAGGED),
    "decode-5-nodocs": (1, 4, 2, 5, 37, True, None),
    "chunk-20-of-37": (2, 2, 1, 20, 37, True, RAGGED),
    "equal-docs-gqa": (1, 4, 1, 48, 48, True, [(12, 12, 12, 12)]),
    # documents longer than a tile, boundaries off the tiles: blocks wholly inside one document (unmasked runs)
    "long-docs-causal": (1, 2, 1, 100, 100, True, [(20, 70, 10)]),
    "long-docs-full": (1, 2, 1, 100, 100, False, [(20, 70, 10)]),
    "long-docs-chunk": (1, 2, 1, 40, 100, True, [(20, 70, 10)]),
}
HEAD_DIM = 16


def make_inputs(case, dtype=torch.float32, seed=0):
    b, hq, hkv, n_q, n_k, _, _ = CASES[case]
    shapes = ((b, hq, n_q, HEAD_DIM), (b, hkv, n_k, HEAD_DIM), (b, hkv, n_k, HEAD_DIM), (b, hq, n_q, HEAD_DIM))
    gens = [torch.Generator().manual_seed(seed + i) for i in range(4)]
    q, k, v, grad_out = (torch.randn(s, generator=g).to(dtype) for s, g in zip(shapes, gens))
    return q, k, v, grad_out


def document_ids(lengths_per_row):
    return torch.stack([torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in lengths_per_row])


def explicit_mask(lengths_per_row, n_q, n_k, causal):
    """(B, 1, Nq, Nk) bool: block-diagonal documents, lower triangle; queries are the last Nq positions."""
    rows = [torch.block_diag(*[torch.ones(n, n) for n in lengths]) > 0 for lengths in lengths_per_row]
    allowed = torch.stack(rows)[:, None, n_k - n_q :, :]
    if causal:
        allowed = allowed & (torch.ones(n_k, n_k).tril() > 0)[n_k - n_q :]
    return allowed


def case_masks(case):
    """(kwargs for our backends, the explicit reference mask) of a case."""
    b, _, _, n_q, n_k, causal, lengths = CASES[case]
    if lengths is None:
        return {"causal": causal}, explicit_mask([(n_k,)] * b, n_q, n_k, causal)
    kwargs = {"causal": causal, "document_ids": document_ids(lengths)}
    return kwargs, explicit_mask(lengths, n_q, n_k, causal)


def sdpa_masked(q, k, v, allowed):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=q.shape[1] != k.shape[1])


def forward_backward(fn, q, k, v, grad_out, **kwargs):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def assert_all_close(ours, ref, dtype):
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        torch.testing.assert_close(a, b, **tolerance(dtype), msg=lambda m, name=name: f"{name}: {m}")


TRITON_FRONT = pytest.param("triton-front", marks=on_cpu_interpreter)  # the front, the default fp32 tiles (64/32)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", [*BACKEND_PARAMS, TRITON_FRONT])
def test_fp32_matches_sdpa_with_explicit_mask(backend, case):
    q, k, v, grad_out = make_inputs(case)
    kwargs, allowed = case_masks(case)
    if backend == "triton-front":
        fn = lambda q, k, v, **kw: attention(q, k, v, backend="triton", **kw)
    else:
        fn = BACKENDS[backend]
    ours = forward_backward(fn, q, k, v, grad_out, **kwargs)
    assert_all_close(ours, forward_backward(sdpa_masked, q, k, v, grad_out, allowed=allowed), torch.float32)


CPU_SDPA_FACTOR = {"triton": 4.0}  # CPU SDPA keeps P in fp32 where the kernel rounds it (test_attention_triton.py)


@pytest.mark.parametrize("case", ["docs-causal", "decode-5", "docs-full"])
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_low_precision_within_sdpa_error(backend, case):
    dtype = torch.float16 if backend == "triton" else torch.bfloat16
    q, k, v, grad_out = make_inputs(case)
    kwargs, allowed = case_masks(case)
    truth = forward_backward(sdpa_masked, *(t.double() for t in (q, k, v, grad_out)), allowed=allowed)
    low = [t.to(dtype) for t in (q, k, v, grad_out)]
    ours = forward_backward(BACKENDS[backend], *low, **kwargs)
    ref = forward_backward(sdpa_masked, *low, allowed=allowed)
    for name, o, r, t in zip(("out", "dq", "dk", "dv"), ours, ref, truth):
        assert o.dtype == dtype
        assert_close_to_reference_error(o, r, t, factor=CPU_SDPA_FACTOR.get(backend, 2.0), name=name)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_cu_seqlens_is_the_same_as_document_ids(backend):
    q, k, v, grad_out = make_inputs("docs-causal")
    lengths = (1, 12, 1, 7, 13, 3)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    ids = document_ids([lengths, lengths])
    by_ids = forward_backward(BACKENDS[backend], q, k, v, grad_out, causal=True, document_ids=ids)
    by_cu = forward_backward(BACKENDS[backend], q, k, v, grad_out, causal=True, cu_seqlens=cu_seqlens)
    for a, b in zip(by_ids, by_cu):
        assert torch.equal(a, b)
    ref = forward_backward(sdpa_masked, q, k, v, grad_out, allowed=explicit_mask([lengths] * 2, 37, 37, True))
    assert_all_close(by_cu, ref, torch.float32)


def random_masks(b, hq, n_q, n_k):
    """Boolean masks of every broadcastable shape; the full one hides every key of one query row (SDPA: 0)."""
    g = torch.Generator().manual_seed(5)
    full = torch.rand(b, hq, n_q, n_k, generator=g) > 0.3
    full[0, 1, 2] = False
    return {
        "full": full,
        "shared": torch.rand(1, 1, n_q, n_k, generator=g) > 0.3,
        "key-padding": torch.arange(n_k).expand(b, 1, 1, n_k) < torch.tensor([n_k - 4, n_k]).view(b, 1, 1, 1),
    }


@pytest.mark.parametrize("shape", ["full", "shared", "key-padding"])
@pytest.mark.parametrize("case", ["docs-causal", "decode-5", "docs-full"])
@pytest.mark.parametrize("backend", DENSE_BACKENDS)
def test_dense_mask_combines_with_causal_and_documents(backend, case, shape):
    q, k, v, grad_out = make_inputs(case)
    kwargs, allowed = case_masks(case)
    mask = random_masks(q.shape[0], q.shape[1], q.shape[2], k.shape[2])[shape]
    ours = forward_backward(BACKENDS[backend], q, k, v, grad_out, mask=mask, **kwargs)
    ref = forward_backward(sdpa_masked, q, k, v, grad_out, allowed=allowed & mask)
    assert_all_close(ours, ref, torch.float32)
    assert torch.isfinite(torch.stack([t.sum() for t in ours])).all()


def flex(q, k, v, lengths, causal):
    """FlexAttention with a document (and bottom-right causal) block mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n_q, n_k, off = q.shape[2], k.shape[2], k.shape[2] - q.shape[2]
    ids = document_ids(lengths).to(q.device)

    def mask_mod(b, h, q_idx, kv_idx):
        same = ids[b, q_idx + off] == ids[b, kv_idx]
        return same & (kv_idx <= q_idx + off) if causal else same

    block_mask = create_block_mask(mask_mod, q.shape[0], None, n_q, n_k, device=q.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()": eager is the point here
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


FLEX_CASES = ["docs-causal", "docs-full", "decode-5", "chunk-20-of-37"]


@pytest.fixture(scope="module")
def flex_outputs():
    """FlexAttention's forward on CPU, once per case."""
    return {case: flex(*make_inputs(case)[:3], CASES[case][6], CASES[case][5]) for case in FLEX_CASES}


@pytest.mark.parametrize("case", FLEX_CASES)
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_forward_matches_flex_attention(backend, case, flex_outputs):
    q, k, v, _ = make_inputs(case)
    kwargs, _ = case_masks(case)
    with torch.no_grad():
        out = BACKENDS[backend](q, k, v, **kwargs)
    torch.testing.assert_close(out, flex_outputs[case], **tolerance(torch.float32))


def test_negative_control_flex_with_a_shifted_boundary_differs(flex_outputs):
    q, k, v, _ = make_inputs("docs-causal")
    shifted = [(2, 11, 1, 7, 13, 3), (20, 16, 1)]  # the first boundary one position later
    assert not torch.allclose(flex(q, k, v, shifted, True), flex_outputs["docs-causal"], **tolerance(torch.float32))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_negative_control_documents_and_their_boundaries_matter(backend):
    """Ours with documents differs from the reference without them, and from one whose boundary moved by one."""
    q, k, v, grad_out = make_inputs("docs-causal")
    kwargs, _ = case_masks("docs-causal")
    ours = forward_backward(BACKENDS[backend], q, k, v, grad_out, **kwargs)
    no_docs = explicit_mask([(37,)] * 2, 37, 37, True)
    shifted = explicit_mask([(1, 12, 1, 8, 12, 3), (20, 16, 1)], 37, 37, True)
    for allowed in (no_docs, shifted):
        ref = forward_backward(sdpa_masked, q, k, v, grad_out, allowed=allowed)
        with pytest.raises(AssertionError):
            assert_all_close(ours, ref, torch.float32)


def test_negative_control_a_perturbed_key_fails_the_low_precision_check():
    q, k, v, grad_out = make_inputs("docs-causal")
    kwargs, allowed = case_masks("docs-causal")
    truth = forward_backward(sdpa_masked, *(t.double() for t in (q, k, v, grad_out)), allowed=allowed)
    low = [t.to(torch.bfloat16) for t in (q, k, v, grad_out)]
    shift = torch.zeros_like(low[1])
    shift[0, 1, 7] = 0.05 * low[1][0, 1, 7]
    ours = forward_backward(lambda q, k, v, **kw: BACKENDS["torch"](q, k + shift, v, **kw), *low, **kwargs)
    ref = forward_backward(sdpa_masked, *low, allowed=allowed)
    with pytest.raises(AssertionError, match="more than 2.0 x the reference's own error"):
        for name, o, r, t in zip(("out", "dq", "dk", "dv"), ours, ref, truth):
            assert_close_to_reference_error(o, r, t, name=name)


# Three documents of 32 keys: whole tiles of the small blocks above (16 and 32), so a backend that skips empty
# tiles never touches document 0's keys while computing documents 1 and 2.
ALIGNED = [(32, 32, 32)]


def poisoned_run(fn, causal, **kwargs):
    """Outputs and grads of documents 1 and 2 with document 0's values set to NaN; and clean SDPA on them."""
    q, k, v = (torch.randn(1, 2, 96, HEAD_DIM, generator=torch.Generator().manual_seed(i)) for i in range(3))
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    poisoned = v.clone()
    poisoned[:, :, :32] = float("nan")
    ours = forward_backward(fn, q, k, poisoned, grad_out, causal=causal, **kwargs)
    ref = forward_backward(sdpa_masked, q, k, v, grad_out, allowed=explicit_mask(ALIGNED, 96, 96, causal))
    return [t[:, :, 32:] for t in ours], [t[:, :, 32:] for t in ref]


SKIPPING_BACKENDS = [pytest.param("torch"), pytest.param("triton", marks=on_cpu_interpreter)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backend", SKIPPING_BACKENDS)
def test_tiles_outside_the_documents_are_never_visited(backend, causal):
    fn = BACKENDS[backend]
    if backend == "torch":
        fn = lambda q, k, v, **kw: flash_attention_torch(q, k, v, block_q=32, block_k=16, **kw)
    ours, ref = poisoned_run(fn, causal, document_ids=document_ids(ALIGNED))
    assert_all_close(ours, ref, torch.float32)


@pytest.mark.parametrize("backend", SKIPPING_BACKENDS)
def test_negative_control_a_visited_poisoned_tile_shows(backend):
    """The same NaN reaches documents 1 and 2 when every tile is visited: the tiled backend given the document
    mask as a dense mask (which it cannot skip by), Triton given no document mask."""
    if backend == "torch":
        mask = explicit_mask(ALIGNED, 96, 96, False)
        ours, _ = poisoned_run(lambda q, k, v, **kw: flash_attention_torch(q, k, v, block_q=32, block_k=16, **kw),
                               False, mask=mask)  # fmt: skip
    else:
        ours, _ = poisoned_run(BACKENDS["triton"], False)
    out, dq, dk, _ = ours  # dV = P^T dO reads neither V nor the poisoned rows' D = rowsum(dO * O)
    assert out.isnan().any() and dq.isnan().any() and dk.isnan().any()


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["docs-causal", "decode-5", "equal-docs-gqa"])
@pytest.mark.parametrize("backend", ["torch", "sdpa", "triton"])
def test_gpu_gradients_match_flex_attention(backend, case):
    """On CUDA: outputs and dq/dk/dv against FlexAttention (whose backward needs a GPU), fp32, and the compiled
    Triton kernels' bf16 within 2x SDPA's own error."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    fn = {"torch": BACKENDS["torch"], "sdpa": BACKENDS["sdpa"], "triton": flash_attention_triton}[backend]
    q, k, v, grad_out = (t.cuda() for t in make_inputs(case))
    kwargs, allowed = case_masks(case)
    kwargs = {name: t.cuda() if isinstance(t, torch.Tensor) else t for name, t in kwargs.items()}
    lengths, causal = CASES[case][6], CASES[case][5]
    ours = forward_backward(fn, q, k, v, grad_out, **kwargs)
    ref = forward_backward(lambda q, k, v: flex(q, k, v, lengths, causal), q, k, v, grad_out)
    loose = {key: 10 * value for key, value in tolerance(torch.float32).items()}  # GPU kernels' reduction orders
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        torch.testing.assert_close(a, b, **loose, msg=lambda m, name=name: f"{name}: {m}")
    if backend == "triton":
        truth = forward_backward(sdpa_masked, *(t.double() for t in (q, k, v, grad_out)), allowed=allowed.cuda())
        low = [t.bfloat16() for t in (q, k, v, grad_out)]
        ours = forward_backward(fn, *low, **kwargs)
        sdpa_low = forward_backward(sdpa_masked, *low, allowed=allowed.cuda())
        for name, o, r, t in zip(("out", "dq", "dk", "dv"), ours, sdpa_low, truth):
            assert_close_to_reference_error(o, r, t, name=name)
