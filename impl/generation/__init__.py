"""KV caching: a Llama-style decoder, a static KV cache and generate(), token-identical to transformers."""

from impl.generation.cache import KVCache, dequantize_int8, kv_cache_bytes, quantize_int8
from impl.generation.decoding import generate
from impl.generation.model import Llama, LlamaConfig

__all__ = [
    "KVCache",
    "Llama",
    "LlamaConfig",
    "dequantize_int8",
    "generate",
    "kv_cache_bytes",
    "quantize_int8",
]
