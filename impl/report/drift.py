"""Rendering a comparison of two benchmark runs (markdown table and a plot per group, a drift section for the
report) and the command `python -m impl compare BASE.json NEW.json`; the judging is in impl.report.compare."""

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

from impl.common import cli
from impl.report.compare import (
    ERROR_GROWTH,
    KINDS,
    MEMORY_THRESHOLD_PCT,
    TIME_THRESHOLD_PCT,
    Comparison,
    _change,
    _iqr,
    _label,
    _number,
    _ratio,
    _references,
    _verdict,
    compare_runs,
)
from impl.report.format import _fmt_bytes, _fmt_time, _md
from impl.report.load import ReportError, Run, load_run
from impl.report.render import _unique_png


def _group_table(comparison: Comparison, group: str, refs: tuple, iqr: tuple) -> pd.DataFrame:
    records = []
    for p in (p for p in comparison.pairs if p.group == group):
        mine = [f for f in comparison.findings if f.group == group and f.row == p.label]
        rec = {"row": _md(p.label), "median time": _change(p.base.median_s, p.new.median_s, _fmt_time),
               "peak memory": _change(p.base.peak_bytes, p.new.peak_bytes, _fmt_bytes)}
        if p.base.peak_bytes is not None and p.new.peak_bytes is not None and p.new.peak_bytes != p.base.peak_bytes:
            rec["peak memory"] += f", {p.new.peak_bytes - p.base.peak_bytes:+d} B"
        if p.base.throughput is not None or p.new.throughput is not None:
            rec[_md(p.new.throughput_unit or "throughput")] = _change(p.base.throughput, p.new.throughput,
                                                                      lambda x: f"{x:.4g}")
        if p.base.error or p.new.error:
            rec["max abs err"] = _change((p.base.error or {}).get("max_abs"), (p.new.error or {}).get("max_abs"),
                                         lambda x: f"{x:.2e}")
        for which in ("reference", "baseline"):
            rb, rn = _ratio(p.base, refs[0], which, iqr[0]), _ratio(p.new, refs[1], which, iqr[1])
            if rb or rn:
                ref = _md((rb or rn)[2])
                rec[f"time / {ref}"] = _change(rb[0] if rb else None, rn[0] if rn else None, lambda x: f"{x:.3g}")
        rec["verdict"] = _verdict(mine, p)
        records.append(rec)
    table = pd.DataFrame.from_records(records).fillna("-")
    table = table[[c for c in table if c != "verdict"] + ["verdict"]]  # ratio columns come in as rows need them
    return table.drop(columns=[c for c in table if c != "row" and (table[c].isin(["-", "- → -", ""])).all()])


def plot_group(comparison: Comparison, group: str, path: Path) -> bool:
    """A bar per timed row: new / base median time, coloured by its verdict, with the threshold marked; False
    when the group has fewer than two timed rows (a table says it better)."""
    pairs = [p for p in comparison.pairs if p.group == group and _number(p.base.median_s) and
             _number(p.new.median_s) and p.base.median_s > 0]
    if len(pairs) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"worse": "tab:red", "better": "tab:green", "noise": "tab:gray", "": "tab:blue"}
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(pairs) + 1.5))
    ratios = [p.new.median_s / p.base.median_s for p in pairs]
    ax.barh(range(len(pairs)), [r - 1 for r in ratios], left=1, color=[colors[p.time] for p in pairs])
    ax.set_yticks(range(len(pairs)), [p.label for p in pairs], fontsize=7)
    threshold = comparison.threshold(group)
    for x, style in ((1, "-"), (1 + threshold, "--"), (1 / (1 + threshold), "--")):
        ax.axvline(x, color="black", linestyle=style, linewidth=0.8)
    ax.set_xlabel("new / base median time (dashed: the threshold)")
    ax.set_title(f"{group}: {comparison.new.label} against {comparison.base.label}\n"
                 "red: slower beyond the noise, green: faster, grey: noise", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def summary(comparison: Comparison) -> str:
    c = comparison
    counts = [(len(c.regressions), "counted regression", "counted regressions"),
              (len(c.warnings), "warning", "warnings"),
              (sum(f.severity == "improved" for f in c.findings), "improvement", "improvements"),
              (len(c.only_new), "row added", "rows added"), (len(c.only_base), "row removed", "rows removed")]
    return ", ".join(f"{n} {one if n == 1 else many}" for n, one, many in counts)


def _run_line(run: Run) -> str:
    h = run.header
    return (f"`{_md(run.label)}`: {h.get('device')} ({_md(h.get('device_name'))}), size {h.get('size')}, "
            f"{_md(h.get('date'))}" + (f", commit {h['commit']}" if h.get("commit") else ""))


def render_comparison(comparison: Comparison, out_dir: str | Path | None = None, *,
                      title: str | None = None) -> str:
    """The comparison as markdown: summary, the counted regressions and warnings, a table per group (and, with
    `out_dir`, a plot per group with at least two timed rows, written there), the rows found in one run only."""
    c = comparison
    default = ", ".join(f"{k}={v:g}%" for k, v in sorted(c.thresholds.items()))
    lines = [f"# {title or f'{_md(c.new.label)} against {_md(c.base.label)}'}", "",
             f"- base: {_run_line(c.base)}", f"- new: {_run_line(c.new)}",
             f"- a time change counts when it is outside both runs' p20-p80 spread and past the group's threshold "
             f"({TIME_THRESHOLD_PCT:g}% unless set{': ' + _md(default) if default else ''}); time / X is this row's "
             f"time over X's in the same run; peak memory: any byte more on CPU, "
             f"{MEMORY_THRESHOLD_PCT['cuda']:g}% on CUDA; errors: over tolerance now, or max abs error up "
             f"{ERROR_GROWTH:g}x", *(f"- note: {n}" for n in c.notes), "", f"**{summary(c)}.**", ""]
    for severity, heading in (("regression", "Counted regressions"), ("warning", "Warnings")):
        found = [f for f in c.findings if f.severity == severity]
        if found:
            lines += [f"## {heading}", ""]
            lines += [f"- {f.kind}: {_md(f.group)} / {_md(f.row)}: {_md(f.detail)}" for f in found] + [""]
    taken: set[str] = set()
    refs, iqr = (_references(c.base), _references(c.new)), (_iqr(c.base), _iqr(c.new))
    for group in dict.fromkeys(p.group for p in c.pairs):
        lines += [f"## {_md(group)}", "", _group_table(c, group, refs, iqr).to_markdown(index=False), ""]
        if out_dir is not None:
            png = _unique_png(group, "compare", taken)
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            if plot_group(c, group, Path(out_dir) / png):
                lines += [f"![{_md(group)}]({png})", ""]
    for rows, heading in ((c.only_base, f"Only in {c.base.label}"), (c.only_new, f"Only in {c.new.label}")):
        if rows:
            lines += [f"## {_md(heading)}", ""] + [f"- {_md(r.group)} / {_md(_label(r))}" for r in rows] + [""]
    return "\n".join(lines).rstrip() + "\n"


def write_comparison(comparison: Comparison, out_dir: str | Path) -> Path:
    """`out_dir/compare.md` and its plots; the markdown's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "compare.md"
    path.write_text(render_comparison(comparison, out_dir), encoding="utf-8")
    return path


def append_drift(readme: Path, base_path: str | Path, new_path: str | Path) -> Comparison:
    """For `python -m impl bench --compare BASE.json`: compare.md beside the report, and a short "Drift against"
    section at the end of the report linking to it. Runs of other devices are compared, with a note."""
    readme, new_path = Path(readme), Path(new_path)
    comparison = compare_runs(load_run(base_path), load_run(new_path), allow_device_mismatch=True)
    path = write_comparison(comparison, readme.parent)
    lines = [f"## Drift against {_md(Path(base_path).name)}", "", f"{_md(new_path.name)}: {summary(comparison)}; "
             f"the table per group is in [{path.name}]({path.name}).", ""]
    lines += [f"- {f.kind}: {_md(f.group)} / {_md(f.row)}: {_md(f.detail)}" for f in comparison.regressions]
    with readme.open("a", encoding="utf-8") as fh:
        fh.write("\n" + "\n".join(lines).rstrip() + "\n")
    return comparison


# ---- the command line


def _threshold(text: str) -> tuple[str, float]:
    group, sep, pct = text.rpartition("=")
    try:
        value = float(pct)
    except ValueError:
        value = math.nan
    if not sep or not group or not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected GROUP=PCT with PCT >= 0 (or *=PCT for every group), got {text!r}")
    return group, value


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS[:4]]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown kind {unknown[0]!r}; expected some of {', '.join(KINDS[:4])}")
    return kinds


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("impl.report.drift", __doc__.split("\n\n")[0])
    parser.add_argument("base", help="the earlier run's JSON (written by python -m impl bench)")
    parser.add_argument("new", help="the later run's JSON")
    parser.add_argument("-o", "--out", type=cli.writable_dir, default=None,
                        help="folder for compare.md and its plots (default: NEW's)")
    parser.add_argument("--threshold", type=_threshold, action="append", default=[], metavar="GROUP=PCT",
                        help=f"time threshold of a group in percent (default {TIME_THRESHOLD_PCT:g}; *=PCT for all)")
    parser.add_argument("--fail-on-regression", action="store_true", help="exit 1 when a regression counts")
    parser.add_argument("--allow-device-mismatch", action="store_true",
                        help="compare runs of different devices (absolute times then only warn)")
    parser.add_argument("--warn-only", type=_kinds, default=(), metavar="KIND[,KIND]",
                        help="report these kinds (time, time-ratio, memory, error) as warnings, never counted")
    args = parser.parse_args(argv)
    try:
        comparison = compare_runs(load_run(args.base), load_run(args.new), dict(args.threshold),
                                  allow_device_mismatch=args.allow_device_mismatch, warn_only=args.warn_only)
        path = write_comparison(comparison, args.out or Path(args.new).parent)
    except (ReportError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for f in comparison.findings:
        if f.severity in ("regression", "warning"):
            print(f"{f.severity}: {f.kind}: {f.group} / {f.row}: {f.detail}")
    print(f"{summary(comparison)}; wrote {path}")
    return 1 if args.fail_on_regression and comparison.regressions else 0


if __name__ == "__main__":
    sys.exit(main())
