"""The estimators people use today, written from their documentation, so the planner's answers can stand beside
them: DeepSpeed's model-states estimators and accelerate's weights-only `estimate-memory`.

DeepSpeed, "Memory Requirements" (docs/code-docs/source/memory.rst, the functions
`estimate_zero2_model_states_mem_needs_all_cold` and `estimate_zero3_model_states_mem_needs_all_cold`), per GPU:
- ZeRO-2, optimizer on the GPU: 4·params + 16·params / total_gpus; optimizer offloaded to the CPU: 2·params.
- ZeRO-3: largest_layer_memory = 4·largest_layer_params (fp16 params gathered, fp16 grads computed), plus
  18·params / total_gpus (nothing offloaded), 2·params / total_gpus (optimizer offloaded) or nothing (params and
  optimizer offloaded).
and per CPU (additional_buffer_factor = 1.5, n_gpus = GPUs per node, gpus_factor = n_gpus / total_gpus):
- ZeRO-2: params·4·n_gpus·factor (optimizer on the GPU; the fp32 model built on the CPU at start), or
  params·max(4·n_gpus, 16)·factor (optimizer offloaded).
- ZeRO-3 with zero.Init: largest_layer_params·4·n_gpus·factor (nothing offloaded), params·18·gpus_factor·factor
  (params and optimizer offloaded), params·16·gpus_factor·factor (optimizer offloaded); without zero.Init the CPU
  figure is at least params·4·n_gpus·factor (the whole fp32 model on the CPU first).
Both count model states only (Adam, mixed precision): no activations, no temporary buffers, no LoRA or NF4.

accelerate's `accelerate estimate-memory` (accelerate.commands.estimate, `gather_data` and
`estimate_training_usage`): the weights' bytes at a dtype (4, 2, 1 or 1/2 byte per parameter), and for training
with Adam at batch size 1 the largest of its stages, in units of the fp32 model size S = 4·params: fp32 training
4·S (model, gradients, two states); 16-bit mixed precision 2·S (the optimizer states; the model counts S, the
gradients 1.5·S). No training figure for int8/int4.
"""

from dataclasses import dataclass

ADDITIONAL_BUFFER_FACTOR = 1.5  # DeepSpeed's default, "to be conservative"


@dataclass(frozen=True)
class DeepSpeedEstimate:
    per_gpu: int  # bytes
    per_cpu: int  # bytes
    options: str  # the offload options the row is for, as DeepSpeed prints them


def _check(total_params: float, num_gpus_per_node: int, num_nodes: int) -> None:
    if total_params <= 0:
        raise ValueError(f"total_params must be > 0, got {total_params}")
    if num_gpus_per_node < 1 or num_nodes < 1:
        raise ValueError(f"num_gpus_per_node and num_nodes must be >= 1, got {num_gpus_per_node}, {num_nodes}")


def deepspeed_zero2(total_params: float, num_gpus_per_node: int = 1, num_nodes: int = 1, *,
                    cpu_offload: bool = False,
                    additional_buffer_factor: float = ADDITIONAL_BUFFER_FACTOR) -> DeepSpeedEstimate:
    """DeepSpeed's `estimate_zero2_model_states_mem_needs_all_cold` for one offload option (module docstring)."""
    _check(total_params, num_gpus_per_node, num_nodes)
    total_gpus = num_nodes * num_gpus_per_node
    if cpu_offload:
        gpu = 2 * total_params
        cpu = total_params * max(4 * num_gpus_per_node, 16) * additional_buffer_factor
    else:
        gpu = 4 * total_params + int(16 * total_params / total_gpus)
        cpu = total_params * 4 * num_gpus_per_node * additional_buffer_factor
    return DeepSpeedEstimate(int(gpu), int(cpu), f"offload_optimizer={'cpu' if cpu_offload else 'none'}")


def deepspeed_zero3(total_params: float, largest_layer_params: float, num_gpus_per_node: int = 1,
                    num_nodes: int = 1, *, cpu_offload: bool = False, cpu_offload_params: bool = False,
                    zero_init: bool = True,
                    additional_buffer_factor: float = ADDITIONAL_BUFFER_FACTOR) -> DeepSpeedEstimate:
    """DeepSpeed's `estimate_zero3_model_states_mem_needs_all_cold` for one set of options (module docstring).
    Offloading the parameters needs the optimizer offloaded too (DeepSpeed prints no other case)."""
    _check(total_params, num_gpus_per_node, num_nodes)
    if largest_layer_params <= 0 or largest_layer_params > total_params:
        raise ValueError(f"largest_layer_params must be in (0, total_params={total_params}], "
                         f"got {largest_layer_params}")
    if cpu_offload_params and not cpu_offload:
        raise ValueError("cpu_offload_params=True needs cpu_offload=True (DeepSpeed's estimator has no such case)")
    total_gpus = num_nodes * num_gpus_per_node
    gpus_factor = num_gpus_per_node / total_gpus
    largest_layer_memory = 4 * largest_layer_params
    if cpu_offload and cpu_offload_params:
        gpu = largest_layer_memory
        cpu = total_params * 18 * gpus_factor * additional_buffer_factor
    elif cpu_offload:
        gpu = largest_layer_memory + int(2 * total_params / total_gpus)
        cpu = total_params * 16 * gpus_factor * additional_buffer_factor
    else:
        gpu = largest_layer_memory + int(18 * total_params / total_gpus)
        cpu = largest_layer_params * 4 * num_gpus_per_node * additional_buffer_factor
    if not zero_init:
        cpu = max(cpu, total_params * 4 * num_gpus_per_node * additional_buffer_factor)
    options = (f"offload_param={'cpu' if cpu_offload_params else 'none'}, "
               f"offload_optimizer={'cpu' if cpu_offload else 'none'}, zero_init={int(zero_init)}")
    return DeepSpeedEstimate(int(gpu), int(cpu), options)


_DTYPE_BYTES = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "int8": 1.0, "int4": 0.5}


def weights_only(total_params: float, dtype: str) -> dict[str, int | None]:
    """accelerate's `estimate-memory` for one dtype: {"total": the weights' bytes, "training_adam": the training
    peak it predicts (None for int8/int4)}."""
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {list(_DTYPE_BYTES)}, got {dtype!r}")
    if total_params <= 0:
        raise ValueError(f"total_params must be > 0, got {total_params}")
    fp32_size = int(4 * total_params)
    training = {"float32": 4 * fp32_size, "float16": 2 * fp32_size, "bfloat16": 2 * fp32_size}.get(dtype)
    return {"total": int(total_params * _DTYPE_BYTES[dtype]), "training_adam": training}
