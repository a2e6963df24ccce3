"""Data and tensor parallelism for training the GPT: the launch environment, one engine per mode, full states.

`python -m impl train` under `torchrun` reads RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT from the
environment (multi-node torchrun sets the same variables), joins a gloo group on CPU or nccl on CUDA (one GPU
per local rank) and trains with one of these engines on the data-parallel ranks:

    none    no data parallelism (one process, or tensor parallelism alone)
    ddp     torch's DistributedDataParallel (Li et al. 2020): gradients all-reduced in buckets during backward
    fsdp2   torch's `fully_shard` (torch.distributed.fsdp) on every block and on the whole model (Zhao et al. 2023)
    zero1-3 the project's ZeRO (`impl.distributed.Zero`, Rajbhandari et al. 2020) at stage 1, 2 or 3

With `--tp K` the ranks form groups of K consecutive ranks; each group holds one model split by Megatron tensor
parallelism (`impl.distributed.tensor_parallelize`) and the data-parallel engine runs across the groups
(dp = world / K). Every engine keeps the optimizer of the single-process run: AdamW with weight decay on the
matrices only, the global gradient norm clipped first.

A full state is what one process holds: the model's state dict and the optimizer state by parameter name,
unsharded. It is what checkpoints are written from and read into, so a run saved at one world size and mode
resumes at any other.
"""

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from impl.gpt.parallel_tp import clip_grads_, gather_tp, shard_tp, skeleton, tp_sharded

MODES = ("none", "ddp", "fsdp2", "zero1", "zero2", "zero3")
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Layout:
    """Where this process sits: its global rank, and its place in the tensor- and data-parallel groups."""

    rank: int
    world_size: int
    local_rank: int
    tp: int  # tensor-parallel degree (ranks per model)
    mode: str  # the data-parallel engine, one of MODES

    @property
    def dp(self) -> int:
        return self.world_size // self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp


def launch_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when torchrun (or a launcher like it) started this process, or when a
    process group is already up (the rank of `impl.distributed.spawn`); else None."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank))
    if not all(name in os.environ for name in _ENV):
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def plan_layout(mode: str, tp: int, batch_size: int, n_head: int, env: tuple[int, int, int] | None) -> Layout:
    """Check the parallel options against the launch environment; a ValueError names what is wrong."""
    if mode not in MODES:
        raise ValueError(f"--parallel must be one of {list(MODES)}, got {mode!r}")
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"--tp must be a positive int, got {tp!r}")
    if env is None:
        if mode != "none" or tp != 1:
            what = f"--parallel {mode}" if mode != "none" else f"--tp {tp}"
            raise ValueError(
                f"{what} needs a distributed launch (torchrun --nproc-per-node N ... sets RANK, WORLD_SIZE, "
                "MASTER_ADDR and MASTER_PORT); none is set: drop the option or launch with torchrun"
            )
        return Layout(0, 1, 0, 1, "none")
    rank, world, local_rank = env
    if world % tp:
        raise ValueError(f"--tp must divide the world size {world}, got {tp}")
    if n_head % tp:
        raise ValueError(f"--tp must divide n_head={n_head} (heads are split across the ranks), got {tp}")
    dp = world // tp
    if dp > 1 and mode == "none":
        raise ValueError(
            f"--parallel none with {world} ranks and --tp {tp} would train {dp} separate copies of the model: "
            f"choose one of {list(MODES[1:])}, or --tp {world}"
        )
    if batch_size % dp:
        raise ValueError(
            f"--batch-size (the global batch) must be divisible by the {dp} data-parallel ranks, got {batch_size}"
        )
    return Layout(rank, world, local_rank, tp, mode)


def init_groups(layout: Layout, device: torch.device, timeout_s: float):
    """Join the world (gloo on CPU, nccl on CUDA) unless this process is in it already, and build the groups:
    (tp_group or None, dp_group). TP groups are consecutive ranks [k*tp, (k+1)*tp); a DP group one of each."""
    import datetime

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # else a launcher in this process (spawn) set the world up
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    tp_group = dp_group = None
    world, tp = layout.world_size, layout.tp
    for start in range(0, world, tp):  # every rank creates every group, in the same order
        group = dist.new_group(list(range(start, start + tp)))
        if start == layout.rank - layout.tp_rank:
            tp_group = group
    for offset in range(tp):
        group = dist.new_group(list(range(offset, world, tp)))
        if offset == layout.tp_rank:
            dp_group = group
    return (tp_group if tp > 1 else None), dp_group


# --- optimizer state by parameter name ------------------------------------------------------------------------


def optimizer_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter names in the optimizer's index order (its state_dict numbers parameters group by group)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    order = optimizer_order(model, optimizer)
    return {order[i]: s for i, s in optimizer.state_dict()["state"].items()}


def load_named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, named: dict[str, dict]) -> None:
    state = optimizer.state_dict()
    state["state"] = {i: named[n] for i, n in enumerate(optimizer_order(model, optimizer)) if n in named}
    optimizer.load_state_dict(state)


def load_full_model(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict whose tied weights may appear under one name only (ZeRO keeps each once)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {name for name in missing if name == "lm_head.weight"}
    if set(missing) - tied or unexpected:
        raise ValueError(f"state dict does not fit the model: missing {missing}, unexpected {unexpected}")


# --- the engines ----------------------------------------------------------------------------------------------


class _ZeroAdamW(torch.optim.AdamW):
    """AdamW over ZeRO's flat shards (one group): weight decay on the shards of matrices only (`decay`, one flag per
    shard) and the global gradient norm clipped first, the shards' squares summed over the data-parallel group (and
    the TP-split parameters' over the TP group: `split`, one flag per shard)."""

    def __init__(self, params, *, decay, split, weight_decay, clip, dp_group, tp_group, **kwargs):
        super().__init__(params, weight_decay=0.0, **kwargs)
        self.decay, self.split, self.decoupled, self.clip = decay, split, weight_decay, clip
        self.dp_group, self.tp_group = dp_group, tp_group

    @torch.no_grad()
    def step(self, closure=None):
        params = self.param_groups[0]["params"]
        if self.clip:
            grads = [(p.grad, s) for p, s in zip(params, self.split) if p.grad is not None]
            clip_grads_(grads, self.clip, self.dp_group, self.tp_group)
        lr = self.param_groups[0]["lr"]
        for p, decays in zip(params, self.decay):
            if decays and p.grad is not None:  # AdamW's decoupled decay, applied before the update as torch does
                p.mul_(1 - lr * self.decoupled)
        return super().step(closure)


class Engine:
    """One GPT (`module`, sharded or split as the mode has it) with its optimizer, driven the same way in every mode:
    `loss(x, y)` in `sync(last)`, backward, `step(lr)`, `zero_grad()`; `full_state()` / `load_full_state()`."""

    def __init__(self, model, cfg, layout: Layout, dp_group, tp_group, device: torch.device, make_optimizer):
        self.module, self.cfg, self.layout, self.device = model, cfg, layout, device
        self.dp_group, self.tp_group = dp_group, tp_group
        mode = layout.mode
        self.skeleton = self.split = None
        if tp_group is not None:
            from impl.distributed import tensor_parallelize

            self.skeleton = skeleton(model.config, tp_group)
            tensor_parallelize(model, tp_group)
        self.split = tp_sharded(model)
        self.zero = None
        self.wrapped = model
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(model, device_ids=ids, process_group=dp_group)
        elif mode == "fsdp2":
            from torch.distributed.device_mesh import DeviceMesh
            from torch.distributed.fsdp import fully_shard

            mesh = DeviceMesh.from_group(dp_group, device.type)
            for block in model.transformer.h:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        elif mode.startswith("zero"):
            from impl.distributed import Zero

            trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            self.zero = Zero(
                model, _ZeroAdamW, stage=int(mode[-1]), process_group=dp_group, lr=cfg.learning_rate,
                betas=(cfg.beta1, cfg.beta2), decay=[p.dim() >= 2 for _, p in trainable],
                split=[n in self.split for n, _ in trainable], weight_decay=cfg.weight_decay, clip=cfg.grad_clip,
                dp_group=dp_group, tp_group=tp_group,
            )  # fmt: skip
            self.wrapped = self.zero
        if self.zero is None:
            self.optimizer = make_optimizer(model, cfg, device)
        else:
            self.optimizer = self.zero.optimizer

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.wrapped(x, y)[1]

    def sync(self, last: bool):
        """DDP all-reduces only on the last micro-batch of an accumulated step."""
        if self.layout.mode == "ddp" and not last:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def zero_grad(self) -> None:
        if self.zero is not None:
            self.zero.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.zero is not None:
            self.zero.step()
            return
        if self.cfg.grad_clip:
            self._clip(self.cfg.grad_clip)
        self.optimizer.step()

    def _clip(self, max_norm: float) -> None:
        named = [(n, p) for n, p in self.module.named_parameters() if p.grad is not None]
        if self.tp_group is None:  # replicated gradients (DDP) or DTensors (FSDP2): torch finds the global norm
            torch.nn.utils.clip_grad_norm_([p for _, p in named], max_norm)
            return
        fsdp = self.layout.mode == "fsdp2"  # DTensor gradients: this rank's shard of its TP slice
        grads = [(p.grad.to_local() if fsdp else p.grad, n in self.split) for n, p in named]
        clip_grads_(grads, max_norm, self.dp_group if fsdp else None, self.tp_group)

    # ---- full states ----

    def full_state(self) -> tuple[dict, dict] | None:
        """Collective: (model state dict, optimizer state by name), full and on the CPU, on data-parallel rank 0
        of tensor-parallel rank 0 (global rank 0); None on the other ranks."""
        if self.zero is not None:
            state = self.zero.state_dict()
            order = [n for n, p in self.module.named_parameters() if p.requires_grad]
            model = state["model"]
            named = {order[i]: s for i, s in state["optimizer"]["state"].items()}
        elif self.layout.mode == "fsdp2":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True)  # on every rank: the TP slices gather next
            model = get_model_state_dict(self.module, options=options)
            named = get_optimizer_state_dict(self.module, self.optimizer, options=options).get("state", {})
        else:
            model = self.module.state_dict()
            named = named_optimizer_state(self.module, self.optimizer)
        if self.tp_group is not None:
            model, named = gather_tp(self.skeleton, model, named)
        if self.layout.rank != 0:
            return None
        cpu = lambda t: t.detach().cpu().clone() if isinstance(t, torch.Tensor) else t
        return {k: cpu(v) for k, v in model.items()}, {n: {k: cpu(v) for k, v in s.items()} for n, s in named.items()}

    def load_full_state(self, model: dict, named: dict) -> None:
        """Every rank: take this rank's part of a full state (every rank holds all of it)."""
        if self.tp_group is not None:
            model, named = shard_tp(self.skeleton, model, named)
        if self.zero is not None:
            order = [n for n, p in self.module.named_parameters() if p.requires_grad]
            groups = self.zero.optimizer.state_dict()["param_groups"]
            state = {i: named[n] for i, n in enumerate(order) if n in named}
            self.zero.load_state_dict({"model": model, "optimizer": {"state": state, "param_groups": groups}})
        elif self.layout.mode == "fsdp2":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.module, model, options=options)
            order = optimizer_order(self.module, self.optimizer)
            groups = [
                {**{k: v for k, v in g.items() if k != "params"}, "params": order[i : i + len(g["params"])]}
                for i, g in zip(_starts(self.optimizer), self.optimizer.param_groups)
            ]
            optim = {"state": {n: named[n] for n in order if n in named}, "param_groups": groups}
            set_optimizer_state_dict(self.module, self.optimizer, optim, options=options)
        else:
            load_full_model(self.module, model)
            load_named_optimizer_state(self.module, self.optimizer, named)


def _starts(optimizer: torch.optim.Optimizer) -> list[int]:
    starts, at = [], 0
    for group in optimizer.param_groups:
        starts.append(at)
        at += len(group["params"])
    return starts
