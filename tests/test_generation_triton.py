"""The Llama on the Triton attention backend, on CPU through Triton's interpreter: prefill, cached decode steps
and greedy generation equal transformers, plain and left-padded. The kernels read no dense mask, so left padding
reaches them as document ids (padding, then tokens); a key mask that is not left padding is refused by name.

TRITON_INTERPRET must be set before triton itself is first imported (its own jit helpers are defined then), as
test_attention_triton.py does at collection. When this file is collected after a module that imported triton
(transformers does) and nothing set it earlier, the cases cannot run in this process: they are skipped here and
`test_cases_in_a_fresh_process` runs them in a new one. With CUDA present the compiled kernels would run instead,
and these CPU tests skip.
"""

import os
import subprocess
import sys

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("CUDA present: this file runs the Triton kernels through the CPU interpreter", allow_module_level=True)
if "triton" not in sys.modules:  # else its jit helpers exist already, compiled for a GPU: too late here
    os.environ["TRITON_INTERPRET"] = "1"

import transformers

from impl.common import tolerance
from impl.generation import Llama, generate

_LATE = os.environ.get("TRITON_INTERPRET") != "1"  # triton came first: the interpreter cannot run in this process
# The interpreter computes in numpy every lane of a tile, also those the kernel masks out (log2(0), 0/0 there),
# and numpy warns about them; the outputs are compared below.
pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")]
in_process = pytest.mark.skipif(
    _LATE, reason="triton was imported before TRITON_INTERPRET could be set; test_cases_in_a_fresh_process runs this"
)

VOCAB, NEW_TOKENS = 97, 8
TOL = tolerance(torch.float32)


def hf_llama() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1, bos_token_id=None,
        eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros_like(ids)
    for row, n in enumerate([10, 4, 7]):
        mask[row, 10 - n :] = 1
    return ids.masked_fill(mask == 0, 0), mask


@in_process
@pytest.mark.parametrize("padded", [False, True], ids=["full", "left-padded"])
def test_triton_greedy_generation_equals_hf(padded):
    hf = hf_llama()
    ours = Llama.from_hf(hf, attention_backend="triton")
    ids, mask = left_padded()
    if not padded:  # no zeros: transformers would take token 0 (the pad token) for padding
        ids, mask = torch.randint(1, VOCAB, ids.shape, generator=torch.Generator().manual_seed(2)), None
    ones = torch.ones_like(ids)
    expected = hf.generate(ids, attention_mask=ones if mask is None else mask, max_new_tokens=NEW_TOKENS,
                           do_sample=False, pad_token_id=0)  # fmt: skip
    assert torch.equal(generate(ours, ids, max_new_tokens=NEW_TOKENS, attention_mask=mask), expected)


@in_process
@torch.no_grad()
def test_triton_prefill_and_decode_logits_equal_hf_and_padding_matters():
    hf = hf_llama()
    ours = Llama.from_hf(hf, attention_backend="triton")
    ids, mask = left_padded()
    steps = torch.randint(0, VOCAB, (3, 3), generator=torch.Generator().manual_seed(3))
    full_ids, full_mask = torch.cat([ids, steps], 1), torch.cat([mask, torch.ones_like(steps)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    expected = hf(full_ids, attention_mask=full_mask, position_ids=positions).logits
    key_mask, real = full_mask.bool(), mask.bool()
    cache = ours.new_cache(3, 13)
    prefill = ours(ids, positions[:, :10], cache=cache, key_mask=key_mask[:, :10])
    torch.testing.assert_close(prefill[real], expected[:, :10][real], **TOL)
    for slot in range(10, 13):
        step = ours(full_ids[:, slot : slot + 1], positions[:, slot : slot + 1], cache=cache, start=slot,
                    key_mask=key_mask[:, : slot + 1])  # fmt: skip
        torch.testing.assert_close(step[:, 0], expected[:, slot], **TOL)
    # Negative control: the padding visible (no key mask) leaves transformers'.
    assert not torch.allclose(ours(ids, positions[:, :10])[real], expected[:, :10][real], **TOL)


@in_process
def test_triton_refuses_a_key_mask_that_is_not_left_padding():
    ours = Llama.from_hf(hf_llama(), attention_backend="triton")
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"key_mask must be left padding .* attention_backend='triton'"):
        ours(ids, key_mask=torch.tensor([[True, False, True, True]]))


def test_cases_in_a_fresh_process():
    """The cases above, in a new process with TRITON_INTERPRET=1 from the start, when they could not run here."""
    if not _LATE:
        pytest.skip("the cases ran in this process")
    env = os.environ | {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not fresh_process"],
        env=env, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert out.returncode == 0 and "4 passed" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]
