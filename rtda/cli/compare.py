"""``rtda-compare PATH…``: finished runs gathered into one table (and plot) of target mIoU and per-class IoU,
mean ± std over seeds (see :mod:`rtda.analysis.compare`); with ``--bench``, the accuracy–speed front
(:mod:`rtda.analysis.front`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from rtda.analysis.compare import compare
from rtda.analysis.front import DEFAULT_SIZE, DEFAULT_VARIANT, parse_size, size_text
from rtda.run.errors import RtdaError, run_cli


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every rtda command
        raise RtdaError(f"{message} (usage: rtda-compare PATH... [--out DIR] [--ignore KEY ...] "
                        "[--bench PATH ... [--variant NAME] [--size HxW]])")


def _size(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except RtdaError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {str(err).split(': ', 1)[-1]}") from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = _Parser(prog="rtda-compare", description=__doc__.splitlines()[0].split(": ", 1)[-1])
    parser.add_argument("paths", nargs="+", metavar="PATH", help="run folders, sweep folders or results.json files")
    parser.add_argument("--out", default=None, help="folder for comparison.{csv,md} and the plot "
                        "(default: the folder given when there is one, else ./comparison)")
    parser.add_argument("--ignore", nargs="*", default=[], metavar="KEY",
                        help="override keys (or prefixes ending in '.') not to group on, besides the seed")
    parser.add_argument("--bench", nargs="+", default=None, metavar="PATH",
                        help="rtda-bench output folders (or bench.json files): also write front.csv and front.png, "
                        "each group's mIoU at its network's FPS, the Pareto front drawn")
    parser.add_argument("--variant", default=None, help=f"the rtda-bench row to take the FPS from (default {DEFAULT_VARIANT}: "
                        "rtda's inference path)")
    parser.add_argument("--size", type=_size, default=None, metavar="HxW",
                        help=f"the input size of the rtda-bench rows (default {size_text(DEFAULT_SIZE)})")
    parser.add_argument("--no-plot", action="store_true", help="skip the plots (per-class bar chart, front.png)")
    args = parser.parse_args(argv)
    if not args.bench and (args.variant is not None or args.size is not None):
        parser.error("--variant and --size choose the rtda-bench rows of --bench PATH...: give --bench")
    args.variant = args.variant or DEFAULT_VARIANT
    args.size = args.size or DEFAULT_SIZE
    return args


def main(argv: Sequence[str] | None = None) -> None:
    def task():
        args = parse_args(argv)
        result = compare(args.paths, out=args.out, ignore=args.ignore, plot=not args.no_plot, bench=args.bench,
                         variant=args.variant, size=args.size)
        if not result["rows"]:
            raise SystemExit(1)

    run_cli(task)


if __name__ == "__main__":
    main()
