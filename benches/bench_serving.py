"""Serving many requests: continuous batching over a paged KV cache against static batching, same KV memory.

The trace: `REQUESTS[size]` requests, all queued at time 0 (an offline batch), prompt and output lengths drawn
from long-tailed (log-normal) distributions with a fixed seed, so most requests are short and a few are long:
the case where a static batch waits for its longest member and pads every row to it.

- `generation-continuous-batching`, swept over `concurrency` c (requests decoded at once):
  - `static batching` (baseline): c requests at a time in arrival order, left-padded, one static `KVCache` of c
    rows x the slots its widest batch needs (that batch's longest prompt + longest output), each batch decoding
    until its longest output is done;
  - `continuous batching` (ours): `ContinuousBatcher` with at most c running requests, a paged pool of the same
    bytes (in blocks of 16), admitting a request as soon as one retires;
  - `continuous batching (pool-bound)` (ours): the same pool with no cap on running requests, so paging turns the
    slots static batching leaves empty into more concurrent requests;
  - `transformers generate_batch` (the reference): transformers' own continuous batching, paged cache of the
    same pages (page_size 16, same number of blocks), at most c requests per batch, requests added with their own
    max_new_tokens to its manager; its manager's start and stop are inside the timed call.
  Throughput is generated tokens/s (each request's own outputs; padding and a static batch's idle rows do not
  count). Metrics: p50/p99 time to first token (from the moment the trace is queued) and time per output token
  (after the first) over requests, in ms; KV bytes reserved and, for the paged rows, in use at the peak step.
  Greedy outputs of every row are checked equal to static batching's (fp32 on CPU).
- `generation-paged-memory`, swept over `block_size` at one concurrency c: "KV MiB held" is, for the paged cache,
  the blocks in use at its busiest step x the pool's bytes per block (the pool metered with
  impl.common.MemoryMeter), and for static batching its metered cache; "x longest-per-slot static" compares it
  with a static cache of c rows x the longest request (prompt + output, metered), the least any static cache
  for c requests of this trace must hold; "fragmentation at peak" is the share of the held slots left empty in
  the sequences' last blocks then (Kwon et al. 2023 sec. 4.2). The time is one run of the trace.
"""

import inspect
import math
import time

import pytest
import torch

from impl.common import MemoryMeter
from impl.generation import Llama
from impl.generation.batching import ContinuousBatcher
from impl.generation.paged import PagedKVCache

ESTIMATED_S = {"smoke": 40, "small": 180, "full": 120}  # seconds per --size, for the runner's budget

MODELS = {
    "smoke": dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2),
    "full": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                 num_attention_heads=16, num_key_value_heads=4),
}  # fmt: skip
# (requests, median prompt, median output, longest prompt, longest output) of the log-normal trace per --size
TRACE = {"smoke": (8, 12, 8, 48, 32), "small": (16, 24, 16, 160, 80), "full": (256, 128, 64, 1024, 512)}
SWEEPS = {
    "concurrency": {"smoke": [2, 4], "small": [2, 4, 8], "full": [8, 32, 128]},
    "block_size": {"smoke": [16], "small": [4, 16, 64], "full": [8, 16, 64]},
}
MEMORY_CONCURRENCY = {"smoke": 4, "small": 8, "full": 32}
BLOCK_SIZE = 16
VARIANTS = ["static batching", "continuous batching", "continuous batching (pool-bound)", "transformers generate_batch"]


def _dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@pytest.fixture(scope="module")
def models(size: str, device: torch.device):
    """(transformers model, ours) on the same weights, built once per module."""
    import transformers

    _, _, _, long_prompt, long_output = TRACE[size]
    config = transformers.LlamaConfig(**MODELS[size], max_position_embeddings=long_prompt + long_output,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.LlamaForCausalLM(config).to(_dtype(device)).eval()
    return hf, Llama.from_hf(hf)


@pytest.fixture(scope="module")
def trace(size: str) -> list[tuple[list[int], int]]:
    """(prompt, max_new_tokens) per request: log-normal lengths (sigma 1: a long tail), clipped to the maxima."""
    n, prompt_median, output_median, long_prompt, long_output = TRACE[size]
    g = torch.Generator().manual_seed(0)

    def lengths(median, longest):
        drawn = torch.empty(n).log_normal_(math.log(median), 1.0, generator=g)
        return drawn.round().clamp(1, longest).long().tolist()

    prompts = [torch.randint(0, MODELS[size]["vocab_size"], (p,), generator=g).tolist()
               for p in lengths(prompt_median, long_prompt)]  # fmt: skip
    return list(zip(prompts, lengths(output_median, long_output), strict=True))


@pytest.fixture(scope="module")
def expected(models, size, trace) -> list[list[int]]:
    """Static batching's greedy outputs (padding changes no token): what every row must produce."""
    return _static_batching(models[1], trace, max(SWEEPS["concurrency"][size]))[0]


def _longest(trace) -> int:
    """Slots of the longest request (prompt + output)."""
    return max(len(p) + n for p, n in trace)


def _static_len(trace, concurrency: int) -> int:
    """Slots per row static batching needs: its widest batch's longest prompt plus its longest output."""
    batches = [trace[i : i + concurrency] for i in range(0, len(trace), concurrency)]
    return max(max(len(p) for p, _ in b) + max(n for _, n in b) for b in batches)


@torch.no_grad()
def _static_batching(model: Llama, trace, concurrency: int):
    """Batches of `concurrency` requests in arrival order, left-padded, through one static cache of concurrency
    rows x `_static_len` slots; (tokens per request, (queued, token times) per request, KV bytes)."""
    device = model.lm_head.weight.device
    queued = time.perf_counter()
    cache = model.new_cache(concurrency, _static_len(trace, concurrency))
    outputs, times = [], []
    for first in range(0, len(trace), concurrency):
        batch = trace[first : first + concurrency]
        width = max(len(p) for p, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.bool)
        for row, (p, _) in enumerate(batch):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = True
        ids, mask = ids.to(device), mask.to(device)
        if len(batch) < concurrency:  # the last, partial batch: the cache's first rows
            ids = torch.cat([ids, ids.new_zeros(concurrency - len(batch), width)])
            mask = torch.cat([mask, mask.new_ones(concurrency - len(batch), width)])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(ids, positions, cache=cache, key_mask=mask, last_only=True)[:, -1]
        tokens, stamps = [[] for _ in batch], [[] for _ in batch]
        for step in range(max(n for _, n in batch)):
            next_token = logits.argmax(-1)
            now = time.perf_counter()
            for row, (_, n) in enumerate(batch):
                if step < n:
                    tokens[row].append(int(next_token[row]))
                    stamps[row].append(now)
            mask = torch.cat([mask, mask.new_ones(concurrency, 1)], dim=1)
            positions = positions[:, -1:] + 1
            logits = model(next_token[:, None], positions, cache=cache, start=width + step, key_mask=mask)[:, -1]
        outputs += tokens
        times += [(queued, s) for s in stamps]
    return outputs, times, cache.nbytes


def _continuous(model: Llama, trace, concurrency: int | None, num_blocks: int, block_size: int):
    batcher = ContinuousBatcher(model, num_blocks=num_blocks, block_size=block_size, max_running=concurrency)
    ids = [batcher.submit(p, n) for p, n in trace]
    done = batcher.run()
    outputs = [done[i].tokens for i in ids]
    times = [(done[i].submitted_at, done[i].token_times) for i in ids]
    return outputs, times, batcher


def _transformers(hf, trace, concurrency: int, num_blocks: int):
    """transformers' continuous batching: its manager, each request with its own max_new_tokens."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    config = GenerationConfig(do_sample=False, eos_token_id=None, max_new_tokens=max(n for _, n in trace))
    # the page size is `page_size` in transformers 5.24 and `block_size` in 5.17 (the GPU image's)
    page = "page_size" if "page_size" in inspect.signature(ContinuousBatchingConfig).parameters else "block_size"
    cb = ContinuousBatchingConfig(**{page: BLOCK_SIZE}, num_blocks=num_blocks, max_requests_per_batch=concurrency,
                                  max_batch_tokens=512, allow_block_sharing=False)  # fmt: skip
    results = {}
    with hf.continuous_batching_context_manager(generation_config=config, continuous_batching_config=cb,
                                                warmup=False, timeout=5) as manager:  # fmt: skip
        for i, (p, n) in enumerate(trace):
            manager.add_request(p, request_id=f"r{i}", max_new_tokens=n, record_timestamps=True)
        while len(results) < len(trace):
            out = manager.get_result(timeout=10)
            if out is None:
                raise RuntimeError("transformers' continuous batching stopped before finishing the trace")
            if out.is_finished():
                results[out.request_id] = out
    outs = [results[f"r{i}"] for i in range(len(trace))]
    return [list(o.generated_tokens) for o in outs], [(o.created_time, o.timestamps) for o in outs]


def _latency_metrics(times) -> dict:
    """p50/p99 time to first token and time per output token over requests, in ms."""
    ttft = torch.tensor([stamps[0] - queued for queued, stamps in times], dtype=torch.float64)
    tpot = torch.tensor([(s[-1] - s[0]) / (len(s) - 1) for _, s in times if len(s) > 1], dtype=torch.float64)
    q = torch.tensor([0.5, 0.99], dtype=torch.float64)
    (t50, t99), (p50, p99) = ttft.quantile(q).tolist(), tpot.quantile(q).tolist()
    return {"p50 TTFT ms": 1e3 * t50, "p99 TTFT ms": 1e3 * t99, "p50 TPOT ms": 1e3 * p50, "p99 TPOT ms": 1e3 * p99}


@pytest.mark.benchmark(group="generation-continuous-batching")
@pytest.mark.parametrize("variant", VARIANTS)
def test_serving(bench, device, size, models, trace, expected, variant, concurrency):
    hf, ours = models
    num_blocks = concurrency * _static_len(trace, concurrency) // BLOCK_SIZE  # the static cache's bytes, in blocks
    generated = sum(n for _, n in trace)
    last = {}

    def run():
        if variant == "static batching":
            outputs, times, kv = _static_batching(ours, trace, concurrency)
            last.update(kv=kv)
        elif variant == "transformers generate_batch":
            outputs, times = _transformers(hf, trace, concurrency, num_blocks)
        else:
            cap = concurrency if variant == "continuous batching" else None
            outputs, times, batcher = _continuous(ours, trace, cap, num_blocks, BLOCK_SIZE)
            last.update(kv=batcher.cache.nbytes, peak=batcher.peak_used_blocks * batcher.cache.bytes_per_block,
                        preemptions=batcher.preemptions, steps=batcher.steps)  # fmt: skip
        last.update(outputs=outputs, times=times)
        return outputs

    info = bench(
        run,
        variant=variant,
        params={"concurrency": concurrency, "requests": len(trace), "blocks": num_blocks, "block": BLOCK_SIZE},
        sweep="concurrency",
        dtype=_dtype(device),
        baseline=variant == "static batching",
        reference=variant == "transformers generate_batch",
        tokens=generated,
        plot=("p99 TTFT ms", "p50 TPOT ms"),
    )
    metrics = info["metrics"]
    if variant == "transformers generate_batch" and device.type == "cpu":
        info["peak_bytes"] = None  # the CPU meter watches this thread's ops; transformers' manager runs in its own
        metrics["peak memory"] = "not measured (transformers' manager thread)"
    metrics.update(_latency_metrics(last["times"]))
    if "kv" in last:
        metrics["KV MiB reserved"] = last["kv"] / 2**20
    if "peak" in last:
        metrics.update({"KV MiB in use (peak)": last["peak"] / 2**20, "preemptions": last["preemptions"],
                        "steps": last["steps"]})  # fmt: skip
    if device.type == "cpu":  # greedy in fp32: every variant gives the same tokens
        assert last["outputs"] == expected, f"{variant}: outputs differ from static batching's"


@pytest.mark.benchmark(group="generation-paged-memory")
@pytest.mark.parametrize("variant", ["static cache", "paged cache"])
def test_paged_memory(bench, device, size, models, trace, variant, block_size):
    _, ours = models
    concurrency = MEMORY_CONCURRENCY[size]
    num_blocks = math.ceil(concurrency * _static_len(trace, concurrency) / block_size)  # static batching's bytes
    with MemoryMeter(device) as longest:
        floor_cache = ours.new_cache(concurrency, _longest(trace))
    del floor_cache
    last = {}

    def run():
        if variant == "static cache":
            outputs, _, last["kv"] = _static_batching(ours, trace, concurrency)
            return outputs
        outputs, _, last["batcher"] = _continuous(ours, trace, concurrency, num_blocks, block_size)
        return outputs

    info = bench(run, variant=variant, params={"block_size": block_size, "concurrency": concurrency},
                 sweep="block_size", dtype=_dtype(device), baseline=variant == "static cache",
                 tokens=sum(n for _, n in trace), plot=("KV MiB held",))  # fmt: skip
    if variant == "static cache":
        held = last["kv"]
    else:
        batcher = last["batcher"]
        with MemoryMeter(device) as pool:
            pool_cache = PagedKVCache(layers=ours.config.num_hidden_layers, kv_heads=ours.config.num_key_value_heads,
                                      head_dim=ours.config.head_dim, num_blocks=num_blocks, block_size=block_size,
                                      dtype=_dtype(device), device=device)  # fmt: skip
        del pool_cache
        held = batcher.peak_used_blocks * (pool.current // num_blocks)
        info["metrics"]["fragmentation at peak"] = batcher.peak_fragmentation
    info["metrics"].update({"KV MiB held": held / 2**20, "x longest-per-slot static": held / longest.current})
