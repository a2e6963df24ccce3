"""Full states and gradient clipping for a tensor-parallel GPT (`impl.distributed.tensor_parallelize`).

A TP'd GPT holds slices of some parameters (column- and row-parallel linears, the vocab-parallel embedding and
output layer) and copies of the others. Its optimizer state (Adam's m and v) is sliced the same way, so one
rule moves both between full and sharded: a "skeleton", a TP'd GPT on the meta device with the same layouts,
is loaded with any tensors by parameter name and `full_state_dict` / `shard_state_dict` (impl.distributed) do
the rest.
"""

import torch
import torch.distributed as dist
from torch import nn


def skeleton(config, tp_group) -> nn.Module:
    """A tensor-parallel GPT on the meta device (no memory, no RNG drawn): the layouts without the weights."""
    from impl.distributed import tensor_parallelize
    from impl.gpt.model import GPT

    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        gpt = GPT(config)
    return tensor_parallelize(gpt, tp_group)


def tp_sharded(module: nn.Module) -> set[str]:
    """Names of the parameters split across the TP group (the others are the same on every TP rank)."""
    from impl.distributed import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    names = set()
    for prefix, m in module.named_modules():
        if isinstance(m, ColumnParallelLinear | VocabParallelEmbedding):
            names.update(f"{prefix}.{n}" for n, _ in m.named_parameters(recurse=False))
        elif isinstance(m, RowParallelLinear):
            names.add(f"{prefix}.weight")
    return names


def _with_tied(skel: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    if "lm_head.weight" not in out and "transformer.wte.weight" in out:
        out["lm_head.weight"] = out["transformer.wte.weight"]  # tied: ZeRO and optimizers keep it once
    return {name: out[name] for name in skel.state_dict()}


def _full(skel: nn.Module, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Collective over the TP group: the full tensors of this rank's slices, by name."""
    from impl.distributed import full_state_dict

    skel.load_state_dict(_with_tied(skel, local), assign=True)
    return full_state_dict(skel)


def gather_tp(skel: nn.Module, model: dict, named: dict) -> tuple[dict, dict]:
    """Collective over the TP group: the full model state dict and optimizer state by name from this rank's."""
    full_model = _full(skel, model)
    full_named = {name: dict(state) for name, state in named.items()}
    keys = sorted({k for s in named.values() for k, v in s.items() if isinstance(v, torch.Tensor) and v.dim()})
    for key in keys:  # Adam's exp_avg, exp_avg_sq: shaped like the parameters, sliced like them
        full = _full(skel, {n: s[key] for n, s in named.items()})
        for name in full_named:
            full_named[name][key] = full[name]
    return full_model, full_named


def shard_tp(skel: nn.Module, model: dict, named: dict) -> tuple[dict, dict]:
    """This rank's slices of a full model state dict and optimizer state by name (no communication)."""
    from impl.distributed import shard_state_dict

    local_model = shard_state_dict(skel, model)
    local_named = {name: dict(state) for name, state in named.items()}
    keys = sorted({k for s in named.values() for k, v in s.items() if isinstance(v, torch.Tensor) and v.dim()})
    for key in keys:
        local = shard_state_dict(skel, {n: s[key] for n, s in named.items()})
        for name in local_named:
            local_named[name][key] = local[name]
    return local_model, local_named


def clip_grads_(grads: list[tuple[torch.Tensor, bool]], max_norm: float, dp_group, tp_group) -> None:
    """Scale local gradient pieces so the norm of the whole gradient is at most `max_norm`, as
    `torch.nn.utils.clip_grad_norm_` does on one process. `grads` is (local piece, split across TP); pieces are
    summed over `dp_group` when the data-parallel engine shards them (None: replicated) and the TP-split ones over
    `tp_group` (None: no TP)."""
    if not grads:
        return
    device = grads[0][0].device
    squares = torch.zeros(2, device=device)  # [TP-split, same on every TP rank]
    for g, split in grads:
        squares[0 if split else 1] += g.float().pow(2).sum()
    if dp_group is not None:
        dist.all_reduce(squares, group=dp_group)
    if tp_group is not None:
        split = squares[:1].clone()
        dist.all_reduce(split, group=tp_group)
        squares = torch.cat([split, squares[1:]])
    coef = (max_norm / (squares.sum().sqrt() + 1e-6)).clamp(max=1.0)
    for g, _ in grads:
        g.mul_(coef)
