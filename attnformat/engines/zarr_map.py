"""The Zarr engine's one-map road: consolidated metadata, then the chunks the map touches.

Why this exists: :func:`attnformat.read_map` of one head should cost about one chunk decode, not
the building of a whole DataTree. For a local Zarr v3 directory with consolidated metadata (what
attnformat writes) the root metadata document is read, bounded and screened
(:func:`attnformat.engines.zarr_screen.screen_document`), and the chunks are read and checked by
:mod:`attnformat.engines.zarr_direct` (links refused, chunk manifest, CRC-32C, decoded sizes),
with numpy and numcodecs only: a script that reads one map never imports zarr-python (0.6-0.7 s
here). Anything else (zip, Zarr v2, URLs, no consolidated metadata, CF-encoded variables, codecs
or layouts :mod:`~attnformat.engines.zarr_direct` does not read) answers None and the caller opens
the tree; the result is the same either way (tests check it).
"""

from __future__ import annotations

import xarray as xr

from attnformat.conventions import ATTENTION_VARIABLES, LABEL_COORDS, ROOT_COMPLETENESS, is_site
from attnformat.engines.common import Location
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
    from attnformat.engines.zarr_direct import open_directory

    if location.is_url or not location.path.is_dir():
        return None
    # The store is read through a pinned directory: a writer replacing it meanwhile (an atomic
    # exchange) leaves this read seeing the old version whole.
    store = open_directory(location, screen=False)
    if store is None:
        return None  # the general road explains what is wrong
    return _read_map(store, str(location), site, variable, selection)


def _read_map(store, where_file: str, site: str | None, variable: str, selection: dict) -> xr.DataArray | None:
    groups = store.groups
    sites = sorted(name for name, attrs in groups.items() if name and is_site(attrs))
    if site is None:
        if len(sites) != 1:
            return None  # let the general road explain
        site = sites[0]
    site = site.strip("/")
    target = store.nodes.get(f"{site}/{variable}")
    if site not in sites or target is None or target["node_type"] != "array" or not target["document"].get("dimension_names"):
        return None
    arrays = {name: store.array(f"{site}/{name}") for name in store.members(site)}
    target_array = arrays[variable]
    if target_array is None:
        return None

    where = f"file {where_file}, site {site}"
    dims = target_array.dims
    unknown = [dim for dim in selection if dim not in dims]
    if unknown:
        raise SelectionError(f"{where}: {variable} has no dimension {unknown[0]!r}; dimensions: {', '.join(dims)}")
    coordinate_names = set(target_array.coordinate_names) | set(str(groups[site].get("coordinates", "")).split())
    index_names = [dim for dim in dims if arrays.get(dim) is not None and arrays[dim].dims == (dim,)]
    other_names = [name for name in coordinate_names
                   if arrays.get(name) is not None and name not in index_names and set(arrays[name].dims) <= set(dims)]
    if any(arrays.get(name) is None for name in coordinate_names | set(dims) if name in arrays):
        return None  # a coordinate in a layout only the general readers know

    complete = groups[""].get(ROOT_COMPLETENESS) == "complete"
    values = {name: store.read(arrays[name]) for name in [*index_names, *other_names]}
    index = []
    for dim, size in zip(dims, target_array.shape):
        if dim not in selection:
            index.append(slice(None))
            continue
        label_name = LABEL_COORDS.get(dim)
        labels = values.get(label_name) if label_name in values and arrays[label_name].dims == (dim,) else None
        index.append(position(dim, selection[dim], size=size, index=values.get(dim), labels=labels, where=where))
    data = store.read(target_array, tuple(index), chunks_required=complete and variable in ATTENTION_VARIABLES)
    kept = tuple(dim for dim, item in zip(dims, index) if isinstance(item, slice))
    positions = dict(zip(dims, index))
    coords = {}
    for name in index_names + other_names:
        coord_dims = arrays[name].dims
        taken = tuple(positions.get(dim, slice(None)) for dim in coord_dims)
        coord_values = values[name][taken] if coord_dims else values[name]
        remaining = tuple(dim for dim, item in zip(coord_dims, taken) if isinstance(item, slice))
        coords[name] = xr.Variable(remaining, coord_values, _public_attrs(arrays[name].attributes))
    return xr.DataArray(data, dims=kept, name=variable, attrs=_public_attrs(target_array.attributes, "coordinates"), coords=coords)


def _public_attrs(attrs: dict, *also_hidden: str) -> dict:
    """Attributes as the tree shows them: without the storage-level ones."""
    from attnformat.engines.zarr_manifest import MANIFEST_ATTR

    hidden = ("_ARRAY_DIMENSIONS", "_FillValue", MANIFEST_ATTR, *also_hidden)
    return {key: value for key, value in attrs.items() if key not in hidden}
