"""`python -m impl.report` and `python -m impl`: the command lines and their errors."""

import json

import pytest

from impl.__main__ import ENTRY_POINTS
from impl.__main__ import main as impl_main
from impl.report.__main__ import main as report_main

MINIMAL = {  # the least a pytest-benchmark file holds, as written by any project
    "machine_info": {"node": "x", "machine": "x86_64", "cpu": {"brand_raw": "Some CPU", "count": 4}},
    "commit_info": {},
    "datetime": "2026-01-01T00:00:00",
    "version": "5.1.0",
    "benchmarks": [
        {
            "group": None,
            "name": "test_one",
            "fullname": "t.py::test_one",
            "params": None,
            "extra_info": {},
            "stats": {"median": 0.001, "mean": 0.001, "rounds": 5},
        },
    ],
}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("", "the file is empty"),
        ("{not json", "not valid JSON"),
        (json.dumps({"hello": 1}), "not pytest-benchmark output"),
        (json.dumps({"machine_info": {}, "benchmarks": [{"name": "x"}]}), "has no 'name' and 'stats'"),
    ],
    ids=["missing", "empty", "invalid-json", "not-benchmark", "no-stats"],
)
def test_bad_input_exits_nonzero_with_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "bench.json"
    if content is not None:
        path.write_text(content)
    assert report_main([str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and str(path) in err
    assert not (tmp_path / "out" / "README.md").exists()


def test_minimal_foreign_json_renders(tmp_path, capsys):
    path = tmp_path / "foreign.json"
    path.write_text(json.dumps(MINIMAL))
    assert report_main([str(path), "-o", str(tmp_path)]) == 0
    text = (tmp_path / "README.md").read_text()
    assert "Some CPU, 4 cores" in text and "test_one" in text and "1 ms" in text
    assert "peak memory" not in text  # a column it lacks is left out


def test_training_run_sections_are_included_with_links_made_relative(tmp_path):
    path = tmp_path / "foreign.json"
    path.write_text(json.dumps(MINIMAL))
    (tmp_path / "gpt-cpu").mkdir()
    (tmp_path / "gpt-cpu" / "report.md").write_text("### a run\n\n![loss curve](loss_curve.png) [web](https://x.org)\n")
    assert report_main([str(path), "-o", str(tmp_path)]) == 0
    text = (tmp_path / "README.md").read_text()
    assert "## Training runs" in text and "![loss curve](gpt-cpu/loss_curve.png)" in text
    assert "[web](https://x.org)" in text


def test_a_partial_bench_run_updates_the_full_json(tmp_path):
    from impl.bench import merge_into

    def bench_json(path, names, median):
        data = json.loads(json.dumps(MINIMAL))
        data["benchmarks"] = [
            dict(MINIMAL["benchmarks"][0], name=n, fullname=n, stats={"median": median}) for n in names
        ]
        path.write_text(json.dumps(data))

    full, fresh = tmp_path / "bench-cpu-small.json", tmp_path / ".fresh.json"
    bench_json(full, ["a", "b"], 1.0)
    bench_json(fresh, ["b"], 2.0)
    fresh_data = json.loads(fresh.read_text())
    fresh_data["datetime"] = "2026-01-02T00:00:00"
    fresh.write_text(json.dumps(fresh_data))
    merge_into(fresh, full, keep_others=True)
    data = json.loads(full.read_text())
    assert {b["name"]: b["stats"]["median"] for b in data["benchmarks"]} == {"a": 1.0, "b": 2.0}
    assert not fresh.exists()
    assert data["datetime"] == MINIMAL["datetime"] and data["partial_runs"] == ["2026-01-02T00:00:00 (commit )"]
    report = tmp_path / "report"
    assert report_main([str(full), "-o", str(report)]) == 0
    assert "some benchmarks re-measured on 2026-01-02T00:00:00" in (report / "README.md").read_text()
    bench_json(fresh, ["c"], 1.0)
    other = json.loads(fresh.read_text())
    other["machine_info"]["node"] = "another-machine"
    fresh.write_text(json.dumps(other))
    merge_into(fresh, full, keep_others=True)  # another machine's partial run replaces, never mixes
    assert [b["name"] for b in json.loads(full.read_text())["benchmarks"]] == ["c"]
    bench_json(fresh, ["a", "b"], 1.0)
    merge_into(fresh, full, keep_others=True)
    bench_json(fresh, ["b"], 3.0)
    merge_into(fresh, full, keep_others=False)  # a full run replaces the file
    assert [b["name"] for b in json.loads(full.read_text())["benchmarks"]] == ["b"]


def test_impl_help_lists_every_entry_point(capsys):
    assert impl_main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (module, _) in ENTRY_POINTS.items():
        assert name in out and module.removesuffix(".__main__") in out


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_every_entry_point_has_help(name, capsys):
    assert impl_main([name, "--help"]) == 0
    assert "usage:" in capsys.readouterr().out


def test_bad_input_to_an_entry_point_is_one_line(tmp_path, capsys):
    assert impl_main(["sample", "--checkpoint", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "argument --checkpoint: must be an existing folder" in err


def test_a_folder_is_not_a_benchmark_file(tmp_path, capsys):
    assert report_main([str(tmp_path), "-o", str(tmp_path / "out")]) == 2
    assert "not a file" in capsys.readouterr().err


def test_unknown_entry_point_is_an_error(capsys):
    assert impl_main(["nonsense"]) == 2
    assert "unknown entry point 'nonsense'" in capsys.readouterr().err


def test_every_test_has_a_timeout(pytestconfig):
    assert float(pytestconfig.getini("timeout")) > 0
