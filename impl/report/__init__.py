"""Benchmark JSON -> markdown report and plots: `python -m impl.report BENCH.json [...] -o reports/`."""

from impl.report.compare import Comparison, Finding, compare_runs
from impl.report.drift import render_comparison
from impl.report.load import ReportError, Row, Run, load_run
from impl.report.render import group_table, plot_sweep, render

__all__ = ["Comparison", "Finding", "ReportError", "Row", "Run", "compare_runs", "group_table", "load_run",
           "plot_sweep", "render", "render_comparison"]
