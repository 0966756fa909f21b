"""attnformat: a file format for neural-network attention, with a reader, writer and validator.

>>> import attnformat
>>> tree = attnformat.open(attnformat.example_path("dense"))
>>> attnformat.validate(tree).ok
True

Public names are imported on first use (:pep:`562` module ``__getattr__``): ``import attnformat``
costs a few milliseconds, and a script that only plots one map, or ``attnformat --version``, never
pays for xarray, zarr, the writer or the validator it does not use. ``dir(attnformat)`` and
``__all__`` list every public name; ``from attnformat import X`` works as before. Measured
(``python -X importtime``): the eager imports took 1.4 s, most of it xarray (pandas) and zarr
pulled in by ``examples``, ``writer`` and ``saving``.
"""

from __future__ import annotations

import importlib

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

#: Public name -> the module that defines it, imported when the name is first asked for.
_LAZY: dict[str, str] = {
    "Finding": "attnformat.validation",
    "SiteWriter": "attnformat.writer",
    "ValidationReport": "attnformat.validation",
    "Writer": "attnformat.writer",
    "convert": "attnformat.saving",
    "collection_statistics": "attnformat.collection",
    "example_path": "attnformat.examples",
    "finalize": "attnformat.writer",
    "get_site": "attnformat.reading",
    "is_complete": "attnformat.reading",
    "open": "attnformat.reading",
    "open_many": "attnformat.collection",
    "read_map": "attnformat.map_reading",
    "save": "attnformat.saving",
    "site_paths": "attnformat.reading",
    "source_of": "attnformat.reading",
    "validate": "attnformat.validation",
}

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
    "collection_statistics",
    "convert",
    "example_path",
    "finalize",
    "get_site",
    "is_complete",
    "open",
    "open_many",
    "read_map",
    "save",
    "site_paths",
    "source_of",
    "validate",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if not name.startswith("__"):
        # Submodules (``attnformat.examples.build``...) were attributes as soon as the package was
        # imported while it imported them eagerly; they still are, imported on first use.
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
