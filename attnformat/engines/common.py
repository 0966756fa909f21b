"""What every storage engine shares: where a file is (:class:`Location`), the engine interface
(:class:`Engine`), and choosing the engine for a location.

An engine answers every storage question about its files, so that nothing outside
``attnformat/engines/`` asks which storage a file uses: is this file mine, is it safe to open
(screening runs before any storage library parses the file), open it lazily (local path or URL,
with fsspec ``storage_options``), read one map fast, how to encode and checksum a variable, how
many chunks a variable stores, how to write a whole tree.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # only annotations use xarray: importing an engine must not cost xarray's import
    import xarray as xr

from attnformat.errors import MissingDependencyError, UnreadableFileError, UnsupportedFormatError

ZARR_SUFFIX = ".zarr"
ZIP_SUFFIX = ".zarr.zip"
HDF5_SUFFIXES = (".h5", ".hdf5", ".nc", ".nc4")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

# Environment variables that name an S3-compatible endpoint, in the order boto/aws-cli honour them.
_S3_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


@dataclass(frozen=True)
class Location:
    """Where a file is: a local path or a URL, with the fsspec options to reach it.

    ``text`` is kept exactly as the caller gave it (``s3://bucket/run.zarr`` keeps its double
    slash, which :class:`pathlib.Path` would collapse) and is what every message names.

    Examples
    --------
    >>> Location.of("s3://bucket/run.zarr").is_url, Location.of("run.zarr").path.name
    (True, 'run.zarr')
    >>> str(Location.of("file:///tmp/run.h5").path)
    '/tmp/run.h5'
    """

    text: str
    storage_options: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def of(cls, source: str | os.PathLike | Location, storage_options: Mapping[str, Any] | None = None) -> Location:
        """A Location from a path, a URL or another Location (whose options are kept unless given)."""
        if isinstance(source, Location):
            if storage_options is None:
                return source
            return cls(source.text, dict(storage_options))
        return cls(os.fspath(source), dict(storage_options or {}))

    @property
    def is_url(self) -> bool:
        """True for ``scheme://`` locations other than ``file://``."""
        return "://" in self.text and not self.text.startswith("file://")

    @property
    def path(self) -> Path:
        """The local path (``file://`` stripped); raises for URLs."""
        if self.is_url:
            raise UnreadableFileError(f"{self.text}: a URL, not a local path")
        return Path(self.text.removeprefix("file://"))

    @property
    def name(self) -> str:
        """The last component of the path or URL (query string dropped), lower-cased."""
        return self.text.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1].lower()

    @property
    def protocol(self) -> str:
        """``"file"`` for local paths, else the URL scheme (``"s3"``, ``"https"``...)."""
        return self.text.split("://", 1)[0].lower() if self.is_url else "file"

    def exists(self) -> bool:
        """True if something is at this location."""
        if not self.is_url:
            return self.path.exists()
        filesystem, path = self.filesystem()
        return bool(filesystem.exists(path))

    def fsspec_options(self) -> dict:
        """``storage_options`` with the standard S3 endpoint variables applied (for ``s3://``,
        unless the options name an endpoint), as this process sees them now.

        Examples
        --------
        >>> Location.of("s3://b/x.zarr", {"anon": True}).fsspec_options()["anon"]
        True
        """
        options = dict(self.storage_options)
        if self.protocol in ("s3", "s3a") and "endpoint_url" not in options and "client_kwargs" not in options:
            endpoint = next((os.environ[name] for name in _S3_ENDPOINT_VARIABLES if os.environ.get(name)), None)
            if endpoint:
                options["endpoint_url"] = endpoint
        return options

    def filesystem(self):
        """``(fsspec filesystem, path inside it)`` for this location.

        For ``s3://`` the standard endpoint variables (``AWS_ENDPOINT_URL_S3``,
        ``AWS_ENDPOINT_URL``) are honoured unless ``storage_options`` names an endpoint.
        Raises :class:`MissingDependencyError` (exit 3) when fsspec or the protocol's package is
        not installed.
        """
        try:
            from fsspec.core import url_to_fs
        except ImportError as error:
            raise MissingDependencyError(f"{self.text}: reading URLs needs fsspec", "remote") from error
        options = self.fsspec_options()
        try:
            return url_to_fs(self.text, **options)
        except ImportError as error:
            raise MissingDependencyError(f"{self.text}: the {self.protocol!r} protocol needs {error.name or 'a package'}", "remote") from error
        except ValueError as error:
            if "Protocol not known" in str(error):
                raise UnreadableFileError(f"{self.text}: unknown URL protocol {self.protocol!r}") from error
            raise UnreadableFileError(f"{self.text}: {error}") from error

    def __str__(self) -> str:
        return self.text

    def __fspath__(self) -> str:
        return str(self.path)


class Engine(Protocol):
    """One way of putting a DataTree on disk; the single owner of every storage question.

    Every method takes a :class:`Location`. Methods that read start by screening
    (:meth:`screen`), so that no storage library parses a file that has not been checked.
    """

    name: str

    def screen(self, location: Location) -> None:
        """Raise :class:`BrokenStoreError` (with its ATTN-STORE rule id) if the file is unsafe to
        parse: pickle codecs, references to other files (external storage, virtual datasets,
        links, symlinks), sizes it declares beyond the bounds of the spec. Never parses more than
        bounded metadata; never follows the file outside itself."""

    def open_tree(self, location: Location) -> xr.DataTree:
        """Screen, then open lazily and read-only. Damage raises :class:`UnreadableFileError`."""

    def read_map(self, location: Location, site: str, variable: str, selection: Mapping[str, Any]) -> xr.DataArray | None:
        """The one-map fast read: ``variable`` of ``site`` at ``selection`` (labels, resolved with
        :func:`attnformat.resolving.position`), labelled as :func:`attnformat.open` would label it;
        None when this engine has no fast road for the file (the caller then opens the tree)."""

    def stored_chunks(self, location: Location, variable_path: str) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
        """``(chunk_shape, grid indices of the chunks actually stored)`` of one array, from listing
        the store (bounded by what the file holds, not by what it declares)."""

    def variable_encoding(self, variable: xr.Variable, zarr_format: int = 3) -> dict:
        """Chunks, compression and checksum for one variable, as ``write_tree`` expects them."""

    def write_tree(self, tree: xr.DataTree, path: Path, encoding: dict, zarr_format: int) -> None:
        """Write ``tree`` to a new local ``path`` that does not exist yet."""


def engine_name_for_path(path: str | os.PathLike | Location, *, must_exist: bool = False) -> str:
    """Return ``"zarr"``, ``"zarr-zip"`` or ``"hdf5"`` for a path or URL.

    The suffix decides; for an existing local path with another suffix the content is sniffed (a
    directory holding Zarr metadata, a zip archive, an HDF5 signature).

    Examples
    --------
    >>> engine_name_for_path("attention.zarr.zip")
    'zarr-zip'
    >>> engine_name_for_path("s3://bucket/attention.nc")
    'hdf5'
    """
    location = Location.of(path)
    name = location.name
    if must_exist and not location.exists():
        raise UnreadableFileError(f"{location}: no such file or directory")
    if name.endswith(ZIP_SUFFIX):
        return "zarr-zip"
    if name.endswith(ZARR_SUFFIX):
        return "zarr"
    if name.endswith(HDF5_SUFFIXES):
        return "hdf5"
    if not location.is_url:
        local = location.path
        if local.is_dir():
            if any((local / marker).exists() for marker in ("zarr.json", ".zgroup", ".zattrs")):
                return "zarr"
        elif local.is_file():
            with open(local, "rb") as handle:
                signature = handle.read(8)
            if signature.startswith(b"PK"):
                return "zarr-zip"
            if signature == HDF5_SIGNATURE:
                return "hdf5"
            raise UnreadableFileError(f"{location}: neither a Zarr store, a zip of one, nor an HDF5 file")
    raise UnsupportedFormatError(
        f"{location}: cannot tell the storage from the name; use a .zarr directory, a .zarr.zip "
        f"file, or an HDF5 file ending in {', '.join(HDF5_SUFFIXES)}"
    )


def engine_for(path: str | os.PathLike | Location, *, must_exist: bool = False) -> Engine:
    """Return the engine object that reads and writes ``path``.

    Examples
    --------
    >>> engine_for("attention.h5").name
    'hdf5'
    """
    # Imported here so that importing attnformat does not import h5py until HDF5 is used.
    name = engine_name_for_path(path, must_exist=must_exist)
    if name == "hdf5":
        from attnformat.engines.hdf5 import Hdf5Engine

        return Hdf5Engine()
    from attnformat.engines.zarr import ZarrEngine, ZarrZipEngine

    return ZarrZipEngine() if name == "zarr-zip" else ZarrEngine()
