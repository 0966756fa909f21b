"""Opening attention files: lazily, read-only, from any engine."""

from __future__ import annotations

import os
from pathlib import Path

import xarray as xr

from attnformat.conventions import ROOT_COMPLETENESS, is_site
from attnformat.engines import engine_for
from attnformat.errors import SelectionError, UnreadableFileError


def open(path: str | os.PathLike) -> xr.DataTree:  # noqa: A001 - the public name mirrors xarray's open_*
    """Open an attention file (a path or a URL) as a lazy, read-only :class:`xarray.DataTree`.

    Nothing but metadata and small coordinates (labels, masks, edge indices) is read until a
    variable's values are asked for; selecting one head and calling ``.values`` reads the one
    chunk that holds it. Works on ``.zarr`` directories (Zarr v3 or v2), ``.zarr.zip`` archives
    and netCDF4/HDF5 files (``.h5``, ``.nc``). URLs (``https://``, ``s3://``, ``gs://``...) of
    Zarr stores and HDF5 files are read through fsspec (``pip install 'attnformat[remote]'``);
    Zarr stores should then have consolidated metadata, which attnformat always writes. The file's
    path is kept in ``tree.encoding["source"]`` so that later messages can name it.

    Parameters
    ----------
    path
        The file or directory to open, or its URL.

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
    text = os.fspath(path)
    if "://" in text and not text.startswith("file://"):
        tree = _open_url(text)
    else:
        path = Path(text.removeprefix("file://"))
        if not path.exists():
            raise UnreadableFileError(f"{path}: no such file or directory")
        tree = engine_for(path, must_exist=True).open_tree(path)
    tree.encoding = {**tree.encoding, "source": text}
    return tree


def _open_url(url: str) -> xr.DataTree:
    from attnformat.engines.common import engine_name_for_path

    name = engine_name_for_path(url.split("?", 1)[0])
    try:
        import fsspec
    except ImportError as error:
        raise UnreadableFileError(f"{url}: reading URLs needs fsspec: pip install 'attnformat[remote]'") from error
    try:
        if name == "zarr":
            from attnformat.engines.zarr import ZarrEngine
            from zarr.storage import FsspecStore

            return ZarrEngine()._open_store(FsspecStore.from_url(url, read_only=True), url)
        if name == "hdf5":
            handle = fsspec.open(url, mode="rb").open()
            tree = xr.open_datatree(handle, engine="h5netcdf", chunks=None)
            tree.set_close(handle.close)
            return tree
    except UnreadableFileError:
        raise
    except Exception as error:  # network and protocol errors come in many classes
        raise UnreadableFileError(f"{url}: cannot read ({type(error).__name__}: {error})") from error
    raise UnreadableFileError(f"{url}: zip archives are read from local paths only; download it first")


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
