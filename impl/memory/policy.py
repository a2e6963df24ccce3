"""Checkpointing policies for a model's stack of blocks: which blocks share a checkpointed segment.

`none` keeps every activation (O(L) memory, no recompute); `every` checkpoints each block (keeps L block inputs);
`every_k` cuts the stack into segments of k blocks; `sqrt` cuts it into about sqrt(L) segments, the schedule of
Chen et al. (2016), "Training Deep Nets with Sublinear Memory Cost", section 4.1: sqrt(L) kept segment inputs
plus one segment's activations during its replay, O(sqrt(L)) in all, for one extra forward pass.

`apply_checkpointing` leaves the model's own forward loop alone. It wraps each block's `forward`: the first block
of a segment opens a checkpoint frame, the following blocks run inside the same frame, the last one closes it.
So every block still runs, in order, with the arguments the model gives it (hooks and per-layer outputs intact),
and only the segment's first input is kept for backward.
"""

import math

import torch
from torch import nn

from impl.common.checks import check_instance, check_one_of, is_int
from impl.memory.checkpoint import _Frame, split_segments

POLICIES = ("none", "every", "every_k", "sqrt")
BLOCK_PATHS = ("transformer.h", "model.layers", "blocks", "layers", "h")
# Keyword arguments that make a layer write a KV cache: a replay would write it a second time.
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def find_blocks(model: nn.Module, blocks: str | None = None) -> nn.ModuleList | nn.ModuleDict:
    """The model's stack of blocks, an nn.ModuleList (or an nn.ModuleDict, run in its order: a pipeline stage's
    blocks keyed by their global index): at the attribute path `blocks`, else the outermost one whose path ends
    with one of `BLOCK_PATHS` (nanoGPT's `transformer.h`, Llama's `model.layers`, `blocks`...)."""
    stacks = (nn.ModuleList, nn.ModuleDict)
    if blocks is not None:
        if not isinstance(blocks, str):
            raise TypeError(f"blocks must be an attribute path such as 'model.layers', got {type(blocks).__name__}")
        try:
            found = model.get_submodule(blocks)
        except AttributeError:
            raise ValueError(f"blocks: {type(model).__name__} has no submodule at {blocks!r}") from None
        if not isinstance(found, stacks):
            raise TypeError(f"blocks: expected an nn.ModuleList at {blocks!r}, got {type(found).__name__}")
        return found
    for name, module in model.named_modules():
        if isinstance(module, stacks) and any(name == p or name.endswith("." + p) for p in BLOCK_PATHS):
            return module
    raise ValueError(
        f"blocks: found no nn.ModuleList at any of {BLOCK_PATHS} in {type(model).__name__}; "
        "pass blocks='path.to.the.list'"
    )


def segment_lengths(n_layers: int, policy: str, k: int | None = None) -> list[int]:
    """How `policy` cuts `n_layers` blocks into checkpointed segments ([] for `none`)."""
    check_one_of("policy", policy, POLICIES)
    if (k is not None) != (policy == "every_k"):
        raise ValueError(f"k must be given with policy='every_k' and only with it, got k={k!r} for {policy!r}")
    if policy == "none" or n_layers == 0:
        return []
    if policy == "every":
        return [1] * n_layers
    if policy == "sqrt":
        return split_segments(n_layers, max(1, round(math.sqrt(n_layers))))
    if not is_int(k):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= n_layers:
        raise ValueError(f"k must be between 1 and the number of layers ({n_layers}), got {k}")
    return [k] * (n_layers // k) + ([n_layers % k] if n_layers % k else [])


class _Segment:
    """The frame shared by the blocks of one segment during one forward pass."""

    def __init__(self, length: int):
        self.length = length
        self.frame: _Frame | None = None
        self.position = 0  # index within the segment of the next block expected to run


def _wrap(block: nn.Module, segment: _Segment, position: int) -> None:
    forward = block.forward

    def checkpointed_forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        kwargs.update({name: None for name in _CACHE_KWARGS if kwargs.get(name) is not None})
        if position == 0:
            segment.frame, segment.position = _Frame(), 0
        elif segment.frame is None or segment.position != position:
            raise RuntimeError(
                f"checkpointing: block {position} of a segment ran without the blocks before it; the blocks of a "
                "checkpointed stack must run in order"
            )
        out = segment.frame.run(forward, args, kwargs)
        segment.position += 1
        if segment.position == segment.length:
            segment.frame.close()
            segment.frame = None
        return out

    checkpointed_forward.original_forward = forward
    block.forward = checkpointed_forward


def _unwrap(block: nn.Module) -> None:
    original = getattr(block.forward, "original_forward", None)
    if original is None:
        return
    if getattr(original, "__func__", None) is type(block).forward:
        del block.forward  # the class's own forward shows through again
    else:
        block.forward = original


def apply_checkpointing(model: nn.Module, policy: str, *, k: int | None = None, blocks: str | None = None) -> nn.Module:
    """Checkpoint the model's blocks by `policy` (`none`, `every`, `every_k` with `k`, `sqrt`); returns the model.

    Applying again replaces the previous policy; `none` removes it."""
    check_instance("model", model, nn.Module, "an nn.Module")
    stack = find_blocks(model, blocks)
    stack = list(stack.values() if isinstance(stack, nn.ModuleDict) else stack)
    lengths = segment_lengths(len(stack), policy, k)
    for block in stack:
        if getattr(block, "gradient_checkpointing", False):
            raise ValueError(
                "model: transformers' own gradient checkpointing is already on; call "
                "model.gradient_checkpointing_disable() first"
            )
        _unwrap(block)
    start = 0
    for length in lengths:
        segment = _Segment(length)
        for position in range(length):
            _wrap(stack[start + position], segment, position)
        start += length
    return model
