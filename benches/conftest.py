"""Measuring fixtures for the benchmarks.

`bench(fn, variant=..., params=...)` measures a callable the project's way, written once here: time with CUDA
events on GPU (L2 flushed before every call for kernel groups, `flush_l2=True`) and `perf_counter` on CPU, with
warm-up and repetition budgets in seconds per --size and p20/p50/p80 recorded; the peak memory of one call (CUDA
allocator statistics, or exact tensor accounting on CPU); FLOPs and bytes for the roofline; the error of the
output against the reference's output (a row above the dtype's tolerance fails); compiled (`compile=True`) and
CUDA-graph (`cuda_graph=True`) variants, recorded as skipped rows with the reason when they cannot run. The
timings fill pytest-benchmark's own stats, so `--benchmark-json` and `--benchmark-compare` work as usual. A
configuration that runs out of memory becomes a row marked OOM and the run goes on.

Sweeps follow the size: a bench module declares `SWEEPS = {"seq_len": {"smoke": [...], "small": [...],
"full": [...]}}` and every test taking an argument of that name is parametrized with the values for --size.

At the start of the session the device's roofs are measured (a large GEMM per dtype, a large copy; see
impl.common.roofline), which also warms the BLAS library before the first row; `python -m impl bench` measures
them once and hands them to each group's process through IMPL_ROOFS.
"""

import importlib.metadata
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from impl.common import (
    MemoryMeter,
    compare_to_reference,
    cuda_graph,
    datasheet_peak,
    device_name,
    measure_roofs,
    quantiles,
    resolve_device,
    synchronize,
    time_calls,
)

# (warm-up s, timed s, min samples, max samples) per --size. `full` is sized for GPU calls of µs to ms, like
# triton.testing.do_bench's 25 ms warm-up and 100 ms of repetitions.
_BUDGET = {"smoke": (0.0, 0.05, 2, 5), "small": (0.05, 1.0, 3, 50), "full": (0.025, 0.2, 5, 1000)}
_LIBRARIES = ("torch", "triton", "transformers", "peft", "bitsandbytes", "diffusers", "pytest-benchmark")
_ROOFS = pytest.StashKey[dict]()


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


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

    def _describe(self, variant, params, sweep, dtype, baseline, reference, device) -> dict:
        info = self.benchmark.extra_info
        device = self.device if device is None else torch.device(device)
        info.update(
            variant=variant,
            params=dict(params),
            sweep=sweep,
            dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
            device=device.type,  # where the work ran: gloo ranks and data pipelines run on CPU in a CUDA session
            device_name=device_name(device),
            size=self.size,
            baseline=baseline,
            reference=reference,
            metrics=dict(info.get("metrics") or {}),
            plot=list(info.get("plot") or []),
            oom=False,
        )
        return info

    def skip(self, reason: str, *, variant: str, params: dict, sweep: str | None = None,
             dtype: torch.dtype | None = None, baseline: bool = False, reference: bool = False,
             device: torch.device | None = None) -> None:
        """Record this row as skipped, with the reason (shown in the report), and skip the test."""
        info = self._describe(variant, params, sweep, dtype, baseline, reference, device)
        info.update(skipped=reason, peak_bytes=None)
        self._keep_row()
        pytest.skip(reason)

    def _keep_row(self) -> None:
        """A row with no timing still goes into the JSON (pytest-benchmark writes only rows with stats)."""
        if self.benchmark.enabled:
            _record(self.benchmark, [0.0], "none")

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
        bytes: float | None = None,
        mfu: bool = False,
        tokens: float | None = None,
        items: float | None = None,
        items_unit: str = "items/s",
        metrics: dict | None = None,
        plot: tuple[str, ...] = (),
        expected=None,
        output: Callable[[], object] | None = None,
        tol: dict | None = None,
        flush_l2: bool = False,
        grad_to_none: Iterable[torch.Tensor] = (),
        compile: bool | dict = False,
        cuda_graph: bool = False,
        device: torch.device | None = None,
    ) -> dict:
        """Measure `fn()`; returns the extra_info it recorded.

        flops / bytes: per call, for the roofline columns (counted with impl.common.roofline's functions);
        mfu=True says the flops are a training step's model FLOPs, shown as MFU. Throughput comes from the first
        of tokens (tokens/s), items (`items_unit`), flops (TFLOP/s) or bytes (GB/s) that is given.
        expected: the reference's output on the same inputs; `output()` (default: the value of the first call of
        `fn`) is compared with it, the max abs/rel errors are recorded, and the benchmark fails when an element
        is outside the tolerance table's bound for `dtype` (`tol={"atol": .., "rtol": ..}` overrides it, with a
        comment saying why).
        compile: wrap `fn` in torch.compile (a dict gives its keyword arguments); cuda_graph: time the replay of
        a CUDA graph of `fn`. Either one that fails becomes a skipped row with the reason.
        flush_l2: flush the GPU's L2 before each timed call (kernel groups). grad_to_none: tensors whose .grad
        is reset before each call. device: where the work runs, when not the session's device.
        `plot` names further panels of the group's sweep plot: keys of `metrics`, or "throughput"."""
        info = self._describe(variant, params, sweep, dtype, baseline, reference, device)
        run_on = self.device if device is None else torch.device(device)
        info.update(flops=flops, bytes=bytes, mfu=mfu)
        info["metrics"].update(metrics or {})
        info["plot"] = list(plot)
        row = dict(variant=variant, params=params, sweep=sweep, dtype=dtype, baseline=baseline,
                   reference=reference, device=device)

        def call():
            out = fn()
            synchronize(run_on)
            return out

        try:
            first = None
            measured_memory = True
            if compile is not False:
                kwargs = compile if isinstance(compile, dict) else {}
                try:
                    call = _compiled(call, kwargs)
                    first = call()  # compiles
                except Exception as err:
                    if _is_oom(err):
                        raise
                    self.skip(f"torch.compile failed: {_one_line(err)}", **row)
                # The CPU meter works through a dispatch mode, under which compiled code runs eagerly.
                measured_memory = run_on.type == "cuda"
            if cuda_graph:
                if run_on.type != "cuda":
                    self.skip("CUDA graphs need a CUDA device", **row)
                try:
                    call = _graphed(call, run_on)
                except Exception as err:
                    if _is_oom(err):
                        raise
                    self.skip(f"CUDA graph capture failed: {_one_line(err)}", **row)
            if measured_memory:
                with MemoryMeter(run_on) as mem:  # the first measured call: memory, and warm-up
                    first = call()
                info["peak_bytes"] = mem.peak
            else:
                info["peak_bytes"] = None
                info["metrics"]["peak memory"] = "not measured (compiled code on CPU)"
        except Exception as err:
            if not _is_oom(err):
                raise
            if run_on.type == "cuda":
                torch.cuda.empty_cache()
            info.update(oom=True, peak_bytes=None)
            self._keep_row()
            return info

        failure = None
        if expected is not None:
            got = output() if output is not None else first
            err = compare_to_reference(got, expected, dtype, **(tol or {}))
            info["error"] = err
            if not err["ok"]:
                failure = (
                    f"{variant}: output differs from the reference beyond atol={err['atol']:g}, rtol={err['rtol']:g}"
                    f" (max abs error {err['max_abs']:.3e}, max rel error {err['max_rel']:.3e}, first at "
                    f"{err['worst']})"
                )
        del first

        if not self.benchmark.enabled:  # --benchmark-disable: the call ran once, as a test, and nothing is timed
            if failure:
                raise AssertionError(failure)
            return info
        warmup_s, budget_s, min_reps, max_reps = _BUDGET[self.size]
        times = time_calls(call, run_on, warmup_s=warmup_s, budget_s=budget_s, min_reps=min_reps,
                           max_reps=max_reps, flush_l2=flush_l2, grad_to_none=grad_to_none)
        timer = "cuda events" + (", L2 flushed" if flush_l2 else "") if run_on.type == "cuda" else "perf_counter"
        if cuda_graph:
            timer += ", CUDA graph replay"
        _record(self.benchmark, times, timer)
        info["quantiles_s"] = dict(zip(("p20", "p50", "p80"), quantiles(times)))
        info["timer"] = timer

        median = info["quantiles_s"]["p50"]
        for amount, unit, scale in ((tokens, "tokens/s", 1), (items, items_unit, 1), (flops, "TFLOP/s", 1e12),
                                    (bytes, "GB/s", 1e9)):
            if amount is not None:
                info.update(throughput=amount / median / scale, throughput_unit=unit)
                break
        if failure:
            raise AssertionError(failure)
        return info


def _compiled(call: Callable[[], object], kwargs: dict) -> Callable[[], object]:
    # Every row compiles a new closure of the same code; without a reset Dynamo's recompile limit (8) is reached
    # after a few rows, and later "compiled" rows would silently run eagerly.
    torch._dynamo.reset()
    return torch.compile(call, **kwargs)


def _graphed(call: Callable[[], object], device: torch.device) -> Callable[[], object]:
    return cuda_graph(call, device)


def _record(benchmark, times: list[float], timer: str) -> None:
    """Fill pytest-benchmark's stats with our own per-call timings, so its JSON schema, tables and
    --benchmark-compare see them as if it had timed them (one iteration per round)."""
    benchmark._mode = "impl.bench"  # the fixture may be used once; this marks it used
    stats = benchmark._make_stats(1)
    stats.options["timer"] = timer
    for seconds in times:
        stats.update(seconds)


@pytest.fixture(scope="session")
def artifacts_dir(pytestconfig: pytest.Config) -> Path:
    """Where benchmarks save pictures: beside --benchmark-json when given, else a temporary folder."""
    json_path = pytestconfig.getoption("benchmark_json", None)
    return Path(json_path).parent if json_path else Path(tempfile.mkdtemp(prefix="impl-bench-"))


@pytest.fixture(scope="session")
def roofs(pytestconfig: pytest.Config, device: torch.device, size: str) -> dict:
    """The device's measured compute and bandwidth roofs (impl.common.roofline.measure_roofs), measured once
    per session before the first row, or read from the file IMPL_ROOFS names (set by `python -m impl bench`,
    which measures them once for all groups). Measuring also warms the BLAS library."""
    path = os.environ.get("IMPL_ROOFS")
    if path and Path(path).is_file():
        found = json.loads(Path(path).read_text())
        torch.ones(64, 64, device=device) @ torch.ones(64, 64, device=device)  # warm the BLAS library all the same
    else:
        found = measure_roofs(device, size)
    pytestconfig.stash[_ROOFS] = found
    return found


@pytest.fixture
def bench(benchmark, device: torch.device, size: str, artifacts_dir: Path, roofs: dict) -> Bench:
    """Measure a callable the project's way; see `Bench.__call__`, `Bench.skip` and `Bench.save_image`."""
    return Bench(benchmark, device, size, artifacts_dir)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    sweeps = getattr(metafunc.module, "SWEEPS", {})
    config = metafunc.config
    size = config.getoption("--size")  # resolved once, in the root conftest's pytest_configure
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
        "size": config.getoption("--size"),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "libraries": versions,
        "roofs": config.stash.get(_ROOFS, None),
    }
    peak = datasheet_peak(device_name(device)) if device.type == "cuda" else None
    if peak is not None:
        machine_info["impl"]["datasheet"] = {"name": peak.name, "tflops": peak.tflops, "gbs": peak.gbs,
                                             "source": peak.source}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    """Failed and skipped benchmarks are written (one JSON line each) to the file IMPL_BENCH_OUTCOMES names, so
    the report lists them in their group instead of losing them."""
    report = yield
    path = os.environ.get("IMPL_BENCH_OUTCOMES")
    if path and (report.failed or (report.skipped and report.when != "teardown")):
        marker = item.get_closest_marker("benchmark")
        callspec = getattr(item, "callspec", None)
        if report.skipped and isinstance(report.longrepr, tuple):
            message = report.longrepr[2].removeprefix("Skipped: ")
        else:
            crash = getattr(report.longrepr, "reprcrash", None)
            message = crash.message if crash is not None else str(report.longrepr).strip().splitlines()[-1]
        line = {
            "nodeid": item.nodeid,
            "name": item.name,
            "group": marker.kwargs.get("group") if marker else None,
            "params": {k: v if isinstance(v, int | float | str | bool) else repr(v)
                       for k, v in (callspec.params.items() if callspec else [])},
            "outcome": "failed" if report.failed else "skipped",
            "when": report.when,
            "message": message.strip().splitlines()[0][:500] if message.strip() else "",
        }
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
    return report
