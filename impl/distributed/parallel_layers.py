"""The Megatron-LM building blocks (Shoeybi et al. 2019, section 3): the conjugate collectives f and g, the
column-, row- and vocabulary-parallel layers, and the cross-entropy over vocabulary-split logits.

`tensor_parallel.py` swaps a GPT's own layers for these, in place; its docstring says where each one goes.
"""

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index


def _tp_size_and_rank(group) -> tuple[int, int]:
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
    return dist.get_world_size(group), dist.get_rank(group)


def _check_divisible(name: str, value: int, tp: int) -> None:
    if value % tp:
        raise ValueError(f"{name} must be divisible by the tensor-parallel size {tp}, got {value}")


# ---- the conjugate collectives f and g, and the gather for full logits ----


class _CopyToParallel(torch.autograd.Function):
    """f: identity forward, all-reduce of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromParallel(torch.autograd.Function):
    """g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromParallel(torch.autograd.Function):
    """All-gather along the last dimension forward; each rank keeps its own slice of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.tp, ctx.rank = _tp_size_and_rank(group)
        return torch.cat(_all_gather(x, group), dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(ctx.tp, dim=-1)[ctx.rank].contiguous(), None


def _all_gather(x: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts


copy_to_parallel = _CopyToParallel.apply  # (x, group): f
reduce_from_parallel = _ReduceFromParallel.apply  # (x, group): g
gather_from_parallel = _GatherFromParallel.apply  # (x, group): all-gather along the last dimension


# ---- layers ----


class ColumnParallelLinear(nn.Module):
    """Y_i = X A_i^T + b_i with this rank's `out_features / tp` output rows of A; `gather_output` all-gathers Y.

    `parts` > 1: the output is `parts` equal blocks (a fused q, k, v projection) and each is split on its own,
    so this rank holds [q_i; k_i; v_i]."""

    def __init__(self, in_features, out_features, group, bias=True, gather_output=False, parts=1, device=None,
                 dtype=None):  # fmt: skip
        super().__init__()
        tp, _ = _tp_size_and_rank(group)
        _check_divisible("out_features", out_features, tp * parts)
        self.group, self.gather_output, self.parts = group, gather_output, parts
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features // tp, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features // tp, device=device, dtype=dtype)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's init; the fan-in is unsplit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_parallel(x, self.group), self.weight, self.bias)  # (..., out / tp)
        return gather_from_parallel(y, self.group) if self.gather_output else y

    def lora_update(self, x: torch.Tensor, lora_A: nn.Module, lora_B: nn.Module) -> torch.Tensor:
        """LoRA's B A x (Hu et al. 2021, Eq. 3) in this layer's layout: A (r, in) replicated, B this rank's output
        rows (r columns). f sits on the r-wide A x, so its gradient, and with it A's and x's, sums every rank's
        rows of B; f on x (before A) would leave A's gradient a partial sum."""
        y = lora_B(copy_to_parallel(lora_A(x), self.group))  # (..., out / tp)
        return gather_from_parallel(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """Y = sum_i X_i B_i^T + b: the input arrives split by features, the partial products are all-reduced."""

    def __init__(self, in_features: int, out_features: int, group, bias: bool = True, device=None, dtype=None):
        super().__init__()
        tp, _ = _tp_size_and_rank(group)
        _check_divisible("in_features", in_features, tp)
        self.group = group
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features // tp, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        bound = 1 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)  # added once, after the sum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_parallel(F.linear(x, self.weight), self.group)  # (..., out)
        return y + self.bias if self.bias is not None else y

    def lora_update(self, x: torch.Tensor, lora_A: nn.Module, lora_B: nn.Module) -> torch.Tensor:
        """LoRA's B A x in this layer's layout: A this rank's input columns, B (out, r) replicated. g sums the
        r-wide partial products A_i x_i before B, so B's gradient is whole (g after B would leave it partial)."""
        return lora_B(reduce_from_parallel(lora_A(x), self.group))  # (..., out)


class VocabParallelEmbedding(nn.Module):
    """Rows [rank * V_p / tp, (rank + 1) * V_p / tp) of the table, V_p the vocabulary padded to a multiple of tp.

    Ids outside this rank's range look up zeros; the all-reduce (g) adds the one rank that holds each row.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group, device=None, dtype=None):
        super().__init__()
        tp, rank = _tp_size_and_rank(group)
        self.group, self.num_embeddings, self.embedding_dim = group, num_embeddings, embedding_dim
        self.padded_num_embeddings = math.ceil(num_embeddings / tp) * tp
        self.per_rank = self.padded_num_embeddings // tp
        self.start = rank * self.per_rank
        self.weight = nn.Parameter(torch.randn(self.per_rank, embedding_dim, device=device, dtype=dtype))
        with torch.no_grad():
            self.weight[max(0, num_embeddings - self.start) :] = 0  # padding rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.start + self.per_rank)
        local = (ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)  # (..., dim)
        return reduce_from_parallel(out, self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, group, vocab_size):
        _, rank = _tp_size_and_rank(group)
        per_rank = logits.size(-1)
        start = rank * per_rank
        shape, dtype = logits.shape, logits.dtype
        logits = logits.float().reshape(-1, per_rank)  # (N, V / tp)
        targets = targets.reshape(-1)  # (N,)
        if start + per_rank > vocab_size:  # padding columns: probability zero
            logits = logits.clone()
            logits[:, max(0, vocab_size - start) :] = float("-inf")
        row_max = logits.max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        exp = (logits - row_max.unsqueeze(-1)).exp()  # (N, V / tp)
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        valid = targets != IGNORE_INDEX
        mine = valid & (targets >= start) & (targets < start + per_rank)  # the target's logit is on this rank
        local = (targets - start).masked_fill(~mine, 0)
        target_logit = logits.gather(1, local.unsqueeze(1)).squeeze(1) - row_max
        target_logit = target_logit.masked_fill(~mine, 0.0)
        dist.all_reduce(target_logit, group=group)
        count = valid.sum().to(logits.dtype)  # the same on every rank: the targets are whole; 0 gives nan
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), local, mine, valid, count)
        ctx.shape, ctx.dtype = shape, dtype
        return (sum_exp.log() - target_logit).masked_fill(~valid, 0.0).sum() / count

    @staticmethod
    def backward(ctx, grad):
        softmax, local, mine, valid, count = ctx.saved_tensors
        grad_logits = softmax.clone()  # d loss_n / d logit_nv = softmax_nv - [v == target_n]
        rows = torch.arange(grad_logits.size(0), device=grad_logits.device)
        grad_logits[rows, local] -= mine.to(grad_logits.dtype)
        grad_logits = grad_logits * valid.unsqueeze(1) * (grad / count)
        return grad_logits.reshape(ctx.shape).to(ctx.dtype), None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, group, vocab_size: int | None = None
) -> torch.Tensor:
    """Mean cross-entropy of logits split by vocabulary: `logits` (..., V_p / tp) is this rank's slice, `targets`
    (...) the full ids, -100 ignored. Columns at or past `vocab_size` (padding; default: none) are masked out."""
    tp, _ = _tp_size_and_rank(group)
    padded = logits.size(-1) * tp
    vocab_size = padded if vocab_size is None else vocab_size
    if not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size must be in [1, {padded}] (logits' last dim x tp), got {vocab_size}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(logits.shape[:-1])}, got {tuple(targets.shape)}")
    loss = _VocabParallelCrossEntropy.apply(logits, targets, group, vocab_size)
    return loss.to(logits.dtype)
