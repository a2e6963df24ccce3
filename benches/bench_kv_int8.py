"""The int8 KV cache against the full-precision cache: bytes, decode step time and logit error per context length.

Group `generation-int8-cache`, one row per (cache, context), on the same weights and prompt (the model of
bench_generation's sizes: 34M parameters at --size small, fp32 on CPU; bf16 on CUDA):
- `fp-cache` (the reference): `KVCache(..., dtype=the model's)`;
- `int8-cache`: `KVCache(..., quantized=True)`: int8 codes, one model-dtype scale per (token, head).
The timed call is one decode step after `context` cached tokens (each call writes the same slot), as in
`generation-decode`. The int8 step quantizes the new token and dequantizes the whole prefix for attention, so on
this unfused path it moves more bytes than the fp step, not fewer (a fused kernel would read the codes directly);
`bytes` is what a step must read at the least (the weights but the embedding table, plus the cache's `nbytes` for
context + 1 slots), so "% of roof" shows how far the unfused path is from that. The peak memory column is the
step's own transient: for the int8 cache, one layer's keys and values dequantized (the cache itself is allocated
before the step).

Metrics: `cache MiB` (the cache of context + 1 slots as the memory meter sees its allocation), `formula MiB`
(`kv_cache_bytes`, which the measured bytes must equal: the row fails otherwise), `x fp bytes` (int8 over fp,
both measured), `x bf16 bytes` (int8 with bf16 scales over a bf16 cache of these sizes, by the formula: (head_dim
+ 2) / (2 head_dim)); on int8 rows, `max logit error` and `mean logit error` of the step's logits against the fp
cache's, `bf16-rounded max error` (the fp cache with its keys and values rounded to bf16: the reference
quantizer the test bounds the int8 error by, 8x; fp32 models only), and `greedy N` (the first new token where
greedy decoding from the `context`-token prompt with the int8 cache leaves the fp cache's tokens; GREEDY[size]
means none of them did) with `greedy margin` (the fp logits' top-1/top-2 gap at that token: a near-tie, or not).
"""

import pytest
import torch

from impl.common import MemoryMeter
from impl.generation import KVCache, Llama, LlamaConfig, kv_cache_bytes

# The model per --size, as in bench_generation (small: 34.0M parameters, 12.3M of them the embedding table).
MODELS = {
    "smoke": dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "small": dict(vocab_size=32000, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                  num_attention_heads=6, num_key_value_heads=2),
    "full": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                 num_attention_heads=16, num_key_value_heads=4),
}  # fmt: skip
SWEEPS = {"context": {"smoke": [32, 64], "small": [64, 256, 1024], "full": [512, 2048, 8192]}}
GREEDY = {"smoke": 8, "small": 32, "full": 64}  # new tokens compared per context
VARIANTS = ["fp-cache", "int8-cache"]
ESTIMATED_S = {"smoke": 10, "small": 90, "full": 60}
MIB = 2**20


def _dtype(device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@pytest.fixture(scope="module")
def model(size: str, device: torch.device) -> Llama:
    config = LlamaConfig(**MODELS[size], max_position_embeddings=max(SWEEPS["context"][size]) + GREEDY[size] + 8)
    torch.manual_seed(0)
    with torch.device(device):
        return Llama(config).to(_dtype(device)).eval()


def _sizes(model: Llama, max_tokens: int) -> dict:
    c = model.config
    return dict(layers=c.num_hidden_layers, batch=1, kv_heads=c.num_key_value_heads, max_tokens=max_tokens,
                head_dim=c.head_dim)  # fmt: skip


def _cache(model: Llama, max_tokens: int, cls=KVCache, quantized: bool = False) -> KVCache:
    weight = model.lm_head.weight
    return cls(**_sizes(model, max_tokens), dtype=weight.dtype, device=weight.device, quantized=quantized)


class _BF16Cache(KVCache):
    """The fp cache with its keys and values rounded to bfloat16 by torch (the tests' reference quantizer)."""

    def update(self, layer, start, k, v):
        return super().update(layer, start, k.bfloat16().to(k.dtype), v.bfloat16().to(v.dtype))


def _prompt(length: int, vocab: int, device) -> torch.Tensor:
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(length)).to(device)


@torch.no_grad()
def _step_logits(model: Llama, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Prefill all but the last token into `cache`, then the last one as a decode step: its logits (vocab,)."""
    context = ids.shape[1] - 1
    model(ids[:, :-1], cache=cache, last_only=True)
    return model(ids[:, -1:], cache=cache, start=context)[0, -1].float()


@torch.no_grad()
def _greedy(model: Llama, ids: torch.Tensor, new: int, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
    """`new` greedy tokens after the prompt `ids` (1, T) through `cache`, and the logits each came from."""
    logits = [model(ids, cache=cache, last_only=True)[0, -1]]
    tokens = []
    for step in range(new):
        tokens.append(logits[-1].argmax())
        if step < new - 1:
            logits.append(model(tokens[-1].view(1, 1), cache=cache, start=ids.shape[1] + step)[0, -1])
    return torch.stack(tokens), torch.stack(logits).float()


def _error_metrics(model: Llama, context: int, size: str, device) -> dict:
    ids = _prompt(context + 1, model.config.vocab_size, device)
    fp = _step_logits(model, ids, _cache(model, context + 1))
    error = (_step_logits(model, ids, _cache(model, context + 1, quantized=True)) - fp).abs()
    metrics = {"max logit error": error.max().item(), "mean logit error": error.mean().item()}
    if _dtype(device) == torch.float32:
        metrics["bf16-rounded max error"] = (_step_logits(model, ids, _cache(model, context + 1, _BF16Cache)) - fp
                                             ).abs().max().item()  # fmt: skip
    new = GREEDY[size]
    prompt = ids[:, :context]
    fp_tokens, fp_logits = _greedy(model, prompt, new, _cache(model, context + new))
    int8_tokens, _ = _greedy(model, prompt, new, _cache(model, context + new, quantized=True))
    differs = (fp_tokens != int8_tokens).nonzero()
    n = int(differs[0]) if len(differs) else new
    metrics["greedy N"] = n
    if n < new:
        top2 = fp_logits[n].topk(2).values
        metrics["greedy margin"] = (top2[0] - top2[1]).item()
    return metrics


@pytest.mark.benchmark(group="generation-int8-cache")
@pytest.mark.parametrize("variant", VARIANTS)
def test_int8_cache(bench, device, size, model, variant, context):
    quantized = variant == "int8-cache"
    dtype = model.lm_head.weight.dtype
    with MemoryMeter(device) as mem:
        cache = _cache(model, context + 1, quantized=quantized)
    formula = kv_cache_bytes(**_sizes(model, context + 1), dtype=dtype, quantized=quantized)
    if not mem.current == cache.nbytes == formula:
        raise AssertionError(f"{variant}: measured {mem.current} B, nbytes {cache.nbytes} B, formula {formula} B")
    metrics = {"cache MiB": mem.current / MIB, "formula MiB": formula / MIB}
    if quantized:
        bf16 = kv_cache_bytes(**_sizes(model, context + 1), dtype=torch.bfloat16)
        int8_bf16 = kv_cache_bytes(**_sizes(model, context + 1), dtype=torch.bfloat16, quantized=True)
        with MemoryMeter(device) as fp_mem:
            _cache(model, context + 1)
        metrics |= {"x fp bytes": mem.current / fp_mem.peak, "x bf16 bytes": int8_bf16 / bf16}
        metrics |= _error_metrics(model, context, size, device)

    ids = _prompt(context + 1, model.config.vocab_size, device)
    last, position = ids[:, -1:], torch.full((1, 1), context, device=device)
    with torch.no_grad():
        model(ids[:, :-1], cache=cache, last_only=True)

    def step():
        with torch.no_grad():
            return model(last, position, cache=cache, start=context)[:, -1]

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.config.tie_word_embeddings:  # a batch-1 step reads one row of an untied embedding table
        weights -= model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    bench(
        step,
        variant=variant,
        params={"context": context, "batch": 1},
        sweep="context",
        dtype=dtype,
        reference=not quantized,
        bytes=weights + cache.nbytes,
        tokens=1,
        metrics=metrics,
        plot=("throughput", "cache MiB", "max logit error"),
    )
