"""The ``diff`` subcommand: compare two attention files (or two steps of one) per layer and head.

``attnformat diff A B`` prints the heads that changed most (mean Jensen-Shannon divergence in
bits, max ``|B - A|``, mean L1 per row); ``--json`` prints the full per-head result; ``-o out.png``
also draws the difference map of the most changed head, the layer x head grid and the ranking.
``attnformat diff A --step-a I --step-b J`` compares two steps of one file. Exit codes are the
command line's (README): 0 compared, 2 unreadable input, inputs that are not comparable, or bad
usage, 3 an optional package missing.
"""

from __future__ import annotations

import json
import math

from attnformat.cli import add_storage_option, storage_keywords
from attnformat.errors import AttnFormatError
from attnformat.viewer.cli import add_scheduler_option, plot_format, scheduler_keywords, selector_argument


def add_parser(subparsers, name: str, help: str):  # noqa: A002 - argparse's own keyword
    """Add the full parser of ``diff`` to the ``attnformat`` parser.

    Parameters
    ----------
    subparsers
        The main parser's subparsers.
    name
        The subcommand (``"diff"``).
    help
        Its one-line help (from :data:`attnformat.cli.COMMANDS`).

    Examples
    --------
    >>> from attnformat.cli import build_parser
    >>> args = build_parser("diff").parse_args(["diff", "a.zarr", "b.zarr", "--top", "5", "--json"])
    >>> args.path, args.other, args.top, args.json
    ('a.zarr', 'b.zarr', 5, True)
    """
    if name != "diff":
        raise AttnFormatError(f"attnformat.viewer.compare_cli provides 'diff', not {name!r}")
    parser = subparsers.add_parser(
        name, help=help,
        description=help[:1].upper() + help[1:] + ". JSD is the Jensen-Shannon divergence in bits (0: same rows, "
        "1: no key in common); padding, absent (NaN) and empty rows are left out, never counted as 0.")
    parser.add_argument("path", help="file A (.zarr, .zarr.zip, .h5, .nc, or a URL)")
    parser.add_argument("other", nargs="?", help="file B (omit with --step-a/--step-b to compare two steps of A)")
    parser.add_argument("--site", help="compare this site only (default: every dense site; both must hold the same)")
    parser.add_argument("--variable", default="weights", help="weights (default: differences and JSD), logits or bias")
    parser.add_argument("--step-a", type=selector_argument, help="step of A (its label, e.g. the training step, else a position)")
    parser.add_argument("--step-b", type=selector_argument, help="step of B (of A when B is omitted)")
    parser.add_argument("--top", type=int, default=10, help="heads listed (default 10)")
    parser.add_argument("--json", action="store_true", help="print the full per-head result as JSON")
    parser.add_argument("-o", "--output", help="also draw the most changed head, the layer x head grid and the ranking (.png, .svg, .pdf)")
    parser.add_argument("--layer", type=selector_argument, help="with -o: the layer of the difference map (default: most changed)")
    parser.add_argument("--head", type=selector_argument, help="with -o: the head of the difference map (default: most changed)")
    parser.add_argument("--allow-label-mismatch", action="store_true",
                        help="compare even when token labels differ (default: refuse, naming the first difference)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (none is shown when stderr is not a terminal)")
    add_scheduler_option(parser)
    add_storage_option(parser)
    parser.set_defaults(run=run_diff)
    return parser


def run_diff(args) -> int:
    """``attnformat diff A [B] [options]``: print the most changed heads (or JSON); draw with ``-o``."""
    from attnformat.compare import compare

    if args.other is None and args.step_a is None and args.step_b is None:
        raise AttnFormatError(f"{args.path}: diff needs a second file B, or --step-a and --step-b to compare two steps of one file")
    if args.top < 0:
        raise AttnFormatError(f"--top must be 0 or more, not {args.top}")
    if args.output:
        plot_format(args.output)
    storage = storage_keywords(args)
    result = compare(args.path, args.other, site=args.site, variable=args.variable, step_a=args.step_a,
                     step_b=args.step_b, allow_label_mismatch=args.allow_label_mismatch, rows=False,
                     progress=False if args.no_progress else None, **scheduler_keywords(args), **storage)
    if args.json:
        print(json.dumps(result.to_dict(top=args.top), indent=2, allow_nan=False))
    else:
        print(format_table(result, top=args.top))
    if args.output:
        from attnformat.viewer.compare import diff_summary
        from attnformat.viewer.output import save_figure

        figure = diff_summary(args.path, args.other, site=args.site, variable=args.variable, step_a=args.step_a,
                              step_b=args.step_b, layer=args.layer, head=args.head, top=args.top,
                              allow_label_mismatch=args.allow_label_mismatch, **storage)
        save_figure(figure, args.output)
        print(f"wrote {args.output}")
    return 0


_COLUMNS = (("mean_jsd", "mean JSD"), ("max_jsd", "max JSD"), ("max_abs_diff", "max |B-A|"),
            ("mean_abs_diff", "mean |B-A|"), ("mean_l1", "mean L1/row"), ("rows", "rows"))


def format_table(result, top: int | None = 10) -> str:
    """The most changed heads as a text table, with what A, B and the numbers are.

    Parameters
    ----------
    result : attnformat.compare.Comparison
        What :func:`attnformat.compare.compare` returned.
    top : int, optional
        How many heads (all with None).

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.compare import compare
    >>> table = format_table(compare(attnformat.example_path("steps"), step_a=100, step_b=300), top=1)
    >>> table.splitlines()[-1].split()[:4]
    ['1', 'trunk/iga', '0', '0']
    """
    heads = result.top(top)
    columns = [(key, name) for key, name in _COLUMNS if any(key in head for head in heads) or key == "rows"]
    lines = [f"A: {result.a}", f"B: {result.b}",
             f"{result.variable}, B - A; " + ("JSD in bits (0: same rows, 1: no key in common); " if result.variable == "weights" else "")
             + "padding, absent and empty rows left out; ranked by " + result.rank_by]
    lines += [note for note in result.notes]
    header = ["rank", "site", "layer", "head", *(name for _, name in columns)]
    table = [header]
    for rank, head in enumerate(heads, 1):
        table.append([str(rank), head["site"], _text(head.get("layer", "-")), _text(head.get("head", "-")),
                      *(_text(head.get(key)) for key, _ in columns)])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if not heads:
        lines.append("(no head compared)")
    return "\n".join(lines)


def _text(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4f}"
    return str(value)
