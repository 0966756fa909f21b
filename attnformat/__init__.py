"""attnformat: a file format for neural-network attention, with a reader, writer and validator.

>>> import attnformat
>>> tree = attnformat.open(attnformat.example_path("dense"))
>>> attnformat.validate(tree).ok
True
"""

from attnformat._version import __version__
from attnformat.conventions import FORMAT_VERSION
from attnformat.errors import (
    AttnFormatError,
    NonConformingError,
    SelectionError,
    UnreadableFileError,
    UnsupportedFormatError,
    WriterError,
)
from attnformat.examples import example_path
from attnformat.map_reading import read_map
from attnformat.reading import get_site, is_complete, open, site_paths, source_of
from attnformat.saving import convert, save
from attnformat.validation import Finding, ValidationReport, validate
from attnformat.writer import SiteWriter, Writer

__all__ = [
    "FORMAT_VERSION",
    "AttnFormatError",
    "Finding",
    "NonConformingError",
    "SelectionError",
    "SiteWriter",
    "UnreadableFileError",
    "UnsupportedFormatError",
    "ValidationReport",
    "Writer",
    "WriterError",
    "__version__",
    "convert",
    "example_path",
    "get_site",
    "is_complete",
    "open",
    "read_map",
    "save",
    "site_paths",
    "source_of",
    "validate",
]
