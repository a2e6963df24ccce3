"""The decode path at the roof: generate(compile=True), gpt-fast's static-shape decode step compiled, token for
token against our eager generate and transformers' greedy generate on the same weights; the RoPE tables the model
reads instead of recomputing cos/sin each step, against the per-step formula and transformers' rotary embedding.

One compile for the whole file (inductor on 2 CPU cores takes ~20 s): the module fixture compiles, every other
compiled call reuses that graph (same shapes, and the weights are graph inputs, not constants).
"""

import pytest
import torch
import transformers
from torch._dynamo.utils import counters
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from impl.generation import Llama, generate
from impl.generation.model import rope_cos_sin

VOCAB = 97
# Greedy identity holds while no step is a near-tie (see test_generation_llama.py): measured on these
# continuations, the smallest top-1 minus top-2 logit gap is 4.6e-3 and the compiled step's logits differ from the
# eager step's by at most 1.7e-6 (fp32; inductor fuses the norms and the rotary), over three orders of magnitude
# below it.
NEW_TOKENS = 24


def _config(**extra) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1, bos_token_id=None,
        eos_token_id=None, pad_token_id=None, **extra,
    )  # fmt: skip


def _left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of 11, 5 and 8 tokens, left-padded with token 0: the compiled step's slot mask has work."""
    ids = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    mask[2, :3] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _hf_greedy(hf, ids, mask) -> torch.Tensor:
    return hf.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def compiled():
    """(hf, ours, ids, mask, compiled generate's tokens, graphs compiled, graph breaks): the file's one compile."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(_config()).eval()
    ours = Llama.from_hf(hf)
    ids, mask = _left_padded()
    torch._dynamo.reset()  # count this file's graphs only
    counters.clear()
    tokens = generate(ours, ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, compile=True)
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    return hf, ours, ids, mask, tokens, graphs, breaks


def test_compiled_generate_equals_eager_and_transformers(compiled):
    hf, ours, ids, mask, tokens, _, _ = compiled
    assert tokens.shape == (3, 11 + NEW_TOKENS)
    assert torch.equal(tokens, generate(ours, ids, attention_mask=mask, max_new_tokens=NEW_TOKENS))
    assert torch.equal(tokens, _hf_greedy(hf, ids, mask))


def test_the_compiled_step_is_one_graph_without_breaks(compiled):
    *_, graphs, breaks = compiled
    assert (graphs, breaks) == (1, 0)


@torch.no_grad()
def test_negative_control_the_compiled_step_reads_the_live_weights(compiled):
    # A wrong model must fail the comparison above: negating the lm_head turns greedy argmax into argmin. The graph
    # is reused (no recompile), so this also shows the weights are read at run time, not folded in at compile.
    _, ours, ids, mask, tokens, _, _ = compiled
    ours.lm_head.weight.neg_()
    try:
        wrong = generate(ours, ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, compile=True)
    finally:
        ours.lm_head.weight.neg_()
    assert counters["stats"]["unique_graphs"] == 1
    assert not torch.equal(wrong[:, 11:], tokens[:, 11:])
    assert torch.equal(tokens, generate(ours, ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, compile=True))


POSITIONS = torch.tensor([[0, 1, 2, 63, 127], [5, 100, 17, 0, 126]])


@pytest.mark.parametrize("rope_theta", [10000.0, 500000.0], ids=["theta=1e4", "theta=5e5"])
def test_rope_table_equals_the_per_step_formula_and_transformers(rope_theta):
    config = _config(rope_theta=rope_theta)
    ours = Llama.from_hf(transformers.LlamaForCausalLM(config).eval())
    cos, sin = ours.rope_cos[POSITIONS], ours.rope_sin[POSITIONS]  # (B, T, head_dim)
    step_cos, step_sin = rope_cos_sin(POSITIONS, config.head_dim, rope_theta, torch.float32)
    assert torch.equal(cos, step_cos[:, :, 0]) and torch.equal(sin, step_sin[:, :, 0])  # the same numbers
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), POSITIONS)
    torch.testing.assert_close(cos, hf_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin, hf_sin, rtol=0, atol=0)
    assert "rope_cos" not in ours.state_dict()  # derived from the config, not a weight


def test_negative_control_a_table_read_one_position_off_differs():
    config = _config()
    ours = Llama.from_hf(transformers.LlamaForCausalLM(config).eval())
    step_cos, _ = rope_cos_sin(POSITIONS, config.head_dim, ours.config.rope_theta, torch.float32)
    assert not torch.equal(ours.rope_cos[(POSITIONS + 1) % config.max_position_embeddings], step_cos[:, :, 0])
