"""The static KV cache: its bytes equal the formula, the memory meter sees exactly those bytes, and a cached
decode step equals recomputing the whole sequence."""

import pytest
import torch

from impl.common import MemoryMeter, tolerance
from impl.generation import KVCache, Llama, LlamaConfig, kv_cache_bytes

CONFIG = LlamaConfig(
    vocab_size=61, hidden_size=48, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
    intermediate_size=96, max_position_embeddings=64,
)  # fmt: skip


def formula(layers, kv_heads, head_dim, max_tokens, batch, dtype) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x max_tokens x batch x bytes per element."""
    return 2 * layers * kv_heads * head_dim * max_tokens * batch * torch.empty(0, dtype=dtype).element_size()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch,max_tokens", [(1, 17), (3, 40)])
def test_nbytes_equals_formula_and_the_meter(dtype, batch, max_tokens):
    model = Llama(CONFIG).to(dtype)
    with MemoryMeter("cpu") as mem:
        cache = model.new_cache(batch, max_tokens)
    expected = formula(3, 2, 8, max_tokens, batch, dtype)
    assert cache.nbytes == expected
    assert mem.current == expected
    assert mem.peak == expected


def test_nbytes_wrong_formula_is_caught():
    cache = KVCache(layers=2, batch=1, kv_heads=2, max_tokens=10, head_dim=8)
    assert cache.nbytes != formula(2, 4, 8, 10, 1, torch.float32)  # query heads instead of kv heads


@torch.no_grad()
def test_cached_steps_equal_full_recompute():
    model = Llama(CONFIG).eval()
    ids = torch.randint(0, 61, (2, 20))
    full = model(ids)
    cache = model.new_cache(2, 20)
    steps = [model(ids[:, :12], cache=cache)]  # prefill 12, then one token at a time
    steps += [model(ids[:, t : t + 1], cache=cache, start=t) for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **tolerance(torch.float32))
    # negative control: a stale slot (one key zeroed) changes every later step's logits
    cache.keys[0][:, :, 3] = 0
    assert not torch.allclose(model(ids[:, 19:20], cache=cache, start=19), full[:, 19:20])


@pytest.mark.parametrize("name", ["layers", "batch", "kv_heads", "max_tokens", "head_dim"])
def test_bad_sizes(name):
    sizes = dict(layers=1, batch=1, kv_heads=1, max_tokens=4, head_dim=8) | {name: 0}
    with pytest.raises(ValueError, match=rf"{name} must be a positive int, got 0"):
        KVCache(**sizes)


def test_update_outside_the_cache():
    cache = KVCache(layers=1, batch=1, kv_heads=1, max_tokens=4, head_dim=8)
    k = torch.zeros(1, 1, 2, 8)
    with pytest.raises(ValueError, match=r"slots \[3, 5\) must lie within the cache's max_tokens=4"):
        cache.update(0, 3, k, k)


def test_config_heads_must_divide():
    with pytest.raises(ValueError, match="num_attention_heads must be a multiple of num_key_value_heads, got 6 and 4"):
        LlamaConfig(num_attention_heads=6, num_key_value_heads=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kv_cache_bytes_is_the_formula(dtype):
    """The public formula (the memory planner's) is the one above, and what a cache of those sizes holds."""
    sizes = dict(layers=3, batch=2, kv_heads=2, max_tokens=17, head_dim=8)
    expected = formula(3, 2, 8, 17, 2, dtype)
    assert kv_cache_bytes(**sizes, dtype=dtype) == expected == KVCache(**sizes, dtype=dtype).nbytes
