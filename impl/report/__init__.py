"""Benchmark JSON -> markdown report and plots: `python -m impl.report BENCH.json [...] -o reports/`."""

from impl.report.load import ReportError, Row, Run, load_run
from impl.report.render import group_table, plot_sweep, render

__all__ = ["ReportError", "Row", "Run", "group_table", "load_run", "plot_sweep", "render"]
