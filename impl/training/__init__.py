"""Training: a small trainer loop, deterministic mode, and crash-safe checkpoint/resume."""

from impl.training.checkpoint import CheckpointError, load_checkpoint, resume, save_checkpoint
from impl.training.determinism import set_deterministic
from impl.training.trainer import Trainer

__all__ = ["CheckpointError", "Trainer", "load_checkpoint", "resume", "save_checkpoint", "set_deterministic"]
