"""A static key/value cache: every layer's keys and values for every slot, allocated once before decoding,
optionally stored as int8 with one scale per token and head.

Decoding with a cache (the "incremental inference" of Pope et al. 2022, "Efficiently Scaling Transformer
Inference", sec. 2) turns each step's attention from recomputing all N keys and values into computing one and
reading N. Allocating the whole cache up front (as gpt-fast and transformers' `StaticCache` do) keeps its
size fixed and known:

    nbytes = 2 (K and V) x layers x kv_heads x head_dim x max_tokens x batch x bytes per element

The int8 cache (`quantized=True`) stores each (batch, head, token) vector x of head_dim keys or values as codes
q and one scale s, by symmetric absmax quantization (Dettmers et al. 2022, "LLM.int8()", sec. 2.1, eq. 1,
applied per vector as in their vector-wise quantization, sec. 3.1; per token as KIVI, Liu et al. 2024, sec. 3,
does for values):

    s = max_i |x_i| / 127  (rounded to the compute dtype, at least its smallest normal number)
    q_i = clamp(round(x_i / s), -127, 127)  as int8, round half to even, x / s in float32 (float64 for fp64)
    x_i ~ q_i * s,   |x_i - q_i * s| <= s / 2

so nbytes = 2 x layers x kv_heads x max_tokens x batch x (head_dim + bytes of the scale), the scale kept in the
compute dtype: with bf16 and head_dim 64, 1 + 2/64 = 1.03125 bytes per element against the bf16 cache's 2.
`update` quantizes the new tokens, then dequantizes the whole prefix [0, start + T) into fresh compute-dtype
tensors for attention: every step reads the prefix's int8 codes and scales, and writes and reads one layer's
keys and values in the compute dtype (a transient of one layer's fp K and V, freed before the next layer). It
saves memory, not time: per cached element a step moves 1 + scale/head_dim bytes in, then 2 x the compute
dtype's bytes (written, read back by attention) against the fp cache's 1 x (fp32, head_dim 64: 9.06 against 4
bytes). A fused attention kernel would read the int8 codes directly (as vLLM's quantized caches do): 1.06.
"""

import torch

from impl.common.checks import check_bool, check_positive_int, check_tensor

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_dtype(dtype: object) -> torch.dtype:
    if dtype not in _FLOATS:
        raise ValueError(
            f"dtype must be one of {_FLOATS} (the compute dtype; int8 storage is quantized=True), got {dtype}"
        )
    return dtype


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        check_positive_int(name, value)


def _quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    work = torch.float64 if torch.float64 in (x.dtype, dtype) else torch.float32  # the arithmetic's dtype
    tiny = torch.finfo(dtype).tiny  # the smallest normal number: a zero vector gets codes 0 and a finite scale
    scale = (x.abs().amax(dim=-1, keepdim=True).to(work) / 127).clamp_min(tiny).to(dtype)
    codes = torch.round(x.to(work) / scale.to(work)).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def _dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.mul(codes, scale)  # int8 x float promotes to the scale's dtype: one pass, one new tensor


def quantize_int8(x: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 codes (..., D) and scales (..., 1) in `dtype` (default: x's) of each last-axis
    vector of x, as the module docstring states; dequantize_int8(*quantize_int8(x)) is within scale / 2 of x."""
    check_tensor("x", x, floating=True, nonempty=True)
    return _quantize(x, _check_dtype(x.dtype if dtype is None else dtype))


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes * scale in `dtype` (the product rounded once, to the dtype)."""
    check_tensor("codes", codes, dtype=torch.int8)
    check_tensor("scale", scale, shape=(*codes.shape[:-1], 1))
    return _dequantize(codes, scale.to(_check_dtype(dtype)))


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
    _check_sizes(layers=layers, batch=batch, kv_heads=kv_heads, max_tokens=max_tokens, head_dim=head_dim)
    size = torch.empty(0, dtype=_check_dtype(dtype)).element_size()
    vectors = 2 * layers * batch * kv_heads * max_tokens
    per_vector = head_dim + size if check_bool("quantized", quantized) else head_dim * size
    return vectors * per_vector


class KVCache:
    """Preallocated keys and values, one (batch, kv_heads, max_tokens, head_dim) tensor each per layer.

    `dtype` is the compute dtype: what `update` takes and returns. With `quantized=True` the keys and values are
    stored as int8 codes (`keys`, `values`) with one `dtype` scale per (batch, head, token) in `key_scales`,
    `value_scales` ((batch, kv_heads, max_tokens, 1) per layer), and `update` returns dequantized copies.
    """

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
        quantized: bool = False,
    ):
        _check_sizes(layers=layers, batch=batch, kv_heads=kv_heads, max_tokens=max_tokens, head_dim=head_dim)
        self.dtype = _check_dtype(dtype)
        self.quantized = check_bool("quantized", quantized)
        self.max_tokens, self.head_dim = max_tokens, head_dim
        self._heads = (batch, kv_heads)
        shape = (batch, kv_heads, max_tokens, head_dim)
        storage = torch.int8 if quantized else dtype
        self.keys = [torch.zeros(shape, dtype=storage, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=storage, device=device) for _ in range(layers)]
        self.key_scales: list[torch.Tensor] = []
        self.value_scales: list[torch.Tensor] = []
        if quantized:
            shape = (batch, kv_heads, max_tokens, 1)
            self.key_scales = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
            self.value_scales = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]

    @property
    def nbytes(self) -> int:
        """Bytes held by all layers' keys and values (with quantized=True: their int8 codes and scales)."""
        tensors = self.keys + self.values + self.key_scales + self.value_scales
        return sum(t.numel() * t.element_size() for t in tensors)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, kv_heads, T, head_dim) into slots [start, start + T) of `layer`; return that layer's
        keys and values for slots [0, start + T): views of the cache, or with quantized=True new dequantized
        tensors in the compute dtype."""
        if k.dim() != 4 or k.shape[:2] != self._heads or k.shape[3] != self.head_dim:
            B, H = self._heads
            raise ValueError(f"k must be (batch={B}, kv_heads={H}, T, head_dim={self.head_dim}), got {tuple(k.shape)}")
        if v.shape != k.shape:
            raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
        end = start + k.shape[2]
        if not 0 <= start < end <= self.max_tokens:
            raise ValueError(f"slots [{start}, {end}) must lie within the cache's max_tokens={self.max_tokens}")
        keys, values = self.keys[layer], self.values[layer]
        if not self.quantized:
            keys[:, :, start:end] = k
            values[:, :, start:end] = v
            return keys[:, :, :end], values[:, :, :end]
        key_scales, value_scales = self.key_scales[layer], self.value_scales[layer]
        keys[:, :, start:end], key_scales[:, :, start:end] = _quantize(k, self.dtype)
        values[:, :, start:end], value_scales[:, :, start:end] = _quantize(v, self.dtype)
        return (
            _dequantize(keys[:, :, :end], key_scales[:, :, :end]),
            _dequantize(values[:, :, :end], value_scales[:, :, :end]),
        )
