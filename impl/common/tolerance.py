"""Tolerances for comparing against a reference, in one table keyed by dtype.

fp32 is compared tightly. For fp16/bf16 a fixed atol says little, because the reference itself is off by its
own rounding; we judge low precision the way the FlashAttention authors do: the error of ours against an fp32
ground truth must be within a small factor of the error of the low-precision reference against that same
ground truth (`assert_close_to_reference_error`).
"""

import torch

# (atol, rtol) for direct comparisons. fp32: reduction order alone differs between implementations,
# ~1e-6 relative per accumulation, so 1e-5 leaves room for sums over a few hundred terms.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-8},
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    # fp16 has a 10-bit mantissa (eps 9.8e-4), bf16 a 7-bit one (eps 7.8e-3): a few eps of slack each.
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2},
}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """`{"atol": ..., "rtol": ...}` for `torch.testing.assert_close` at this dtype."""
    if dtype not in TOLERANCES:
        raise ValueError(f"dtype must be one of {list(TOLERANCES)}, got {dtype}")
    return TOLERANCES[dtype]


def assert_close_to_reference_error(
    ours: torch.Tensor,
    reference: torch.Tensor,
    truth: torch.Tensor,
    *,
    factor: float = 2.0,
    slack: float = 1e-5,
    name: str = "output",
) -> None:
    """Assert max|ours - truth| <= factor * max|reference - truth| + slack.

    `truth` is the computation in fp32 (or fp64); `reference` is the production library at the same low
    precision as `ours`. `slack` keeps the bound meaningful when the reference happens to be exact.
    """
    truth = truth.double()
    our_err = (ours.double() - truth).abs().max().item()
    ref_err = (reference.double() - truth).abs().max().item()
    bound = factor * ref_err + slack
    if not our_err <= bound:
        raise AssertionError(
            f"{name}: max error of ours vs fp32 truth is {our_err:.3e}, more than {factor} x the reference's "
            f"own error {ref_err:.3e} (+{slack:.0e})"
        )
