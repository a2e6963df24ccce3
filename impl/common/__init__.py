"""Shared helpers: device and dtype choice, seeding, the memory meter, tolerances."""

from impl.common.device import (
    DEVICE_CHOICES,
    SIZE_CHOICES,
    cpu_name,
    device_name,
    resolve_device,
    resolve_dtype,
    resolve_size,
    synchronize,
)
from impl.common.memory import MemoryMeter, measure_peak, tensor_bytes
from impl.common.seed import seed_everything
from impl.common.tolerance import TOLERANCES, assert_close_to_reference_error, tolerance

__all__ = [
    "DEVICE_CHOICES",
    "SIZE_CHOICES",
    "TOLERANCES",
    "MemoryMeter",
    "assert_close_to_reference_error",
    "cpu_name",
    "device_name",
    "measure_peak",
    "resolve_device",
    "resolve_dtype",
    "resolve_size",
    "seed_everything",
    "synchronize",
    "tensor_bytes",
    "tolerance",
]
