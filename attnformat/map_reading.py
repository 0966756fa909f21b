"""Reading one map (or a few) without building the whole tree.

The common question is "show me layer 3, head 5". :func:`read_map` asks the file's engine for
its fast road (a Zarr store's consolidated metadata and the one chunk holding that map; an HDF5
file's datasets through h5py), and otherwise opens the tree and selects. Either way the result is
the same labelled DataArray, selectors are resolved by :func:`attnformat.resolving.position`, and
errors come from one hierarchy (:class:`attnformat.SelectionError` for selectors,
:class:`attnformat.UnreadableFileError` for files).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import xarray as xr

from attnformat.engines import Location, engine_for
from attnformat.errors import SelectionError
from attnformat.resolving import position


def read_map(
    source: str | os.PathLike | Location,
    site: str | None = None,
    variable: str = "weights",
    *,
    storage_options: Mapping[str, Any] | None = None,
    **selection,
) -> xr.DataArray:
    """Read the maps of one variable picked by coordinate labels, as a labelled DataArray.

    Parameters
    ----------
    source
        Path or URL of an attention file (any storage).
    site
        Path of the attention site; may be omitted when the file has one site.
    variable
        ``"weights"`` (default), ``"logits"``, ``"bias"`` or any variable of the site.
    storage_options
        fsspec options for URLs (``{"endpoint_url": ...}`` for an S3-compatible store...).
    **selection
        One selector per dimension to pick, e.g. ``layer=3, head=5`` or ``query="cat"``
        (resolved as :func:`attnformat.resolving.position` says).

    Returns
    -------
    xarray.DataArray
        The selected values with the coordinates that still apply (token labels, masks...).

    Raises
    ------
    attnformat.SelectionError
        A site, variable, dimension or label the file does not hold (the message lists what exists).
    attnformat.UnreadableFileError
        The file is missing, unsafe or damaged.

    Examples
    --------
    >>> import attnformat
    >>> head = read_map(attnformat.example_path("dense"), "encoder/self", layer=1, head=2)
    >>> head.dims, head.shape, str(head.query_label.values[0])
    (('query', 'key'), (6, 6), '[CLS]')
    """
    location = Location.of(source, storage_options)
    engine = engine_for(location, must_exist=True)
    fast = engine.read_map(location, site, variable, selection)
    if fast is not None:
        return fast
    from attnformat.reading import get_site, open as open_tree

    node = get_site(open_tree(location), site)
    return select_map(node.to_dataset(inherit=False), variable, selection, where=f"file {location}, site {node.path.strip('/')}")


def select_map(dataset: xr.Dataset, variable: str, selection: Mapping[str, Any], *, where: str) -> xr.DataArray:
    """``dataset[variable]`` at ``selection`` (one selector per dimension), loaded.

    The general road of :func:`read_map`, for any dataset: every selector goes through
    :func:`attnformat.resolving.position`.

    Parameters
    ----------
    dataset
        One site's variables and coordinates.
    variable
        The variable to read.
    selection
        Dimension -> selector.
    where
        What messages name (``"file x.zarr, site encoder/self"``).

    Examples
    --------
    >>> import attnformat
    >>> site = attnformat.open(attnformat.example_path("dense"))["encoder/self"].to_dataset(inherit=False)
    >>> select_map(site, "weights", {"layer": 1, "head": 0}, where="dense").shape
    (6, 6)
    """
    if variable not in dataset.data_vars:
        raise SelectionError(f"{where}: no variable {variable!r}; variables: {', '.join(map(str, dataset.data_vars))}")
    data = dataset[variable]
    positions = {}
    for dim, value in selection.items():
        if dim not in data.dims:
            raise SelectionError(f"{where}: {variable} has no dimension {dim!r}; dimensions: {', '.join(data.dims)}")
        positions[dim] = position(
            dim, value, size=data.sizes[dim], index=data[dim].values if dim in data.coords else None,
            labels=label_values(dataset, dim), where=where,
        )
    return data.isel(positions).load()


def label_values(dataset: xr.Dataset, dim: str):
    """The token labels along ``dim`` (``query_label``...) when they are one list, else None.

    Examples
    --------
    >>> import attnformat
    >>> site = attnformat.open(attnformat.example_path("dense"))["encoder/self"].to_dataset(inherit=False)
    >>> list(label_values(site, "query"))[:2]
    ['[CLS]', 'the']
    """
    from attnformat.conventions import LABEL_COORDS

    name = LABEL_COORDS.get(dim)
    if name is None or name not in dataset.variables or dataset.variables[name].dims != (dim,):
        return None
    return dataset.variables[name].values
