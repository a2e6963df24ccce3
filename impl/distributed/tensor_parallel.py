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

LoRA (impl.finetune.apply_lora) is applied before, on the full GPT: a block linear wrapped in a LoRALinear keeps
its adapter around the parallel base, with B split by output rows under a column-parallel base (A replicated)
and A split by input columns under a row-parallel one (B replicated); the base's `lora_update` puts f or g on the
adapter's r-wide activation. The tied embedding and head stay plain (no LoRA there), and QLoRA's 4-bit base is
refused. LoRA applied after this function is refused by apply_lora.

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

from impl.common.checks import check_positive_int
from impl.distributed.parallel_layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    _all_gather,
    _check_divisible,
    _tp_size_and_rank,
    gather_from_parallel,
    vocab_parallel_cross_entropy,
)
from impl.gpt import GPT

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
    _check_splittable(gpt)
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


def _is_lora(module: nn.Module) -> bool:
    """impl.finetune's LoRALinear (peft's names), recognized by its parts: the areas do not import each other."""
    return all(hasattr(module, name) for name in ("base_layer", "lora_A", "lora_B"))


def _check_splittable(gpt: GPT) -> None:
    """Every block linear is an nn.Linear, or a LoRA adapter on one; the tied embedding and head are plain."""
    for block in _blocks(gpt):
        for where, layer in (("attn.c_attn", block.attn.c_attn), ("attn.c_proj", block.attn.c_proj),
                             ("mlp.c_fc", block.mlp.c_fc), ("mlp.c_proj", block.mlp.c_proj)):  # fmt: skip
            base = layer.base_layer if _is_lora(layer) else layer
            if type(base) is not nn.Linear:
                raise ValueError(
                    f"gpt: tensor_parallelize splits nn.Linear layers (or LoRA adapters on them); {where} holds a "
                    f"{type(base).__name__}; use plain LoRA (not QLoRA's 4-bit base) or train without TP"
                )
    head, wte = gpt.lm_head, gpt.transformer["wte"]
    for name, module, cls in (("lm_head", head, nn.Linear), ("transformer.wte", wte, nn.Embedding)):
        if module is not None and type(module) is not cls:
            raise ValueError(
                f"gpt: {name} must be a plain {cls.__name__} for tensor_parallelize (the tied embedding is split by "
                f"vocabulary), got {type(module).__name__}; leave it out of LoRA's target_modules"
            )


def _parallel_linear(cls, linear: nn.Module, group, **kwargs) -> nn.Module:
    """`cls` (column- or row-parallel) holding this rank's slice of `linear`'s weight and bias. A LoRA adapter
    stays, around the parallel base: its A (row-parallel) or B (column-parallel) is split like the weight."""
    if _is_lora(linear):
        linear.base_layer = _parallel_linear(cls, linear.base_layer, group, **kwargs)
        layouts = _module_layouts(linear, None)
        for name in ("lora_A", "lora_B"):
            sub = getattr(linear, name)
            local = _shard_tensor(sub.weight, layouts.get(f"{name}.weight"), group)
            sub.weight = nn.Parameter(local, requires_grad=sub.weight.requires_grad)
            sub.out_features, sub.in_features = local.shape
        return linear
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
    if _is_lora(module) and isinstance(module.base_layer, ColumnParallelLinear):  # B's rows follow the output's
        return {"lora_B.weight": ("column", module.base_layer.parts)}
    if _is_lora(module) and isinstance(module.base_layer, RowParallelLinear):  # A's columns follow the input's
        return {"lora_A.weight": ("row",)}
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
