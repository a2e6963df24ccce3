"""Sampling: reproducible with a seeded generator; top-k / top-p keep exactly the tokens transformers' warpers
keep and never emit another (a hypothesis property)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from impl.generation import Llama, LlamaConfig, generate
from impl.generation.sampling import filter_top_k, filter_top_p, sample_next

CONFIG = LlamaConfig(
    vocab_size=53, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=64, max_position_embeddings=64,
)  # fmt: skip


def _sample(model, seed, **kwargs):
    ids = torch.randint(0, 53, (2, 6), generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(seed)
    return generate(model, ids, max_new_tokens=30, temperature=0.9, generator=g, **kwargs)


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = Llama(CONFIG).eval()
    first = _sample(model, 3, top_k=20, top_p=0.9)
    assert torch.equal(first, _sample(model, 3, top_k=20, top_p=0.9))
    assert not torch.equal(first, _sample(model, 4, top_k=20, top_p=0.9))  # a different seed draws differently


def test_top_k_1_is_greedy():
    model = Llama(CONFIG).eval()
    ids = torch.randint(0, 53, (2, 6))
    sampled = generate(model, ids, max_new_tokens=20, temperature=1.0, top_k=1, generator=torch.Generator())
    assert torch.equal(sampled, generate(model, ids, max_new_tokens=20))


def _hf_kept(logits, top_k, top_p) -> torch.Tensor:
    scores = logits.clone()
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.isfinite()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.integers(2, 300),
    top_k=st.one_of(st.none(), st.integers(1, 400)),
    top_p=st.one_of(st.none(), st.floats(0.01, 1.0)),
    scale=st.floats(0.1, 8.0),
)
def test_filters_keep_what_transformers_keeps_and_samples_stay_inside(seed, vocab, top_k, top_p, scale):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, vocab, generator=g) * scale  # continuous: no ties at the cut
    ours = logits
    if top_k is not None:
        ours = filter_top_k(ours, top_k)
    if top_p is not None:
        ours = filter_top_p(ours, top_p)
    kept = _hf_kept(logits, top_k, top_p)
    assert torch.equal(ours.isfinite(), kept)
    draws = sample_next(logits.repeat_interleave(64, dim=0), 1.0, top_k, top_p, g).view(4, 64)  # 64 per row
    assert kept.gather(1, draws).all(), "a token outside the top-k / top-p set was emitted"


def test_negative_control_unfiltered_draws_leave_the_kept_set():
    g = torch.Generator().manual_seed(0)
    logits = torch.linspace(0, 1, 50)[None]  # nearly flat: most mass lies outside the top 5
    draws = sample_next(logits.expand(64, -1), 1.0, None, None, g)[None]  # (1, 64)
    assert not _hf_kept(logits, 5, None).gather(1, draws).all()


@pytest.mark.parametrize("top_p", [0.9999999999999999, 1 - 2**-30, 0.5, 0.01])
def test_top_p_near_one_keeps_what_transformers_keeps(top_p):
    """A p within fp32's epsilon of 1 must not be rounded to 1 (which cut the tail that transformers keeps)."""
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(3)) * 6
    assert torch.equal(filter_top_p(logits, top_p).isfinite(), _hf_kept(logits, None, top_p))
