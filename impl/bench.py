"""The main job: run the benchmarks on the available device, then render the report.

    python -m impl bench [--size smoke|small|full] [--device auto|cpu|cuda] [--out reports] [-k EXPR]

Writes `<out>/bench-<device>-<size>.json` and renders every `bench-*.json` in `<out>` (a CPU run and a GPU run
side by side) into `<out>/README.md`. A run of some benchmarks (-k) replaces those in the JSON and keeps the rest,
so one technique can be re-measured without running everything again.
"""

import argparse
import json
import sys
from pathlib import Path

from impl.common import DEVICE_CHOICES, SIZE_CHOICES, resolve_device, resolve_size

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m impl bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZE_CHOICES, default=None, help="default: small on CPU, full on CUDA")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    parser.add_argument("--out", default=str(ROOT / "reports"), help="folder for the JSON and the report")
    parser.add_argument("-k", dest="keyword", default=None, help="only benchmarks matching this pytest -k expression")
    parser.add_argument("pytest_args", nargs="*", help="passed on to pytest (after --)")
    args = parser.parse_args(argv)

    benches = ROOT / "benches"
    if not benches.is_dir():
        print(f"error: no benches/ folder at {benches}; run from a checkout (pip install -e .)", file=sys.stderr)
        return 2
    import pytest

    from impl.report import ReportError, load_run, render

    device = resolve_device(args.device)
    size = resolve_size(args.size, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"bench-{device.type}-{size}.json"
    fresh_path = out / f".bench-{device.type}-{size}.partial.json"
    pytest_args = [
        str(benches),
        f"--device={args.device}",
        f"--size={size}",
        f"--benchmark-json={fresh_path}",
        "--timeout=3600",
        "-p",
        "no:cacheprovider",
        "-v",
        *(["-k", args.keyword] if args.keyword else []),
        *args.pytest_args,
    ]
    code = pytest.main(pytest_args)
    if code != 0:
        print(f"error: benchmarks failed (pytest exit {int(code)}); report not rendered", file=sys.stderr)
        return int(code)
    merge_into(fresh_path, json_path, keep_others=args.keyword is not None or bool(args.pytest_args))
    try:
        runs = [load_run(p) for p in sorted(out.glob("bench-*.json"))]
        path = render(runs, out)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def merge_into(fresh: Path, target: Path, *, keep_others: bool) -> None:
    """Move the fresh JSON to `target`. With keep_others (a partial run), benchmarks of the old file that the
    fresh run did not measure are kept, and the file keeps its first run's date and commit with the partial
    runs' listed beside them; a file from another machine, device or size is replaced, not merged."""
    data = json.loads(fresh.read_text())
    if keep_others and target.is_file():
        old = json.loads(target.read_text())
        if _identity(old) == _identity(data):
            measured = {b["fullname"] for b in data["benchmarks"]}
            kept = [b for b in old.get("benchmarks", []) if b.get("fullname") not in measured]
            data["benchmarks"] = kept + data["benchmarks"]
            commit = (data.get("commit_info") or {}).get("id") or ""
            data["partial_runs"] = [*old.get("partial_runs", []), f"{data.get('datetime')} (commit {commit[:10]})"]
            data["datetime"], data["commit_info"] = old.get("datetime"), old.get("commit_info")
        else:
            print(f"note: {target.name} came from another machine, device or size; replaced, not merged")
    target.write_text(json.dumps(data, indent=1))
    fresh.unlink()


def _identity(data: dict) -> tuple:
    machine = data.get("machine_info", {})
    impl = machine.get("impl") or {}
    return machine.get("node"), impl.get("device_name"), impl.get("size"), impl.get("torch_threads")


if __name__ == "__main__":
    sys.exit(main())
