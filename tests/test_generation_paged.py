"""The paged KV cache against its formula and the static cache, and one packed forward over it against
transformers' forward of each sequence alone (same weights, fp32).

Proven here: the pool's bytes measured by the memory meter equal the PagedAttention formula; block tables, the
free list and the fragmentation figure follow the block arithmetic; a packed row of several sequences (prefill
chunks after cached prefixes) through the paged cache gives each sequence the logits transformers gives it alone,
and a wrong block table or a mask that ignores the sequence boundaries is caught; a finished batch of requests
held fewer KV bytes than a static cache with one longest-request row per concurrent request.
"""

import pytest
import torch
import transformers

from impl.common import MemoryMeter, tolerance
from impl.generation import Llama
from impl.generation.batching import ContinuousBatcher, packed_causal_mask
from impl.generation.paged import PagedKVCache, paged_cache_bytes

VOCAB = 128


def hf_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, bos_token_id=None,
        eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def models():
    hf = hf_llama()
    return hf, Llama.from_hf(hf)


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_blocks, block_size", [(7, 16), (5, 3)])
def test_pool_bytes_measured_equal_formula(num_blocks, block_size, dtype):
    shape = dict(layers=3, kv_heads=2, head_dim=8)
    with MemoryMeter("cpu") as mem:
        cache = PagedKVCache(num_blocks=num_blocks, block_size=block_size, dtype=dtype, **shape)
    formula = paged_cache_bytes(num_blocks=num_blocks, block_size=block_size, dtype=dtype, **shape)
    assert mem.current == cache.nbytes == formula
    assert formula == num_blocks * block_size * 2 * 3 * 2 * 8 * (4 if dtype == torch.float32 else 2)
    # negative control: the meter sees a pool one block larger
    with MemoryMeter("cpu") as bigger:
        PagedKVCache(num_blocks=num_blocks + 1, block_size=block_size, dtype=dtype, **shape)
    assert bigger.peak != formula


def test_block_tables_free_list_and_fragmentation():
    cache = PagedKVCache(layers=1, kv_heads=1, head_dim=4, num_blocks=6)
    assert cache.block_size == 16 and cache.used_blocks == 0
    cache.reserve("a", 20)  # 2 blocks
    cache.reserve("b", 16)  # 1 block, full
    cache.prepare([("a", 20), ("b", 16)])
    assert cache.block_tables == {"a": [0, 1], "b": [2]}
    assert cache.used_bytes == 3 * cache.bytes_per_block
    assert cache.token_bytes == 36 * cache.bytes_per_block // 16
    assert cache.fragmentation == pytest.approx(1 - 36 / 48)  # 12 unused slots in a's last block
    torch.testing.assert_close(cache.slots("a", 14, 18), torch.tensor([14, 15, 16, 17]))
    assert not cache.can_reserve("c", 16 * 4) and cache.can_reserve("c", 16 * 3)
    cache.free("a")
    assert cache.used_blocks == 1 and sorted(cache.free_blocks) == [0, 1, 3, 4, 5]
    cache.reserve("c", 40)  # reuses a's freed blocks first
    assert cache.block_tables["c"] == [0, 1, 3]
    with pytest.raises(ValueError, match="needs 3 more blocks, only 2 are free"):
        cache.reserve("d", 48)


@pytest.mark.parametrize("name, value", [("block_size", 0), ("block_size", 2.0), ("block_size", "16"),
                                         ("num_blocks", 0), ("num_blocks", -3)])  # fmt: skip
def test_bad_sizes_name_the_argument(name, value):
    sizes = dict(layers=1, kv_heads=1, head_dim=4, num_blocks=4, block_size=16) | {name: value}
    with pytest.raises(ValueError, match=f"{name} must be a positive int, got"):
        PagedKVCache(**sizes)


def test_packed_mask_is_block_diagonal_causal():
    segments = [(2, 3), (0, 1), (4, 1)]  # (cached, new) per sequence
    got = packed_causal_mask(segments)[0, 0]
    # The rule written per element: query (seq r, position p) sees key (seq s, position j) iff r == s and j <= p.
    queries = [(r, cached + i) for r, (cached, new) in enumerate(segments) for i in range(new)]
    keys = [(r, j) for r, (cached, new) in enumerate(segments) for j in range(cached + new)]
    expected = torch.tensor([[r == s and j <= p for s, j in keys] for r, p in queries])
    assert torch.equal(got, expected)


def _packed_logits(ours, cache, prompts, split, mask_fn=packed_causal_mask, between=None):
    """Prefill prompts[i][:split[i]] in one packed call, then the rest in a second one; the second call's logits."""
    out = None
    for part in (0, 1):
        if part == 1 and between is not None:
            between(cache)
        feeds = [(i, p[: split[i]] if part == 0 else p[split[i] :]) for i, p in enumerate(prompts)]
        segments = [(cache.lengths.get(i, 0), len(f)) for i, f in feeds]
        for i, p in enumerate(prompts):
            cache.reserve(i, split[i] if part == 0 else len(p))
        cache.prepare([(i, len(f)) for i, f in feeds])
        ids = torch.tensor([t for _, f in feeds for t in f])[None]
        positions = torch.cat([torch.arange(c, c + n) for c, n in segments])[None]
        out = ours(ids, positions, cache=cache, attention_mask=mask_fn(segments))[0]
    return out


def _leaky_mask(segments):
    """Each sequence's own causal mask, but every key of the other sequences visible too (a wrong mask)."""
    mask = packed_causal_mask(segments)
    owner_q = torch.cat([torch.full((new,), r) for r, (_, new) in enumerate(segments)])
    owner_k = torch.cat([torch.full((c + new,), r) for r, (c, new) in enumerate(segments)])
    return mask | (owner_q[:, None] != owner_k[None, :])


@torch.no_grad()
def test_packed_forward_matches_each_sequence_alone(models):
    hf, ours = models
    prompts = [tokens(n, seed) for n, seed in ((23, 1), (9, 2), (40, 3))]
    split = [17, 1, 33]  # cached prefixes, not multiples of the block size
    expected = torch.cat([hf(torch.tensor([p])).logits[0, s:] for p, s in zip(prompts, split, strict=True)])

    def pool():
        return PagedKVCache(layers=2, kv_heads=2, head_dim=8, num_blocks=20, block_size=5)

    got = _packed_logits(ours, pool(), prompts, split)
    torch.testing.assert_close(got, expected, **tolerance(torch.float32))

    def swap(cache):  # negative control 1: two sequences' block tables swapped between the calls
        cache.block_tables[0], cache.block_tables[2] = cache.block_tables[2], cache.block_tables[0]

    wrong = _packed_logits(ours, pool(), prompts, split, between=swap)
    assert not torch.allclose(wrong[:6], expected[:6], **tolerance(torch.float32))  # sequence 0 read 2's keys
    # negative control 2: a mask that lets each query see the other sequences' keys
    wrong = _packed_logits(ours, pool(), prompts, split, mask_fn=_leaky_mask)
    assert not torch.allclose(wrong, expected, **tolerance(torch.float32))


@torch.no_grad()
def test_kv_bytes_in_use_below_a_static_cache(models):
    """Requests of very different lengths: the paged pool in use at its peak against a static cache with one row
    of the longest request's length per concurrent request (what padding to the longest costs), measured."""
    _, ours = models
    lengths = [(3, 4), (60, 20), (5, 2), (8, 30), (4, 3), (12, 6)]  # (prompt, new tokens)
    concurrent, block_size = 4, 8
    batcher = ContinuousBatcher(ours, num_blocks=64, block_size=block_size, max_running=concurrent)
    for i, (n, new) in enumerate(lengths):
        batcher.submit(tokens(n, 10 + i), new)
    tails = []
    while batcher.has_unfinished:
        batcher.step()
        cache = batcher.cache
        tails.append(cache.used_blocks * block_size - sum(cache.lengths.values()))
        assert tails[-1] <= (block_size - 1) * len(cache.lengths)  # only the sequences' last blocks have gaps
        assert cache.fragmentation == pytest.approx(tails[-1] / (cache.used_blocks * block_size or 1))
    assert max(tails) > 0 and batcher.cache.used_blocks == 0  # there was fragmentation; all blocks came back
    peak_bytes = batcher.peak_used_blocks * batcher.cache.bytes_per_block
    longest = max(n + new for n, new in lengths)
    with MemoryMeter("cpu") as static:
        static_cache = ours.new_cache(concurrent, longest)
    assert static.current == static_cache.nbytes == concurrent * longest * 2 * 2 * 2 * 8 * 4  # formula, measured
    assert peak_bytes < static.current / 2
