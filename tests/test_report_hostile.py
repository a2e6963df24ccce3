"""The renderer on hostile or foreign benchmark JSON: names are escaped, plot files never collide, invalid numbers
are shown as invalid, malformed fields are one-line errors, and foreign variants line up with their baseline."""

import json
import math
from pathlib import Path

import pytest

from impl.report import ReportError, load_run, render


def bench(group, name, median, *, extra=None, params=None):
    stats = {"median": median, "min": median, "max": median, "mean": median}
    return {"group": group, "name": name, "fullname": f"benches/b.py::{name}", "params": params or {},
            "stats": stats, "extra_info": extra or {}}


def ours(group, variant, median, **extra):
    return bench(group, f"test[{variant}]", median, extra={"variant": variant, "params": {}, **extra})


def write(path: Path, benchmarks, commit_id="0123456789abcdef0123") -> Path:
    data = {"machine_info": {"node": "n", "cpu": {"brand_raw": "test CPU"}}, "commit_info": {"id": commit_id},
            "datetime": "2026-12-02T00:00:00", "benchmarks": benchmarks}
    path.write_text(json.dumps(data))
    return path


def test_names_are_escaped_in_headings_and_tables(tmp_path: Path):
    rows = [ours("a\n# injected", "x|y <script>alert(1)</script>", 1e-3, metrics={"m|n": "v\n| z"})]
    text = render([load_run(write(tmp_path / "bench-x.json", rows))], tmp_path).read_text()
    assert "\n# injected" not in text
    assert "<script>" not in text and "&lt;script&gt;" in text
    lines = text.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("| x"))
    separators = lambda line: line.count("|") - line.count("\\|")
    assert separators(lines[row]) == separators(lines[row - 2]) == 4  # three cells, as in the header row


@pytest.mark.filterwarnings("ignore:Glyph")  # the CJK group names have no glyphs in matplotlib's default font
def test_plot_names_are_unique_per_group(tmp_path: Path):
    rows = [
        bench(group, f"test[{group}-{n}]", t, extra={"variant": "v", "params": {"n": n}, "sweep": "n"})
        for group in ("注意力", "记忆", "attn fwd", "attn-fwd")
        for n, t in ((1, 1e-3), (2, 2e-3))
    ]
    text = render([load_run(write(tmp_path / "bench-x.json", rows))], tmp_path).read_text()
    pngs = [line.split("(")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert len(pngs) == 4 and len(set(pngs)) == 4
    assert all((tmp_path / p).is_file() for p in pngs)


@pytest.mark.parametrize("median, peak", [(math.nan, 10), (-1e9, 10), (math.inf, 10), (1e-3, -5)])
def test_invalid_numbers_are_shown_as_invalid(tmp_path: Path, median, peak):
    rows = [ours("g", "bad", median, peak_bytes=peak, throughput=math.inf, throughput_unit="tokens/s")]
    text = render([load_run(write(tmp_path / "bench-x.json", rows))], tmp_path).read_text()
    line = next(x for x in text.splitlines() if x.startswith("| bad"))
    assert "invalid" in line
    assert not any(s in line for s in ("nan", "inf", "-1e+09"))


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"metrics": [["a", 1]]}, "metrics must be an object"),
        ({"images": ["../../etc/passwd"]}, "images must name files beside the JSON"),
        ({"images": ["/abs/pic.png"]}, "images must name files beside the JSON"),
        ({"images": "pic.png"}, "images must be a list"),
    ],
)
def test_malformed_fields_are_one_line_errors(tmp_path: Path, extra, message):
    path = write(tmp_path / "bench-x.json", [ours("g", "v", 1e-3, **extra)])
    with pytest.raises(ReportError, match=message) as err:
        load_run(path)
    assert "\n" not in str(err.value) and "benchmark #0" in str(err.value)


def test_foreign_variants_get_their_ratio_to_the_baseline(tmp_path: Path):
    """pytest-benchmark JSON not written by our fixture: variants differ by a `provider` parameter."""
    rows = [
        bench("attn", f"test_attn[{p}-{n}]", t, params={"provider": p, "n": n},
              extra={"baseline": True} if p == "naive" else {})
        for p, n, t in (("naive", 64, 4e-3), ("flash", 64, 1e-3), ("naive", 128, 8e-3), ("flash", 128, 2e-3))
    ]
    run = load_run(write(tmp_path / "bench-x.json", rows, commit_id="unversioned"))
    text = render([run], tmp_path).read_text()
    flash = [x for x in text.splitlines() if x.startswith("| test_attn provider=flash")]
    assert len(flash) == 2 and all("4.00x" in x for x in flash)  # naive's time over flash's, per n
    assert "commit unversioned" in text and "unversione," not in text
