"""A/B comparison of two benchmark runs, and a regression guard: `python -m impl compare BASE.json NEW.json`.

Rows are matched by group, variant and parameters; rows found in one run only are listed. What is compared:

| kind           | quantity                                      | a regression when                               |
|----------------|-----------------------------------------------|-------------------------------------------------|
| time           | median time                                   | outside both runs' spread, past the threshold   |
| time-ratio     | ours / the reference's (or baseline's) time, in each run | the same, spreads carried through |
| memory         | peak bytes                                    | CPU: one byte more (exact); CUDA: 5%; a new OOM |
| error          | error against the reference                   | over tolerance now, max_abs up 10x, fails now   |
| added, removed | rows in one run only                          | never (a removed row is a warning)              |

The spread is p20-p80 (the bench fixture's `quantiles_s`), else pytest-benchmark's q1-q3. The time threshold is
10% per group unless `--threshold GROUP=PCT` says otherwise. CPU machines differ and are noisy, so absolute times
only count between runs of the same machine; across machines (`--allow-device-mismatch`) they are warnings, and
what survives the change of machine carries the guard: ratios within each run, exact CPU bytes, errors.
"""

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from impl.report.load import ReportError, Row, Run, load_run
from impl.report.render import _fmt_bytes, _fmt_time, _key, _md, _unique_png, _varying

KINDS = ("time", "time-ratio", "memory", "error", "added", "removed")
TIME_THRESHOLD_PCT = 10.0  # a group's default; --threshold GROUP=PCT (or *=PCT for every group) overrides it
MEMORY_THRESHOLD_PCT = {"cpu": 0.0, "cuda": 5.0}  # CPU bytes are exact accounting; the CUDA allocator rounds
ERROR_GROWTH = 10.0  # max_abs growing by more than this factor counts, even while still within tolerance


@dataclass
class Finding:
    kind: str  # one of KINDS
    group: str
    row: str  # the row's variant and parameters, as the report names it
    severity: str  # "regression" (counted), "warning", "improved" or "info"
    detail: str  # one line: what changed, by how much
    base: float | None = None
    new: float | None = None

    @property
    def counted(self) -> bool:
        return self.severity == "regression"


@dataclass
class Pair:
    group: str
    label: str
    base: Row
    new: Row
    time: str = ""  # "worse", "better", "noise" (past the threshold, inside the spread) or "" (within it)


@dataclass
class Comparison:
    base: Run
    new: Run
    pairs: list[Pair]
    only_base: list[Row]
    only_new: list[Row]
    findings: list[Finding]
    thresholds: dict[str, float]  # group -> time threshold in percent; "*" for the default
    same_machine: bool  # same device and CPU: absolute times are comparable
    notes: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[Finding]:
        return [f for f in self.findings if f.counted]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def threshold(self, group: str) -> float:
        """The group's time threshold as a fraction."""
        return self.thresholds.get(group, self.thresholds.get("*", TIME_THRESHOLD_PCT)) / 100


def _number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _label(row: Row) -> str:
    return " ".join([row.variant, *(f"{k}={row.params[k]}" for k in sorted(row.params))]).strip() or row.name


def _identity(row: Row) -> tuple:
    return row.group, row.variant, json.dumps(row.params, sort_keys=True, default=repr)


def _index(rows: list[Row]) -> dict[tuple, Row]:
    """Rows by identity; a second row with the same identity (a foreign file) is told apart by its test name."""
    out: dict[tuple, Row] = {}
    for r in rows:
        key = _identity(r)
        out[(*key, r.name) if key in out else key] = r
    return out


def _iqr(run: Run) -> dict[str, tuple[float, float]]:
    """pytest-benchmark's q1 and q3 by test id, the spread of rows recorded without our quantiles."""
    try:
        data = json.loads(run.path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out = {}
    for b in data.get("benchmarks") or []:
        stats = b.get("stats") or {}
        if _number(stats.get("q1")) and _number(stats.get("q3")):
            out[b.get("fullname") or b.get("name")] = (stats["q1"], stats["q3"])
    return out


def _band(row: Row, iqr: dict) -> tuple[float, float] | None:
    """The row's time spread (p20-p80, else q1-q3, else just the median), always containing the median."""
    m = row.median_s
    if not _number(m) or m <= 0 or row.failed or row.skipped:
        return None
    q = row.quantiles or {}
    lo, hi = q.get("p20"), q.get("p80")
    if not (_number(lo) and _number(hi)):
        lo, hi = iqr.get(row.fullname or row.name, (m, m))
    return min(lo, m), max(hi, m)


def _judge(base: tuple[float, tuple], new: tuple[float, tuple], threshold: float) -> str:
    """Compare two times (or ratios), larger is worse: "worse" or "better" when the change is past the threshold
    and each median lies outside the other run's spread; "noise" when past the threshold but inside a spread."""
    (b, (b_lo, b_hi)), (n, (n_lo, n_hi)) = base, new
    if n > b * (1 + threshold):
        return "worse" if n > b_hi and b < n_lo else "noise"
    if b > n * (1 + threshold):
        return "better" if n < b_lo and b > n_hi else "noise"
    return ""


def _pct(base: float, new: float) -> str:
    return f"{(new / base - 1) * 100:+.0f}%" if base else "new"


def _check_runs(base: Run, new: Run, allow_device_mismatch: bool) -> None:
    for run in (base, new):
        if not run.header.get("device"):
            raise ReportError(f"{run.path}: not written by `python -m impl bench` (no machine_info.impl.device); "
                              "compare needs our runs")
    where = [(r.header.get("device"), r.header.get("device_name")) for r in (base, new)]
    if where[0] != where[1] and not allow_device_mismatch:
        raise ReportError(f"{base.path} ran on {where[0][0]} ({where[0][1]}), {new.path} on {where[1][0]} "
                          f"({where[1][1]}); pass --allow-device-mismatch to compare them anyway")


def compare_runs(base: Run, new: Run, thresholds: dict[str, float] | None = None, *,
                 allow_device_mismatch: bool = False, warn_only: tuple[str, ...] = ()) -> Comparison:
    """Match the rows of two runs and list what changed. `thresholds` maps a group (or "*") to its time threshold
    in percent; kinds in `warn_only` are reported as warnings, never counted. ReportError (one line) for a run not
    written by our bench, or for runs from different devices unless `allow_device_mismatch`."""
    _check_runs(base, new, allow_device_mismatch)
    thresholds = dict(thresholds or {})
    same_machine = all(base.header.get(k) == new.header.get(k) for k in ("device", "device_name", "cpu"))
    comparison = Comparison(base, new, [], [], [], [], thresholds, same_machine)
    if not same_machine:
        comparison.notes.append("the runs come from different machines: absolute time changes are warnings; the "
                                "ratios within each run, the peak bytes and the errors still count")
    if base.header.get("size") != new.header.get("size"):
        comparison.notes.append(f"the runs have different sizes ({base.header.get('size')} and "
                                f"{new.header.get('size')}): most rows will not match")
    old, fresh = _index(base.rows), _index(new.rows)
    comparison.only_base = [r for k, r in old.items() if k not in fresh]
    comparison.only_new = [r for k, r in fresh.items() if k not in old]
    comparison.pairs = [Pair(r.group, _label(r), r, fresh[k]) for k, r in old.items() if k in fresh]
    refs = (_references(base), _references(new))
    iqr = (_iqr(base), _iqr(new))

    def add(kind: str, pair_or_row, worse: bool | None, detail: str, b=None, n=None) -> None:
        if worse is None:
            severity = "info"
        elif not worse:
            severity = "improved"
        elif kind in warn_only or (kind == "time" and not same_machine):
            severity = "warning"
        else:
            severity = "regression"
        group, label = (pair_or_row.group, pair_or_row.label) if isinstance(pair_or_row, Pair) else \
            (pair_or_row.group, _label(pair_or_row))
        comparison.findings.append(Finding(kind, group, label, severity, detail, b, n))

    for p in comparison.pairs:
        threshold = comparison.threshold(p.group)
        bands = _band(p.base, iqr[0]), _band(p.new, iqr[1])
        if bands[0] and bands[1]:
            p.time = _judge((p.base.median_s, bands[0]), (p.new.median_s, bands[1]), threshold)
            if p.time in ("worse", "better"):
                add("time", p, p.time == "worse", f"median {_fmt_time(p.base.median_s)} → "
                    f"{_fmt_time(p.new.median_s)} ({_pct(p.base.median_s, p.new.median_s)})",
                    p.base.median_s, p.new.median_s)
        for which in ("reference", "baseline"):
            ratio_b, ratio_n = (_ratio(r, refs[i], which, iqr[i]) for i, r in enumerate((p.base, p.new)))
            if not ratio_b or not ratio_n or ratio_b[2] != ratio_n[2]:
                continue
            verdict = _judge(ratio_b[:2], ratio_n[:2], threshold)
            if verdict in ("worse", "better"):
                add("time-ratio", p, verdict == "worse", f"time / {ratio_b[2]} {ratio_b[0]:.3g} → {ratio_n[0]:.3g} "
                    f"({_pct(ratio_b[0], ratio_n[0])})", ratio_b[0], ratio_n[0])
        _memory(p, add)
        _error(p, add)
    for r in comparison.only_base:
        comparison.findings.append(Finding("removed", r.group, _label(r), "warning", "only in the base run"))
    for r in comparison.only_new:
        comparison.findings.append(Finding("added", r.group, _label(r), "info", "only in the new run"))
    return comparison


def _references(run: Run) -> tuple[dict, dict]:
    """{(group, "reference" or "baseline", key of the varying parameters): that row}, as the report matches them,
    and the varying parameters of each group."""
    groups: dict[str, list[Row]] = {}
    for r in run.rows:
        groups.setdefault(r.group, []).append(r)
    out = {}
    for group, rows in groups.items():
        varying = _varying(rows)
        for r in rows:
            for which in ("reference", "baseline"):
                if getattr(r, which):
                    out[(group, which, _key(r, varying))] = r
    return out, {g: _varying(rows) for g, rows in groups.items()}


def _ratio(row: Row, refs: tuple[dict, dict], which: str, iqr: dict) -> tuple | None:
    """(ours / ref median, its spread, the ref's variant) within one run; None without a timed ref row."""
    rows, varying = refs
    ref = rows.get((row.group, which, _key(row, varying[row.group])))
    if ref is None or ref is row or getattr(row, which):
        return None
    ours, theirs = _band(row, iqr), _band(ref, iqr)
    if not ours or not theirs:
        return None
    return row.median_s / ref.median_s, (ours[0] / theirs[1], ours[1] / theirs[0]), ref.variant


def _memory(p: Pair, add) -> None:
    b, n = p.base.peak_bytes, p.new.peak_bytes
    if p.new.oom and not p.base.oom:
        add("memory", p, True, "out of memory now")
        return
    if b is None or n is None or n == b:
        return
    pct = MEMORY_THRESHOLD_PCT.get(p.new.device or "cpu", MEMORY_THRESHOLD_PCT["cuda"]) / 100
    detail = f"peak {_fmt_bytes(b)} → {_fmt_bytes(n)} ({n - b:+d} B)"
    if n > b * (1 + pct):
        add("memory", p, True, detail, b, n)
    elif b > n * (1 + pct):
        add("memory", p, False, detail, b, n)


def _error(p: Pair, add) -> None:
    b, n = p.base.error or {}, p.new.error or {}
    if p.new.failed and not p.base.failed:
        add("error", p, True, f"fails now: {p.new.failed}")
    elif n.get("ok") is False and b.get("ok") is not False:
        add("error", p, True, f"over tolerance now (max abs error {n.get('max_abs')})")
    elif _number(b.get("max_abs")) and _number(n.get("max_abs")) and n["max_abs"] > ERROR_GROWTH * b["max_abs"]:
        worse = b["max_abs"] > 0 or None  # from exactly 0: shown, not counted (any rounding is infinitely more)
        add("error", p, worse, f"max abs error {b['max_abs']:.2e} → {n['max_abs']:.2e}", b["max_abs"], n["max_abs"])
    elif (p.base.failed and not p.new.failed) or (b.get("ok") is False and n.get("ok") is True):
        add("error", p, False, "passes now")
    if p.new.skipped and not p.base.skipped:
        add("error", p, None, f"skipped now: {p.new.skipped}")


# ---- markdown and plots


def _change(b, n, fmt) -> str:
    if b is None and n is None:
        return "-"
    if b is None or n is None or b == n:
        return f"{fmt(b) if b is not None else '-'} → {fmt(n) if n is not None else '-'}"
    return f"{fmt(b)} → {fmt(n)} ({_pct(b, n)})"


def _verdict(findings: list[Finding], pair: Pair) -> str:
    parts = []
    for severity in ("regression", "warning", "improved"):
        kinds = ", ".join(dict.fromkeys(f.kind for f in findings if f.severity == severity))
        if kinds:
            parts.append(f"**{severity}**: {kinds}" if severity == "regression" else f"{severity}: {kinds}")
    if pair.time == "noise":
        parts.append("time: within the noise")
    return "; ".join(parts)


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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage block
        self.exit(2, f"error: {message} (python -m impl compare --help)\n")


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
    parser = _Parser(prog="python -m impl compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="the earlier run's JSON (written by python -m impl bench)")
    parser.add_argument("new", help="the later run's JSON")
    parser.add_argument("-o", "--out", default=None, help="folder for compare.md and its plots (default: NEW's)")
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
