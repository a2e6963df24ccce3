"""The benchmark harness end to end: the bench fixture writes JSON, the renderer turns it into a report.

The tests drive a fresh pytest (in a subprocess) over a tiny bench module with the project's own conftests,
so what is checked is what `python -m impl bench` does.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from impl.report import load_run, render

ROOT = Path(__file__).resolve().parent.parent

BENCH_MODULE = """
import pytest
import torch

SWEEPS = {"n": {"smoke": [256, 1024], "small": [256, 1024, 4096], "full": [4096]}}


@pytest.mark.benchmark(group="alloc")
@pytest.mark.parametrize("provider", ["big", "small"])
def test_alloc(bench, device, provider, n):
    elems = n if provider == "big" else n // 4
    bench(lambda: torch.ones(elems, device=device), variant=provider, params={"n": n}, sweep="n",
          dtype=torch.float32, baseline=provider == "big", items=elems, items_unit="elems/s",
          metrics={"formula bytes": 4 * elems}, plot=("formula bytes", "throughput"))


@pytest.mark.benchmark(group="alloc")
def test_alloc_oom(bench, device):
    bench.save_image("checker", (torch.arange(64).reshape(8, 8) % 2).float())
    def fn():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 PiB")
    bench(fn, variant="huge", params={"n": 2**50})


@pytest.mark.benchmark(group="foreign")
@pytest.mark.parametrize("kind", ["sum", "mean"])
@pytest.mark.parametrize("length", [10, 100])
def test_plain(benchmark, kind, length):
    x = torch.ones(length)
    benchmark(getattr(torch, kind), x)


@pytest.mark.gpu
def test_needs_gpu():
    assert torch.cuda.is_available()
"""


def make_harness(path: Path) -> Path:
    """A project folder holding our two conftests, the pytest settings and the tiny bench module."""
    (path / "benches").mkdir(parents=True)
    (path / "conftest.py").write_text((ROOT / "conftest.py").read_text())
    (path / "benches" / "conftest.py").write_text((ROOT / "benches" / "conftest.py").read_text())
    (path / "benches" / "bench_tiny.py").write_text(BENCH_MODULE)
    (path / "pytest.ini").write_text("[pytest]\npython_files = bench_*.py\n")
    return path


def run_pytest(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def smoke_json(tmp_path_factory) -> Path:
    harness = make_harness(tmp_path_factory.mktemp("harness"))
    out = harness / "bench.json"
    result = run_pytest(harness, "benches", "--device=cpu", "--size=smoke", f"--benchmark-json={out}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "9 passed, 1 skipped" in result.stdout  # the gpu-marked test skips cleanly on CPU
    return out


def test_bench_fixture_records_memory_sizes_and_throughput(smoke_json):
    rows = {b["name"]: b for b in json.loads(smoke_json.read_text())["benchmarks"]}
    assert set(rows) >= {"test_alloc[n=256-big]", "test_alloc[n=1024-small]", "test_alloc_oom"}
    info = rows["test_alloc[n=1024-big]"]["extra_info"]
    assert info["peak_bytes"] == 4 * 1024  # exact on CPU: one float32 tensor of 1024 elements
    assert rows["test_alloc[n=1024-small]"]["extra_info"]["peak_bytes"] == 4 * 256
    assert info["params"] == {"n": 1024} and info["sweep"] == "n" and info["baseline"] is True
    assert info["dtype"] == "float32" and info["device"] == "cpu" and info["size"] == "smoke"
    assert info["throughput_unit"] == "elems/s" and info["throughput"] > 0
    assert info["plot"] == ["formula bytes", "throughput"] and info["metrics"] == {"formula bytes": 4096}
    oom = rows["test_alloc_oom"]["extra_info"]
    assert oom["oom"] is True and oom["peak_bytes"] is None
    assert oom["images"] == ["checker.png"] and (smoke_json.parent / "checker.png").is_file()


def test_report_renders_tables_plots_and_oom(smoke_json, tmp_path):
    path = render([load_run(smoke_json)], tmp_path)
    text = path.read_text()
    assert "## alloc" in text and "## foreign" in text
    assert "speed-up vs big" in text and "memory vs big" in text and "formula bytes" in text
    assert "OOM" in text
    assert "torch" in text and "cpu" in text  # the header names the software and the device
    assert (tmp_path / "alloc--bench.png").stat().st_size > 1000  # swept over n: a plot
    # The plain pytest-benchmark group has no extra_info: its variants and sweep are inferred from params.
    assert "test_plain kind=mean" in text
    assert (tmp_path / "foreign--bench.png").exists()
    assert "![checker.png](bench--checker.png)" in text and (tmp_path / "bench--checker.png").is_file()


def test_several_runs_render_side_by_side(smoke_json, tmp_path):
    data = json.loads(smoke_json.read_text())
    data["machine_info"]["impl"]["device_name"] = "Imaginary GPU"
    other = tmp_path / "bench-other.json"
    other.write_text(json.dumps(data))
    text = render([load_run(smoke_json), load_run(other)], tmp_path / "report").read_text()
    assert "Run `bench`" in text and "Run `bench-other`" in text
    assert text.count("### cpu: Imaginary GPU") == 2  # one sub-table per group for the second run


def test_unknown_size_is_rejected_with_the_allowed_values(tmp_path):
    result = run_pytest(make_harness(tmp_path), "benches", "--size=nonsense")
    assert result.returncode != 0
    assert re.search(r"--size.*invalid choice: 'nonsense'.*'smoke', 'small', 'full'", result.stderr)
