"""Gradient checkpointing: own recompute, policies (none / every / every_k / sqrt), saved-activation accounting."""

from impl.memory.checkpoint import checkpoint, checkpoint_sequential
from impl.memory.estimate import BLOCK_LINEARS, block_saved_bytes, model_saved_bytes, stack_saved_bytes
from impl.memory.policy import apply_checkpointing
from impl.memory.saved import saved_tensor_bytes

__all__ = [
    "BLOCK_LINEARS",
    "apply_checkpointing",
    "block_saved_bytes",
    "checkpoint",
    "checkpoint_sequential",
    "model_saved_bytes",
    "saved_tensor_bytes",
    "stack_saved_bytes",
]
