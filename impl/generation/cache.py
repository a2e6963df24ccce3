"""A static key/value cache: every layer's keys and values for every slot, allocated once before decoding.

Decoding with a cache (the "incremental inference" of Pope et al. 2022, "Efficiently Scaling Transformer
Inference", sec. 2) turns each step's attention from recomputing all N keys and values into computing one and
reading N. Allocating the whole cache up front (as gpt-fast and transformers' `StaticCache` do) keeps its
size fixed and known:

    nbytes = 2 (K and V) x layers x kv_heads x head_dim x max_tokens x batch x bytes per element
"""

import torch

from impl.common.checks import check_positive_int


class KVCache:
    """Preallocated keys and values, one (batch, kv_heads, max_tokens, head_dim) tensor each per layer."""

    def __init__(
        self,
        *,
        layers: int,
        batch: int,
        kv_heads: int,
        max_tokens: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        for name, value in (
            ("layers", layers),
            ("batch", batch),
            ("kv_heads", kv_heads),
            ("max_tokens", max_tokens),
            ("head_dim", head_dim),
        ):
            check_positive_int(name, value)
        self.max_tokens = max_tokens
        shape = (batch, kv_heads, max_tokens, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]

    @property
    def nbytes(self) -> int:
        """Bytes held by all layers' keys and values."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, kv_heads, T, head_dim) into slots [start, start + T) of `layer`; return that layer's
        keys and values for slots [0, start + T), as views of the cache."""
        end = start + k.shape[2]
        if not 0 <= start < end <= self.max_tokens:
            raise ValueError(f"slots [{start}, {end}) must lie within the cache's max_tokens={self.max_tokens}")
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]
