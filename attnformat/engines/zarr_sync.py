"""Synchronous reads of Zarr v3 arrays, in the caller's thread, through zarr-python's own codecs.

Why this exists: one attention map is one chunk of about 1 MiB, and decoding it takes 0.1-0.2 ms.
Going through zarr-python's event loop, or through TensorStore's thread pools, costs as much again
in thread hand-offs and per-call setup. zarr-python declares which stores can read synchronously
(``zarr.abc.store.SupportsGetSync``: local directories) and which codecs can decode synchronously
(``zarr.abc.codec.SupportsSyncCodec``: bytes, blosc, zstd, gzip, crc32c, transpose, vlen-utf8);
this module only chains those pieces for the chunks a selection touches, the way zarr's codec
pipeline does. For anything else (sharding, Zarr v2, zip or remote stores, a codec without a
synchronous side) :func:`can_read` says no, and callers read through TensorStore or zarr-python.

Selections are what xarray's outer indexing hands a backend array: per dimension an integer or a
slice with a positive step. A map stored in several chunks (strips of rows) is decoded on a small
thread pool, each strip straight into its place (the codecs release the GIL).
"""

from __future__ import annotations

import json
import mmap
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from itertools import product

import numpy as np

from attnformat.errors import UnreadableFileError


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
    """True if this module can read the array: Zarr v3, regular chunks, synchronous store and codecs.

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


def read(metadata, store_path, selection: tuple = ()) -> np.ndarray:
    """Read ``array[selection]`` (integers and slices, one per dimension; missing ones mean all).

    ``metadata`` and ``store_path`` are a ``zarr.Array``'s ``.metadata`` and ``.store_path`` (or
    built from a consolidated metadata document); check :func:`can_read` first. Chunks that were
    never written read as the array's fill value, as in zarr.

    Examples
    --------
    >>> import numpy as np, zarr
    >>> array = zarr.create_array(zarr.storage.MemoryStore(), shape=(2, 3, 4), chunks=(1, 3, 2), dtype="float32")
    >>> array[...] = np.arange(24, dtype="float32").reshape(2, 3, 4)
    >>> read(array.metadata, array.store_path, (1, slice(None), slice(1, 3))).tolist()
    [[13.0, 14.0], [17.0, 18.0], [21.0, 22.0]]
    """
    shape = metadata.shape
    chunk_shape = metadata.chunk_grid.chunk_shape
    selection = tuple(selection) + (slice(None),) * (len(shape) - len(selection))
    if len(selection) != len(shape):
        raise IndexError(f"too many indices for an array of {len(shape)} dimensions")

    # Per dimension: the contiguous range [start, stop) read from chunks, and what is then taken
    # out of that range (an integer drops the dimension, a stepped slice subsamples it).
    bounds, takes = [], []
    for item, size in zip(selection, shape):
        if isinstance(item, slice):
            start, stop, step = item.indices(size)
            if step < 0:
                raise IndexError("slices with a negative step are not supported; reverse the result instead")
            if stop <= start:
                start, stop, step = 0, 0, 1  # empty
            bounds.append((start, stop))
            takes.append(slice(None, None, step) if step != 1 else slice(None))
        else:
            index = int(item)
            if not -size <= index < size:
                raise IndexError(f"index {item} is out of bounds for a dimension of size {size}")
            index %= size
            bounds.append((index, index + 1))
            takes.append(0)

    region = np.empty(tuple(stop - start for start, stop in bounds), metadata.data_type.to_native_dtype())
    chunk_ranges = [range(start // c, -(-stop // c)) for (start, stop), c in zip(bounds, chunk_shape)]
    chunk_coords = list(product(*chunk_ranges))

    def fill(coords):
        inside, target, whole = [], [], True
        for (start, stop), c, k in zip(bounds, chunk_shape, coords):
            low, high = max(start, k * c), min(stop, (k + 1) * c)
            inside.append(slice(low - k * c, high - k * c))
            target.append(slice(low - start, high - start))
            whole = whole and high - low == c
        destination = region[tuple(target)]
        if whole and destination.flags.c_contiguous and _decode_chunk_into(metadata, store_path, coords, destination):
            return  # decoded in place: no temporary chunk, no copy
        region[tuple(target)] = _decode_chunk(metadata, store_path, coords)[tuple(inside)]

    if len(chunk_coords) > 1 and region.nbytes >= 1 << 20:  # strips of a large map: side by side
        list(_pool().map(fill, chunk_coords))
    else:
        for coords in chunk_coords:
            fill(coords)
    return region[tuple(takes)]


def read_all(metadata, store_path) -> np.ndarray:
    """Read a whole (small) array, e.g. a coordinate; strings come back as Python ``str`` objects.

    Examples
    --------
    >>> import zarr
    >>> labels = zarr.create_array(zarr.storage.MemoryStore(), shape=(2,), dtype=str)
    >>> labels[:] = ["[CLS]", "hello"]
    >>> read_all(labels.metadata, labels.store_path).tolist()
    ['[CLS]', 'hello']
    """
    return as_object_strings(read(metadata, store_path))


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


def _decode_chunk_into(metadata, store_path, coords: tuple[int, ...], destination: np.ndarray) -> bool:
    """Decode one chunk straight into ``destination`` (C-contiguous, the chunk's shape).

    Only for the codec chains attnformat writes, ``bytes`` in native byte order, alone or followed
    by ``blosc``: numcodecs' Blosc (the library zarr's own blosc codec calls) decompresses into a
    given buffer. A fresh 1 MiB buffer costs about as much in page faults as decoding it, so
    writing the result where it will stay, instead of into a temporary that is then copied, is
    what keeps one map at one decode. Answers False for any other chain.

    A chunk of a local directory store is memory-mapped rather than read (small ones are read):
    the decoder then reads the page cache directly, instead of a fresh buffer the size of the
    chunk that must first be allocated, faulted in and copied into.
    """
    from zarr.codecs import BloscCodec, BytesCodec
    from zarr.storage import LocalStore

    codecs = metadata.codecs
    bytes_codec = codecs[0] if codecs else None
    if not isinstance(bytes_codec, BytesCodec) or len(codecs) > 2 or (len(codecs) == 2 and not isinstance(codecs[1], BloscCodec)):
        return False
    if destination.dtype.itemsize > 1 and (bytes_codec.endian is None or bytes_codec.endian.value != sys.byteorder):
        return False

    def decode(raw) -> None:
        if raw is None:
            destination[...] = metadata.fill_value
            return
        # A damaged or foreign chunk must not leave part of the (uninitialized) result unwritten.
        size = len(raw) if len(codecs) == 1 else _blosc_decoded_size(raw)
        if size != destination.nbytes:
            found = "is not a whole Blosc frame (cut short?)" if size < 0 else f"decodes to {size} bytes"
            raise UnreadableFileError(
                f"{chunk_name}: chunk {found}, but the array's metadata makes "
                f"it {destination.nbytes} bytes; the store is damaged"
            )
        if len(codecs) == 1:
            destination.reshape(-1).view(np.uint8)[...] = np.frombuffer(raw, np.uint8)
        else:
            _blosc().decode(raw, out=destination)

    key = metadata.encode_chunk_key(coords)
    if not isinstance(store_path.store, LocalStore):
        chunk_name = f"{store_path}/{key}"
        encoded = (store_path / key).get_sync(prototype=_chunk_context()[1])
        decode(None if encoded is None else encoded.as_numpy_array())
        return True
    chunk_name = os.path.join(store_path.store.root, store_path.path, key)
    try:
        handle = open(chunk_name, "rb", buffering=0)
    except (FileNotFoundError, NotADirectoryError):
        decode(None)
        return True
    with handle:
        if os.fstat(handle.fileno()).st_size < 1 << 16:
            decode(handle.read())
        else:
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                decode(mapped)
    return True


def _blosc_decoded_size(raw) -> int:
    """The uncompressed size a Blosc 1 frame declares, or -1 if the frame is not whole.

    The 16-byte header holds version, codec version, flags, type size, then as little-endian
    uint32 the uncompressed size, the block size and the frame's own compressed size. A frame cut
    short (a truncated file) still declares its full size, and the decoder would read past the end
    of the buffer, so the declared compressed size must be the stored one. (numcodecs checks
    neither, and exposes the header only privately.)
    """
    if len(raw) < 16 or int.from_bytes(raw[12:16], "little") != len(raw):
        return -1
    return int.from_bytes(raw[4:8], "little")


@lru_cache(maxsize=1)
def _blosc():
    import numcodecs

    return numcodecs.Blosc()  # decoding takes everything it needs from the chunk's own header


def _decode_chunk(metadata, store_path, coords: tuple[int, ...]) -> np.ndarray:
    """One chunk as a numpy array of the chunk's full shape (fill value where never written)."""
    array_config, prototype = _chunk_context()
    spec = metadata.get_chunk_spec(coords, array_config, prototype)
    encoded = (store_path / metadata.encode_chunk_key(coords)).get_sync(prototype=prototype)
    if encoded is None:
        return np.full(spec.shape, metadata.fill_value, dtype=metadata.data_type.to_native_dtype())
    from zarr.abc.codec import ArrayArrayCodec, ArrayBytesCodec, BytesBytesCodec

    array_codecs = [codec for codec in metadata.codecs if isinstance(codec, ArrayArrayCodec)]
    (bytes_codec,) = [codec for codec in metadata.codecs if isinstance(codec, ArrayBytesCodec)]
    compressors = [codec for codec in metadata.codecs if isinstance(codec, BytesBytesCodec)]
    # Encoding ran array->array codecs, then array->bytes, then bytes->bytes, each codec seeing
    # the spec its predecessor produced; decoding walks back through the same specs.
    specs = []
    for codec in array_codecs:
        specs.append(spec)
        spec = codec.resolve_metadata(spec)
    from zarr.codecs import BloscCodec

    for codec in reversed(compressors):
        if isinstance(codec, BloscCodec) and _blosc_decoded_size(encoded.as_numpy_array()) < 0:
            where = os.path.join(store_path.store.root, store_path.path) if hasattr(store_path.store, "root") else str(store_path)
            raise UnreadableFileError(f"{where}/{metadata.encode_chunk_key(coords)}: chunk is not a whole Blosc frame (cut short?); the store is damaged")
        encoded = codec._decode_sync(encoded, spec)
    decoded = bytes_codec._decode_sync(encoded, spec)
    for codec, codec_spec in zip(reversed(array_codecs), reversed(specs)):
        decoded = codec._decode_sync(decoded, codec_spec)
    return decoded.as_numpy_array()
