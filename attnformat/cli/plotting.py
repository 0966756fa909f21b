"""Subcommands that draw: ``plot``, ``report``, ``stats``. Thin wrappers over :mod:`attnformat.viewer`."""

from __future__ import annotations

import argparse
import json
import os

from attnformat.errors import AttnFormatError

#: Command-line option -> the keyword the plot functions take.
_SELECTOR_HELP = (
    "Selectors take a label or an index (layer/head/step/time/node: the coordinate value, e.g. "
    "--layer 3 is the layer labelled 3; query/node also take labels such as --query '[CLS]'); "
    "--head/--layer/--sample also take 'mean' or 'max' to reduce. Unset, --head is the mean over heads "
    "and the others their first element."
)


def _selector(text: str):
    """Integers stay integers (coordinate values or positions); anything else is a label."""
    try:
        return int(text)
    except ValueError:
        return text


def _kinds_help() -> str:
    from attnformat.viewer.catalog import PLOT_KINDS

    width = max(len(name) for name in PLOT_KINDS)
    return "plot kinds:\n" + "\n".join(f"  {name:{width}}  {kind.help}" for name, kind in PLOT_KINDS.items())


def register(subparsers) -> None:
    """Add ``plot``, ``report`` and ``stats`` to the ``attnformat`` parser."""
    plot = subparsers.add_parser(
        "plot", help="draw one plot of a file to PNG, SVG or PDF",
        description="Draw one plot of an attention file. " + _SELECTOR_HELP,
        epilog=_kinds_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    plot.add_argument("path", help="attention file (.zarr, .zarr.zip, .h5, .nc)")
    plot.add_argument("kind", help="plot kind (listed below)")
    plot.add_argument("-o", "--output", required=True, help="output file: .png, .svg (text kept as text) or .pdf")
    selectors = plot.add_argument_group("selectors")
    selectors.add_argument("--site", help="site path, e.g. encoder/self (needed when the file has several)")
    for name in ("layer", "head", "sample", "step", "time", "node"):
        selectors.add_argument(f"--{name}", type=_selector, help=f"{name} label or index" +
                               (", or mean/max" if name in ("layer", "head", "sample") else ""))
    selectors.add_argument("--query", type=_selector, action="append",
                           help="query label or index (repeat for several: query-profiles, group-bars)")
    selectors.add_argument("--query-group", type=_selector, action="append", dest="query_groups",
                           help="query group(s) of the block in group-bars (default: the last group)")
    options = plot.add_argument_group("options")
    options.add_argument("--variable", help="weights (default), logits, bias, ...")
    options.add_argument("--cmap", help="matplotlib colormap name")
    options.add_argument("--vmin", type=float)
    options.add_argument("--vmax", type=float)
    options.add_argument("--log", action="store_true", default=None, help="logarithmic colour scale")
    options.add_argument("--center", type=float, help="centre of a diverging scale")
    options.add_argument("--origin", choices=("upper", "lower"), help="first query at the top (upper) or bottom")
    options.add_argument("--by-group", action="store_true", default=None, help="aggregate tokens to groups (head-grid)")
    options.add_argument("--aggregate", choices=("mean", "sum", "max"), help="how tokens are aggregated to groups")
    options.add_argument("--pool", choices=("mean", "max"), help="block pooling of maps larger than --max-size")
    options.add_argument("--max-size", type=int, help="largest map drawn without pooling (default 1024)")
    options.add_argument("--k", type=int, help="how many edges or pairs (top-edges, top-pairs)")
    options.add_argument("--threshold", type=float, help="local/global distance threshold (default 8)")
    options.add_argument("--bins", type=int, help="distance bins")
    options.add_argument("--pairwise", help="pairwise variable to compare with (default: distance)")
    options.add_argument("--over", choices=("head", "layer"), help="image-grid: one panel per head or per layer")
    options.add_argument("--dpi", type=int, default=150, help="PNG resolution")
    plot.set_defaults(run=run_plot)

    report = subparsers.add_parser("report", help="render every plot a file supports, with index.html and a summary")
    report.add_argument("path")
    report.add_argument("-o", "--output", required=True, help="output directory")
    report.add_argument("--no-progress", action="store_true", help="no progress bar")
    report.set_defaults(run=run_report)

    stats = subparsers.add_parser("stats", help="per site and layer: mean, std, min, max, entropy, sink score, shape")
    stats.add_argument("path")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.add_argument("-o", "--output", help="also write the JSON to this file")
    stats.add_argument("--variable", default="weights")
    stats.set_defaults(run=run_stats)


_PLOT_OPTIONS = ("site", "layer", "head", "sample", "step", "time", "node", "variable", "cmap", "vmin", "vmax", "log",
                 "center", "origin", "by_group", "aggregate", "pool", "max_size", "k", "threshold", "bins", "pairwise",
                 "over", "query_groups")


def run_plot(args) -> int:
    """``attnformat plot PATH KIND [selectors] -o OUT``."""
    from attnformat.viewer.catalog import PLOT_KINDS, plot
    from attnformat.viewer.output import FORMATS, save_figure
    from attnformat.viewer.selection import open_source

    suffix = os.path.splitext(args.output)[1].lower().lstrip(".")
    if suffix not in FORMATS:
        raise AttnFormatError(f"{args.output}: cannot save a plot as {suffix or 'a file without suffix'!r}; use .png, .svg or .pdf")
    if args.kind not in PLOT_KINDS:
        raise AttnFormatError(f"no plot kind {args.kind!r}; kinds: {', '.join(PLOT_KINDS)}")
    options = {name: getattr(args, name) for name in _PLOT_OPTIONS}
    if args.query:
        takes = PLOT_KINDS[args.kind].parameters
        if "queries" in takes:
            options["queries"] = args.query
        elif len(args.query) == 1:
            options["query"] = args.query[0]
        else:
            raise AttnFormatError(f"plot kind {args.kind!r} takes one --query, not {len(args.query)}")
    drawn = plot(open_source(args.path), args.kind, **options)
    save_figure(drawn, args.output, dpi=args.dpi)
    print(f"wrote {args.output}")
    return 0


def run_report(args) -> int:
    """``attnformat report PATH -o DIR``."""
    from attnformat.viewer.report import report

    index = report(args.path, args.output, progress=not args.no_progress)
    print(f"wrote {index}")
    return 0


def run_stats(args) -> int:
    """``attnformat stats PATH [--json] [-o FILE]``."""
    from attnformat.viewer.statistics import format_summary, statistics_summary

    summary = statistics_summary(args.path, variable=args.variable)
    text = json.dumps(summary, indent=2, allow_nan=False)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    print(text if args.json else format_summary(summary))
    return 0
