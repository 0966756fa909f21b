"""Writing whole trees and converting between engines."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import xarray as xr

from attnformat.encoding import apply_keepbits, prepare_for_engine, tree_encoding
from attnformat.engines import engine_for, engine_name_for_path
from attnformat.errors import AttnFormatError, NonConformingError, UnreadableFileError


def save(
    tree: xr.DataTree,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    zarr_format: int = 3,
    keepbits: Mapping[str, int] | None = None,
    check: str = "full",
) -> Path:
    """Validate a tree, then write it to ``path``; the suffix picks the storage.

    ``.zarr`` writes a Zarr directory store (format 3 unless ``zarr_format=2``), ``.zarr.zip`` a
    single zip file of one, and ``.h5``/``.nc`` a netCDF4-compatible HDF5 file. Compression is
    lossless unless ``keepbits`` asks for bit rounding of named variables (declared in the file).
    The file is written under a temporary name next to ``path`` and moved into place at the end,
    so a failure never leaves a half-written file, and never destroys an existing one.

    Parameters
    ----------
    tree
        The tree to write; it must conform to the spec (see :func:`attnformat.validate`).
    path
        Destination. Must not exist unless ``overwrite=True``.
    overwrite
        Replace an existing file or directory.
    zarr_format
        3 (default) or 2, for Zarr destinations.
    keepbits
        Variable name -> mantissa bits to keep, e.g. ``{"weights": 10}``; lossy, declared.
    check
        ``"full"`` (metadata and values), ``"metadata"`` or ``"none"``: what to validate first.

    Returns
    -------
    pathlib.Path
        The path written.

    Examples
    --------
    >>> import attnformat, tempfile, pathlib
    >>> tree = attnformat.open(attnformat.example_path("dense"))
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "copy.h5"
    >>> attnformat.save(tree, out).suffix
    '.h5'
    """
    from attnformat.validation import validate

    path = Path(path)
    engine_name = engine_name_for_path(path)
    if check != "none":
        report = validate(tree, check_values=(check == "full"))
        if not report.ok:
            raise NonConformingError(f"{path}: refusing to write a nonconforming tree:\n{report.format()}", report)
    if path.exists() and not overwrite:
        raise AttnFormatError(f"{path}: already exists; pass overwrite=True to replace it")
    if zarr_format not in (2, 3):
        raise AttnFormatError(f"{path}: zarr_format must be 2 or 3, not {zarr_format!r}")
    if keepbits:
        tree = apply_keepbits(tree, keepbits)
    tree = prepare_for_engine(tree, engine_name)
    encoding = tree_encoding(tree, engine_name, zarr_format)
    engine = engine_for(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as scratch:
        staged = Path(scratch) / path.name
        engine.write_tree(tree, staged, encoding, zarr_format)
        _move_into_place(staged, path)
    return path


def _move_into_place(staged: Path, path: Path) -> None:
    if not path.exists():
        os.replace(staged, path)
        return
    # Keep the old copy until the new one is in place, so no failure loses both.
    backup = path.with_name(f".{path.name}.replaced")
    os.replace(path, backup)
    os.replace(staged, path)
    if backup.is_dir():
        shutil.rmtree(backup)
    else:
        backup.unlink()


def open_for_streaming(path: str | os.PathLike) -> xr.DataTree:
    """Open ``path`` with dask arrays chunked as stored, so copies stream chunk by chunk."""
    import zarr

    path = Path(path)
    name = engine_name_for_path(path, must_exist=True)
    if name == "hdf5":
        tree = xr.open_datatree(str(path), engine="h5netcdf", chunks={})
    else:
        store = zarr.storage.ZipStore(str(path), mode="r") if name == "zarr-zip" else str(path)
        tree = xr.open_datatree(store, engine="zarr", chunks={})
    tree.encoding = {**tree.encoding, "source": str(path)}
    return tree


def convert(source: str | os.PathLike, destination: str | os.PathLike, *, overwrite: bool = False, zarr_format: int = 3) -> list[str]:
    """Copy an attention file to another storage, chunk by chunk; return what changed.

    Conversion is lossless except where the target cannot hold a dtype: float16 becomes float32
    in HDF5 (netCDF4 has no float16). The returned list says so for each variable it touched.

    Examples
    --------
    >>> import attnformat, tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "copy.zarr.zip"
    >>> attnformat.convert(attnformat.example_path("dense"), out)
    []
    """
    source, destination = Path(source), Path(destination)
    from attnformat.reading import open as open_tree

    open_tree(source)  # raises a clear error for an unreadable source before dask gets involved
    try:
        tree = open_for_streaming(source)
    except (OSError, ValueError, KeyError) as error:
        raise UnreadableFileError(f"{source}: {error}") from error
    changes = []
    if engine_name_for_path(destination) == "hdf5":
        for node in tree.subtree:
            for name, variable in node.dataset.variables.items():
                if variable.dtype == np.float16:
                    changes.append(f"{node.path.rstrip('/')}/{name}: float16 stored as float32 (netCDF4 has no float16)")
    save(tree, destination, overwrite=overwrite, zarr_format=zarr_format, check="metadata")
    return changes
