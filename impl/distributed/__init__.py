"""Distributed training on torch.distributed: a launcher (`spawn`) and ZeRO stages 0-3 (`Zero`)."""

from impl.distributed.launch import spawn
from impl.distributed.zero import Zero

__all__ = ["Zero", "spawn"]
