"""Megatron-LM tensor parallelism (Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion Parameter Language
Models Using Model Parallelism", section 3, Figures 3 and 4), applied in place to `impl.gpt.GPT`.

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

Usage (every rank of `group` starts from the same full GPT, e.g. built from one seed or one checkpoint):

    gpt = tensor_parallelize(GPT(config), group)   # the same object, its linears swapped for the parallel ones
    logits, loss = gpt(idx, targets)               # this rank's vocabulary slice (B, T, V_p / tp), the full loss
    full_logits(gpt, logits)                       # (B, T, vocab_size), gathered (differentiable)
    full_state_dict(gpt)                           # collective: the unsharded GPT's state dict, same names
    gpt.load_state_dict(shard_state_dict(gpt, state))   # a full GPT state (or gradients) onto this rank
    unshard(gpt)                                   # collective: a plain GPT holding the full weights

In place means: each block's `attn.c_attn` (column-parallel, this rank's q, k and v heads side by side, so
`CausalSelfAttention`'s view(B, T, 3, H, D) with H = `attn.n_head` = n_head / tp is right), `attn.c_proj` and
`mlp.c_proj` (row-parallel), `mlp.c_fc` (column-parallel), `transformer.wte` (`VocabParallelEmbedding`) and
`lm_head` (column-parallel over the padded vocabulary, tied to the parallel `wte`) are replaced, and
`gpt.loss_fn` becomes the vocab-parallel cross-entropy (targets of -100 are ignored, like F.cross_entropy).
Parts the GPT does not hold (a pipeline stage's) are skipped. Parameter names stay the GPT's.

Everything else (LayerNorms, the position embedding, row-parallel biases) is replicated, and its gradient is the
same on every rank of `group` (the f/g pair makes the gradient of every replicated activation identical), so
data parallelism over the other dimension (DDP, FSDP or `Zero` with `process_group=` the data-parallel group)
wraps the TP'd GPT as it is. Dropout acts on replicated activations: the ranks of one TP group must draw the same
random numbers (seed them alike). `tp_groups(tp)` cuts the world into tensor-parallel groups of `tp`
consecutive ranks and data-parallel groups across them.
"""

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from impl.common.checks import check_positive_int
from impl.gpt import GPT

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


# ---- the GPT, parallelized in place ----


def _blocks(gpt: GPT) -> list[nn.Module]:
    h = gpt.transformer.h
    return list(h.values() if isinstance(h, nn.ModuleDict) else h)


def tensor_parallelize(gpt: GPT, group) -> GPT:
    """Split `gpt` over `group` in place (see the module docstring) and return it. Every rank must pass the same
    full GPT; each keeps its slices of the weights. Sizes are checked before any weight is touched."""
    if not isinstance(gpt, GPT):
        raise TypeError(f"gpt must be an impl.gpt.GPT, got {type(gpt).__name__}")
    tp, _ = _tp_size_and_rank(group)
    if getattr(gpt, "tp_group", None) is not None:
        raise ValueError("gpt is already tensor-parallel (tensor_parallelize was called on it before)")
    c = gpt.config
    _check_divisible("n_embd (the hidden size)", c.n_embd, tp)
    _check_divisible("n_head", c.n_head, tp)
    _check_divisible("4 * n_embd (the MLP width)", 4 * c.n_embd, tp)
    with torch.no_grad():
        for block in _blocks(gpt):
            attn, mlp = block.attn, block.mlp
            attn.c_attn = _parallel_linear(ColumnParallelLinear, attn.c_attn, group, parts=3)
            attn.c_proj = _parallel_linear(RowParallelLinear, attn.c_proj, group)
            attn.n_head = c.n_head // tp  # the heads this rank holds
            mlp.c_fc = _parallel_linear(ColumnParallelLinear, mlp.c_fc, group)
            mlp.c_proj = _parallel_linear(RowParallelLinear, mlp.c_proj, group)
        tr, head = gpt.transformer, gpt.lm_head
        wte = tr["wte"]
        if wte is not None:
            parallel = VocabParallelEmbedding(c.vocab_size, c.n_embd, group, device="meta")
            parallel.weight = nn.Parameter(
                _shard_tensor(wte.weight, ("vocab", c.vocab_size), group), wte.weight.requires_grad
            )
            tr["wte"] = parallel
        if head is not None:
            padded = math.ceil(c.vocab_size / tp) * tp
            parallel = ColumnParallelLinear(c.n_embd, padded, group, bias=False, device="meta")
            if wte is not None and head.weight is wte.weight:
                parallel.weight = tr["wte"].weight  # weight tying, shard by shard
            else:  # a last pipeline stage's own copy of the embedding
                local = _shard_tensor(head.weight, ("vocab", c.vocab_size), group)
                parallel.weight = nn.Parameter(local, head.weight.requires_grad)
            gpt.lm_head = parallel
    gpt.loss_fn = functools.partial(vocab_parallel_cross_entropy, group=group, vocab_size=c.vocab_size)
    gpt.tp_group = group
    return gpt


def _parallel_linear(cls, linear: nn.Linear, group, **kwargs) -> nn.Module:
    """`cls` (column- or row-parallel) holding this rank's slice of `linear`'s weight and bias."""
    w = linear.weight
    layer = cls(linear.in_features, linear.out_features, group, bias=linear.bias is not None, device="meta", **kwargs)
    layouts = _module_layouts(layer, None)
    for name, p in linear.named_parameters(recurse=False):
        local = _shard_tensor(p, layouts.get(name), group).to(device=w.device, dtype=w.dtype)
        setattr(layer, name, nn.Parameter(local, requires_grad=p.requires_grad))
    return layer


# ---- layouts: how each parameter of a TP'd GPT maps onto the unsharded one ----


def _module_layouts(module: nn.Module, vocab_size: int | None) -> dict[str, tuple]:
    """{parameter name: layout} for the split parameters of `module` itself; absent names are replicated."""
    if isinstance(module, VocabParallelEmbedding):
        return {"weight": ("vocab", module.num_embeddings)}
    if isinstance(module, ColumnParallelLinear):
        if vocab_size is not None:  # the output layer: rows are the (padded) vocabulary
            return {"weight": ("vocab", vocab_size)}
        return {name: ("column", module.parts) for name in ("weight", "bias") if getattr(module, name) is not None}
    if isinstance(module, RowParallelLinear):
        return {"weight": ("row",)}
    return {}


def _layouts(gpt: GPT) -> dict[str, tuple]:
    out = {}
    for prefix, module in gpt.named_modules():
        vocab = gpt.config.vocab_size if module is gpt.lm_head else None
        for name, layout in _module_layouts(module, vocab).items():
            out[f"{prefix}.{name}" if prefix else name] = layout
    return out


def _shard_tensor(t: torch.Tensor, layout: tuple | None, group) -> torch.Tensor:
    """This rank's slice of the full tensor `t` under `layout` (None: replicated, a copy)."""
    tp, rank = _tp_size_and_rank(group)
    t = t.detach()
    if layout is None:
        return t.clone()
    if layout[0] == "vocab":
        padding = math.ceil(t.shape[0] / tp) * tp - t.shape[0]
        return torch.cat([t, t.new_zeros(padding, *t.shape[1:])]).chunk(tp)[rank].clone()  # (V_p / tp, C)
    if layout[0] == "column":
        return torch.cat([part.chunk(tp)[rank] for part in t.chunk(layout[1])])  # [q_i; k_i; v_i] when fused
    return t.chunk(tp, dim=1)[rank].clone()  # row


def _unshard_tensor(local: torch.Tensor, layout: tuple | None, group) -> torch.Tensor:
    """Collective: the full tensor from every rank's slice under `layout`."""
    if layout is None:
        return local.detach().clone()
    parts = _all_gather(local.detach(), group)
    if layout[0] == "vocab":
        return torch.cat(parts)[: layout[1]]
    if layout[0] == "column":
        n = layout[1]
        return torch.cat([torch.cat([p.chunk(n)[j] for p in parts]) for j in range(n)])
    return torch.cat(parts, dim=1)  # row


def _tp_group(gpt: GPT):
    group = getattr(gpt, "tp_group", None) if isinstance(gpt, GPT) else None
    if group is None:
        raise ValueError(f"gpt must be a GPT returned by tensor_parallelize, got {type(gpt).__name__}")
    return group


def shard_state_dict(gpt: GPT, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's slice of each tensor of a full GPT state dict (or of a dict of its gradients, by name)."""
    group, layouts = _tp_group(gpt), _layouts(gpt)
    return {name: _shard_tensor(t, layouts.get(name), group) for name, t in state.items()}


def full_state_dict(gpt: GPT) -> dict[str, torch.Tensor]:
    """Collective over the TP group: the state dict of the unsharded GPT, names and shapes identical to it."""
    group, layouts = _tp_group(gpt), _layouts(gpt)
    return {name: _unshard_tensor(t, layouts.get(name), group) for name, t in gpt.state_dict().items()}


def unshard(gpt: GPT) -> GPT:
    """Collective: a new, plain GPT (not parallel) holding the full weights of the tensor-parallel `gpt`."""
    state = full_state_dict(gpt)
    weight = state["transformer.wte.weight"]
    full = GPT(gpt.config).to(device=weight.device, dtype=weight.dtype)
    full.load_state_dict(state)
    return full.train(gpt.training)


def full_logits(gpt: GPT, logits: torch.Tensor) -> torch.Tensor:
    """All ranks' vocabulary slices side by side, padding dropped: (B, T, vocab_size); differentiable."""
    return gather_from_parallel(logits, _tp_group(gpt))[..., : gpt.config.vocab_size]


# ---- process groups for data x tensor parallelism ----


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's tensor-parallel group (`tp` consecutive ranks) and data-parallel group (the ranks that hold
    the same TP slice), with its coordinates in the (dp, tp) grid."""

    tp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    tp: int
    dp: int
    tp_rank: int
    dp_rank: int


def tp_groups(tp: int) -> ParallelGroups:
    """Collective (every rank calls it): cut the world of dp * tp ranks into TP groups {d*tp, ..., d*tp + tp - 1}
    and DP groups {t, t + tp, ...}; the TP groups sit on consecutive ranks (one node's GPUs under torchrun)."""
    check_positive_int("tp", tp)
    if not dist.is_initialized():
        raise ValueError("tp: tp_groups needs an initialized process group (run under spawn() or torchrun)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % tp:
        raise ValueError(f"tp must divide the world size {world}, got {tp}")
    # Every rank creates every group, in the same order, and keeps its own two.
    tp_all = [dist.new_group(list(range(d * tp, (d + 1) * tp))) for d in range(world // tp)]
    dp_all = [dist.new_group(list(range(t, world, tp))) for t in range(tp)]
    return ParallelGroups(tp_all[rank // tp], dp_all[rank % tp], tp, world // tp, rank % tp, rank // tp)
