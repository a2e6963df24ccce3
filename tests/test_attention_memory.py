"""Memory of forward+backward on CPU, measured exactly by the meter at two lengths against the N x N formula:
naive holds N x N score tensors and grows 4x when N doubles; the tiled version holds one tile and grows 2x."""

import pytest
import torch

from impl.attention import flash_attention_torch, naive_attention
from impl.common import MemoryMeter

BATCH, HEADS, HEAD_DIM, BLOCK = 1, 2, 32, 128
LENGTHS = (512, 1024)


def fwd_bwd_peak(fn, n):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(BATCH, HEADS, n, HEAD_DIM, generator=g).requires_grad_() for _ in range(3))
    grad_out = torch.randn(q.shape, generator=g)
    with MemoryMeter("cpu") as mem:
        torch.autograd.grad(fn(q, k, v, causal=True), (q, k, v), grad_out)
    return mem.peak


def score_bytes(n):
    """The N x N formula: one fp32 score matrix per (batch, head)."""
    return BATCH * HEADS * n * n * 4


def row_bytes(n):
    """One fp32 (batch, heads, N, head_dim) tensor: q, k, v, out, dq, ... each cost this much."""
    return BATCH * HEADS * n * HEAD_DIM * 4


def tiled(q, k, v, causal):
    return flash_attention_torch(q, k, v, causal=causal, block_q=BLOCK, block_k=BLOCK)


@pytest.fixture(scope="module")
def peaks():
    return {name: [fwd_bwd_peak(fn, n) for n in LENGTHS] for name, fn in (("naive", naive_attention), ("tiled", tiled))}


def test_naive_holds_score_matrices_and_grows_quadratically(peaks):
    for n, peak in zip(LENGTHS, peaks["naive"]):
        assert peak >= 2 * score_bytes(n)  # at least scores and probabilities, live together for the backward
    assert peaks["naive"][1] / peaks["naive"][0] > 3.5


def test_tiled_holds_no_score_matrix_and_grows_linearly(peaks):
    (n, n2), (peak, peak2) = LENGTHS, peaks["tiled"]
    assert peak2 < score_bytes(n2) / 4
    # Doubling N adds a handful of (N, head_dim) tensors (out, lse, delta, dq, dk, dv), no N x N one.
    assert peak2 - peak <= 8 * row_bytes(n2 - n) < score_bytes(n2) - score_bytes(n)
    assert peak2 * 8 <= peaks["naive"][1]
