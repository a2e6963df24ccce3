"""KV caching: decode latency per token against context length, prefill, and end-to-end generate().

Variants, on the same weights: ours with the static cache, ours without a cache (every step reruns the whole
sequence: the baseline), transformers with its default `DynamicCache` (the reference) and with `StaticCache`.

- `generation-decode`: one decode step (one token in, its logits and argmax out) after `context` tokens are
  cached; the cache is filled outside the timed call and each call overwrites the same slot. At batch 1 the
  step time is the per-token latency and tokens/s is its inverse. Ours records achieved bandwidth: bytes
  read per token (every weight except the embedding table, plus the keys and values of the context) x
  tokens/s, beside a large fp32 matrix-vector product's bandwidth measured in the same run (the roofline a
  decode step can reach; gpt-fast reports its decode the same way).
- `generation-prefill`: the prompt in one pass, cache allocation included; the peak memory column holds the
  cache, recorded beside the formula 2 x layers x kv_heads x head_dim x max_tokens x batch x bytes.
- `generation-generate`: `generate()` against transformers' `generate(do_sample=False)`, batch 1, a short prompt,
  tokens/s of new tokens (the 1.5x target is recorded as a metric).
"""

import functools
import inspect
import time

import pytest
import torch

from impl.common import MemoryMeter, synchronize
from impl.generation import Llama, generate

# The model per --size. small: 34.0M parameters (12.3M of them in the embedding table), fp32 on CPU.
MODELS = {
    "smoke": dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "small": dict(vocab_size=32000, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                  num_attention_heads=6, num_key_value_heads=2),
    "full": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                 num_attention_heads=16, num_key_value_heads=4),
}  # fmt: skip
SWEEPS = {"context": {"smoke": [32, 64], "small": [64, 128, 256, 512, 1024], "full": [512, 1024, 2048, 4096, 8192]}}
GENERATE = {"smoke": (8, 8), "small": (32, 32), "full": (128, 128)}  # (prompt tokens, new tokens)
DECODE = ["ours-no-cache", "transformers-dynamic", "transformers-static", "ours-cache"]  # ours last: its metrics
PREFILL = ["transformers-dynamic", "transformers-static", "ours-cache"]  # use the rows measured before it
GENERATE_VARIANTS = ["transformers-dynamic", "transformers-static", "ours-cache"]
_MEDIANS: dict[tuple, float] = {}  # (group, variant, context) -> median seconds, for the ratio metrics


def _dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@functools.cache
def _models(size: str, device_type: str):
    """(transformers model, ours) on the same weights; built once per run."""
    import transformers

    device = torch.device(device_type)
    max_context = max(SWEEPS["context"][size]) + sum(GENERATE[size]) + 8
    config = transformers.LlamaConfig(
        **MODELS[size], max_position_embeddings=max_context, bos_token_id=None, eos_token_id=None, pad_token_id=None
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).to(device, _dtype(device)).eval()
    return hf, Llama.from_hf(hf)


def _with_cache(hf, cache) -> dict:
    """The forward's cache keyword: `cache` in transformers 5.24 (which deprecates `past_key_values`), still
    `past_key_values` in 5.17 (the GPU image); there an unknown `cache=` would be swallowed by **kwargs, unused."""
    name = "cache" if "cache" in inspect.signature(type(hf).forward).parameters else "past_key_values"
    return {name: cache}


@functools.cache
def _matvec_bandwidth(device_type: str) -> float:
    """Bytes/s of a large fp32 matrix-vector product: the memory roofline a batch-1 decode step can reach."""
    device = torch.device(device_type)
    rows, cols = (16384, 16384) if device.type == "cuda" else (4096, 8192)  # 1 GiB / 128 MiB: far beyond caches
    w, x = torch.randn(rows, cols, device=device), torch.randn(cols, device=device)
    for _ in range(3):
        w @ x
    synchronize(device)
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        w @ x
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return w.numel() * w.element_size() / best


def _bytes_per_token(model: Llama, context: int) -> int:
    """Bytes a batch-1 decode step reads: every weight but the embedding table (one row of it), plus K and V."""
    c = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if not c.tie_word_embeddings:  # a tied table is read whole, as the lm_head
        weights -= model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    element = model.lm_head.weight.element_size()
    return weights + 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * (context + 1) * element


def _cache_formula(model: Llama, max_tokens: int, batch: int = 1) -> int:
    c = model.config
    element = model.lm_head.weight.element_size()
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * max_tokens * batch * element


def _cache_metrics(model: Llama, max_tokens: int) -> dict:
    """The cache's bytes by the formula, by `nbytes`, and as the memory meter sees its allocation, in MiB."""
    with MemoryMeter(model.lm_head.weight.device) as mem:
        cache = model.new_cache(1, max_tokens)
    mib = 2**20
    return {
        "cache formula MiB": _cache_formula(model, max_tokens) / mib,
        "cache nbytes MiB": cache.nbytes / mib,
        "cache metered MiB": mem.current / mib,
    }


def _prompt(length: int, vocab: int, device) -> torch.Tensor:
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(length)).to(device)


def _decode_step(provider: str, hf, ours: Llama, ids: torch.Tensor):
    """A callable running one decode step at position ids.shape[1] - 1, its cache filled with the rest."""
    import transformers

    context = ids.shape[1] - 1
    last, position = ids[:, -1:], torch.full((1, 1), context, device=ids.device)
    if provider == "ours-no-cache":
        return lambda: ours(ids, last_only=True)[:, -1].argmax(-1)
    if provider == "ours-cache":
        cache = ours.new_cache(1, context + 1)
        ours(ids[:, :-1], cache=cache)
        return lambda: ours(last, position, cache=cache, start=context)[:, -1].argmax(-1)
    if provider == "transformers-dynamic":
        cache = transformers.DynamicCache(config=hf.config)
    else:
        cache = transformers.StaticCache(config=hf.config, max_cache_len=context + 1)
    hf(ids[:, :-1], **_with_cache(hf, cache), use_cache=True)

    def step():
        logits = hf(last, **_with_cache(hf, cache), position_ids=position, use_cache=True, logits_to_keep=1).logits
        _drop_last(cache)  # back to `context` tokens, so the next call measures the same step
        return logits[:, -1].argmax(-1)

    return step


def _drop_last(cache) -> None:
    """cache.crop(-1). transformers 5.17's StaticLayer has no crop (5.24 has): there rewind its fill count, which is
    all 5.24's StaticLayer.crop does; the next update overwrites the stale slot."""
    for layer in cache.layers:
        if hasattr(layer, "crop"):
            layer.crop(-1)
        else:
            layer.cumulative_length.sub_(1)


def _record_ratio(info: dict, key: str, group: str, other: str, context, ours_median: float) -> None:
    theirs = _MEDIANS.get((group, other, context))
    if theirs is not None:
        info["metrics"][key] = theirs / ours_median


@pytest.mark.benchmark(group="generation-decode")
@pytest.mark.parametrize("provider", DECODE)
def test_decode(bench, device, size, provider, context):
    hf, ours = _models(size, device.type)
    ids = _prompt(context + 1, ours.config.vocab_size, device)
    with torch.no_grad():
        step = _decode_step(provider, hf, ours, ids)

    def fn():
        with torch.no_grad():
            return step()

    info = bench(
        fn,
        variant=provider,
        params={"context": context, "batch": 1, "params_M": round(sum(p.numel() for p in ours.parameters()) / 1e6, 1)},
        sweep="context",
        dtype=_dtype(device),
        baseline=provider == "ours-no-cache",
        reference=provider == "transformers-dynamic",
        tokens=1,
        plot=("throughput",),
    )
    median = bench.benchmark.stats.stats.median
    _MEDIANS[("decode", provider, context)] = median
    if provider != "ours-no-cache":
        achieved = _bytes_per_token(ours, context) / median
        roofline = _matvec_bandwidth(device.type)
        info["metrics"].update(
            {"GB/s": achieved / 1e9, "matvec GB/s": roofline / 1e9, "% of matvec": 100 * achieved / roofline}
        )
    if provider == "ours-cache":
        _record_ratio(info, "x no-cache", "decode", "ours-no-cache", context, median)
        _record_ratio(info, "x transformers", "decode", "transformers-dynamic", context, median)


@pytest.mark.benchmark(group="generation-prefill")
@pytest.mark.parametrize("provider", PREFILL)
def test_prefill(bench, device, size, provider, context):
    import transformers

    hf, ours = _models(size, device.type)
    ids = _prompt(context, ours.config.vocab_size, device)

    def fn():
        with torch.no_grad():
            if provider == "ours-cache":
                return ours(ids, cache=ours.new_cache(1, context + 1), last_only=True)
            if provider == "transformers-dynamic":
                cache = transformers.DynamicCache(config=hf.config)
            else:
                cache = transformers.StaticCache(config=hf.config, max_cache_len=context + 1)
            return hf(ids, **_with_cache(hf, cache), use_cache=True, logits_to_keep=1).logits

    bench(
        fn,
        variant=provider,
        params={"context": context, "batch": 1},
        sweep="context",
        dtype=_dtype(device),
        reference=provider == "transformers-dynamic",
        tokens=context,
        metrics=_cache_metrics(ours, context + 1) if provider == "ours-cache" else None,
    )


@pytest.mark.benchmark(group="generation-generate")
@pytest.mark.parametrize("provider", GENERATE_VARIANTS)
def test_generate(bench, device, size, provider):
    hf, ours = _models(size, device.type)
    prompt_len, new_tokens = GENERATE[size]
    ids = _prompt(prompt_len, ours.config.vocab_size, device)
    if provider == "ours-cache":

        def fn():
            return generate(ours, ids, max_new_tokens=new_tokens)
    else:
        # Eager on both sides: transformers would torch.compile a static-cache generate on CUDA by default.
        extra = {"cache_implementation": "static"} if provider == "transformers-static" else {}

        def fn():
            return hf.generate(ids, max_new_tokens=new_tokens, do_sample=False, disable_compile=True, **extra)

    info = bench(
        fn,
        variant=provider,
        params={"prompt": prompt_len, "new_tokens": new_tokens, "batch": 1},
        dtype=_dtype(device),
        reference=provider == "transformers-dynamic",
        tokens=new_tokens,
    )
    median = bench.benchmark.stats.stats.median
    _MEDIANS[("generate", provider, None)] = median
    if provider == "ours-cache":
        _record_ratio(info, "x transformers", "generate", "transformers-dynamic", None, median)
        _record_ratio(info, "x transformers-static", "generate", "transformers-static", None, median)
