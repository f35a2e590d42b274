"""``rtda-compare PATH…``: finished runs gathered into one table (and plot) of target mIoU and per-class IoU,
mean ± std over seeds (see :mod:`rtda.analysis.compare`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from rtda.analysis.compare import compare
from rtda.run.errors import RtdaError, run_cli


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every rtda command
        raise RtdaError(f"{message} (usage: rtda-compare PATH... [--out DIR] [--ignore KEY ...])")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = _Parser(prog="rtda-compare", description=__doc__.splitlines()[0].split(": ", 1)[-1])
    parser.add_argument("paths", nargs="+", metavar="PATH", help="run folders, sweep folders or results.json files")
    parser.add_argument("--out", default=None, help="folder for comparison.{csv,md} and the plot "
                        "(default: the folder given when there is one, else ./comparison)")
    parser.add_argument("--ignore", nargs="*", default=[], metavar="KEY",
                        help="override keys (or prefixes ending in '.') not to group on, besides the seed")
    parser.add_argument("--no-plot", action="store_true", help="skip the per-class bar chart")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    def task():
        args = parse_args(argv)
        result = compare(args.paths, out=args.out, ignore=args.ignore, plot=not args.no_plot)
        if not result["rows"]:
            raise SystemExit(1)

    run_cli(task)


if __name__ == "__main__":
    main()
