"""The Llama's attention backend (`LlamaConfig.attention_backend`, through impl.attention): with naive, sdpa and
the tiled torch backend, the prefill logits, every cached decode step's logits and greedy generation equal
transformers' LlamaForCausalLM on the same weights, for a plain and a left-padded batch, and a prompt prefilled
in two chunks (the second chunk's queries are the last of its keys: causal, bottom-right aligned). Negative
controls: without the padding mask, or with the causal flag off, the logits leave transformers'."""

import pytest
import torch
import transformers

from impl.attention import attention
from impl.common import tolerance
from impl.generation import Llama, generate

VOCAB = 97
NEW_TOKENS = 24  # greedy identity: see test_generation_llama (the smallest top-1/top-2 gap is far above atol)
BACKENDS = ["naive", "sdpa", "torch"]
TOL = tolerance(torch.float32)


def hf_llama(kv_heads: int = 2, seed: int = 0) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=128, initializer_range=0.1, bos_token_id=None,
        eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def batch(padded: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Three prompts of width 12; left-padded to lengths 12, 5 and 9 when `padded` (input_ids, attention_mask)."""
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    if not padded:
        return ids, None
    mask = torch.zeros_like(ids)
    for row, n in enumerate([12, 5, 9]):
        mask[row, 12 - n :] = 1
    return ids.masked_fill(mask == 0, 0), mask


def positions_of(mask: torch.Tensor | None, batch: int, width: int) -> torch.Tensor:
    """Rotary positions counting real tokens only, as generate() and transformers (given position_ids) use."""
    if mask is None:
        return torch.arange(width).expand(batch, width)
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.fixture(params=[4, 2], ids=["mha", "gqa"])
def hf(request):
    return hf_llama(request.param)


@pytest.mark.parametrize("padded", [False, True], ids=["full", "left-padded"])
@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_prefill_and_cached_decode_logits_match_hf(hf, backend, padded):
    """Prefill the prompt into the cache, then decode 6 given tokens one at a time: each step's logits equal
    transformers' cache-free forward over the whole sequence at that position."""
    ours = Llama.from_hf(hf, attention_backend=backend)
    ids, mask = batch(padded)
    B, T = ids.shape
    steps = torch.randint(0, VOCAB, (B, 6), generator=torch.Generator().manual_seed(3))
    full_ids = torch.cat([ids, steps], dim=1)
    full_mask = None if mask is None else torch.cat([mask, torch.ones_like(steps)], dim=1)
    positions = positions_of(full_mask, B, full_ids.shape[1])
    expected = hf(full_ids, attention_mask=full_mask, position_ids=positions).logits
    key_mask = None if full_mask is None else full_mask.bool()
    real = torch.ones(B, T, dtype=torch.bool) if mask is None else mask.bool()

    cache = ours.new_cache(B, full_ids.shape[1])
    prefill = ours(ids, positions[:, :T], cache=cache, key_mask=None if key_mask is None else key_mask[:, :T])
    torch.testing.assert_close(prefill[real], expected[:, :T][real], **TOL)  # padding rows are unused
    for i in range(steps.shape[1]):
        slot = T + i
        step = ours(
            full_ids[:, slot : slot + 1], positions[:, slot : slot + 1], cache=cache, start=slot,
            key_mask=None if key_mask is None else key_mask[:, : slot + 1],
        )  # fmt: skip
        torch.testing.assert_close(step[:, 0], expected[:, slot], **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_chunked_prefill_is_bottom_right_causal(backend, monkeypatch):
    """A prompt prefilled as 7 then 5 tokens: the second call's 5 queries attend to 12 keys, causal aligned at
    the bottom right; its logits equal transformers' over the whole prompt. Negative control: the same call with
    the causal flag dropped on its way to the front (every query sees the chunk's later keys) leaves them."""
    hf = hf_llama(2)
    ours = Llama.from_hf(hf, attention_backend=backend)
    ids, _ = batch(padded=False)
    expected = hf(ids).logits
    cache = ours.new_cache(3, 12)
    first = ours(ids[:, :7], cache=cache)
    second = ours(ids[:, 7:], cache=cache, start=7)
    torch.testing.assert_close(torch.cat([first, second], dim=1), expected, **TOL)
    monkeypatch.setattr("impl.generation.model.attention", lambda *args, causal=False, **kw: attention(*args, **kw))
    assert not torch.allclose(ours(ids[:, 7:], cache=cache, start=7), expected[:, 7:], **TOL)


@pytest.mark.parametrize("padded", [False, True], ids=["full", "left-padded"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_generate_token_identical_to_hf(hf, backend, padded):
    ours = Llama.from_hf(hf, attention_backend=backend)
    ids, mask = batch(padded)
    hf_mask = torch.ones_like(ids) if mask is None else mask  # else transformers reads token 0 as padding
    expected = hf.generate(ids, attention_mask=hf_mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    got = generate(ours, ids, max_new_tokens=NEW_TOKENS, attention_mask=mask)
    assert torch.equal(got, expected)
    assert len(set(expected[0, 12:].tolist())) > 3, "the continuation is degenerate; the test would prove little"


@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_without_the_padding_mask_logits_leave_hf(backend):
    """Negative control: the same left-padded batch with no key mask (padding visible) does not match."""
    hf = hf_llama(2)
    ours = Llama.from_hf(hf, attention_backend=backend)
    ids, mask = batch(padded=True)
    positions = positions_of(mask, *ids.shape)
    expected = hf(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(ours(ids, positions, key_mask=real)[real], expected[real], **TOL)
    assert not torch.allclose(ours(ids, positions)[real], expected[real], **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_backend_choice_reaches_every_attention_call(backend, monkeypatch):
    """Every attention call of a prefill and a decode step goes through the front with the configured backend."""
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["backend"])
        return attention(*args, **kwargs)

    monkeypatch.setattr("impl.generation.model.attention", spy)
    ours = Llama.from_hf(hf_llama(2), attention_backend=backend)
    ids, mask = batch(padded=True)
    generate(ours, ids, max_new_tokens=3, attention_mask=mask)
    assert seen == [backend] * 2 * 3  # 2 layers x (prefill + 2 decode steps)


def test_backend_choice_is_checked():
    with pytest.raises(ValueError, match=r"config\.attention_backend must be one of .* got 'flash'"):
        Llama.from_hf(hf_llama(2), attention_backend="flash")


@torch.no_grad()
def test_unfused_projections_match_hf_and_the_fused_model():
    """fused_projections=False keeps transformers' separate linears (the names LoRA targets): same logits as
    transformers and as the fused layout; a perturbed q_proj (negative control) leaves them."""
    hf = hf_llama(2)
    ids, mask = batch(padded=True)
    positions, real = positions_of(mask, *ids.shape), mask.bool()
    expected = hf(ids, attention_mask=mask, position_ids=positions).logits[real]
    unfused, fused = Llama.from_hf(hf, fused_projections=False), Llama.from_hf(hf)
    names = {n.rsplit(".", 2)[-2] for n, _ in unfused.named_parameters() if n.endswith("_proj.weight")}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    torch.testing.assert_close(unfused(ids, positions, key_mask=real)[real], expected, **TOL)
    torch.testing.assert_close(unfused(ids, positions, key_mask=real), fused(ids, positions, key_mask=real), **TOL)
    unfused.layers[1].attn.q_proj.weight[0] += 0.5
    assert not torch.allclose(unfused(ids, positions, key_mask=real)[real], expected, **TOL)
