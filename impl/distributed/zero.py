"""ZeRO stages 0-3: partitioning optimizer state, gradients and parameters across data-parallel ranks.

Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models" (SC 2020), Sec. 5
and Fig. 1. With Ψ parameters, N ranks and Adam in mixed precision (bf16 parameters and gradients, fp32 master
weights, momentum and variance: K = 12 bytes of optimizer state per parameter), the model states on each rank
take (bytes; in fp32 the parameters are their own master copy and the pattern is 4 + 4 + 8):

    stage 0  plain data parallel   2Ψ + 2Ψ + KΨ        all-reduce the gradients                  moves 2Ψ
    stage 1  P_os                  2Ψ + 2Ψ + KΨ/N      reduce-scatter gradients, all-gather params  2Ψ
    stage 2  P_os+g                2Ψ + (2 + K)Ψ/N     ... each gradient as backward produces it    2Ψ
    stage 3  P_os+g+p              (2 + 2 + K)Ψ/N      + all-gather params for forward and backward 3Ψ

Every trainable tensor is flattened, padded to a multiple of N and cut into N equal shards; rank r owns shard r
of each and runs the optimizer (torch's own, e.g. AdamW) on its shards only. The padding is counted in
`memory_breakdown()` and `_Comm.bytes_moved`, so measured bytes match the formulas above exactly.

Composition: under stage 3 a forward that runs inside backward (a checkpoint's replay) keeps the parameters its
pre-hooks gathered until their gradients are reduced. Under stages 2-3 a pipeline stage's tied weight (see
`PipelineSchedule`, which sums its gradient over the first and last stage after backward) is reduced in `step()`,
as in stage 1: its whole gradient lives until then, then the rank keeps only its shard.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from impl.common.checks import check_bool, check_int, check_one_of

STAGES = (0, 1, 2, 3)
# The flat-tensor collectives under their current names (torch 2.13, which deprecates the old ones) or the
# long-standing ones (torch 2.11 on the GPU image has only these): same arguments, same behaviour, gloo included.
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _Comm:
    """ZeRO's three collectives on one process group. `bytes_moved` adds up the paper's volume (Sec. 7.2): the
    size of the full tensor for a reduce-scatter or an all-gather, twice that for an all-reduce."""

    def __init__(self, group):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.bytes_moved = 0

    def broadcast_from_first(self, tensor: torch.Tensor) -> None:
        dist.broadcast(tensor, src=dist.get_global_rank(self.group, 0), group=self.group)

    def all_reduce_mean(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor, op=dist.ReduceOp.AVG, group=self.group)
        self.bytes_moved += 2 * tensor.numel() * tensor.element_size()

    def reduce_scatter_mean(self, full: torch.Tensor) -> torch.Tensor:
        shard = full.new_empty(full.numel() // self.world_size)
        _reduce_scatter_flat(shard, full, op=dist.ReduceOp.AVG, group=self.group)
        self.bytes_moved += full.numel() * full.element_size()
        return shard

    def all_gather(self, full: torch.Tensor, shard: torch.Tensor) -> None:
        _all_gather_flat(full, shard, group=self.group)
        self.bytes_moved += full.numel() * full.element_size()


@dataclass
class _Flat:
    """One trainable parameter as ZeRO holds it on this rank."""

    param: nn.Parameter
    numel: int  # elements of the parameter
    padded: int  # numel rounded up to a multiple of the world size (stage 0: numel)
    lo: int  # where this rank's shard starts in the padded flat tensor
    full: torch.Tensor  # (padded,) storage behind param.data; stage 3 frees it outside forward/backward
    shard: torch.Tensor  # (padded // N,) this rank's slice in the compute dtype (a view of `full` below stage 3)
    master: torch.Tensor  # what the optimizer updates: fp32 `shard`, or its own fp32 copy in mixed precision
    grad: torch.Tensor | None = None  # stages 2-3: this rank's averaged gradient shard
    gathered: bool = True
    deferred: bool = False  # stages 2-3: reduced in step(), not in backward (a pipeline's tied weight)

    def slice(self, full_value: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a tensor shaped like the parameter."""
        flat = F.pad(full_value.reshape(-1), (0, self.padded - self.numel))  # (padded,)
        return flat[self.lo : self.lo + self.shard.numel()]


class Zero:
    """Data-parallel training of `model` with ZeRO `stage` 0-3 over `process_group` (default: the world).

    Call it like the model; then `loss.backward()`, `step()`, `zero_grad()`. `optimizer_cls(shards,
    **optimizer_kwargs)` is built over this rank's fp32 shards. `mixed_precision=True` keeps bf16 parameters
    and gradients with fp32 master weights and optimizer state (the paper's setting).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer_cls: type[torch.optim.Optimizer],
        *,
        stage: int,
        process_group: dist.ProcessGroup | None = None,
        mixed_precision: bool = False,
        **optimizer_kwargs,
    ):
        _check_args(model, optimizer_cls, stage, mixed_precision)
        if not dist.is_initialized():
            raise ValueError("process_group: Zero needs an initialized process group (run under spawn() or torchrun)")
        self.module = model
        self.stage = stage
        self.mixed_precision = mixed_precision
        self.group = process_group if process_group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.dtype = torch.bfloat16 if mixed_precision else torch.float32
        self.comm = _Comm(self.group)
        self._flats = [self._flatten(p) for p in model.parameters() if p.requires_grad]
        self.optimizer = optimizer_cls([f.master for f in self._flats], **optimizer_kwargs)
        self.comm.bytes_moved = 0  # count training traffic only, not the initial broadcast
        if stage >= 2:
            tied = _pipeline_tied_weight(model)
            for f in self._flats:
                if f.param is tied:  # PipelineSchedule adds the other stage's gradient after backward
                    f.deferred = True
                    continue
                f.param.register_post_accumulate_grad_hook(lambda _, f=f: self._reduce_grad(f))
        if stage == 3:
            self._install_gather_hooks()

    def _flatten(self, p: nn.Parameter) -> _Flat:
        """Broadcast rank 0's values, move them into a padded flat tensor and cut out this rank's shard."""
        self.comm.broadcast_from_first(p.data)
        numel = p.numel()
        shards = self.world_size if self.stage > 0 else 1
        shard_numel = -(-numel // shards)
        padded = shard_numel * shards
        lo = self.rank * shard_numel if self.stage > 0 else 0
        value = F.pad(p.detach().reshape(-1).float(), (0, padded - numel))  # (padded,) fp32
        full = value.to(self.dtype)
        shard = full[lo : lo + shard_numel]
        if self.stage == 3:
            shard = shard.clone()
        master = value[lo : lo + shard_numel].clone() if self.mixed_precision else shard
        p.data = full[:numel].view(p.shape)
        f = _Flat(p, numel, padded, lo, full, shard, master)
        if self.stage == 3:
            self._free(f)
        return f

    # ---- stage 3: parameters exist in full only while a module runs forward or backward ----

    def _gather(self, flats: list[_Flat]) -> None:
        for f in flats:
            if not f.gathered:
                f.full.untyped_storage().resize_(f.padded * f.full.element_size())
                self.comm.all_gather(f.full, f.shard)
                f.gathered = True

    def _free(self, f: _Flat) -> None:
        f.full.untyped_storage().resize_(0)
        f.gathered = False

    def _install_gather_hooks(self) -> None:
        owner = {id(f.param): f for f in self._flats}
        for module in self.module.modules():
            flats = [owner[id(p)] for p in module.parameters(recurse=False) if id(p) in owner]
            if flats:
                module.register_forward_pre_hook(lambda _m, _args, flats=flats: self._gather(flats))
                module.register_forward_hook(lambda _m, _args, out, flats=flats: self._after_forward(flats, out))

    def _after_forward(self, flats: list[_Flat], output) -> None:
        """Free the module's parameters; gather them again when the gradient of its output arrives.

        A forward that runs inside backward is a checkpoint's replay (Chen et al. 2016, Algorithm 1): its
        pre-hooks have gathered the parameters again, and the replayed graph's backward, which comes next, reads
        them, so they stay until `_reduce_grad` frees each one once its gradient is reduced."""
        if torch._C._current_graph_task_id() != -1:  # -1 outside backward
            return
        for f in flats:
            self._free(f)
        for t in tree_flatten(output)[0]:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(lambda _grad: self._gather(flats))

    # ---- gradients and the optimizer step ----

    def _reduce_grad(self, f: _Flat) -> None:
        """Stages 2-3: as soon as backward has a parameter's gradient, average it onto its owner and drop it."""
        full = F.pad(f.param.grad.reshape(-1), (0, f.padded - f.numel))  # (padded,)
        shard = self.comm.reduce_scatter_mean(full)
        f.grad = shard if f.grad is None else f.grad.add_(shard)
        f.param.grad = None
        if self.stage == 3:
            self._free(f)

    def _averaged_grad(self, f: _Flat) -> torch.Tensor | None:
        """This rank's averaged gradient shard (stage 0: the whole averaged gradient). A deferred gradient (a
        pipeline's tied weight, whole until PipelineSchedule has summed both stages') is reduced here, as in
        stage 1, and then held as a shard like every other stage 2-3 gradient."""
        grad = f.param.grad
        if (self.stage >= 2 and not f.deferred) or grad is None:
            return f.grad
        if self.stage == 0:
            self.comm.all_reduce_mean(grad)
            return grad.reshape(-1)
        shard = self.comm.reduce_scatter_mean(F.pad(grad.reshape(-1), (0, f.padded - f.numel)))
        if f.deferred:
            f.grad, f.param.grad = shard, None
        return shard

    @torch.no_grad()
    def step(self) -> None:
        """Average the gradients, update this rank's shards, and share the new parameters where stage < 3."""
        for f in self._flats:
            if self.stage == 3 and f.gathered:  # a parameter that took no part in backward
                self._free(f)
            grad = self._averaged_grad(f)
            f.master.grad = None if grad is None else grad.to(torch.float32)
        self.optimizer.step()
        for f in self._flats:
            f.master.grad = None
            if self.mixed_precision:
                f.shard.copy_(f.master)
            if self.stage in (1, 2):
                self.comm.all_gather(f.full, f.shard.clone())

    def zero_grad(self) -> None:
        for f in self._flats:
            f.param.grad = None
            f.grad = None

    def __call__(self, *args, **kwargs):
        """Run the model; in mixed precision, floating-point inputs are cast to bf16 first."""
        if self.mixed_precision:

            def cast(x):
                return x.to(self.dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

            args, kwargs = tree_map(cast, (args, kwargs))
        return self.module(*args, **kwargs)

    # ---- accounting and checkpoints ----

    def memory_breakdown(self) -> dict[str, int]:
        """Bytes this rank holds now, read off the live tensors: parameters (with stage 3's shards), gradients,
        separate fp32 master weights, elementwise optimizer state (Adam's m and v), scalar optimizer state
        (Adam's step counters, outside the paper's formula); plus numel and the padding elements added."""
        params = sum(_nbytes(f.full) + (_nbytes(f.shard) if self.stage == 3 else 0) for f in self._flats)
        grads = sum(_nbytes(f.param.grad) + _nbytes(f.grad) for f in self._flats)
        master = sum(_nbytes(f.master) for f in self._flats) if self.mixed_precision else 0
        state = [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        optimizer = sum(_nbytes(t) for t in state if t.dim() > 0)
        return {
            "params": params,
            "grads": grads,
            "master": master,
            "optimizer": optimizer,
            "total": params + grads + master + optimizer,
            "optimizer_scalars": sum(_nbytes(t) for t in state if t.dim() == 0),
            "numel": sum(f.numel for f in self._flats),
            "padding": sum(f.padded - f.numel for f in self._flats),
            "world_size": self.world_size,
        }

    def _unshard(self, f: _Flat, shard: torch.Tensor) -> torch.Tensor:
        """Collective: the full tensor, shaped like the parameter, from every rank's `shard` of it."""
        if self.stage == 0:
            return shard.reshape(f.param.shape).clone()
        full = shard.new_empty(f.padded)
        self.comm.all_gather(full, shard.contiguous())
        return full[: f.numel].view(f.param.shape)

    def state_dict(self) -> dict:
        """Collective: the consolidated state on every rank, `{"model": ..., "optimizer": ...}`, with fp32
        parameters and optimizer state indexed like `optimizer_cls([trainable parameters])` in one process."""
        bytes_moved = self.comm.bytes_moved
        owner = {id(f.param): f for f in self._flats}
        model = {}
        for name, p in self.module.named_parameters():
            f = owner.get(id(p))
            model[name] = p.detach().clone() if f is None else self._unshard(f, f.master)
        model.update({name: b.detach().clone() for name, b in self.module.named_buffers()})
        optim = self.optimizer.state_dict()
        for index, state in optim["state"].items():
            f = self._flats[index]
            optim["state"][index] = {
                k: self._unshard(f, v) if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in state.items()
            }
        self.comm.bytes_moved = bytes_moved
        return {"model": model, "optimizer": optim}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a consolidated state (from `state_dict()` at any world size or stage, or from one process)."""
        model, optim = _check_state_dict(state_dict, self.module)
        owner = {id(f.param): f for f in self._flats}
        for name, p in self.module.named_parameters():
            value = model[name]
            if id(p) not in owner:
                p.copy_(value)
                continue
            f = owner[id(p)]
            value = value.to(torch.float32)
            if self.stage < 3:
                f.full[: f.numel].copy_(value.reshape(-1))
            f.shard.copy_(f.slice(value))
            if self.mixed_precision:
                f.master.copy_(f.slice(value))
        for name, b in self.module.named_buffers():
            b.copy_(model[name])
        sharded = {"param_groups": optim["param_groups"], "state": {}}
        for index, state in optim["state"].items():
            f = self._flats[index]
            # copies, scalars too: torch's optimizers step their `step` tensor in place, the caller's must not move
            sharded["state"][index] = {
                k: (f.slice(v).clone() if v.dim() > 0 else v.clone()) if isinstance(v, torch.Tensor) else v
                for k, v in state.items()
            }
        self.optimizer.load_state_dict(sharded)


def zero_state_bytes(
    numels: Sequence[int],
    *,
    stage: int,
    world_size: int,
    rank: int = 0,
    param_bytes: int = 4,
    master_bytes: int = 0,
    optimizer_bytes_per_param: int = 8,
) -> dict[str, int]:
    """The model-state bytes `Zero(...).memory_breakdown()` reports on `rank` once backward has made the
    gradients and a step has made the optimizer state, for trainable tensors of `numels` elements: the table of
    the module docstring (Sec. 5: 2Ψ + 2Ψ + KΨ split by stage). `param_bytes` per parameter and per gradient
    (2 in mixed precision, 4 in fp32), `master_bytes` per fp32 master weight (4 in mixed precision, else 0),
    `optimizer_bytes_per_param` (8 for Adam's fp32 m and v, 4 for SGD's momentum, 0 for plain SGD), so K =
    master_bytes + optimizer_bytes_per_param. Each tensor is padded to a multiple of N as `Zero` pads it. Keys:
    params, grads, master, optimizer (what the rank holds, padding included) and the padding bytes of each
    under `padding_<key>`."""
    check_one_of("stage", check_int("stage", stage), STAGES)
    check_int("world_size", world_size, low=1)
    check_int("rank", rank, low=0, high=world_size, high_open=True)
    check_one_of("param_bytes", param_bytes, (2, 4))
    check_one_of("master_bytes", master_bytes, (0, 4))
    check_int("optimizer_bytes_per_param", optimizer_bytes_per_param, low=0)
    out = dict.fromkeys(["params", "grads", "master", "optimizer"], 0)
    out.update(dict.fromkeys(["padding_params", "padding_grads", "padding_master", "padding_optimizer"], 0))

    def add(key: str, held: int, real: int, per: int) -> None:
        out[key] += held * per
        out[f"padding_{key}"] += (held - real) * per

    for n in numels:
        check_int("numels[i]", n, low=1)
        shard = -(-n // world_size) if stage > 0 else n  # elements of this rank's shard
        real = min(max(n - rank * shard, 0), shard) if stage else n  # the tensor's own elements, not padding
        if stage == 3:
            add("params", shard, real, param_bytes)
        else:  # the whole (padded) flat tensor
            add("params", shard * world_size if stage else n, n, param_bytes)
        add("grads", *((shard, real) if stage >= 2 else (n, n)), param_bytes)
        add("master", shard, real, master_bytes)
        add("optimizer", shard, real, optimizer_bytes_per_param)
    return out


def _nbytes(t: torch.Tensor | None) -> int:
    """Bytes of the storage behind `t` (0 once stage 3 has freed it)."""
    return 0 if t is None else t.untyped_storage().nbytes()


def _check_args(model, optimizer_cls, stage, mixed_precision) -> None:
    check_one_of("stage", check_int("stage", stage), STAGES)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise TypeError(f"optimizer_cls must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}")
    check_bool("mixed_precision", mixed_precision)
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            raise TypeError(f"parameters must be floating point; {name!r} has dtype {p.dtype}")
        if p.requires_grad and p.dtype != torch.float32:
            raise TypeError(f"trainable parameters must be float32 (Zero makes the bf16 copies); {name!r} is {p.dtype}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model must have at least one trainable parameter, got none")


def _pipeline_tied_weight(model: nn.Module) -> nn.Parameter | None:
    """The trainable `tied_weight` of a pipeline stage holding one end of it (`split_gpt`'s first or last stage,
    not both: a single stage holds it as one tensor), whose gradient `PipelineSchedule` sums after backward."""
    tied = getattr(model, "tied_weight", None)
    both_ends = getattr(model, "first", False) and getattr(model, "last", False)
    return tied if isinstance(tied, nn.Parameter) and tied.requires_grad and not both_ends else None


def _check_state_dict(state_dict, module: nn.Module) -> tuple[dict, dict]:
    if not isinstance(state_dict, dict) or set(state_dict) != {"model", "optimizer"}:
        got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
        raise ValueError(f"state_dict must have keys ['model', 'optimizer'], got {got}")
    model = state_dict["model"]
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if name not in model:
            raise ValueError(f"state_dict['model'] is missing {name!r}")
        if tuple(model[name].shape) != tuple(t.shape):
            raise ValueError(
                f"state_dict['model'][{name!r}] must have shape {tuple(t.shape)}, got {tuple(model[name].shape)}"
            )
    return model, state_dict["optimizer"]
