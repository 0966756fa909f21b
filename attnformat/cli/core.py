"""Subcommands on files: ``info``, ``validate``, ``convert``. Thin wrappers over the core library."""

from __future__ import annotations

import json

from attnformat.cli import EXIT_NONCONFORMING, EXIT_OK, EXIT_UNREADABLE, add_storage_option, storage_keywords
from attnformat.reading import open as open_tree
from attnformat.saving import convert
from attnformat.summary import describe, format_description
from attnformat.validation import validate


def add_parser(subparsers, name: str, help: str):  # noqa: A002 - argparse's own keyword
    """Add the full parser of ``info``, ``validate`` or ``convert`` to the ``attnformat`` parser.

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
    >>> build_parser("convert").parse_args(["convert", "a.zarr", "b.h5", "--dry-run"]).dry_run
    True
    """
    parser = subparsers.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".")
    _ARGUMENTS[name](parser)
    return parser


def _info_arguments(parser) -> None:
    parser.add_argument("path", help="attention file or URL (.zarr, .zarr.zip, .h5, .nc)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_storage_option(parser)
    parser.set_defaults(run=run_info)


def _validate_arguments(parser) -> None:
    parser.add_argument("path", help="attention file or URL (.zarr, .zarr.zip, .h5, .nc)")
    parser.add_argument("--json", action="store_true", help="print the report (every finding, warnings too) as JSON")
    parser.add_argument("--metadata-only", action="store_true", help="skip value checks (row sums, ranges, causal zeros)")
    parser.add_argument("-q", "--no-progress", action="store_true",
                        help="no progress bar (none is shown when stderr is not a terminal)")
    parser.add_argument("--scheduler", metavar="ADDRESS|threads|processes|synchronous",
                        help="where the value checks run (a dask graph over the stored chunks): threads (default, every "
                             "core), processes, synchronous, or a dask.distributed scheduler address such as "
                             "tcp://HOST:8786 (gives up after 5 s if it does not answer)")
    add_storage_option(parser)
    parser.set_defaults(run=run_validate)


def _convert_arguments(parser) -> None:
    parser.add_argument("source", help="attention file or URL to copy")
    parser.add_argument("destination", help="file to write: .zarr, .zarr.zip, .h5 or .nc")
    parser.add_argument("--overwrite", action="store_true", help="replace the destination if it exists")
    parser.add_argument("--zarr-format", type=int, choices=(2, 3), default=3)
    parser.add_argument("--dry-run", action="store_true", help="say what would change, write nothing")
    add_storage_option(parser)
    parser.set_defaults(run=run_convert)


_ARGUMENTS = {"info": _info_arguments, "validate": _validate_arguments, "convert": _convert_arguments}


def run_info(args) -> int:
    """``attnformat info PATH [--json] [--storage-option KEY=VALUE ...]``."""
    info = describe(open_tree(args.path, **storage_keywords(args)))
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return EXIT_OK


def run_validate(args) -> int:
    """``attnformat validate PATH [--json] [--metadata-only]``: 0 conforming, 1 not, 2 damaged."""
    from attnformat.compute import scheduler_name

    if args.scheduler is not None:
        scheduler_name(args.scheduler)  # a bad name: one line, exit 2, before the file is read
    report = validate(args.path, check_values=not args.metadata_only, scheduler=args.scheduler,
                      progress=False if args.no_progress else None, **storage_keywords(args))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    if report.damaged:
        return EXIT_UNREADABLE
    return EXIT_OK if report.ok else EXIT_NONCONFORMING


def run_convert(args) -> int:
    """``attnformat convert SRC DST [--overwrite] [--zarr-format N] [--dry-run]``."""
    if args.dry_run:
        open_tree(args.source, **storage_keywords(args))
        print(f"would write {args.destination} from {args.source}")
        return EXIT_OK
    changes = convert(args.source, args.destination, overwrite=args.overwrite, zarr_format=args.zarr_format,
                      **storage_keywords(args))
    for change in changes:
        print(f"note: {change}")
    print(f"wrote {args.destination}")
    return EXIT_OK
