"""Zarr engine: a ``.zarr`` directory (format 3 by default, format 2 readable and writable) or a
``.zarr.zip`` archive of one.

Opening builds the DataTree straight from the store's (consolidated) metadata with lazily indexed
arrays, instead of going through ``xarray.open_datatree``: the result is the same tree (a test
checks it), but opening takes a fraction of the time, which matters when a reader wants one head.
Files that use CF encodings attnformat never writes (scale factors, integer fill values, time
units) are handed to ``xarray.open_datatree`` so that they are decoded exactly as xarray would.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import xarray as xr
import zarr
from xarray.backends import BackendArray
from xarray.core import indexing

from attnformat.engines import zarr_sync
from attnformat.errors import BrokenStoreError, UnreadableFileError

# Attributes that ask for CF decoding; a file carrying any of them takes xarray's own path.
CF_ENCODING_ATTRS = ("scale_factor", "add_offset", "_Unsigned", "calendar", "dtype", "missing_value")
# Coordinates up to this many elements are read at open time (labels, masks, edge indices).
_EAGER_COORD_ELEMENTS = 1 << 22


class _LazyZarrArray(BackendArray):
    """Read-on-index view of one zarr array, for xarray's lazy indexing machinery.

    Integer and slice selections of a local Zarr v3 directory are decoded in the caller's thread
    (:mod:`attnformat.engines.zarr_sync`); other selections of numeric arrays of a local store
    (lists of indices) go through TensorStore when it is installed, everything else through
    zarr-python.
    """

    def __init__(self, array: zarr.Array, directory: Path | None = None):
        self.array = array
        self.shape = array.shape
        self.dtype = np.dtype(object) if array.dtype.kind == "T" else array.dtype
        self._direct = directory is not None and zarr_sync.can_read(array.metadata, array.store_path)
        self._spec = tensorstore_spec(array, directory) if directory is not None else None
        self._tensorstore = None

    def __getitem__(self, key):
        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.OUTER, self._read
        )

    def _read(self, key):
        fancy = any(isinstance(k, np.ndarray) for k in key)
        if self._direct and not fancy:
            return zarr_sync.as_object_strings(zarr_sync.read(self.array.metadata, self.array.store_path, key))
        if self._spec is not None:
            if self._tensorstore is None:
                self._tensorstore = open_tensorstore(self._spec).result()
            view = self._tensorstore.oindex[key] if fancy else self._tensorstore[key]
            return view.read().result()
        values = self.array.oindex[key] if fancy else self.array[key]
        return zarr_sync.as_object_strings(np.asarray(values))


_CONTEXT = []


def open_tensorstore(spec: dict):
    """Open a TensorStore array for reading with one shared context (thread pools, caches); a future."""
    import tensorstore

    if not _CONTEXT:
        _CONTEXT.append(tensorstore.Context())
    return tensorstore.open(spec, read=True, context=_CONTEXT[0])


def tensorstore_spec(array: zarr.Array, directory: Path) -> dict | None:
    """TensorStore spec for a numeric array of a local Zarr directory, or None if it cannot read it."""
    try:
        import tensorstore  # noqa: F401 - only asking whether it is there
    except ImportError:
        return None
    if array.dtype.kind not in "biuf":
        return None  # TensorStore has no string type
    driver = "zarr3" if array.metadata.zarr_format == 3 else "zarr"
    return {"driver": driver, "kvstore": {"driver": "file", "path": str(directory / array.path)}}


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


def uses_pickle(metadata: dict) -> bool:
    """True if array metadata (as JSON) names a pickle codec or filter anywhere.

    Examples
    --------
    >>> uses_pickle({"filters": [{"id": "pickle"}]}), uses_pickle({"codecs": [{"name": "bytes"}]})
    (True, False)
    """
    if isinstance(metadata, dict):
        for key in ("id", "name"):
            if isinstance(metadata.get(key), str) and "pickle" in metadata[key].lower():
                return True
        return any(uses_pickle(value) for value in metadata.values())
    if isinstance(metadata, list):
        return any(uses_pickle(value) for value in metadata)
    return False


_METADATA_NAMES = ("zarr.json", ".zarray", ".zmetadata")


# Cheap first look at raw metadata text; only a match is parsed and walked.
_PICKLE_CODEC = re.compile(r'"(?:id|name)"\s*:\s*"[^"]*pickle', re.IGNORECASE)


def mentions_pickle_codec(text: str) -> bool:
    """True if raw metadata text may name a pickle codec (confirm with :func:`uses_pickle`).

    Examples
    --------
    >>> mentions_pickle_codec('{"filters": [{"id": "pickle"}]}'), mentions_pickle_codec('{"note": "no pickle"}')
    (True, False)
    """
    return bool(_PICKLE_CODEC.search(text))


def refuse_pickle(documents, where: str) -> None:
    """Raise BrokenStoreError [ATTN-STORE-003] if any metadata document names a pickle codec.

    ``documents`` yields ``(key, text)`` pairs of the store's metadata files. This runs before
    zarr parses anything: pickle runs code while decoding, and no reader should get that far.
    """
    for key, text in documents:
        if not mentions_pickle_codec(text):
            continue
        try:
            document = json.loads(text)
        except ValueError:
            continue  # zarr reports malformed metadata itself
        if uses_pickle(document):
            node = _pickled_node(document, key)
            raise BrokenStoreError(
                f"{where}: {node} uses a pickle codec [ATTN-STORE-003]; attnformat never unpickles "
                "stored data (it could run code). Store strings as variable-length UTF-8 instead",
                "ATTN-STORE-003",
                location=node,
            )


def _pickled_node(document: dict, key: str) -> str:
    """The node a metadata document describes, or the first pickled entry of a consolidated one."""
    entries = document.get("metadata") or (document.get("consolidated_metadata") or {}).get("metadata") or {}
    for name, entry in entries.items():
        if uses_pickle(entry):
            return "/" + name.removesuffix("/.zarray").removesuffix(".zarray").strip("/")
    return "/" + key.rpartition("/")[0]


def _directory_metadata(path: Path):
    consolidated = False
    for name in ("zarr.json", ".zmetadata"):
        if (path / name).exists():
            text = (path / name).read_text(encoding="utf-8", errors="replace")
            consolidated = consolidated or name == ".zmetadata" or '"consolidated_metadata"' in text
            yield name, text
    if consolidated:
        return  # readers take every node's metadata from the consolidated document
    for directory, subdirectories, files in os.walk(path):
        subdirectories[:] = [d for d in subdirectories if d != "c"]  # Zarr v3 chunk folders
        for name in files:
            if name in _METADATA_NAMES and Path(directory) != path:
                file = Path(directory) / name
                yield file.relative_to(path).as_posix(), file.read_text(encoding="utf-8", errors="replace")


def _zip_metadata(path: Path):
    with zipfile.ZipFile(path) as bundle:
        for name in bundle.namelist():
            if name.rpartition("/")[2] in _METADATA_NAMES:
                yield name, bundle.read(name).decode("utf-8", "replace")


def _needs_cf_decoding(array: zarr.Array) -> bool:
    attrs = array.attrs
    if any(name in attrs for name in CF_ENCODING_ATTRS):
        return True
    units = attrs.get("units")
    if isinstance(units, str) and " since " in units:
        return True
    return "_FillValue" in attrs and array.dtype.kind not in "fcTUSO"


def _consolidated_root(directory: Path) -> zarr.Group | None:
    """The root group of a local Zarr v3 store, read from its consolidated metadata, or None.

    ``zarr.open_group`` does the same through zarr's event loop, probing for Zarr v2 files on the
    way, at about four times the cost (~1 ms), which is most of what opening a small file takes.
    Parsing stays zarr's own (``GroupMetadata.from_dict``); anything unusual goes to
    ``zarr.open_group``, which also explains what is wrong.
    """
    from zarr.core.group import AsyncGroup, GroupMetadata
    from zarr.storage import LocalStore, StorePath

    try:
        document = json.loads((directory / "zarr.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict) or document.get("node_type") != "group" or not document.get("consolidated_metadata"):
        return None
    try:
        metadata = GroupMetadata.from_dict(document)
    except Exception:  # zarr raises its own classes for damaged metadata; open_group reports them
        return None
    return zarr.Group(AsyncGroup(metadata, StorePath(LocalStore(directory, read_only=True))))


def _open_root_group(store, where: str) -> zarr.Group:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return zarr.open_group(store, mode="r", use_consolidated=None)
    except (FileNotFoundError, KeyError, ValueError, TypeError, OSError) as error:
        raise UnreadableFileError(f"{where}: not a readable Zarr store ({error})") from error
    except Exception as error:  # zarr raises its own classes for damaged metadata
        raise UnreadableFileError(f"{where}: not a readable Zarr store ({type(error).__name__}: {error})") from error


def _build_tree(root: zarr.Group, where: str, directory: Path | None = None) -> xr.DataTree | None:
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
    datasets = {path: _build_dataset(layout, loaded, directory) for path, layout in layouts.items()}
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
        coord_names.update(str(attrs.pop("coordinates", "")).split())
        attrs_of[name] = attrs
    coord_names.update(name for name, dims in dims_of.items() if dims == (name,))
    _check_dimension_sizes(arrays, dims_of, where)
    eager = [array for name, array in arrays.items() if name in coord_names and array.size <= _EAGER_COORD_ELEMENTS]
    return {"attrs": group_attrs, "arrays": arrays, "dims": dims_of, "var_attrs": attrs_of, "coords": coord_names, "eager": eager}


def _build_dataset(layout: dict, loaded: dict[str, np.ndarray], directory: Path | None) -> xr.Dataset:
    coords, data_vars = {}, {}
    for name, array in layout["arrays"].items():
        if array.path in loaded:
            data = loaded[array.path]
        else:
            data = indexing.LazilyIndexedArray(_LazyZarrArray(array, directory))
        variable = xr.Variable(layout["dims"][name], data, layout["var_attrs"][name])
        (coords if name in layout["coords"] else data_vars)[name] = variable
    return xr.Dataset(data_vars, coords, attrs=layout["attrs"])


def _read_eagerly(arrays: dict[str, zarr.Array], directory: Path | None) -> dict[str, np.ndarray]:
    """Read small coordinates (keyed by their path in the store) all at once.

    Arrays of a local Zarr v3 directory are decoded right here, one after the other (tens of
    microseconds each); the rest go to zarr's event loop together, in one round trip.
    """
    loaded = {}
    if directory is not None:
        for key, array in arrays.items():
            if zarr_sync.can_read(array.metadata, array.store_path):
                loaded[key] = zarr_sync.read_all(array.metadata, array.store_path)
    remaining = {key: array for key, array in arrays.items() if key not in loaded}
    if not remaining:
        return loaded
    import asyncio

    from zarr.core.sync import sync

    async def read_all():
        # The arrays are already open (from consolidated metadata when there is some); reading
        # them through their async side gathers every read into one trip to zarr's event loop.
        return await asyncio.gather(*(array._async_array.getitem(...) for array in remaining.values()))

    loaded.update({key: zarr_sync.as_object_strings(np.asarray(values)) for key, values in zip(remaining, sync(read_all()))})
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
    """A Zarr store in a directory (``.zarr``)."""

    name = "zarr"

    def open_tree(self, path: Path) -> xr.DataTree:
        refuse_pickle(_directory_metadata(path), str(path))
        return self._open_store(str(path), str(path), directory=path)

    def _open_store(self, store, where: str, directory: Path | None = None) -> xr.DataTree:
        root = (_consolidated_root(directory) if directory is not None else None) or _open_root_group(store, where)
        tree = _build_tree(root, where, directory)
        if tree is None:
            tree = xr.open_datatree(store, engine="zarr", chunks=None)
        return tree

    def write_tree(self, tree: xr.DataTree, path: Path, encoding: dict, zarr_format: int) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree.to_zarr(str(path), mode="w-", zarr_format=zarr_format, consolidated=True, encoding=encoding)


class ZarrZipEngine(ZarrEngine):
    """A Zarr store packed into one zip file (``.zarr.zip``), for sharing.

    Entries sit at the archive's root (``zarr.json`` first), which is what ``zarr.storage.ZipStore``
    reads. Chunks are already compressed, so entries are stored without zip compression.
    """

    name = "zarr-zip"

    def open_tree(self, path: Path) -> xr.DataTree:
        if not zipfile.is_zipfile(path):
            raise UnreadableFileError(f"{path}: not a zip archive")
        refuse_pickle(_zip_metadata(path), str(path))
        store = zarr.storage.ZipStore(str(path), mode="r")
        tree = self._open_store(store, str(path))
        tree.set_close(store.close)
        return tree

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
