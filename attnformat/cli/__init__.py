"""The ``attnformat`` command line.

Each subcommand lives in a small module that registers itself on the parser: ``core`` (info,
validate, convert), ``capture`` (demo, export; needs the adapters' extras) and ``plotting``
(plot, report, stats). Exit codes: 0 success / conforming, 1 nonconforming, 2 unreadable
input, missing file or bad usage, 3 an optional dependency is missing, 4 an unexpected error (a
bug: the message says what happened, without a traceback unless ATTNFORMAT_DEBUG=1 is set).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from attnformat._version import __version__
from attnformat.errors import AttnFormatError, NonConformingError, UnreadableFileError

EXIT_OK, EXIT_NONCONFORMING, EXIT_UNREADABLE, EXIT_MISSING_DEPENDENCY, EXIT_INTERNAL = 0, 1, 2, 3, 4
_SUBCOMMAND_MODULES = ("core", "capture", "plotting")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default exits 2 too; keep the message short and clear
        self.print_usage(sys.stderr)
        self.exit(EXIT_UNREADABLE, f"attnformat: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand registered."""
    parser = _Parser(prog="attnformat", description="Read, write, validate and plot attention files.")
    parser.add_argument("--version", action="version", version=f"attnformat {__version__} (format 1.0.0)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"attnformat.cli.{name}")
        except ModuleNotFoundError as error:
            if not error.name or not error.name.startswith("attnformat.cli."):
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code instead of exiting (for tests).

    Examples
    --------
    >>> import attnformat
    >>> main(["validate", str(attnformat.example_path("dense"))])
    ... # doctest: +ELLIPSIS
    /...dense.zarr: conforms to attnformat 1.0 (0 errors, 0 warnings)
    0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:
        return int(stop.code or 0)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_UNREADABLE
    try:
        return int(args.run(args) or 0)
    except NonConformingError as error:
        print(f"attnformat: {error}", file=sys.stderr)
        return EXIT_NONCONFORMING
    except ModuleNotFoundError as error:
        print(f"attnformat: this command needs the optional package {error.name!r}; install it, "
              f"e.g. pip install 'attnformat[all]'", file=sys.stderr)
        return EXIT_MISSING_DEPENDENCY
    except (AttnFormatError, UnreadableFileError, FileNotFoundError, PermissionError, IsADirectoryError) as error:
        print(f"attnformat: {error}", file=sys.stderr)
        return EXIT_UNREADABLE
    except KeyboardInterrupt:
        print("attnformat: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``attnformat info x | head``): stop quietly, and keep Python from
        # complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as error:  # a bug or a damage nobody foresaw: still no traceback for users
        if os.environ.get("ATTNFORMAT_DEBUG"):
            raise
        print(f"attnformat: unexpected {type(error).__name__}: {error}\n(set ATTNFORMAT_DEBUG=1 for the traceback, "
              "and please report it with the command that caused it)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
