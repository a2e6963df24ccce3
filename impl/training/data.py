"""A deterministic, resumable data order: seeded shuffles, one per epoch, with a position that can be saved.

Epoch `e` visits the indices in `torch.randperm(n, generator=seed + e)` order, so the order depends only on
(seed, epoch) and never on the global RNG; the position is (epoch, offset), two ints a checkpoint can hold.
"""

from collections.abc import Callable
from typing import Any

import torch


class ShuffledBatches:
    """Endless iterator of batches `make_batch(indices)` over `num_items` items, reshuffled every epoch.

    A last partial batch of an epoch is dropped, so every batch has `batch_size` items.
    """

    def __init__(
        self, num_items: int, batch_size: int, *, seed: int = 0, make_batch: Callable[[torch.Tensor], Any] | None = None
    ):
        if not isinstance(num_items, int) or num_items < 1:
            raise ValueError(f"num_items must be an int >= 1, got {num_items!r}")
        if not isinstance(batch_size, int) or not 1 <= batch_size <= num_items:
            raise ValueError(f"batch_size must be an int in [1, num_items={num_items}], got {batch_size!r}")
        if not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.make_batch = make_batch or (lambda indices: indices)
        self.epoch = 0
        self.offset = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_items, generator=generator)

    def __iter__(self) -> "ShuffledBatches":
        return self

    def __next__(self) -> Any:
        if self.offset + self.batch_size > self.num_items:
            self.epoch, self.offset = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        indices = self._order[self.offset : self.offset + self.batch_size]
        self.offset += self.batch_size
        return self.make_batch(indices)

    def state_dict(self) -> dict:
        return {
            "num_items": self.num_items,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "epoch": self.epoch,
            "offset": self.offset,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = {"num_items": self.num_items, "batch_size": self.batch_size, "seed": self.seed}
        theirs = {k: state.get(k) for k in mine}
        if mine != theirs:
            raise ValueError(f"data state was saved for {theirs}, this iterator is {mine}")
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._order = self._permutation(self.epoch)
