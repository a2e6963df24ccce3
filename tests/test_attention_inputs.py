"""Bad input to every attention entry point: a ValueError/TypeError that names the argument and both values;
the masks too (a boolean mask of the wrong shape or dtype, document ids that are not non-decreasing, cumulative
lengths that do not start at 0, increase and end at the key length, both forms at once)."""

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
    "mask-dtype": (qkv, {"mask": torch.ones(1, 1, 8, 8)}, TypeError,
                   r"mask must have dtype torch.bool, got torch.float32"),
    "mask-shape": (qkv, {"mask": torch.ones(1, 1, 8, 9, dtype=torch.bool)}, ValueError,
                   r"mask must be 4-D and broadcastable to \(B, Hq, Nq, Nk\) = \(1, 4, 8, 8\), got \(1, 1, 8, 9\)"),
    "mask-rank": (qkv, {"mask": torch.ones(8, 8, dtype=torch.bool)}, ValueError,
                  r"mask must be 4-D and broadcastable .*got \(8, 8\)"),
    "doc-decreasing": (qkv, {"document_ids": torch.tensor([[0, 0, 1, 1, 0, 2, 2, 2]])}, ValueError,
                       r"document_ids must be non-decreasing .*got 1 then 0 at row 0, positions 3 and 4"),
    "doc-shape": (qkv, {"document_ids": torch.zeros(1, 7, dtype=torch.long)}, ValueError,
                  r"document_ids must have shape \(1, 8\), got shape \(1, 7\)"),
    "doc-float": (qkv, {"document_ids": torch.zeros(1, 8)}, TypeError,
                  r"document_ids must be an integer tensor, got torch.float32"),
    "doc-more-queries": (lambda: qkv(kv_shape=(1, 2, 6, 16)), {"document_ids": torch.zeros(1, 6, dtype=torch.long)},
                         ValueError, r"document masks need no more queries than keys .*got q 8 and k 6"),
    "cu-end": (qkv, {"cu_seqlens": torch.tensor([0, 3, 7])}, ValueError,
               r"cu_seqlens must start at 0, strictly increase and end at the key length 8, got \[0, 3, 7\]"),
    "cu-start": (qkv, {"cu_seqlens": torch.tensor([1, 3, 8])}, ValueError,
                 r"cu_seqlens must start at 0, .*got \[1, 3, 8\]"),
    "cu-increase": (qkv, {"cu_seqlens": torch.tensor([0, 3, 3, 8])}, ValueError,
                    r"cu_seqlens must start at 0, strictly increase .*got \[0, 3, 3, 8\]"),
    "cu-rank": (qkv, {"cu_seqlens": torch.tensor([[0, 8]])}, ValueError, r"cu_seqlens must be 1-D, got shape \(1, 2\)"),
    "doc-and-cu": (qkv, {"document_ids": torch.zeros(1, 8, dtype=torch.long), "cu_seqlens": torch.tensor([0, 8])},
                   ValueError, r"give document_ids or cu_seqlens, not both"),
}  # fmt: skip
# The Triton kernels read document ids, never a dense mask: any mask is refused by name, before its checks.
TRITON_MASK = (ValueError, r"mask is not supported by the Triton kernels, which take document_ids .*got a mask")


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_the_argument(entry, case):
    make, kwargs, error, match = BAD[case]
    if entry == "triton" and "mask" in kwargs:
        error, match = TRITON_MASK
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
