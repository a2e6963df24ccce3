"""Continuous batching against transformers on the same weights (fp32, greedy): every request's tokens equal
transformers' `generate` of that request alone, and transformers' own continuous batching (`generate_batch`, its
paged cache) on the same requests; prefills and decodes of different requests share steps, EOS retires a request
at once, a cache too small for all requests preempts (recompute) and still loses nothing; bad input is refused
before any work. Each equality has a negative control."""

import inspect

import pytest
import torch
import transformers
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from impl.generation import Llama, batching
from impl.generation.batching import ContinuousBatcher, packed_causal_mask

VOCAB = 128
# (prompt length, max_new_tokens): different lengths, a prompt longer than a block, one-token and long outputs
REQUESTS = [(5, 12), (17, 30), (9, 1), (30, 20), (40, 8), (3, 25), (12, 16)]


def hf_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, bos_token_id=None,
        eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_alone(hf, tokens: list[int], new: int, **kwargs) -> tuple[list[int], float]:
    """transformers' greedy tokens for one request alone, and the smallest top-1 minus top-2 logit gap on the way.
    (The attention mask is explicit: with pad_token_id set, transformers would mask prompt tokens equal to it.)"""
    ids = torch.tensor([tokens])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False, pad_token_id=0,
                      output_logits=True, return_dict_in_generate=True, **kwargs)  # fmt: skip
    gaps = [float(t.topk(2).values.diff().abs()) for t in out.logits]
    return out.sequences[0, len(tokens) :].tolist(), min(gaps)


@pytest.fixture(scope="module")
def setup():
    hf = hf_llama()
    prompts = [prompt(n, seed=100 + i) for i, (n, _) in enumerate(REQUESTS)]
    expected, gaps = zip(*(hf_alone(hf, p, new) for p, (_, new) in zip(prompts, REQUESTS, strict=True)), strict=True)
    # Greedy identity holds on any CPU while no step is a near-tie: our fp32 logits are within 1e-5 of theirs.
    assert min(gaps) > 1e-4, f"a near-tie ({min(gaps):.1e}) along the reference continuations; pick another seed"
    return hf, Llama.from_hf(hf), prompts, list(expected)


def serve(model, prompts, **kwargs) -> tuple[ContinuousBatcher, list[list[int]], list[list[tuple]]]:
    """Submit all requests up front, step to the end; (batcher, tokens per request, each step's batch)."""
    batcher = ContinuousBatcher(model, **kwargs)
    ids = [batcher.submit(p, new) for p, (_, new) in zip(prompts, REQUESTS, strict=True)]
    steps, done = [], {}
    while batcher.has_unfinished:
        batcher.step()
        steps.append(batcher.last_batch)
        done |= batcher.collect()
    return batcher, [done[i].tokens for i in ids], steps


def test_each_request_equals_transformers_generate_alone(setup):
    hf, ours, prompts, expected = setup
    batcher, got, steps = serve(ours, prompts, num_blocks=64, block_size=4, max_running=3)
    assert got == expected
    # prefills (several new tokens) and decodes (one) of different requests ran in the same forward
    assert any(any(new > 1 for _, _, new in s) and any(new == 1 for _, _, new in s) for s in steps)
    assert max(len(s) for s in steps) == 3 and batcher.preemptions == 0 and batcher.cache.used_blocks == 0
    assert len({t for out in got for t in out}) > 20, "degenerate continuations would prove little"

    # negative control: a perturbed copy of the model gives other tokens
    wrong = Llama.from_hf(hf)
    with torch.no_grad():
        wrong.layers[1].attn.qkv_proj.weight.mul_(1.3)
    assert serve(wrong, prompts, num_blocks=64, block_size=4, max_running=3)[1] != expected


def test_equals_transformers_continuous_batching(setup, monkeypatch):
    hf, ours, prompts, expected = setup
    config = GenerationConfig(max_new_tokens=max(n for _, n in REQUESTS), do_sample=False, eos_token_id=None)
    # the page size is `page_size` in transformers 5.24 and `block_size` in 5.17 (the GPU image's)
    page = "page_size" if "page_size" in inspect.signature(ContinuousBatchingConfig).parameters else "block_size"
    cb = ContinuousBatchingConfig(**{page: 16}, num_blocks=32, max_batch_tokens=64, allow_block_sharing=False)
    # generate_batch takes one max_new_tokens for all requests: each request's tokens are the first max_new_tokens
    # of that longest run (a greedy continuation does not depend on where it is cut off).
    out = hf.generate_batch(prompts, generation_config=config, continuous_batching_config=cb, warmup=False)
    theirs = [list(r.generated_tokens)[:new] for r, (_, new) in zip(out.values(), REQUESTS, strict=True)]
    assert len(out) == len(REQUESTS) and all(len(t) == new for t, (_, new) in zip(theirs, REQUESTS, strict=True))
    _, got, _ = serve(ours, prompts, num_blocks=32, block_size=16, max_batch_tokens=64)
    assert got == theirs == expected

    # negative control: a batch mask that lets requests see each other's keys breaks the equality
    def leaky(segments, device=None):  # adds "query i sees packed key j <= i", whichever request j belongs to
        mask = packed_causal_mask(segments, device)
        return mask | torch.ones_like(mask).tril()

    monkeypatch.setattr(batching, "packed_causal_mask", leaky)
    assert serve(ours, prompts, num_blocks=32, block_size=16, max_batch_tokens=64)[1] != theirs


def test_eos_retires_a_request_at_once(setup):
    hf, ours, prompts, expected = setup
    eos = expected[1][6]  # a token request 1 emits mid-way
    batcher = ContinuousBatcher(ours, num_blocks=64, block_size=4, eos_token_id=eos)
    ids = [batcher.submit(p, new) for p, (_, new) in zip(prompts, REQUESTS, strict=True)]
    done = {}
    while batcher.has_unfinished:
        for finished in batcher.step():
            assert finished.request_id not in batcher.cache.block_tables  # its blocks are free at once
            done[finished.request_id] = finished
    for i, p, (_, new) in zip(ids, prompts, REQUESTS, strict=True):
        want = hf_alone(hf, p, new, eos_token_id=eos)[0]
        want = want[: want.index(eos) + 1] if eos in want else want  # transformers pads a finished row
        assert done[i].tokens == want
        assert done[i].finish_reason == ("eos" if want[-1] == eos and eos in expected[i] else "length")
    assert done[ids[1]].finish_reason == "eos" and len(done[ids[1]].tokens) < REQUESTS[1][1]


class _Recording(ContinuousBatcher):
    """Notes how many tokens each preempted request had generated; `lossy` also drops the first half of the
    victim's prompt from its requeued context (a wrong preemption, for the negative control)."""

    def __init__(self, *args, lossy: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.lossy, self.victims = lossy, []

    def _preempt(self, request):
        self.victims.append((request.id, len(request.generated)))
        super()._preempt(request)
        if self.lossy:
            request.prompt = request.prompt[len(request.prompt) // 2 :]


def test_preemption_by_recompute_loses_nothing(setup):
    _, ours, prompts, expected = setup
    # 16 blocks of 4 slots = 64 slots, where the longest request alone needs 49 (30 + 20 - 1) and all seven 221:
    # admission waits for free blocks, and a running decode that needs a block preempts the youngest (here
    # requests 3 and 6, after they generated 3 and 2 tokens). 12 blocks could not hold request 3 at all.
    with pytest.raises(ValueError, match=r"49 slots must fit the whole cache, num_blocks x block_size = 12 x 4"):
        ContinuousBatcher(ours, num_blocks=12, block_size=4).submit(prompts[3], REQUESTS[3][1])
    for lossy in (False, True):
        batcher = _Recording(ours, num_blocks=16, block_size=4, lossy=lossy)
        ids = [batcher.submit(p, new) for p, (_, new) in zip(prompts, REQUESTS, strict=True)]
        running = []
        while batcher.has_unfinished:
            batcher.step()
            running.append(len(batcher.running))
        done = batcher.collect()
        got = [done[i].tokens for i in ids]
        assert max(running) < len(REQUESTS)  # the blocks, not the queue, bounded the running batch
        assert batcher.preemptions > 0 and any(generated > 0 for _, generated in batcher.victims)
        assert batcher.cache.used_blocks == 0 and sorted(batcher.cache.free_blocks) == list(range(16))
        if lossy:  # negative control: a preemption that loses part of the victim's context is caught
            assert got != expected
        else:
            assert got == expected and [done[i].prompt for i in ids] == prompts


@pytest.mark.parametrize(
    "kwargs, submit, error, match",
    [
        (dict(block_size=0), None, ValueError, r"block_size must be a positive int, got 0"),
        (dict(block_size=2.5), None, ValueError, r"block_size must be a positive int, got 2.5"),
        (dict(block_size="16"), None, ValueError, r"block_size must be a positive int, got '16'"),
        (dict(num_blocks=0), None, ValueError, r"num_blocks must be a positive int, got 0"),
        (dict(max_running=0), None, ValueError, r"max_running must be a positive int, got 0"),
        (dict(eos_token_id=VOCAB), None, ValueError, r"eos_token_id must be an int in \[0, 128\), got 128"),
        ({}, ([], 4), ValueError, r"prompt must hold at least one token, got an empty prompt"),
        ({}, ([1, VOCAB], 4), ValueError, r"prompt\[1\] must be a token id in \[0, 128\), got 128"),
        ({}, ([1, 2], 0), ValueError, r"max_new_tokens must be a positive int, got 0"),
        ({}, ([1] * 200, 60), ValueError, r"must be at most the model's max_position_embeddings=256"),
        ({}, ([1] * 60, 70), ValueError, r"129 slots must fit the whole cache, num_blocks x block_size = 8 x 16"),
    ],
)
def test_bad_input_is_refused_before_any_work(setup, kwargs, submit, error, match):
    ours = setup[1]
    sizes = dict(num_blocks=8, block_size=16) | kwargs
    with pytest.raises(error, match=match):
        batcher = ContinuousBatcher(ours, **sizes)
        batcher.submit(*submit)
    if submit is not None:
        assert not batcher.has_unfinished and batcher.steps == 0 and batcher.cache.used_blocks == 0


def test_model_must_be_ours():
    with pytest.raises(TypeError, match="model must be an impl.generation.Llama"):
        ContinuousBatcher(hf_llama(), num_blocks=4)
