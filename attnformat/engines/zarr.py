"""Zarr engine: a ``.zarr`` directory (format 3 by default, format 2 readable and writable) or a
``.zarr.zip`` archive of one.

Opening builds the DataTree straight from the store's (consolidated) metadata with lazily indexed
arrays, instead of going through ``xarray.open_datatree``: the result is the same tree (a test
checks it), but opening takes a fraction of the time, which matters when a reader wants one head.
Files that use CF encodings attnformat never writes (scale factors, integer fill values, time
units) are handed to ``xarray.open_datatree`` so that they are decoded exactly as xarray would.
"""

from __future__ import annotations

import os
import tempfile
import weakref
import warnings
import zipfile
from pathlib import Path

import numpy as np
import xarray as xr
import zarr
from xarray.backends import BackendArray
from xarray.core import indexing

from attnformat.conventions import ATTENTION_VARIABLES, ROOT_COMPLETENESS
from attnformat.engines import zarr_sync
from attnformat.engines.common import Location
from attnformat.engines.placement import pin_directory
from attnformat.engines.remote import zarr_store
from attnformat.engines.zarr_encoding import zarr_variable_encoding
from attnformat.engines.zarr_manifest import MANIFEST_ATTR, seal
from attnformat.engines.zarr_screen import screen_zarr, screened_store, stored_chunks
from attnformat.errors import AttnFormatError, BrokenStoreError, UnreadableFileError

# Attributes that ask for CF decoding; a file carrying any of them takes xarray's own path.
CF_ENCODING_ATTRS = ("scale_factor", "add_offset", "_Unsigned", "calendar", "dtype", "missing_value")
# Coordinates up to this many elements are read at open time (labels, masks, edge indices).
_EAGER_COORD_ELEMENTS = 1 << 22


class _LazyZarrArray(BackendArray):
    """Read-on-index view of one zarr array, for xarray's lazy indexing machinery.

    Every selection (integers, slices, arrays of indices) is read and checked by
    :mod:`attnformat.engines.zarr_sync`, whatever the store (local directory, zip archive, URL)
    and format (Zarr v3 or v2): a damaged chunk raises :class:`BrokenStoreError`
    [ATTN-STORE-005] naming it instead of decoding to garbage. Only layouts it does not read
    (sharding) go through zarr-python, whose failures are reported the same way.

    ``chunks_required`` is for the attention variables of a file that says it is complete: a
    chunk that is not stored is then damage [ATTN-STORE-007], not the fill value. ``directory``
    is kept for callers that pass it; reads no longer depend on it.
    """

    def __init__(self, array: zarr.Array, directory: Path | None = None, *, chunks_required: bool = False):
        self.array = array
        self.shape = array.shape
        self.dtype = np.dtype(object) if array.dtype.kind == "T" else array.dtype
        self._checked = zarr_sync.supports(array.metadata)
        self._chunks_required = chunks_required

    def __reduce__(self):
        # The store reads through a directory pinned by a file descriptor of this process (see
        # placement.pin_directory): in another process that path names something else, or nothing.
        raise AttnFormatError(
            f"{self.array.path}: a lazily opened attention array cannot be sent to another process; "
            "pass the file's path and open it there (or load the values first)")

    def __getitem__(self, key):
        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.OUTER, self._read
        )

    def _read(self, key):
        if self._checked:
            values = zarr_sync.read_outer(self.array.metadata, self.array.store_path, key, chunks_required=self._chunks_required)
            return zarr_sync.as_object_strings(values)
        fancy = any(isinstance(k, np.ndarray) for k in key)
        try:
            values = self.array.oindex[key] if fancy else self.array[key]
        except (AttnFormatError, IndexError, MemoryError):
            raise
        except Exception as error:  # codecs and stores raise many classes for damaged bytes
            raise _damaged(self.array, error) from error
        return zarr_sync.as_object_strings(np.asarray(values))


def _damaged(array: zarr.Array, error: Exception) -> BrokenStoreError:
    """A read of an array zarr-python decoded failed: damage, named by the array's path."""
    return BrokenStoreError(
        f"{array.store_path}: a chunk of /{array.path} cannot be decoded ({type(error).__name__}: "
        f"{str(error).splitlines()[0][:200] if str(error) else 'no details'}) [ATTN-STORE-005]; the store is damaged",
        "ATTN-STORE-005",
        location="/" + array.path,
    )


def _dimension_names(array: zarr.Array, where: str) -> tuple[str, ...]:
    if array.metadata.zarr_format == 3:
        names = array.metadata.dimension_names
    else:
        names = array.attrs.get("_ARRAY_DIMENSIONS")
    if names is None or any(name is None for name in names):
        raise BrokenStoreError(
            f"{where}: array has no dimension names [ATTN-STORE-001]; Zarr v3 arrays need "
            "'dimension_names', Zarr v2 arrays the '_ARRAY_DIMENSIONS' attribute",
            "ATTN-STORE-001",
            location=where.rpartition(":")[2],
        )
    return tuple(names)


def _needs_cf_decoding(array: zarr.Array) -> bool:
    attrs = array.attrs
    if any(name in attrs for name in CF_ENCODING_ATTRS):
        return True
    units = attrs.get("units")
    if isinstance(units, str) and " since " in units:
        return True
    return "_FillValue" in attrs and array.dtype.kind not in "fcTUSO"


def _consolidated_root(directory: Path) -> zarr.Group | None:
    """The root group of a local Zarr v3 store from its consolidated metadata, or None (then
    ``zarr.open_group`` takes over). The root document is read without following a link."""
    from attnformat.conventions import MAX_METADATA_DOCUMENT_BYTES
    from attnformat.engines.zarr_screen import open_regular_file

    descriptor = open_regular_file(directory / "zarr.json")
    if descriptor is None:
        return None
    with os.fdopen(descriptor, "rb") as handle:
        raw = handle.read(MAX_METADATA_DOCUMENT_BYTES + 1)
    if len(raw) > MAX_METADATA_DOCUMENT_BYTES:
        return None  # the screen has refused it already [ATTN-STORE-006]
    return zarr_sync.consolidated_root(directory, raw)


def _open_root_group(store, where: str) -> zarr.Group:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return zarr.open_group(store, mode="r", use_consolidated=None)
    except (FileNotFoundError, KeyError, ValueError, TypeError, OSError) as error:
        raise UnreadableFileError(f"{where}: not a readable Zarr store ({error})") from error
    except Exception as error:  # zarr raises its own classes for damaged metadata
        raise UnreadableFileError(f"{where}: not a readable Zarr store ({type(error).__name__}: {error})") from error


class _Pin:
    """A pinned store directory (:func:`attnformat.engines.placement.pin_directory`), open for as
    long as anything reads through it: every lazy array of the tree holds it, so the directory
    stays pinned after the tree object itself is gone (a streamed copy, a selection)."""

    def __init__(self, descriptor: int, path: str):
        self.path = path
        self.close = weakref.finalize(self, os.close, descriptor)


def _build_tree(root: zarr.Group, where: str, directory: Path | None = None, pin: _Pin | None = None) -> xr.DataTree | None:
    """Build the DataTree from metadata; None when the file needs xarray's CF decoding."""
    groups: dict[str, dict] = {"/": {"attrs": dict(root.attrs), "arrays": {}}}
    try:
        members = list(root.members(max_depth=None))
    except Exception as error:
        raise UnreadableFileError(f"{where}: cannot list the store's contents ({error})") from error
    needs_cf_decoding = False
    for name, node in members:
        parent, _, leaf = name.rpartition("/")
        parent_key = "/" + parent if parent else "/"
        if isinstance(node, zarr.Group):
            groups.setdefault("/" + name, {"attrs": {}, "arrays": {}})["attrs"] = dict(node.attrs)
        else:
            needs_cf_decoding = needs_cf_decoding or _needs_cf_decoding(node)
            groups.setdefault(parent_key, {"attrs": {}, "arrays": {}})["arrays"][leaf] = node
    if needs_cf_decoding:
        return None
    layouts = {path: _group_layout(content["attrs"], content["arrays"], f"{where}:{path}") for path, content in groups.items()}
    eager = {array.path: array for layout in layouts.values() for array in layout["eager"]}
    loaded = _read_eagerly(eager, directory)  # every group's small coordinates in one round trip
    # In a file that says it is complete, a missing chunk of an attention variable is damage
    # [ATTN-STORE-007], not "not captured"; coordinates may leave all-fill chunks unwritten.
    complete = groups["/"]["attrs"].get(ROOT_COMPLETENESS) == "complete"
    datasets = {path: _build_dataset(layout, loaded, directory, complete, pin) for path, layout in layouts.items()}
    return xr.DataTree.from_dict(datasets)


def _group_layout(group_attrs: dict, arrays: dict[str, zarr.Array], where: str) -> dict:
    """Dimensions, attributes and coordinate names of one group's arrays, read from metadata."""
    group_attrs = dict(group_attrs)
    coord_names = set(str(group_attrs.pop("coordinates", "")).split())
    dims_of = {name: _dimension_names(array, f"{where}/{name}") for name, array in arrays.items()}
    attrs_of = {}
    for name, array in arrays.items():
        attrs = dict(array.attrs)
        attrs.pop("_ARRAY_DIMENSIONS", None)
        attrs.pop("_FillValue", None)
        attrs.pop(MANIFEST_ATTR, None)
        coord_names.update(str(attrs.pop("coordinates", "")).split())
        attrs_of[name] = attrs
    coord_names.update(name for name, dims in dims_of.items() if dims == (name,))
    _check_dimension_sizes(arrays, dims_of, where)
    eager = [array for name, array in arrays.items() if name in coord_names and array.size <= _EAGER_COORD_ELEMENTS]
    return {"attrs": group_attrs, "arrays": arrays, "dims": dims_of, "var_attrs": attrs_of, "coords": coord_names, "eager": eager}


def _build_dataset(layout: dict, loaded: dict[str, np.ndarray], directory: Path | None, complete: bool, pin: _Pin | None = None) -> xr.Dataset:
    coords, data_vars = {}, {}
    for name, array in layout["arrays"].items():
        if array.path in loaded:
            data = loaded[array.path]
        else:
            required = complete and name in ATTENTION_VARIABLES
            lazy = _LazyZarrArray(array, directory, chunks_required=required)
            lazy.pin = pin  # the directory stays pinned while this array can be read
            data = indexing.LazilyIndexedArray(lazy)
        variable = xr.Variable(layout["dims"][name], data, layout["var_attrs"][name])
        if array.path not in loaded and array.ndim:
            # As xarray's zarr backend does: attnformat.open(chunks=...) aligns dask chunks with these.
            variable.encoding["preferred_chunks"] = dict(zip(layout["dims"][name], stored_chunk_shape(array)))
        (coords if name in layout["coords"] else data_vars)[name] = variable
    return xr.Dataset(data_vars, coords, attrs=layout["attrs"])


def stored_chunk_shape(array: zarr.Array) -> tuple[int, ...]:
    """The shape of what one read of ``array`` decodes at least: a shard if sharded, else a chunk."""
    shards = getattr(array, "shards", None)
    return tuple(int(size) for size in (shards or array.chunks))


def _read_eagerly(arrays: dict[str, zarr.Array], directory: Path | None) -> dict[str, np.ndarray]:
    """Read small coordinates (keyed by their path in the store) all at once, checked.

    Arrays of a local directory are decoded right here, one after the other (tens of
    microseconds each); the chunks of zip and remote stores are fetched together, in one round
    trip (:func:`attnformat.engines.zarr_sync.read_all_many`). Layouts zarr_sync does not read
    (sharding) go to zarr's event loop together.
    """
    checked = {key: array for key, array in arrays.items() if zarr_sync.supports(array.metadata)}
    values = zarr_sync.read_all_many([(array.metadata, array.store_path) for array in checked.values()])
    loaded = dict(zip(checked, values))
    remaining = {key: array for key, array in arrays.items() if key not in loaded}
    if not remaining:
        return loaded
    values = zarr_sync.read_with_zarr(list(remaining.values()), _damaged)
    loaded.update({key: zarr_sync.as_object_strings(value) for key, value in zip(remaining, values)})
    return {key: loaded[key] for key in arrays}


def _check_dimension_sizes(arrays: dict, dims_of: dict, where: str) -> None:
    sizes: dict[str, tuple[int, str]] = {}
    for name, array in arrays.items():
        for dim, size in zip(dims_of[name], array.shape):
            if dim in sizes and sizes[dim][0] != size:
                other_size, other = sizes[dim]
                raise BrokenStoreError(
                    f"{where}: dimension {dim!r} has size {other_size} in {other!r} but {size} in {name!r} "
                    "[ATTN-STORE-002]; every array of a group must agree on a dimension's size",
                    "ATTN-STORE-002",
                    location=f"{where.rpartition(':')[2]}/{name}",
                )
            sizes.setdefault(dim, (size, name))


class ZarrEngine:
    """A Zarr store in a directory (``.zarr``), local or behind a URL."""

    name = "zarr"

    def screen(self, location: Location) -> None:
        """Refuse unsafe stores before zarr parses anything (see :mod:`attnformat.engines.zarr_screen`)."""
        screen_zarr(location)

    def open_tree(self, location: Location) -> xr.DataTree:
        location = Location.of(location)
        self.screen(location)
        if location.is_url:
            return self._open_store(screened_store(zarr_store(location), str(location)), str(location))
        # Read through a pinned directory: a writer replacing the store meanwhile (an atomic
        # exchange) leaves this tree reading the old version whole (see placement.pin_directory).
        pin = _Pin(*pin_directory(location.path))
        tree = self._open_store(pin.path, str(location), directory=Path(pin.path), pin=pin, unpinned=str(location.path))
        tree.set_close(pin.close)
        return tree

    def _open_store(self, store, where: str, directory: Path | None = None, pin: _Pin | None = None, unpinned=None) -> xr.DataTree:
        try:
            root = (_consolidated_root(directory) if directory is not None else None) or _open_root_group(store, where)
            tree = _build_tree(root, where, directory, pin)
            if tree is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    # xarray's own road (CF decoding) reads through the path itself: its arrays
                    # cannot hold the pin.
                    tree = xr.open_datatree(unpinned or store, engine="zarr", chunks=None)
        except AttnFormatError:
            raise
        except (RecursionError, MemoryError, OverflowError, ValueError, TypeError, KeyError, OSError, ZeroDivisionError) as error:
            # zarr and xarray report damaged metadata with builtin exception classes
            raise UnreadableFileError(f"{where}: not a readable Zarr store ({type(error).__name__}: {error})") from error
        return tree

    def read_map(self, location: Location, site, variable: str, selection: dict):
        """The one-map fast road (see :mod:`attnformat.engines.zarr_map`); None if it does not apply."""
        from attnformat.engines.zarr_map import read_map

        return read_map(Location.of(location), site, variable, selection)

    def stored_chunks(self, location: Location, variable_path: str):
        """``(chunk_shape, stored chunk grid indices)`` of one array, from the store's listing."""
        return stored_chunks(Location.of(location), variable_path)

    def variable_encoding(self, variable: xr.Variable, zarr_format: int = 3) -> dict:
        """Chunks, Blosc compression and a crc32c checksum per chunk (see :mod:`attnformat.engines.zarr_encoding`)."""
        return zarr_variable_encoding(variable, zarr_format)

    def write_tree(self, tree: xr.DataTree, path: Path, encoding: dict, zarr_format: int) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree.to_zarr(str(path), mode="w-", zarr_format=zarr_format, consolidated=True, encoding=encoding)
        seal(path)  # every array's chunk manifest, so chunks cannot swap places unseen


class ZarrZipEngine(ZarrEngine):
    """A Zarr store packed into one zip file (``.zarr.zip``), for sharing.

    Entries sit at the archive's root (``zarr.json`` first), which is what ``zarr.storage.ZipStore``
    reads. Chunks are already compressed, so entries are stored without zip compression.
    """

    name = "zarr-zip"

    def open_tree(self, location: Location) -> xr.DataTree:
        location = Location.of(location)
        self.screen(location)
        store = screened_store(zarr_store(location), str(location))
        tree = self._open_store(store, str(location))
        tree.set_close(store.close)
        return tree

    def read_map(self, location: Location, site, variable: str, selection: dict):
        return None  # the tree road: a zip holds no file to decode in place

    def write_tree(self, tree: xr.DataTree, path: Path, encoding: dict, zarr_format: int) -> None:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".attnformat-") as scratch:
            directory = Path(scratch) / "store.zarr"
            super().write_tree(tree, directory, encoding, zarr_format)
            zip_directory(directory, path)


def zip_directory(directory: Path, archive: Path) -> None:
    """Pack a Zarr directory store into a zip archive readable by ``zarr.storage.ZipStore``."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    with zipfile.ZipFile(archive, "x", compression=zipfile.ZIP_STORED, allowZip64=True) as bundle:
        for file in files:
            bundle.write(file, file.relative_to(directory).as_posix())
