"""Subcommands of the interactive explorer: ``view`` (write the page) and ``serve`` (serve it).

Thin wrappers over :func:`attnformat.viewer.explorer.write_page` and
:func:`attnformat.viewer.explorer.server.serve`; errors reach :func:`attnformat.cli.main`, which
prints one line and returns the README's exit code. Neither command imports matplotlib.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from attnformat.cli import add_storage_option, storage_keywords


def _selector(text: str):
    """Integers stay integers (coordinate values or positions); anything else is a label."""
    try:
        return int(text)
    except ValueError:
        return text


def _selectors(text: str) -> list:
    """``--layers 0,2,5`` -> [0, 2, 5]; labels allowed (``--sites encoder/self,decoder/cross``)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r} names nothing")
    return [_selector(item) for item in items]


def _byte_count(text: str) -> int:
    """``4000000``, ``4MB``, ``1.5MiB``, ``800kB`` -> bytes."""
    units = {"kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "b": 1}
    lowered = text.strip().lower()
    for unit, factor in units.items():
        if lowered.endswith(unit):
            number, scale = lowered[: -len(unit)], factor
            break
    else:
        number, scale = lowered, 1
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 4000000, 4MB, 1.5MiB)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the size must be positive")
    return value


def add_parser(subparsers, name: str, help: str):  # noqa: A002 - argparse's own keyword
    """Add the parser of ``view`` or ``serve`` to the ``attnformat`` parser.

    Parameters
    ----------
    subparsers
        The main parser's subparsers.
    name
        ``"view"`` or ``"serve"``.
    help
        Its one-line help (from :data:`attnformat.cli.COMMANDS`).

    Examples
    --------
    >>> from attnformat.cli import build_parser
    >>> build_parser("view").parse_args(["view", "run.zarr", "-o", "page.html", "--layers", "0,3"]).layers
    [0, 3]
    """
    return _ADDERS[name](subparsers, help)


def _add_view(subparsers, help: str):  # noqa: A002
    parser = subparsers.add_parser(
        "view", help=help,
        description="Write one self-contained HTML page of an attention file: token view, matrix view and more, "
                    "working offline (no network access of any kind). Maps are embedded 8-bit quantized up to "
                    "--max-bytes; beyond it they are pooled, then left out, and the page says so.")
    parser.add_argument("path", help="attention file (.zarr, .zarr.zip, .h5, .nc) or URL")
    parser.add_argument("-o", "--output", help="the page to write (default: the file's name + .html here)")
    parser.add_argument("--site", dest="sites", type=_selectors,
                        help="site path(s) to show, comma-separated (default: all)")
    parser.add_argument("--sample", dest="samples", type=_selectors,
                        help="sample(s) to embed, comma-separated (default: the first)")
    parser.add_argument("--layers", type=_selectors, help="layer(s) to embed, comma-separated (default: all)")
    parser.add_argument("--steps", type=_selectors, help="training step(s) to embed, comma-separated (default: all)")
    parser.add_argument("--heads", type=_selectors,
                        help="head(s) to embed, comma-separated (default: all, and their mean)")
    parser.add_argument("--variable", dest="variables", type=_selectors,
                        help="variable(s) to embed, comma-separated (default: weights, else the first map variable)")
    parser.add_argument("--max-bytes", type=_byte_count, default=None,
                        help="bound on the embedded maps' text, e.g. 4MB (default 4000000)")
    parser.add_argument("--title", help="the page's title (default: the file's name)")
    add_storage_option(parser)
    parser.set_defaults(run=run_view)
    return parser


def _add_serve(subparsers, help: str):  # noqa: A002
    parser = subparsers.add_parser(
        "serve", help=help,
        description="Serve the interactive page of an attention file of any size on this machine: each map (or "
                    "zoomed window) is read from the file when the page asks for it. Ctrl-C stops.")
    parser.add_argument("path", help="attention file (.zarr, .zarr.zip, .h5, .nc) or URL")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser")
    parser.add_argument("--title", help="the page's title (default: the file's name)")
    add_storage_option(parser)
    parser.set_defaults(run=run_serve)
    return parser


def run_view(args) -> int:
    """``attnformat view PATH [-o PAGE]``: write the page, print where and how large."""
    from attnformat.viewer.explorer.page import write_page

    output = Path(args.output) if args.output else None
    written = write_page(args.path, output, title=args.title, sites=args.sites, samples=args.samples,
                         layers=args.layers, heads=args.heads, steps=args.steps, variables=args.variables,
                         max_bytes=args.max_bytes, **storage_keywords(args))
    size = written.stat().st_size
    print(f"wrote {written} ({size / 1e6:.2f} MB)")
    return 0


def run_serve(args) -> int:
    """``attnformat serve PATH``: serve until Ctrl-C (exit 0)."""
    from attnformat.errors import AttnFormatError
    from attnformat.viewer.explorer.server import serve

    try:
        server = serve(args.path, host=args.host, port=args.port, title=args.title, **storage_keywords(args))
    except AttnFormatError:
        raise
    except OSError as error:  # the port is taken, or the address is not this machine's
        if isinstance(error, (FileNotFoundError, PermissionError)) and error.filename:
            raise  # about the file: the command line's usual message
        raise AttnFormatError(f"cannot listen on {args.host}:{args.port}: {error.strerror or error} "
                              "(choose another --port, or --port 0 for a free one)") from None
    try:
        print(f"serving {args.path} at {server.url} (Ctrl-C stops)", flush=True)
        if not args.no_browser:
            import webbrowser

            webbrowser.open(server.url)
        server.serve_forever()
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a user stops the server: not an error
    finally:
        server.close()
    return 0


_ADDERS = {"view": _add_view, "serve": _add_serve}
