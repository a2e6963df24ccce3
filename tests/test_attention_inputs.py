"""Bad input to every attention entry point: a ValueError/TypeError that names the argument and both values."""

import subprocess
import sys

import pytest
import torch

from impl.attention import attention, flash_attention_torch, flash_attention_triton, naive_attention

ENTRY_POINTS = {
    "front": attention,
    "naive": naive_attention,
    "tiled": flash_attention_torch,
    "triton": flash_attention_triton,
}


def qkv(q_shape=(1, 4, 8, 16), kv_shape=(1, 2, 8, 16), dtype=torch.float32):
    return torch.randn(q_shape, dtype=dtype), torch.randn(kv_shape, dtype=dtype), torch.randn(kv_shape, dtype=dtype)


BAD = {
    "3d-q": (lambda: (torch.randn(4, 8, 16), *qkv()[1:]), {}, ValueError, r"q must be 4-D .*got shape \(4, 8, 16\)"),
    "int-k": (lambda: (qkv()[0], torch.ones(1, 2, 8, 16, dtype=torch.int64), qkv()[2]), {}, TypeError,
              r"k must have a floating dtype, got torch.int64"),
    "batch": (lambda: qkv(kv_shape=(2, 2, 8, 16)), {}, ValueError, r"k batch must equal q batch \(1\), got 2"),
    "head-dim": (lambda: qkv(kv_shape=(1, 2, 8, 32)), {}, ValueError,
                 r"k head_dim must equal q head_dim \(16\), got 32"),
    "heads": (lambda: qkv(kv_shape=(1, 3, 8, 16)), {}, ValueError, r"q heads \(4\) must be divisible .*got 3"),
    "v-shape": (lambda: (*qkv()[:2], torch.randn(1, 2, 9, 16)), {}, ValueError, r"v \(heads, seq\) must equal k's"),
    "dtype": (lambda: (*qkv()[:2], torch.randn(1, 2, 8, 16, dtype=torch.float64)), {}, TypeError,
              r"v must have the dtype of q \(torch.float32\), got torch.float64"),
    "device": (lambda: (*qkv()[:2], torch.empty(1, 2, 8, 16, device="meta")), {}, ValueError,
               r"v must be on the device of q \(cpu\), got meta"),
    "causal-lengths": (lambda: qkv(kv_shape=(1, 2, 7, 16)), {"causal": True}, ValueError,
                       r"causal attention needs no more queries than keys \(bottom-right aligned\), got q 8 and k 7"),
    "scale": (qkv, {"scale": -1.0}, ValueError, r"scale must be a positive number or None, got -1.0"),
}  # fmt: skip


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_the_argument(entry, case):
    make, kwargs, error, match = BAD[case]
    with pytest.raises(error, match=match):
        ENTRY_POINTS[entry](*make(), **kwargs)


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of .*'naive'.*got 'flash'"):
        attention(*qkv(), backend="flash")


@pytest.mark.parametrize("name", ["block_q", "block_k"])
def test_tiled_block_sizes_must_be_positive(name):
    with pytest.raises(ValueError, match=rf"{name} must be a positive int, got 0"):
        flash_attention_torch(*qkv(), **{name: 0})


def test_triton_head_dim_and_dtype_limits():
    with pytest.raises(ValueError, match=r"q head_dim must be in 16..128 for the Triton kernels, got 8"):
        flash_attention_triton(*qkv((1, 4, 8, 8), (1, 2, 8, 8)))
    with pytest.raises(TypeError, match=r"q must be float16, bfloat16 or float32 .*got torch.float64"):
        flash_attention_triton(*qkv(dtype=torch.float64))


def test_triton_on_cpu_without_interpreter_says_how_to_run():
    """In a fresh process without TRITON_INTERPRET (this session may have set it for the interpreter tests)."""
    code = (
        "import torch\nfrom impl.attention import flash_attention_triton\n"
        "q = torch.randn(1, 1, 4, 16)\ntry:\n    flash_attention_triton(q, q, q)\n"
        "except ValueError as e:\n    print(e)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "q must be a CUDA tensor, or TRITON_INTERPRET=1 must be set" in out.stdout, out.stderr
