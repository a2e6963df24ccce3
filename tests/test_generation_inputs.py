"""Bad input to generate() gets a ValueError / TypeError that names the argument, the expectation and the value."""

import pytest
import torch

from impl.generation import Llama, LlamaConfig, generate

CONFIG = LlamaConfig(
    vocab_size=31, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    intermediate_size=32, max_position_embeddings=20,
)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return Llama(CONFIG).eval()


IDS = torch.zeros(2, 5, dtype=torch.long)

BAD = {
    "too-long": (
        dict(max_new_tokens=16),
        r"prompt length 5 \+ max_new_tokens 16 must be at most the model's max_position_embeddings=20",
    ),
    "mask-shape": (
        dict(max_new_tokens=3, attention_mask=torch.ones(2, 4)),
        r"attention_mask must have input_ids' shape \(2, 5\), got \(2, 4\)",
    ),
    "mask-empty-row": (
        dict(max_new_tokens=3, attention_mask=torch.tensor([[1] * 5, [0] * 5])),
        "attention_mask must mark at least one token in every row",
    ),
    "temperature": (dict(max_new_tokens=3, temperature=-0.5), "temperature must be a number >= 0, got -0.5"),
    "top-p-zero": (dict(max_new_tokens=3, temperature=1.0, top_p=0.0), r"top_p must be a number in \(0, 1\], got 0.0"),
    "top-p-above-1": (
        dict(max_new_tokens=3, temperature=1.0, top_p=1.5),
        r"top_p must be a number in \(0, 1\], got 1.5",
    ),
    "top-k": (dict(max_new_tokens=3, temperature=1.0, top_k=0), "top_k must be a positive int, got 0"),
    "max-new-tokens": (dict(max_new_tokens=0), "max_new_tokens must be a positive int, got 0"),
    "compile-not-bool": (dict(max_new_tokens=3, compile=1), "compile must be a bool, got 1"),
    "compile-without-cache": (
        dict(max_new_tokens=3, compile=True, use_cache=False),
        "compile=True compiles the cached decode step; it needs use_cache=True, got use_cache=False",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments(model, case):
    kwargs, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        generate(model, IDS, **kwargs)


def test_the_longest_allowed_request_runs(model):
    out = generate(model, IDS, max_new_tokens=15)  # 5 + 15 == max_position_embeddings
    assert out.shape == (2, 20)


@pytest.mark.parametrize(
    "ids,message",
    [
        (torch.zeros(5, dtype=torch.long), r"input_ids must be a \(batch, seq\) int64 tensor, got \(5,\) torch.int64"),
        (torch.zeros(2, 5), r"input_ids must be a \(batch, seq\) int64 tensor, got \(2, 5\) torch.float32"),
        (torch.zeros(2, 0, dtype=torch.long), "input_ids must hold at least one token per row, got seq length 0"),
    ],
    ids=["rank", "dtype", "empty"],
)
def test_bad_input_ids(model, ids, message):
    with pytest.raises(ValueError, match=message):
        generate(model, ids, max_new_tokens=2)


def test_model_must_be_ours():
    with pytest.raises(TypeError, match="model must be an impl.generation.Llama, got Linear"):
        generate(torch.nn.Linear(2, 2), IDS, max_new_tokens=2)


def test_start_without_cache(model):
    with pytest.raises(ValueError, match="start must be 0 without a cache, got 3"):
        model(IDS, start=3)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            dict(positions=torch.zeros(2, 4, dtype=torch.long)),
            r"positions must have input_ids' shape \(2, 5\), got \(2, 4\)",
        ),
        (
            dict(key_mask=torch.ones(2, 6, dtype=torch.bool)),
            r"key_mask must be \(batch, start \+ seq\) = \(2, 5\), got \(2, 6\)",
        ),
    ],
    ids=["positions", "key-mask"],
)
def test_forward_shapes(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model(IDS, **kwargs)


def test_compile_refuses_the_triton_backend_before_any_work():
    model = Llama(LlamaConfig(**{**CONFIG.__dict__, "attention_backend": "triton"}))
    with pytest.raises(ValueError, match="compile=True attends over every cache slot under a dense mask.*got 'triton'"):
        generate(model, IDS, max_new_tokens=2, compile=True)


def test_compile_refuses_a_draft_model(model):
    with pytest.raises(ValueError, match="give compile=True or a draft_model, got both"):
        generate(model, IDS, max_new_tokens=2, compile=True, draft_model=model)


def test_slots_beyond_the_rope_tables(model):
    # The RoPE tables hold max_position_embeddings=20 rows: slots [18, 23) have no row for 20, 21, 22.
    with pytest.raises(ValueError, match=r"slots \[18, 23\) must lie below max_position_embeddings=20"):
        model(IDS, cache=model.new_cache(2, 23), start=18)


def test_logits_at_is_the_full_forward_at_those_positions(model):
    """The lm_head at chosen positions only (a packed batch's last tokens) equals the full forward's logits there;
    a neighbouring position differs (the control)."""
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    at = torch.tensor([2, 5, 8])
    with torch.no_grad():
        full, ours = model(ids), model(ids, logits_at=at)
    assert ours.shape == (2, 3, model.config.vocab_size)
    # fp32 defaults: the lm_head over 3 rows instead of 9 may take another GEMM blocking (ulp-level differences)
    torch.testing.assert_close(ours, full[:, at])
    with pytest.raises(AssertionError):
        torch.testing.assert_close(ours, full[:, at - 1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [(dict(logits_at=torch.tensor([[1]])), "logits_at"), (dict(logits_at=torch.tensor([1.0])), "logits_at"),
     (dict(logits_at=torch.tensor([1]), last_only=True), "logits_at")],
    ids=["2-d", "float", "with-last-only"],
)  # fmt: skip
def test_logits_at_bad_input(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(1, 3, dtype=torch.long), **kwargs)
