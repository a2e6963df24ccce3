"""Megatron-LM tensor parallelism (Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion Parameter Language
Models Using Model Parallelism", section 3, Figures 3 and 4).

Each weight matrix of a transformer block is split over the `tp` ranks of a process group so that a block needs
only two all-reduces forward and two backward:

    MLP:        Y = GeLU(X A),  A = [A_1 ... A_tp] split by columns  (ColumnParallelLinear, no communication)
                Z = Y B,        B = [B_1; ...; B_tp] split by rows     (RowParallelLinear, all-reduce of Y_i B_i)
    attention:  the heads are split: rank i computes heads i*H/tp ... (i+1)*H/tp - 1 from its columns of
                W_q, W_k, W_v, and the output projection is split by rows.

The two conjugate operators of the paper: `f` is the identity forward and an all-reduce backward (placed where
a replicated activation enters a parallel region), `g` is an all-reduce forward and the identity backward (where
a parallel region's partial sums leave it). The embedding is split by vocabulary rows (section 3, "input
embedding"), and the output layer, tied to it, produces logits split by vocabulary; the cross-entropy over those
split logits (`vocab_parallel_cross_entropy`) all-reduces only per-token scalars (max, sum of exponentials,
target logit), never the (tokens x vocab) logits. A vocabulary that does not divide by `tp` is padded with rows
whose logits are masked to -inf, so the padding gets zero probability and zero gradient.
"""

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from impl.attention import attention
from impl.gpt.model import _LN_EPS, GPT, GPTConfig


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
        parts = [torch.empty_like(x) for _ in range(ctx.tp)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(ctx.tp, dim=-1)[ctx.rank].contiguous(), None


def copy_to_parallel(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToParallel.apply(x, group)


def reduce_from_parallel(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromParallel.apply(x, group)


def gather_from_parallel(x: torch.Tensor, group) -> torch.Tensor:
    return _GatherFromParallel.apply(x, group)


# ---- layers ----


class ColumnParallelLinear(nn.Module):
    """Y_i = X A_i^T + b_i with this rank's `out_features / tp` output rows of A; `gather_output` all-gathers Y."""

    def __init__(self, in_features: int, out_features: int, group, bias: bool = True, gather_output: bool = False):
        super().__init__()
        tp, _ = _tp_size_and_rank(group)
        _check_divisible("out_features", out_features, tp)
        self.group, self.gather_output = group, gather_output
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features // tp, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features // tp)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's init; the fan-in is unsplit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_parallel(x, self.group), self.weight, self.bias)  # (..., out / tp)
        return gather_from_parallel(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """Y = sum_i X_i B_i^T + b: the input arrives split by features, the partial products are all-reduced."""

    def __init__(self, in_features: int, out_features: int, group, bias: bool = True):
        super().__init__()
        tp, _ = _tp_size_and_rank(group)
        _check_divisible("in_features", in_features, tp)
        self.group = group
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features // tp))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None  # added once, after the sum
        bound = 1 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_parallel(F.linear(x, self.weight), self.group)  # (..., out)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Rows [rank * V_p / tp, (rank + 1) * V_p / tp) of the table, V_p the vocabulary padded to a multiple of tp.

    Ids outside this rank's range look up zeros; the all-reduce (g) adds the one rank that holds each row.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group):
        super().__init__()
        tp, rank = _tp_size_and_rank(group)
        self.group, self.num_embeddings, self.embedding_dim = group, num_embeddings, embedding_dim
        self.padded_num_embeddings = math.ceil(num_embeddings / tp) * tp
        self.per_rank = self.padded_num_embeddings // tp
        self.start = rank * self.per_rank
        self.weight = nn.Parameter(torch.randn(self.per_rank, embedding_dim))
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
        outside = (targets < start) | (targets >= start + per_rank)
        local = (targets - start).masked_fill(outside, 0)
        target_logit = logits.gather(1, local.unsqueeze(1)).squeeze(1) - row_max
        target_logit = target_logit.masked_fill(outside, 0.0)
        dist.all_reduce(target_logit, group=group)
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), local, outside)
        ctx.shape, ctx.dtype = shape, dtype
        return (sum_exp.log() - target_logit).mean()

    @staticmethod
    def backward(ctx, grad):
        softmax, local, outside = ctx.saved_tensors
        grad_logits = softmax.clone()  # d loss_n / d logit_nv = softmax_nv - [v == target_n]
        rows = torch.arange(grad_logits.size(0), device=grad_logits.device)
        grad_logits[rows, local] -= (~outside).to(grad_logits.dtype)
        grad_logits = grad_logits * (grad / grad_logits.size(0))
        return grad_logits.reshape(ctx.shape).to(ctx.dtype), None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, group, vocab_size: int | None = None
) -> torch.Tensor:
    """Mean cross-entropy of logits split by vocabulary: `logits` (..., V_p / tp) is this rank's slice, `targets`
    (...) the full ids. Columns at or past `vocab_size` (padding; default: none) are masked out."""
    tp, _ = _tp_size_and_rank(group)
    padded = logits.size(-1) * tp
    vocab_size = padded if vocab_size is None else vocab_size
    if not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size must be in [1, {padded}] (logits' last dim x tp), got {vocab_size}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(logits.shape[:-1])}, got {tuple(targets.shape)}")
    loss = _VocabParallelCrossEntropy.apply(logits, targets, group, vocab_size)
    return loss.to(logits.dtype)


# ---- the parallel GPT ----


class ParallelSelfAttention(nn.Module):
    """Heads split over ranks: c_attn is column-parallel (this rank's q, k and v heads), c_proj row-parallel."""

    def __init__(self, config: GPTConfig, group):
        super().__init__()
        tp, _ = _tp_size_and_rank(group)
        _check_divisible("n_embd (the hidden size)", config.n_embd, tp)
        _check_divisible("n_head", config.n_head, tp)
        self.c_attn = ColumnParallelLinear(config.n_embd, 3 * config.n_embd, group)
        self.c_proj = RowParallelLinear(config.n_embd, config.n_embd, group)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head // tp  # heads on this rank
        self.backend = config.attention_backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).chunk(3, dim=2)  # 3 x (B, T, C / tp)
        q, k, v = (t.reshape(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))  # (B, H / tp, T, D)
        y = attention(q, k, v, causal=True, backend=self.backend)  # (B, H / tp, T, D)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, C / tp)
        return self.resid_dropout(self.c_proj(y))


class ParallelMLP(nn.Module):
    def __init__(self, config: GPTConfig, group):
        super().__init__()
        self.c_fc = ColumnParallelLinear(config.n_embd, 4 * config.n_embd, group)
        self.c_proj = RowParallelLinear(4 * config.n_embd, config.n_embd, group)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class ParallelBlock(nn.Module):
    def __init__(self, config: GPTConfig, group):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=_LN_EPS)
        self.attn = ParallelSelfAttention(config, group)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=_LN_EPS)
        self.mlp = ParallelMLP(config, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TensorParallelGPT(nn.Module):
    """`impl.gpt.GPT` with every block, the embedding and the tied output layer split over `group`.

    Parameter names are the GPT's; `shard_state_dict` maps a GPT state (or its gradients) to this rank's slices.
    `forward` returns this rank's logits slice (B, T, V_p / tp) and the loss; `full_logits` gathers them.
    """

    def __init__(self, config: GPTConfig, group):
        super().__init__()
        self.config, self.group = config, group
        self.tp, self.rank = _tp_size_and_rank(group)
        self.transformer = nn.ModuleDict(
            dict(
                wte=VocabParallelEmbedding(config.vocab_size, config.n_embd, group),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(ParallelBlock(config, group) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=_LN_EPS),
            )
        )
        padded = self.transformer.wte.padded_num_embeddings
        self.lm_head = ColumnParallelLinear(config.n_embd, padded, group, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, shard by shard

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        n_pos = idx.shape[1]
        if n_pos > self.config.block_size:
            raise ValueError(f"idx has {n_pos} positions, more than the model's block_size={self.config.block_size}")
        pos = torch.arange(n_pos, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, V_p / tp)
        if targets is None:
            return logits, None
        return logits, vocab_parallel_cross_entropy(logits, targets, self.group, self.config.vocab_size)

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """All ranks' slices side by side, padding dropped: (B, T, vocab_size)."""
        return gather_from_parallel(logits, self.group)[..., : self.config.vocab_size]

    def shard_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's slice of each tensor of a full GPT state dict (or of a dict of its gradients)."""
        return {name: self._shard(name, t) for name, t in state.items()}

    def _shard(self, name: str, t: torch.Tensor) -> torch.Tensor:
        tp, rank = self.tp, self.rank
        if name in ("transformer.wte.weight", "lm_head.weight"):
            padding = self.transformer.wte.padded_num_embeddings - t.shape[0]
            t = torch.cat([t, t.new_zeros(padding, t.shape[1])])  # (V_p, C)
            return t.chunk(tp)[rank].clone()
        if name.endswith("attn.c_attn.weight") or name.endswith("attn.c_attn.bias"):
            return torch.cat([part.chunk(tp)[rank] for part in t.chunk(3)])  # this rank's q, k, v heads
        if name.endswith("mlp.c_fc.weight") or name.endswith("mlp.c_fc.bias"):
            return t.chunk(tp)[rank].clone()
        if name.endswith("c_proj.weight"):
            return t.chunk(tp, dim=1)[rank].clone()
        return t.clone()  # replicated: layer norms, position embedding, row-parallel biases


def tensor_parallelize(gpt: GPT, group) -> TensorParallelGPT:
    """The tensor-parallel twin of `gpt` on this rank of `group`, holding this rank's slices of its weights."""
    if not isinstance(gpt, GPT):
        raise TypeError(f"gpt must be an impl.gpt.GPT, got {type(gpt).__name__}")
    weight = gpt.transformer.wte.weight
    model = TensorParallelGPT(gpt.config, group).to(device=weight.device, dtype=weight.dtype)
    model.load_state_dict(model.shard_state_dict(gpt.state_dict()))
    return model.train(gpt.training)
