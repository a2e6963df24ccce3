"""KV caching: a Llama-style decoder, a static KV cache and generate(), token-identical to transformers."""

from impl.generation.cache import KVCache, kv_cache_bytes
from impl.generation.decoding import generate
from impl.generation.model import Llama, LlamaConfig

__all__ = ["KVCache", "Llama", "LlamaConfig", "generate", "kv_cache_bytes"]
