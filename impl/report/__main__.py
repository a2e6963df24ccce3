"""python -m impl.report BENCH.json [BENCH2.json ...] -o reports/"""

import sys

from impl.common import cli
from impl.report import ReportError, load_run, render


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(
        "impl.report",
        "Render pytest-benchmark JSON files (one per run: CPU, GPU...) into a markdown report "
        "with a table per benchmark group and a plot per sweep.",
    )
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON files (--benchmark-json output)")
    parser.add_argument("-o", "--out", type=cli.writable_dir, default="reports", help="output folder (default reports)")
    parser.add_argument("--title", default="Benchmark report", help="the report's title")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(p) for p in args.json]
        path = render(runs, args.out, title=args.title)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
