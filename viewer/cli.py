"""Subcommands that draw: ``plot``, ``report``, ``stats``. Thin wrappers over :mod:`attnformat.viewer`.

The main parser (:mod:`attnformat.cli`) lists these commands by name and imports this module,
and with it matplotlib, only when one of them runs. Each subcommand imports what it draws with
when it runs: ``plot FILE heatmap`` never imports the report, the statistics or (for a file the
direct road reads, see :mod:`attnformat.viewer.selection`) xarray and zarr.
"""

from __future__ import annotations

import argparse
import json
import os

from attnformat.cli import add_storage_option, storage_keywords
from attnformat.errors import AttnFormatError
from attnformat.viewer.catalog import PLOT_KINDS, plot
from attnformat.viewer.output import FORMATS, save_figure

#: How selectors are read, shown by ``attnformat plot --help``.
_SELECTOR_HELP = (
    "Selectors take a label or an index (layer/head/step/time/node: the coordinate value, e.g. "
    "--layer 3 is the layer labelled 3; query/node also take labels such as --query '[CLS]'); "
    "--head/--layer/--sample also take 'mean' or 'max' to reduce. Unset, --head is the mean over heads "
    "and the others their first element."
)


def selector_argument(text: str):
    """A selector given on the command line: integers stay integers (coordinate values or positions); anything else is a label.

    Parameters
    ----------
    text : str
        The option's value (``--layer 3``, ``--query '[CLS]'``); the ``type`` of selector options.

    Returns
    -------
    int or str

    Examples
    --------
    >>> selector_argument("3"), selector_argument("[CLS]"), selector_argument("-1")
    (3, '[CLS]', -1)
    """
    try:
        return int(text)
    except ValueError:
        return text


def _kinds_help() -> str:
    width = max(len(name) for name in PLOT_KINDS)
    return "plot kinds:\n" + "\n".join(f"  {name:{width}}  {kind.help}" for name, kind in PLOT_KINDS.items())


def add_parser(subparsers, name: str, help: str):  # noqa: A002 - argparse's own keyword
    """Add the full parser of ``plot``, ``report`` or ``stats`` to the ``attnformat`` parser.

    Parameters
    ----------
    subparsers
        The main parser's subparsers.
    name
        The subcommand.
    help
        Its one-line help (from :data:`attnformat.cli.COMMANDS`).

    Examples
    --------
    >>> from attnformat.cli import build_parser
    >>> build_parser("plot").parse_args(["plot", "run.zarr", "heatmap", "--layer", "3", "-o", "x.png"]).layer
    3
    """
    return _ADDERS[name](subparsers, help)


def _add_plot(subparsers, help: str):  # noqa: A002
    parser = subparsers.add_parser(
        "plot", help=help,
        description="Draw one plot of an attention file. " + _SELECTOR_HELP,
        epilog=_kinds_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="attention file (.zarr, .zarr.zip, .h5, .nc)")
    parser.add_argument("kind", help="plot kind (listed below)")
    parser.add_argument("-o", "--output", required=True, help="output file: .png, .svg (text kept as text) or .pdf")
    selectors = parser.add_argument_group("selectors")
    selectors.add_argument("--site", help="site path, e.g. encoder/self (needed when the file has several)")
    for name in ("layer", "head", "sample", "step", "time", "node"):
        selectors.add_argument(f"--{name}", type=selector_argument, help=f"{name} label or index" +
                               (", or mean/max" if name in ("layer", "head", "sample") else ""))
    selectors.add_argument("--query", type=selector_argument, action="append",
                           help="query label or index (repeat for several: query-profiles, group-bars, row-profile)")
    selectors.add_argument("--query-group", type=selector_argument, action="append", dest="query_groups",
                           help="query group(s) of the block in group-bars (default: the last group)")
    options = parser.add_argument_group("options")
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
    options.add_argument("--last", type=int, help="group-bars: the query block is the last N query groups")
    options.add_argument("--per-panel", action="store_true", default=None,
                         help="image-grid: one colour scale and colorbar per panel (default: one shared scale)")
    options.add_argument("--scale", choices=("auto", "symmetric", "one-sided"),
                         help="signed data: symmetric about 0, one-sided over the data, or auto (symmetric only "
                              "when the data have both signs)")
    options.add_argument("--statistic", choices=("entropy", "max_weight", "sink_weight", "local_weight", "top_key_offset"),
                         help="statistics-overview/-profile: the stored statistic to draw")
    options.add_argument("--offset", action="store_true", default=None,
                         help="top-key: draw query position minus top-key position")
    options.add_argument("--annotate", action=argparse.BooleanOptionalAction, default=None,
                         help="statistics-overview: write each cell's value (default: when the cells are large enough)")
    options.add_argument("--title", help="figure title (default: site, selection and variable)")
    options.add_argument("--figsize", type=float, nargs=2, metavar=("WIDTH", "HEIGHT"),
                         help="figure size in inches (default: sized to the panels and labels)")
    options.add_argument("--dpi", type=int, help="PNG resolution (default: matplotlib's savefig.dpi)")
    add_storage_option(parser)
    parser.set_defaults(run=run_plot)
    return parser


def _add_report(subparsers, help: str):  # noqa: A002
    parser = subparsers.add_parser("report", help=help, description=help[:1].upper() + help[1:] + ".")
    parser.add_argument("path", help="attention file or URL (.zarr, .zarr.zip, .h5, .nc)")
    parser.add_argument("-o", "--output", required=True, help="output directory")
    parser.add_argument("-q", "--no-progress", action="store_true", help="no progress bar (none is shown when stderr is not a terminal)")
    parser.add_argument("--workers", type=int, help="processes drawing plots, this one included (default: every CPU)")
    add_scheduler_option(parser)
    add_storage_option(parser)
    parser.set_defaults(run=run_report)
    return parser


def _add_stats(subparsers, help: str):  # noqa: A002
    parser = subparsers.add_parser("stats", help=help, description=help[:1].upper() + help[1:] + ".")
    parser.add_argument("path", help="attention file or URL (.zarr, .zarr.zip, .h5, .nc); with --concat also a "
                                     "directory or a glob pattern of files")
    parser.add_argument("more_paths", nargs="*", metavar="PATH", help="more files, joined with --concat")
    parser.add_argument("--concat", metavar="DIM",
                        help="treat the files as one collection joined along DIM: sample, step, or a new dimension "
                             "such as run (one summary per file)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("-o", "--output", help="also write the JSON to this file")
    parser.add_argument("--variable", default="weights")
    parser.add_argument("--threshold", type=float, default=8.0,
                        help="local/global: a pairwise distance below this is local (in the distance's units; default 8)")
    parser.add_argument("--query", type=selector_argument, action="append", dest="queries",
                        help="only these query rows (label or index; repeat for several), e.g. --query '[CLS]'")
    parser.add_argument("-q", "--no-progress", action="store_true",
                        help="no progress bar (none is shown when stderr is not a terminal)")
    add_scheduler_option(parser)
    add_storage_option(parser)
    parser.set_defaults(run=run_stats)
    return parser


_ADDERS = {"plot": _add_plot, "report": _add_report, "stats": _add_stats}


def add_scheduler_option(parser) -> None:
    """Give a subcommand that computes over a whole file ``--scheduler``.

    Parameters
    ----------
    parser
        The subcommand's parser; ``args.scheduler`` is None (threads) unless given.

    Examples
    --------
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_scheduler_option(parser)
    >>> parser.parse_args(["--scheduler", "tcp://10.0.0.5:8786"]).scheduler
    'tcp://10.0.0.5:8786'
    """
    parser.add_argument("--scheduler", metavar="ADDRESS|threads|processes|synchronous",
                        help="where the whole-file computation runs (a dask graph over the stored chunks): threads "
                             "(default, every core), processes, synchronous, or a dask.distributed scheduler address "
                             "such as tcp://HOST:8786 (gives up after 5 s if it does not answer)")


def plot_format(output: str) -> str:
    """The format ``-o OUTPUT`` asks for, checked before anything is computed or drawn.

    Parameters
    ----------
    output : str
        The ``-o`` value.

    Returns
    -------
    str
        ``"png"``, ``"svg"`` or ``"pdf"``.

    Raises
    ------
    attnformat.AttnFormatError
        For any other suffix (or none), naming ``output`` as given.

    Examples
    --------
    >>> plot_format("map.SVG")
    'svg'
    """
    suffix = os.path.splitext(output)[1].lower().lstrip(".")
    if suffix not in FORMATS:
        raise AttnFormatError(f"{output}: cannot save a plot as {suffix or 'a file without suffix'!r}; use .png, .svg or .pdf")
    return suffix


def scheduler_keywords(args) -> dict:
    """``scheduler=`` for the library call, checked before any file is opened (a bad name is one line, exit 2).

    Examples
    --------
    >>> import argparse
    >>> scheduler_keywords(argparse.Namespace(scheduler="sync"))
    {'scheduler': 'sync'}
    """
    from attnformat.compute import scheduler_name

    scheduler = getattr(args, "scheduler", None)
    if scheduler is None:
        return {}
    scheduler_name(scheduler)  # raises AttnFormatError for a name that is neither a scheduler nor an address
    return {"scheduler": scheduler}


_PLOT_OPTIONS = ("site", "layer", "head", "sample", "step", "time", "node", "variable", "cmap", "vmin", "vmax", "log",
                 "center", "origin", "by_group", "aggregate", "pool", "max_size", "k", "threshold", "bins", "pairwise",
                 "over", "query_groups", "last", "per_panel", "scale", "title", "figsize", "statistic", "offset",
                 "annotate")


def run_plot(args) -> int:
    """``attnformat plot PATH KIND [selectors] -o OUT``."""
    plot_format(args.output)
    if args.kind not in PLOT_KINDS:
        raise AttnFormatError(f"no plot kind {args.kind!r}; kinds: {', '.join(PLOT_KINDS)}")
    options = {name: getattr(args, name) for name in _PLOT_OPTIONS}
    if options["figsize"] is not None:
        options["figsize"] = tuple(options["figsize"])
    if args.query:
        takes = PLOT_KINDS[args.kind].parameters
        if "queries" in takes:
            options["queries"] = args.query
        elif len(args.query) == 1:
            options["query"] = args.query[0]
        else:
            raise AttnFormatError(f"plot kind {args.kind!r} takes one --query, not {len(args.query)}")
    if PLOT_KINDS[args.kind].reads_path:
        from attnformat.engines import Location

        source = Location.of(args.path, storage_keywords(args).get("storage_options"))
    else:
        from attnformat.viewer.selection import open_source

        source = open_source(args.path, **storage_keywords(args))
    drawn = plot(source, args.kind, **options)
    save_figure(drawn, args.output, dpi=args.dpi)
    print(f"wrote {args.output}")
    return 0


def run_report(args) -> int:
    """``attnformat report PATH -o DIR``."""
    from attnformat.viewer.report import report

    import inspect

    extra = scheduler_keywords(args)
    if extra and "scheduler" not in inspect.signature(report).parameters:
        raise AttnFormatError("report: --scheduler is not supported by this version of the report")
    index = report(args.path, args.output, progress=False if args.no_progress else None, workers=args.workers,
                   **extra, **storage_keywords(args))
    print(f"wrote {index}")
    return 0


def run_stats(args) -> int:
    """``attnformat stats PATH [--json] [-o FILE]``."""
    from attnformat.viewer.statistics import format_summary, statistics_summary

    options = dict(variable=args.variable, threshold=args.threshold, queries=args.queries,
                   progress=False if args.no_progress else None, **scheduler_keywords(args))
    if args.more_paths and not args.concat:
        raise AttnFormatError("stats: several paths need --concat DIM (sample, step or a new dimension such as run)")
    if args.concat:
        from attnformat.collection import collection_statistics, open_many

        tree = open_many([args.path, *args.more_paths] if args.more_paths else args.path, dim=args.concat,
                         **storage_keywords(args))
        summary = collection_statistics(tree, **options)
        tables = [format_summary(part) for part in summary["summaries"].values()] if "summaries" in summary else [
            format_summary(summary)]
    else:
        summary = statistics_summary(args.path, **options, **storage_keywords(args))
        tables = [format_summary(summary)]
    text = json.dumps(summary, indent=2, allow_nan=False)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    print(text if args.json else "\n\n".join(tables))
    return 0
