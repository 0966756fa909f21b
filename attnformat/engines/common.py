"""What every storage engine shares: the interface, and choosing an engine for a path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import xarray as xr

from attnformat.errors import UnreadableFileError, UnsupportedFormatError

ZARR_SUFFIX = ".zarr"
ZIP_SUFFIX = ".zarr.zip"
HDF5_SUFFIXES = (".h5", ".hdf5", ".nc", ".nc4")


class Engine(Protocol):
    """One way of putting a DataTree on disk."""

    name: str

    def open_tree(self, path: Path) -> xr.DataTree:
        """Open ``path`` lazily and read-only."""

    def write_tree(self, tree: xr.DataTree, path: Path, encoding: dict, zarr_format: int) -> None:
        """Write ``tree`` to a new ``path`` that does not exist yet."""


def engine_name_for_path(path: str | os.PathLike, *, must_exist: bool = False) -> str:
    """Return ``"zarr"``, ``"zarr-zip"`` or ``"hdf5"`` for a path.

    The suffix decides; for an existing path with another suffix the content is sniffed (a
    directory holding Zarr metadata, a zip archive, an HDF5 signature).

    Examples
    --------
    >>> engine_name_for_path("attention.zarr.zip")
    'zarr-zip'
    >>> engine_name_for_path("attention.nc")
    'hdf5'
    """
    path = Path(path)
    name = path.name.lower().rstrip("/")
    if must_exist and not path.exists():
        raise UnreadableFileError(f"{path}: no such file or directory")
    if name.endswith(ZIP_SUFFIX):
        return "zarr-zip"
    if name.endswith(ZARR_SUFFIX):
        return "zarr"
    if name.endswith(HDF5_SUFFIXES):
        return "hdf5"
    if path.is_dir():
        if any((path / marker).exists() for marker in ("zarr.json", ".zgroup", ".zattrs")):
            return "zarr"
    elif path.is_file():
        with open(path, "rb") as handle:
            signature = handle.read(8)
        if signature.startswith(b"PK"):
            return "zarr-zip"
        if signature == b"\x89HDF\r\n\x1a\n":
            return "hdf5"
        raise UnreadableFileError(f"{path}: neither a Zarr store, a zip of one, nor an HDF5 file")
    raise UnsupportedFormatError(
        f"{path}: cannot tell the storage from the name; use a .zarr directory, a .zarr.zip "
        f"file, or an HDF5 file ending in {', '.join(HDF5_SUFFIXES)}"
    )


def engine_for(path: str | os.PathLike, *, must_exist: bool = False) -> Engine:
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
