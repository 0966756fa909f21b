"""Subcommands on files: ``info``, ``validate``, ``convert``."""

from __future__ import annotations

import json

from attnformat.reading import open as open_tree
from attnformat.saving import convert
from attnformat.summary import describe, format_description
from attnformat.validation import validate


def register(subparsers) -> None:
    """Add the core subcommands to the ``attnformat`` parser."""
    info = subparsers.add_parser("info", help="show groups, dimensions, variables and attributes (like ncdump -h)")
    info.add_argument("path")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(run=run_info)

    check = subparsers.add_parser("validate", help="check a file against the spec; exit 0 conforming, 1 not, 2 unreadable")
    check.add_argument("path")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--metadata-only", action="store_true", help="skip value checks (row sums, ranges, causal zeros)")
    check.set_defaults(run=run_validate)

    copy = subparsers.add_parser("convert", help="copy a file to another storage (.zarr, .zarr.zip, .h5/.nc)")
    copy.add_argument("source")
    copy.add_argument("destination")
    copy.add_argument("--overwrite", action="store_true", help="replace the destination if it exists")
    copy.add_argument("--zarr-format", type=int, choices=(2, 3), default=3)
    copy.add_argument("--dry-run", action="store_true", help="say what would change, write nothing")
    copy.set_defaults(run=run_convert)


def run_info(args) -> int:
    """``attnformat info PATH [--json]``."""
    info = describe(open_tree(args.path))
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0


def run_validate(args) -> int:
    """``attnformat validate PATH [--json] [--metadata-only]``."""
    report = validate(args.path, check_values=not args.metadata_only)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0 if report.ok else 1


def run_convert(args) -> int:
    """``attnformat convert SRC DST``."""
    if args.dry_run:
        open_tree(args.source)
        print(f"would write {args.destination} from {args.source}")
        return 0
    for change in convert(args.source, args.destination, overwrite=args.overwrite, zarr_format=args.zarr_format):
        print(f"note: {change}")
    print(f"wrote {args.destination}")
    return 0
