"""Benchmark rows -> a markdown report with one table per group and a plot per sweep."""

import hashlib
import math
import re
import shutil
from pathlib import Path

import pandas as pd

from impl.common.roofline import roofline
from impl.report.format import (
    CONVENTIONS,
    MIB,
    _anchor,
    _fmt,
    _fmt_bytes,
    _fmt_time,
    _header_md,
    _md,
    _number,
    _run_title,
    _slug,
)
from impl.report.load import Row, Run


def _key(row: Row, varying: list[str]) -> tuple:
    return tuple(repr(row.params.get(k)) for k in varying)


def _ratio(num: float | None, den: float | None) -> str:
    if num is None or den is None or den <= 0 or num <= 0 or not math.isfinite(num / den):
        return "-"
    return f"{num / den:.2f}x"


def _varying(rows: list[Row]) -> list[str]:
    keys = sorted({k for r in rows for k in r.params})
    return [k for k in keys if len({repr(r.params.get(k)) for r in rows}) > 1]


def _fixed(rows: list[Row], varying: list[str]) -> str:
    keys = sorted({k for r in rows for k in r.params} - set(varying))
    parts = [f"{k}={rows[0].params.get(k)}" for k in keys]
    dtypes = {r.dtype for r in rows if r.dtype}
    if len(dtypes) == 1:
        parts.append(f"dtype={dtypes.pop()}")
    return ", ".join(parts)


def _roof_columns(r: Row, header: dict) -> dict:
    """% of the measured roof and of the datasheet peak (MFU for training steps), and the bound that applies."""
    if r.median_s is None or (r.flops is None and r.nbytes is None) or (header.get("device") and r.device and
                                                                        r.device != header.get("device")):
        return {}
    dtype = r.dtype or "float32"
    roofs, sheet = header.get("roofs") or {}, header.get("datasheet")
    names = ("MFU (roof)", "MFU (peak)") if r.mfu else ("% of roof", "% of peak")
    out = {}
    measured = roofline(r.median_s, flops=r.flops, nbytes=r.nbytes,
                        peak_tflops=(roofs.get("gemm_tflops") or {}).get(dtype), peak_gbs=roofs.get("copy_gbs"))
    if measured:
        out[names[0]] = f"{measured['percent']:.1f}%"
    if sheet:
        peak = roofline(r.median_s, flops=r.flops, nbytes=r.nbytes, peak_tflops=(sheet.get("tflops") or {}).get(dtype),
                        peak_gbs=sheet.get("gbs"))
        if peak:
            out[names[1]] = f"{peak['percent']:.1f}%"
    if measured and not r.mfu:
        out["bound"] = measured["bound"]
    return out


def _error_columns(r: Row) -> dict:
    if not r.error:
        return {}
    ok = r.error.get("ok")
    return {"max abs err": f"{r.error.get('max_abs', math.nan):.2e}", "max rel err":
            f"{r.error.get('max_rel', math.nan):.2e}" + ("" if ok is not False else " (over tolerance)")}


def _spread(r: Row) -> str | None:
    q = r.quantiles or {}
    if r.median_s and all(isinstance(q.get(k), int | float) for k in ("p20", "p80")) and q["p80"] >= q["p20"] >= 0:
        return f"{q['p20'] / r.median_s:.2f}-{q['p80'] / r.median_s:.2f}"
    return None


def _time_cell(r: Row) -> str:
    if r.failed:
        return "failed"
    if r.skipped:
        return "skipped"
    return _fmt_time(r.median_s)


def group_table(rows: list[Row], header: dict | None = None) -> pd.DataFrame:
    """One row per benchmark: its parameters, median time (with the p20-p80 spread as a fraction of it), peak
    memory, throughput, % of the roofs, error against the reference, and the ratios to the group's baseline and
    reference at the same parameters (speed-up: their time / ours; memory: ours / theirs). Failed and skipped
    rows say why in `note`. Columns that no row has data for are left out."""
    header = header or {}
    varying = [k for k in _varying(rows)]
    sweep = next((r.sweep for r in rows if r.sweep), None)
    if sweep in varying:  # the sweep first, then other parameters
        varying.remove(sweep)
        varying.insert(0, sweep)
    base = {_key(r, varying): r for r in rows if r.baseline}
    ref = {_key(r, varying): r for r in rows if r.reference}
    records = []
    order = sorted(rows, key=lambda r: ([_sort_value(r.params.get(k)) for k in varying], r.variant))
    for r in order:
        rec = {"variant": _md(r.variant)}
        rec.update({_md(k): _fmt(r.params.get(k)) for k in varying})
        rec["median time"] = _time_cell(r)
        spread = _spread(r)
        if spread:
            rec["p20-p80 / median"] = spread
        rec["peak memory"] = _fmt_bytes(r.peak_bytes) if not r.oom else "OOM"
        if r.throughput is not None:
            rec[_md(r.throughput_unit or "throughput")] = _fmt(r.throughput)
        rec.update(_roof_columns(r, header))
        rec.update(_error_columns(r))
        b, f = base.get(_key(r, varying)), ref.get(_key(r, varying))
        if b is not None:
            rec[f"speed-up vs {_md(b.variant)}"] = _ratio(b.median_s, r.median_s)
            rec[f"memory vs {_md(b.variant)}"] = _ratio(r.peak_bytes, b.peak_bytes)
        if f is not None:
            rec[f"speed-up vs {_md(f.variant)}"] = _ratio(f.median_s, r.median_s)
            rec[f"memory vs {_md(f.variant)}"] = _ratio(r.peak_bytes, f.peak_bytes)
        rec.update({_md(k): _fmt(v) for k, v in r.metrics.items()})
        if r.failed or r.skipped:
            rec["note"] = _md(("failed: " + r.failed) if r.failed else ("skipped: " + r.skipped))
        records.append(rec)
    table = pd.DataFrame.from_records(records)
    if "peak memory" in table and (table["peak memory"] == "-").all():
        table = table.drop(columns="peak memory")
    return table.fillna("-")


def _sort_value(x):
    return (0, x, "") if isinstance(x, int | float) and not isinstance(x, bool) else (1, 0, repr(x))


def plot_sweep(rows: list[Row], path: Path, title: str) -> bool:
    """Time, peak memory (when measured) and the panels rows ask for (`Row.plot`) against the sweep parameter,
    a line per variant; False if the group has no numeric sweep to plot."""
    sweep = next((r.sweep for r in rows if r.sweep), None)
    points = [r for r in rows if sweep and isinstance(r.params.get(sweep), int | float) and r.median_s is not None
              and math.isfinite(r.median_s) and r.median_s > 0]
    if not points or len({r.params[sweep] for r in points}) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [k for k in _varying(points) if k != sweep]
    series: dict[str, list[Row]] = {}
    for r in points:
        label = " ".join([r.variant, *(f"{k}={r.params.get(k)}" for k in others)])
        series.setdefault(label, []).append(r)
    panels = [("median time (ms)", lambda r: r.median_s * 1e3)]
    if any(r.peak_bytes for r in points):
        panels.append(("peak memory (MiB)", lambda r: r.peak_bytes / MIB if r.peak_bytes else None))
    for name in dict.fromkeys(p for r in points for p in r.plot):
        if name == "throughput":
            unit = next((r.throughput_unit for r in points if r.throughput_unit), "throughput")
            panels.append((unit, lambda r: r.throughput))
        else:
            panels.append((name, lambda r, name=name: _number(r.metrics.get(name))))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    xs = [r.params[sweep] for r in points]
    log_x = min(xs) > 0 and max(xs) / min(xs) >= 8
    for ax, (ylabel, value) in zip(axes[0], panels):
        ys_all = []
        for label, members in sorted(series.items()):
            members = sorted(members, key=lambda r: r.params[sweep])
            pts = [(r.params[sweep], value(r)) for r in members if value(r) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
                ys_all += [y for _, y in pts]
        if log_x:
            ax.set_xscale("log", base=2)
        if ys_all and min(ys_all) > 0 and max(ys_all) / min(ys_all) >= 20:
            ax.set_yscale("log")
        ax.set_xlabel(sweep)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _run_sections(out_dir: Path) -> list[str]:
    """Sections written by training CLIs into `<out>/<run>/report.md` (loss curves, samples), links made
    relative to the report."""
    sections = sorted(out_dir.glob("*/report.md"))
    if not sections:
        return []
    lines = ["## Training runs", ""]
    for section in sections:
        folder = section.parent.name
        text = re.sub(
            r"\]\((?![a-z]+:|/|#)([^)]+)\)", lambda m, folder=folder: f"]({folder}/{m.group(1)})", section.read_text()
        )
        lines += [text.rstrip(), ""]
    return lines


def _images(rows: list[Row], run: Run, out_dir: Path) -> list[str]:
    """Pictures the group's benchmarks saved beside their JSON, copied next to the report and shown."""
    lines = []
    for name in dict.fromkeys(name for r in rows for name in r.images):
        source = run.path.parent / name
        if not source.is_file():
            lines += [f"(picture `{_md(name)}` was not found beside {_md(run.path.name)})", ""]
            continue
        target = source
        if source.parent.resolve() != out_dir.resolve():
            target = out_dir / f"{_slug(run.label)}--{name}"
            shutil.copyfile(source, target)
        lines += [f"![{_md(name)}]({target.name})", ""]
    return lines


def _unique_png(group: str, label: str, taken: set[str]) -> str:
    """A plot file name per group and run; a short hash keeps names that slug alike apart."""
    name = f"{_slug(group)}--{_slug(label)}.png"
    if name in taken or _slug(group) == "group":
        digest = hashlib.sha1(group.encode("utf-8")).hexdigest()[:8]
        name = f"{_slug(group)}-{digest}--{_slug(label)}.png"
    taken.add(name)
    return name


def render(runs: list[Run], out_dir: str | Path, title: str = "Benchmark report") -> Path:
    """Write `README.md` and one PNG per swept group and run into `out_dir`; return the markdown's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# {title}",
        "",
        "Generated by `python -m impl.report` from pytest-benchmark JSON; every number below comes from a "
        "benchmark run, none is typed by hand. Times are medians; speed-up is the other variant's time over "
        "this one's (above 1: faster); memory is this one's peak over the other's (below 1: smaller). "
        "Peak memory is CUDA allocator peak on GPU and exact tensor accounting on CPU.",
        "",
        CONVENTIONS,
        "",
        "## Runs",
        "",
    ]
    for run in runs:
        lines += _header_md(run)
    groups: list[str] = []
    for run in runs:
        for r in run.rows:
            if r.group not in groups:
                groups.append(r.group)
    lines += ["## Contents", ""]
    lines += [f"- [{_md(group)}](#{_anchor(_md(group))})" for group in groups]
    if any(out_dir.glob("*/report.md")):
        lines += ["- [Training runs](#training-runs)"]
    lines += [""]
    taken: set[str] = set()
    for group in groups:
        lines += [f"## {_md(group)}", ""]
        for run in runs:
            rows = [r for r in run.rows if r.group == group]
            if not rows:
                continue
            if len(runs) > 1:
                lines += [f"### {_md(_run_title(run))}", ""]
            fixed = _fixed(rows, _varying(rows))
            if fixed:
                lines += [f"Fixed: {_md(fixed)}.", ""]
            lines += [group_table(rows, run.header).to_markdown(index=False), ""]
            png = _unique_png(group, run.label, taken)
            if plot_sweep(rows, out_dir / png, f"{group} — {_run_title(run)}"):
                lines += [f"![{_md(group)}]({png})", ""]
            lines += _images(rows, run, out_dir)
    lines += _run_sections(out_dir)
    path = out_dir / "README.md"
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path
