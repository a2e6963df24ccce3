"""NF4 against bitsandbytes on CPU: packed codes, constants and dequantized values bit for bit; bytes vs formula."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from impl.common import MemoryMeter
from impl.finetune import NF4_CODE, quantize_nf4
from impl.finetune.nf4 import dynamic_code, expected_bits_per_param, nf4_levels_from_quantiles

# (33, 18): blocks straddle rows and the last block is partial; (3, 5, 7) and (11,): odd numbers of values.
SHAPES = [(64, 64), (33, 18), (128, 200), (3, 5, 7), (11,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _bnbf():
    """bitsandbytes.functional, imported by the tests that compare with it: they skip where it is not installed."""
    return pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the NF4 reference; not installed")


def _bnb_quantize(w, double_quant):
    return _bnbf().quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")


def _weight(shape, dtype, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_code_tables_match_bitsandbytes():
    bnbf = _bnbf()

    assert torch.equal(NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code(), bnbf.create_dynamic_map())
    # The published levels are Eq. 4's quantiles to within one fp32 ulp of 1.0.
    torch.testing.assert_close(nf4_levels_from_quantiles(), NF4_CODE, rtol=0, atol=2.4e-7)


@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_bit_identical_to_bitsandbytes(shape, dtype, double_quant):
    w = _weight(shape, dtype)
    packed, state = _bnb_quantize(w, double_quant)
    ours = quantize_nf4(w, blocksize=64, double_quant=double_quant)
    assert ours.packed.dtype == torch.uint8 and torch.equal(ours.packed, packed.flatten())
    assert torch.equal(ours.absmax, state.absmax)
    if double_quant:
        assert torch.equal(ours.absmax_scale, state.state2.absmax)
        assert torch.equal(ours.absmax_offset, state.offset)


@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(64, 64), (33, 18), (128, 200)], ids=str)  # odd last dims take bnb's compiled path
def test_dequantize_identical_to_bitsandbytes(shape, dtype, double_quant):
    bnbf = _bnbf()

    w = _weight(shape, dtype)
    expected = bnbf.dequantize_4bit(*_bnb_quantize(w, double_quant))
    got = quantize_nf4(w, double_quant=double_quant).dequantize()
    assert got.dtype == expected.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_negative_control_perturbed_weight_changes_codes():
    w = _weight((64, 64), torch.float32)
    packed, state = _bnb_quantize(w, False)
    w[3, 5] += 10.0  # a new block maximum: the block's constant and all its codes move
    ours = quantize_nf4(w)
    assert not torch.equal(ours.absmax, state.absmax)
    assert not torch.equal(ours.packed, packed.flatten())


@settings(max_examples=40, deadline=None)
@given(numel=st.integers(1, 700), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_roundtrip_error_within_half_a_level_gap(numel, scale, seed):
    w = torch.randn(numel, generator=torch.Generator().manual_seed(seed)) * scale
    q = quantize_nf4(w)
    half_gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2
    absmax = q.block_absmax().repeat_interleave(64)[:numel]
    assert ((q.dequantize() - w).abs() <= half_gap * absmax * (1 + 1e-6)).all()
    assert torch.equal(quantize_nf4(q.dequantize()).dequantize(), q.dequantize()), "levels are fixed points"


@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
def test_measured_bytes_match_formula(double_quant):
    w = _weight((256, 1024), torch.float32)  # 4096 blocks of 64, 16 blocks of 256 constants
    quantize_nf4(w[:4], double_quant=double_quant)  # builds the cached code tables first, whatever ran before
    with MemoryMeter("cpu") as mem:
        q = quantize_nf4(w, double_quant=double_quant)
    assert mem.current == q.nbytes, "every byte kept alive is one of the NF4 tensor's own"
    expected = expected_bits_per_param(64, double_quant)
    assert expected == pytest.approx(4.127 if double_quant else 4.5, abs=1e-3)
    assert q.bits_per_param == pytest.approx(expected, rel=0.01)


def test_rejects_non_floating_weights():
    with pytest.raises(TypeError, match=r"w must be a floating-point tensor, got torch.int64"):
        quantize_nf4(torch.arange(64))
    with pytest.raises(TypeError, match=r"w must be a torch.Tensor, got list"):
        quantize_nf4([1.0, 2.0])


@pytest.mark.parametrize("blocksize", [0, 63, 64.0], ids=["zero", "odd", "float"])
def test_rejects_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match=rf"blocksize must be an even int >= 2.*got {blocksize!r}"):
        quantize_nf4(torch.randn(128), blocksize=blocksize)


def test_rejects_empty_weight():
    with pytest.raises(ValueError, match=r"w must have at least one element, got shape \(0, 4\)"):
        quantize_nf4(torch.empty(0, 4))
