"""Reading pytest-benchmark JSON into one row per benchmark.

Any pytest-benchmark file is accepted. Our benches add `extra_info` keys (variant, params, sweep, peak_bytes,
throughput, baseline, reference, metrics, oom); a file without them still loads, and the columns it lacks are
left out of its tables.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path


class ReportError(ValueError):
    """A benchmark file that cannot be rendered; the message is one line naming the file."""


@dataclass
class Row:
    group: str
    name: str
    variant: str
    params: dict
    sweep: str | None
    median_s: float | None
    peak_bytes: int | None = None
    throughput: float | None = None
    throughput_unit: str | None = None
    baseline: bool = False
    reference: bool = False
    oom: bool = False
    dtype: str | None = None
    metrics: dict = field(default_factory=dict)
    plot: list = field(default_factory=list)  # extra panels for the sweep plot: metric names or "throughput"
    images: list = field(default_factory=list)  # PNG files saved beside the JSON by bench.save_image
    flops: float | None = None  # per call, for the roofline (model FLOPs when mfu)
    nbytes: float | None = None  # per call, bytes moved, for the roofline
    mfu: bool = False
    error: dict | None = None  # {"max_abs", "max_rel", "ok", ...} against the group's reference
    quantiles: dict | None = None  # {"p20", "p50", "p80"} seconds
    skipped: str | None = None  # the reason, for a row recorded as skipped
    failed: str | None = None  # the error, for a benchmark that failed
    fullname: str | None = None
    device: str | None = None  # where the row's work ran


@dataclass
class Run:
    path: Path
    label: str
    header: dict
    rows: list[Row]


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def load_run(path: str | Path) -> Run:
    """Parse one pytest-benchmark JSON file; a clear ReportError if it is missing, empty or not one."""
    path = Path(path)
    if not path.exists():
        raise ReportError(f"{path}: no such file")
    if not path.is_file():
        raise ReportError(f"{path}: not a file; expected pytest-benchmark JSON (--benchmark-json)")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ReportError(f"{path}: the file is empty; expected pytest-benchmark JSON (--benchmark-json)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    benchmarks = data.get("benchmarks") if isinstance(data, dict) else None
    if not isinstance(benchmarks, list) or not isinstance(data.get("machine_info"), dict):
        raise ReportError(
            f"{path}: not pytest-benchmark output (expected an object with 'machine_info' and a 'benchmarks' list)"
        )
    rows = []
    for i, bench in enumerate(benchmarks):
        if not isinstance(bench, dict) or not isinstance(bench.get("stats"), dict) or "name" not in bench:
            raise ReportError(f"{path}: benchmark #{i} has no 'name' and 'stats'; not pytest-benchmark output")
        try:
            rows.append(_row(bench))
        except ValueError as err:
            raise ReportError(f"{path}: benchmark #{i} ({bench.get('name')!r}): {err}") from None
    rows += _outcome_rows(data, rows)
    _infer_foreign_sweeps(rows)
    return Run(path=path, label=path.stem, header=_header(data), rows=rows)


def _row(bench: dict) -> Row:
    extra = bench.get("extra_info") or {}
    if not isinstance(extra, dict):
        raise ValueError(f"extra_info must be an object, got {type(extra).__name__}")
    if not isinstance(extra.get("metrics") or {}, dict):
        raise ValueError(f"extra_info.metrics must be an object of name: value, got {type(extra['metrics']).__name__}")
    images = extra.get("images") or []
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise ValueError(f"extra_info.images must be a list of file names, got {images!r}")
    for name in images:
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"extra_info.images must name files beside the JSON, got {name!r}")
    params = extra.get("params")
    if not isinstance(params, dict):
        params = {k: v for k, v in (bench.get("params") or {}).items() if v is not None}
    oom = bool(extra.get("oom"))
    median = bench["stats"].get("median")
    if extra.get("skipped"):
        median = None
    return Row(
        group=bench.get("group") or "(no group)",
        name=bench["name"],
        variant=extra.get("variant") or "",
        params=params,
        sweep=extra.get("sweep"),
        median_s=None if oom or not _is_number(median) else float(median),
        peak_bytes=extra.get("peak_bytes") if _is_number(extra.get("peak_bytes")) else None,
        throughput=extra.get("throughput") if _is_number(extra.get("throughput")) else None,
        throughput_unit=extra.get("throughput_unit"),
        baseline=bool(extra.get("baseline")),
        reference=bool(extra.get("reference")),
        oom=oom,
        dtype=extra.get("dtype"),
        metrics=dict(extra.get("metrics") or {}),
        plot=[str(p) for p in extra.get("plot") or []],
        images=list(images),
        flops=float(extra["flops"]) if _is_number(extra.get("flops")) else None,
        nbytes=float(extra["bytes"]) if _is_number(extra.get("bytes")) else None,
        mfu=bool(extra.get("mfu")),
        error=extra.get("error") if isinstance(extra.get("error"), dict) else None,
        quantiles=extra.get("quantiles_s") if isinstance(extra.get("quantiles_s"), dict) else None,
        skipped=str(extra["skipped"]) if extra.get("skipped") else None,
        fullname=bench.get("fullname"),
        device=extra.get("device"),
    )


def _outcome_rows(data: dict, rows: list[Row]) -> list[Row]:
    """Failed and skipped benchmarks recorded by `python -m impl bench`: a row that is already in the JSON is
    marked; one that never produced a row (an import that failed, an error before timing) gets a row of its own."""
    run = data.get("impl_run") if isinstance(data.get("impl_run"), dict) else {}
    by_name = {r.fullname: r for r in rows if r.fullname}
    extra = []
    for o in run.get("outcomes") or []:
        if not isinstance(o, dict):
            continue
        message = str(o.get("message") or "")
        row = by_name.get(o.get("nodeid"))
        if row is None:
            params = {k: v for k, v in (o.get("params") or {}).items() if k != "provider"}
            variant = str((o.get("params") or {}).get("provider") or str(o.get("name") or "?").split("[")[0])
            row = Row(group=o.get("group") or "(no group)", name=str(o.get("name")), variant=variant,
                      params=params, sweep=None, median_s=None, fullname=o.get("nodeid"))
            extra.append(row)
            by_name[row.fullname] = row
        if o.get("outcome") == "failed":
            row.failed = message or "failed"
        elif not row.failed:
            row.skipped = row.skipped or message or "skipped"
    return extra


def _infer_foreign_sweeps(rows: list[Row]) -> None:
    """For rows written without our extra_info: the sweep is the one numeric parameter that varies in the
    group, and the variant is the test name with the sweep taken out."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.group, []).append(row)
    for members in groups.values():
        if all(r.variant for r in members):
            continue
        keys = {k for r in members for k in r.params}
        varying = [k for k in sorted(keys) if len({repr(r.params.get(k)) for r in members}) > 1]
        numeric = [k for k in varying if all(_is_number(r.params.get(k)) for r in members)]
        sweep = numeric[0] if len(numeric) == 1 else None
        for r in members:
            r.sweep = r.sweep or sweep
            if not r.variant:
                folded = [k for k in varying if k != sweep and k in r.params]
                r.variant = " ".join([r.name.split("[")[0], *(f"{k}={r.params[k]}" for k in folded)])
                # What names the variant is no longer a parameter: rows of different variants at the same swept
                # value then line up, so each gets its ratio to the baseline's row.
                r.params = {k: v for k, v in r.params.items() if k not in folded}


def _commit(commit: dict) -> str:
    """A git id shortened to 10 characters; anything else (pytest-benchmark's "unversioned") as it is."""
    ident = str(commit.get("id") or "")
    short = ident[:10] if len(ident) >= 10 and all(c in "0123456789abcdef" for c in ident.lower()) else ident
    return short + ("+dirty" if short and commit.get("dirty") else "")


def _header(data: dict) -> dict:
    machine = data.get("machine_info", {})
    impl = machine.get("impl") or {}
    cpu = machine.get("cpu") or {}
    commit = data.get("commit_info") or {}
    return {
        "cpu": impl.get("cpu_name") or cpu.get("brand_raw") or machine.get("processor") or "unknown",
        "cores": cpu.get("count"),
        "device": impl.get("device"),
        "device_name": impl.get("device_name"),
        "size": impl.get("size"),
        "torch_threads": impl.get("torch_threads"),
        "cuda": impl.get("cuda"),
        "libraries": impl.get("libraries") or {},
        "python": machine.get("python_version"),
        "system": " ".join(x for x in (machine.get("system"), machine.get("release")) if x),
        "date": data.get("datetime"),
        "partial_runs": [d for d in data.get("partial_runs") or [] if d],
        "commit": _commit(commit),
        "roofs": impl.get("roofs") if isinstance(impl.get("roofs"), dict) else None,
        "datasheet": impl.get("datasheet") if isinstance(impl.get("datasheet"), dict) else None,
        "run": data.get("impl_run") if isinstance(data.get("impl_run"), dict) else None,
    }
