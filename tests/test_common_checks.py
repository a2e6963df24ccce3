"""impl.common.checks: the one place where the public edge's input rules live (issue 19 item 18)."""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from impl.common.checks import (
    InputTypeError,
    check_bool,
    check_int,
    check_number,
    check_one_of,
    check_positive_int,
    check_positive_number,
    check_probability,
    check_tensor,
    check_token_ids,
    check_token_list,
)


@pytest.mark.parametrize("value", [1.0, "1", True, None, [1], torch.tensor(1)], ids=repr)
def test_int_refuses_every_other_type(value):
    with pytest.raises(InputTypeError, match=r"n must be a positive int, got"):
        check_positive_int("n", value)


def test_wrong_type_is_both_type_and_value_error():
    assert issubclass(InputTypeError, TypeError) and issubclass(InputTypeError, ValueError)


def test_int_ranges_and_numpy_ints():
    assert check_positive_int("n", np.int64(3)) == 3 and type(check_positive_int("n", np.int64(3))) is int
    with pytest.raises(ValueError, match=r"n must be a positive int, got 0"):
        check_positive_int("n", 0)
    with pytest.raises(ValueError, match=r"t must be an int in \[0, 10\), got 10"):
        check_int("t", 10, low=0, high=10, high_open=True)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 3\], got 4"):
        check_int("k", 4, low=1, high=3)
    with pytest.raises(ValueError, match=r"s must be an int >= 0, got -1"):
        check_int("s", -1, low=0)
    assert check_int("x", -(2**70)) == -(2**70)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=repr)
def test_numbers_refuse_nan_and_inf(value):
    with pytest.raises(ValueError, match=r"x must be a finite number, got"):
        check_number("x", value)
    with pytest.raises(ValueError, match=r"p must be a number in \[0, 1\], got"):
        check_probability("p", value)


def test_number_messages_name_the_interval_and_the_value():
    with pytest.raises(ValueError, match=r"lr must be a positive number, got 0"):
        check_positive_number("lr", 0)
    with pytest.raises(ValueError, match=r"eta must be a number >= 0, got -1"):
        check_number("eta", -1, low=0)
    with pytest.raises(ValueError, match=r"top_p must be a number in \(0, 1\], got 0.0"):
        check_probability("top_p", 0.0, low_open=True)
    with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\), got 1"):
        check_probability("dropout", 1, high_open=True)
    with pytest.raises(InputTypeError, match=r"scale must be a finite number, got '3'"):
        check_number("scale", "3")
    with pytest.raises(InputTypeError, match=r"scale must be a finite number, got True"):
        check_number("scale", True)
    with pytest.raises(ValueError, match=r"x must be a finite number, got 1000"):
        check_number("x", 10**400)
    assert check_number("x", np.float32(0.5)) == 0.5 and check_number("x", math.inf, finite=False) == math.inf


def test_bool_and_one_of():
    assert check_bool("flag", False) is False
    with pytest.raises(InputTypeError, match=r"flag must be a bool, got 1"):
        check_bool("flag", 1)
    assert check_one_of("mode", "a", ("a", "b")) == "a"
    with pytest.raises(ValueError, match=r"mode must be one of \('a', 'b'\), got 'c'"):
        check_one_of("mode", "c", ("a", "b"))
    with pytest.raises(ValueError, match=r"stage must be one of \(1, 2\), got True"):
        check_one_of("stage", True, (1, 2))  # True == 1, but a bool is not a stage
    with pytest.raises(ValueError, match=r"mode must be one of"):
        check_one_of("mode", ["a"], {"a", "b"})  # unhashable


def test_tensor_checks():
    x = torch.zeros(2, 3)
    assert check_tensor("x", x, shape=(2, "cols"), floating=True, device="cpu", finite=True) is x
    with pytest.raises(InputTypeError, match=r"x must be a torch.Tensor, got list"):
        check_tensor("x", [0.0])
    with pytest.raises(ValueError, match=r"x must have shape \(rows, 4\), got shape \(2, 3\)"):
        check_tensor("x", x, shape=("rows", 4))
    with pytest.raises(ValueError, match=r"x must have shape \(2,\), got shape \(2, 3\)"):
        check_tensor("x", x, shape=(2,))
    with pytest.raises(ValueError, match=r"x must be 1-D or 3-D, got shape \(2, 3\)"):
        check_tensor("x", x, dim=(1, 3))
    with pytest.raises(InputTypeError, match=r"x must be an integer tensor, got torch.float32"):
        check_tensor("x", x, integer=True)
    with pytest.raises(InputTypeError, match=r"i must be a floating-point tensor, got torch.int64"):
        check_tensor("i", torch.zeros(1, dtype=torch.long), floating=True)
    with pytest.raises(InputTypeError, match=r"x must have dtype torch.float16 or torch.bfloat16, got torch.float32"):
        check_tensor("x", x, dtype=(torch.float16, torch.bfloat16))
    with pytest.raises(ValueError, match=r"x must be on device meta, got cpu"):
        check_tensor("x", x, device="meta")
    with pytest.raises(ValueError, match=r"x must have at least one element, got shape \(0, 3\)"):
        check_tensor("x", torch.zeros(0, 3), nonempty=True)
    with pytest.raises(ValueError, match=r"x must hold finite values, got NaN or inf"):
        check_tensor("x", torch.tensor([0.0, math.nan]), finite=True)


def test_token_ids():
    check_token_ids("ids", torch.tensor([[0, 4]]), 5)
    with pytest.raises(ValueError, match=r"ids must hold token ids in \[0, 5\), got 5"):
        check_token_ids("ids", torch.tensor([[0, 5]]), 5)
    with pytest.raises(ValueError, match=r"ids must hold token ids in \[0, 5\), got -1"):
        check_token_ids("ids", torch.tensor([-1]), 5)
    with pytest.raises(InputTypeError, match=r"ids must be an integer tensor, got torch.float32"):
        check_token_ids("ids", torch.zeros(2), 5)
    assert check_token_list("doc", [np.int32(3), 2]) == [3, 2]
    assert check_token_list("doc", torch.tensor([3, 2])) == [3, 2]
    for bad, got in ((1.7, "1.7"), (True, "True"), ("a", "'a'"), ([1], "list")):
        with pytest.raises(InputTypeError, match=rf"doc\[1\] must be a token id .*, got {got}"):
            check_token_list("doc", [1, bad])
    with pytest.raises(ValueError, match=r"doc\[0\] must be a token id in \[0, 8\), got 8"):
        check_token_list("doc", [8], 8)
    with pytest.raises(InputTypeError, match=r"doc must be a sequence of token ids, got str"):
        check_token_list("doc", "abc")


def test_seed_everything_refuses_what_torch_cannot_take():
    from impl.common import seed_everything

    with pytest.raises(ValueError, match=r"seed must be an int in \[-9223372036854775808, 1844.*\], got 1844"):
        seed_everything(2**64)
    with pytest.raises(TypeError, match=r"seed must be an int"):
        seed_everything(1.0)


def test_long_values_are_cut_in_messages():
    with pytest.raises(InputTypeError) as caught:
        check_positive_int("n", "x" * 500)
    assert len(str(caught.value)) < 120


# The areas whose public edge goes through impl.common.checks: a copy of the bool guard or a private helper
# re-implementing a shared check must not come back there.
AREAS = ("attention", "generation", "data", "diffusion", "finetune", "memory", "rlhf", "clip", "training", "gpt",
         "distributed")
GUARD = re.compile(r"isinstance\([^)]*\bbool\)")
SHARED_NAMES = re.compile(r"def _check_(int|positive|unit|seq_len|bool|number)\b")


def test_no_copies_of_the_shared_checks_in_the_converted_areas():
    root = Path(__file__).resolve().parent.parent / "impl"
    files = [p for area in AREAS for p in (root / area).rglob("*.py")]
    found = [
        f"{p.relative_to(root)}:{n}: {line.strip()}"
        for p in files
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if GUARD.search(line) or SHARED_NAMES.search(line)
    ]
    assert not found, "use impl.common.checks instead:\n" + "\n".join(found)
