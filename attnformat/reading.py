"""Opening attention files: lazily, read-only, from any engine."""

from __future__ import annotations

import os
from pathlib import Path

import xarray as xr

from attnformat.conventions import ROOT_COMPLETENESS, is_site
from attnformat.engines import engine_for
from attnformat.errors import SelectionError, UnreadableFileError


def open(path: str | os.PathLike) -> xr.DataTree:  # noqa: A001 - the public name mirrors xarray's open_*
    """Open an attention file as a lazy, read-only :class:`xarray.DataTree`.

    Nothing but metadata and small coordinates (labels, masks, edge indices) is read until a
    variable's values are asked for; selecting one head and calling ``.values`` reads the one
    chunk that holds it. Works on ``.zarr`` directories (Zarr v3 or v2), ``.zarr.zip`` archives
    and netCDF4/HDF5 files (``.h5``, ``.nc``). The file's path is kept in
    ``tree.encoding["source"]`` so that later messages can name it.

    Parameters
    ----------
    path
        The file or directory to open.

    Returns
    -------
    xarray.DataTree

    Raises
    ------
    attnformat.errors.UnreadableFileError
        If the path does not exist or is not a store attnformat reads.

    Examples
    --------
    >>> import attnformat
    >>> tree = attnformat.open(attnformat.example_path("dense"))
    >>> tree["encoder/self"]["weights"].sel(layer=0, head=1).shape
    (6, 6)
    """
    path = Path(path)
    if not path.exists():
        raise UnreadableFileError(f"{path}: no such file or directory")
    engine = engine_for(path, must_exist=True)
    tree = engine.open_tree(path)
    tree.encoding = {**tree.encoding, "source": str(path)}
    return tree


def source_of(tree: xr.DataTree) -> str:
    """The path a tree was opened from, or ``"<in-memory tree>"``.

    Examples
    --------
    >>> import xarray as xr
    >>> source_of(xr.DataTree())
    '<in-memory tree>'
    """
    return str(tree.root.encoding.get("source", "<in-memory tree>"))


def site_paths(tree: xr.DataTree) -> list[str]:
    """Paths of the attention sites in a tree (groups with a ``layout`` attribute), in tree order.

    Examples
    --------
    >>> import attnformat
    >>> site_paths(attnformat.open(attnformat.example_path("encoder-decoder")))
    ['decoder/cross', 'decoder/self', 'encoder/self']
    """
    return [node.path.lstrip("/") for node in tree.subtree if is_site(node.attrs)]


def get_site(tree: xr.DataTree, name: str | None = None) -> xr.DataTree:
    """Return one attention site by path; with ``name=None``, the only site of the file.

    Raises :class:`SelectionError` listing the sites that exist when ``name`` is not one of them.

    Examples
    --------
    >>> import attnformat
    >>> get_site(attnformat.open(attnformat.example_path("dense"))).path
    '/encoder/self'
    """
    sites = site_paths(tree)
    if name is None:
        if len(sites) == 1:
            return tree[sites[0]]
        raise SelectionError(
            f"{source_of(tree)}: the file holds {len(sites)} attention sites; name one of: {', '.join(sites) or '(none)'}"
        )
    key = name.strip("/")
    if key not in sites:
        raise SelectionError(f"{source_of(tree)}: no attention site {name!r}; sites: {', '.join(sites) or '(none)'}")
    return tree[key]


def is_complete(tree: xr.DataTree) -> bool:
    """True unless the file says its writer did not finish.

    Examples
    --------
    >>> import attnformat
    >>> is_complete(attnformat.open(attnformat.example_path("dense")))
    True
    """
    return tree.root.attrs.get(ROOT_COMPLETENESS) == "complete"
