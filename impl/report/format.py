"""Text for the report: markdown-safe names, units, and the header of each run (machine, roofs, budget, failures,
and how the figures are measured)."""

import math
import re

from impl.report.load import Run

MIB = 2**20


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "group"


def _md(text) -> str:
    """Text safe inside a markdown table cell or heading: no line breaks, pipes or raw HTML."""
    text = re.sub(r"\s+", " ", str(text)).strip()
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "OOM"
    if not math.isfinite(seconds) or seconds < 0:
        return "invalid"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    if not math.isfinite(n) or n < 0:
        return "invalid"
    for unit, scale in (("GiB", 2**30), ("MiB", MIB), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}" if math.isfinite(x) else "invalid"
    return "-" if x is None else _md(x)


def _anchor(heading: str) -> str:
    """The id GitHub gives a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _number(x) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _run_title(run: Run) -> str:
    h = run.header
    where = h.get("device_name") or h.get("cpu")
    if h.get("device"):
        where = f"{h['device']}: {where}"
    size = f", size {h['size']}" if h.get("size") else ""
    return f"{where}{size} ({run.label})"


def _header_md(run: Run) -> list[str]:
    h = run.header
    libs = ", ".join(f"{k} {v}" for k, v in h["libraries"].items() if v)
    lines = [
        f"### Run `{run.label}`",
        "",
        f"- machine: {h['cpu']}"
        + (f", {h['cores']} cores" if h.get("cores") else "")
        + (f", {h['torch_threads']} torch threads" if h.get("torch_threads") else ""),
    ]
    if h.get("device"):
        lines.append(
            f"- device: {h['device']} ({h.get('device_name')})" + (f", CUDA {h['cuda']}" if h.get("cuda") else "")
        )
    if h.get("size"):
        lines.append(f"- benchmark size: {h['size']}")
    roofs = h.get("roofs") or {}
    if roofs.get("gemm_tflops"):
        gemm = ", ".join(f"{d} {v:.3g} TFLOP/s" for d, v in roofs["gemm_tflops"].items() if _number(v))
        lines.append(f"- roofs measured at the start of the run: GEMM ({roofs.get('gemm_n')}^3) {gemm}; copy "
                     f"{_number(roofs.get('copy_gbs')) or 0:.3g} GB/s ({_fmt_bytes(roofs.get('copy_bytes'))} read "
                     "and written)")
    sheet = h.get("datasheet")
    if sheet:
        peaks = ", ".join(f"{d} {v:g} TFLOP/s" for d, v in (sheet.get("tflops") or {}).items())
        lines.append(f"- datasheet peak ({_md(sheet.get('name'))}, dense): {peaks}; {sheet.get('gbs'):g} GB/s "
                     f"({_md(sheet.get('source'))})")
    lines += _run_record(h.get("run"))
    lines += [
        f"- software: Python {h.get('python')}"
        + (f", {libs}" if libs else "")
        + (f"; {h['system']}" if h.get("system") else ""),
        f"- date: {h.get('date')}"
        + (f"; some benchmarks re-measured on {', '.join(h['partial_runs'])}" if h.get("partial_runs") else "")
        + (f", commit {h['commit']}" if h.get("commit") else ""),
        "",
    ]
    return lines


def _run_record(run: dict | None) -> list[str]:
    """The groups a budgeted run skipped or stopped, and how many benchmarks failed."""
    if not run:
        return []
    lines = []
    groups = [g for g in run.get("groups") or [] if isinstance(g, dict)]
    if run.get("budget_s") is not None:
        ran = [g for g in groups if g.get("status") == "ran"]
        spent = sum(g.get("seconds") or 0 for g in ran)
        lines.append(f"- budget {run['budget_s']:g} s: {len(ran)} of {len(groups)} groups ran, in {spent:.0f} s")
    for g in groups:
        if g.get("status") in ("skipped", "stopped"):
            lines.append(f"  - {_md(g.get('module'))} {g['status']}: {_md(g.get('reason'))}")
    failed = [o for o in run.get("outcomes") or [] if isinstance(o, dict) and o.get("outcome") == "failed"]
    if failed:
        lines.append(f"- **{len(failed)} benchmark(s) failed**; each is a row marked failed in its group: "
                     + ", ".join(f"`{_md(o.get('nodeid'))}`" for o in failed[:10]) + (" ..." if len(failed) > 10
                                                                                       else ""))
    return lines


CONVENTIONS = (
    "How figures are measured: on CUDA each call is timed with CUDA events, after a warm-up, with the L2 cache "
    "flushed before every call for kernel groups; on CPU with `time.perf_counter`. The median is shown, with "
    "the p20 and p80 as fractions of it. FLOPs: GEMM 2·M·N·K; attention forward 4·B·H·Nq·Nk·D (causal: the live "
    "half), backward 2.5x forward; a training step's model FLOPs are (6·N + 12·L·T·d) per token (frozen weights "
    "count 4·N), recomputation not counted. Bytes: each input read once and each output written once; a decode "
    "step reads the weights and the KV cache once per token. % of roof is achieved / min(P, I·B) at arithmetic "
    "intensity I = FLOPs / bytes, with P and B measured at the start of the run (a large GEMM per dtype, a large "
    "copy); % of peak uses the vendor's dense datasheet figures; the bound is compute when I is above the ridge "
    "point P / B. MFU is a training step's model FLOP/s over the same roofs. Errors are against the group's "
    "reference on the benchmark's own inputs: max |ours - ref|, and that over max |ref|; a row outside the "
    "dtype's tolerance fails its benchmark. Conventions and the datasheet table: `impl/common/roofline.py`."
)
