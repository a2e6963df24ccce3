"""KV caching: decode latency per token against context length, prefill, and end-to-end generate().

Variants, on the same weights: ours with the static cache, ours without a cache (every step reruns the whole
sequence: the baseline), transformers with its default `DynamicCache` (the reference) and with `StaticCache`;
for the decode step also ours replayed as a CUDA graph, ours compiled (gpt-fast's recipe: torch.compile of the
one-token step over a static cache, mode="reduce-overhead" on CUDA, the default mode on CPU) and transformers'
StaticCache step compiled the same way. The roof a batch-1 decode is judged against is measured in the same run:
`matvec (roof)`, one matrix-vector product over a matrix of the decode step's weight bytes (every weight but the
embedding table, in the model's dtype), timed by the same fixture in the same way; each row's "% of matvec" is
its GB/s (the step's bytes over its median time) over that row's GB/s at the same context.

- `generation-decode`: one decode step (one token in, its last-position logits out) after `context` tokens are
  cached; the cache is filled outside the timed call and each call overwrites the same slot. At batch 1 the
  step time is the per-token latency and tokens/s is its inverse. bytes = what a batch-1 step must read: every
  weight but the embedding table (one row of it) plus the K and V of context + 1 slots (the cache's own `nbytes`
  for context + 1 tokens: impl.generation.cache's formula), so "% of roof" is against the measured copy
  bandwidth (the memory roof gpt-fast reports its decode against), "% of matvec" against the in-run matvec.
  flops = the step's matmuls and attention (impl.common.roofline). L2 flushed before every call on CUDA. The
  CUDA-graph row is recorded as skipped on CPU.
- `generation-prefill`: the prompt in one pass, cache allocation included; the peak memory column holds the
  cache, recorded beside the formula 2 x layers x kv_heads x head_dim x max_tokens x batch x bytes.
- `generation-generate`: `generate()` against transformers' `generate(do_sample=False)`, batch 1, a short prompt,
  tokens/s of new tokens; eager (transformers with its dynamic and its static cache) and compiled (ours with
  `compile=True`; transformers' static cache with its own automatic compile, forced on CPU through a
  `CompileConfig` whose `_compile_all_devices` is set, mode "default" there and "reduce-overhead" on CUDA, as
  ours). Metrics: "x transformers" (their dynamic-cache generate's median time over ours: the 1.5x target),
  "x transformers-static (compiled)" for the compiled row, and "% of matvec": the new tokens x the decode
  bytes at the mean context, over the median time (prefill included), against the group's own matvec row.
Expected: decode and prefill rows are compared with transformers' last-position logits for the same tokens (a
cache-free forward of the reference model); generate rows with transformers' greedy tokens, in fp32 only.
"""

import inspect

import pytest
import torch

from impl.common import MemoryMeter
from impl.common.roofline import attention_flops, gemm_flops
from impl.generation import Llama, generate

# The model per --size. small: 34.0M parameters (12.3M of them in the embedding table), fp32 on CPU; full: the
# 1B-parameter shape the GPU target (>= 80% of HBM bandwidth at batch 1, bf16, CUDA graphs) is stated for.
MODELS = {
    "smoke": dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "small": dict(vocab_size=32000, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                  num_attention_heads=6, num_key_value_heads=2),
    "full": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=8),  # 1.1B parameters (TinyLlama's shape, 16 layers)
}  # fmt: skip
CONTEXTS = {"smoke": [32, 64], "small": [64, 128, 256, 512, 1024], "full": [512, 1024, 2048, 4096, 8192]}
COMPILED_CONTEXTS = {"smoke": [32], "small": [64, 256, 1024], "full": [512, 2048, 8192]}  # compile time per row
GENERATE = {"smoke": (8, 8), "small": (32, 32), "full": (128, 128)}  # (prompt tokens, new tokens)
DECODE = ["matvec (roof)", "ours-no-cache", "transformers-dynamic", "transformers-static",
          "transformers-static (compiled)", "ours-cache", "ours-cache (CUDA graph)",
          "ours-cache (compiled)"]  # fmt: skip
PREFILL = ["transformers-dynamic", "transformers-static", "ours-cache"]
# The roof and the references first: ours read their medians for the ratio metrics.
GENERATE_VARIANTS = ["matvec (roof)", "transformers-dynamic", "transformers-static", "transformers-static (compiled)",
                     "ours-cache", "ours-cache (compiled)"]  # fmt: skip
_MEDIANS: dict[str, float] = {}  # generate variant -> median seconds, for the ratio metrics
_MATVEC_GBS: dict[object, float] = {}  # context (decode) or "generate" -> the matvec row's GB/s


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """context per --size; the decode step's compiled variants only at COMPILED_CONTEXTS (compile time)."""
    if "context" not in metafunc.fixturenames:
        return
    size = metafunc.config.getoption("--size")  # resolved once, in the root conftest
    if "provider" in metafunc.fixturenames and metafunc.function.__name__ == "test_decode":
        pairs = [
            pytest.param(p, n, id=f"{p.replace(' ', '_')}-context={n}")
            for p in DECODE
            for n in CONTEXTS[size]
            if "(compiled)" not in p or n in COMPILED_CONTEXTS[size]
        ]
        metafunc.parametrize(("provider", "context"), pairs)
    else:
        metafunc.parametrize("context", CONTEXTS[size], ids=[f"context={n}" for n in CONTEXTS[size]])


def _dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@pytest.fixture(scope="module")
def models(size: str, device: torch.device):
    """(transformers model, ours) on the same weights; built once per module, not once per row."""
    import transformers

    max_context = max(CONTEXTS[size]) + sum(GENERATE[size]) + 8
    config = transformers.LlamaConfig(
        **MODELS[size], max_position_embeddings=max_context, bos_token_id=None, eos_token_id=None, pad_token_id=None
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialised on the device: no host copy of the weights
        hf = transformers.LlamaForCausalLM(config).to(_dtype(device)).eval()
    return hf, Llama.from_hf(hf)


def _compile_kwargs(device) -> dict:
    """gpt-fast's recipe: CUDA graphs through inductor on CUDA; the default mode on CPU (no graphs there)."""
    return {"mode": "reduce-overhead"} if device.type == "cuda" else {}


def _with_cache(hf, cache) -> dict:
    """The forward's cache keyword: `cache` in transformers 5.24 (which deprecates `past_key_values`), still
    `past_key_values` in 5.17 (the GPU image); there an unknown `cache=` would be swallowed by **kwargs, unused."""
    name = "cache" if "cache" in inspect.signature(type(hf).forward).parameters else "past_key_values"
    return {name: cache}


def _weight_bytes(model: Llama) -> int:
    """Weight bytes a batch-1 decode step reads: every weight but the embedding table (one row of it)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.config.tie_word_embeddings:  # a tied table is read whole, as the lm_head
        weights -= model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    return weights


def _matvec(model: Llama) -> tuple[torch.Tensor, torch.Tensor]:
    """A (rows, hidden) matrix of the decode step's weight bytes in the model's dtype and device, and a vector:
    the product reads every byte once, as a batch-1 decode step reads its weights, so its GB/s is the roof a
    decode reaches at best on this device, in this run."""
    weight = model.lm_head.weight
    rows = _weight_bytes(model) // (model.config.hidden_size * weight.element_size())
    g = torch.Generator(device=weight.device).manual_seed(0)
    matrix = torch.randn(rows, model.config.hidden_size, generator=g, device=weight.device, dtype=weight.dtype)
    return matrix, torch.randn(model.config.hidden_size, generator=g, device=weight.device, dtype=weight.dtype)


def _bench_matvec(bench, model: Llama, params: dict, sweep: str | None, key) -> None:
    """The `matvec (roof)` row: tokens/s is the token rate of a step that read only its weights at this speed."""
    matrix, vector = _matvec(model)
    nbytes = matrix.nbytes + vector.nbytes
    info = bench(lambda: matrix @ vector, variant="matvec (roof)", params=params, sweep=sweep,
                 dtype=matrix.dtype, flops=gemm_flops(1, matrix.shape[0], matrix.shape[1]), bytes=nbytes, tokens=1,
                 flush_l2=True)  # fmt: skip
    median = _median(info)
    if median is not None:
        _MATVEC_GBS[key] = nbytes / median / 1e9
        info["metrics"]["GB/s"] = _MATVEC_GBS[key]


def _record_bandwidth(info: dict, nbytes: float, key) -> None:
    """GB/s of the row (bytes over its median time) and its % of the in-run matvec's GB/s."""
    median = _median(info)
    if median is None:
        return
    info["metrics"]["GB/s"] = nbytes / median / 1e9
    if key in _MATVEC_GBS:
        info["metrics"]["% of matvec"] = 100 * info["metrics"]["GB/s"] / _MATVEC_GBS[key]


def _step_flops(model: Llama, q_len: int, k_len: int, last_only: bool = True) -> float:
    """FLOPs of a forward over q_len new tokens attending to k_len slots: every projection's GEMM, causal
    attention per layer, and the lm_head for the last position (or all, without last_only)."""
    c = model.config
    blocks = sum(gemm_flops(q_len, w.shape[0], w.shape[1]) for name, w in model.layers.named_parameters()
                 if name.endswith("proj.weight"))  # fmt: skip
    attention = c.num_hidden_layers * attention_flops(1, c.num_attention_heads, q_len, k_len, c.head_dim, causal=True)
    head = gemm_flops(1 if last_only else q_len, c.vocab_size, c.hidden_size)
    return blocks + attention + head


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
    """A callable running one decode step at position ids.shape[1] - 1, its cache filled with the rest; it
    returns the last position's logits (1, vocab). Every call writes the same slot: static shapes throughout."""
    import transformers

    context = ids.shape[1] - 1
    last, position = ids[:, -1:], torch.full((1, 1), context, device=ids.device)
    if provider == "ours-no-cache":
        return lambda: ours(ids, last_only=True)[:, -1]
    if provider.startswith("ours-cache"):
        cache = ours.new_cache(1, context + 1)
        ours(ids[:, :-1], cache=cache)
        if provider.endswith("(compiled)") and ids.is_cuda:  # fixed addresses, so inductor's CUDA graphs keep it
            for t in cache.keys + cache.values:
                torch._dynamo.mark_static_address(t)
        return lambda: ours(last, position, cache=cache, start=context)[:, -1]
    if provider == "transformers-dynamic":
        cache = transformers.DynamicCache(config=hf.config)
    else:
        cache = transformers.StaticCache(config=hf.config, max_cache_len=context + 1)
    hf(ids[:, :-1], **_with_cache(hf, cache), use_cache=True)

    def step():
        logits = hf(last, **_with_cache(hf, cache), position_ids=position, use_cache=True, logits_to_keep=1).logits
        _drop_last(cache)  # back to `context` tokens, so the next call measures the same step
        return logits[:, -1]

    return step


def _median(info: dict) -> float | None:
    """The row's median seconds; None under --benchmark-disable (nothing timed)."""
    return info.get("quantiles_s", {}).get("p50")


def _drop_last(cache) -> None:
    """cache.crop(-1). transformers 5.17's StaticLayer has no crop (5.24 has): there rewind its fill count, which is
    all 5.24's StaticLayer.crop does; the next update overwrites the stale slot."""
    for layer in cache.layers:
        if hasattr(layer, "crop"):
            layer.crop(-1)
        else:
            layer.cumulative_length.sub_(1)


def _record_ratio(info: dict, key: str, other: str) -> None:
    ours, theirs = _median(info), _MEDIANS.get(other)
    if ours is not None and theirs is not None:
        info["metrics"][key] = theirs / ours


@pytest.mark.benchmark(group="generation-decode")
def test_decode(bench, device, models, provider, context):
    hf, ours = models
    params = {"context": context, "batch": 1, "params_M": round(sum(p.numel() for p in ours.parameters()) / 1e6, 1)}
    if provider == "matvec (roof)":
        return _bench_matvec(bench, ours, params, "context", context)
    ids = _prompt(context + 1, ours.config.vocab_size, device)
    with torch.no_grad():
        expected = hf(ids, logits_to_keep=1).logits[:, -1]  # the reference, without a cache
        step = _decode_step(provider, hf, ours, ids)

    def fn():
        with torch.no_grad():
            return step()

    compiled = provider.endswith("(compiled)")
    if compiled:  # compiled rows share the fixture's wrapper code object: a ninth would hit
        # dynamo's recompile limit (8) and silently run eagerly
        torch._dynamo.reset()
    no_cache = provider == "ours-no-cache"
    kv_bytes = 0 if no_cache else ours.new_cache(1, context + 1).nbytes  # K and V of every slot the step reads
    info = bench(  # speed-ups against no-cache and transformers: the report's "speed-up vs" columns
        fn,
        variant=provider,
        params=params,
        sweep="context",
        dtype=_dtype(device),
        baseline=no_cache,
        reference=provider == "transformers-dynamic",
        flops=_step_flops(ours, context + 1 if no_cache else 1, context + 1),
        bytes=_weight_bytes(ours) + kv_bytes,
        tokens=1,
        plot=("throughput",),
        expected=expected,
        flush_l2=True,
        compile=_compile_kwargs(device) if compiled else False,
        cuda_graph=provider.endswith("(CUDA graph)"),
    )
    _record_bandwidth(info, _weight_bytes(ours) + kv_bytes, context)


@pytest.mark.benchmark(group="generation-prefill")
@pytest.mark.parametrize("provider", PREFILL)
def test_prefill(bench, device, models, provider, context):
    import transformers

    hf, ours = models
    ids = _prompt(context, ours.config.vocab_size, device)
    with torch.no_grad():
        expected = hf(ids, logits_to_keep=1).logits  # (1, 1, vocab), the reference without a cache

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
        flops=_step_flops(ours, context, context),
        tokens=context,
        metrics=_cache_metrics(ours, context + 1) if provider == "ours-cache" else None,
        expected=expected,
    )


def _generate_call(provider: str, hf, ours: Llama, ids: torch.Tensor, new_tokens: int):
    """The generate call of one row; compiled rows are compiled (called once) here, outside the measurement."""
    import transformers

    if provider.startswith("ours-cache"):
        compiled = provider.endswith("(compiled)")
        fn = lambda: generate(ours, ids, max_new_tokens=new_tokens, compile=compiled)
    else:
        extra = {"disable_compile": True}  # eager: transformers would compile a static-cache generate on CUDA
        if provider != "transformers-dynamic":
            extra["cache_implementation"] = "static"
        if provider.endswith("(compiled)"):
            # transformers compiles only on accelerators unless its CompileConfig says otherwise; the mode is
            # ours (reduce-overhead on CUDA, default on CPU)
            config = transformers.CompileConfig(mode=_compile_kwargs(ids.device).get("mode", "default"))
            config._compile_all_devices = True
            extra = {"cache_implementation": "static", "compile_config": config, "disable_compile": False}
        fn = lambda: hf.generate(ids, max_new_tokens=new_tokens, do_sample=False, **extra)
    if provider.endswith("(compiled)"):
        with torch.no_grad():
            fn()
    return fn


@pytest.mark.benchmark(group="generation-generate")
@pytest.mark.parametrize("provider", GENERATE_VARIANTS)
def test_generate(bench, device, size, models, provider):
    hf, ours = models
    prompt_len, new_tokens = GENERATE[size]
    params = {"prompt": prompt_len, "new_tokens": new_tokens, "batch": 1}
    if provider == "matvec (roof)":
        return _bench_matvec(bench, ours, params, None, "generate")
    ids = _prompt(prompt_len, ours.config.vocab_size, device)
    expected = None
    if device.type == "cpu":
        # Greedy tokens are compared in fp32 only: in bf16 a random-init model's near-tied logits let two correct
        # implementations pick different tokens, after which the continuations share nothing (the decode and
        # prefill rows check the logits themselves on every device).
        expected = hf.generate(ids, max_new_tokens=new_tokens, do_sample=False, disable_compile=True)
    if provider.endswith("(compiled)"):
        torch._dynamo.reset()  # a fresh compile per row, below the recompile limit
    info = bench(
        _generate_call(provider, hf, ours, ids, new_tokens),
        variant=provider,
        params=params,
        dtype=_dtype(device),
        reference=provider == "transformers-dynamic",
        tokens=new_tokens,
        expected=expected,
    )
    _MEDIANS[provider] = _median(info)
    # What the decode steps read, at the mean context: the prefill's time is in the median, not in these bytes.
    step_bytes = _weight_bytes(ours) + _cache_formula(ours, prompt_len + new_tokens // 2)
    _record_bandwidth(info, new_tokens * step_bytes, "generate")
    if provider.startswith("ours-cache"):
        _record_ratio(info, "x transformers", "transformers-dynamic")
        static = "transformers-static (compiled)" if provider.endswith("(compiled)") else "transformers-static"
        _record_ratio(info, f"x {static}", static)
