"""The roofline arithmetic, the error columns' comparison and the timer, on known inputs."""

import math

import pytest
import torch

from impl.common import (
    DATASHEET,
    attention_flops,
    compare_to_reference,
    cuda_graph,
    datasheet_peak,
    gemm_flops,
    measure_roofs,
    quantiles,
    roofline,
    time_calls,
    train_flops,
)


def test_gemm_and_attention_flops_by_hand():
    assert gemm_flops(2, 3, 4) == 48
    # Two matmuls of (N x D) by (D x N) and (N x N) by (N x D): 2 * 2 * N * N * D each per batch and head.
    assert attention_flops(2, 3, 128, 128, 64) == 4 * 2 * 3 * 128 * 128 * 64
    assert attention_flops(2, 3, 128, 128, 64, causal=True) == 4 * 2 * 3 * 128 * 128 * 64 / 2
    assert attention_flops(1, 1, 16, 16, 8, pass_="backward") == 2.5 * attention_flops(1, 1, 16, 16, 8)
    assert attention_flops(1, 1, 16, 16, 8, pass_="forward+backward") == 3.5 * attention_flops(1, 1, 16, 16, 8)
    # Fewer queries than keys, bottom-right aligned: 4 queries see 96 earlier keys in full, and the last 4x4
    # square is half live.
    assert attention_flops(1, 1, 4, 100, 8, causal=True) == 4 * 8 * (4 * 96 + 4 * 4 / 2)


def test_flop_counts_reject_what_they_cannot_count():
    with pytest.raises(ValueError, match="pass_"):
        attention_flops(1, 1, 4, 4, 8, pass_="sideways")
    with pytest.raises(ValueError, match="q_len"):
        attention_flops(1, 1, 8, 4, 8, causal=True)
    with pytest.raises(ValueError, match="trainable"):
        train_flops(10, 1, 4, 4, 4, trainable=11)


def test_mfu_of_gpt2_small_against_a_hand_computation():
    """nanoGPT's estimate_mfu for GPT-2 small: N = 124M, L = 12, d = 768, T = 1024, on an A100's 312 TFLOP/s."""
    n, layers, d, t = 124_337_664, 12, 768, 1024
    tokens = 12 * 1024  # batch 12
    by_hand = tokens * (6 * n + 12 * layers * d * t)
    assert train_flops(n, layers, d, t, tokens) == by_hand
    seconds = 0.1
    mfu = roofline(seconds, flops=by_hand, nbytes=None, peak_tflops=312.0, peak_gbs=None)
    assert mfu["percent"] == pytest.approx(100 * by_hand / seconds / 312e12)
    # LoRA: the frozen base costs 4 FLOPs per parameter and token (no weight gradients).
    assert train_flops(n, layers, d, t, 1, trainable=0) == 4 * n + 12 * layers * d * t


def test_bound_is_decided_by_the_ridge_point():
    # P = 100 TFLOP/s, B = 1000 GB/s: the ridge point is at 100 FLOP/byte.
    peak = dict(peak_tflops=100.0, peak_gbs=1000.0)
    compute = roofline(1.0, flops=50e12, nbytes=1e11 / 1000, **peak)  # I = 500 000
    assert compute["bound"] == "compute" and compute["percent"] == pytest.approx(50.0)
    memory = roofline(1.0, flops=1e12, nbytes=1e11, **peak)  # I = 10: attainable 10 * 1e12 FLOP/s
    assert memory["bound"] == "memory" and memory["percent"] == pytest.approx(100 * 1e12 / 1e13)
    at_ridge = roofline(1.0, flops=1e14, nbytes=1e12, **peak)
    assert at_ridge["bound"] == "compute" and at_ridge["percent"] == pytest.approx(100.0)
    bytes_only = roofline(2.0, flops=None, nbytes=1e12, **peak)
    assert bytes_only["bound"] == "memory" and bytes_only["percent"] == pytest.approx(50.0)
    assert roofline(1.0, flops=1e12, nbytes=1e9, peak_tflops=None, peak_gbs=1000.0) is None
    assert roofline(0.0, flops=1e12, nbytes=None, **peak) is None


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA H200", "NVIDIA H200 SXM"),
        ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM"),
        ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 SXM4 80GB"),
        ("NVIDIA A100-SXM4-40GB", "NVIDIA A100 40GB"),
        ("NVIDIA L4", "NVIDIA L4"),
        ("NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4090"),
        ("NVIDIA H100 PCIe", None),  # a different part (lower clocks and bandwidth): not guessed
        ("AMD EPYC 7B13", None),
        (None, None),
    ],
)
def test_datasheet_lookup_by_torch_device_name(name, expected):
    peak = datasheet_peak(name)
    assert (peak.name if peak else None) == expected


def test_datasheet_figures_are_dense_and_sourced():
    for peak in DATASHEET:
        assert peak.source and peak.gbs > 0
        # Dense tensor-core bf16 never exceeds 1000 TFLOP/s on these parts; sparse figures (2x) would.
        assert 0 < peak.tflops["bfloat16"] < 1000
        assert peak.tflops["float32"] <= peak.tflops["tf32"] <= peak.tflops["bfloat16"] or "4090" in peak.name


def test_compare_to_reference_reports_and_judges():
    ref = torch.tensor([1.0, -2.0, 4.0])
    same = compare_to_reference(ref.clone(), ref)
    assert same == {**same, "max_abs": 0.0, "max_rel": 0.0, "ok": True}
    off = compare_to_reference(ref + torch.tensor([0.0, 0.0, 0.1]), ref)
    assert off["max_abs"] == pytest.approx(0.1) and off["max_rel"] == pytest.approx(0.1 / 4)
    assert off["ok"] is False and off["worst"] == "output"
    # Nested outputs (output, gradients) and plain numbers; the bound comes from the dtype's row of the table.
    nested = compare_to_reference((ref, {"loss": 1.0}), (ref + 1e-6, {"loss": 1.0 + 1e-6}))
    assert nested["ok"] is True and nested["max_abs"] == pytest.approx(1e-6, rel=0.1)  # float32 rounding of 4 + 1e-6
    bf16 = compare_to_reference(ref + 0.01, ref, torch.bfloat16)
    assert bf16["ok"] is True and bf16["atol"] == 1.6e-2
    assert compare_to_reference(ref + 0.01, ref, atol=0.0, rtol=0.0)["ok"] is False
    assert compare_to_reference(torch.tensor([math.nan]), torch.tensor([0.0]))["ok"] is False


def test_compare_to_reference_refuses_mismatched_outputs():
    with pytest.raises(ValueError, match="shape"):
        compare_to_reference(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="structure"):
        compare_to_reference((torch.zeros(2),), (torch.zeros(2), torch.zeros(2)))
    with pytest.raises(TypeError, match="str"):
        compare_to_reference("x", torch.zeros(1))


def test_quantiles_interpolate_like_numpy():
    assert quantiles([4.0, 1.0, 3.0, 2.0, 5.0]) == pytest.approx([1.8, 3.0, 4.2])
    assert quantiles([7.0]) == [7.0, 7.0, 7.0]
    with pytest.raises(ValueError, match="empty"):
        quantiles([])


def test_cpu_timer_respects_its_bounds_and_resets_gradients():
    x = torch.ones(3, requires_grad=True)
    calls = []

    def fn():
        calls.append(x.grad)  # None every time: reset before each call
        (x * 2).sum().backward()

    times = time_calls(fn, torch.device("cpu"), warmup_s=0.0, budget_s=0.0, min_reps=4, max_reps=6, grad_to_none=[x])
    assert 4 <= len(times) <= 6 and all(t > 0 for t in times)
    assert all(g is None for g in calls)
    with pytest.raises(ValueError, match="min_reps"):
        time_calls(fn, torch.device("cpu"), warmup_s=0, budget_s=0, min_reps=3, max_reps=2)


def test_roofs_measured_on_cpu_are_plausible():
    roofs = measure_roofs(torch.device("cpu"), "smoke", dtypes=(torch.float32,))
    assert set(roofs["gemm_tflops"]) == {"float32"}
    assert 1e-4 < roofs["gemm_tflops"]["float32"] < 100  # a 2-core VM to a large server
    assert 0.1 < roofs["copy_gbs"] < 5000


def test_cuda_graph_needs_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        cuda_graph(lambda: None, torch.device("cpu"))


@pytest.mark.gpu
def test_cuda_timer_and_graph_on_a_gpu():
    device = torch.device("cuda")
    a = torch.randn(2048, 2048, device=device)
    eager = time_calls(lambda: a @ a, device, warmup_s=0.01, budget_s=0.02, min_reps=5, max_reps=50, flush_l2=True)
    assert len(eager) >= 5 and all(t > 0 for t in eager)
    out = torch.empty_like(a)
    replay = cuda_graph(lambda: torch.matmul(a, a, out=out), device)
    graphed = time_calls(replay, device, warmup_s=0.0, budget_s=0.02, min_reps=5, max_reps=50)
    torch.testing.assert_close(replay(), a @ a)
    assert len(graphed) >= 5
    roofs = measure_roofs(device, "smoke", dtypes=(torch.bfloat16,))
    assert roofs["gemm_tflops"]["bfloat16"] > 1 and roofs["copy_gbs"] > 100
