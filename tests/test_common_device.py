"""Device, size and dtype resolution, seeding, the tolerance helpers."""

import pytest
import torch

from impl.common import (
    assert_close_to_reference_error,
    resolve_device,
    resolve_dtype,
    resolve_size,
    seed_everything,
    tolerance,
)


def test_auto_device_matches_cuda_availability():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_cuda_is_an_error_not_a_fallback():
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")


@pytest.mark.parametrize(("device", "expected"), [("cpu", "small"), ("cuda", "full")])
def test_default_size_follows_device(device, expected):
    assert resolve_size(None, torch.device(device)) == expected


def test_unknown_size_and_dtype_are_rejected():
    with pytest.raises(ValueError, match="size must be one of .*'nonsense'"):
        resolve_size("nonsense", torch.device("cpu"))
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("fp8")
    assert resolve_dtype("bf16") is torch.bfloat16


def test_seed_everything_reproduces_and_differs():
    seed_everything(1)
    a = torch.randn(8)
    seed_everything(1)
    b = torch.randn(8)
    seed_everything(2)
    c = torch.randn(8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_tolerance_table_covers_the_dtypes():
    assert tolerance(torch.float32)["atol"] <= 1e-5
    assert tolerance(torch.bfloat16)["atol"] > tolerance(torch.float16)["atol"]
    with pytest.raises(ValueError, match="dtype must be one of"):
        tolerance(torch.int8)


def test_reference_error_judge_accepts_equal_error_and_rejects_worse():
    truth = torch.randn(1000, dtype=torch.float64)
    reference = truth.to(torch.bfloat16)
    assert_close_to_reference_error(reference.clone(), reference, truth)
    worse = (truth + 0.5).to(torch.bfloat16)  # a real bug-sized error
    with pytest.raises(AssertionError, match="more than 2.0 x the reference's own error"):
        assert_close_to_reference_error(worse, reference, truth)
