"""Pipeline parallelism: GPipe (Huang et al. 2019, "GPipe: Efficient Training of Giant Neural Networks using
Pipeline Parallelism") and 1F1B (PipeDream-Flush; Narayanan et al. 2021, "Efficient Large-Scale Language Model
Training on GPU Clusters Using Megatron-LM", section 2.2.1, Figure 4).

The model is cut into p consecutive stages, one per rank; a batch is cut into m micro-batches. Stage s receives
each micro-batch's activation from stage s - 1, runs its layers and sends the result to stage s + 1; backward
sends the gradient of each received activation back the same way. Gradients of the m micro-batch losses (each
divided by m) add up to the gradient of the whole batch's mean loss, so one step equals a single-process step.

- GPipe: all m forwards, then all m backwards. Every stage holds m micro-batches' activations at once.
- 1F1B: stage s runs min(p - s - 1, m) warm-up forwards, then alternates one forward and one backward, then
  drains the remaining backwards. A stage never holds more than p - s micro-batches' activations.

Both idle for the same time, the bubble: with equal stages taking t_f and t_b per micro-batch, a step takes
(m + p - 1)(t_f + t_b), of which each stage computes m (t_f + t_b), so the idle fraction is (p - 1) / (m + p - 1).
Each stage records its timeline (compute intervals) so the bubble is measured, not just computed.

Sends are non-blocking (`isend`) and receives blocking, in the schedule's order on both sides of each link,
which keeps every pair of neighbours in step without deadlock.
"""

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from impl.common.checks import check_int, check_positive_int
from impl.gpt import GPT, cross_entropy

SCHEDULES = ("gpipe", "1f1b")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MAX_DIMS = 6  # an activation's shape travels in a fixed-size header: (dtype index, ndim, *shape)


def schedule_order(schedule: str, n_stages: int, stage: int, n_microbatches: int) -> list[tuple[str, int]]:
    """The ("F" | "B", micro-batch) operations stage `stage` runs, in order."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    m = n_microbatches
    if schedule == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    warmup = min(n_stages - stage - 1, m)
    order = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):  # steady state: one forward, one backward
        order += [("F", warmup + i), ("B", i)]
    return order + [("B", i) for i in range(m - warmup, m)]


@dataclass
class Interval:
    kind: str  # "F" or "B"
    microbatch: int
    start: float  # seconds since the step began (after a barrier over the group)
    end: float


class PipelineSchedule:
    """Runs `module`, this rank's stage of a pipeline over `group` (stage index = rank in the group).

    `step(inputs, targets)` runs one forward and backward over `n_microbatches` micro-batches and leaves the
    gradients of the whole batch in `module`'s parameters (it does not zero them nor step an optimizer). The
    first stage needs `inputs`, the last `targets` and computes `loss_fn(output, target)`; every rank may pass
    both. A module with a `tied_weight` attribute on the first and last stage (the GPT's embedding, reused as
    its output layer: see `split_gpt`) gets that weight's two gradients summed on both (a frozen one, under LoRA,
    none); `Zero` stages 2-3 reduce that gradient in their `step()`, after this sum.
    """

    def __init__(
        self,
        module: nn.Module,
        group,
        schedule: str = "1f1b",
        n_microbatches: int = 1,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ):
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        check_positive_int("n_microbatches", n_microbatches)
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
        self.module, self.group, self.schedule, self.n_microbatches = module, group, schedule, n_microbatches
        self.n_stages, self.stage = dist.get_world_size(group), dist.get_rank(group)
        self.is_first, self.is_last = self.stage == 0, self.stage == self.n_stages - 1
        if self.is_last and loss_fn is None:
            raise ValueError("loss_fn must be given on the last stage, got None")
        self.loss_fn = loss_fn
        self.device = next(module.parameters()).device  # where received activations are put
        self.order = schedule_order(schedule, self.n_stages, self.stage, n_microbatches)
        self.timeline: list[Interval] = []
        self.step_time = 0.0
        self.max_in_flight = 0  # most micro-batches whose activations this stage held at once

    def _peer(self, stage: int) -> int:
        return dist.get_global_rank(self.group, stage)

    def _split(self, batch: torch.Tensor | None, name: str) -> list[torch.Tensor]:
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor on stage {self.stage}, got {type(batch).__name__}")
        if batch.shape[0] % self.n_microbatches:
            raise ValueError(
                f"{name}'s batch size must be divisible by n_microbatches={self.n_microbatches}, got {batch.shape[0]}"
            )
        return list(batch.chunk(self.n_microbatches))

    def _send_activation(self, y: torch.Tensor, pending: list) -> None:
        header = torch.zeros(2 + _MAX_DIMS, dtype=torch.long, device=y.device)
        header[0], header[1] = _DTYPES.index(y.dtype), y.dim()
        header[2 : 2 + y.dim()] = torch.tensor(y.shape)
        y = y.detach().contiguous()
        for t in (header, y):
            pending.append((dist.isend(t, self._peer(self.stage + 1), group=self.group), t))

    def _recv_activation(self) -> torch.Tensor:
        header = torch.empty(2 + _MAX_DIMS, dtype=torch.long, device=self.device)
        dist.recv(header, self._peer(self.stage - 1), group=self.group)
        dtype, ndim = _DTYPES[header[0]], int(header[1])
        x = torch.empty(header[2 : 2 + ndim].tolist(), dtype=dtype, device=self.device)
        dist.recv(x, self._peer(self.stage - 1), group=self.group)
        return x.requires_grad_(x.is_floating_point())

    def step(self, inputs: torch.Tensor | None = None, targets: torch.Tensor | None = None) -> torch.Tensor | None:
        """One pipelined forward and backward; returns the batch's mean loss on the last stage, None elsewhere."""
        micro_inputs = self._split(inputs, "inputs") if self.is_first else None
        micro_targets = self._split(targets, "targets") if self.is_last else None
        stash, pending, losses, self.timeline = {}, [], [], []
        self.max_in_flight = 0
        dist.barrier(group=self.group)
        t0 = time.perf_counter()
        for kind, i in self.order:
            if kind == "F":
                x = micro_inputs[i] if self.is_first else self._recv_activation()
                start = time.perf_counter()
                y = self.module(x)
                if self.is_last:
                    y = self.loss_fn(y, micro_targets[i]) / self.n_microbatches
                    losses.append(y.detach())
                self.timeline.append(Interval("F", i, start - t0, time.perf_counter() - t0))
                if not self.is_last:
                    self._send_activation(y, pending)
                stash[i] = (x, y)
                self.max_in_flight = max(self.max_in_flight, len(stash))
            else:
                x, y = stash.pop(i)
                grad = None
                if not self.is_last:
                    grad = torch.empty_like(y)
                    dist.recv(grad, self._peer(self.stage + 1), group=self.group)
                start = time.perf_counter()
                torch.autograd.backward(y, grad)
                self.timeline.append(Interval("B", i, start - t0, time.perf_counter() - t0))
                if not self.is_first and x.grad is not None:
                    pending.append((dist.isend(x.grad, self._peer(self.stage - 1), group=self.group), x.grad))
            pending = [(work, t) for work, t in pending if not work.is_completed()]  # free what has been sent
        for work, _ in pending:
            work.wait()
        self.step_time = time.perf_counter() - t0
        sync_tied_gradients(self.module, self.group)
        return torch.stack(losses).sum() if self.is_last else None

    def bubble_fraction(self) -> float:
        """Share of the last step this stage spent not computing: 1 - compute time / step time."""
        busy = sum(interval.end - interval.start for interval in self.timeline)
        return 1.0 - busy / self.step_time if self.step_time > 0 else 0.0


def sync_tied_gradients(module: nn.Module, group) -> None:
    """Sum the gradient of `module.tied_weight` between the first and the last stage of `group` (no-op elsewhere,
    on a single stage, where the weight is one tensor already, and for a frozen weight, e.g. under LoRA)."""
    n_stages, stage = dist.get_world_size(group), dist.get_rank(group)
    weight = getattr(module, "tied_weight", None)
    if n_stages == 1 or weight is None or not weight.requires_grad or stage not in (0, n_stages - 1):
        return
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    peer = dist.get_global_rank(group, n_stages - 1 - stage)
    theirs = torch.empty_like(weight.grad)
    ours = weight.grad.clone()
    work = dist.isend(ours, peer, group=group)
    dist.recv(theirs, peer, group=group)
    work.wait()
    weight.grad += theirs


class GPTStage(GPT):
    """A GPT holding only consecutive blocks `blocks` of `gpt` (deep copies), the embeddings if `first`, the final
    LayerNorm and the output layer if `last`; the other parts are None, which `GPT.trunk` skips.

    It is the GPT's own module and forward, minus the removed parts: parameter names are the GPT's (blocks keep
    their global index in a ModuleDict), so a GPT state dict selects a stage's. `forward(x)` returns one tensor,
    what `PipelineSchedule` and torch's pipelining send on: hidden states (B, T, C), or logits on the last stage.
    The last stage's lm_head is its own copy of the embedding unless it is also the first; both are
    `tied_weight` for `PipelineSchedule`, which sums their gradients.
    """

    def __init__(self, gpt: GPT, blocks: range, first: bool, last: bool):
        nn.Module.__init__(self)  # not GPT.__init__: the parts are copied from `gpt`, not built
        self.config, self.loss_fn = gpt.config, gpt.loss_fn
        tr = gpt.transformer
        dropped = [tr.h[i] for i in range(len(tr.h)) if i not in blocks]
        dropped += [] if first else [tr["wte"], tr["wpe"]]
        dropped += [] if last else [tr["ln_f"]]
        memo = {id(m): None for m in dropped if m is not None}  # deepcopy gives None for these, copies the rest
        groups = (getattr(m, "group", None) for m in gpt.modules())  # a TP'd GPT's layers share, never copy
        memo.update({id(g): g for g in groups if isinstance(g, dist.ProcessGroup)})
        self.tp_group = getattr(gpt, "tp_group", None)
        self.transformer = copy.deepcopy(tr, memo)
        self.transformer["h"] = nn.ModuleDict({str(i): self.transformer.h[i] for i in blocks})
        # With the same memo, a head tied to a copied wte stays tied to the copy; else it is copied on its own.
        self.lm_head = copy.deepcopy(gpt.lm_head, memo) if last else None
        self.first, self.last = first, last

    @property
    def tied_weight(self) -> nn.Parameter | None:
        if self.last:
            return self.lm_head.weight
        return self.transformer.wte.weight if self.first else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) on the first stage, else the previous stage's hidden states (B, T, C)."""
        out, _ = super().forward(x)
        return out


def split_gpt(gpt: GPT, n_stages: int) -> list[GPTStage]:
    """Cut `gpt` into `n_stages` stages of consecutive blocks (the later ones one block longer if uneven)."""
    if not isinstance(gpt, GPT):
        raise TypeError(f"gpt must be an impl.gpt.GPT, got {type(gpt).__name__}")
    n_layer = gpt.config.n_layer
    check_int("n_stages", n_stages, low=1)
    if n_stages > n_layer:
        raise ValueError(f"n_stages must be at most n_layer={n_layer}, got {n_stages}")
    wrapped = [name or "gpt" for name, m in gpt.named_modules() if "forward" in vars(m)]
    if wrapped:  # a deep copy would keep calling the original module's forward, silently
        raise ValueError(
            f"gpt: {wrapped[0]} has its forward wrapped (impl.memory.apply_checkpointing?); split_gpt copies the "
            "blocks, so apply checkpointing to each stage after split_gpt"
        )
    bounds = [s * n_layer // n_stages for s in range(n_stages + 1)]
    return [GPTStage(gpt, range(bounds[s], bounds[s + 1]), s == 0, s == n_stages - 1) for s in range(n_stages)]


gpt_loss = cross_entropy  # the GPT's loss on the last stage's logits (B, T, vocab) and targets (B, T)
