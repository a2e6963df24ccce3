"""LoRA, NF4 quantization and QLoRA: adapters interchangeable with peft, NF4 bit-exact with bitsandbytes."""

from impl.finetune.lora import (
    LoRALinear,
    apply_lora,
    load_adapter,
    merge_lora,
    save_adapter,
    trainable_parameters,
    unmerge_lora,
)
from impl.finetune.nf4 import NF4_CODE, nf4_storage_bytes, quantize_nf4
from impl.finetune.qlora import Linear4bit, apply_qlora

__all__ = [
    "NF4_CODE",
    "Linear4bit",
    "LoRALinear",
    "apply_lora",
    "apply_qlora",
    "load_adapter",
    "merge_lora",
    "nf4_storage_bytes",
    "quantize_nf4",
    "save_adapter",
    "trainable_parameters",
    "unmerge_lora",
]
