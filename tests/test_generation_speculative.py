"""Speculative decoding (impl.generation.speculative) against the target model alone.

Greedy: token-identical to `generate(target)` and to transformers' assisted generation (`generate(
assistant_model=...)`) on the same pair of models, for several k, with and without a cache, batched with left
padding and EOS; a cache that is not rolled back after a rejection (the negative control) breaks the identity.
Sampling: the first three generated tokens, drawn many times with fixed seeds, follow the target's exact joint
distribution (computed from its softmax over every prefix) by a chi-square test; the same test flags the two
classic mistakes, keeping every draft token and resampling a rejection from p instead of norm(max(0, p - q)).
"""

import pytest
import torch
import transformers

from impl.generation import Llama, LlamaConfig, generate, speculative
from impl.generation.sampling import filter_top_k, filter_top_p
from impl.generation.speculative import speculative_generate, speculative_generate_with_stats

VOCAB = 97
NEW_TOKENS = 40


def hf_llama(layers: int, seed: int = 0) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1, bos_token_id=None,
        eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def pair():
    """(hf target, hf draft, our target, our draft): the draft is the target with its last layer's contribution to
    the residual stream halved, so it agrees with the target's argmax often but not always (measured: 44% of
    single drafts accepted, 16% at k = 6)."""
    target = hf_llama(3)
    draft = hf_llama(3, seed=1)
    draft.load_state_dict(target.state_dict())
    with torch.no_grad():
        draft.model.layers[2].self_attn.o_proj.weight.mul_(0.5)
        draft.model.layers[2].mlp.down_proj.weight.mul_(0.5)
    return target, draft, Llama.from_hf(target), Llama.from_hf(draft)


def prompts(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_is_token_identical_to_the_target_alone_and_to_transformers(pair, k, use_cache):
    hf_target, hf_draft, target, draft = pair
    ids = prompts(1, 10)
    alone = generate(target, ids, max_new_tokens=NEW_TOKENS)
    got, stats = speculative_generate_with_stats(
        target, draft, ids, max_new_tokens=NEW_TOKENS, num_draft_tokens=k, use_cache=use_cache
    )
    assert torch.equal(got, alone)
    assert 0 < stats["acceptance_rate"] < 1, "a draft always or never accepted would prove little"
    assert stats["new_tokens"] == NEW_TOKENS and stats["rounds"] < NEW_TOKENS
    assert stats["new_tokens"] == stats["rounds"] + stats["accepted"]  # each round: accepted drafts + 1 token
    # transformers reads the draft length and schedule from the assistant's own generation config (default: 20
    # tokens, adapted each round, drafting cut short below a confidence of 0.4); here: k tokens every round.
    config = hf_draft.generation_config
    config.num_assistant_tokens, config.num_assistant_tokens_schedule = k, "constant"
    config.assistant_confidence_threshold = 0.0
    verifications = []
    hook = hf_target.register_forward_hook(lambda *_: verifications.append(1))
    try:
        hf = hf_target.generate(
            ids, assistant_model=hf_draft, max_new_tokens=NEW_TOKENS, do_sample=False, num_assistant_tokens=k,
            num_assistant_tokens_schedule="constant", pad_token_id=0,
        )  # fmt: skip
    finally:
        hook.remove()
    assert torch.equal(got, hf)
    # The same rounds: transformers verifies as often as we do (the first verification includes the prompt).
    assert len(verifications) == stats["rounds"] == stats["target_forwards"]
    assert torch.equal(generate(target, ids, max_new_tokens=NEW_TOKENS, draft_model=draft, num_draft_tokens=k), got)


def test_greedy_left_padded_batch_with_eos_matches_the_target_alone(pair):
    *_, target, draft = pair
    ids = prompts(3, 12, seed=2)
    mask = torch.ones_like(ids)
    mask[0, :7], mask[2, :3] = 0, 0
    ids = ids.masked_fill(mask == 0, 0)
    free = generate(target, ids, max_new_tokens=NEW_TOKENS, attention_mask=mask)
    eos = int(free[1, 12 + 9])  # a token row 1 emits mid-way: rows stop at different rounds
    for eos_token_id in (None, eos):
        alone = generate(target, ids, max_new_tokens=NEW_TOKENS, attention_mask=mask, eos_token_id=eos_token_id)
        got = speculative_generate(target, draft, ids, max_new_tokens=NEW_TOKENS, num_draft_tokens=4,
                                   attention_mask=mask, eos_token_id=eos_token_id)  # fmt: skip
        assert torch.equal(got, alone)
    assert got.shape[1] < 12 + NEW_TOKENS, "eos stopped no row early; the test would prove little"


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5, 9])
def test_max_new_tokens_is_exact_for_any_k(pair, max_new_tokens):
    *_, target, _ = pair
    ids = prompts(1, 6)
    # The target as its own draft accepts everything: each round would overshoot without the cap.
    got, stats = speculative_generate_with_stats(target, target, ids, max_new_tokens=max_new_tokens,
                                                 num_draft_tokens=4)  # fmt: skip
    assert torch.equal(got, generate(target, ids, max_new_tokens=max_new_tokens))
    assert stats["acceptance_rate"] == 1 or stats["proposed"] == 0
    assert stats["rounds"] == -(-max_new_tokens // 5)  # ceil: k + 1 = 5 tokens per round


def test_negative_control_keeping_every_draft_breaks_the_identity(pair, monkeypatch):
    """A verifier that keeps every draft token (no comparison with the target) is caught by the identity test."""
    *_, target, draft = pair
    ids = prompts(1, 10)
    monkeypatch.setattr(speculative, "_accept", lambda p_of_x, q_of_x, u: torch.ones_like(p_of_x, dtype=torch.bool))
    got = speculative_generate(target, draft, ids, max_new_tokens=NEW_TOKENS, num_draft_tokens=3)
    assert not torch.equal(got, generate(target, ids, max_new_tokens=NEW_TOKENS))


# Sampling: tiny models on 8 tokens; the draft is sharper than the target (a larger logit scale) and untrained, so
# p and q differ a lot: the first draft token is accepted with probability 0.46, and resampling a rejection from p
# moves the first token's distribution by a total variation of 0.23 (both exact, from the two softmaxes; the draft
# seed was chosen among 11 for that distance, so the negative control has power with few draws).
SMALL_VOCAB, PROMPT, OBSERVED, K = 8, [[3, 1, 4]], 3, 2
ALPHA = 1e-3  # a correct implementation fails the chi-square test with this probability for a fresh seed


def tiny(seed: int, logit_scale: float) -> Llama:
    config = LlamaConfig(vocab_size=SMALL_VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)  # fmt: skip
    torch.manual_seed(seed)
    model = Llama(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    return model


@pytest.fixture(scope="module")
def small_pair():
    return tiny(0, 2.0), tiny(4, 6.0)


@torch.no_grad()
def exact_joint(model: Llama, prompt: list[int], n: int, temperature: float, top_k, top_p) -> torch.Tensor:
    """P(x_1..x_n | prompt) for every sequence, (V,) * n: the product of the target's filtered softmax over every
    prefix, from a cache-free forward; the reference the sampled frequencies are tested against."""
    V = model.config.vocab_size
    joint = torch.ones(())
    prefixes = torch.tensor([prompt])
    for _ in range(n):
        logits = model(prefixes, last_only=True)[:, -1].double() / temperature
        logits = filter_top_p(filter_top_k(logits, top_k), top_p) if top_k else logits
        step = logits.softmax(-1).reshape(*joint.shape, V)  # P(x_j | x_<j) for every prefix
        joint = joint[..., None] * step
        prefixes = torch.cat([prefixes.repeat_interleave(V, 0), torch.arange(V).repeat(len(prefixes))[:, None]], 1)
    return joint


def chi_square_pvalue(samples: torch.Tensor, joint: torch.Tensor) -> float:
    """Pearson's chi-square p-value of the sampled sequences (N, n) against `joint`; cells expecting fewer than 5
    draws are pooled into one (the usual validity rule for the chi-square approximation)."""
    V, n = joint.shape[0], samples.shape[1]
    index = (samples * V ** torch.arange(n - 1, -1, -1)).sum(-1)
    observed = torch.bincount(index, minlength=V**n).double()
    expected = joint.flatten() * len(samples)
    small = expected < 5
    observed = torch.cat([observed[~small], observed[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    stat = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.double), stat / 2))


def draws(small_pair, calls: int, batch: int, **sampling) -> tuple[torch.Tensor, int]:
    """`calls` seeded calls of `batch` rows each: the OBSERVED new tokens of every row, (calls * batch, OBSERVED),
    and how many calls emitted all of them in one round (every draft accepted, then the bonus token)."""
    target, draft = small_pair
    ids = torch.tensor(PROMPT).expand(batch, -1)
    generator = torch.Generator().manual_seed(1234)
    out, one_round = [], 0
    for _ in range(calls):
        tokens, stats = speculative_generate_with_stats(
            target, draft, ids, max_new_tokens=OBSERVED, num_draft_tokens=K, generator=generator, **sampling
        )
        out.append(tokens[:, -OBSERVED:])
        one_round += stats["rounds"] == 1
    return torch.cat(out), one_round


WRONG = {
    "keep-every-draft": ("_accept", lambda p_of_x, q_of_x, u: torch.ones_like(p_of_x, dtype=torch.bool)),
    "resample-from-p": ("_residual", lambda p, q: p),
}
# Batch 1 runs the algorithm exactly as the papers state it (all-accepted rounds with their bonus token happen
# often); a wide batch synchronizes the rows' rounds (impl.generation.speculative's docstring) and runs many
# draws per call, with the sampling filters on.
SETTINGS = {
    "batch1-temperature1": dict(calls=500, batch=1, temperature=1.0, top_k=None, top_p=None),
    "batch64-filtered": dict(calls=20, batch=64, temperature=0.8, top_k=6, top_p=0.95),
}


@pytest.mark.parametrize("wrong", [None, *WRONG])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_sampled_tokens_follow_the_target_distribution(small_pair, setting, wrong, monkeypatch):
    calls, batch, *_ = SETTINGS[setting].values()
    sampling = {k: v for k, v in SETTINGS[setting].items() if k not in ("calls", "batch")}
    if wrong is not None:
        monkeypatch.setattr(speculative, *WRONG[wrong])
    samples, one_round = draws(small_pair, calls, batch, **sampling)
    if batch == 1:
        assert one_round > calls // 10, "all-accepted rounds (the bonus token) were too rare to be tested"
    pvalue = chi_square_pvalue(samples, exact_joint(small_pair[0], PROMPT[0], OBSERVED, **sampling))
    if wrong is None:
        assert pvalue > ALPHA, f"sampled tokens differ from the target's distribution (p = {pvalue:.2e})"
    else:
        assert pvalue < ALPHA, f"the {wrong} mistake went unnoticed (p = {pvalue:.2e}): the test has no power"


def test_sampling_is_reproducible_with_a_seeded_generator(small_pair):
    target, draft = small_pair
    ids = torch.tensor(PROMPT)

    def run(seed):
        return speculative_generate(target, draft, ids, max_new_tokens=10, num_draft_tokens=3, temperature=1.0,
                                    generator=torch.Generator().manual_seed(seed))  # fmt: skip

    assert torch.equal(run(0), run(0))
    assert not all(torch.equal(run(0), run(s)) for s in range(1, 4))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(num_draft_tokens=0), ValueError, r"num_draft_tokens must be a positive int, got 0"),
        (dict(num_draft_tokens=2.0), TypeError, r"num_draft_tokens must be a positive int, got 2\.0"),
        (dict(num_draft_tokens=True), TypeError, r"num_draft_tokens must be a positive int, got True"),
        (dict(draft_model="tiny"), TypeError, r"draft_model must be an impl\.generation\.Llama, got str"),
        (dict(draft_vocab=VOCAB + 1), ValueError, r"draft_model must share the target's vocabulary: vocab_size 97"),
        (dict(draft_positions=12), ValueError, r"max_position_embeddings=12"),
    ],
    ids=["k=0", "k=2.0", "k=True", "not-a-llama", "other-vocab", "draft-too-short"],
)
@pytest.mark.parametrize("front", ["generate", "speculative_generate"])
def test_bad_input_is_refused_before_any_work(pair, monkeypatch, front, kwargs, error, match):
    *_, target, _ = pair
    kwargs = dict(kwargs)
    config = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1)  # fmt: skip
    if "draft_vocab" in kwargs:
        kwargs["draft_model"] = Llama(LlamaConfig(**config | {"vocab_size": kwargs.pop("draft_vocab")}))
    if "draft_positions" in kwargs:
        kwargs["draft_model"] = Llama(LlamaConfig(**config, max_position_embeddings=kwargs.pop("draft_positions")))
    kwargs.setdefault("draft_model", Llama(LlamaConfig(**config)))
    calls = []
    monkeypatch.setattr(Llama, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(error, match=match):
        if front == "generate":
            generate(target, prompts(1, 4), max_new_tokens=10, **kwargs)
        else:
            speculative_generate(target, kwargs.pop("draft_model"), prompts(1, 4), max_new_tokens=10, **kwargs)
    assert calls == [], "a model ran before the input was refused"
