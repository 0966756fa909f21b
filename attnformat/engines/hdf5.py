"""HDF5 engine: netCDF4-compatible files, written through h5netcdf, screened and read through h5py.

The engine answers every storage question about HDF5 files (``.h5``, ``.hdf5``, ``.nc``):

* **Screening** (:mod:`attnformat.engines.hdf5_screen`) runs before h5netcdf or xarray parse
  anything: no external storage, virtual datasets, external/soft links, hard-link cycles or
  plugin filters [ATTN-STORE-004]; declared sizes within bounds [ATTN-STORE-006]. The walk runs in
  a guard process because libhdf5 itself can loop forever on a damaged file.
* **Opening** (local path or URL): the screened file is opened with h5py (a URL through fsspec,
  with ``storage_options``) and handed to xarray's h5netcdf backend, so both roads give the same
  tree; strings come back as Python strings (object dtype) on both. Damage of any kind becomes one
  :class:`~attnformat.errors.UnreadableFileError` naming the file; a chunk that fails its
  checksum, when its values are read, a :class:`~attnformat.errors.BrokenStoreError`
  [ATTN-STORE-005] naming the file, the variable and the chunk.
* **The one-map read** (:meth:`Hdf5Engine.read_map`) goes straight to h5py: the variable's
  dimensions, coordinates and attributes are read the way h5netcdf and xarray read them, the
  selection is resolved by :func:`attnformat.resolving.position`, and only the selected map is
  read. Files that use CF encodings attnformat never writes (scale factors, time units, integer
  fill values...) return None: the caller opens the tree, which decodes them as xarray does.
* **Encoding**: deflate + shuffle + fletcher32 on every numeric array, which every netCDF-C build
  reads without plugins. libhdf5 verifies fletcher32 on every chunk it reads.

What hung, and what was decided (issue 8):

* *One flipped bit hangs every command.* Flipping single bits of the dense example (34 KB, every
  byte of its metadata) found every hang in one place: the global heap collection, where
  variable-length strings and object references live (every string attribute, the labels, the
  DIMENSION_LIST and REFERENCE_LIST attributes of netCDF dimensions). A flipped bit in a heap
  object's length moves libhdf5's parser onto bytes that read as a free-space entry of length
  zero, and ``H5HG`` deserialization spins in place, inside libhdf5 and holding the GIL, on the
  first attribute read (h5py, h5netcdf and xarray all just call it). Global heaps have no checksum in any HDF5
  format version, so no writer setting prevents it. The screen therefore walks the file, reading
  every attribute and string, in a worker process with a stall timeout, and refuses the file
  (ATTN-STORE-006, naming the node) when libhdf5 stops making progress; see
  :mod:`~attnformat.engines.hdf5_screen` (cost: ~0.2 s to start the worker once per process on
  an idle machine, then milliseconds per file, and nothing for a file already screened).
  Other flipped bits end in clean errors: object headers (version 2, written because h5netcdf
  tracks creation order) fail their checksums, chunk data fails fletcher32 or deflate.
* *A hard-link cycle hangs.* xarray's group walk follows it forever (``/a/loop/a/loop/...``);
  the screen refuses any object reachable twice.
* *Checksums.* Newer format versions (superblock v3, checksummed chunk indexes) would need
  xarray's private writer API (``to_netcdf`` does not pass ``libver`` to h5py) and the object
  headers are already checksummed; chunk data is covered by fletcher32. What no HDF5 checksum
  covers is the text in global heaps: a flipped letter of a label or a string attribute reads
  back as another letter.
* *A full disk segfaults.* After a failed write, libhdf5 leaves the file half-closed and h5py
  crashes releasing the next object. The engine writes through a file object that records the
  failure instead of reporting it to libhdf5 (:class:`_FailureRecordingFile`), lets the write
  end cleanly, then raises :class:`~attnformat.errors.WriteFailedError` and removes the file.

netCDF4 has no float16, so float16 variables are stored as float32 (the spec's documented dtype
change); booleans are stored as int8 with xarray's ``dtype: bool`` marker and come back as bool.
"""

from __future__ import annotations

import errno
import io
import itertools
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from xarray.backends import BackendArray
from xarray.core import indexing

from attnformat.engines.common import Location
from attnformat.engines.hdf5_screen import _identity, open_h5py, screen
from attnformat.errors import AttnFormatError, BrokenStoreError, SelectionError, UnreadableFileError, WriteFailedError

#: Compression of numeric arrays: zlib level 4 after byte shuffling (what netCDF-C reads anywhere).
DEFLATE_LEVEL = 4

# Attributes that ask xarray for CF decoding attnformat never writes; a file carrying any of them
# takes the tree road, which decodes it exactly as xarray does.
_CF_ENCODING_ATTRS = ("scale_factor", "add_offset", "_Unsigned", "calendar", "missing_value", "_Encoding")
_TIME_UNITS = ("days", "hours", "minutes", "seconds", "milliseconds", "microseconds", "nanoseconds")
# Attributes h5netcdf keeps out of sight (netCDF's bookkeeping), plus what xarray moves to encoding.
_NETCDF_ATTRS = frozenset(["REFERENCE_LIST", "CLASS", "DIMENSION_LIST", "NAME", "_Netcdf4Dimid", "_Netcdf4Coordinates", "_nc3_strict", "_NCProperties"])
_DIMENSION_ONLY = b"This is a netCDF dimension but not a netCDF variable"
#: Attribute holding the CRC-32 of a string variable's text. No HDF5 checksum covers text (it
#: lives in global heaps), so without it a flipped letter of a label reads back as another letter.
TEXT_CHECKSUM_ATTR = "attnformat_text_crc32"
#: Attribute holding, per chunk of a chunked dataset (C order of the chunk grid), the chunk's
#: fletcher32 trailer (-1 where no chunk is stored). fletcher32 proves a chunk's bytes are the bytes
#: written, not that they were written there: two chunks swapped in the file (with their trailers)
#: both pass. Comparing each chunk's trailer with this list catches that, and chunks that vanish.
CHUNK_TRAILERS_ATTR = "attnformat_chunk_trailers"
# How many chunks of a failed read are tried one by one to name the damaged one.
_CHUNKS_TRIED = 4096


class Hdf5Engine:
    """An HDF5 file that netCDF-C can read (``.h5``, ``.nc``).

    Examples
    --------
    >>> import attnformat, tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.h5"
    >>> _ = attnformat.save(attnformat.examples.build("dense"), path)
    >>> engine = Hdf5Engine()
    >>> engine.read_map(Location.of(path), "encoder/self", "weights", {"layer": 1, "head": 2}).shape
    (6, 6)
    """

    name = "hdf5"
    #: dtypes netCDF4 cannot hold, and what they are stored as.
    #: dtype -> (stored dtype, why): what :func:`attnformat.save` and ``convert`` change and report.
    dtype_changes = {"float16": ("float32", "netCDF4 has no float16")}

    def screen(self, location: Location) -> None:
        """Refuse unsafe or damaged files before anything parses them (:func:`hdf5_screen.screen`)."""
        screen(Location.of(location))

    def open_tree(self, location: Location) -> xr.DataTree:
        """Screen, then open lazily and read-only; strings as object, read errors named.

        Parameters
        ----------
        location
            Local path or URL (with ``storage_options``) of the file.
        """
        location = Location.of(location)
        self.screen(location)
        h5file, close = open_h5py(location)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = xr.open_datatree(h5file, engine="h5netcdf", chunks=None)
            guarded = xr.DataTree.from_dict(
                {node.path: _guarded(node.to_dataset(inherit=False), h5file, str(location), node.path) for node in tree.subtree}
            )
        except AttnFormatError:
            close()
            raise
        except Exception as error:  # h5netcdf and xarray report damage with many classes
            close()
            raise UnreadableFileError(f"{location}: not a readable HDF5/netCDF4 file ({_one_line(error)})") from error
        guarded.set_close(close)
        return guarded

    def read_map(self, location: Location, site: str | None, variable: str, selection: Mapping[str, Any]) -> xr.DataArray | None:
        """The one-map read, with h5py: labelled as ``open(location)[site][variable].sel(...)``.

        Returns None when the file needs CF decoding this road does not reproduce, or when the
        selection is not one label per dimension; the caller then opens the tree.

        Parameters
        ----------
        location
            The file.
        site
            Path of the attention site, or None for the only one.
        variable
            Variable of the site (``"weights"``...).
        selection
            One label (or position) per dimension to select, e.g. ``{"layer": 3, "head": 5}``.
        """
        location = Location.of(location)
        if any(not _is_scalar(value) for value in selection.values()):
            return None
        self.screen(location)
        h5file, close = open_h5py(location)
        try:
            return _read_map(h5file, str(location), site, variable, dict(selection), _identity(location))
        except AttnFormatError:
            raise
        except Exception as error:  # damage found while reading metadata the screen let through
            raise UnreadableFileError(f"{location}: not a readable HDF5/netCDF4 file ({_one_line(error)})") from error
        finally:
            close()

    def stored_chunks(self, location: Location, variable_path: str) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
        """``(chunk_shape, grid indices of the chunks actually stored)`` of one dataset.

        Asked of libhdf5's chunk index, so bounded by what the file stores. A contiguous or
        compact dataset is one chunk of its whole shape, stored when it has storage.

        Examples
        --------
        >>> import attnformat, tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.h5"
        >>> _ = attnformat.save(attnformat.examples.build("dense"), path)
        >>> shape, stored = Hdf5Engine().stored_chunks(Location.of(path), "encoder/self/weights")
        >>> shape[2:], stored[0]
        ((6, 6), (0, 0, 0, 0))
        """
        location = Location.of(location)
        self.screen(location)
        h5file, close = open_h5py(location)
        try:
            dataset = h5file.get(variable_path.strip("/") or "/")
            if dataset is None or not hasattr(dataset, "chunks"):
                raise SelectionError(f"{location}: no array {variable_path!r}")
            dsid = dataset.id
            if dataset.chunks is None:
                stored = [(0,) * dataset.ndim] if dsid.get_storage_size() > 0 else []
                return tuple(dataset.shape), stored
            chunks = tuple(dataset.chunks)
            grid = []

            def add(info):
                grid.append(tuple(offset // size for offset, size in zip(info.chunk_offset, chunks)))

            if hasattr(dsid, "chunk_iter"):
                dsid.chunk_iter(add)
            else:
                for index in range(dsid.get_num_chunks()):
                    add(dsid.get_chunk_info(index))
            return chunks, sorted(grid)
        except AttnFormatError:
            raise
        except Exception as error:
            raise UnreadableFileError(f"{location}: cannot list the chunks of {variable_path} ({_one_line(error)})") from error
        finally:
            close()

    def variable_encoding(self, variable: xr.Variable, zarr_format: int = 3) -> dict:
        """Encoding of one variable for ``to_netcdf(engine="h5netcdf")``.

        Numeric arrays: chunks (maps: :func:`attnformat.encoding.map_chunks`; others: h5py's
        choice), deflate after shuffling, and a fletcher32 checksum on every chunk. Strings and
        scalars: ``{}`` (variable-length strings; no filters).

        Examples
        --------
        >>> import numpy as np, xarray as xr
        >>> weights = xr.Variable(("head", "query", "key"), np.zeros((2, 4, 4), "float32"))
        >>> encoding = Hdf5Engine().variable_encoding(weights)
        >>> encoding["fletcher32"], encoding["chunksizes"][1:]
        (True, (4, 4))
        """
        from attnformat.encoding import is_map, map_chunks

        if variable.dtype.kind in "OUSTV" or variable.ndim == 0 or 0 in variable.shape:
            return {}
        encoding = {"zlib": True, "complevel": DEFLATE_LEVEL, "shuffle": True, "fletcher32": True}
        if is_map(variable.dims):
            encoding["chunksizes"] = tuple(map_chunks(variable.dims, variable.shape))
        return encoding

    def write_tree(self, tree: xr.DataTree, path: Path, encoding: dict, zarr_format: int) -> None:
        """Write ``tree`` to a new file at ``path`` with h5netcdf (netCDF4-compatible).

        A failed write (full disk, file too large, no permission) raises
        :class:`~attnformat.errors.WriteFailedError` naming the path, and the partial file is
        removed. libhdf5 never sees the failure (see :class:`_FailureRecordingFile`): a write
        error inside libhdf5 leaves its file half-closed, and the next object h5py releases
        crashes the process (the segfault of ``convert`` to .h5 on a full disk).
        """
        path = Path(path)
        try:
            raw = open(path, "x+b", buffering=0)
        except OSError as error:
            raise WriteFailedError(f"{path}: cannot create the HDF5 file ({error.strerror or error}); check the directory and permissions") from error
        recorder = _FailureRecordingFile(raw)
        tree = tree.map_over_datasets(_with_text_checksums)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree.to_netcdf(recorder, mode="w", engine="h5netcdf", encoding=encoding, invalid_netcdf=False)
        except AttnFormatError:
            _discard(raw, path)
            raise
        except Exception as error:
            _discard(raw, path)
            if recorder.error is not None:
                raise _write_failed(path, recorder.error) from error
            if isinstance(error, (OSError, RuntimeError)):
                raise WriteFailedError(f"{path}: writing the HDF5 file failed ({_one_line(error)})") from error
            raise
        try:
            raw.close()
        except OSError as error:
            recorder.error = recorder.error or error
        if recorder.error is not None:
            _remove(path)
            raise _write_failed(path, recorder.error) from recorder.error
        try:
            _seal(path)
        except OSError as error:
            _remove(path)
            raise WriteFailedError(f"{path}: recording the chunk trailers failed ({error.strerror or error}); the partial file was removed") from error


class _FailureRecordingFile(io.RawIOBase):
    """A file for h5py's file-object driver that records the first failed write instead of
    reporting it.

    After a failed write libhdf5 unwinds into a state where closing the file fails too, leaving
    objects whose release crashes the process. So libhdf5 is told every write succeeded; writes
    after the first failure are dropped (reads of what was dropped see zeros), the write runs
    to its end and closes cleanly, and :meth:`Hdf5Engine.write_tree` then raises the recorded
    error and removes the file.
    """

    def __init__(self, raw):
        super().__init__()
        self.raw = raw
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self.raw.readinto(buffer)
        if self.error is not None and (count or 0) < len(buffer):
            view = memoryview(buffer).cast("B")
            view[count or 0 :] = bytes(len(view) - (count or 0))
            return len(view)
        return count

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                done = 0
                while done < len(view):
                    written = self.raw.write(view[done:])
                    if not written:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    done += written
            except OSError as error:
                self.error = error
        return len(view)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def truncate(self, size: int | None = None) -> int:
        try:
            return self.raw.truncate(size)
        except OSError as error:
            self.error = self.error or error
            return self.raw.tell() if size is None else size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass  # the engine closes the real file, after the write


def _seal(path: Path) -> None:
    """Record every fletcher32-checked dataset's chunk trailers (:data:`CHUNK_TRAILERS_ATTR`)."""
    import h5py

    with h5py.File(path, "r+") as h5file:
        datasets = []
        h5file.visititems(lambda name, obj: datasets.append(obj) if isinstance(obj, h5py.Dataset) and obj.chunks and obj.fletcher32 else None)
        for dataset in datasets:
            dataset.attrs[CHUNK_TRAILERS_ATTR] = np.array([_trailer(dataset, grid) for grid in np.ndindex(*_grid_shape(dataset))], dtype=np.int64)


def _grid_shape(dataset) -> tuple[int, ...]:
    return tuple(-(-size // chunk) for size, chunk in zip(dataset.shape, dataset.chunks))


def _trailer(dataset, grid: tuple[int, ...]) -> int:
    """The stored chunk's last 4 bytes (its fletcher32) as an integer, or -1 if not stored."""
    offset = tuple(index * chunk for index, chunk in zip(grid, dataset.chunks))
    info = dataset.id.get_chunk_info_by_coord(offset)
    if info.byte_offset is None or not info.size:
        return -1
    raw = dataset.id.read_direct_chunk(offset)[1]
    return int.from_bytes(bytes(raw[-4:]), "little")


def _check_trailers(dataset, key, where: str) -> None:
    """Raise [ATTN-STORE-005/007] if a chunk read at ``key`` is not the one recorded there."""
    if CHUNK_TRAILERS_ATTR not in dataset.attrs or not dataset.chunks:
        return  # written before chunk trailers were recorded (format 1.0), or not chunked
    recorded = np.asarray(dataset.attrs[CHUNK_TRAILERS_ATTR]).ravel()
    grid_shape = _grid_shape(dataset)
    if recorded.size != int(np.prod(grid_shape)):
        raise BrokenStoreError(f"{where}: the chunk list of {dataset.name} does not fit its shape [ATTN-STORE-005]; the file is damaged", "ATTN-STORE-005", location=dataset.name)
    for grid in itertools.islice(_touched_chunks(dataset, key), _CHUNKS_TRIED):
        expected = int(recorded[np.ravel_multi_index(grid, grid_shape)])
        found = _trailer(dataset, grid)
        if found == expected:
            continue
        if found == -1:
            raise BrokenStoreError(f"{where}: chunk {grid} of {dataset.name} is missing [ATTN-STORE-007]; the file was damaged", "ATTN-STORE-007", location=dataset.name)
        raise BrokenStoreError(
            f"{where}: chunk {grid} of {dataset.name} holds bytes written for another place, or damaged ones [ATTN-STORE-005]; "
            "restore the file from a copy",
            "ATTN-STORE-005",
            location=dataset.name,
        )


def _write_failed(path: Path, error: OSError) -> WriteFailedError:
    reason = error.strerror or str(error)
    return WriteFailedError(f"{path}: writing the HDF5 file failed ({reason}); the partial file was removed. Free some space or choose another place")


def _discard(raw, path: Path) -> None:
    try:
        raw.close()
    except OSError:
        pass
    _remove(path)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def text_checksum(values) -> int:
    """CRC-32 of an array of strings: each string's UTF-8 bytes, length-prefixed, in C order.

    Examples
    --------
    >>> text_checksum(["[CLS]", "cat"]) == text_checksum(["[CLS]", "cat"]), text_checksum(["a", "b"]) == text_checksum(["ab", ""])
    (True, False)
    """
    import zlib

    checksum = 0
    for text in np.asarray(values, dtype=object).ravel():
        encoded = str(text).encode("utf-8", "surrogatepass")
        checksum = zlib.crc32(len(encoded).to_bytes(8, "little") + encoded, checksum)
    return checksum


def _with_text_checksums(dataset: xr.Dataset) -> xr.Dataset:
    """Every string variable gets the CRC-32 of its text as an attribute (checked on read)."""
    changed = {}
    for name, variable in dataset.variables.items():
        if variable.dtype.kind in "OUT":
            values = variable.values
            changed[name] = variable.copy(deep=False)
            changed[name].attrs = {**variable.attrs, TEXT_CHECKSUM_ATTR: np.int64(text_checksum(values))}
    if not changed:
        return dataset
    return dataset.assign_coords({n: v for n, v in changed.items() if n in dataset.coords}).assign(
        {n: v for n, v in changed.items() if n in dataset.data_vars}
    )


def _verify_text(values, attrs: dict, where: str, name: str) -> None:
    """Raise [ATTN-STORE-005] if a string variable's text does not match its stored CRC-32."""
    if TEXT_CHECKSUM_ATTR not in attrs:
        return  # written before checksums (format 1.0)
    stored = int(np.asarray(attrs[TEXT_CHECKSUM_ATTR]).ravel()[0])
    if text_checksum(values) != stored:
        raise BrokenStoreError(
            f"{where}: the text of {name} does not match its checksum [ATTN-STORE-005]; a label or "
            "string is damaged. Restore the file from a copy",
            "ATTN-STORE-005",
            location=name,
        )


def _is_scalar(value) -> bool:
    return isinstance(value, (str, bytes, int, float, np.generic)) and not isinstance(value, bool)


# -- reading values with damage named -----------------------------------------------------------


class _GuardedArray(BackendArray):
    """A lazily indexed view of one variable of an opened tree whose read errors are named.

    h5py reports a chunk failing its fletcher32 checksum (or its deflate stream) as a bare
    ``OSError: Can't synchronously read data``; this names the file, the variable and the chunk
    and raises :class:`BrokenStoreError` [ATTN-STORE-005]. Fixed-width strings become objects.
    """

    def __init__(self, variable: xr.Variable, h5file, where: str, node: str):
        self.variable = variable
        self.shape = variable.shape
        self.dtype = np.dtype(object) if variable.dtype.kind == "U" else variable.dtype
        self.h5file = h5file
        self.where = where
        self.node = node
        self.checked = False  # set when the dataset records its chunk trailers

    def __getitem__(self, key):
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.OUTER, self._read)

    def _read(self, key):
        try:
            values = np.asarray(self.variable[key].values)
        except AttnFormatError:
            raise
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as error:
            raise _read_error(self.h5file, self.where, self.node, key, error) from error
        if self.checked:
            dataset = _find_dataset(self.h5file, self.node)
            if dataset is not None:
                _check_trailers(dataset, key, self.where)
        return values.astype(object) if values.dtype.kind == "U" else values


def _guarded(dataset: xr.Dataset, h5file, where: str, node: str) -> xr.Dataset:
    """The dataset with every lazily read variable guarded (index coordinates are in memory)."""
    node = node.rstrip("/")
    replaced = {}
    for name, variable in dataset.variables.items():
        if TEXT_CHECKSUM_ATTR in variable.attrs:
            # Text is small (labels): read it now and check it against its checksum.
            try:
                values = np.asarray(variable.values).astype(object)
            except (OSError, RuntimeError, ValueError, KeyError, TypeError) as error:
                raise UnreadableFileError(f"{where}: cannot read {node}/{name} ({_one_line(error)}); the file is damaged") from error
            _verify_text(values, variable.attrs, where, f"{node}/{name}")
            attrs = {key: value for key, value in variable.attrs.items() if key != TEXT_CHECKSUM_ATTR}
            replaced[name] = xr.Variable(variable.dims, values, attrs, variable.encoding)
            continue
        if name in dataset.indexes:
            # Index coordinates are in memory already (small; fletcher32 checked them on read).
            if variable.dtype.kind == "U" or CHUNK_TRAILERS_ATTR in variable.attrs:
                index = variable.astype(object) if variable.dtype.kind == "U" else variable.copy(deep=False)
                index.attrs = {key: value for key, value in variable.attrs.items() if key != CHUNK_TRAILERS_ATTR}
                replaced[name] = index
            continue
        guarded = _GuardedArray(variable, h5file, where, f"{node}/{name}")
        guarded.checked = CHUNK_TRAILERS_ATTR in variable.attrs
        attrs = {key: value for key, value in variable.attrs.items() if key != CHUNK_TRAILERS_ATTR}
        replaced[name] = xr.Variable(variable.dims, indexing.LazilyIndexedArray(guarded), attrs, variable.encoding)
    return dataset.assign_coords({name: value for name, value in replaced.items() if name in dataset.coords}).assign(
        {name: value for name, value in replaced.items() if name in dataset.data_vars}
    )


def _read_error(h5file, where: str, name: str, key, error: Exception) -> AttnFormatError:
    """The error to raise for a failed read of ``name`` at ``key``: the damaged chunk if found."""
    dataset = _find_dataset(h5file, name)
    if dataset is None or dataset.chunks is None:
        return UnreadableFileError(f"{where}: cannot read {name} ({_one_line(error)}); the file is damaged")
    chunk = _failing_chunk(dataset, key)
    at = f"chunk {chunk} of {dataset.name}" if chunk is not None else f"{dataset.name}"
    return BrokenStoreError(
        f"{where}: {at} does not decode: its checksum or compressed data is damaged [ATTN-STORE-005]; "
        "restore the file from a copy",
        "ATTN-STORE-005",
        location=dataset.name,
    )


def _find_dataset(h5file, name: str):
    """The h5py dataset for a variable name (a path, or a bare name found anywhere)."""
    try:
        if "/" in name:
            found = h5file.get(name)
            return found if hasattr(found, "chunks") else None
        matches = []
        h5file.visititems(lambda path, obj: matches.append(obj) if path.rsplit("/", 1)[-1] == name and hasattr(obj, "chunks") else None)
        return matches[0] if len(matches) == 1 else None
    except Exception:  # the file is damaged; the caller reports without the chunk
        return None


def _touched_chunks(dataset, key):
    """Grid indices of the chunks a selection ``key`` touches (lazily, in C order)."""
    ranges = []
    for item, size, chunk in zip(_as_tuple(key, dataset.ndim), dataset.shape, dataset.chunks):
        if isinstance(item, (int, np.integer)):
            ranges.append([(int(item) % max(size, 1)) // chunk])
        elif isinstance(item, slice):
            start, stop, step = item.indices(size)
            ranges.append(range(start // chunk, -(-stop // chunk)) if step == 1 else sorted({p // chunk for p in range(start, stop, step)}))
        else:
            ranges.append(sorted({int(p) // chunk for p in np.asarray(item).ravel().tolist()}))
    return itertools.product(*ranges)


def _failing_chunk(dataset, key) -> tuple[int, ...] | None:
    """Grid index of the first chunk touched by ``key`` that fails to read (a bounded search)."""
    for grid in itertools.islice(_touched_chunks(dataset, key), _CHUNKS_TRIED):
        region = tuple(slice(index * chunk, min((index + 1) * chunk, size)) for index, chunk, size in zip(grid, dataset.chunks, dataset.shape))
        try:
            dataset[region]
        except Exception:  # this chunk is the damaged one
            return tuple(int(index) for index in grid)
    return None


def _as_tuple(key, ndim: int) -> tuple:
    key = key if isinstance(key, tuple) else (key,)
    return key + (slice(None),) * (ndim - len(key))


# -- the one-map read ---------------------------------------------------------------------------


def _attributes(h5obj) -> dict:
    """Attributes as h5netcdf decodes them (strings, one-element arrays as scalars), without
    netCDF's bookkeeping attributes."""
    import h5netcdf.attrs
    import h5py

    decoded = h5netcdf.attrs.Attributes(h5obj.attrs, lambda dtype: None, h5py)
    return {name: decoded[name] for name in h5obj.attrs if name not in _NETCDF_ATTRS}


def _needs_cf_decoding(attrs: dict, dtype: np.dtype) -> bool:
    if any(name in attrs for name in _CF_ENCODING_ATTRS):
        return True
    units = attrs.get("units")
    if isinstance(units, str) and (" since " in units or units.strip().lower() in _TIME_UNITS):
        return True
    if "dtype" in attrs and not (attrs["dtype"] == "bool" and dtype == np.int8):
        return True
    if "_FillValue" in attrs:
        fill = np.asarray(attrs["_FillValue"])
        if dtype.kind != "f" or fill.size != 1 or not np.isnan(fill.astype(float)).all():
            return True  # xarray would mask (and for integers, convert to float)
    return False


def _dimension_names(h5file, dataset, attrs_present) -> tuple[str, ...] | None:
    """The netCDF dimensions of a dataset, as h5netcdf finds them; None if unusual."""
    if "CLASS" in attrs_present:  # a dimension scale: its own dimension
        return (dataset.name.rsplit("/", 1)[-1],) if dataset.ndim == 1 else None
    if dataset.ndim == 0:
        return ()
    if "DIMENSION_LIST" not in attrs_present:
        return None
    names = []
    for references in dataset.attrs["DIMENSION_LIST"]:
        references = list(references)
        if not references:
            return None
        names.append(h5file[references[-1]].name.rsplit("/", 1)[-1])
    return tuple(names)


def _values(dataset, key=()) -> np.ndarray:
    import h5py

    if h5py.check_string_dtype(dataset.dtype) is not None:
        values = dataset.asstr()[key]
        return np.asarray(values, dtype=object)
    return np.asarray(dataset[key])


# Plans of recent one-map reads, per (file identity, site, variable): the layout and the small
# coordinates do not change while the file does not, so reading many maps of one file parses its
# metadata once. Coordinate values handed out are copies; the plan itself is never changed.
_PLANS: dict[tuple, dict | None] = {}
_PLANS_LIMIT = 64


def _read_map(h5file, where: str, site: str | None, variable: str, selection: dict, identity: tuple | None = None) -> xr.DataArray | None:
    from attnformat.resolving import position

    key = None if identity is None else (identity, site, variable)
    if key is not None and key in _PLANS:
        plan = _PLANS[key]
    else:
        plan = _plan(h5file, site, variable)
        if key is not None:
            if len(_PLANS) >= _PLANS_LIMIT:
                _PLANS.clear()
            _PLANS[key] = plan
    if plan is None:
        return None
    dims = plan["dims"]
    where = f"file {where}, site {plan['site']}"
    unknown = [dim for dim in selection if dim not in dims]
    if unknown:
        raise SelectionError(f"{where}: {variable} has no dimension {unknown[0]!r}; dimensions: {', '.join(dims)}")
    index = []
    for dim, size in zip(dims, plan["shape"]):
        if dim not in selection:
            index.append(slice(None))
            continue
        own, labels = plan["lookup"][dim]
        index.append(position(dim, selection[dim], size=size, index=own, labels=labels, where=where))
    read_key = tuple(index)
    target = h5file[plan["path"]]
    try:
        data = _decoded(plan["is_bool"], _values(target, read_key))
    except (OSError, RuntimeError, ValueError) as error:
        raise _read_error(h5file, where, target.name, read_key, error) from error
    _check_trailers(target, read_key, where)
    positions = dict(zip(dims, index))
    coords = {}
    for name, coord_dims, attrs, values in plan["coords"]:
        taken = tuple(positions.get(dim, slice(None)) for dim in coord_dims)
        kept = tuple(dim for dim, item in zip(coord_dims, taken) if isinstance(item, slice))
        coords[name] = xr.Variable(kept, np.array(values[taken] if coord_dims else values), dict(attrs))
    kept_dims = tuple(dim for dim, item in zip(dims, index) if isinstance(item, slice))
    # Through Coordinates: a dict of coordinates (or a Dataset) is deep-copied element by element
    # for object (string) coordinates, ~10x the cost of the whole read at 512 tokens.
    return xr.DataArray(xr.Variable(kept_dims, data, dict(plan["attrs"])), coords=xr.Coordinates(coords), name=variable)


def _plan(h5file, site: str | None, variable: str) -> dict | None:
    """What a one-map read of ``variable`` needs, read once: its dimensions, attributes,
    coordinates (with values) and the values that labels resolve against; None when the read
    must take the tree road."""
    import h5py

    from attnformat.conventions import LABEL_COORDS, is_site

    if site is None:
        sites = []
        h5file.visititems(lambda path, obj: sites.append(path) if isinstance(obj, h5py.Group) and is_site(_attributes(obj)) else None)
        if len(sites) != 1:
            return None  # the tree road explains which sites there are
        site = sites[0]
    site = site.strip("/")
    group = h5file.get(site) if site else h5file
    if not isinstance(group, h5py.Group) or not is_site(_attributes(group)):
        return None
    # Coordinates inherited from parent groups would join the map; attnformat never writes them.
    ancestor = group
    while ancestor.name != "/":
        ancestor = ancestor.parent
        if any(isinstance(member, h5py.Dataset) and not _is_dimension_only(member) for member in ancestor.values()):
            return None
    members = {}
    for name, member in group.items():
        if not isinstance(member, h5py.Dataset):
            continue
        if name.startswith("_nc4_non_coord_"):
            return None
        if not _is_dimension_only(member):
            members[name] = member
    target = members.get(variable)
    if target is None:
        return None

    # Dimensions, attributes and coordinate names of every variable of the group, as xarray's
    # decoding sees them: names in any ``coordinates`` attribute (and the group's) are coordinates.
    coordinate_names = set(str(_attributes(group).get("coordinates", "")).split())
    layout = {}
    for name, member in members.items():
        present = set(member.attrs)
        attrs = _attributes(member)
        if _needs_cf_decoding(attrs, member.dtype):
            return None
        if member.dtype.kind == "S" or (member.dtype.kind == "O" and h5py.check_string_dtype(member.dtype) is None):
            return None  # fixed-width bytes or other variable-length types: xarray's own decoding
        member_dims = _dimension_names(h5file, member, present)
        if member_dims is None:
            return None
        coordinate_names.update(str(attrs.get("coordinates", "")).split())
        layout[name] = (member, member_dims, attrs, "CLASS" in present)
    dims = layout[variable][1]
    coords = []
    values = {}
    for name, (member, coord_dims, attrs, is_scale) in layout.items():
        if name != variable and (is_scale or name in coordinate_names) and set(coord_dims) <= set(dims):
            values[name] = _decoded(_is_bool(attrs, member), _values(member))
            if values[name].dtype == object:
                _verify_text(values[name], attrs, h5file.filename, member.name)
            coords.append((name, coord_dims, _public(attrs), values[name]))
    lookup = {}
    for dim in dims:
        own = values.get(dim) if dim in values and layout[dim][1] == (dim,) else None
        label_name = LABEL_COORDS.get(dim)
        labels = values.get(label_name) if label_name in values and layout[label_name][1] == (dim,) else None
        lookup[dim] = (own, labels)
    return {
        "site": site,
        "path": target.name,
        "dims": dims,
        "shape": target.shape,
        "attrs": _public(layout[variable][2]),
        "is_bool": _is_bool(layout[variable][2], target),
        "coords": coords,
        "lookup": lookup,
    }


def _is_bool(attrs: dict, dataset) -> bool:
    return attrs.get("dtype") == "bool" and dataset.dtype == np.int8


def _is_dimension_only(dataset) -> bool:
    name = dataset.attrs.get("NAME") if "NAME" in dataset.attrs else None
    return isinstance(name, (bytes, np.bytes_)) and bytes(name).startswith(_DIMENSION_ONLY)


def _decoded(is_bool: bool, values: np.ndarray) -> np.ndarray:
    return values.astype(bool) if is_bool else values


def _public(attrs: dict) -> dict:
    """Attributes as xarray shows them: without what its decoding moves into ``encoding``."""
    hidden = {"_FillValue", "coordinates", TEXT_CHECKSUM_ATTR, CHUNK_TRAILERS_ATTR}
    if attrs.get("dtype") == "bool":
        hidden.add("dtype")
    return {name: value for name, value in attrs.items() if name not in hidden}
