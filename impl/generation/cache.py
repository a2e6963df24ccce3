"""A static key/value cache: every layer's keys and values for every slot, allocated once before decoding.

Decoding with a cache (the "incremental inference" of Pope et al. 2022, "Efficiently Scaling Transformer
Inference", sec. 2) turns each step's attention from recomputing all N keys and values into computing one and
reading N. Allocating the whole cache up front (as gpt-fast and transformers' `StaticCache` do) keeps its
size fixed and known:

    nbytes = 2 (K and V) x layers x kv_heads x head_dim x max_tokens x batch x bytes per element
"""

import torch

from impl.common.checks import check_bool, check_positive_int

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_dtype(dtype: object) -> torch.dtype:
    if dtype not in _FLOATS:
        raise ValueError(
            f"dtype must be one of {_FLOATS} (the compute dtype; int8 storage is quantized=True), got {dtype}"
        )
    return dtype


def kv_cache_bytes(
    *,
    layers: int,
    batch: int,
    kv_heads: int,
    max_tokens: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    quantized: bool = False,
) -> int:
    """Bytes of a static KV cache of these sizes (what `KVCache(...).nbytes` holds, before anything is written).

    Unquantized: 2 (K and V) x layers x batch x kv_heads x max_tokens x head_dim x bytes of `dtype`.
    Quantized (int8, one scale per (batch, head, token) vector of head_dim elements, the scale stored in the
    compute `dtype`): 2 x layers x batch x kv_heads x max_tokens x (head_dim x 1 + bytes of `dtype`), i.e.
    1 + bytes(dtype) / head_dim bytes per element: with bf16/fp16 scales and head_dim 64, 1 + 2/64 = 1.03125
    against 2 for the bf16 cache (51.6%); with fp32 scales, 1 + 4/64 against 4 (26.6%).
    """
    for name, value in (
        ("layers", layers),
        ("batch", batch),
        ("kv_heads", kv_heads),
        ("max_tokens", max_tokens),
        ("head_dim", head_dim),
    ):
        check_positive_int(name, value)
    size = torch.empty(0, dtype=_check_dtype(dtype)).element_size()
    vectors = 2 * layers * batch * kv_heads * max_tokens
    per_vector = head_dim + size if check_bool("quantized", quantized) else head_dim * size
    return vectors * per_vector


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
