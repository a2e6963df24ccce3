"""KV caching: a Llama-style decoder, a static KV cache (optionally int8), a paged cache with continuous batching,
and generate() (with speculative decoding), token-identical to transformers."""

from impl.generation.batching import ContinuousBatcher
from impl.generation.cache import KVCache, dequantize_int8, kv_cache_bytes, quantize_int8
from impl.generation.decoding import generate
from impl.generation.model import Llama, LlamaConfig
from impl.generation.paged import PagedKVCache, paged_cache_bytes

__all__ = [
    "ContinuousBatcher",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "PagedKVCache",
    "dequantize_int8",
    "generate",
    "kv_cache_bytes",
    "paged_cache_bytes",
    "quantize_int8",
]
