"""Gradient checkpointing: own recompute, policies (none / every / every_k / sqrt), saved-activation accounting."""

from impl.memory.checkpoint import checkpoint, checkpoint_sequential
from impl.memory.policy import apply_checkpointing
from impl.memory.saved import saved_tensor_bytes

__all__ = ["apply_checkpointing", "checkpoint", "checkpoint_sequential", "saved_tensor_bytes"]
