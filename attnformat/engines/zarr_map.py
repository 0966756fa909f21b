"""The Zarr engine's one-map road: consolidated metadata, then the chunks the map touches.

Why this exists: :func:`attnformat.read_map` of one head should cost about one chunk decode, not
the building of a whole DataTree. For a local Zarr v3 directory with consolidated metadata (what
attnformat writes) the metadata document is parsed once per distinct text, screened like every
other road (:func:`attnformat.engines.zarr_screen.screen_document`), and the chunks are decoded in
the caller's thread by :mod:`attnformat.engines.zarr_sync`. Anything else (zip, Zarr v2, URLs, no
consolidated metadata, CF-encoded variables, codecs without a synchronous decoder) answers None
and the caller opens the tree; the result is the same either way (a test checks it).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import xarray as xr

from attnformat.conventions import ATTENTION_VARIABLES, LABEL_COORDS, ROOT_COMPLETENESS, is_site
from attnformat.engines.common import Location
from attnformat.engines.placement import pin_directory
from attnformat.errors import SelectionError
from attnformat.resolving import position


def read_map(location: Location, site: str | None, variable: str, selection: dict) -> xr.DataArray | None:
    """One map of a local Zarr v3 directory, labelled; None when this road does not apply.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.engines import Location
    >>> read_map(Location.of(attnformat.example_path("dense")), "encoder/self", "weights", {"layer": 0, "head": 0}).shape
    (6, 6)
    """
    if location.is_url or not location.path.is_dir():
        return None
    # Metadata and chunks are read through a pinned directory: a writer replacing the store
    # meanwhile (an atomic exchange) leaves this read seeing the old version whole.
    descriptor, pinned = pin_directory(location.path)
    try:
        return _read_map(location, Path(pinned), site, variable, selection)
    finally:
        os.close(descriptor)


def _read_map(location: Location, path: Path, site: str | None, variable: str, selection: dict) -> xr.DataArray | None:
    from zarr.storage import LocalStore, StorePath

    from attnformat.engines import zarr_sync
    from attnformat.engines.zarr import CF_ENCODING_ATTRS

    nodes = _consolidated_metadata(path, str(location))
    if nodes is None:
        return None  # the general road explains what is wrong
    sites = sorted(name for name, node in nodes.items() if node["kind"] == "group" and is_site(node["attrs"]))
    if site is None:
        if len(sites) != 1:
            return None  # let the general road explain
        site = sites[0]
    site = site.strip("/")
    target = nodes.get(f"{site}/{variable}")
    if site not in sites or target is None or target["kind"] != "array" or not target.get("dims"):
        return None
    arrays = {name.rpartition("/")[2]: node for name, node in nodes.items() if node["kind"] == "array" and name.rpartition("/")[0] == site}
    if any(key in node["attrs"] for node in arrays.values() for key in CF_ENCODING_ATTRS):
        return None

    where = f"file {location}, site {site}"
    dims = tuple(target["dims"])
    unknown = [dim for dim in selection if dim not in dims]
    if unknown:
        raise SelectionError(f"{where}: {variable} has no dimension {unknown[0]!r}; dimensions: {', '.join(dims)}")
    coordinate_names = set(str(target["attrs"].get("coordinates", "")).split()) | set(str(nodes[site]["attrs"].get("coordinates", "")).split())
    index_names = [dim for dim in dims if dim in arrays and tuple(arrays[dim]["dims"] or ()) == (dim,)]
    other_names = [name for name in coordinate_names if name in arrays and name not in index_names and set(arrays[name]["dims"] or ()) <= set(dims)]

    complete = nodes[""]["attrs"].get(ROOT_COMPLETENESS) == "complete"
    store = LocalStore(path, read_only=True)
    opened = {}
    for name in [variable, *index_names, *other_names]:
        metadata = _array_metadata(arrays[name])
        store_path = StorePath(store, f"{site}/{name}")
        if not zarr_sync.can_read(metadata, store_path):
            return None  # a codec or layout only the general readers know
        opened[name] = (metadata, store_path)
    values = {name: zarr_sync.read_all(*opened[name]) for name in [*index_names, *other_names]}

    shape = dict(zip(dims, opened[variable][0].shape))
    index = []
    for dim in dims:
        if dim not in selection:
            index.append(slice(None))
            continue
        label_name = LABEL_COORDS.get(dim)
        labels = values.get(label_name) if label_name in values and tuple(arrays[label_name]["dims"] or ()) == (dim,) else None
        index.append(position(dim, selection[dim], size=shape[dim], index=values.get(dim), labels=labels, where=where))
    data = zarr_sync.read(*opened[variable], tuple(index), chunks_required=complete and variable in ATTENTION_VARIABLES)
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


def _consolidated_metadata(path: Path, where: str) -> dict[str, dict] | None:
    """Node path -> {"kind", "dims", "attrs", "raw"} from a Zarr v3 store's consolidated
    metadata, or None (no such metadata; the general road then explains)."""
    from attnformat.conventions import MAX_METADATA_DOCUMENT_BYTES

    from attnformat.engines.zarr_screen import open_regular_file

    descriptor = open_regular_file(path / "zarr.json")  # a link is refused [ATTN-STORE-004]
    if descriptor is None:
        return None
    with os.fdopen(descriptor, "rb") as handle:
        raw = handle.read(MAX_METADATA_DOCUMENT_BYTES + 1)
    if len(raw) > MAX_METADATA_DOCUMENT_BYTES:
        return None  # the general road refuses it [ATTN-STORE-006]
    return _parse_consolidated(raw, where)


@lru_cache(maxsize=32)
def _parse_consolidated(raw: bytes, where: str) -> dict[str, dict] | None:
    # A pure function of the metadata's bytes, so the last few results are kept: reading the same
    # file again re-reads the bytes (a changed file parses afresh) but not the JSON. Screening is
    # part of the parse, so a kept result is a screened one. Callers must not change what they get.
    from attnformat.engines.zarr_screen import screen_document

    try:
        document = json.loads(raw)
    except ValueError:
        return None
    consolidated = (document.get("consolidated_metadata") or {}).get("metadata") if isinstance(document, dict) else None
    if not isinstance(consolidated, dict):
        return None
    screen_document(raw, "zarr.json", where)
    nodes = {"": {"kind": "group", "attrs": document.get("attributes", {})}}
    for name, meta in consolidated.items():
        if not isinstance(meta, dict):
            return None
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


def _public_attrs(attrs: dict, *also_hidden: str) -> dict:
    """Attributes as the tree shows them: without the storage-level ones."""
    from attnformat.engines.zarr_manifest import MANIFEST_ATTR

    hidden = ("_ARRAY_DIMENSIONS", "_FillValue", MANIFEST_ATTR, *also_hidden)
    return {key: value for key, value in attrs.items() if key not in hidden}
