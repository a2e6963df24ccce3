"""Measuring fixtures for the benchmarks.

`bench(fn, variant=..., params=...)` wraps pytest-benchmark so that every benchmark in the project records the
same things: synchronized CUDA time with warm-up kept out of the figure, the peak memory of one call (CUDA
allocator statistics, or exact tensor accounting on CPU), its sizes, dtype, device, a throughput figure, and
whether it is the group's baseline or reference. A configuration that runs out of memory becomes a row
marked OOM and the run goes on.

Sweeps follow the size: a bench module declares `SWEEPS = {"seq_len": {"smoke": [...], "small": [...],
"full": [...]}}` and every test taking an argument of that name is parametrized with the values for --size.
"""

import importlib.metadata
import math
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from impl.common import MemoryMeter, device_name, resolve_device, resolve_size, synchronize

# Seconds of timed calls to aim for per benchmark, and the bounds on rounds, per --size.
_BUDGET = {"smoke": (0.05, 1, 3), "small": (1.0, 3, 50), "full": (2.0, 5, 100)}
# A single timed call shorter than this is repeated inside a round so the clock's resolution does not matter.
_MIN_ROUND_S = 1e-3
_LIBRARIES = ("torch", "triton", "transformers", "peft", "bitsandbytes", "diffusers", "pytest-benchmark")


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@dataclass
class Bench:
    benchmark: object
    device: torch.device
    size: str
    artifacts: Path

    def save_image(self, name: str, image) -> Path:
        """Save a picture beside the benchmark JSON (`<name>.png`); the report shows it under the group's table.
        `image`: a PIL image, or a float tensor (3, H, W) or (H, W) with values in [0, 1]."""
        from PIL import Image

        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"name must use only letters, digits, '.', '_' and '-', got {name!r}")
        if isinstance(image, torch.Tensor):
            if image.dim() not in (2, 3) or (image.dim() == 3 and image.shape[0] not in (1, 3)):
                raise ValueError(f"image must have shape (3, H, W), (1, H, W) or (H, W), got {tuple(image.shape)}")
            pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
            pixels = pixels.squeeze(0) if pixels.dim() == 3 and pixels.shape[0] == 1 else pixels
            image = Image.fromarray((pixels.permute(1, 2, 0) if pixels.dim() == 3 else pixels).numpy())
        elif not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL image or a torch.Tensor, got {type(image).__name__}")
        self.artifacts.mkdir(parents=True, exist_ok=True)
        path = self.artifacts / f"{name}.png"
        image.save(path)
        self.benchmark.extra_info.setdefault("images", []).append(path.name)
        return path

    def __call__(
        self,
        fn: Callable[[], object],
        *,
        variant: str,
        params: dict,
        sweep: str | None = None,
        dtype: torch.dtype | None = None,
        baseline: bool = False,
        reference: bool = False,
        flops: float | None = None,
        tokens: float | None = None,
        items: float | None = None,
        items_unit: str = "items/s",
        metrics: dict | None = None,
        plot: tuple[str, ...] = (),
    ) -> dict:
        """Measure `fn()`; returns the extra_info it recorded. Throughput comes from the first of flops
        (TFLOP/s), tokens (tokens/s) or items (`items_unit`) that is given, per call. `plot` names further panels
        of the group's sweep plot: keys of `metrics`, or "throughput"."""
        info = self.benchmark.extra_info
        info.update(
            variant=variant,
            params=dict(params),
            sweep=sweep,
            dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
            device=self.device.type,
            device_name=device_name(self.device),
            size=self.size,
            baseline=baseline,
            reference=reference,
            metrics=dict(metrics or {}),
            plot=list(plot),
            oom=False,
        )

        def call():
            out = fn()
            synchronize(self.device)
            return out

        try:
            with MemoryMeter(self.device) as mem:  # the first call: memory, and warm-up (compile, caches)
                call()
            start = time.perf_counter()
            call()  # one plain call, to size the timed rounds
            once = time.perf_counter() - start
        except Exception as err:
            if not _is_oom(err):
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            info.update(oom=True, peak_bytes=None)
            self.benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # keeps the row in the JSON
            return info
        info["peak_bytes"] = mem.peak

        budget, min_rounds, max_rounds = _BUDGET[self.size]
        iterations = max(1, math.ceil(_MIN_ROUND_S / max(once, 1e-9)))
        rounds = min(max_rounds, max(min_rounds, math.ceil(budget / max(once * iterations, 1e-9))))
        self.benchmark.pedantic(call, rounds=rounds, iterations=iterations, warmup_rounds=0)
        if self.benchmark.stats is None:  # --benchmark-disable: the call ran once, as a test, and nothing is timed
            return info

        median = self.benchmark.stats.stats.median
        if flops is not None:
            info.update(throughput=flops / median / 1e12, throughput_unit="TFLOP/s")
        elif tokens is not None:
            info.update(throughput=tokens / median, throughput_unit="tokens/s")
        elif items is not None:
            info.update(throughput=items / median, throughput_unit=items_unit)
        return info


@pytest.fixture(scope="session")
def artifacts_dir(pytestconfig: pytest.Config) -> Path:
    """Where benchmarks save pictures: beside --benchmark-json when given, else a temporary folder."""
    json_path = pytestconfig.getoption("benchmark_json", None)
    return Path(json_path).parent if json_path else Path(tempfile.mkdtemp(prefix="impl-bench-"))


@pytest.fixture
def bench(benchmark, device: torch.device, size: str, artifacts_dir: Path) -> Bench:
    """Measure a callable the project's way; see `Bench.__call__` and `Bench.save_image`."""
    return Bench(benchmark, device, size, artifacts_dir)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    sweeps = getattr(metafunc.module, "SWEEPS", {})
    config = metafunc.config
    size = resolve_size(config.getoption("--size"), resolve_device(config.getoption("--device")))
    for name, by_size in sweeps.items():
        if name in metafunc.fixturenames:
            values = by_size[size]
            metafunc.parametrize(name, values, ids=[f"{name}={v}" for v in values])


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    device = resolve_device(config.getoption("--device"))
    versions = {}
    for lib in _LIBRARIES:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = None
    machine_info["impl"] = {
        "device": device.type,
        "device_name": device_name(device),
        "cpu_name": device_name(torch.device("cpu")),
        "size": resolve_size(config.getoption("--size"), device),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "libraries": versions,
    }
