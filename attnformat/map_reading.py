"""Reading one map (or a few) straight from a Zarr store, without building the whole tree.

The common question is "show me layer 3, head 5". :func:`read_map` answers it from the store's
consolidated metadata and the one chunk (or the few strips) holding that map, decoded in the
caller's thread by zarr-python's own codecs (:mod:`attnformat.engines.zarr_sync`), and labels the
result like :func:`attnformat.open` would. Stores it cannot take this way (zip, HDF5, Zarr v2,
Zarr without consolidated metadata, CF-encoded variables, codecs without a synchronous decoder)
go through :func:`attnformat.open`; the result is the same either way.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import xarray as xr

from attnformat.conventions import is_site
from attnformat.engines import engine_name_for_path
from attnformat.errors import SelectionError


def read_map(source: str | os.PathLike, site: str | None = None, variable: str = "weights", **selection) -> xr.DataArray:
    """Read the maps of one variable picked by coordinate labels, as a labelled DataArray.

    Parameters
    ----------
    source
        Path of an attention file (any storage).
    site
        Path of the attention site; may be omitted when the file has one site.
    variable
        ``"weights"`` (default), ``"logits"``, ``"bias"`` or any variable of the site.
    **selection
        One label per dimension to pick, e.g. ``layer=3, head=5`` (labels, as ``.sel`` takes).

    Returns
    -------
    xarray.DataArray
        The selected values with the coordinates that still apply (token labels, masks...).

    Examples
    --------
    >>> import attnformat
    >>> head = read_map(attnformat.example_path("dense"), "encoder/self", layer=1, head=2)
    >>> head.dims, head.shape, str(head.query_label.values[0])
    (('query', 'key'), (6, 6), '[CLS]')
    """
    path = Path(source)
    fast = _read_directly(path, site, variable, selection)
    if fast is not None:
        return fast
    from attnformat.reading import get_site, open as open_tree

    node = get_site(open_tree(path), site)
    dataset = node.to_dataset(inherit=False)
    if variable not in dataset.data_vars:
        raise SelectionError(f"{path}: site {node.path} has no variable {variable!r}; variables: {', '.join(dataset.data_vars)}")
    data = dataset[variable]
    _check_selection(path, node.path, data, selection)
    return data.sel(selection).load()


def _check_selection(path, site_path, data: xr.DataArray, selection: dict) -> None:
    for dim, label in selection.items():
        if dim not in data.dims:
            raise SelectionError(f"{path}: {site_path}/{data.name} has no dimension {dim!r}; dimensions: {', '.join(data.dims)}")
        if dim in data.coords and label not in data.coords[dim].values.tolist():
            raise SelectionError(f"{path}: {dim} {label!r} is not in site {site_path}; {dim} values: {', '.join(map(str, data.coords[dim].values.tolist()))}")


def _consolidated_metadata(path: Path) -> dict[str, dict] | None:
    """Node path -> {"kind", "dims", "attrs", "raw"} from a Zarr v3 store's consolidated
    metadata, or None (no such metadata, or it names a pickle codec: the general path refuses
    such stores and explains)."""
    try:
        text = (path / "zarr.json").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return _parse_consolidated(text)


@lru_cache(maxsize=32)
def _parse_consolidated(text: str) -> dict[str, dict] | None:
    # A pure function of the metadata's text, so the last few results are kept: reading the same
    # file again re-reads the text (a changed file parses afresh) but not the JSON. Callers must
    # not change what they get.
    from attnformat.engines.zarr import mentions_pickle_codec

    if mentions_pickle_codec(text):
        return None
    try:
        document = json.loads(text)
    except ValueError:
        return None
    consolidated = (document.get("consolidated_metadata") or {}).get("metadata") if isinstance(document, dict) else None
    if not isinstance(consolidated, dict):
        return None
    nodes = {"": {"kind": "group", "attrs": document.get("attributes", {})}}
    for name, meta in consolidated.items():
        if meta.get("node_type") == "group":
            nodes[name] = {"kind": "group", "attrs": meta.get("attributes", {})}
        else:
            nodes[name] = {"kind": "array", "dims": meta.get("dimension_names"), "attrs": meta.get("attributes", {}), "raw": meta}
    return nodes


def _array_metadata(node: dict):
    """zarr's parsed metadata of an array node, parsed once per (kept) consolidated document."""
    from attnformat.engines import zarr_sync

    if "metadata" not in node:
        node["metadata"] = zarr_sync.array_metadata(node["raw"])
    return node["metadata"]


def _read_directly(path: Path, site: str | None, variable: str, selection: dict) -> xr.DataArray | None:
    """The one-map path: consolidated Zarr v3 metadata, then the touched chunks, in this thread."""
    from zarr.storage import LocalStore, StorePath

    from attnformat.engines import zarr_sync
    from attnformat.engines.zarr import CF_ENCODING_ATTRS

    if not path.is_dir() or engine_name_for_path(path) != "zarr":
        return None
    nodes = _consolidated_metadata(path)
    if nodes is None:
        return None  # the general path explains what is wrong
    sites = sorted(name for name, node in nodes.items() if node["kind"] == "group" and is_site(node["attrs"]))
    if site is None:
        if len(sites) != 1:
            return None  # let the general path explain
        site = sites[0]
    site = site.strip("/")
    target = nodes.get(f"{site}/{variable}")
    if site not in sites or target is None or target["kind"] != "array" or not target.get("dims"):
        return None
    arrays = {name.rpartition("/")[2]: node for name, node in nodes.items() if node["kind"] == "array" and name.rpartition("/")[0] == site}
    if any(key in node["attrs"] for node in arrays.values() for key in CF_ENCODING_ATTRS):
        return None

    dims = tuple(target["dims"])
    unknown = [dim for dim in selection if dim not in dims]
    if unknown:
        raise SelectionError(f"{path}: /{site}/{variable} has no dimension {unknown[0]!r}; dimensions: {', '.join(dims)}")
    coordinate_names = set(str(target["attrs"].get("coordinates", "")).split()) | set(str(nodes[site]["attrs"].get("coordinates", "")).split())
    index_names = [dim for dim in dims if dim in arrays and tuple(arrays[dim]["dims"] or ()) == (dim,)]
    other_names = [name for name in coordinate_names if name in arrays and name not in index_names and set(arrays[name]["dims"] or ()) <= set(dims)]

    store = LocalStore(path, read_only=True)
    opened = {}
    for name in [variable, *index_names, *other_names]:
        metadata = _array_metadata(arrays[name])
        store_path = StorePath(store, f"{site}/{name}")
        if not zarr_sync.can_read(metadata, store_path):
            return None  # a codec or layout only the general readers know
        opened[name] = (metadata, store_path)
    values = {name: zarr_sync.read_all(*opened[name]) for name in [*index_names, *other_names]}

    index = []
    for dim in dims:
        if dim not in selection:
            index.append(slice(None))
            continue
        if dim not in values:
            index.append(int(selection[dim]))
            continue
        matches = np.flatnonzero(values[dim] == selection[dim])
        if matches.size != 1:
            listed = ", ".join(map(str, values[dim].tolist()))
            raise SelectionError(f"{path}: {dim} {selection[dim]!r} is not in site /{site}; {dim} values: {listed}")
        index.append(int(matches[0]))
    data = zarr_sync.read(*opened[variable], tuple(index))
    kept = tuple(dim for dim, item in zip(dims, index) if isinstance(item, slice))
    positions = dict(zip(dims, index))
    coords = {}
    for name in index_names + other_names:
        coord_dims = tuple(arrays[name]["dims"])
        taken = tuple(positions.get(dim, slice(None)) for dim in coord_dims)
        coord_values = values[name][taken] if coord_dims else values[name]
        remaining = tuple(dim for dim, item in zip(coord_dims, taken) if isinstance(item, slice))
        coords[name] = xr.Variable(remaining, coord_values, _public_attrs(arrays[name]["attrs"]))
    return xr.DataArray(data, dims=kept, name=variable, attrs=_public_attrs(target["attrs"], "coordinates"), coords=coords)


def _public_attrs(attrs: dict, *also_hidden: str) -> dict:
    """Attributes as the tree shows them: without the storage-level ones."""
    hidden = ("_ARRAY_DIMENSIONS", "_FillValue", *also_hidden)
    return {key: value for key, value in attrs.items() if key not in hidden}
