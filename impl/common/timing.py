"""Timing one call the way kernel engineers do (triton.testing.do_bench, FlashAttention's benchmarks).

CUDA: a pair of CUDA events around every timed call, so the figure is device time, not host time around a
synchronize; optionally the L2 cache is flushed before each call (by writing a buffer larger than L2), so a
kernel is timed reading its inputs from HBM as it would in a real model, not from a cache the previous call
warmed. CPU: `time.perf_counter`, with calls shorter than a millisecond repeated inside one sample so the
clock's resolution does not matter. Warm-up and repetition budgets are in seconds of device time.

`cuda_graph(fn)` captures a call into a CUDA graph and returns its replay: for launch-bound calls (a decode
step) the graph removes the per-kernel launch cost that eager mode pays.
"""

import math
import time
from collections.abc import Callable, Iterable

import torch

_MIN_SAMPLE_S = 1e-3  # on CPU, a sample repeats the call until it lasts at least this long
_L2_FLUSH_BYTES = 256 * 2**20  # larger than the L2 of any current GPU (H100/H200: 50 MiB)


def time_calls(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup_s: float,
    budget_s: float,
    min_reps: int,
    max_reps: int,
    flush_l2: bool = False,
    grad_to_none: Iterable[torch.Tensor] = (),
) -> list[float]:
    """Seconds per call of `fn`, one entry per sample, after `warmup_s` of warm-up; as many samples as fit in
    `budget_s`, within [min_reps, max_reps]. `grad_to_none` tensors get `.grad = None` before every call, so a
    backward does not accumulate into (and time) an ever-growing gradient; flush_l2 applies on CUDA only."""
    if min_reps < 1 or max_reps < min_reps:
        raise ValueError(f"need 1 <= min_reps <= max_reps, got min_reps={min_reps}, max_reps={max_reps}")
    grads = list(grad_to_none)

    def reset():
        for t in grads:
            t.grad = None

    if device.type == "cuda":
        return _time_cuda(fn, device, warmup_s, budget_s, min_reps, max_reps, flush_l2, reset)
    return _time_cpu(fn, warmup_s, budget_s, min_reps, max_reps, reset)


def _time_cpu(fn, warmup_s, budget_s, min_reps, max_reps, reset) -> list[float]:
    reset()
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    end_warmup = time.perf_counter() + warmup_s
    while time.perf_counter() < end_warmup:
        reset()
        fn()
    inner = max(1, math.ceil(_MIN_SAMPLE_S / max(once, 1e-9)))
    reps = min(max_reps, max(min_reps, math.ceil(budget_s / max(once * inner, 1e-9))))
    samples = []
    for _ in range(reps):
        elapsed = 0.0
        for _ in range(inner):
            reset()  # outside the clock
            start = time.perf_counter()
            fn()
            elapsed += time.perf_counter() - start
        samples.append(elapsed / inner)
    return samples


def _time_cuda(fn, device, warmup_s, budget_s, min_reps, max_reps, flush_l2, reset) -> list[float]:
    cache = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device) if flush_l2 else None
    # Estimate one call (with its flush) from five, as do_bench does.
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    begin.record()
    for _ in range(5):
        if cache is not None:
            cache.zero_()
        reset()
        fn()
    end.record()
    torch.cuda.synchronize(device)
    once = max(begin.elapsed_time(end) / 1e3 / 5, 1e-7)
    for _ in range(max(1, math.ceil(warmup_s / once))):
        reset()
        fn()
    reps = min(max_reps, max(min_reps, math.ceil(budget_s / once)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        if cache is not None:
            cache.zero_()  # outside the events: the flush is not timed
        reset()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]


def cuda_graph(fn: Callable[[], object], device: torch.device, warmup: int = 3) -> Callable[[], object]:
    """Capture `fn` (which must run only static-shaped CUDA work) into a CUDA graph; returns a callable that
    replays it and returns the outputs of the captured call."""
    if device.type != "cuda":
        raise ValueError(f"cuda_graph needs a CUDA device, got device={device}")
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm up on a side stream, as torch.cuda.graphs asks
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out

    return replay


def quantiles(samples: list[float], qs: tuple[float, ...] = (0.2, 0.5, 0.8)) -> list[float]:
    """Linear-interpolated quantiles of `samples` (numpy's default method)."""
    if not samples:
        raise ValueError("samples must not be empty")
    ordered = sorted(samples)
    out = []
    for q in qs:
        pos = q * (len(ordered) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        out.append(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))
    return out
