"""Tolerances for comparing against a reference, in one table keyed by dtype.

fp32 is compared tightly. For fp16/bf16 a fixed atol says little, because the reference itself is off by its
own rounding; we judge low precision the way the FlashAttention authors do: the error of ours against an fp32
ground truth must be within a small factor of the error of the low-precision reference against that same
ground truth (`assert_close_to_reference_error`).
"""

import math

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


def _leaves(x, path: str = "output") -> list[tuple[str, torch.Tensor]]:
    """Tensors (and numbers, as tensors) of a nested tuple/list/dict, with their paths."""
    if isinstance(x, torch.Tensor):
        return [(path, x)]
    if isinstance(x, bool) or not isinstance(x, int | float | tuple | list | dict):
        raise TypeError(f"{path}: expected tensors, numbers or tuples/lists/dicts of them, got {type(x).__name__}")
    if isinstance(x, int | float):
        return [(path, torch.tensor(float(x)))]
    items = x.items() if isinstance(x, dict) else enumerate(x)
    return [leaf for k, v in items for leaf in _leaves(v, f"{path}[{k!r}]")]


def compare_to_reference(
    ours, reference, dtype: torch.dtype | None = None, *, atol: float | None = None, rtol: float | None = None
) -> dict:
    """How far `ours` is from `reference` (same nesting of tensors): max absolute error, max relative error
    (max |ours - ref| / max |ref|, over all tensors), and whether every element is within atol + rtol·|ref|,
    the tolerance table's bound for `dtype` (default: the reference's dtype) unless atol/rtol are given."""
    a, b = _leaves(ours), _leaves(reference)
    if [p for p, _ in a] != [p for p, _ in b]:
        raise ValueError(f"ours and reference differ in structure: {[p for p, _ in a]} vs {[p for p, _ in b]}")
    dtype = dtype or b[0][1].dtype
    bound = tolerance(dtype) if dtype in TOLERANCES else tolerance(torch.float32)
    atol = bound["atol"] if atol is None else atol
    rtol = bound["rtol"] if rtol is None else rtol
    max_abs, max_ref, ok, worst = 0.0, 0.0, True, None
    for (path, x), (_, y) in zip(a, b):
        if x.shape != y.shape:
            raise ValueError(f"{path}: ours has shape {tuple(x.shape)}, the reference {tuple(y.shape)}")
        # On the reference's device (a GPU row's tensors hold hundreds of millions of values); only scalars move.
        x, y = x.detach().to(y.device, torch.float64), y.detach().double()
        diff = (x - y).abs()
        if diff.numel():
            err = diff.max().item() if not diff.isnan().any() else math.inf
            max_abs = max(max_abs, err)
            max_ref = max(max_ref, y.abs().max().item())
            if not bool((diff <= atol + rtol * y.abs()).all()):
                ok, worst = False, worst or path
    rel = max_abs / max_ref if max_ref > 0 else (0.0 if max_abs == 0 else math.inf)
    return {"max_abs": max_abs, "max_rel": rel, "ok": ok, "atol": atol, "rtol": rtol, "worst": worst}
