"""Writing whole trees and converting between engines."""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dask
import xarray as xr

from attnformat.encoding import apply_keepbits
from attnformat.engines import Location, engine_for
from attnformat.engines.placement import move_into_place
from attnformat.errors import AttnFormatError, BrokenStoreError, NonConformingError, WriteFailedError



def save(
    tree: xr.DataTree,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    zarr_format: int = 3,
    keepbits: Mapping[str, int] | None = None,
    check: str = "full",
    storage_options: Mapping[str, Any] | None = None,
) -> Path | Location:
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
        Destination. Must not exist unless ``overwrite=True``. A URL (``s3://bucket/run.zarr``)
        is written through the remote engine: staged locally, then uploaded with the root
        metadata last, so a reader never sees a half-uploaded file as complete.
    overwrite
        Replace an existing file or directory.
    zarr_format
        3 (default) or 2, for Zarr destinations.
    keepbits
        Variable name -> mantissa bits to keep, e.g. ``{"weights": 10}``; lossy, declared.
    check
        ``"full"`` (metadata and values), ``"metadata"`` or ``"none"``: what to validate first.
    storage_options
        fsspec options for a URL destination (e.g. ``{"anon": False}``, an endpoint).

    Returns
    -------
    pathlib.Path or Location
        The path written (the :class:`~attnformat.engines.Location` for a URL; ``str()`` of it is
        the URL).

    Examples
    --------
    >>> import attnformat, tempfile, pathlib
    >>> tree = attnformat.open(attnformat.example_path("dense"))
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "copy.h5"
    >>> attnformat.save(tree, out).suffix
    '.h5'
    """
    from attnformat.reading import source_of
    from attnformat.rules import DAMAGE_RULES
    from attnformat.validation import validate

    location = Location.of(path, storage_options)
    if location.is_url:
        from attnformat.engines.remote import save_to_url

        return save_to_url(tree, location, overwrite=overwrite, zarr_format=zarr_format, keepbits=keepbits, check=check)
    path = Path(path)
    engine = engine_for(path)
    if check != "none":
        report = validate(tree, check_values=(check == "full"))
        if report.damaged:  # the source is damaged or hostile: name it, not the destination
            finding = next(f for f in report.errors if f.rule_id in DAMAGE_RULES)
            raise BrokenStoreError(f"{source_of(tree)}: {finding.location}: {finding.message}", finding.rule_id, finding.location)
        if not report.ok:
            raise NonConformingError(f"{path}: refusing to write a nonconforming tree:\n{report.format()}", report)
    if path.exists() and not overwrite:
        raise AttnFormatError(f"{path}: already exists; pass overwrite=True to replace it")
    if zarr_format not in (2, 3):
        raise AttnFormatError(f"{path}: zarr_format must be 2 or 3, not {zarr_format!r}")
    if keepbits:
        tree = apply_keepbits(tree, keepbits)
    tree = stored_dtypes(tree, engine)
    encoding = {
        node.path: per_variable
        for node in tree.subtree
        if (per_variable := {name: enc for name, variable in node.dataset.variables.items() if (enc := engine.variable_encoding(variable, zarr_format))})
    }
    tree = _chunked_like(tree, encoding)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
        try:
            staged = scratch / path.name
            # dask's own pool would keep writing chunks into the scratch directory after a task
            # failed (a full disk); leaving this block waits for every task already started.
            # The threaded scheduler is named, not inherited: a dask.distributed Client makes
            # itself the default, and the engine's lazy arrays are bound to this process's
            # screened file (they refuse to be pickled), so a copy runs here.
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool, dask.config.set(scheduler="threads", pool=pool):
                engine.write_tree(tree, staged, encoding, zarr_format)
            move_into_place(staged, path)
        finally:
            _remove_scratch(scratch)
        if check != "none":
            # The tree passed the metadata rules before it was written: the viewer's direct road
            # may draw this version without checking it again (attnformat.verdicts).
            from attnformat.verdicts import remember_conforming, version_of

            remember_conforming(version_of(path))
    except WriteFailedError as error:
        # The engine names the staged copy; the user knows the destination.
        reason = getattr(error.__cause__, "strerror", None) or str(error).split(": ", 1)[-1]
        raise WriteFailedError(f"{path}: writing failed ({reason}); nothing was replaced") from error
    except AttnFormatError:
        raise
    except OSError as error:
        # A full disk or a missing permission: the scratch directory is gone and the old file,
        # if any, is untouched.
        raise WriteFailedError(f"{path}: writing failed ({error.strerror or error}); nothing was replaced") from error
    return path


def _remove_scratch(scratch: Path) -> None:
    """Remove a scratch directory (after its writers have stopped), even on a full disk."""
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)


def _chunked_like(tree: xr.DataTree, encoding: dict) -> xr.DataTree:
    """Dask-backed variables (a streamed copy) rechunked to the chunks they will be stored in,
    so that every stored chunk is written by exactly one task."""

    def rechunk(dataset: xr.Dataset, path: str) -> xr.Dataset:
        changed = {}
        for name, variable in dataset.data_vars.items():
            chunks = encoding.get(path, {}).get(name, {})
            chunks = chunks.get("chunks") or chunks.get("chunksizes")
            if variable.chunks is not None and chunks:
                changed[name] = variable.chunk(dict(zip(variable.dims, chunks)))
        return dataset.assign(changed) if changed else dataset

    datasets = {node.path: rechunk(node.to_dataset(inherit=False), node.path) for node in tree.subtree}
    rechunked = xr.DataTree.from_dict(datasets)
    rechunked.encoding = dict(tree.encoding)
    return rechunked


def stored_dtypes(tree: xr.DataTree, engine) -> xr.DataTree:
    """A tree whose dtypes the engine stores as the spec says, without encodings from a read.

    Strings become variable-length (object) strings, loaded (they are small: labels); dtypes
    the engine cannot hold change as its ``dtype_changes`` says (``{"float16": ("float32",
    "netCDF4 has no float16")}`` in HDF5).

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.engines import engine_for
    >>> tree = stored_dtypes(attnformat.open(attnformat.example_path("dense")), engine_for("x.zarr"))
    >>> tree["encoder/self"]["query_label"].dtype
    dtype('O')
    """
    changes = getattr(engine, "dtype_changes", {})

    def stored(variable: xr.Variable) -> xr.Variable:
        if variable.dtype.kind in "OUT":
            variable = variable.load().astype(object)
        elif variable.dtype.name in changes:
            variable = variable.astype(changes[variable.dtype.name][0])
        else:
            variable = variable.copy(deep=False)
        variable.encoding = {}
        return variable

    def convert_dataset(dataset: xr.Dataset) -> xr.Dataset:
        coords = {name: stored(dataset.variables[name]) for name in dataset.coords}
        data_vars = {name: stored(dataset.variables[name]) for name in dataset.data_vars}
        return xr.Dataset(data_vars, coords, attrs=dataset.attrs)

    return tree.map_over_datasets(convert_dataset)


def for_streaming(tree: xr.DataTree) -> xr.DataTree:
    """The same tree with attention variables as dask arrays of one map each, so a copy streams.

    Each task reads one map through the engine's checked reader; memory holds a few maps.

    Examples
    --------
    >>> import attnformat
    >>> streamed = for_streaming(attnformat.open(attnformat.example_path("dense")))
    >>> streamed["encoder/self"]["weights"].chunks[:2]
    ((1, 1), (1, 1, 1))
    """
    from attnformat.conventions import LEADING_DIMS

    def chunked(dataset: xr.Dataset) -> xr.Dataset:
        leading = {dim: 1 for dim in dataset.dims if dim in LEADING_DIMS}
        big = [name for name, variable in dataset.data_vars.items() if any(dim in leading for dim in variable.dims)]
        if not big:
            return dataset
        return dataset.assign({name: dataset[name].chunk({dim: 1 for dim in dataset[name].dims if dim in leading}) for name in big})

    streamed = tree.map_over_datasets(chunked)
    streamed.encoding = dict(tree.encoding)
    return streamed


def convert(
    source: str | os.PathLike | Location,
    destination: str | os.PathLike,
    *,
    overwrite: bool = False,
    zarr_format: int = 3,
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Copy an attention file to another storage, chunk by chunk; return what changed.

    Conversion is lossless except where the target cannot hold a dtype: float16 becomes float32
    in HDF5 (netCDF4 has no float16). The returned list says so for each variable it touched.
    The source is screened and read through its engine (a local path or a URL), one map at a
    time; the destination is written like :func:`save` writes (staged, then moved into place).

    Parameters
    ----------
    source
        Path or URL of the file to copy.
    destination
        Local path or URL (``s3://...``) to write; its suffix picks the storage.
    overwrite
        Replace an existing destination.
    zarr_format
        3 (default) or 2, for Zarr destinations.
    storage_options
        fsspec options for a source or destination URL (both use the same options).

    Examples
    --------
    >>> import attnformat, tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "copy.zarr.zip"
    >>> attnformat.convert(attnformat.example_path("dense"), out)
    []
    """
    from attnformat.reading import open as open_tree

    location = Location.of(source, storage_options)
    target_location = Location.of(destination, storage_options)
    destination = target_location if target_location.is_url else Path(destination)
    tree = for_streaming(open_tree(location))  # screened and opened by the source's engine
    target = engine_for(destination)
    changes = [
        f"{node.path.rstrip('/')}/{name}: {variable.dtype} stored as {target.dtype_changes[variable.dtype.name][0]} "
        f"({target.dtype_changes[variable.dtype.name][1]})"
        for node in tree.subtree
        for name, variable in node.dataset.variables.items()
        if variable.dtype.name in getattr(target, "dtype_changes", {})
    ]
    save(tree, destination, overwrite=overwrite, zarr_format=zarr_format, check="metadata")
    return changes
