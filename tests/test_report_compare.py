"""`python -m impl compare`: two synthetic runs with planted regressions and planted noise, and the guard's exits.

The pair (all times in ms, spreads p20-p80):
- attn / flash seq=128: +12% in time but inside both spreads (noise, not a finding); peak memory +1 byte (counted).
- attn / flash seq=256: the same time in both runs, but its reference sdpa got 23% faster, so flash / sdpa grew
  by 30% outside the spreads (a counted time-ratio regression; sdpa itself is an improvement).
- mlp / plain: +20% inside pytest-benchmark's q1-q3 (no quantiles recorded: noise, not a finding).
- mlp / fused only in the base run (removed), mlp / unfused only in the new one (added).
"""

import json
from pathlib import Path

import pytest

from impl.__main__ import main as impl_main
from impl.report import load_run
from impl.report.compare import compare_runs
from impl.report.drift import append_drift, main, render_comparison

MS = 1e-3
OK_ERROR = {"max_abs": 1e-6, "max_rel": 1e-6, "ok": True}


def bench(group: str, variant: str, params: dict, median_ms: float, spread_ms=None, *, peak=None, error=None,
          reference=False, iqr_ms=None) -> dict:
    """One pytest-benchmark entry as the bench fixture writes it (quantiles_s, or only the stats' q1/q3)."""
    extra = {"variant": variant, "params": params, "device": "cpu", "reference": reference, "peak_bytes": peak}
    if spread_ms is not None:
        extra["quantiles_s"] = {"p20": spread_ms[0] * MS, "p50": median_ms * MS, "p80": spread_ms[1] * MS}
    if error is not None:
        extra["error"] = error
    stats = {"median": median_ms * MS, "mean": median_ms * MS, "rounds": 10}
    if iqr_ms is not None:
        stats.update(q1=iqr_ms[0] * MS, q3=iqr_ms[1] * MS)
    name = f"test_{group}[{variant}-{'-'.join(map(str, params.values()))}]"
    return {"group": group, "name": name, "fullname": f"benches/bench_x.py::{name}", "params": None,
            "extra_info": extra, "stats": stats}


def write_run(path: Path, benchmarks: list[dict], device_name: str = "Test CPU") -> Path:
    data = {"machine_info": {"node": "n", "cpu": {"brand_raw": device_name, "count": 2},
                             "impl": {"device": "cpu", "device_name": device_name, "cpu_name": device_name,
                                      "size": "smoke"}},
            "commit_info": {"id": "0123456789abcdef"}, "datetime": "2026-01-01T00:00:00", "benchmarks": benchmarks}
    path.write_text(json.dumps(data))
    return path


def base_rows() -> list[dict]:
    return [
        bench("attn", "sdpa", {"seq": 128}, 1.0, (0.98, 1.02), peak=4000, reference=True),
        bench("attn", "sdpa", {"seq": 256}, 4.0, (3.96, 4.04), peak=16000, reference=True),
        bench("attn", "flash", {"seq": 128}, 0.5, (0.45, 0.60), peak=1000, error=OK_ERROR),
        bench("attn", "flash", {"seq": 256}, 2.0, (1.98, 2.02), peak=2000, error=OK_ERROR),
        bench("mlp", "plain", {"d": 64}, 1.0, iqr_ms=(0.8, 1.3), peak=512),
        bench("mlp", "fused", {"d": 64}, 0.7, (0.69, 0.71), peak=256),
    ]


def new_rows() -> list[dict]:
    return [
        bench("attn", "sdpa", {"seq": 128}, 1.0, (0.98, 1.02), peak=4000, reference=True),
        bench("attn", "sdpa", {"seq": 256}, 3.08, (3.05, 3.11), peak=16000, reference=True),
        bench("attn", "flash", {"seq": 128}, 0.56, (0.45, 0.65), peak=1001, error=OK_ERROR),  # noise; +1 B
        bench("attn", "flash", {"seq": 256}, 2.0, (1.98, 2.02), peak=2000, error=OK_ERROR),  # flash/sdpa +30%
        bench("mlp", "plain", {"d": 64}, 1.2, iqr_ms=(0.9, 1.4), peak=512),  # noise by the IQR
        bench("mlp", "unfused", {"d": 64}, 0.9, (0.89, 0.91), peak=512),
    ]


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path]:
    return write_run(tmp_path / "base.json", base_rows()), write_run(tmp_path / "new.json", new_rows())


def found(comparison, severity: str) -> set[tuple[str, str, str]]:
    return {(f.kind, f.group, f.row) for f in comparison.findings if f.severity == severity}


def test_exactly_the_planted_regressions_are_counted(pair):
    c = compare_runs(load_run(pair[0]), load_run(pair[1]))
    assert found(c, "regression") == {("memory", "attn", "flash seq=128"), ("time-ratio", "attn", "flash seq=256")}
    assert found(c, "improved") == {("time", "attn", "sdpa seq=256")}
    assert found(c, "warning") == {("removed", "mlp", "fused d=64")}
    assert found(c, "info") == {("added", "mlp", "unfused d=64")}
    noise = {(p.group, p.label) for p in c.pairs if p.time == "noise"}
    assert noise == {("attn", "flash seq=128"), ("mlp", "plain d=64")}  # past 10%, inside the spreads
    ratio = next(f for f in c.regressions if f.kind == "time-ratio")
    assert ratio.new / ratio.base == pytest.approx(1.3, rel=0.01)


def test_a_run_against_itself_finds_nothing_and_thresholds_apply_per_group(pair):
    same = compare_runs(load_run(pair[0]), load_run(pair[0]))
    assert same.findings == [] and not same.only_base and not same.only_new
    # A 50% threshold for attn: the +30% ratio no longer counts; the byte of memory still does.
    c = compare_runs(load_run(pair[0]), load_run(pair[1]), {"attn": 50})
    assert found(c, "regression") == {("memory", "attn", "flash seq=128")}


@pytest.mark.parametrize(
    ("new_error", "counted"),
    [({"max_abs": 1e-3, "max_rel": 1e-3, "ok": False}, True), ({"max_abs": 2e-5, "max_rel": 2e-5, "ok": True}, True),
     ({"max_abs": 5e-6, "max_rel": 5e-6, "ok": True}, False)],
    ids=["over-tolerance", "grew-20x", "grew-5x"],
)
def test_an_error_that_fails_or_grows_tenfold_counts(tmp_path, new_error, counted):
    row = dict(group="attn", variant="flash", params={"seq": 128}, median_ms=0.5, spread_ms=(0.49, 0.51))
    base = write_run(tmp_path / "base.json", [bench(**row, error=OK_ERROR)])
    new = write_run(tmp_path / "new.json", [bench(**row, error=new_error)])
    c = compare_runs(load_run(base), load_run(new))
    assert found(c, "regression") == ({("error", "attn", "flash seq=128")} if counted else set())


def test_the_exit_code_follows_fail_on_regression_and_the_report_lists_everything(pair, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(pair[0]), str(pair[1]), "-o", str(out)]) == 0
    assert main([str(pair[0]), str(pair[1]), "-o", str(out), "--fail-on-regression"]) == 1
    assert "2 counted regressions" in capsys.readouterr().out
    text = (out / "compare.md").read_text()
    assert "## Counted regressions" in text and "## Only in base" in text and "## Only in new" in text
    assert "flash seq=128" in text and "+1 B" in text and "time: within the noise" in text
    assert (out / "attn--compare.png").stat().st_size > 1000  # four timed rows: a bar plot
    # Through python -m impl, with the kinds a CI on another machine only warns about.
    assert impl_main(["compare", str(pair[0]), str(pair[1]), "-o", str(out), "--fail-on-regression",
                      "--warn-only", "time-ratio"]) == 1  # the byte still counts
    assert main([str(pair[0]), str(pair[1]), "-o", str(out), "--fail-on-regression",
                 "--warn-only", "time-ratio,memory"]) == 0


def test_runs_of_different_devices_are_refused_unless_allowed(pair, tmp_path, capsys):
    other = write_run(tmp_path / "other.json", new_rows(), device_name="Other CPU")
    assert main([str(pair[0]), str(other), "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "--allow-device-mismatch" in err
    assert main([str(pair[0]), str(other), "-o", str(tmp_path), "--allow-device-mismatch",
                 "--fail-on-regression"]) == 1
    c = compare_runs(load_run(pair[0]), load_run(other), allow_device_mismatch=True)
    assert not c.same_machine and "different machines" in render_comparison(c)


def test_a_slower_time_counts_on_the_same_machine_and_only_warns_across_machines(pair, tmp_path):
    slow = [dict(b) for b in base_rows()]
    slow[0] = bench("attn", "sdpa", {"seq": 128}, 1.5, (1.48, 1.52), peak=4000, reference=True)
    slower = write_run(tmp_path / "slow.json", slow)
    assert ("time", "attn", "sdpa seq=128") in found(compare_runs(load_run(pair[0]), load_run(slower)), "regression")
    elsewhere = write_run(tmp_path / "elsewhere.json", slow, device_name="Other CPU")
    c = compare_runs(load_run(pair[0]), load_run(elsewhere), allow_device_mismatch=True)
    assert ("time", "attn", "sdpa seq=128") in found(c, "warning")


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no such file"), ("{not json", "not valid JSON"),
     (json.dumps({"machine_info": {}, "benchmarks": []}), "not written by `python -m impl bench`")],
    ids=["missing", "invalid-json", "foreign"],
)
def test_unreadable_or_foreign_files_are_one_line_errors(pair, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    assert main([str(pair[0]), str(bad), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and str(bad) in err
    assert not (tmp_path / "out").exists()


def test_a_bad_threshold_is_a_one_line_error(pair, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(pair[0]), str(pair[1]), "--threshold", "attn=lots"])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_bench_compare_appends_a_drift_section_to_the_report(pair, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmark report\n")
    append_drift(readme, pair[0], pair[1])
    text = readme.read_text()
    assert "## Drift against base.json" in text and "2 counted regressions" in text and "(compare.md)" in text
    assert (tmp_path / "compare.md").is_file()


def test_bench_refuses_a_bad_base_before_running_anything(tmp_path, capsys):
    from impl.bench import main as bench_main

    (tmp_path / "benches").mkdir()
    code = bench_main(["--compare", str(tmp_path / "missing.json"), "--benches", str(tmp_path / "benches"),
                       "--out", str(tmp_path / "out")])
    assert code == 2 and "--compare" in capsys.readouterr().err and not (tmp_path / "out").exists()
