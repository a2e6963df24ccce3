"""4-bit NormalFloat (NF4) quantization with double quantization, from QLoRA (Dettmers et al., 2023, arXiv:2305.14314).

Section 3 of the paper: a weight tensor is cut into blocks of 64 values; each block is divided by its absolute
maximum (its "quantization constant" c) so that it lies in [-1, 1], and every value is replaced by the index of the
nearest of the 16 NF4 levels (Eq. 4: quantiles of N(0, 1), normalized to [-1, 1], with an exact zero). Two 4-bit
indices are packed per byte, the first one in the high nibble. Storing one fp32 c per 64 values costs 32/64 = 0.5
bits per parameter, so plain NF4 is 4.5 bits/param.

Double quantization (Eq. 6) quantizes the constants themselves: their mean is subtracted, and the centred constants
are quantized blockwise (blocks of 256) to 8 bits with the dynamic (sign, exponent, fraction) code of Dettmers
(2015), keeping one fp32 scale per 256 constants: 4 + 8/64 + 32/(64*256) = 4.127 bits/param.

Everything here matches `bitsandbytes.functional.quantize_4bit(quant_type="nf4")` on CPU byte for byte, which
fixes three details the paper leaves open: ties round to the lower level; a last block shorter than the blocksize
keeps its own constant; and the 8-bit constants are rounded through bitsandbytes' CPU lookup table (the interval
[-1, 1] cut into 65,536 points, each mapped to its nearest code), which can differ from exact rounding by one
code when a value lies within 1/65,535 of a midpoint between two codes.
"""

from dataclasses import dataclass
from functools import cache

import torch

from impl.common.checks import check_bool, check_tensor, is_int

# The 16 NF4 levels as published in the paper's appendix E (and used verbatim by bitsandbytes). They are the
# normalized N(0, 1) quantiles of Eq. 4 with offset 0.9677; recomputing them in fp64 agrees to within 1 fp32 ulp.
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
ABSMAX_BLOCKSIZE = 256  # blocksize of the second-level quantization of the constants (paper: 256)
_LUT_POINTS = 65536  # bitsandbytes' CPU 8-bit quantizer rounds through a table of this many points over [-1, 1]


def nf4_levels_from_quantiles(offset: float = 0.9677083) -> torch.Tensor:
    """Eq. 4 computed: 8 positive and 7 negative N(0, 1) quantiles between `offset` and 1/2, plus 0, scaled to
    [-1, 1] (fp64, then fp32). Asymmetric so that zero is exactly representable."""
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative])
    return (levels / levels.abs().max()).sort().values.float()


@cache
def dynamic_code() -> torch.Tensor:
    """The signed 8-bit dynamic code (Dettmers 2015): for exponent e = 0..6 there are 2^e evenly spaced fractions
    in (0.1, 1), times 10^(e-6), with both signs; plus 0 and 1. 256 sorted fp32 values (cached: do not modify)."""
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        magnitudes = (10.0 ** (e - 6)) * ((edges[:-1] + edges[1:]) / 2)
        values += magnitudes.tolist() + (-magnitudes).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """`x` (1-D) with zeros appended up to a multiple of `multiple` (no copy when it already is one)."""
    return torch.nn.functional.pad(x, (0, -x.numel() % multiple)) if x.numel() % multiple else x


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each block of `flat` (fp32, 1-D) by its absmax. Returns (scaled values in [-1, 1], absmax per block).
    Full blocks are multiplied by 1/absmax and a partial last block divided by its absmax, as bitsandbytes does."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)  # (n_full_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    if full < n:
        tail_absmax = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.unsqueeze(0)])
        scaled = torch.cat([scaled, (flat[full:] / tail_absmax).clamp(-1, 1)])
    return scaled, absmax


def _nearest_level(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of the sorted `code`; a value exactly between two levels takes the lower one."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints.to(scaled.device), out_int32=True)


@cache
def _grid_to_dynamic_code() -> torch.Tensor:
    """For each of the 65,536 evenly spaced points on [-1, 1], the index of the nearest dynamic code (cached)."""
    grid = -1.0 + (2.0 * torch.arange(_LUT_POINTS, dtype=torch.float32)) / (_LUT_POINTS - 1)
    return _nearest_level(grid, dynamic_code())


def _quantize_8bit(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization to the dynamic code with bitsandbytes' CPU rounding: value -> nearest of 65,536
    grid points on [-1, 1] -> the code nearest to that grid point. Returns (uint8 indices, fp32 absmax per block)."""
    n = flat.numel()
    blocks = _pad_to_multiple(flat, blocksize).view(-1, blocksize)  # zeros leave absmax unchanged
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax).unsqueeze(1)).clamp(-1, 1)
    point = (((scaled + 1.0) * 0.5) * (_LUT_POINTS - 1) + 0.5).nan_to_num(0.0).long()  # truncation, as the C cast
    indices = _grid_to_dynamic_code().to(flat.device)[point]
    indices = indices.masked_fill((absmax == 0).unsqueeze(1), 0)  # an all-zero block stores index 0
    return indices.reshape(-1)[:n].to(torch.uint8), absmax


@dataclass
class NF4Tensor:
    """A weight quantized to NF4. With double quantization `absmax` holds uint8 indices into the dynamic code,
    and the fp32 constants are `dynamic_code()[absmax] * absmax_scale[block // 256] + absmax_offset`."""

    packed: torch.Tensor  # (ceil(numel / 2),) uint8: two NF4 indices per byte, element 2i in the high nibble
    absmax: torch.Tensor  # (n_blocks,) fp32 constants, or uint8 indices when double-quantized
    shape: torch.Size  # shape of the original weight
    dtype: torch.dtype  # dtype of the original weight (what dequantize() returns by default)
    blocksize: int  # values per quantization block
    absmax_scale: torch.Tensor | None = None  # (ceil(n_blocks / 256),) fp32 second-level absmax (double quant)
    absmax_offset: torch.Tensor | None = None  # () fp32 mean subtracted from the constants (double quant)

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: packed codes, constants and, with double quantization, their scales and mean."""
        parts = [self.packed, self.absmax, self.absmax_scale, self.absmax_offset]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / self.numel

    def block_absmax(self) -> torch.Tensor:
        """The fp32 quantization constant of every block (undoing double quantization when present)."""
        if not self.double_quant:
            return self.absmax
        code = dynamic_code().to(self.absmax.device)
        values = _pad_to_multiple(code[self.absmax.int()], ABSMAX_BLOCKSIZE)
        values = (values.view(-1, ABSMAX_BLOCKSIZE) * self.absmax_scale.unsqueeze(1)).reshape(-1)  # (blocks,)
        return values[: self.absmax.numel()] + self.absmax_offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight back in `dtype` (default: the original dtype): level * block constant, computed in fp32."""
        byte_values = _byte_to_levels().to(self.packed.device)  # (256, 2): both levels of every possible byte
        values = byte_values[self.packed.int()].reshape(-1)[: self.numel]  # (numel,)
        values = _pad_to_multiple(values, self.blocksize)
        values = values.view(-1, self.blocksize) * self.block_absmax().unsqueeze(1)  # (n_blocks, blocksize)
        return values.reshape(-1)[: self.numel].view(self.shape).to(dtype or self.dtype)


@cache
def _byte_to_levels() -> torch.Tensor:
    """(256, 2) fp32: the NF4 levels of the high and the low nibble of each byte value (cached; do not modify)."""
    byte = torch.arange(256)
    return torch.stack([NF4_CODE[byte >> 4], NF4_CODE[byte & 0xF]], dim=1)


def expected_bits_per_param(blocksize: int = 64, double_quant: bool = False) -> float:
    """The paper's storage formula: 4 bits + 32/blocksize for fp32 constants, or 8/blocksize + 32/(blocksize*256)
    when the constants are themselves quantized (ignoring the single fp32 mean)."""
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * ABSMAX_BLOCKSIZE)
    return 4 + 32 / blocksize


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Tensor:
    """Quantize a floating-point tensor of any shape to NF4 in blocks of `blocksize` consecutive values (a last
    partial block keeps its own constant), optionally double-quantizing the constants.

    NaN is not refused: a NaN makes its block's absmax NaN, so that whole block (and nothing else) dequantizes to
    NaN, as bitsandbytes' quantize_4bit does; check `torch.isfinite(w).all()` first if a weight may hold one."""
    check_tensor("w", w, floating=True, nonempty=True)
    if not is_int(blocksize) or blocksize < 2 or blocksize % 2:
        raise ValueError(f"blocksize must be an even int >= 2 (bitsandbytes: 32..4096), got {blocksize!r}")
    check_bool("double_quant", double_quant)
    flat = w.detach().reshape(-1).float()
    scaled, absmax = _blockwise_absmax(flat, blocksize)
    indices = _nearest_level(scaled, NF4_CODE).to(torch.uint8)
    indices = torch.nn.functional.pad(indices, (0, flat.numel() % 2), value=7)  # odd count: pad with the 0 level
    pairs = indices.view(-1, 2)  # (ceil(numel / 2), 2)
    packed = (pairs[:, 0] << 4) | pairs[:, 1]
    if not double_quant:
        return NF4Tensor(packed, absmax, w.shape, w.dtype, blocksize)
    offset = absmax.mean()
    qabsmax, scale = _quantize_8bit(absmax - offset, ABSMAX_BLOCKSIZE)
    return NF4Tensor(packed, qabsmax, w.shape, w.dtype, blocksize, absmax_scale=scale, absmax_offset=offset)


def nf4_storage_bytes(numel: int, blocksize: int = 64, double_quant: bool = False) -> int:
    """Exact bytes `quantize_nf4` stores for a tensor of `numel` values (`NF4Tensor.nbytes`), section 3 of the
    paper: ceil(numel / 2) bytes of packed 4-bit codes, one constant per block of `blocksize` (a partial last
    block keeps its own): fp32, or with double quantization (Eq. 6) a uint8 code per block plus one fp32 scale
    per 256 constants and the one fp32 mean. In the limit this is `expected_bits_per_param` / 8 per value."""
    if not is_int(numel) or numel < 1:
        raise ValueError(f"numel must be a positive int, got {numel!r}")
    if not is_int(blocksize) or blocksize < 2 or blocksize % 2:
        raise ValueError(f"blocksize must be an even int >= 2 (bitsandbytes: 32..4096), got {blocksize!r}")
    check_bool("double_quant", double_quant)
    blocks = -(-numel // blocksize)
    constants = blocks + 4 * -(-blocks // ABSMAX_BLOCKSIZE) + 4 if double_quant else 4 * blocks
    return -(-numel // 2) + constants
