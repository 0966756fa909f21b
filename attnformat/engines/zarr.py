"""Zarr engine: a ``.zarr`` directory (format 3 by default, format 2 readable and writable) or a
``.zarr.zip`` archive of one.

Opening builds the DataTree straight from the store's (consolidated) metadata with lazily indexed
arrays, instead of going through ``xarray.open_datatree``: the result is the same tree (a test
checks it), but opening takes a fraction of the time, which matters when a reader wants one head.
Files that use CF encodings attnformat never writes (scale factors, integer fill values, time
units) are handed to ``xarray.open_datatree`` so that they are decoded exactly as xarray would.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import xarray as xr
import zarr
from xarray.backends import BackendArray
from xarray.core import indexing

from attnformat.errors import MissingDimensionNamesError, UnreadableFileError

# Attributes that ask for CF decoding; a file carrying any of them takes xarray's own path.
_CF_ENCODING_ATTRS = ("scale_factor", "add_offset", "_Unsigned", "calendar", "dtype", "missing_value")
# Coordinates up to this many elements are read at open time (labels, masks, edge indices).
_EAGER_COORD_ELEMENTS = 1 << 22


class _LazyZarrArray(BackendArray):
    """Read-on-index view of one zarr array, for xarray's lazy indexing machinery."""

    def __init__(self, array: zarr.Array):
        self.array = array
        self.shape = array.shape
        self.dtype = np.dtype(object) if array.dtype.kind == "T" else array.dtype

    def __getitem__(self, key):
        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.OUTER, self._read
        )

    def _read(self, key):
        values = self.array.oindex[key] if any(isinstance(k, np.ndarray) for k in key) else self.array[key]
        return _as_object_strings(np.asarray(values))


def _as_object_strings(values: np.ndarray) -> np.ndarray:
    # zarr 3 hands variable-length strings back as numpy StringDType, h5netcdf as object; one
    # dtype for both keeps trees from either engine identical.
    if values.dtype.kind in ("T", "U"):
        return values.astype(object)
    return values


def _dimension_names(array: zarr.Array, where: str) -> tuple[str, ...]:
    if array.metadata.zarr_format == 3:
        names = array.metadata.dimension_names
    else:
        names = array.attrs.get("_ARRAY_DIMENSIONS")
    if names is None or any(name is None for name in names):
        raise MissingDimensionNamesError(
            f"{where}: array has no dimension names [ATTN-STORE-001]; Zarr v3 arrays need "
            "'dimension_names', Zarr v2 arrays the '_ARRAY_DIMENSIONS' attribute",
            location=where.rpartition(":")[2],
        )
    return tuple(names)


def _needs_cf_decoding(array: zarr.Array) -> bool:
    attrs = array.attrs
    if any(name in attrs for name in _CF_ENCODING_ATTRS):
        return True
    units = attrs.get("units")
    if isinstance(units, str) and " since " in units:
        return True
    return "_FillValue" in attrs and array.dtype.kind not in "fcTUSO"


def _open_root_group(store, where: str) -> zarr.Group:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return zarr.open_group(store, mode="r", use_consolidated=None)
    except (FileNotFoundError, KeyError, ValueError, TypeError, OSError) as error:
        raise UnreadableFileError(f"{where}: not a readable Zarr store ({error})") from error
    except Exception as error:  # zarr raises its own classes for damaged metadata
        raise UnreadableFileError(f"{where}: not a readable Zarr store ({type(error).__name__}: {error})") from error


def _build_tree(root: zarr.Group, where: str) -> xr.DataTree | None:
    """Build the DataTree from metadata; None when the file needs xarray's CF decoding."""
    groups: dict[str, dict] = {"/": {"attrs": dict(root.attrs), "arrays": {}}}
    try:
        members = list(root.members(max_depth=None))
    except Exception as error:
        raise UnreadableFileError(f"{where}: cannot list the store's contents ({error})") from error
    for name, node in members:
        parent, _, leaf = name.rpartition("/")
        parent_key = "/" + parent if parent else "/"
        if isinstance(node, zarr.Group):
            groups.setdefault("/" + name, {"attrs": {}, "arrays": {}})["attrs"] = dict(node.attrs)
        else:
            if _needs_cf_decoding(node):
                return None
            groups.setdefault(parent_key, {"attrs": {}, "arrays": {}})["arrays"][leaf] = node
    datasets = {}
    for group_path, content in groups.items():
        datasets[group_path] = _build_dataset(content["attrs"], content["arrays"], f"{where}:{group_path}")
    return xr.DataTree.from_dict(datasets)


def _build_dataset(group_attrs: dict, arrays: dict[str, zarr.Array], where: str) -> xr.Dataset:
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
    coords, data_vars = {}, {}
    for name, array in arrays.items():
        is_coord = name in coord_names
        if is_coord and array.size <= _EAGER_COORD_ELEMENTS:
            data = _as_object_strings(np.asarray(array[...]))
        else:
            data = indexing.LazilyIndexedArray(_LazyZarrArray(array))
        variable = xr.Variable(dims_of[name], data, attrs_of[name])
        (coords if is_coord else data_vars)[name] = variable
    return xr.Dataset(data_vars, coords, attrs=group_attrs)


class ZarrEngine:
    """A Zarr store in a directory (``.zarr``)."""

    name = "zarr"

    def open_tree(self, path: Path) -> xr.DataTree:
        return self._open_store(str(path), str(path))

    def _open_store(self, store, where: str) -> xr.DataTree:
        root = _open_root_group(store, where)
        tree = _build_tree(root, where)
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


def remove_store(path: Path) -> None:
    """Delete a directory store (used for scratch copies only)."""
    shutil.rmtree(path, ignore_errors=True)
