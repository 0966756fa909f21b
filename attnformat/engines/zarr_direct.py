"""A local Zarr v3 directory read without zarr-python or xarray: the road of one plot.

Why this exists: a fresh process that plots one map should cost about what loading the map from
a ``.npy`` and drawing it costs. Measured with ``python -X importtime`` on this project's machine,
``import xarray`` takes 0.7-0.9 s (pandas is most of it) and ``import zarr`` 0.6-0.7 s, while
Python, numpy and ``matplotlib.pyplot`` take about 0.8 s together: either import alone would make
one plot cost twice the plain script. So for the files attnformat writes (a local directory,
Zarr v3, consolidated metadata) this module reads the root ``zarr.json`` and the chunks a
selection touches with numpy, numcodecs (0.1 s to import) and google_crc32c, and nothing else.

Decision: a small, closed set of layouts, everything else left to the general road. An array is
read here only when its metadata is exactly what this module understands: a regular chunk grid,
the ``default`` (or ``v2``) chunk key encoding, no storage transformers, a data type among
``bool``, integers, ``float16/32/64`` and ``string``, and a codec chain of ``bytes`` (or
``vlen-utf8`` for strings), then any of ``blosc``, ``zstd``, ``gzip``, then an optional
``crc32c``. Attributes asking for CF decoding (scale factors, integer fill values, time units)
anywhere in the file also send it to the general road, as they send the tree road to xarray's
own decoding. :func:`open_directory` and :meth:`ZarrDirectory.array`
answer None whenever something is not understood; callers then open the tree, which decodes
and explains exactly as before. Nothing here ever guesses.

The safety checks are the ones of every other road, and the same code:

- the whole store is screened first, as :func:`attnformat.open` screens it
  (:func:`attnformat.engines.zarr_screen.screen_zarr`: every file a regular file or folder, no
  link, FIFO or device at any depth [ATTN-STORE-004]; every metadata document bounded, parsed as
  data and screened for pickle codecs [ATTN-STORE-003] and sizes beyond the spec's bounds
  [ATTN-STORE-006]; node documents agreeing with their consolidated copies [ATTN-STORE-005]).
  For a small file this costs a few milliseconds, nothing next to starting Python, and it means
  that a file refused by one road is refused by every road;
- the root document is then read again through the pinned directory, bounded before it is
  read, opened without following a link [ATTN-STORE-004], and screened as data again
  (:func:`attnformat.engines.zarr_screen.screen_document`), since it is what this road parses;
- the directory is pinned (:func:`attnformat.engines.placement.pin_directory`): a writer swapping
  in a new version meanwhile leaves this reader on the old one whole;
- every chunk is opened by :func:`attnformat.engines.zarr_screen.open_regular_file` (no link, no
  FIFO, a regular file only), checked against the array's chunk manifest
  (:func:`attnformat.engines.zarr_manifest.check`: bytes written for another key, or a chunk the
  manifest does not list [ATTN-STORE-005]), its CRC32C trailer verified, every decompressor
  bounded by the size the chunk must decode to (the checked decoders of
  :mod:`attnformat.engines.zarr_sync`), and the result must have exactly the chunk's size
  [ATTN-STORE-005]; a chunk listed in the manifest, or any chunk of an attention variable of a
  complete file, that is missing is damage [ATTN-STORE-007].

Like :func:`attnformat.open`, this road checks the chunks it reads, not every chunk of the file:
``attnformat validate`` reads them all.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import weakref
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import product

import numpy as np

from attnformat.conventions import MAX_METADATA_DOCUMENT_BYTES
from attnformat.engines import zarr_manifest, zarr_sync
from attnformat.engines.placement import pin_directory
from attnformat.engines.zarr_screen import open_regular_file, screen_document, screen_zarr
from attnformat.errors import AttnFormatError

#: Zarr v3 data types read here, as numpy types (strings: Python ``str`` objects).
_DATA_TYPES = {
    "bool": "bool", "int8": "i1", "int16": "i2", "int32": "i4", "int64": "i8", "uint8": "u1", "uint16": "u2",
    "uint32": "u4", "uint64": "u8", "float16": "f2", "float32": "f4", "float64": "f8", "string": "O",
}
#: Attributes that ask for CF decoding (as :data:`attnformat.engines.zarr.CF_ENCODING_ATTRS`).
_CF_ATTRS = ("scale_factor", "add_offset", "_Unsigned", "calendar", "dtype", "missing_value")
#: Attributes the tree never shows (storage bookkeeping).
_HIDDEN_ATTRS = ("_ARRAY_DIMENSIONS", "_FillValue", zarr_manifest.MANIFEST_ATTR, "coordinates")


# -- codecs: named as zarr-python names its classes, which is what zarr_manifest looks at ----------


class BytesCodec:
    """``bytes``: fixed-size values in the given byte order."""

    def __init__(self, endian: str | None):
        self.endian = endian


class VLenUTF8Codec:
    """``vlen-utf8``: variable-length UTF-8 strings (numcodecs' layout)."""


class BloscCodec:
    """``blosc`` compression (everything needed to decode is in each frame's header)."""

    codec_id = "blosc"


class ZstdCodec:
    """``zstd`` compression."""

    codec_id = "zstd"


class GzipCodec:
    """``gzip`` compression."""

    codec_id = "gzip"


class Crc32cCodec:
    """``crc32c``: a CRC-32C of the chunk's bytes appended to them."""


_COMPRESSORS = {"blosc": BloscCodec, "zstd": ZstdCodec, "gzip": GzipCodec}


@lru_cache(maxsize=None)
def _numcodec(codec_id: str):
    """The numcodecs decoder of one compressor (imported on the first chunk that needs it)."""
    if codec_id == "blosc":
        return zarr_sync.blosc_codec()
    if codec_id == "zstd":
        from numcodecs import Zstd

        return Zstd()
    return GzipCodec()  # gzip is inflated by zarr_sync itself, with a bound; only the id is read


@lru_cache(maxsize=1)
def _vlen_utf8():
    from numcodecs.vlen import VLenUTF8

    return VLenUTF8()


# -- arrays ---------------------------------------------------------------------------------------


@dataclass
class DirectArray:
    """One array of the store, as far as this module reads it (see the module docstring)."""

    path: str
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    dtype: np.dtype
    fill_value: object
    codecs: tuple
    attributes: dict
    separator: str
    v2_keys: bool
    zarr_format: int = 3

    @property
    def attrs(self) -> dict:
        """Attributes as the tree shows them (without storage bookkeeping)."""
        return {key: value for key, value in self.attributes.items() if key not in _HIDDEN_ATTRS}

    @property
    def coordinate_names(self) -> list[str]:
        """Names listed in the array's own ``coordinates`` attribute."""
        return str(self.attributes.get("coordinates", "")).split()

    def chunk_key(self, coords: tuple[int, ...]) -> str:
        if self.v2_keys:
            return self.separator.join(map(str, coords)) if coords else "0"
        return self.separator.join(("c", *map(str, coords)))


def _parse_array(path: str, document: dict) -> DirectArray | None:
    """The array a consolidated metadata entry describes, or None when this module does not read it."""
    try:
        if document.get("zarr_format") != 3 or document.get("node_type") != "array" or document.get("storage_transformers"):
            return None
        shape = tuple(document["shape"])
        names = document.get("dimension_names")
        grid = document["chunk_grid"]
        if not isinstance(names, list) or len(names) != len(shape) or not all(isinstance(n, str) for n in names):
            return None  # no dimension names: the general road refuses it [ATTN-STORE-001]
        if grid.get("name") != "regular":
            return None
        chunk_shape = tuple(grid["configuration"]["chunk_shape"])
        if len(chunk_shape) != len(shape) or not all(type(c) is int and c > 0 for c in chunk_shape):
            return None
        if not all(type(s) is int and s >= 0 for s in shape):
            return None
        encoding = document.get("chunk_key_encoding") or {}
        if encoding.get("name") not in ("default", "v2"):
            return None
        separator = (encoding.get("configuration") or {}).get("separator", "/" if encoding["name"] == "default" else ".")
        if separator not in ("/", "."):
            return None
        data_type = document.get("data_type")
        if not isinstance(data_type, str) or data_type not in _DATA_TYPES:
            return None
        codecs = _parse_codecs(document.get("codecs"), data_type)
        if codecs is None:
            return None
        endian = codecs[0].endian if isinstance(codecs[0], BytesCodec) else None
        dtype = np.dtype(_DATA_TYPES[data_type])
        if dtype.itemsize > 1 and dtype.kind != "O":
            if endian not in ("little", "big"):
                return None
            dtype = dtype.newbyteorder("<" if endian == "little" else ">")
        fill_value = _fill_value(document.get("fill_value"), dtype)
        if fill_value is _UNREAD:
            return None
        attributes = document.get("attributes") or {}
        if not isinstance(attributes, dict) or _needs_cf_decoding(attributes, dtype.kind):
            return None
    except (KeyError, TypeError, AttributeError, ValueError):
        return None  # malformed metadata: the general road explains what is wrong
    return DirectArray(path, tuple(names), shape, chunk_shape, dtype, fill_value, codecs, attributes, separator,
                       encoding["name"] == "v2")


def _parse_codecs(codecs, data_type: str) -> tuple | None:
    if not isinstance(codecs, list) or not codecs:
        return None
    parsed = []
    for position, codec in enumerate(codecs):
        if not isinstance(codec, dict):
            return None
        name, configuration = codec.get("name"), codec.get("configuration") or {}
        if position == 0:
            if name == "bytes" and data_type != "string":
                parsed.append(BytesCodec(configuration.get("endian")))
            elif name == "vlen-utf8" and data_type == "string":
                parsed.append(VLenUTF8Codec())
            else:
                return None
        elif name in _COMPRESSORS and not isinstance(parsed[-1], Crc32cCodec):
            parsed.append(_COMPRESSORS[name]())
        elif name == "crc32c" and position == len(codecs) - 1:
            parsed.append(Crc32cCodec())
        else:
            return None
    return tuple(parsed)


_UNREAD = object()


def _fill_value(value, dtype: np.dtype):
    if dtype.kind == "O":
        return value if isinstance(value, str) else _UNREAD
    if dtype.kind == "b":
        return value if isinstance(value, bool) else _UNREAD
    if dtype.kind in "iu":
        return value if type(value) is int else _UNREAD
    if isinstance(value, str):
        named = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
        if value in named:
            return named[value]
        if value.startswith("0x"):
            raw = bytes.fromhex(value[2:])
            if len(raw) != dtype.itemsize:
                return _UNREAD
            return float(np.frombuffer(raw, dtype.newbyteorder(">"))[0])
        return _UNREAD
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _UNREAD


def _needs_cf_decoding(attributes: dict, kind: str) -> bool:
    """As the tree road decides for an array of numpy kind ``kind``
    (:func:`attnformat.engines.zarr._needs_cf_decoding`)."""
    if any(name in attributes for name in _CF_ATTRS):
        return True
    units = attributes.get("units")
    if isinstance(units, str) and " since " in units:
        return True
    return "_FillValue" in attributes and kind not in "fcOSUT"


# -- the store ------------------------------------------------------------------------------------


@dataclass
class ZarrDirectory:
    """A pinned local Zarr v3 directory, its screened consolidated metadata, and checked reads.

    ``version`` is the SHA-256 of the root document, which holds every node's metadata and,
    for files attnformat wrote, every array's chunk manifest: it names this version of the file.
    ``sealed`` is True when every array has a chunk manifest (then the root document pins the
    CRC-32C of every stored chunk, and any other chunk is refused when read).
    """

    text: str
    root: str
    display_root: str
    nodes: dict
    version: str
    _close: object = field(repr=False, default=None)

    @property
    def groups(self) -> dict[str, dict]:
        """Group path (``""`` for the root) -> attributes."""
        return {path: node["attributes"] for path, node in self.nodes.items() if node["node_type"] == "group"}

    @property
    def sealed(self) -> bool:
        return all(isinstance((node.get("attributes") or {}).get(zarr_manifest.MANIFEST_ATTR), dict)
                   for node in self.nodes.values() if node["node_type"] == "array")

    def members(self, group: str) -> list[str]:
        """Names of the arrays directly in ``group``, in the order of the consolidated metadata."""
        return [path.rpartition("/")[2] for path, node in self.nodes.items()
                if node["node_type"] == "array" and path.rpartition("/")[0] == group]

    def array(self, path: str) -> DirectArray | None:
        """The array at ``path``, or None when it is not one this module reads."""
        node = self.nodes.get(path)
        if node is None or node["node_type"] != "array":
            return None
        if "parsed" not in node:
            node["parsed"] = _parse_array(path, node["document"])
        return node["parsed"]

    def read(self, array: DirectArray, selection: tuple = (), *, chunks_required: bool = False) -> np.ndarray:
        """``array[selection]`` (per dimension an integer or ``slice(None)``; missing ones mean all).

        Strings come back as Python ``str`` objects (object dtype), other values in native byte
        order. Raises :class:`attnformat.errors.BrokenStoreError` naming the chunk for damage.
        """
        selection = tuple(selection) + (slice(None),) * (len(array.shape) - len(selection))
        bounds = []
        for item, size in zip(selection, array.shape):
            if isinstance(item, slice):
                if item != slice(None):
                    raise ValueError("only integers and whole dimensions are read here")
                bounds.append((0, size))
            else:
                index = int(item)
                if not -size <= index < size:
                    raise IndexError(f"index {item} is out of bounds for a dimension of size {size}")
                index %= size
                bounds.append((index, index + 1))
        native = array.dtype.newbyteorder("=") if array.dtype.kind != "O" else array.dtype
        region = np.empty(tuple(stop - start for start, stop in bounds), native)
        if region.size:
            ranges = [range(start // c, -(-stop // c)) for (start, stop), c in zip(bounds, array.chunk_shape)]
            for coords in product(*ranges):
                self._fill(array, coords, bounds, region, chunks_required)
        return region[tuple(0 if not isinstance(item, slice) else slice(None) for item in selection)]

    def _fill(self, array: DirectArray, coords, bounds, region: np.ndarray, chunks_required: bool) -> None:
        inside, target = [], []
        for (start, stop), c, k in zip(bounds, array.chunk_shape, coords):
            low, high = max(start, k * c), min(stop, (k + 1) * c)
            inside.append(slice(low - k * c, high - k * c))
            target.append(slice(low - start, high - start))
        key = array.chunk_key(coords)
        location = f"{array.path}/{key}"
        name = os.path.join(self.display_root, location)
        manifest = zarr_manifest.expected_chunks(array)
        try:
            with zarr_sync.open_chunk(os.path.join(self.root, location)) as raw:
                if raw is None:
                    if chunks_required or key in (manifest or ()):
                        raise zarr_sync.chunk_error(name, location, "is missing (never written, or lost)", "ATTN-STORE-007")
                    region[tuple(target)] = array.fill_value
                    return
                if manifest is not None:
                    zarr_manifest.check(array, key, raw, name, location)
                _copy_chunk(array, raw, name, location, region, tuple(target), tuple(inside))
        except AttnFormatError:
            raise
        except MemoryError:
            raise
        except Exception as error:  # codecs raise many classes for damaged bytes
            raise zarr_sync.chunk_error(name, location, f"cannot be decoded ({type(error).__name__}: {zarr_sync.short_message(error)})") from error


def _copy_chunk(array: DirectArray, raw, name: str, key: str, region: np.ndarray, target: tuple, inside: tuple) -> None:
    # Decoded values may be a view of ``raw`` (a memory map for large chunks): they are copied out
    # here, and every view is gone when this returns, before the map is closed.
    region[target] = _decode(array, raw, name, key)[inside]


def _decode(array: DirectArray, raw, name: str, key: str) -> np.ndarray:
    """One whole chunk, every step checked (see the module docstring)."""
    codecs = list(array.codecs)
    data = np.frombuffer(raw, np.uint8)
    if isinstance(codecs[-1], Crc32cCodec):
        data = zarr_sync.verify_crc32c(data, name, key)
        codecs.pop()
    serializer, compressors = codecs[0], codecs[1:]
    count = math.prod(array.chunk_shape)
    exact = count * array.dtype.itemsize if isinstance(serializer, BytesCodec) else None
    for position, codec in enumerate(reversed(compressors)):
        innermost = position == len(compressors) - 1
        data = zarr_sync.decode_numcodec(_numcodec(codec.codec_id), data, name, key, exact if innermost else None)
    if isinstance(serializer, BytesCodec):
        if data.size != exact:
            raise zarr_sync.wrong_size_error(name, key, data.size, exact)
        return np.frombuffer(data, array.dtype).reshape(array.chunk_shape)
    # vlen-utf8: a little-endian uint32 count of items, then per item its length and its bytes.
    # The count is checked before numcodecs allocates an object array of that many items.
    declared = int.from_bytes(bytes(data[:4]), "little") if data.size >= 4 else -1
    if declared != count:
        raise zarr_sync.chunk_error(name, key, f"declares {declared} strings, but the array's metadata makes it {count}")
    strings = _vlen_utf8().decode(np.ascontiguousarray(data))
    if strings.size != count:
        raise zarr_sync.chunk_error(name, key, f"decodes to {strings.size} values, but the array's metadata makes it {count}")
    return np.asarray(strings, dtype=object).reshape(array.chunk_shape)


def open_directory(location, *, screen: bool = True) -> ZarrDirectory | None:
    """The direct reader of a local Zarr v3 directory with consolidated metadata, or None.

    None means that this road does not apply (a URL, a file, Zarr v2, no consolidated metadata,
    metadata this module does not understand); the caller then takes the general road, which
    also explains anything wrong. Unsafe metadata raises :class:`BrokenStoreError` here as on
    every road. ``screen=False`` leaves out the screening of the whole store (never the
    screening of the root document this road parses, nor any check of a chunk it reads): for
    :func:`attnformat.read_map`, whose one-map road has never walked the store.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.engines import Location
    >>> store = open_directory(Location.of(attnformat.example_path("dense")))
    >>> store.read(store.array("encoder/self/weights"), (1, 2)).shape
    (6, 6)
    """
    if location.is_url:
        return None
    path = location.path
    if not path.is_dir():
        return None
    if screen:
        screen_zarr(location)  # as the tree road does, before anything is parsed
    descriptor, pinned = pin_directory(path)
    try:
        handle = open_regular_file(os.path.join(pinned, "zarr.json"))  # a link is refused [ATTN-STORE-004]
        raw = b""
        if handle is not None:
            with os.fdopen(handle, "rb") as stream:
                raw = stream.read(MAX_METADATA_DOCUMENT_BYTES + 1)
        # Too long: the general road refuses it [ATTN-STORE-006]; missing: it explains.
        nodes = _screened_nodes(raw, location.text) if raw and len(raw) <= MAX_METADATA_DOCUMENT_BYTES else None
    except BaseException:
        os.close(descriptor)
        raise
    if nodes is None:
        os.close(descriptor)
        return None
    display = pinned
    if pinned.startswith("/proc/self/fd/"):  # name chunks as the user knows the directory
        try:
            display = os.readlink(pinned)
        except OSError:
            display = str(path)
    store = ZarrDirectory(location.text, pinned, display, {name: dict(node) for name, node in nodes.items()},
                          hashlib.sha256(raw).hexdigest())
    store._close = weakref.finalize(store, os.close, descriptor)  # pinned for as long as the store is used
    return store


def version_of(location) -> tuple[str, bool] | None:
    """``(version, sealed)`` of a local Zarr v3 directory (see :class:`ZarrDirectory`), or None.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.engines import Location
    >>> version, sealed = version_of(Location.of(attnformat.example_path("dense")))
    >>> len(version), sealed
    (64, True)
    """
    store = open_directory(location)
    return None if store is None else (store.version, store.sealed)


@lru_cache(maxsize=32)
def _screened_nodes(raw: bytes, where: str) -> dict | None:
    # A pure function of the document's bytes (and the name messages use): the last few results
    # are kept, so reading the same file again re-reads and re-hashes its bytes but does not parse
    # or screen them again. Screening is part of the parse, so a kept result is a screened one.
    # Callers copy the node dictionaries they annotate.
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError):
        return None  # the general road explains
    if not isinstance(document, dict) or document.get("zarr_format") != 3 or document.get("node_type") != "group":
        return None
    consolidated = document.get("consolidated_metadata")
    entries = consolidated.get("metadata") if isinstance(consolidated, dict) else None
    if not isinstance(entries, dict):
        return None
    screen_document(document, "zarr.json", where)  # pickle codecs, declared sizes [ATTN-STORE-003/006]
    nodes = {"": {"node_type": "group", "attributes": document.get("attributes") or {}}}
    for name, entry in entries.items():
        if not isinstance(name, str) or not isinstance(entry, dict) or entry.get("node_type") not in ("group", "array"):
            return None
        attributes = entry.get("attributes") or {}
        if not isinstance(attributes, dict):
            return None
        if entry["node_type"] == "array":
            data_type = entry.get("data_type")
            kind = np.dtype(_DATA_TYPES[data_type]).kind if isinstance(data_type, str) and data_type in _DATA_TYPES else "V"
            if _needs_cf_decoding(attributes, kind):
                # The tree road then decodes the whole file as xarray does (masking fill values
                # of every array, not only this one's): so does the general road here.
                return None
        nodes[name] = {"node_type": entry["node_type"], "attributes": attributes, "document": entry}
    return nodes
