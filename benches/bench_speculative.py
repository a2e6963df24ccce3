"""Speculative decoding: acceptance and speed-up against k and against the draft's size, beside transformers'
assisted generation on the same pair of models.

The pair: a larger and a smaller random Llama (transformers' LlamaForCausalLM, copied into ours with `from_hf`)
trained briefly, seeded, on the same tiny-shakespeare characters (one shared tokenizer), so the draft agrees with
the target often but not always. Training runs once per module, on one thread (a few seconds at smoke, about a
minute at small on an idle 2-core CPU). Every row continues the same validation-text prompt, batch 1.

- `generation-speculative`: the middle draft, k = num_draft_tokens swept. Rows: the target alone (ours,
  `generate` without a draft: the baseline), ours speculative, transformers' `generate(assistant_model=...,
  num_assistant_tokens=k, num_assistant_tokens_schedule="constant")` (the reference; transformers reads these
  from the assistant's generation config, set there too, with its confidence-based early stop of drafting
  switched off, `assistant_confidence_threshold=0`, so it proposes k tokens every round as ours does).
- `generation-speculative-draft`: k fixed, the draft's size swept (its parameters in millions, `draft_M`).
Each row runs twice: greedy (`decoding=greedy`; every row's tokens must equal the target alone's, checked as
`expected`) and sampled at temperature 1 without filters (`decoding=sampled`, seeded, not compared; its
acceptance is speculative sampling's, min(1, p/q) per token, which greedy loops of briefly trained models hide).
Metrics: acceptance rate = accepted / proposed draft tokens; tokens per round = new tokens per verification (1 +
the mean accepted run; the target alone: 1); target forwards = the target's forward calls (one per round, the
first with the prompt, on both sides). transformers' figures come from forward hooks on its target and draft (a
draft forward proposes one token) and the output length; near max_new_tokens it drafts past the end and cuts
where ours drafts fewer, so the two can differ by a round even where the greedy tokens are the same. The speed-up
against the target alone is the report's "speed-up vs" column (tokens/s is of new tokens).
"""

import pytest
import torch
import torch.nn.functional as F

from impl.generation import Llama, generate
from impl.generation.speculative import speculative_generate, speculative_generate_with_stats
from impl.gpt import CharTokenizer, get_batch, load_shakespeare, train_val_split

# (hidden, layers, heads, kv heads, intermediate) of the target and of each draft, per --size; a draft's name is
# its shape.
TARGET = {"smoke": (64, 2, 4, 2, 160), "small": (256, 4, 4, 2, 688), "full": (1024, 12, 16, 4, 2816)}
DRAFTS = {
    "smoke": [(32, 1, 2, 1, 64)],
    "small": [(64, 1, 2, 1, 160), (128, 2, 4, 2, 344), (256, 2, 4, 2, 688)],
    "full": [(128, 2, 4, 2, 344), (256, 4, 4, 2, 688), (512, 4, 8, 2, 1376)],
}
TRAIN = {"smoke": (10, 30), "small": (150, 300), "full": (300, 600)}  # optimizer steps: (target, each draft)
BATCH, CONTEXT, LR = 8, 64, 3e-3  # training windows of CONTEXT characters
GENERATE = {"smoke": (16, 16), "small": (32, 64), "full": (64, 128)}  # (prompt characters, new tokens)
SWEEP_K = {"smoke": [2, 4], "small": [1, 2, 4, 8], "full": [1, 2, 4, 8]}
FIXED_K = 4  # the draft-size sweep's k
# Seconds for the whole module (impl.bench's schedule): smoke and small on the 2-core CPU, full on one GPU.
ESTIMATED_S = {"smoke": 25, "small": 240, "full": 150}
VARIANTS = ["target alone", "ours speculative", "transformers assisted"]
DECODINGS = ["greedy", "sampled"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    size = metafunc.config.getoption("--size")
    if "k" in metafunc.fixturenames:
        metafunc.parametrize("k", SWEEP_K[size], ids=[f"k={k}" for k in SWEEP_K[size]])
    if "draft_index" in metafunc.fixturenames:
        drafts = DRAFTS[size]
        metafunc.parametrize("draft_index", range(len(drafts)), ids=[_name(d) for d in drafts])


def _name(shape) -> str:
    return f"{shape[1]}x{shape[0]}"  # layers x hidden


def _hf_llama(shape, vocab: int, max_positions: int, seed: int):
    import transformers

    hidden, layers, heads, kv_heads, intermediate = shape
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=max_positions,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def _train(model, data: torch.Tensor, steps: int, seed: int, device) -> None:
    """Next-character cross-entropy with AdamW on random windows of `data`; every model sees the same windows.
    One intra-op thread on CPU: these models are small, and two threads on a busy 2-core machine train many
    times slower than one."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        _steps(model, data, steps, seed, device)
    finally:
        torch.set_num_threads(threads)


def _steps(model, data: torch.Tensor, steps: int, seed: int, device) -> None:
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = get_batch(data, CONTEXT, BATCH, generator)
        logits = model(x.to(device)).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)  # the gradients would otherwise stay allocated through every row
    model.eval()


@pytest.fixture(scope="module")
def pair(shakespeare_path, size: str, device: torch.device):
    """The trained target and drafts, each as (transformers model, ours), and the prompt (1, T)."""
    if shakespeare_path is None:
        pytest.skip("no tiny-shakespeare file (set TINYSHAKESPEARE)")
    text = load_shakespeare(shakespeare_path)
    tokenizer = CharTokenizer(text)
    train, val = train_val_split(torch.tensor(tokenizer.encode(text)))
    prompt_len, new_tokens = GENERATE[size]
    max_positions = prompt_len + new_tokens + 8
    target_steps, draft_steps = TRAIN[size]
    hf_target = _hf_llama(TARGET[size], tokenizer.vocab_size, max_positions, seed=0)
    _train(hf_target, train, target_steps, seed=1, device=device)
    drafts = []
    for i, shape in enumerate(DRAFTS[size]):
        hf_draft = _hf_llama(shape, tokenizer.vocab_size, max_positions, seed=10 + i)
        _train(hf_draft, train, draft_steps, seed=1, device=device)
        drafts.append((hf_draft, Llama.from_hf(hf_draft)))
    start = len(val) // 2
    prompt = val[start : start + prompt_len][None].to(device)
    return (hf_target, Llama.from_hf(hf_target)), drafts, prompt


class _Counter:
    """Forward calls of a module, through a forward hook (the hook is removed when the `with` ends)."""

    def __init__(self, module):
        self.module, self.calls = module, 0

    def __enter__(self):
        self.handle = self.module.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _params_m(model) -> float:
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 2)


def _params(k: int, decoding: str, shape, draft, target, prompt, new_tokens: int) -> dict:
    return {"k": k, "decoding": decoding, "draft": _name(shape), "draft_M": _params_m(draft[1]),
            "target_M": _params_m(target[1]), "prompt": prompt.shape[1], "new_tokens": new_tokens}  # fmt: skip


def _row(bench, provider: str, target, draft, prompt, new_tokens: int, k: int, params: dict, sweep: str):
    """One row: run `provider` once for its statistics, then time it. Greedy rows' tokens must equal the target's
    alone; sampled rows (temperature 1, no filter) draw from a seeded generator and are not compared."""
    hf_target, ours_target = target
    hf_draft, ours_draft = draft
    sampled = params["decoding"] == "sampled"
    expected = None if sampled else generate(ours_target, prompt, max_new_tokens=new_tokens)
    ours_kwargs = dict(max_new_tokens=new_tokens, temperature=1.0 if sampled else 0.0)
    generator = torch.Generator(prompt.device).manual_seed(0)
    metrics = {}
    if provider == "target alone":

        def fn():
            return generate(ours_target, prompt, **ours_kwargs, generator=generator)

        metrics["tokens per round"], metrics["target forwards"] = 1.0, new_tokens  # the prefill, then a step each
    elif provider == "ours speculative":

        def fn():
            return speculative_generate(ours_target, ours_draft, prompt, num_draft_tokens=k, generator=generator,
                                        **ours_kwargs)  # fmt: skip

        _, stats = speculative_generate_with_stats(ours_target, ours_draft, prompt, num_draft_tokens=k,
                                                   generator=torch.Generator(prompt.device).manual_seed(0),
                                                   **ours_kwargs)  # fmt: skip
        metrics["acceptance rate"] = stats["acceptance_rate"]
        metrics["tokens per round"] = stats["tokens_per_round"]
        metrics["target forwards"] = stats["target_forwards"]  # one per round, the first with the prompt
    else:
        # transformers reads the draft length from the assistant's own generation config (default: 20 tokens,
        # adapted every round, drafting cut short below a confidence of 0.4); here k tokens every round, as ours.
        config = hf_draft.generation_config
        config.num_assistant_tokens, config.num_assistant_tokens_schedule = k, "constant"
        config.assistant_confidence_threshold = 0.0
        kwargs = dict(assistant_model=hf_draft, max_new_tokens=new_tokens, num_assistant_tokens=k,
                      num_assistant_tokens_schedule="constant", pad_token_id=0, do_sample=sampled)  # fmt: skip
        if sampled:  # plain temperature-1 sampling: top-k over the whole vocabulary filters nothing
            kwargs |= dict(temperature=1.0, top_k=ours_target.config.vocab_size, top_p=1.0)
        torch.manual_seed(0)

        def fn():
            return hf_target.generate(prompt, **kwargs)

        with _Counter(hf_target) as calls, _Counter(hf_draft) as drafted:
            generated = fn().shape[1] - prompt.shape[1]
        # Each target forward verifies one round (the first with the prompt); a round emits its accepted drafts
        # and one more token; each draft forward proposes one token.
        metrics["acceptance rate"] = (generated - calls.calls) / drafted.calls if drafted.calls else float("nan")
        metrics["tokens per round"] = generated / calls.calls
        metrics["target forwards"] = calls.calls
    with torch.no_grad():
        bench(
            fn,
            variant=provider,
            params=params,
            sweep=sweep,
            dtype=ours_target.lm_head.weight.dtype,
            baseline=provider == "target alone",
            reference=provider == "transformers assisted",
            tokens=new_tokens,
            metrics=metrics,
            plot=("acceptance rate", "tokens per round"),
            expected=expected,
        )


@pytest.mark.benchmark(group="generation-speculative")
@pytest.mark.parametrize("provider", VARIANTS)
@pytest.mark.parametrize("decoding", DECODINGS)
def test_speculative_against_k(bench, size, pair, provider, decoding, k):
    target, drafts, prompt = pair
    draft = drafts[len(drafts) // 2]
    new_tokens = GENERATE[size][1]
    params = _params(k, decoding, DRAFTS[size][len(drafts) // 2], draft, target, prompt, new_tokens)
    _row(bench, provider, target, draft, prompt, new_tokens, k, params, sweep="k")


@pytest.mark.benchmark(group="generation-speculative-draft")
@pytest.mark.parametrize("provider", VARIANTS)
@pytest.mark.parametrize("decoding", DECODINGS)
def test_speculative_against_draft_size(bench, size, pair, provider, decoding, draft_index):
    target, drafts, prompt = pair
    draft = drafts[draft_index]
    new_tokens = GENERATE[size][1]
    params = _params(FIXED_K, decoding, DRAFTS[size][draft_index], draft, target, prompt, new_tokens)
    _row(bench, provider, target, draft, prompt, new_tokens, FIXED_K, params, sweep="draft_M")
