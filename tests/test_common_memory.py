"""The memory meter: exact on CPU, allocator statistics on CUDA."""

import pytest
import torch

from impl.common import MemoryMeter, measure_peak, tensor_bytes

MIB = 2**20


def test_held_tensor_counts_at_least_its_size(device):
    with MemoryMeter(device) as mem:
        kept = torch.empty(MIB, dtype=torch.float32, device=device)  # 4 MiB
    assert mem.peak >= tensor_bytes(kept)
    assert mem.current >= tensor_bytes(kept)


def test_freed_temporary_in_peak_not_after(device):
    with MemoryMeter(device) as mem:
        tmp = torch.ones(2 * MIB, device=device)  # 8 MiB, freed before the block ends
        total = tmp.sum()
        del tmp
    assert mem.peak >= 8 * MIB
    assert mem.current < 8 * MIB
    assert total.item() == 2 * MIB


def test_cpu_accounting_is_exact():
    with MemoryMeter("cpu") as mem:
        a = torch.empty(1000, dtype=torch.float32)  # 4,000 bytes
        b = torch.empty(10, 10, dtype=torch.float64)  # 800 bytes
        view = a[:10].view(2, 5)  # a view adds nothing
        del b
    assert (mem.peak, mem.current) == (4800, 4000)
    assert view.untyped_storage().nbytes() == 4000


def test_cpu_tensors_from_before_the_block_do_not_count():
    x = torch.randn(256, 256)
    with MemoryMeter("cpu") as mem:
        x.mul_(2)  # in place: no new storage
    assert (mem.peak, mem.current) == (0, 0)


def test_cpu_backward_is_measured():
    w = torch.randn(512, 512, requires_grad=True)
    with MemoryMeter("cpu") as mem:
        loss = (w @ w).square().sum()
        loss.backward()
    # w.grad (1 MiB) survives the block; the product and its square existed at some point too.
    assert mem.current >= tensor_bytes(w)
    assert mem.peak >= 3 * tensor_bytes(w)


def test_nested_meters_see_the_same_allocations():
    with MemoryMeter("cpu") as outer:
        a = torch.empty(100)
        with MemoryMeter("cpu") as inner:
            b = torch.empty(50)
    assert inner.peak == 200
    assert outer.peak == 600
    del a, b


def test_measure_peak_returns_result_and_peak():
    out, peak = measure_peak(torch.zeros, 256, dtype=torch.float64)
    assert out.shape == (256,)
    assert peak == 256 * 8


def test_negative_control_allocation_free_block_reports_zero():
    x = torch.randn(64)
    with MemoryMeter("cpu") as mem:
        x.shape  # noqa: B018 - touches the tensor without allocating
    assert mem.peak == 0


def test_bad_device_is_a_clear_error():
    with pytest.raises(ValueError, match="device must be one of"):
        MemoryMeter("tpu")
    with pytest.raises(TypeError, match="device must be a str or torch.device"):
        MemoryMeter(3)
