"""Distributed training on torch.distributed: a launcher (`spawn`), ZeRO stages 0-3 (`Zero`), Megatron tensor
parallelism applied in place to the GPT (`tensor_parallelize`, `tp_groups`) and pipeline schedules over stages
cut from it (`PipelineSchedule`, `split_gpt`)."""

from impl.distributed.launch import spawn
from impl.distributed.parallel_layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from impl.distributed.pipeline import GPTStage, PipelineSchedule, split_gpt
from impl.distributed.tensor_parallel import (
    ParallelGroups,
    full_logits,
    full_state_dict,
    shard_state_dict,
    tensor_parallelize,
    tp_groups,
    unshard,
)
from impl.distributed.zero import Zero, zero_state_bytes

__all__ = ["Zero", "spawn", "zero_state_bytes"]
__all__ += ["GPTStage", "PipelineSchedule", "split_gpt"]
__all__ += [
    "ColumnParallelLinear",
    "ParallelGroups",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "full_logits",
    "full_state_dict",
    "shard_state_dict",
    "tensor_parallelize",
    "tp_groups",
    "unshard",
    "vocab_parallel_cross_entropy",
]
