"""Gradient checkpointing: keep a segment's inputs, drop what it saves for backward, recompute it in backward.

Chen, Xu, Zhang, Guestrin (2016), "Training Deep Nets with Sublinear Memory Cost", Algorithm 1 (the
"memory-efficient" plan): the forward pass keeps only each segment's inputs; when the backward pass reaches a
segment it runs the segment's forward again to regenerate the activations its gradients need. With L layers cut
into about sqrt(L) segments, O(L) activation memory becomes O(sqrt(L)) for the price of one extra forward.

The mechanism is autograd's saved-tensor hooks. While a segment runs, every tensor autograd wants to keep for
backward goes through our `pack` hook, which records only its shape and returns a slot number, so the tensor
itself is freed. The first `unpack` in backward replays the segment (same inputs, same RNG state, so the same
dropout masks) under a hook that collects the regenerated tensors into those slots. The graph built in forward
is the real one, so parameters inside the segment get gradients whether or not its inputs require grad (the
LoRA pitfall of reentrant checkpointing), several outputs and non-tensor arguments need no special care, and the
gradients are bitwise those of the plain model (fp32, CPU).

The segment's inputs are kept through an ordinary `save_for_backward` (`_KeepInputs`), so outer saved-tensor
hooks, `saved_tensor_bytes` among them, see and count them like any other tensor kept for backward.
"""

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._pytree import tree_flatten, tree_unflatten

from impl.common.checks import is_int

_AUTOCAST_DEVICES = ("cpu", "cuda")


class _KeepInputs(torch.autograd.Function):
    """Saves the tensors a segment needs for its replay the ordinary way; its output is never used."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*tensors)
        ctx.n_inputs = 1 + len(tensors)
        return anchor.new_empty(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (None,) * ctx.n_inputs


@dataclass
class _Kept:
    index: int  # position among the call's kept tensors


@dataclass
class _Prev:
    index: int  # position among the previous call's flattened tensor outputs


@dataclass
class _Call:
    fn: Callable
    spec: Any  # pytree spec of (args, kwargs)
    leaves: list  # non-tensor leaves as given; tensor leaves as _Kept / _Prev
    keeper: Any  # the _KeepInputs node holding the kept tensors (None when there are none)
    requires_grad: list[bool]  # of each kept tensor, so the replay builds the same graph


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class _Frame:
    """One checkpointed segment: the calls it ran in forward, and the slots of the tensors they saved.

    A segment may span several calls (`run` once per block, in order): a tensor argument that is an output of
    the previous call is linked to it instead of kept, so only the segment's first input stays in memory.
    """

    def __init__(self):
        self.calls: list[_Call] = []
        self.saved_meta: list[tuple[torch.Size, torch.dtype]] = []  # what forward saved, to check the replay
        self.replayed: list[torch.Tensor | None] | None = None
        self._last_out: list[torch.Tensor] = []
        self._rng_cpu = torch.get_rng_state()
        self._cuda_devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
        self._rng_cuda = [torch.cuda.get_rng_state(d) for d in self._cuda_devices]
        self._autocast = {
            d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
            for d in _AUTOCAST_DEVICES
            if torch.amp.is_autocast_available(d)
        }

    def run(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        """Run `fn(*args, **kwargs)` as the next call of this segment, dropping what it saves for backward."""
        flat, spec = tree_flatten((args, kwargs))
        leaves, kept = [], []
        for leaf in flat:
            if not isinstance(leaf, torch.Tensor):
                leaves.append(leaf)
            elif (i := next((i for i, o in enumerate(self._last_out) if o is leaf), None)) is not None:
                leaves.append(_Prev(i))
            else:
                leaves.append(_Kept(len(kept)))
                kept.append(leaf)
        keeper = _KeepInputs.apply(torch.empty(0, requires_grad=True), *kept).grad_fn if kept else None
        self.calls.append(_Call(fn, spec, leaves, keeper, [t.requires_grad for t in kept]))
        with saved_tensors_hooks(self._pack, self._unpack):
            out = fn(*args, **kwargs)
        self._last_out = _tensors(out)
        return out

    def close(self) -> None:
        """The segment's last call has run; stop holding its outputs."""
        self._last_out = []

    def _pack(self, t: torch.Tensor) -> int:
        self.saved_meta.append((t.shape, t.dtype))
        return len(self.saved_meta) - 1

    def _unpack(self, slot: int) -> torch.Tensor:
        if self.replayed is None or self.replayed[slot] is None:
            self._replay()
        t, self.replayed[slot] = self.replayed[slot], None  # each slot is read once per backward
        return t

    def _collect(self, t: torch.Tensor) -> None:
        self.replayed.append(t.detach())

    def _replay(self) -> None:
        self.replayed = []
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=self._cuda_devices))
            torch.set_rng_state(self._rng_cpu)
            for device, state in zip(self._cuda_devices, self._rng_cuda):
                torch.cuda.set_rng_state(state, device)
            for device, (enabled, dtype) in self._autocast.items():
                stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(saved_tensors_hooks(self._collect, lambda _: None))
            prev: list[torch.Tensor] = []
            for call in self.calls:
                saved = call.keeper.saved_tensors if call.keeper is not None else ()
                kept = [t.detach().requires_grad_(g) for t, g in zip(saved, call.requires_grad)]
                leaves = [
                    kept[x.index] if isinstance(x, _Kept) else prev[x.index] if isinstance(x, _Prev) else x
                    for x in call.leaves
                ]
                args, kwargs = tree_unflatten(leaves, call.spec)
                prev = _tensors(call.fn(*args, **kwargs))
        got = [(t.shape, t.dtype) for t in self.replayed]
        if got != self.saved_meta:
            raise RuntimeError(
                f"checkpoint: the replay saved {len(got)} tensors for backward where the forward saved "
                f"{len(self.saved_meta)}, or with other shapes/dtypes; the checkpointed function must compute the "
                "same thing when run again (a KV cache written in forward, or data-dependent control flow, breaks "
                "this)"
            )


def checkpoint(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`, keeping only its inputs for backward and recomputing the rest when needed."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    frame = _Frame()
    out = frame.run(fn, args, kwargs)
    frame.close()
    return out


def _run_segment(layers: Sequence[Callable], start: int, stop: int, x: Any) -> Any:
    for i in range(start, stop):
        x = layers[i](x)
    return x


def split_segments(n_layers: int, segments: int) -> list[int]:
    """Lengths of `segments` contiguous segments covering `n_layers` layers, as equal as possible."""
    if not is_int(segments):
        raise TypeError(f"segments must be an int, got {type(segments).__name__}")
    if not 1 <= segments <= n_layers:
        raise ValueError(f"segments must be between 1 and the number of layers ({n_layers}), got {segments}")
    base, extra = divmod(n_layers, segments)
    return [base + 1] * extra + [base] * (segments - extra)


def checkpoint_sequential(layers: Sequence[Callable], segments: int, x: Any) -> Any:
    """Run `layers` in order on `x`, cut into `segments` checkpointed segments (each one's input is kept)."""
    if not isinstance(layers, Sequence | torch.nn.Sequential | torch.nn.ModuleList):
        raise TypeError(f"layers must be a sequence of callables (list, nn.Sequential...), got {type(layers).__name__}")
    start = 0
    for length in split_segments(len(layers), segments):
        x = checkpoint(_run_segment, layers, start, start + length, x)
        start += length
    return x
