"""Checked reads of Zarr arrays (format 3 and 2, any store) through zarr-python's own codecs.

Why this exists: one attention map is one chunk of about 1 MiB, and decoding it takes 0.1-0.2 ms.
Going through zarr-python's event loop, or through TensorStore's thread pools, costs as much again
in thread hand-offs and per-call setup. zarr-python declares which stores can read synchronously
(``zarr.abc.store.SupportsGetSync``: local directories) and which codecs can decode synchronously
(``zarr.abc.codec.SupportsSyncCodec``: bytes, blosc, zstd, gzip, crc32c, transpose, vlen-utf8);
this module chains those pieces for the chunks a selection touches, the way zarr's codec pipeline
does. :func:`can_read` says whether an array takes that fast road in the caller's thread.

Every read here is also checked, whichever store the array lives in (local directory, zip
archive, URL), which zarr's own pipeline does not do:

- a chunk decodes to exactly the size its array declares, and this is known before decoding where
  the frame declares it (Blosc, zstd, LZ4 headers; gzip and zlib are inflated with a bound), so
  that a truncated frame is never decoded past its end and no decoder allocates more than the
  chunk's declared size [ATTN-STORE-005, ATTN-STORE-006];
- a stored checksum (Zarr v3 ``crc32c``, numcodecs checksum filters) must match [ATTN-STORE-005];
- any other decoding failure is reported as damage naming the chunk [ATTN-STORE-005];
- with ``chunks_required=True`` (a variable of a file that says it is complete) a chunk that is not
  stored is damage [ATTN-STORE-007], not the fill value;
- chunk files of local directories are opened without following links or blocking on FIFOs and
  must be regular files [ATTN-STORE-004].

:func:`supports` says which arrays this module reads at all (regular chunk grids without
sharding); others go through zarr-python.

Selections are what xarray's outer indexing hands a backend array: per dimension an integer or a
slice with a positive step (:func:`read`), or also arrays of indices (:func:`read_outer`). A map
stored in several chunks (strips of rows) is decoded on a small thread pool, each strip straight
into its place (the codecs release the GIL).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache
from itertools import product

import numpy as np

from attnformat.engines import zarr_manifest
from attnformat.engines.zarr_screen import MAX_CHUNK_BYTES, open_regular_file
from attnformat.errors import AttnFormatError, BrokenStoreError

# Chunk files up to this size are read; larger ones are memory-mapped (see open_chunk).
_MMAP_BYTES = 1 << 16
# numcodecs ids of checksum codecs: a failure to decode is a checksum mismatch.
_CHECKSUM_CODECS = ("crc32", "crc32c", "adler32", "fletcher32", "jenkins_lookup3")


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="attnformat-decode")


@lru_cache(maxsize=1)
def _chunk_context():
    from zarr.core.array_spec import ArrayConfig
    from zarr.core.buffer import default_buffer_prototype

    return ArrayConfig.from_dict({}), default_buffer_prototype()


def array_metadata(document: dict):
    """zarr's parsed metadata (``ArrayV3Metadata``) for one array's ``zarr.json`` document.

    Parsing validates every field and looks codecs and data types up in zarr's registries, which
    costs more than reading a small coordinate. Parsing is a pure function of the document's text,
    so results are kept (by text, for the last few hundred documents): a changed file has a
    different text and is parsed afresh. Nothing read from chunks is kept.

    Examples
    --------
    >>> metadata = array_metadata({"zarr_format": 3, "node_type": "array", "shape": [6], "data_type": "int64",
    ...     "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [6]}},
    ...     "chunk_key_encoding": {"name": "default"}, "fill_value": 0, "codecs": [{"name": "bytes"}]})
    >>> metadata.shape, str(metadata.data_type.to_native_dtype())
    ((6,), 'int64')
    """
    return _parse_array_metadata(json.dumps(document))


@lru_cache(maxsize=512)
def _parse_array_metadata(text: str):
    from zarr.core.metadata.v3 import ArrayV3Metadata

    return ArrayV3Metadata.from_dict(json.loads(text))


def can_read(metadata, store_path) -> bool:
    """True if the array takes the fast road in the caller's thread: Zarr v3, regular chunks,
    synchronous store and codecs (every array :func:`supports` is read checked either way).

    Examples
    --------
    >>> import zarr
    >>> array = zarr.create_array(zarr.storage.MemoryStore(), shape=(4,), dtype="int64")
    >>> can_read(array.metadata, array.store_path)
    True
    """
    from zarr.core.chunk_grids import RegularChunkGrid

    # Duck-typed on purpose: isinstance() against zarr's runtime-checkable protocols
    # (SupportsGetSync, SupportsSyncCodec) costs more than decoding a small coordinate.
    return (
        getattr(metadata, "zarr_format", None) == 3
        and isinstance(metadata.chunk_grid, RegularChunkGrid)
        and callable(getattr(store_path.store, "get_sync", None))
        and all(callable(getattr(codec, "_decode_sync", None)) for codec in metadata.codecs)
    )


def supports(metadata) -> bool:
    """True if :func:`read` reads this array, on any store: Zarr v2, or Zarr v3 with a regular
    chunk grid and no sharding.

    Examples
    --------
    >>> import zarr
    >>> v2 = zarr.create_array(zarr.storage.MemoryStore(), shape=(4,), dtype="int64", zarr_format=2)
    >>> sharded = zarr.create_array(zarr.storage.MemoryStore(), shape=(4,), chunks=(2,), shards=(4,), dtype="int64")
    >>> supports(v2.metadata), supports(sharded.metadata)
    (True, False)
    """
    from zarr.codecs import ShardingCodec
    from zarr.core.chunk_grids import RegularChunkGrid

    zarr_format = getattr(metadata, "zarr_format", None)
    if zarr_format == 2:
        return True
    return (
        zarr_format == 3
        and isinstance(metadata.chunk_grid, RegularChunkGrid)
        and not any(isinstance(codec, ShardingCodec) for codec in metadata.codecs)
    )


def read(metadata, store_path, selection: tuple = (), *, chunks_required: bool = False) -> np.ndarray:
    """Read ``array[selection]`` (integers and slices, one per dimension; missing ones mean all).

    ``metadata`` and ``store_path`` are a ``zarr.Array``'s ``.metadata`` and ``.store_path`` (or
    built from a consolidated metadata document); check :func:`supports` first. Chunks that were
    never written read as the array's fill value, as in zarr, unless ``chunks_required`` (the
    file says it is complete): then a missing chunk raises :class:`BrokenStoreError`
    [ATTN-STORE-007]. A damaged chunk raises :class:`BrokenStoreError` [ATTN-STORE-005] naming it.

    Examples
    --------
    >>> import numpy as np, zarr
    >>> array = zarr.create_array(zarr.storage.MemoryStore(), shape=(2, 3, 4), chunks=(1, 3, 2), dtype="float32")
    >>> array[...] = np.arange(24, dtype="float32").reshape(2, 3, 4)
    >>> read(array.metadata, array.store_path, (1, slice(None), slice(1, 3))).tolist()
    [[13.0, 14.0], [17.0, 18.0], [21.0, 22.0]]
    """
    plan = _Plan(metadata, store_path, selection, chunks_required)
    plan.fill()
    return plan.result()


def read_outer(metadata, store_path, key: tuple, *, chunks_required: bool = False) -> np.ndarray:
    """:func:`read`, where a dimension may also be picked by an array of indices (outer indexing,
    as xarray's ``OUTER`` indexing support hands it over). Each chunk is decoded once.

    Examples
    --------
    >>> import numpy as np, zarr
    >>> array = zarr.create_array(zarr.storage.MemoryStore(), shape=(4, 5), chunks=(2, 2), dtype="int64")
    >>> array[...] = np.arange(20).reshape(4, 5)
    >>> read_outer(array.metadata, array.store_path, (np.array([3, 0]), slice(1, 3))).tolist()
    [[16, 17], [1, 2]]
    """
    shape = metadata.shape
    key = tuple(key) + (slice(None),) * (len(shape) - len(tuple(key)))
    picked = [dim for dim, item in enumerate(key) if isinstance(item, np.ndarray)]
    if not picked:
        return read(metadata, store_path, key, chunks_required=chunks_required)
    dim = picked[0]
    size = shape[dim]
    indices = np.asarray(key[dim]).astype(np.int64).reshape(-1)
    if indices.size and not ((-size <= indices).all() and (indices < size).all()):
        raise IndexError(f"an index is out of bounds for a dimension of size {size}")
    indices = indices % size if size else indices
    axis = sum(1 for item in key[:dim] if isinstance(item, (slice, np.ndarray)))
    if not indices.size:
        return read_outer(metadata, store_path, key[:dim] + (slice(0, 0),) + key[dim + 1:], chunks_required=chunks_required)
    order = np.argsort(indices, kind="stable")
    ordered = indices[order]
    chunk = metadata.chunk_grid.chunk_shape[dim]
    pieces = []
    for group in np.split(ordered, np.flatnonzero(np.diff(ordered // chunk)) + 1):
        low, high = int(group[0]), int(group[-1]) + 1
        part = read_outer(metadata, store_path, key[:dim] + (slice(low, high),) + key[dim + 1:], chunks_required=chunks_required)
        pieces.append(np.take(part, group - low, axis=axis))
    joined = np.concatenate(pieces, axis=axis)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size)
    return np.take(joined, inverse, axis=axis)


def read_all(metadata, store_path, *, chunks_required: bool = False) -> np.ndarray:
    """Read a whole (small) array, e.g. a coordinate; strings come back as Python ``str`` objects.

    Examples
    --------
    >>> import zarr
    >>> labels = zarr.create_array(zarr.storage.MemoryStore(), shape=(2,), dtype=str)
    >>> labels[:] = ["[CLS]", "hello"]
    >>> read_all(labels.metadata, labels.store_path).tolist()
    ['[CLS]', 'hello']
    """
    return as_object_strings(read(metadata, store_path, chunks_required=chunks_required))


def read_all_many(arrays, *, chunks_required: bool = False) -> list[np.ndarray]:
    """:func:`read_all` of several arrays ``[(metadata, store_path), ...]``; the chunks of arrays
    in stores without synchronous reads (zip, URLs) are fetched together, in one round trip.

    Examples
    --------
    >>> import zarr
    >>> store = zarr.storage.MemoryStore()
    >>> first, second = zarr.create_array(store, name="a", shape=(2,), dtype="int8"), zarr.create_array(store, name="b", shape=(1,), dtype=str)
    >>> first[:], second[:] = [1, 2], ["x"]
    >>> [values.tolist() for values in read_all_many([(first.metadata, first.store_path), (second.metadata, second.store_path)])]
    [[1, 2], ['x']]
    """
    plans = [_Plan(metadata, store_path, (), chunks_required) for metadata, store_path in arrays]
    remote = [plan for plan in plans if not plan.synchronous]
    if remote:
        fetched = _fetch([(plan.store_path, key) for plan in remote for key in plan.keys()])
        position = 0
        for plan in remote:
            count = len(plan.chunk_coords)
            plan.fetched = dict(zip(plan.keys(), fetched[position:position + count]))
            position += count
            plan.fill()
    return [
        as_object_strings(plan.result() if not plan.synchronous else read(plan.metadata, plan.store_path, chunks_required=chunks_required))
        for plan in plans
    ]


def as_object_strings(values: np.ndarray) -> np.ndarray:
    """Strings as Python ``str`` objects (object dtype); any other array unchanged.

    zarr 3 hands variable-length strings back as numpy's StringDType, h5netcdf as objects; one
    dtype for both keeps trees from either engine identical.

    Examples
    --------
    >>> import numpy as np
    >>> as_object_strings(np.array(["a", "bc"])).dtype, as_object_strings(np.arange(2)).dtype
    (dtype('O'), dtype('int64'))
    """
    return values.astype(object) if values.dtype.kind in "TU" else values


def chunk_error(name: str, key: str, problem: str, rule_id: str = "ATTN-STORE-005") -> BrokenStoreError:
    """The error for one damaged chunk: one line naming the chunk (``name``: its file or URL),
    the problem and the rule; ``key`` (the chunk's key in the store) becomes its location.

    Examples
    --------
    >>> str(chunk_error("run.zarr/encoder/self/weights/c/0/0/0/0", "encoder/self/weights/c/0/0/0/0", "does not match its checksum"))
    'run.zarr/encoder/self/weights/c/0/0/0/0: chunk does not match its checksum [ATTN-STORE-005]; the store is damaged'
    """
    fix = {
        "ATTN-STORE-005": "the store is damaged",
        "ATTN-STORE-006": "attnformat refuses sizes beyond the bounds of the spec",
        "ATTN-STORE-007": "the file says it is complete, so it was damaged or torn; rewrite it from its source",
    }.get(rule_id, "the store is damaged")
    return BrokenStoreError(f"{name}: chunk {problem} [{rule_id}]; {fix}", rule_id, location=key)


# ----------------------------------------------------------------------------------------------
# Planning a read, fetching chunks, filling the result


class _Plan:
    """One selection of one array: the region to read, the chunks it touches, how to fetch them."""

    def __init__(self, metadata, store_path, selection: tuple, chunks_required: bool):
        from zarr.storage import LocalStore

        self.metadata, self.store_path, self.chunks_required = metadata, store_path, chunks_required
        shape = metadata.shape
        self.chunk_shape = metadata.chunk_grid.chunk_shape
        selection = tuple(selection) + (slice(None),) * (len(shape) - len(tuple(selection)))
        if len(selection) != len(shape):
            raise IndexError(f"too many indices for an array of {len(shape)} dimensions")
        # Per dimension: the contiguous range [start, stop) read from chunks, and what is then
        # taken out of that range (an integer drops the dimension, a stepped slice subsamples it).
        self.bounds, self.takes = [], []
        for item, size in zip(selection, shape):
            if isinstance(item, slice):
                start, stop, step = item.indices(size)
                if step < 0:
                    raise IndexError("slices with a negative step are not supported; reverse the result instead")
                if stop <= start:
                    start, stop, step = 0, 0, 1  # empty
                self.bounds.append((start, stop))
                self.takes.append(slice(None, None, step) if step != 1 else slice(None))
            else:
                index = int(item)
                if not -size <= index < size:
                    raise IndexError(f"index {item} is out of bounds for a dimension of size {size}")
                index %= size
                self.bounds.append((index, index + 1))
                self.takes.append(0)
        self.dtype = _native_dtype(metadata)
        self.region = np.empty(tuple(stop - start for start, stop in self.bounds), self.dtype)
        chunk_ranges = [range(start // c, -(-stop // c)) for (start, stop), c in zip(self.bounds, self.chunk_shape)]
        self.chunk_coords = list(product(*chunk_ranges)) if self.region.size else []
        store = store_path.store
        inner = store
        while hasattr(inner, "_store"):  # a wrapper (screening metadata) around a local directory
            inner = inner._store
        self.local = isinstance(inner, LocalStore)
        self.synchronous = self.local or callable(getattr(store, "get_sync", None))
        self.fetched: dict | None = None
        self.manifest = zarr_manifest.expected_chunks(metadata)

    def keys(self) -> list[str]:
        return [self.metadata.encode_chunk_key(coords) for coords in self.chunk_coords]

    def fill(self) -> None:
        if not self.synchronous and self.fetched is None:
            keys = self.keys()
            self.fetched = dict(zip(keys, _fetch([(self.store_path, key) for key in keys])))
        if len(self.chunk_coords) > 1 and self.region.nbytes >= 1 << 20:  # strips of a large map: side by side
            list(_pool().map(self._fill_chunk, self.chunk_coords))
        else:
            for coords in self.chunk_coords:
                self._fill_chunk(coords)

    def result(self) -> np.ndarray:
        return self.region[tuple(self.takes)]

    def _fill_chunk(self, coords: tuple[int, ...]) -> None:
        inside, target, whole = [], [], True
        for (start, stop), c, k in zip(self.bounds, self.chunk_shape, coords):
            low, high = max(start, k * c), min(stop, (k + 1) * c)
            inside.append(slice(low - k * c, high - k * c))
            target.append(slice(low - start, high - start))
            whole = whole and high - low == c
        destination = self.region[tuple(target)]
        key = self.metadata.encode_chunk_key(coords)
        name = _chunk_name(self.store_path, key)
        location = f"{self.store_path.path}/{key}".lstrip("/")
        try:
            with self._encoded(key, name) as raw:
                if raw is None:
                    if self.chunks_required or key in (self.manifest or ()):
                        raise chunk_error(name, location, "is missing (never written, or lost)", "ATTN-STORE-007")
                    destination[...] = _fill_value(self.metadata)
                    return
                if self.manifest is not None:
                    zarr_manifest.check(self.metadata, key, raw, name, location)
                if whole and destination.flags.c_contiguous and _decode_into(self.metadata, raw, destination, name, location):
                    return  # decoded in place: no temporary chunk, no copy
                decoded = _decode(self.metadata, raw, coords, name, location)
                destination[...] = decoded[tuple(inside)]
        except AttnFormatError:
            raise
        except MemoryError:
            raise
        except Exception as error:  # codecs and stores raise many classes for damaged bytes
            raise chunk_error(name, location, f"cannot be decoded ({type(error).__name__}: {short_message(error)})") from error

    @contextmanager
    def _encoded(self, key: str, name: str):
        """The chunk's encoded bytes (bytes, a memory map or a numpy array), or None if not stored."""
        if self.fetched is not None:
            found = self.fetched[key]
            if isinstance(found, BaseException):
                raise found
            yield None if found is None else found.as_numpy_array()
        elif self.local:
            with open_chunk(name) as raw:
                yield raw
        else:
            found = (self.store_path / key).get_sync(prototype=_chunk_context()[1])
            yield None if found is None else found.as_numpy_array()


@contextmanager
def open_chunk(path: str):
    """A local chunk file's bytes: never through a link, never blocking, only a regular file.

    Chunks of 64 KiB and more are memory-mapped rather than read: the decoder then reads the
    page cache directly, instead of a fresh buffer the size of the chunk that must first be
    allocated, faulted in and copied into. Public for the engines' direct roads
    (:mod:`attnformat.engines.zarr_direct`), which read chunks without zarr-python.

    Parameters
    ----------
    path : str
        The chunk file.

    Yields
    ------
    bytes or mmap.mmap or None
        Its bytes (one more than its size is asked for, so a file that grows shows it), or None
        when it is missing, a link or not a regular file.

    Examples
    --------
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "c/0")
    >>> with open_chunk(path) as raw:
    ...     raw is None
    True
    """
    descriptor = open_regular_file(path)
    if descriptor is None:
        yield None
        return
    try:
        size = os.fstat(descriptor).st_size
        if size < _MMAP_BYTES:
            yield os.read(descriptor, size + 1)
        else:
            mapped = mmap.mmap(descriptor, 0, access=mmap.ACCESS_READ)
            try:
                yield mapped
            finally:
                try:
                    mapped.close()
                except BufferError:
                    # A view of the map is still referenced for a moment (dask.distributed's
                    # sampling profiler holds worker frames): it is unmapped when that view is freed.
                    # Raising here would report a sound chunk as damaged.
                    pass
    finally:
        os.close(descriptor)


def _fetch(pairs) -> list:
    """Encoded chunks ``[(store_path, key), ...]`` of stores without synchronous reads, fetched
    together in one trip to zarr's event loop; each a Buffer, None, or the error it raised."""
    import asyncio

    from zarr.core.sync import sync

    prototype = _chunk_context()[1]

    async def get_all():
        return await asyncio.gather(*((store_path / key).get(prototype=prototype) for store_path, key in pairs), return_exceptions=True)

    return list(sync(get_all())) if pairs else []


def _chunk_name(store_path, key: str) -> str:
    """The chunk as a user finds it: its file, or the archive or URL followed by its key."""
    store = store_path.store
    while hasattr(store, "_store"):  # wrapper stores (screening, caching) name what they wrap
        store = store._store
    inner = f"{store_path.path}/{key}".lstrip("/")
    root = getattr(store, "root", None)
    if root is not None:
        root = str(root)
        if root.startswith("/proc/self/fd/"):  # a pinned directory: name it as the user knows it
            try:
                root = os.readlink(root)
            except OSError:
                pass
        return os.path.join(root, inner)
    path = getattr(store, "path", None)
    filesystem = getattr(store, "fs", None)
    if path is not None and filesystem is not None:
        try:
            path = filesystem.unstrip_protocol(path)
        except Exception:  # a file system without a protocol to restore
            pass
    return f"{str(path).rstrip('/')}/{inner}" if path is not None else f"{store}/{inner}"


def short_message(error: BaseException) -> str:
    """The first line of an error's message, at most 200 characters, for a one-line report.

    Parameters
    ----------
    error : BaseException
        Any exception.

    Examples
    --------
    >>> short_message(ValueError("bad frame\\nmore")), short_message(ValueError())
    ('bad frame', 'no details')
    """
    return str(error).splitlines()[0][:200] if str(error) else "no details"


def _native_dtype(metadata) -> np.dtype:
    return (metadata.data_type if metadata.zarr_format == 3 else metadata.dtype).to_native_dtype()


def _fill_value(metadata):
    if metadata.fill_value is not None:
        return metadata.fill_value
    return (metadata.data_type if metadata.zarr_format == 3 else metadata.dtype).default_scalar()


def _fixed_nbytes(metadata) -> int | None:
    """Bytes one whole chunk decodes to, for data types of fixed size; None for variable ones."""
    dtype = _native_dtype(metadata)
    if dtype.kind in "OT":
        return None
    return math.prod(metadata.chunk_grid.chunk_shape) * dtype.itemsize


# ----------------------------------------------------------------------------------------------
# Decoding, checked


def _decode_into(metadata, raw, destination: np.ndarray, name: str, key: str) -> bool:
    """Decode one chunk straight into ``destination`` (C-contiguous, the chunk's shape).

    Only for the codec chains attnformat writes: ``bytes`` in native byte order, alone or
    followed by ``blosc``, optionally ending in ``crc32c``. numcodecs' Blosc (the library zarr's
    own blosc codec calls) decompresses into a given buffer. A fresh 1 MiB buffer costs about as
    much in page faults as decoding it, so writing the result where it will stay, instead of into
    a temporary that is then copied, is what keeps one map at one decode. Answers False for any
    other chain.
    """
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec

    if metadata.zarr_format != 3:
        return False
    codecs = list(metadata.codecs)
    checksum = bool(codecs) and isinstance(codecs[-1], Crc32cCodec)
    if checksum:
        codecs.pop()
    bytes_codec = codecs[0] if codecs else None
    if not isinstance(bytes_codec, BytesCodec) or len(codecs) > 2 or (len(codecs) == 2 and not isinstance(codecs[1], BloscCodec)):
        return False
    if destination.dtype.itemsize > 1 and (bytes_codec.endian is None or bytes_codec.endian.value != sys.byteorder):
        return False
    data = np.frombuffer(raw, np.uint8)
    if checksum:
        data = verify_crc32c(data, name, key)
    if len(codecs) == 1:
        if data.size != destination.nbytes:
            raise wrong_size_error(name, key, data.size, destination.nbytes)
        destination.reshape(-1).view(np.uint8)[...] = data
    else:
        _check_blosc(data, name, key, destination.nbytes)
        blosc_codec().decode(data, out=destination)
    return True


def _decode(metadata, raw, coords: tuple[int, ...], name: str, key: str) -> np.ndarray:
    """One whole chunk as a numpy array of the chunk's full shape, every step checked."""
    if metadata.zarr_format == 2:
        return _decode_v2(metadata, raw, name, key)
    from zarr.abc.codec import ArrayArrayCodec, ArrayBytesCodec, BytesBytesCodec
    from zarr.codecs import BytesCodec

    array_config, prototype = _chunk_context()
    spec = metadata.get_chunk_spec(coords, array_config, prototype)
    array_codecs = [codec for codec in metadata.codecs if isinstance(codec, ArrayArrayCodec)]
    (bytes_codec,) = [codec for codec in metadata.codecs if isinstance(codec, ArrayBytesCodec)]
    compressors = [codec for codec in metadata.codecs if isinstance(codec, BytesBytesCodec)]
    # Encoding ran array->array codecs, then array->bytes, then bytes->bytes, each codec seeing
    # the spec its predecessor produced; decoding walks back through the same specs.
    specs = []
    for codec in array_codecs:
        specs.append(spec)
        spec = codec.resolve_metadata(spec)
    exact = math.prod(spec.shape) * spec.dtype.to_native_dtype().itemsize if isinstance(bytes_codec, BytesCodec) else None
    data = np.frombuffer(raw, np.uint8)
    for position, codec in enumerate(reversed(compressors)):
        innermost = position == len(compressors) - 1
        data = _decode_bytes_codec(codec, data, spec, name, key, exact if innermost else None)
    if exact is not None and data.size != exact:
        raise wrong_size_error(name, key, data.size, exact)
    decoded = _call(bytes_codec, prototype.buffer.from_array_like(data), spec)
    for codec, codec_spec in zip(reversed(array_codecs), reversed(specs)):
        decoded = _call(codec, decoded, codec_spec)
    values = decoded.as_numpy_array()
    chunk_shape = tuple(metadata.chunk_grid.chunk_shape)
    if values.shape != chunk_shape:
        raise chunk_error(name, key, f"decodes to shape {values.shape}, but the array's metadata makes it {chunk_shape}")
    return values


def _call(codec, data, spec):
    """Run one zarr codec's decoder: its synchronous side, else its coroutine on zarr's loop."""
    decode = getattr(codec, "_decode_sync", None)
    if callable(decode):
        return decode(data, spec)
    from zarr.core.sync import sync

    return sync(codec._decode_single(data, spec))


def _decode_bytes_codec(codec, data: np.ndarray, spec, name: str, key: str, exact: int | None) -> np.ndarray:
    """Undo one bytes->bytes codec of a Zarr v3 chain, checking what it declares first."""
    from zarr.codecs import BloscCodec, Crc32cCodec, GzipCodec, ZstdCodec

    if isinstance(codec, Crc32cCodec):
        return verify_crc32c(data, name, key)
    numcodec = {BloscCodec: "_blosc_codec", ZstdCodec: "_zstd_codec", GzipCodec: "_gzip_codec"}.get(type(codec))
    if numcodec is not None:
        return decode_numcodec(getattr(codec, numcodec), data, name, key, exact)
    inner = getattr(codec, "_codec", None)  # numcodecs codecs wrapped for Zarr v3
    if inner is not None and hasattr(inner, "codec_id"):
        return decode_numcodec(inner, data, name, key, exact)
    prototype = _chunk_context()[1]
    decoded = np.frombuffer(_call(codec, prototype.buffer.from_array_like(data), spec).as_numpy_array(), np.uint8)
    return _bounded(decoded, name, key)


def decode_numcodec(codec, data: np.ndarray, name: str, key: str, exact: int | None) -> np.ndarray:
    """Undo one numcodecs compressor or checksum, never letting it allocate beyond the bound:
    the size a frame declares is checked first, gzip and zlib are inflated here with a limit.

    Parameters
    ----------
    codec : numcodecs.abc.Codec
        The compressor or checksum.
    data : numpy.ndarray
        The encoded bytes (uint8).
    name, key : str
        The chunk's file (or archive and key) and key, for error messages.
    exact : int, optional
        The decoded size the array's metadata implies, when this is the innermost codec.

    Returns
    -------
    numpy.ndarray
        The decoded bytes (uint8).

    Raises
    ------
    attnformat.errors.BrokenStoreError
        For a frame cut short, of the wrong size, past the size bound, or a checksum mismatch.

    Examples
    --------
    >>> import numcodecs, numpy as np
    >>> encoded = np.frombuffer(numcodecs.Zlib().encode(b"attention"), np.uint8)
    >>> bytes(decode_numcodec(numcodecs.Zlib(), encoded, "c/0", "c/0", 9))
    b'attention'
    """
    codec_id = getattr(codec, "codec_id", "")
    limit = exact if exact is not None else MAX_CHUNK_BYTES
    if codec_id == "blosc":
        _check_blosc(data, name, key, exact)
    elif codec_id == "zstd":
        _check_zstd(data, name, key, exact)
    elif codec_id == "lz4":
        declared = int.from_bytes(bytes(data[:4]), "little") if data.size >= 4 else -1
        _check_declared(declared, "is not a whole LZ4 frame (cut short?)", name, key, exact)
    elif codec_id in ("gzip", "zlib"):
        return np.frombuffer(_inflate(data, 31 if codec_id == "gzip" else 15, name, key, limit), np.uint8)
    elif codec_id == "bz2":
        import bz2

        return np.frombuffer(_decompress_streams(bz2.BZ2Decompressor, data, name, key, limit, "bzip2"), np.uint8)
    elif codec_id == "lzma":
        import lzma

        def decompressor():
            return lzma.LZMADecompressor(format=codec.format, filters=codec.filters)

        return np.frombuffer(_decompress_streams(decompressor, data, name, key, limit, "lzma"), np.uint8)
    try:
        decoded = codec.decode(data)
    except Exception as error:
        if codec_id in _CHECKSUM_CODECS:
            raise chunk_error(name, key, "does not match its checksum") from error
        raise
    return _bounded(np.frombuffer(memoryview(decoded).cast("B") if not isinstance(decoded, np.ndarray) else decoded.reshape(-1).view(np.uint8), np.uint8), name, key)


def _bounded(decoded: np.ndarray, name: str, key: str) -> np.ndarray:
    if decoded.nbytes > MAX_CHUNK_BYTES:
        raise chunk_error(name, key, f"decodes to {decoded.nbytes} bytes, more than the {MAX_CHUNK_BYTES} allowed", "ATTN-STORE-006")
    return decoded


def _decode_v2(metadata, raw, name: str, key: str) -> np.ndarray:
    """One whole Zarr v2 chunk: compressor, then filters in reverse, then the chunk's shape."""
    from numcodecs.compat import ensure_ndarray_like

    chunk_shape = tuple(metadata.chunks)
    dtype = _native_dtype(metadata)
    exact = _fixed_nbytes(metadata) if not metadata.filters else None
    data = np.frombuffer(raw, np.uint8)
    if metadata.compressor is not None:
        data = decode_numcodec(metadata.compressor, data, name, key, exact)
    for codec in reversed(metadata.filters or ()):
        try:
            data = codec.decode(data)
        except Exception as error:
            if getattr(codec, "codec_id", "") in _CHECKSUM_CODECS:
                raise chunk_error(name, key, "does not match its checksum") from error
            raise
    chunk = ensure_ndarray_like(data)
    count = math.prod(chunk_shape)
    if chunk.dtype == object or dtype.kind in "OT":
        if chunk.size != count:
            raise chunk_error(name, key, f"decodes to {chunk.size} values, but the array's metadata makes it {count}")
    else:
        expected = count * dtype.itemsize
        if chunk.nbytes != expected:
            raise wrong_size_error(name, key, chunk.nbytes, expected)
        chunk = np.ascontiguousarray(chunk).reshape(-1).view(np.uint8).view(dtype)
    return chunk.reshape(-1, order="A").reshape(chunk_shape, order=metadata.order)


def wrong_size_error(name: str, key: str, found: int, expected: int) -> BrokenStoreError:
    """The error for a chunk that decodes to ``found`` bytes where its array's metadata makes it ``expected``.

    Parameters
    ----------
    name, key : str
        The chunk's file and key.
    found, expected : int
        Decoded and expected sizes in bytes.

    Examples
    --------
    >>> "decodes to 3 bytes" in str(wrong_size_error("w/c/0", "c/0", 3, 4))
    True
    """
    return chunk_error(name, key, f"decodes to {found} bytes, but the array's metadata makes it {expected} bytes")


def _check_declared(declared: int, cut: str, name: str, key: str, exact: int | None) -> None:
    if declared < 0:
        raise chunk_error(name, key, cut)
    if exact is not None and declared != exact:
        raise wrong_size_error(name, key, declared, exact)
    if declared > MAX_CHUNK_BYTES:
        raise chunk_error(name, key, f"declares {declared} decoded bytes, more than the {MAX_CHUNK_BYTES} allowed", "ATTN-STORE-006")


def _check_blosc(data, name: str, key: str, exact: int | None) -> None:
    _check_declared(_blosc_decoded_size(data), "is not a whole Blosc frame (cut short?)", name, key, exact)


def _blosc_decoded_size(raw) -> int:
    """The uncompressed size a Blosc 1 frame declares, or -1 if the frame is not whole.

    The 16-byte header holds version, codec version, flags, type size, then as little-endian
    uint32 the uncompressed size, the block size and the frame's own compressed size. A frame cut
    short (a truncated file) still declares its full size, and the decoder would read past the end
    of the buffer, so the declared compressed size must be the stored one. (numcodecs checks
    neither, and exposes the header only privately.)
    """
    if len(raw) < 16 or int.from_bytes(bytes(raw[12:16]), "little") != len(raw):
        return -1
    return int.from_bytes(bytes(raw[4:8]), "little")


def _check_zstd(data, name: str, key: str, exact: int | None) -> None:
    declared = _zstd_content_size(data)
    if declared is None:
        # numcodecs then decodes by streaming into a growing buffer: nothing bounds it.
        raise chunk_error(name, key, "is a zstd frame that does not declare its decoded size, which cannot be bounded", "ATTN-STORE-006")
    _check_declared(declared, "is not a whole zstd frame (cut short?)", name, key, exact)


def _zstd_content_size(data) -> int | None:
    """The decoded size a zstd frame header declares; None if it declares none; -1 if not a frame."""
    if len(data) < 6 or bytes(data[:4]) != b"\x28\xb5\x2f\xfd":
        return -1
    descriptor = int(data[4])
    single_segment = (descriptor >> 5) & 1
    position = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[descriptor & 3]
    length = (1 if single_segment else 0, 2, 4, 8)[descriptor >> 6]
    if length == 0:
        return None
    if len(data) < position + length:
        return -1
    value = int.from_bytes(bytes(data[position:position + length]), "little")
    return value + 256 if length == 2 else value


def _inflate(data: np.ndarray, wbits: int, name: str, key: str, limit: int) -> bytes:
    """gzip (every member, as numcodecs reads them) or zlib, never producing more than ``limit + 1`` bytes."""
    pieces, total, rest = [], 0, bytes(data)
    while True:
        inflater = zlib.decompressobj(wbits)
        try:
            piece = inflater.decompress(rest, limit + 1 - total)
        except zlib.error as error:
            raise chunk_error(name, key, f"is not a whole {'gzip' if wbits == 31 else 'zlib'} stream ({error})") from error
        pieces.append(piece)
        total += len(piece)
        if total > limit or inflater.unconsumed_tail:
            rule = "ATTN-STORE-006" if limit == MAX_CHUNK_BYTES else "ATTN-STORE-005"
            raise chunk_error(name, key, f"inflates to more than the {limit} bytes its array allows", rule)
        if not inflater.eof:
            raise chunk_error(name, key, f"is not a whole {'gzip' if wbits == 31 else 'zlib'} stream (cut short?)")
        rest = inflater.unused_data
        if wbits != 31 or not rest.strip(b"\0"):
            return b"".join(pieces)


def _decompress_streams(make, data: np.ndarray, name: str, key: str, limit: int, kind: str) -> bytes:
    """bzip2 or lzma streams, one after the other as the standard library reads them, never
    producing more than ``limit + 1`` bytes."""
    pieces, total, rest = [], 0, bytes(data)
    while True:
        decompressor = make()
        try:
            piece = decompressor.decompress(rest, limit + 1 - total)
        except (OSError, EOFError, ValueError) as error:
            raise chunk_error(name, key, f"is not a whole {kind} stream ({error})") from error
        pieces.append(piece)
        total += len(piece)
        if total > limit or (not decompressor.eof and not decompressor.needs_input):
            rule = "ATTN-STORE-006" if limit == MAX_CHUNK_BYTES else "ATTN-STORE-005"
            raise chunk_error(name, key, f"inflates to more than the {limit} bytes its array allows", rule)
        if not decompressor.eof:
            raise chunk_error(name, key, f"is not a whole {kind} stream (cut short?)")
        rest = decompressor.unused_data
        if not rest:
            return b"".join(pieces)


def verify_crc32c(data: np.ndarray, name: str, key: str) -> np.ndarray:
    """The chunk without its trailing CRC32C (Zarr v3 ``crc32c`` codec), which must match.

    Parameters
    ----------
    data : numpy.ndarray
        The chunk's bytes (uint8) with the checksum last.
    name, key : str
        The chunk's file and key, for the error message.

    Raises
    ------
    attnformat.errors.BrokenStoreError
        When the checksum does not match or the chunk is too short to hold one.

    Examples
    --------
    >>> import google_crc32c, numpy as np
    >>> body = b"attention"
    >>> data = np.frombuffer(body + np.uint32(google_crc32c.value(body)).tobytes(), np.uint8)
    >>> bytes(verify_crc32c(data, "c/0", "c/0"))
    b'attention'
    """
    import google_crc32c  # zarr's own dependency for its crc32c codec

    if data.size < 4:
        raise chunk_error(name, key, "is too short to hold its checksum")
    inner = data[:-4]
    if np.uint32(google_crc32c.value(inner)).tobytes() != bytes(data[-4:]):
        raise chunk_error(name, key, "does not match its checksum")
    return inner


@lru_cache(maxsize=1)
def blosc_codec():
    """One shared ``numcodecs.Blosc`` decoder (decoding reads its settings from each frame's header).

    Examples
    --------
    >>> blosc_codec() is blosc_codec()
    True
    """
    import numcodecs

    return numcodecs.Blosc()  # decoding takes everything it needs from the chunk's own header


# -- zarr's private API, confined here ------------------------------------------------------------
# Everything below reaches into zarr-python internals for speed (no event-loop trip to open a
# local root group; one gathered trip for many small reads). Each has a fallback to zarr's public
# API, taken when an internal moved (zarr is pinned below 4, and tests exercise both roads).


def consolidated_root(directory, document_bytes: bytes):
    """A ``zarr.Group`` for a local Zarr v3 directory from its root ``zarr.json`` bytes, or None.

    ``zarr.open_group`` does the same through zarr's event loop, probing for Zarr v2 files on the
    way, at about four times the cost (~1 ms). Parsing stays zarr's own
    (``GroupMetadata.from_dict``); None sends the caller to ``zarr.open_group``, which also
    explains what is wrong with unusual metadata.

    Examples
    --------
    >>> import attnformat, pathlib
    >>> path = pathlib.Path(attnformat.example_path("dense"))
    >>> sorted(consolidated_root(path, (path / "zarr.json").read_bytes()).group_keys())
    ['encoder']
    """
    try:
        document = json.loads(document_bytes)
    except ValueError:
        return None
    if not isinstance(document, dict) or document.get("node_type") != "group" or not document.get("consolidated_metadata"):
        return None
    try:
        import zarr
        from zarr.core.group import AsyncGroup, GroupMetadata
        from zarr.storage import LocalStore, StorePath
    except ImportError:  # internals moved: the public road
        return None
    try:
        metadata = GroupMetadata.from_dict(document)
        return zarr.Group(AsyncGroup(metadata, StorePath(LocalStore(directory, read_only=True))))
    except Exception:  # zarr raises its own classes for damaged metadata; open_group reports them
        return None


def read_with_zarr(arrays: list, on_error) -> list[np.ndarray]:
    """Read whole zarr arrays with zarr-python (layouts this module does not decode, e.g.
    sharding), gathered into one trip to zarr's event loop when its internals allow.

    ``on_error(array, error)`` returns the exception to raise for a failed read.

    Examples
    --------
    >>> import zarr
    >>> array = zarr.create_array(zarr.storage.MemoryStore(), shape=(3,), dtype="int8", fill_value=7)
    >>> read_with_zarr([array], lambda array, error: error)[0].tolist()
    [7, 7, 7]
    """
    try:
        import asyncio

        from zarr.core.sync import sync
    except ImportError:
        sync = None

    def public(array):
        try:
            return np.asarray(array[...])
        except (AttnFormatError, MemoryError):
            raise
        except Exception as error:  # codecs and stores raise many classes for damaged bytes
            raise on_error(array, error) from error

    if sync is None or not all(hasattr(array, "_async_array") for array in arrays):
        return [public(array) for array in arrays]

    async def read_one(array):
        try:
            return await array._async_array.getitem(...)
        except (AttnFormatError, MemoryError):
            raise
        except Exception as error:
            raise on_error(array, error) from error

    async def read_all():
        return await asyncio.gather(*(read_one(array) for array in arrays))

    return [np.asarray(values) for values in sync(read_all())]
