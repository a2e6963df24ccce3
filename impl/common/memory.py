"""Measuring memory: the peak bytes of tensors allocated during a block.

On CUDA the allocator's own statistics answer (`max_memory_allocated`). On CPU there is no such counter, so the
meter watches every op through a `TorchDispatchMode`: each new tensor storage adds its bytes when it appears and
subtracts them when Python's weak reference to it dies. The CPU figure is therefore exact and deterministic:
the same code gives the same bytes on every run and every machine, which is what lets a CPU report show
O(N^2) against O(N) or 16 bytes per parameter.

Only storages created inside the block count; tensors that existed before it (weights, inputs) do not. Python's
cyclic garbage collector runs once before the block and is paused during it: a tensor held only by a reference
cycle then counts until the block ends, instead of until whenever the collector would have run (which depends on
allocation counts, hence on the hash seed: a multi-rank row's peak moved by 3 KiB between runs before this).
"""

import gc
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from impl.common.device import resolve_device, synchronize


@dataclass
class _Storage:
    nbytes: int
    ref: weakref.ref = field(repr=False)


class _StorageTracker(TorchDispatchMode):
    """Adds up the bytes of live storages created by ops run under it."""

    def __init__(self, device_type: str):
        super().__init__()
        self.device_type = device_type
        self.current = 0
        self.peak = 0
        self._live: dict[int, _Storage] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # An output that shares storage with an input (a view, an in-place or out= op) is new memory only if
        # that storage is already ours; one that existed before the block stays uncounted.
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if self._counts(t)}
        for t in tree_flatten(out)[0]:
            if self._counts(t):
                storage = t.untyped_storage()
                if storage._cdata not in inputs or storage._cdata in self._live:
                    self._track(storage)
        return out

    def _counts(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t.device.type == self.device_type and t.layout == torch.strided

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata  # address of the C++ StorageImpl: unique while it lives
        nbytes = storage.nbytes()
        seen = self._live.get(key)
        if seen is None:
            self._live[key] = _Storage(nbytes, weakref.ref(storage, lambda _, key=key: self._free(key)))
            self.current += nbytes
        elif seen.nbytes != nbytes:  # resized in place (out= ops, resize_)
            self.current += nbytes - seen.nbytes
            seen.nbytes = nbytes
        self.peak = max(self.peak, self.current)

    def _free(self, key: int) -> None:
        seen = self._live.pop(key, None)
        if seen is not None:
            self.current -= seen.nbytes


class MemoryMeter:
    """Context manager; after the block, `peak` is the most bytes allocated at once during it and `current`
    the bytes allocated during it that are still alive at its end.

    >>> with MemoryMeter("cpu") as mem:
    ...     x = torch.empty(1024)
    >>> mem.peak, mem.current
    (4096, 4096)
    """

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = resolve_device(device)
        self.peak = 0
        self.current = 0
        self._tracker: _StorageTracker | None = None
        self._start = 0

    def __enter__(self) -> "MemoryMeter":
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            gc.collect()  # no earlier garbage is freed inside the block, and none is collected there (see above)
            self._gc_enabled = gc.isenabled()
            gc.disable()
            self._tracker = _StorageTracker(self.device.type)
            self._tracker.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
            self.current = torch.cuda.memory_allocated(self.device) - self._start
        else:
            self._tracker.__exit__(*exc)
            if self._gc_enabled:
                gc.enable()
            self.peak, self.current = self._tracker.peak, self._tracker.current

    @property
    def live(self) -> int:
        """Bytes allocated since the block began that are alive now (CPU: also valid inside the block)."""
        if self._tracker is not None:
            return self._tracker.current
        return torch.cuda.memory_allocated(self.device) - self._start


def tensor_bytes(*tensors: torch.Tensor) -> int:
    """Bytes of the given tensors' elements (views counted by their own extent, not their storage)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_peak(fn, *args, device: str | torch.device = "cpu", **kwargs) -> tuple[object, int]:
    """Run `fn(*args, **kwargs)` under a `MemoryMeter`; return (its result, the peak bytes)."""
    with MemoryMeter(device) as mem:
        out = fn(*args, **kwargs)
    return out, mem.peak
