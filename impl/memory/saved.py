"""Counting the bytes autograd keeps for backward, through saved-tensor hooks.

Every tensor an op saves for its backward passes through `torch.autograd.graph.saved_tensors_hooks`' pack hook.
We note its storage and hand it back unchanged. Several saves of one storage (a tensor and its views, an input
saved by two ops) count once, which is what memory sees. Tensors saved inside a checkpointed segment never reach
these hooks (the checkpoint's own hooks, nearer, take them and drop them); its kept inputs do.
"""

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.autograd.graph import saved_tensors_hooks

from impl.common.checks import check_tensor


@dataclass
class SavedBytes:
    """What autograd saved during the block: distinct storages and their bytes (live while the block runs)."""

    storages: dict[tuple[str, int], int] = field(default_factory=dict)  # (device, data_ptr) -> nbytes
    saves: int = 0  # pack calls, duplicates included

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


def _key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


@contextmanager
def saved_tensor_bytes(exclude: Iterable[torch.Tensor] = ()) -> Iterator[SavedBytes]:
    """Count the distinct storages autograd saves for backward inside the block; storages of `exclude`
    (typically `model.parameters()`, which exist anyway) are left out. Usage:
    `with saved_tensor_bytes(exclude=model.parameters()) as saved: loss = model(x)`, then `saved.bytes`."""
    if isinstance(exclude, torch.Tensor) or not isinstance(exclude, Iterable):
        raise TypeError(f"exclude must be an iterable of tensors (model.parameters()...), got {type(exclude).__name__}")
    skip = {_key(check_tensor("exclude[i]", t)) for t in exclude}
    result = SavedBytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        result.saves += 1
        if t.layout == torch.strided and (key := _key(t)) not in skip:
            result.storages.setdefault(key, t.untyped_storage().nbytes())
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        yield result
