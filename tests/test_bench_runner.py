"""`python -m impl bench` end to end on a folder of small benchmark modules: the time budget, the error column
failing a wrong kernel, a compile failure kept as a skipped row, and failures rendered instead of lost.

The modules run through the project's own conftests (copied beside them), as the real benches do.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

ATTENTION = '''
import math

import pytest
import torch
import torch.nn.functional as F

from impl.common import attention_flops

ESTIMATED_S = {"smoke": 1, "small": 1, "full": 1}


def attention(q, k, v, scale):
    return torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v


@pytest.mark.benchmark(group="toy-attention")
@pytest.mark.parametrize("provider", ["right", "perturbed-scale"])
def test_attention(bench, provider):
    q, k, v = (torch.randn(1, 2, 64, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    scale = 1 / math.sqrt(16) * (1.0 if provider == "right" else 1.01)
    bench(lambda: attention(q, k, v, scale), variant=provider, params={"seq_len": 64}, dtype=torch.float32,
          flops=attention_flops(1, 2, 64, 64, 16), expected=F.scaled_dot_product_attention(q, k, v))
    if provider == "right":
        bench.save_image("toy_picture", torch.rand(8, 8, generator=torch.Generator().manual_seed(0)))


@pytest.mark.benchmark(group="toy-attention")
def test_compiled_with_a_broken_backend(bench):
    q = torch.randn(1, 2, 64, 16)
    bench(lambda: attention(q, q, q, 0.25), variant="compiled", params={"seq_len": 64},
          compile={"backend": "no-such-backend"})
'''

EXPENSIVE = '''
import pytest

ESTIMATED_S = {"smoke": 10_000, "small": 10_000, "full": 10_000}


@pytest.mark.benchmark(group="toy-expensive")
def test_never_started(bench):
    raise AssertionError("a group estimated beyond the budget must not start")
'''


@pytest.fixture(scope="module")
def benches(tmp_path_factory) -> Path:
    """A checkout-like folder: the root conftest (options), benches/conftest.py (the bench fixture), two
    modules: `bench_a` (cheap) and `bench_b` (estimated at hours)."""
    root = tmp_path_factory.mktemp("checkout")
    shutil.copy(ROOT / "conftest.py", root / "conftest.py")
    folder = root / "benches"
    folder.mkdir()
    shutil.copy(ROOT / "benches" / "conftest.py", folder / "conftest.py")
    (folder / "bench_a.py").write_text(textwrap.dedent(ATTENTION))
    (folder / "bench_b.py").write_text(textwrap.dedent(EXPENSIVE))
    return folder


def run_bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "impl", "bench", "--device", "cpu", "--size", "smoke", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def budgeted(benches: Path, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    proc = run_bench("--benches", str(benches), "--out", str(out), "--budget-s", "120", cwd=benches.parent)
    return proc, out


def test_budget_runs_what_fits_and_lists_what_it_skipped(budgeted):
    proc, out = budgeted
    data = json.loads((out / "bench-cpu-smoke.json").read_text())
    groups = {g["module"]: g for g in data["impl_run"]["groups"]}
    assert groups["bench_a"]["status"] == "ran"
    assert groups["bench_b"]["status"] == "skipped" and "budget" in groups["bench_b"]["reason"]
    assert not [b for b in data["benchmarks"] if b["group"] == "toy-expensive"]
    assert "bench_b: skipped" in proc.stdout
    report = (out / "README.md").read_text()
    assert "budget 120 s: 1 of 2 groups ran" in report
    assert "bench_b skipped: estimated 10000 s" in report


def test_a_wrong_kernel_fails_its_benchmark_and_the_right_one_passes(budgeted):
    proc, out = budgeted
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((out / "bench-cpu-smoke.json").read_text())
    rows = {b["extra_info"]["variant"]: b["extra_info"] for b in data["benchmarks"]}
    assert rows["right"]["error"]["ok"] is True and rows["right"]["error"]["max_abs"] < 1e-5
    assert rows["perturbed-scale"]["error"]["ok"] is False and rows["perturbed-scale"]["error"]["max_abs"] > 1e-4
    failed = [o["nodeid"] for o in data["impl_run"]["outcomes"] if o["outcome"] == "failed"]
    assert failed == ["benches/bench_a.py::test_attention[perturbed-scale]"]
    report = (out / "README.md").read_text()
    assert "1 benchmark(s) failed" in report and "(over tolerance)" in report
    line = next(x for x in report.splitlines() if x.startswith("| perturbed-scale"))
    assert "failed: AssertionError: perturbed-scale: output differs from the reference" in line
    assert "% of roof" in report  # flops were given: the roofline column is there


def test_a_saved_picture_lands_beside_the_json_and_in_the_report(budgeted):
    """bench.save_image writes into the run's work folder, which goes at the end: the runner moves the pictures
    to --out first, so the report shows them instead of "was not found"."""
    _, out = budgeted
    assert (out / "toy_picture.png").is_file()
    report = (out / "README.md").read_text()
    assert "toy_picture.png" in report and "was not found" not in report


def test_a_compile_failure_is_a_skipped_row_with_the_reason(budgeted):
    _, out = budgeted
    data = json.loads((out / "bench-cpu-smoke.json").read_text())
    row = next(b["extra_info"] for b in data["benchmarks"] if b["extra_info"]["variant"] == "compiled")
    assert row["skipped"].startswith("torch.compile failed:") and "no-such-backend" in row["skipped"]
    report = (out / "README.md").read_text()
    line = next(x for x in report.splitlines() if x.startswith("| compiled"))
    assert "skipped" in line and "torch.compile failed" in line


def test_a_zero_budget_runs_nothing_and_says_so(benches: Path, tmp_path: Path):
    proc = run_bench("--benches", str(benches), "--out", str(tmp_path), "--budget-s", "0", cwd=benches.parent)
    assert proc.returncode == 0
    assert "no group fits, nothing ran" in proc.stdout
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.parametrize("budget", ["-5", "abc", "nan"])
def test_a_bad_budget_is_one_line_error(benches: Path, tmp_path: Path, budget: str):
    proc = run_bench("--benches", str(benches), "--out", str(tmp_path), f"--budget-s={budget}", cwd=benches.parent)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: argument --budget-s")
    assert "Traceback" not in proc.stderr


SLOW = '''
import time

import pytest
import torch

ESTIMATED_S = {"smoke": 1, "small": 1, "full": 1}  # wrong on purpose: the group runs past the budget


@pytest.mark.benchmark(group="toy-slow")
def test_1_quick(bench):
    x = torch.ones(8)
    bench(lambda: x * 2, variant="quick", params={})


@pytest.mark.benchmark(group="toy-slow")
def test_2_hangs(bench):
    time.sleep(600)
'''


def test_a_group_past_the_budget_is_stopped_and_keeps_its_finished_rows(benches: Path, tmp_path: Path):
    folder = tmp_path / "benches"
    folder.mkdir()
    shutil.copy(benches / "conftest.py", folder / "conftest.py")
    shutil.copy(benches.parent / "conftest.py", tmp_path / "conftest.py")
    (folder / "bench_slow.py").write_text(textwrap.dedent(SLOW))
    proc = run_bench("--benches", str(folder), "--out", str(tmp_path / "out"), "--budget-s", "20", cwd=tmp_path)
    assert proc.returncode == 1
    data = json.loads((tmp_path / "out" / "bench-cpu-smoke.json").read_text())
    assert [b["extra_info"]["variant"] for b in data["benchmarks"]] == ["quick"]
    (group,) = data["impl_run"]["groups"]
    assert group["status"] == "stopped" and group["seconds"] < 20 + 15 + 5
    assert "bench_slow stopped: still running when the budget ended" in (tmp_path / "out" / "README.md").read_text()
