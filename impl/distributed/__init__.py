"""Distributed training on torch.distributed: a launcher (`spawn`) and ZeRO stages 0-3 (`Zero`)."""

from impl.distributed.launch import spawn
from impl.distributed.pipeline import PipelineSchedule
from impl.distributed.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    tensor_parallelize,
    vocab_parallel_cross_entropy,
)
from impl.distributed.zero import Zero

__all__ = ["Zero", "spawn"]
__all__ += [
    "ColumnParallelLinear",
    "PipelineSchedule",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "tensor_parallelize",
    "vocab_parallel_cross_entropy",
]
