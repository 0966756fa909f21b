"""The streaming writer's store: a Zarr directory written node by node, region by region.

:class:`attnformat.Writer` decides what goes where (sites, variables, coordinates, which map a
``write`` lands in); this module is the only part of it that knows the store is Zarr. Numeric
regions are written through TensorStore when it is installed and can write the array (Zarr v3),
otherwise through zarr-python; both write each chunk to a temporary file and rename it into
place, so a killed process leaves every chunk either as it was or as it was written, never torn.
A write that covers only part of a chunk (small maps are grouped into one chunk, see
:func:`attnformat.encoding.map_chunks`) reads the chunk, merges and writes it back: writes are
applied one at a time, in order (at most one in flight with ``write_behind``), so merging is safe.

Every failure of the storage is raised as :class:`~attnformat.errors.WriteFailedError` naming
the store (a full disk, a file-size limit, no permission); misuse (a node that exists, a bad
name) as :class:`~attnformat.errors.WriterError`.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr

from attnformat.engines.zarr_encoding import zarr_codecs
from attnformat.errors import WriteFailedError, WriterError

# Names that a Zarr store (v2 or v3) gives a meaning of its own, or that a path cannot hold.
_RESERVED_NAMES = {"zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata", "c", ".", ".."}
_BAD_CHARACTERS = re.compile(r"[\x00-\x1f\x7f\\]")


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a group or array (one path component), or None if it can.

    Parameters
    ----------
    name
        One component of a node path (no ``/``).

    Examples
    --------
    >>> name_problem("self"), name_problem("zarr.json")
    (None, "'zarr.json' is a name the storage reserves")
    """
    if not isinstance(name, str) or not name:
        return "names must be non-empty strings"
    if "/" in name:
        return f"{name!r} holds '/'"
    if name in _RESERVED_NAMES or name.startswith(".z") or name.startswith("__"):
        return f"{name!r} is a name the storage reserves"
    if _BAD_CHARACTERS.search(name):
        return f"{name!r} holds a control character or a backslash"
    if name != name.strip():
        return f"{name!r} starts or ends with white space"
    return None


def check_node_path(path: str, where: str) -> str:
    """Return ``path`` (a group path such as ``"encoder/self"``, one leading ``/`` allowed) or
    raise :class:`WriterError` saying what is wrong with it.

    Parameters
    ----------
    path
        The path to check.
    where
        What the message names (the file).

    Examples
    --------
    >>> check_node_path("/encoder/self", "x.zarr")
    'encoder/self'
    >>> check_node_path("a//b", "x.zarr")
    Traceback (most recent call last):
    ...
    attnformat.errors.WriterError: x.zarr: cannot name a site 'a//b': an empty component (leading, trailing or doubled '/'); use names like 'encoder/self'
    """
    if not isinstance(path, str):
        raise WriterError(f"{where}: a site name must be a string, not {type(path).__name__}")
    inner = path[1:] if path.startswith("/") else path
    parts = inner.split("/")
    if any(part == "" for part in parts):
        raise WriterError(f"{where}: cannot name a site {path!r}: an empty component (leading, trailing or doubled '/'); use names like 'encoder/self'")
    for part in parts:
        problem = name_problem(part)
        if problem:
            raise WriterError(f"{where}: cannot name a site {path!r}: {problem}; use names like 'encoder/self'")
    return inner


class StreamingStore:
    """A Zarr directory store that the streaming writer fills one region at a time.

    Nodes are named by their path in the store (``"encoder/self"``, ``"encoder/self/weights"``;
    ``""`` is the root). The store is created new: an existing path is an error, never removed.

    Parameters
    ----------
    path
        The directory to create.
    zarr_format
        3 (default) or 2.
    attrs
        The root group's attributes.
    write_behind
        Let :meth:`write` return while its region is still being compressed and stored (at most
        one write in flight; :meth:`flush` waits for it).

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib, zarr
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.partial.zarr"
    >>> store = StreamingStore(path, attrs={"title": "demo"})
    >>> store.create_group("self", {"layout": "dense"})
    >>> store.create_array("self/weights", shape=(2, 3, 3), dims=("head", "query", "key"), dtype="float32",
    ...                    fill_value=np.nan, chunks=(2, 3, 3))
    >>> store.write("self/weights", (1, slice(None), slice(None)), np.eye(3), "head 1")
    >>> store.finish()
    >>> zarr.open_array(path / "self" / "weights")[1].tolist() == np.eye(3).tolist()
    True
    """

    def __init__(self, path: str | os.PathLike, *, zarr_format: int = 3, attrs: Mapping | None = None, write_behind: bool = False):
        self.path = Path(path)
        self.zarr_format = zarr_format
        self.write_behind = write_behind
        #: True once a write failed: the store is then left as it is (incomplete), never finished.
        self.failed = False
        self._arrays: dict[str, zarr.Array] = {}
        self._groups: dict[str, zarr.Group] = {}
        self._tensorstores: dict[str, object] = {}
        self._pending: tuple[Future, str] | None = None
        # With write-behind, the copy of the values in flight. Reused from write to write (each
        # write waits for the previous one first): a fresh copy of a 768 MB dense layer paid a page
        # fault per 4 KiB, while the background thread compressed the previous layer.
        self._staging: np.ndarray | None = None
        self._executor: ThreadPoolExecutor | None = None
        with self._failing_as("creating the store"):
            self._groups[""] = zarr.open_group(str(self.path), mode="w-", zarr_format=zarr_format, attributes=dict(attrs or {}))

    # -- nodes -------------------------------------------------------------------------------
    def create_group(self, name: str, attrs: Mapping | None = None) -> None:
        """Create the group ``name`` and its parents (those that exist are kept), with ``attrs``."""
        group = self._groups[""]
        with self._failing_as(f"creating group {name!r}"):
            for part in name.split("/"):
                group = group.require_group(part)
            if attrs:
                group.attrs.update(dict(attrs))
        self._groups[name] = group

    def create_array(
        self,
        name: str,
        *,
        shape: Sequence[int],
        dims: Sequence[str],
        dtype,
        fill_value=None,
        chunks: Sequence[int] | None = None,
        attrs: Mapping | None = None,
        bit_rounded: bool = False,
    ) -> None:
        """Create array ``name`` (its group must exist) with dimension names, attributes, chunks and
        the engine's encoding (Blosc and a checksum per chunk for numbers; ``dtype=str`` for
        variable-length strings). Chunks default to the whole array."""
        parent, _, leaf = name.rpartition("/")
        attrs = dict(attrs or {})
        kwargs = {}
        if self.zarr_format == 3:
            kwargs["dimension_names"] = tuple(dims)
        else:
            attrs["_ARRAY_DIMENSIONS"] = list(dims)
        if dtype is not str:
            kwargs.update(zarr_codecs(self.zarr_format, bit_rounded=bit_rounded))
        chunk_shape = tuple(max(1, int(c)) for c in (chunks or shape)) or None
        with self._failing_as(f"creating array {name!r}"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zarr warns about v2 string dtypes and unstable specs
            self._arrays[name] = self._group(parent).create_array(
                leaf, shape=tuple(shape), chunks=chunk_shape, dtype=dtype, fill_value=fill_value, attributes=attrs,
                config={"write_empty_chunks": True}, **kwargs,
            )

    def rechunk(self, name: str, chunks: Sequence[int]) -> None:
        """Give array ``name`` another chunk shape; only before anything is written to it."""
        self.flush()
        array = self._arrays[name]
        chunks = tuple(max(1, int(c)) for c in chunks)
        if tuple(array.chunks) == chunks:
            return
        parent, _, leaf = name.rpartition("/")
        metadata = array.metadata
        kwargs = {"dimension_names": metadata.dimension_names} if self.zarr_format == 3 else {"filters": metadata.filters}
        with self._failing_as(f"re-creating array {name!r}"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._arrays[name] = self._group(parent).create_array(
                leaf, shape=array.shape, chunks=chunks, dtype=array.dtype, fill_value=array.fill_value,
                attributes=dict(array.attrs), compressors=array.compressors, config={"write_empty_chunks": True},
                overwrite=True, **kwargs,
            )
        self._tensorstores.pop(name, None)

    def set_attrs(self, name: str, attrs: Mapping, *, remove: Sequence[str] = ()) -> None:
        """Update the attributes of node ``name`` (``""``: the root), removing the keys in ``remove``."""
        node = self._arrays[name] if name in self._arrays else self._group(name)
        with self._failing_as(f"writing the attributes of {name or '/'!r}"):
            if attrs:
                node.attrs.update(dict(attrs))
            for key in remove:
                if key in node.attrs:
                    del node.attrs[key]

    # -- values ------------------------------------------------------------------------------
    def write_all(self, name: str, values) -> None:
        """Write a whole (small) array at once, strings included; waits until it is stored."""
        self.flush()
        values = np.asarray(values)
        with self._failing_as(f"writing {name!r}"):
            self._arrays[name][...] = values.astype(object) if values.dtype.kind in "OUT" else values

    def write(self, name: str, region: tuple, values: np.ndarray, where: str) -> None:
        """Write ``values`` into ``array[region]``; ``where`` names the write in error messages.

        Without ``write_behind`` the values are stored when this returns; with it, this returns
        once the previous write is stored and this one is under way (a failure is raised by the
        next call or by :meth:`flush`).
        """
        self.flush()
        dtype = self._arrays[name].dtype
        if self.write_behind:
            # The values are copied: the caller may reuse its buffer meanwhile.
            values = self._staged(values, dtype)
        else:
            values = np.asarray(values, dtype=dtype)
        handle = self._tensorstore(name)
        if handle is not None:
            try:
                future = handle[region].write(values)
            except Exception as error:
                raise self._failure(f"writing {where}", error) from error
        else:
            array = self._arrays[name]
            if self._executor is None and self.write_behind:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attnformat-write")
            if self.write_behind:
                future = self._executor.submit(array.__setitem__, region, values)
            else:
                with self._failing_as(f"writing {where}"):
                    array[region] = values
                return
        self._pending = (future, where)
        if not self.write_behind:
            self.flush()

    def resize(self, name: str, shape: Sequence[int]) -> None:
        """Change the shape of array ``name`` (growing a dimension); chunks written stay."""
        self.flush()  # no write may be in flight while an array changes shape
        with self._failing_as(f"resizing {name!r}"):
            self._arrays[name].resize(tuple(shape))
        self._tensorstores.pop(name, None)  # reopened with the new shape

    def flush(self) -> None:
        """Wait until the write in flight (if any) is stored; raise its failure."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        future, where = pending
        try:
            future.result()
        except Exception as error:
            raise self._failure(f"writing {where}", error) from error

    def finish(self, attrs: Mapping | None = None) -> None:
        """Flush, update the root attributes with ``attrs``, record every array's chunk manifest
        (:mod:`attnformat.engines.zarr_manifest`) and consolidate the metadata."""
        from attnformat.engines.zarr_manifest import seal

        self.flush()
        if attrs:
            self.set_attrs("", attrs)
        with self._failing_as("sealing the store"):
            seal(self.path)
        self.close()

    def close(self) -> None:
        """Stop the background writer thread (after :meth:`flush`); the store stays on disk."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._staging = None

    def _staged(self, values, dtype) -> np.ndarray:
        """A copy of ``values`` as ``dtype`` in the staging buffer (only once the previous write is stored:
        it was read from the same buffer). Non-numeric values get a fresh copy."""
        values = np.asarray(values)
        dtype = np.dtype(dtype)
        if dtype.kind not in "biufc" or values.dtype.kind not in "biufc":
            return np.array(values, dtype=dtype, copy=True)
        size = values.size * dtype.itemsize
        if self._staging is None or self._staging.size < size:
            self._staging = None  # release the smaller one first
            self._staging = np.empty(size, np.uint8)
        staged = self._staging[:size].view(dtype).reshape(values.shape)
        np.copyto(staged, values, casting="unsafe")  # as np.array(values, dtype) converts
        return staged

    # -- helpers -----------------------------------------------------------------------------
    def _group(self, name: str) -> zarr.Group:
        if name not in self._groups:
            self.create_group(name)
        return self._groups[name]

    def _tensorstore(self, name: str):
        """A TensorStore handle for a numeric Zarr v3 array, or None to write through zarr-python.

        TensorStore is optional. Its Zarr v2 driver knows neither filters nor the ``crc32``
        checksum, so v2 arrays are always written through zarr-python.
        """
        if name in self._tensorstores:
            return self._tensorstores[name]
        handle = None
        array = self._arrays[name]
        if self.zarr_format == 3 and array.dtype.kind in "biuf" and not _TENSORSTORE_FORKED:
            try:
                import tensorstore
            except ImportError:
                tensorstore = None
            if tensorstore is not None:
                spec = {
                    "driver": "zarr3",
                    "kvstore": {"driver": "file", "path": os.path.abspath(self.path / name)},
                    # A map of fill values (NaN) is still data the caller wrote: a complete file
                    # stores every chunk (ATTN-STORE-007).
                    "store_data_equal_to_fill_value": True,
                }
                with self._failing_as(f"opening {name!r}"):
                    handle = tensorstore.open(spec, open=True, write=True, context=_write_context()).result()
        self._tensorstores[name] = handle
        return handle

    def _failure(self, what: str, error: BaseException) -> Exception:
        """WriteFailedError for a failure of the storage (the store is then marked failed),
        WriterError for anything else (a value zarr or TensorStore refuses)."""
        if isinstance(error, (WriteFailedError, WriterError)):
            return error
        storage = isinstance(error, OSError) and not isinstance(error, (FileExistsError, NotADirectoryError, IsADirectoryError))
        if not (storage or _looks_like_storage_failure(error)):
            return WriterError(f"{self.path}: {what}: {type(error).__name__}: {error}")
        self.failed = True
        return WriteFailedError(f"{self.path}: {what} failed ({type(error).__name__}: {error}); what was written before is kept there, marked incomplete")

    def _failing_as(self, what: str):
        return _Failing(self, what)


class _Failing:
    """Context manager: storage errors become WriteFailedError, zarr's complaints WriterError."""

    def __init__(self, store: StreamingStore, what: str):
        self.store, self.what = store, what

    def __enter__(self):
        return self

    def __exit__(self, exc_type, error, traceback):
        if error is None or isinstance(error, (WriteFailedError, WriterError)) or not isinstance(error, Exception):
            return False
        raise self.store._failure(self.what, error) from error


def _looks_like_storage_failure(error: BaseException) -> bool:
    # TensorStore reports file-system failures as ValueError with a status code in the text.
    text = str(error)
    return any(code in text for code in ("RESOURCE_EXHAUSTED", "DATA_LOSS", "PERMISSION_DENIED", "No space left", "File too large", "Disk quota"))


_WRITE_CONTEXT: list = []
# TensorStore's thread pools do not survive fork(): a child of a process that has used it aborts
# on its first TensorStore call. Such children (multiprocessing's fork, a fork-based test harness)
# write through zarr-python instead.
_TENSORSTORE_FORKED = False


def _forked() -> None:
    global _TENSORSTORE_FORKED
    _TENSORSTORE_FORKED = True
    _WRITE_CONTEXT.clear()


def _write_context():
    """One TensorStore context for every writer: no fsync per chunk (the store is consolidated and
    moved into place at the end; a killed process still leaves every completed write on disk)."""
    import tensorstore

    if not _WRITE_CONTEXT:
        _WRITE_CONTEXT.append(tensorstore.Context({"file_io_sync": False}))
        os.register_at_fork(after_in_child=_forked)
    return _WRITE_CONTEXT[0]


# -- several writers of one store -------------------------------------------------------------
#: The suffix of the folder, next to a store written by several processes, that holds their
#: bookkeeping (the declared layout, one claim per region, one marker per region written). It is
#: beside the store, not in it: zarr warns about any entry of a store it does not know, and a
#: reader of the store while it is being written should see a plain Zarr store.
LEDGER_SUFFIX = ".regions"


def reopen_store(path: str | os.PathLike, names: Sequence[str], *, write_behind: bool = False) -> StreamingStore:
    """A :class:`StreamingStore` over an existing (declared, unsealed) store, for region writes.

    Only the arrays in ``names`` are opened; nodes are neither created nor changed, so writers of
    disjoint regions never touch the same metadata or chunk.

    Parameters
    ----------
    path
        The store directory.
    names
        Paths of the arrays this writer may write (``"encoder/self/weights"``).
    write_behind
        As for :class:`StreamingStore`.

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.partial.zarr"
    >>> store = StreamingStore(path)
    >>> store.create_group("self")
    >>> store.create_array("self/weights", shape=(4, 2), dims=("sample", "key"), dtype="float32", fill_value=np.nan, chunks=(2, 2))
    >>> again = reopen_store(path, ["self/weights"])
    >>> again.write("self/weights", (slice(2, 4), slice(None)), np.ones((2, 2)), "samples 2:4")
    """
    store = StreamingStore.__new__(StreamingStore)
    store.path = Path(path)
    store.write_behind = write_behind
    store.failed = False
    store._arrays, store._groups, store._tensorstores = {}, {}, {}
    store._pending, store._executor = None, None
    with store._failing_as("opening the store"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store._groups[""] = zarr.open_group(str(store.path), mode="r+", use_consolidated=False)
        store.zarr_format = store._groups[""].metadata.zarr_format
        for name in names:
            store._arrays[name] = zarr.open_array(str(store.path / name), mode="r+", config={"write_empty_chunks": True})
    return store


def chunk_lengths(store: StreamingStore, dim: str) -> dict[str, int]:
    """The chunk length along ``dim`` of every array of ``store`` that has that dimension.

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib
    >>> store = StreamingStore(pathlib.Path(tempfile.mkdtemp()) / "x.zarr")
    >>> store.create_array("w", shape=(8, 3), dims=("sample", "key"), dtype="float32", chunks=(4, 3))
    >>> chunk_lengths(store, "sample")
    {'w': 4}
    """
    lengths = {}
    for name, array in store._arrays.items():
        metadata = array.metadata
        dims = metadata.dimension_names if metadata.zarr_format == 3 else array.attrs.get("_ARRAY_DIMENSIONS")
        if dims and dim in dims:
            lengths[name] = int(array.chunks[list(dims).index(dim)])
    return lengths


class RegionLedger:
    """The bookkeeping of a store written by several processes, each a region of one dimension.

    It lives next to the store (``<store>.regions``, or ``ledger``) and is written atomically (a temporary file
    renamed into place) under an exclusive ``flock`` of its ``lock`` file:

    * ``declaration.json``: the layout the declaring writer made (sites, variables, the region
      dimension and its size), written once;
    * ``<dim>-<start>-<stop>.claim``: a region being written; its writer holds an ``flock`` on it
      while it writes, which the operating system drops if the writer dies, so a claim whose lock
      is free and that has no marker belongs to a crashed writer and may be taken over;
    * ``<dim>-<start>-<stop>.done``: the region's writer finished it (written after its last
      chunk is on disk).

    Parameters
    ----------
    store_path
        The store directory.
    ledger
        The bookkeeping folder; ``<store_path>.regions`` by default.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> ledger = RegionLedger(pathlib.Path(tempfile.mkdtemp()) / "run.zarr")
    >>> ledger.declare({"dim": "sample", "size": 4, "sites": {}})
    >>> claim = ledger.claim(0, 2); claim.finish()
    >>> ledger.missing()
    [(2, 4)]
    """

    def __init__(self, store_path: str | os.PathLike, ledger: str | os.PathLike | None = None):
        self.store_path = Path(store_path)
        self.path = Path(ledger) if ledger is not None else self.store_path.with_name(self.store_path.name + LEDGER_SUFFIX)

    # -- declaration -------------------------------------------------------------------------
    def declare(self, declaration: Mapping) -> None:
        """Record the declared layout (JSON-serialisable)."""
        self.path.mkdir(exist_ok=True, parents=True)
        _write_atomically(self.path / "declaration.json", json.dumps(dict(declaration)).encode())

    def declaration(self) -> dict | None:
        """The declared layout, or None if the store has none (yet)."""
        try:
            return json.loads((self.path / "declaration.json").read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise WriterError(f"{self.store_path}: its region bookkeeping is unreadable ({error})") from error

    # -- regions -----------------------------------------------------------------------------
    def claim(self, start: int, stop: int) -> RegionClaim:
        """Claim positions ``[start, stop)`` of the region dimension for this process.

        Raises :class:`WriterError` if the region overlaps one being written by a live process or
        one already written; a claim left by a crashed writer is taken over (the same region) or
        dropped (an overlapping one).
        """
        declaration = self.declaration() or {}
        dim = declaration.get("dim", "region")
        if not (self.path / "declaration.json").exists():
            raise WriterError(f"{self.store_path}: no declared layout (or the store is finished already)")
        with self._locked():
            for other_start, other_stop, claim_path in self._claims():
                if other_stop <= start or stop <= other_start:
                    continue
                shown = f"{dim}={other_start}:{other_stop}"
                if self._done_path(other_start, other_stop).exists():
                    raise WriterError(f"{self.store_path}: region {dim}={start}:{stop} overlaps {shown}, which is written already; "
                                      "each region is written once, by one process")
                descriptor = _try_lock(claim_path)
                if descriptor is None:
                    raise WriterError(f"{self.store_path}: region {dim}={start}:{stop} overlaps {shown}, which pid "
                                      f"{_pid_in(claim_path)} is writing; regions of different processes must not overlap")
                if (other_start, other_stop) == (start, stop):
                    return RegionClaim(self, start, stop, descriptor)  # a crashed writer's region: written again
                claim_path.unlink(missing_ok=True)  # a crashed writer's overlapping claim: dropped
                os.close(descriptor)
            path = self._claim_path(start, stop)
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return RegionClaim(self, start, stop, descriptor)

    def done(self) -> list[tuple[int, int]]:
        """The regions written, ``[(start, stop), ...]`` sorted."""
        found = []
        for entry in self.path.glob("*.done"):
            parts = entry.stem.rsplit("-", 2)
            found.append((int(parts[1]), int(parts[2])))
        return sorted(found)

    def missing(self) -> list[tuple[int, int]]:
        """The spans of the region dimension that no finished region covers."""
        size = int((self.declaration() or {}).get("size", 0))
        gaps, position = [], 0
        for start, stop in self.done():
            if start > position:
                gaps.append((position, start))
            position = max(position, stop)
        if position < size:
            gaps.append((position, size))
        return gaps

    def seal_once(self, seal) -> bool:
        """Call ``seal()`` if every region is written and nobody sealed the store yet; True if it
        was called here. ``seal`` runs under the ledger's lock, so two writers finishing together
        never both seal."""
        try:
            with self._locked():
                if not (self.path / "declaration.json").exists() or self.missing():
                    return False
                seal()
                return True
        except FileNotFoundError:
            return False  # another writer sealed the store and moved it away meanwhile

    def remove(self) -> None:
        """Remove the bookkeeping (the store is sealed)."""
        shutil.rmtree(self.path, ignore_errors=True)

    # -- helpers -----------------------------------------------------------------------------
    def _claims(self):
        for entry in sorted(self.path.glob("*.claim")):
            parts = entry.stem.rsplit("-", 2)
            yield int(parts[1]), int(parts[2]), entry

    def _claim_path(self, start, stop) -> Path:
        return self.path / f"{(self.declaration() or {}).get('dim', 'region')}-{start}-{stop}.claim"

    def _done_path(self, start, stop) -> Path:
        return self.path / f"{(self.declaration() or {}).get('dim', 'region')}-{start}-{stop}.done"

    def _locked(self):
        return _LedgerLock(self)


class RegionClaim:
    """One process's claim on a region; made by :meth:`RegionLedger.claim`.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> ledger = RegionLedger(pathlib.Path(tempfile.mkdtemp()) / "run.zarr")
    >>> ledger.declare({"dim": "step", "size": 2, "sites": {}})
    >>> claim = ledger.claim(0, 1)
    >>> claim.release()  # not finished: the region stays missing
    >>> ledger.missing()
    [(0, 2)]
    """

    def __init__(self, ledger: RegionLedger, start: int, stop: int, descriptor: int):
        self.ledger, self.start, self.stop = ledger, start, stop
        self._descriptor: int | None = descriptor
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())

    def finish(self) -> None:
        """Mark the region written (call after its last chunk is stored), then release it."""
        _write_atomically(self.ledger._done_path(self.start, self.stop), f"{os.getpid()}\n".encode())
        self.release()

    def release(self) -> None:
        """Let go of the region (idempotent); without :meth:`finish` it stays unwritten."""
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None

    def __del__(self):
        if getattr(self, "_descriptor", None) is not None:
            self.release()


class _LedgerLock:
    def __init__(self, ledger: RegionLedger):
        self.ledger = ledger
        self.descriptor = None

    def __enter__(self):
        # Never re-created here: a ledger that is gone means the store was sealed.
        self.descriptor = os.open(self.ledger.path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.descriptor, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.descriptor)
        return False


def _try_lock(path: Path) -> int | None:
    try:
        descriptor = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    return descriptor


def _pid_in(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
