"""The main job: run the benchmarks on the available device, then render the report.

    python -m impl bench [--size smoke|small|full] [--device auto|cpu|cuda] [--out reports] [-k EXPR]
                         [--budget-s SECONDS] [--compare BASE.json]

Measures the device's roofs once (a large GEMM per dtype, a large copy), then runs each benchmark module
(a group of related benchmarks) in its own pytest process, in priority order: attention, generation, finetune,
memory, gpt, then the rest. A crash in one group (an illegal memory access poisons a CUDA process) costs only
that group. With --budget-s, a group whose estimated time does not fit in what is left is not started, and the
report header lists it with the reason; a group still running when the budget ends is stopped and listed too.

Writes `<out>/bench-<device>-<size>.json` (pytest-benchmark's schema plus our run record: roofs, group times,
failed and skipped rows) and renders every `bench-*.json` in `<out>` (a CPU run and a GPU run side by side) into
`<out>/README.md`, failures included. A run of some benchmarks (-k) replaces those in the JSON and keeps the rest.
The exit code is 1 when a benchmark failed, after the report is written. With --compare BASE.json the run is also
compared with BASE (`python -m impl compare`): `<out>/compare.md`, linked from a "Drift against" section.
"""

import argparse
import ast
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from impl.common import DEVICE_CHOICES, SIZE_CHOICES, resolve_device, resolve_size

ROOT = Path(__file__).resolve().parent.parent
PRIORITY = ("bench_attention", "bench_generation", "bench_finetune", "bench_memory", "bench_gpt")
# Seconds a group takes (process start included) on the reference machines: the 2-core CPU for smoke and small,
# one H200 for full. Used until a run in the same output folder has measured the group; a module may override
# its entry with a literal `ESTIMATED_S = {"smoke": ..., "small": ..., "full": ...}`.
ESTIMATED_S = {
    "bench_attention": (10, 200, 180),
    "bench_generation": (15, 150, 60),
    "bench_finetune": (15, 120, 45),
    "bench_memory": (15, 120, 60),
    "bench_gpt": (20, 90, 40),
    "bench_clip": (15, 60, 30),
    "bench_data": (10, 90, 60),
    "bench_diffusion": (15, 60, 30),
    "bench_glide": (40, 240, 120),
    "bench_parallel": (20, 120, 60),
    "bench_rlhf": (20, 90, 45),
    "bench_training": (10, 60, 60),
    "bench_unclip": (40, 240, 150),
    "bench_zero": (20, 90, 60),
}
_DEFAULT_ESTIMATE = (30, 120, 60)
STOP_GRACE_S = 15  # after SIGINT at the end of the budget, before SIGKILL


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage block
        self.exit(2, f"error: {message} (python -m impl bench --help)\n")


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()
    parser = _Parser(prog="python -m impl bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZE_CHOICES, default=None, help="default: small on CPU, full on CUDA")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    parser.add_argument("--out", default=str(ROOT / "reports"), help="folder for the JSON and the report")
    parser.add_argument("-k", dest="keyword", default=None, help="only benchmarks matching this pytest -k expression")
    parser.add_argument("--budget-s", type=_budget, default=None,
                        help="wall-clock seconds for the benchmarks; groups that do not fit are skipped and listed")
    parser.add_argument("--compare", metavar="BASE.json", default=None,
                        help="also compare this run with BASE.json into <out>/compare.md (python -m impl compare)")
    parser.add_argument("--benches", default=str(ROOT / "benches"), help=argparse.SUPPRESS)
    parser.add_argument("pytest_args", nargs="*", help="passed on to pytest (after --)")
    args = parser.parse_args(argv)

    benches = Path(args.benches)
    if not benches.is_dir():
        print(f"error: no benches/ folder at {benches}; run from a checkout (pip install -e .)", file=sys.stderr)
        return 2
    from impl.report import ReportError, load_run, render

    if args.compare:  # a bad base file is an error before the benchmarks run, not after
        try:
            load_run(args.compare)
        except ReportError as err:
            print(f"error: --compare: {err}", file=sys.stderr)
            return 2
    device = resolve_device(args.device)
    size = resolve_size(args.size, device)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"error: --out {out} exists and is not a folder", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"bench-{device.type}-{size}.json"
    modules = ordered_modules(benches)
    previous = _previous_seconds(json_path)
    plan = [(m, previous.get(m.stem, estimate(m, size))) for m in modules]

    if args.budget_s is not None and not any(est <= args.budget_s for _, est in plan):
        print(f"budget {args.budget_s:g} s: no group fits, nothing ran. Estimates: "
              + ", ".join(f"{m.stem} {est:.0f} s" for m, est in plan))
        return 0

    work = Path(tempfile.mkdtemp(prefix=".bench-", dir=out))
    try:  # the groups' files live in `work` until merged; it goes however the run ends (Ctrl-C included)
        print(f"measuring the roofs of {device} ...", flush=True)
        (work / "roofs.json").write_text(json.dumps(_measure_roofs(device, size)))
        groups, codes = _run_groups(plan, args, size, benches, work, start)
        fresh = _combine(work, groups, args.budget_s, work / "outcomes.jsonl", work / "roofs.json")
        if fresh is None:
            print("error: no benchmark produced results; report not rendered", file=sys.stderr)
            return max(codes, default=1) or 1
        merge_into(fresh, json_path, keep_others=args.keyword is not None or bool(args.pytest_args))
        for picture in work.glob("*.png"):  # bench.save_image's files, named in the rows beside the JSON
            shutil.move(picture, out / picture.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    try:
        runs = [load_run(p) for p in sorted(out.glob("bench-*.json"))]
        path = render(runs, out)
        if args.compare:
            from impl.report.drift import append_drift, summary

            print(f"drift against {args.compare}: {summary(append_drift(path, args.compare, json_path))}")
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    if codes:
        print(f"error: some benchmarks failed (pytest exit codes {sorted(set(codes))}); they are listed in the report",
              file=sys.stderr)
        return 1
    return 0


def _run_groups(plan: list, args: argparse.Namespace, size: str, benches: Path, work: Path, start: float):
    """Each module in its own pytest process, in plan order, within the budget; (group records, exit codes)."""
    env = {**os.environ, "IMPL_ROOFS": str(work / "roofs.json"), "IMPL_BENCH_OUTCOMES": str(work / "outcomes.jsonl"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    groups, codes = [], []
    for i, (module, est) in enumerate(plan, 1):
        left = None if args.budget_s is None else args.budget_s - (time.monotonic() - start)
        if left is not None and est > left:
            groups.append({"module": module.stem, "status": "skipped", "estimate_s": est,
                           "reason": f"estimated {est:.0f} s, {max(left, 0):.0f} s of the budget left"})
            print(f"[{i}/{len(plan)}] {module.stem}: skipped (estimate {est:.0f} s > {max(left, 0):.0f} s left)")
            continue
        print(f"[{i}/{len(plan)}] {module.stem} (estimate {est:.0f} s"
              + (f", {left:.0f} s of the budget left)" if left is not None else ")"), flush=True)
        cmd = [sys.executable, "-m", "pytest", str(module), f"--device={args.device}", f"--size={size}",
               f"--benchmark-json={work / (module.stem + '.json')}", "--timeout=3600", "-p", "no:cacheprovider",
               "-v", f"--rootdir={benches.parent}", *(["-k", args.keyword] if args.keyword else []),
               *args.pytest_args]
        t0 = time.monotonic()
        code = _run(cmd, env, timeout=left)
        seconds = time.monotonic() - t0
        if code is None:
            groups.append({"module": module.stem, "status": "stopped", "seconds": seconds, "estimate_s": est,
                           "reason": f"still running when the budget ended (estimated {est:.0f} s, stopped after "
                                     f"{seconds:.0f} s); the rows it had finished are kept"})
            codes.append(1)
            continue
        groups.append({"module": module.stem, "status": "ran", "seconds": seconds, "estimate_s": est,
                       "exit_code": code})
        if code not in (0, 5):  # 5: nothing collected (a -k that selects nothing in this module)
            codes.append(code)
    return groups, codes


def ordered_modules(benches: Path) -> list[Path]:
    """bench_*.py files, the PRIORITY ones first in that order, then the rest by name."""
    found = sorted(benches.glob("bench_*.py"))
    rank = {name: i for i, name in enumerate(PRIORITY)}
    return sorted(found, key=lambda p: (rank.get(p.stem, len(PRIORITY)), p.stem))


def estimate(module: Path, size: str) -> float:
    """The module's own literal ESTIMATED_S[size] if it declares one, else the table's entry."""
    column = SIZE_CHOICES.index(size)
    for node in ast.parse(module.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "ESTIMATED_S" for t in node.targets):
            try:
                return float(ast.literal_eval(node.value)[size])
            except (ValueError, KeyError, TypeError):
                break
    return float(ESTIMATED_S.get(module.stem, _DEFAULT_ESTIMATE)[column])


def _previous_seconds(json_path: Path) -> dict[str, float]:
    """Group times measured by the last run into this file (same device and size), to estimate this one."""
    try:
        groups = json.loads(json_path.read_text())["impl_run"]["groups"]
        return {g["module"]: float(g["seconds"]) for g in groups if g.get("status") == "ran" and g.get("seconds")}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _measure_roofs(device, size: str) -> dict:
    from impl.common import measure_roofs

    return measure_roofs(device, size)


def _run(cmd: list[str], env: dict, timeout: float | None) -> int | None:
    """Run one group; None if it ran past `timeout`. Then it gets SIGINT, on which pytest ends the session and
    pytest-benchmark still writes the rows finished so far; whatever is left a few seconds later is killed."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_GRACE_S)
        _kill_group(proc)
        return None
    except BaseException:  # Ctrl-C or SIGTERM of the driver: the group goes with it
        _kill_group(proc)
        raise


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone, children included
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _combine(work: Path, groups: list[dict], budget_s, outcomes_path: Path, roofs_path: Path) -> Path | None:
    """One pytest-benchmark JSON from the groups' files, with the run record added."""
    parts = [json.loads(p.read_text()) for g in groups if (p := work / f"{g['module']}.json").is_file()]
    outcomes = []
    if outcomes_path.is_file():
        outcomes = [json.loads(line) for line in outcomes_path.read_text().splitlines() if line.strip()]
    if not parts:
        return None
    data = parts[0]
    data["benchmarks"] = [b for part in parts for b in part["benchmarks"]]
    data["machine_info"].setdefault("impl", {})["roofs"] = json.loads(roofs_path.read_text())
    data["impl_run"] = {"budget_s": budget_s, "groups": groups, "outcomes": outcomes}
    fresh = work / "fresh.json"
    fresh.write_text(json.dumps(data, indent=1))
    return fresh


def merge_into(fresh: Path, target: Path, *, keep_others: bool) -> None:
    """Move the fresh JSON to `target`. With keep_others (a partial run), benchmarks of the old file that the
    fresh run did not measure are kept (their failed/skipped records too), and the file keeps its first run's
    date and commit with the partial runs' listed beside them; a file from another machine, device or size is
    replaced, not merged."""
    data = json.loads(fresh.read_text())
    if keep_others and target.is_file():
        old = json.loads(target.read_text())
        if _identity(old) == _identity(data):
            measured = {b["fullname"] for b in data["benchmarks"]}
            kept = [b for b in old.get("benchmarks", []) if b.get("fullname") not in measured]
            data["benchmarks"] = kept + data["benchmarks"]
            run, old_run = data.setdefault("impl_run", {}), old.get("impl_run") or {}
            seen = {o["nodeid"] for o in run.get("outcomes", [])} | measured_nodeids(data)
            run["outcomes"] = [o for o in old_run.get("outcomes", []) if o.get("nodeid") not in seen] + \
                run.get("outcomes", [])
            ran = {g["module"] for g in run.get("groups", [])}
            run["groups"] = [g for g in old_run.get("groups", []) if g.get("module") not in ran] + \
                run.get("groups", [])
            commit = (data.get("commit_info") or {}).get("id") or ""
            data["partial_runs"] = [*old.get("partial_runs", []), f"{data.get('datetime')} (commit {commit[:10]})"]
            data["datetime"], data["commit_info"] = old.get("datetime"), old.get("commit_info")
        else:
            print(f"note: {target.name} came from another machine, device or size; replaced, not merged")
    target.write_text(json.dumps(data, indent=1))
    fresh.unlink()


def measured_nodeids(data: dict) -> set[str]:
    """Node ids (as pytest prints them, relative to the rootdir) of the benchmarks in a run."""
    return {b["fullname"] for b in data.get("benchmarks", []) if b.get("fullname")}


def _identity(data: dict) -> tuple:
    machine = data.get("machine_info", {})
    impl = machine.get("impl") or {}
    return machine.get("node"), impl.get("device_name"), impl.get("size"), impl.get("torch_threads")


if __name__ == "__main__":
    sys.exit(main())
