"""A/B comparison of two benchmark runs, and a regression guard: `python -m impl compare BASE.json NEW.json`
(the judging is here; the markdown, the plots and the command are in impl.report.drift).

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

import json
import math
from dataclasses import dataclass, field

from impl.report.format import _fmt_bytes, _fmt_time
from impl.report.load import ReportError, Row, Run
from impl.report.render import _key, _varying

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
