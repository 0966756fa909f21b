"""Opening attention files: lazily, read-only, from any engine."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import xarray as xr

from attnformat.conventions import ROOT_COMPLETENESS, is_site
from attnformat.engines import Location, engine_for
from attnformat.errors import AttnFormatError, SelectionError, UnreadableFileError


def open(  # noqa: A001 - the public name mirrors xarray's open_*
    source: str | os.PathLike | Location,
    *,
    storage_options: Mapping[str, Any] | None = None,
    chunks: str | Mapping[str, Any] | None = None,
) -> xr.DataTree:
    """Open an attention file (a path or a URL) as a lazy, read-only :class:`xarray.DataTree`.

    Nothing but metadata and small coordinates (labels, masks, edge indices) is read until a
    variable's values are asked for; selecting one head and calling ``.values`` reads the one
    chunk that holds it. Works on ``.zarr`` directories (Zarr v3 or v2), ``.zarr.zip`` archives
    and netCDF4/HDF5 files (``.h5``, ``.nc``), local or behind a URL (``https://``, ``s3://``,
    ``gs://``..., read through fsspec: ``pip install 'attnformat[remote]'``). Every road goes
    through the file's engine, which screens the file before any storage library parses it, so a
    URL gives the same tree (dtypes, values, refusals) as a local copy. Zarr stores behind a URL
    should have consolidated metadata, which attnformat always writes.

    The location is kept in ``tree.encoding["source"]`` (its text, for messages) and
    ``tree.encoding["location"]`` (a :class:`attnformat.engines.Location`, options included).

    Parameters
    ----------
    source
        The file or directory to open, or its URL.
    storage_options
        fsspec options for URLs, e.g. ``{"endpoint_url": "http://127.0.0.1:9000"}`` for an
        S3-compatible server, ``{"anon": True}`` for a public bucket. Without an endpoint,
        ``s3://`` URLs honour ``AWS_ENDPOINT_URL_S3`` and ``AWS_ENDPOINT_URL``.
    chunks
        ``None`` (default): lazily indexed numpy-backed arrays, as before; selecting then reading
        ``.values`` reads what the selection touches, and a reduction such as ``.mean()`` reads
        the whole variable into memory. Anything else gives dask arrays whose chunks are whole
        multiples of the chunks the file stores (no stored chunk is ever split between two dask
        chunks): ``"auto"`` merges neighbouring stored chunks up to dask's ``array.chunk-size``
        (128 MiB by default), so that a file of many small maps is a few tasks, not thousands;
        ``"stored"`` or ``{}`` gives one dask chunk per stored chunk; a dict ``{dim: size}``
        sets sizes per dimension (rounded to the nearest multiple of the stored chunk; ``-1`` for
        the whole dimension, ``"auto"`` to merge along it; dims not named keep the stored chunk).
        Every dask chunk is read through the engine's checked road (checksums, sizes, links
        refused), in whichever process or cluster worker computes it: a worker opens the file by
        its location. Indexes and small coordinates stay numpy. See :mod:`attnformat.compute`.

    Returns
    -------
    xarray.DataTree

    Raises
    ------
    attnformat.errors.UnreadableFileError
        If the path does not exist, is not a store attnformat reads, or is unsafe or damaged
        (:class:`~attnformat.errors.BrokenStoreError` then names the ATTN-STORE rule).
    attnformat.errors.MissingDependencyError
        If a URL needs fsspec or a protocol package (s3fs...) that is not installed.

    Examples
    --------
    >>> import attnformat
    >>> tree = attnformat.open(attnformat.example_path("dense"))
    >>> tree["encoder/self"]["weights"].sel(layer=0, head=1).shape
    (6, 6)
    >>> chunked = attnformat.open(attnformat.example_path("dense"), chunks="auto")
    >>> chunked["encoder/self"]["weights"].chunks
    ((2,), (3,), (6,), (6,))
    """
    location = Location.of(source, storage_options)
    if not location.is_url and not location.path.exists():
        raise UnreadableFileError(f"{location}: no such file or directory")
    engine = engine_for(location, must_exist=not location.is_url)
    try:
        tree = engine.open_tree(location)
    except AttnFormatError:
        raise
    except Exception as error:
        if not location.is_url:
            raise
        # Network and protocol errors come in many classes (aiohttp, botocore, fsspec...).
        raise UnreadableFileError(f"{location}: cannot read ({type(error).__name__}: {error})") from error
    tree.encoding = {**tree.encoding, "source": location.text, "location": location}
    if chunks is not None:
        from attnformat.compute import chunked

        tree = chunked(tree, chunks)
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
