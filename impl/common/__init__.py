"""Shared helpers: input checks, device and dtype choice, seeding, the memory meter, tolerances, timing and
rooflines."""

from impl.common.checks import (
    InputTypeError,
    check_bool,
    check_generator,
    check_int,
    check_number,
    check_one_of,
    check_positive_int,
    check_positive_number,
    check_probability,
    check_tensor,
    check_token_ids,
    check_token_list,
)
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
from impl.common.roofline import (
    DATASHEET,
    Peak,
    attention_flops,
    datasheet_peak,
    gemm_flops,
    measure_roofs,
    roofline,
    train_flops,
)
from impl.common.seed import seed_everything
from impl.common.timing import cuda_graph, quantiles, time_calls
from impl.common.tolerance import TOLERANCES, assert_close_to_reference_error, compare_to_reference, tolerance

__all__ = [
    "DATASHEET",
    "DEVICE_CHOICES",
    "SIZE_CHOICES",
    "TOLERANCES",
    "InputTypeError",
    "MemoryMeter",
    "Peak",
    "assert_close_to_reference_error",
    "attention_flops",
    "check_bool",
    "check_generator",
    "check_int",
    "check_number",
    "check_one_of",
    "check_positive_int",
    "check_positive_number",
    "check_probability",
    "check_tensor",
    "check_token_ids",
    "check_token_list",
    "compare_to_reference",
    "cpu_name",
    "cuda_graph",
    "datasheet_peak",
    "device_name",
    "gemm_flops",
    "measure_peak",
    "measure_roofs",
    "quantiles",
    "resolve_device",
    "resolve_dtype",
    "resolve_size",
    "roofline",
    "seed_everything",
    "synchronize",
    "tensor_bytes",
    "time_calls",
    "tolerance",
    "train_flops",
]
