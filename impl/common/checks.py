"""Input checks for the public edge, in one place so the rule is the same everywhere.

Every check raises with one message shape: "<name> must be <expected>, got <received>". A value of the wrong
type raises `InputTypeError`, which is both a TypeError and a ValueError (as numpy's AxisError is both a
ValueError and an IndexError), so callers that caught either keep working. `bool` is never accepted as a
number, and NaN never passes a range.
"""

import math
import numbers
from collections.abc import Iterable, Sequence

import torch


class InputTypeError(TypeError, ValueError):
    """An argument of the wrong type: catchable as TypeError or as ValueError."""


def show(value: object, limit: int = 60) -> str:
    """A short repr of a received value for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _got_type(value: object) -> str:
    if isinstance(value, str | int | float | bool | type(None)):
        return show(value)  # the repr tells the type: '8', 8.0, True, None
    return type(value).__name__


def _interval(low, high, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"> {low}" if low_open else f">= {low}"
    if low is None:
        return f"< {high}" if high_open else f"<= {high}"
    return f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def is_int(value: object) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A real number (Python or numpy), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(
    name: str, value: object, *, low: int | None = None, high: int | None = None, high_open: bool = False
) -> int:
    """`value` as an int in [low, high] ([low, high) with high_open; either bound optional); floats, strings and
    bools are refused."""
    if low == 1 and high is None:
        expected = "a positive int"
    elif low is None and high is None:
        expected = "an int"
    else:
        expected = f"an int {'in ' if low is not None and high is not None else ''}"
        expected += _interval(low, high, False, high_open)
    if not is_int(value):
        raise InputTypeError(f"{name} must be {expected}, got {_got_type(value)}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and (value >= high if high_open else value > high)):
        raise ValueError(f"{name} must be {expected}, got {value}")
    return value


def check_positive_int(name: str, value: object) -> int:
    """`value` as an int >= 1."""
    return check_int(name, value, low=1)


def check_number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
) -> float:
    """`value` as a float in the interval (bounds optional, open or closed); NaN always refused, inf when finite."""
    if low == 0 and low_open and high is None:
        expected = "a positive number"
    elif low is None and high is None:
        expected = "a finite number" if finite else "a number"
    else:
        expected = f"a number {'in ' if low is not None and high is not None else ''}"
        expected += _interval(low, high, low_open, high_open)
    if not is_number(value):
        raise InputTypeError(f"{name} must be {expected}, got {_got_type(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range
        raise ValueError(f"{name} must be {expected}, got {show(value)}") from None
    bad = math.isnan(number) or (finite and math.isinf(number))
    bad = bad or (low is not None and (number <= low if low_open else number < low))
    bad = bad or (high is not None and (number >= high if high_open else number > high))
    if bad:
        raise ValueError(f"{name} must be {expected}, got {show(value)}")
    return number


def check_positive_number(name: str, value: object) -> float:
    """`value` as a finite float > 0."""
    return check_number(name, value, low=0, low_open=True)


def check_probability(name: str, value: object, *, low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a float in [0, 1] (either end optionally open)."""
    return check_number(name, value, low=0, high=1, low_open=low_open, high_open=high_open)


def check_bool(name: str, value: object) -> bool:
    """`value` as a bool; 0, 1 and None are refused."""
    if not isinstance(value, bool):
        raise InputTypeError(f"{name} must be a bool, got {_got_type(value)}")
    return value


def check_instance(name: str, value: object, cls: type | tuple[type, ...], what: str | None = None) -> object:
    """`value` if it is an instance of `cls`; `what` describes the expected kind in the message."""
    if not isinstance(value, cls):
        what = what or " or ".join(c.__name__ for c in (cls if isinstance(cls, tuple) else (cls,)))
        raise InputTypeError(f"{name} must be {what}, got {type(value).__name__}")
    return value


def check_generator(name: str, value: object) -> torch.Generator | None:
    """`value` if it is None or a torch.Generator."""
    if value is not None and not isinstance(value, torch.Generator):
        raise InputTypeError(f"{name} must be a torch.Generator or None, got {type(value).__name__}")
    return value


def check_one_of(name: str, value: object, choices: Sequence) -> object:
    """`value` if it is one of `choices` (compared by ==, but never bool for int)."""
    try:  # True == 1, so a bool matches only a bool choice
        ok = value in choices and (not isinstance(value, bool) or any(c is value for c in choices))
    except TypeError:  # an unhashable value against a set
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {show(value)}")
    return value


def check_tensor(
    name: str,
    value: object,
    *,
    dim: int | Iterable[int] | None = None,
    shape: Sequence[int | str | None] | None = None,
    dtype: torch.dtype | Iterable[torch.dtype] | None = None,
    floating: bool = False,
    integer: bool = False,
    device: torch.device | str | None = None,
    nonempty: bool = False,
    finite: bool = False,
) -> torch.Tensor:
    """A tensor with the given rank, shape, dtype(s) or kind, device, no NaN/inf. In `shape` an int is an exact
    size, a str names a free axis (shown in the message), None is a free axis."""
    if not isinstance(value, torch.Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if shape is not None:
        wanted = tuple(shape)
        if value.dim() != len(wanted) or any(
            isinstance(s, int) and s != n for s, n in zip(wanted, value.shape, strict=True)
        ):
            want = ", ".join("*" if s is None else str(s) for s in wanted) + ("," if len(wanted) == 1 else "")
            want = f"({want})"
            raise ValueError(f"{name} must have shape {want}, got shape {tuple(value.shape)}")
    if dim is not None:
        dims = (dim,) if isinstance(dim, int) else tuple(dim)
        if value.dim() not in dims:
            want = " or ".join(f"{d}-D" for d in dims) if len(dims) < 4 else f"{min(dims)}-D to {max(dims)}-D"
            raise ValueError(f"{name} must be {want}, got shape {tuple(value.shape)}")
    if floating and not value.is_floating_point():
        raise InputTypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if integer and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise InputTypeError(f"{name} must be an integer tensor, got {value.dtype}")
    if dtype is not None:
        dtypes = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if value.dtype not in dtypes:
            want = " or ".join(str(d) for d in dtypes)
            raise InputTypeError(f"{name} must have dtype {want}, got {value.dtype}")
    if device is not None and value.device != torch.device(device):
        raise ValueError(f"{name} must be on device {torch.device(device)}, got {value.device}")
    if nonempty and value.numel() == 0:
        raise ValueError(f"{name} must have at least one element, got shape {tuple(value.shape)}")
    if finite and value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must hold finite values, got NaN or inf")
    return value


def check_token_ids(name: str, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """An integer tensor of token ids, every one in [0, vocab_size)."""
    check_tensor(name, ids, integer=True)
    if ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"{name} must hold token ids in [0, {vocab_size}), got {bad}")
    return ids


def check_token_list(name: str, tokens: object, vocab_size: int | None = None) -> list[int]:
    """A sequence of int token ids (Python or numpy ints, or a 1-D integer tensor), each >= 0 (< vocab_size)."""
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 1:
            raise ValueError(f"{name} must be a 1-D token tensor, got shape {tuple(tokens.shape)}")
        check_tensor(name, tokens, integer=True)
        tokens = tokens.tolist()
    if isinstance(tokens, str | bytes) or not isinstance(tokens, Sequence):
        raise InputTypeError(f"{name} must be a sequence of token ids, got {type(tokens).__name__}")
    out = []
    high = "" if vocab_size is None else f", {vocab_size})"
    expected = f"a token id in [0{high}" if vocab_size is not None else "a token id (an int >= 0)"
    for j, t in enumerate(tokens):
        if not is_int(t):
            raise InputTypeError(f"{name}[{j}] must be {expected}, got {_got_type(t)}")
        t = int(t)
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            raise ValueError(f"{name}[{j}] must be {expected}, got {t}")
        out.append(t)
    return out
