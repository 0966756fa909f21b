"""Screening a Zarr store before any storage library parses it, and listing the chunks it holds.

A file is hostile until screened. :func:`screen_zarr` reads every metadata document a reader could
parse (bounded in size before reading), parses it exactly as zarr does (``json.loads`` on the raw
bytes, which accepts UTF-8, UTF-16 and UTF-32, with or without a byte order mark), and walks the
parsed data, never the text:

- no codec, filter, compressor or object codec at any depth may be a pickle codec
  [ATTN-STORE-003] (pickle runs code while decoding);
- a Zarr directory holds only regular files and folders: no symbolic link, device file, FIFO or
  socket at any depth [ATTN-STORE-004] (the top path itself may be a link the user chose);
- declared sizes stay within bounds [ATTN-STORE-006]: metadata documents, dimensions, the decoded
  size of one chunk, zip entries and their compression ratio, the number of nodes and their depth.

Local directories are walked completely (no folder is skipped because of its name), zip archives
entry by entry from their central directory, and URLs read exactly the documents zarr reads: the
root's, and every node's when there is no consolidated metadata.

:func:`stored_chunks` lists the chunks one array really stores, from the store's listing, so that
its cost follows what the file holds, not what it declares.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import re
import stat
import zipfile
from pathlib import Path
from typing import Any

from attnformat.conventions import (
    MAX_CHUNK_BYTES,
    MAX_COMPRESSION_RATIO,
    MAX_DIMENSIONS,
    MAX_GROUP_DEPTH,
    MAX_METADATA_DOCUMENT_BYTES,
    MAX_METADATA_TOTAL_BYTES,
    MAX_NODES,
    MAX_ZIP_ENTRY_BYTES,
)
from attnformat.errors import BrokenStoreError, UnreadableFileError

#: Every file name zarr (format 2 or 3) parses as metadata.
METADATA_NAMES = ("zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata")

# Zip entries smaller than this are never zip bombs, whatever their ratio (a 4-byte metadata
# document of zeros deflates to 2 bytes).
_RATIO_EXEMPT_BYTES = 1024 * 1024
# Below the deepest group, a chunk key adds at most one folder per dimension plus "c".
_MAX_FOLDER_DEPTH = MAX_GROUP_DEPTH + MAX_DIMENSIONS + 2
# Bytes per element when the data type says nothing fixed (variable-length strings: a reference).
_VARIABLE_ELEMENT_BYTES = 8
_V3_ITEMSIZES = {
    "bool": 1, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "float16": 2, "int32": 4, "uint32": 4,
    "float32": 4, "int64": 8, "uint64": 8, "float64": 8, "complex64": 8, "complex128": 16,
}


class _Budget:
    """What the screen has read so far, against the bounds of the spec."""

    def __init__(self, where: str):
        self.where = where
        self.metadata_bytes = 0
        self.nodes = 0

    def add_document(self, size: int, key: str) -> None:
        if size > MAX_METADATA_DOCUMENT_BYTES:
            raise _bound(self.where, key, f"metadata document {key} is {size} bytes, more than the {MAX_METADATA_DOCUMENT_BYTES} allowed")
        self.metadata_bytes += size
        if self.metadata_bytes > MAX_METADATA_TOTAL_BYTES:
            raise _bound(self.where, key, f"metadata documents add up to more than the {MAX_METADATA_TOTAL_BYTES} bytes allowed")

    def add_node(self, key: str) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _bound(self.where, key, f"the store holds more than the {MAX_NODES} nodes allowed")


def _bound(where: str, node: str, problem: str) -> BrokenStoreError:
    return BrokenStoreError(
        f"{where}: {problem} [ATTN-STORE-006]; attnformat refuses sizes beyond the bounds of the spec before allocating anything",
        "ATTN-STORE-006",
        location=_node_location(node),
    )


def _outside(where: str, key: str, what: str) -> BrokenStoreError:
    return BrokenStoreError(
        f"{where}: {key} is {what} [ATTN-STORE-004]; a Zarr store holds only regular files and folders "
        "and never refers to files outside itself. Replace it with a copy of the data it points to",
        "ATTN-STORE-004",
        location=_node_location(key),
    )


def _node_location(key: str) -> str:
    key = key.strip("/")
    for name in METADATA_NAMES:
        if key == name:
            return "/"
        if key.endswith("/" + name):
            key = key[: -len(name) - 1]
    return "/" + key


# ----------------------------------------------------------------------------------------------
# Parsing and walking metadata documents


def parse_metadata_document(raw: bytes, key: str, where: str) -> Any:
    """Parse one metadata document exactly as zarr does: ``json.loads`` on its raw bytes.

    ``json.loads`` detects UTF-8, UTF-16 and UTF-32 (little or big endian, with or without a byte
    order mark), so the screen accepts every document zarr accepts, and sees what zarr will see.

    Parameters
    ----------
    raw
        The document's bytes (already bounded by the caller).
    key
        Its key in the store, e.g. ``"encoder/self/weights/zarr.json"``, for messages.
    where
        The file or URL, for messages.

    Examples
    --------
    >>> parse_metadata_document('{"id": "zlib"}'.encode("utf-16"), "x/.zarray", "run.zarr")
    {'id': 'zlib'}
    """
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as error:
        raise UnreadableFileError(f"{where}: metadata document {key} is not valid JSON ({type(error).__name__}); the store is damaged") from error


def names_pickle(value: Any) -> bool:
    """True if a parsed metadata value names a pickle codec anywhere outside its attributes.

    Every string of the document is looked at (codec names, ids, nested configurations of
    sharding codecs...), except user attributes and dimension names, which zarr never resolves to
    a codec. Case does not matter; any name containing ``pickle`` counts.

    Examples
    --------
    >>> names_pickle({"filters": [{"id": "Pickle"}]}), names_pickle({"codecs": ["numcodecs.pickle"]})
    (True, True)
    >>> names_pickle({"zarr_format": 3, "codecs": [{"name": "bytes"}], "attributes": {"note": "no pickle here"}})
    False
    """
    return _first_pickle(value) is not None


def mentions_pickle_codec(text: str | bytes) -> bool:
    """True unless ``text`` is a metadata document that parses and names no pickle codec.

    For callers that hold a document's text and want to know whether it is safe to hand to zarr;
    what cannot be parsed counts as unsafe (the full screen explains what is wrong).

    Examples
    --------
    >>> mentions_pickle_codec('{"filters": [{"id": "pick\\\\u006ce"}]}'), mentions_pickle_codec('{"zarr_format": 3, "attributes": {"note": "no pickle"}}')
    (True, False)
    """
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        return True
    return names_pickle(document)


# Keys of a node document whose values zarr never turns into codecs (the user's own text).
_NOT_CODECS = ("attributes", "dimension_names")


def _is_node_document(value: dict) -> bool:
    # A mapping of node paths (consolidated metadata) may hold a node named "attributes"; only
    # a node's own document, which says its format or type, has attributes to skip.
    return type(value.get("zarr_format")) is int or isinstance(value.get("node_type"), str)


def _first_pickle(document: Any, key: str = "") -> list | None:
    """The key path of the first string naming pickle, or None; iterative (documents may nest deeply).

    Skipped, because zarr only ever reads them as attributes: a node document's ``attributes``
    and ``dimension_names``, a ``.zattrs`` document, and the ``*.zattrs`` entries of a Zarr v2
    ``.zmetadata`` document.
    """
    name = key.rpartition("/")[2]
    if name == ".zattrs":
        return None
    stack: list[tuple[Any, tuple]] = [(document, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if "pickle" in value.casefold():
                return list(path)
        elif isinstance(value, dict):
            node_document = _is_node_document(value)
            v2_entries = name == ".zmetadata" and path == ("metadata",)
            for entry, item in value.items():
                if node_document and entry in _NOT_CODECS:
                    continue
                if v2_entries and isinstance(entry, str) and (entry == ".zattrs" or entry.endswith("/.zattrs")):
                    continue
                stack.append((item, (*path, entry)))
        elif isinstance(value, list):
            stack.extend((item, (*path, index)) for index, item in enumerate(value))
    return None


def _pickled_node(document: Any, key: str, path: list) -> str:
    """The node a pickle name belongs to: the innermost consolidated entry on its path, else the document's node."""
    node = _node_location(key)
    value = document
    for step in path:
        if isinstance(value, dict) and isinstance(step, str) and step not in ("metadata", "consolidated_metadata") and _is_entries(value):
            prefix = "" if node == "/" else node
            node = _node_location(prefix + "/" + step)
        value = value[step]
    return node


def _is_entries(value: dict) -> bool:
    """True for the ``metadata`` mapping of consolidated metadata (node path -> document)."""
    return all(isinstance(item, dict) for item in value.values()) and any(
        isinstance(item, dict) and ("node_type" in item or "zarr_format" in item or "shape" in item) for item in value.values()
    )


def _arrays_in(document: Any, key: str):
    """``(node, array document)`` for every array a metadata document describes, at any depth."""
    base = _node_location(key)
    if key.rpartition("/")[2] == ".zattrs":
        return
    stack = [(document, base)]
    while stack:
        value, node = stack.pop()
        if not isinstance(value, dict):
            continue
        if "shape" in value and ("chunks" in value or "chunk_grid" in value or value.get("node_type") == "array"):
            yield node, value
        for name in ("consolidated_metadata", "metadata"):
            inner = value.get(name)
            if isinstance(inner, dict):
                if name == "metadata":
                    prefix = "" if node == "/" else node
                    for entry, item in inner.items():
                        if isinstance(entry, str) and not (key.endswith(".zmetadata") and entry.endswith(".zattrs")):
                            stack.append((item, _node_location(prefix + "/" + entry)))
                else:
                    stack.append((inner, node))


def _check_pickle(document: Any, key: str, where: str) -> None:
    path = _first_pickle(document, key)
    if path is None:
        return
    node = _pickled_node(document, key, path)
    raise BrokenStoreError(
        f"{where}: {node} uses a pickle codec [ATTN-STORE-003]; attnformat never unpickles "
        "stored data (it could run code). Store strings as variable-length UTF-8 instead",
        "ATTN-STORE-003",
        location=node,
    )


def _ints(value: Any, *, positive: bool) -> bool:
    return isinstance(value, list) and all(type(item) is int and (item > 0 if positive else item >= 0) for item in value)


def _itemsize(array: dict) -> int:
    """Bytes per element an array's data type declares (a reference's size for variable ones)."""
    data_type = array.get("data_type", array.get("dtype"))
    if isinstance(data_type, str):
        if data_type in _V3_ITEMSIZES:
            return _V3_ITEMSIZES[data_type]
        match = re.fullmatch(r"r(\d+)", data_type)
        if match:
            return max(1, int(match.group(1)) // 8)
        match = re.fullmatch(r"[<>|=]?[a-zA-Z](\d+)", data_type)  # Zarr v2: "<f4", "|S12", "<U5"
        if match:
            return max(1, int(match.group(1)) * (4 if data_type.lstrip("<>|=")[0] == "U" else 1))
    if isinstance(data_type, dict):
        length = (data_type.get("configuration") or {}).get("length_bytes") if isinstance(data_type.get("configuration"), dict) else None
        if type(length) is int and length > 0:
            return length
    if isinstance(data_type, list):  # Zarr v2 structured types: [[name, type, shape?], ...]
        return sum(_itemsize({"dtype": field[1]}) * math.prod(field[2] if len(field) > 2 and _ints(field[2], positive=False) else [1])
                   for field in data_type if isinstance(field, list) and len(field) >= 2) or _VARIABLE_ELEMENT_BYTES
    return _VARIABLE_ELEMENT_BYTES


def _check_array_bounds(array: dict, node: str, where: str) -> None:
    """Shapes are lists of non-negative integers; dimensions and one chunk's decoded size bounded."""
    shape = array.get("shape")
    if not _ints(shape, positive=False):
        raise _bound(where, node, f"{node} declares shape {str(shape)[:80]}, not a list of non-negative integers")
    if len(shape) > MAX_DIMENSIONS:
        raise _bound(where, node, f"{node} has {len(shape)} dimensions, more than the {MAX_DIMENSIONS} allowed")
    if math.prod(shape) >= 1 << 63:
        raise _bound(where, node, f"{node} declares {math.prod(shape)} elements, more than 2**63")
    grid = array.get("chunk_grid")
    if "chunks" in array:
        chunks = array["chunks"]
    elif isinstance(grid, dict) and isinstance(grid.get("configuration"), dict):
        chunks = grid["configuration"].get("chunk_shape")
    else:
        return  # a chunk grid zarr does not read; zarr refuses it
    if not _ints(chunks, positive=True) or len(chunks) != len(shape):
        raise _bound(where, node, f"{node} declares chunk shape {str(chunks)[:80]}, not {len(shape)} positive integers")
    itemsize = _itemsize(array)
    for codec in array.get("codecs") or []:
        if isinstance(codec, dict) and codec.get("name") == "sharding_indexed":
            inner = (codec.get("configuration") or {}).get("chunk_shape") if isinstance(codec.get("configuration"), dict) else None
            if not _ints(inner, positive=True) or len(inner) != len(shape):
                raise _bound(where, node, f"{node} declares inner chunk shape {str(inner)[:80]}, not {len(shape)} positive integers")
            per_shard = math.prod(-(-outer // size) for outer, size in zip(chunks, inner))
            if per_shard > MAX_NODES:
                raise _bound(where, node, f"{node} declares {per_shard} chunks per shard, more than the {MAX_NODES} allowed")
            chunks = inner
    decoded = math.prod(chunks) * itemsize
    if decoded > MAX_CHUNK_BYTES:
        raise _bound(where, node, f"one chunk of {node} decodes to {decoded} bytes, more than the {MAX_CHUNK_BYTES} allowed")


def screen_document(document: bytes | Any, key: str, where: str, budget: _Budget | None = None) -> Any:
    """Bound, parse and screen one metadata document; return the parsed document.

    ``document`` is the document's raw bytes (parsed here exactly as zarr parses them) or a
    document already parsed that way. Raises :class:`BrokenStoreError` for a pickle codec
    [ATTN-STORE-003] or a declared size beyond the spec's bounds [ATTN-STORE-006] anywhere in it,
    including every entry of consolidated metadata.

    Parameters
    ----------
    document
        Raw bytes, or the parsed document.
    key
        The document's key in the store (``"zarr.json"``, ``"encoder/self/weights/.zarray"``).
    where
        The file or URL, for messages.
    budget
        What the screen of the whole store has read so far (internal).

    Examples
    --------
    >>> screen_document(b'{"zarr_format": 3, "node_type": "group"}', "zarr.json", "run.zarr")["node_type"]
    'group'
    >>> screen_document({"filters": [{"id": "pickle"}], "shape": [1], "chunks": [1]}, "x/.zarray", "run.zarr")
    Traceback (most recent call last):
    attnformat.errors.BrokenStoreError: run.zarr: /x uses a pickle codec [ATTN-STORE-003]; ...
    """
    if isinstance(document, (bytes, bytearray, memoryview)):
        (budget or _Budget(where)).add_document(len(document), key)
        document = parse_metadata_document(bytes(document), key, where)
    _check_pickle(document, key, where)
    depth = key.count("/")
    if depth > MAX_GROUP_DEPTH:
        raise _bound(where, key, f"{_node_location(key)} is nested {depth} deep, more than the {MAX_GROUP_DEPTH} allowed")
    for count, (node, array) in enumerate(_arrays_in(document, key)):
        if count >= MAX_NODES:
            raise _bound(where, key, f"{key} describes more than the {MAX_NODES} nodes allowed")
        if node.count("/") > MAX_GROUP_DEPTH + 1:
            raise _bound(where, node, f"{node} is nested more than the {MAX_GROUP_DEPTH} allowed")
        _check_array_bounds(array, node, where)
    return document


# ----------------------------------------------------------------------------------------------
# Local files


def open_regular_file(path: str | os.PathLike, *, dir_fd: int | None = None) -> int | None:
    """Open a file of a store for reading: a file descriptor, or None if nothing is there.

    Never follows a symbolic link, never blocks on a FIFO, and refuses anything but a regular
    file [ATTN-STORE-004], so that a link or a FIFO swapped in after screening is still refused.

    Examples
    --------
    >>> import os, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> open_regular_file(os.path.join(folder, "missing")) is None
    True
    >>> os.symlink("/etc/hostname", os.path.join(folder, "link"))
    >>> open_regular_file(os.path.join(folder, "link"))
    Traceback (most recent call last):
    attnformat.errors.BrokenStoreError: ...link is a symbolic link [ATTN-STORE-004]; ...
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(path, flags, dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise BrokenStoreError(
                f"{os.fspath(path)} is a symbolic link [ATTN-STORE-004]; a Zarr store holds only regular files and "
                "folders and never refers to files outside itself. Replace it with a copy of the data it points to",
                "ATTN-STORE-004",
                location=os.fspath(path),
            ) from error
        raise
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        raise BrokenStoreError(
            f"{os.fspath(path)} is {_kind(mode)} [ATTN-STORE-004]; a Zarr store holds only regular files and folders "
            "and never refers to files outside itself",
            "ATTN-STORE-004",
            location=os.fspath(path),
        )
    return descriptor


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def _read_bounded(descriptor: int, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of an open file (one more than allowed tells it is too long)."""
    parts, size = [], 0
    while size <= limit:
        part = os.read(descriptor, min(1 << 20, limit + 1 - size))
        if not part:
            break
        parts.append(part)
        size += len(part)
    return b"".join(parts)


def _walk_directory(root: Path, where: str):
    """Yield ``(relative key, directory fd, name, is metadata)`` for every file under ``root``.

    Folders are opened relative to their parent without following links, so the walk never
    leaves the store; every entry is checked by its type without following links.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))  # the top may be a link the user chose
    except OSError as error:
        raise UnreadableFileError(f"{where}: cannot open the store's folder ({error.strerror})") from error
    stack = [(top, "")]
    try:
        while stack:
            descriptor, prefix = stack.pop()
            try:
                with os.scandir(descriptor) as entries:
                    listed = [(entry.name, _entry_mode(entry, descriptor)) for entry in entries]
                for name, mode in listed:
                    key = prefix + name
                    if stat.S_ISDIR(mode):
                        if key.count("/") + 1 > _MAX_FOLDER_DEPTH:
                            raise _bound(where, key, f"{key} is nested more than {_MAX_FOLDER_DEPTH} folders deep")
                        try:
                            child = os.open(name, flags, dir_fd=descriptor)
                        except OSError as error:
                            if error.errno == errno.ELOOP:
                                raise _outside(where, key, "a symbolic link") from error
                            raise UnreadableFileError(f"{where}: cannot open folder {key} ({error.strerror})") from error
                        stack.append((child, key + "/"))
                    elif stat.S_ISREG(mode):
                        yield key, descriptor, name
                    else:
                        raise _outside(where, key, _kind(mode))
            finally:
                os.close(descriptor)
    finally:
        for descriptor, _ in stack:
            os.close(descriptor)


def _entry_mode(entry: os.DirEntry, descriptor: int) -> int:
    # DirEntry answers from the folder listing's file type where the file system gives one.
    if entry.is_symlink():
        return stat.S_IFLNK
    if entry.is_dir(follow_symlinks=False):
        return stat.S_IFDIR
    if entry.is_file(follow_symlinks=False):
        return stat.S_IFREG
    return os.stat(entry.name, dir_fd=descriptor, follow_symlinks=False).st_mode


def _consistent(documents: dict, where: str) -> None:
    """Refuse a store whose consolidated metadata disagrees with a node's own document
    [ATTN-STORE-005]: readers take the consolidated copy, other tools the node's, so the same
    file would read differently (a shape or a codec changed in one copy only)."""

    def without_consolidated(document):
        return {k: v for k, v in document.items() if k != "consolidated_metadata"} if isinstance(document, dict) else document

    root = documents.get("zarr.json")
    if isinstance(root, dict) and isinstance(root.get("consolidated_metadata"), dict):
        entries = root["consolidated_metadata"].get("metadata") or {}
        pairs = ((path, entry, documents.get(f"{path}/zarr.json")) for path, entry in entries.items())
    elif isinstance(documents.get(".zmetadata"), dict):
        pairs = ((key, entry, documents.get(key)) for key, entry in (documents[".zmetadata"].get("metadata") or {}).items())
    else:
        return
    for path, entry, own in pairs:
        if own is not None and without_consolidated(own) != without_consolidated(entry):
            raise BrokenStoreError(
                f"{where}: the metadata of {path} disagrees with its consolidated copy [ATTN-STORE-005]; the store "
                "was damaged or edited in one place only",
                "ATTN-STORE-005",
                location=_node_location(path),
            )


def _screen_directory(root: Path, where: str) -> None:
    budget = _Budget(where)
    documents = {}
    for key, descriptor, name in _walk_directory(root, where):
        if name.casefold() not in METADATA_NAMES:  # a case-insensitive file system serves "ZARR.JSON" as "zarr.json"
            continue
        if name.casefold() in ("zarr.json", ".zarray", ".zgroup"):  # one per node
            budget.add_node(key)
        handle = open_regular_file(name, dir_fd=descriptor)
        if handle is None:
            continue  # removed while walking
        try:
            size = os.fstat(handle).st_size
            budget.add_document(size, key)
            raw = _read_bounded(handle, MAX_METADATA_DOCUMENT_BYTES)
        finally:
            os.close(handle)
        documents[key] = screen_document(raw, key, where, _NoRecount(budget))
    _consistent(documents, where)


class _NoRecount(_Budget):
    """The budget of a document already counted before reading (the bytes read are checked again)."""

    def __init__(self, budget: _Budget):
        self.where = budget.where
        self._budget = budget

    def add_document(self, size: int, key: str) -> None:
        if size > MAX_METADATA_DOCUMENT_BYTES:
            raise _bound(self.where, key, f"metadata document {key} is more than the {MAX_METADATA_DOCUMENT_BYTES} bytes allowed")


# ----------------------------------------------------------------------------------------------
# Zip archives


def _screen_zip(location, where: str) -> None:
    from attnformat.engines.remote import open_zip

    budget = _Budget(where)
    documents = {}
    with open_zip(location) as bundle:  # only the central directory is read here
        entries = bundle.infolist()  # as many as the archive's size allows: bounded by the file
        for info in entries:
            _check_zip_entry(info, where)
        for info in entries:
            if info.filename.rpartition("/")[2] not in METADATA_NAMES or info.is_dir():
                continue
            if info.filename.rpartition("/")[2] in ("zarr.json", ".zarray", ".zgroup"):  # one per node
                budget.add_node(info.filename)
            budget.add_document(info.file_size, info.filename)  # what it declares, before inflating
            raw = _read_zip_entry(bundle, info, MAX_METADATA_DOCUMENT_BYTES, where)
            documents[info.filename] = screen_document(raw, info.filename, where, _NoRecount(budget))
        _consistent(documents, where)
        _chunk_entries_fit(entries, documents, where)


def _chunk_entries_fit(entries, documents: dict, where: str) -> None:
    """Refuse a zip whose chunk entry inflates to more than its array's chunk can hold
    [ATTN-STORE-006]: a reader would inflate the whole entry before any codec could object."""
    limits = {}
    for key, document in documents.items():
        name = key.rpartition("/")[2]
        if name == "zarr.json" and isinstance(document, dict):
            entries_of = (document.get("consolidated_metadata") or {}).get("metadata") or {}
            nodes = [(f"{path}/", entry) for path, entry in entries_of.items()] if isinstance(entries_of, dict) else []
            nodes.append((key[: -len("zarr.json")], document))
        elif name == ".zarray" and isinstance(document, dict):
            nodes = [(key[: -len(".zarray")], document)]
        else:
            continue
        for prefix, node in nodes:
            limit = _encoded_chunk_limit(node)
            if limit is not None:
                limits[prefix] = limit
    for info in entries:
        prefix = max((p for p in limits if info.filename.startswith(p)), key=len, default=None)
        if prefix is None or info.filename.rpartition("/")[2] in METADATA_NAMES:
            continue
        if info.file_size > limits[prefix]:
            raise _bound(where, info.filename, f"zip entry {info.filename} inflates to {info.file_size} bytes, more than a chunk of its "
                         f"array can hold ({limits[prefix]})")


def _encoded_chunk_limit(node) -> int | None:
    """The most bytes one stored chunk of an array can take: its decoded size plus codec overhead."""
    import numpy as np

    if not isinstance(node, dict):
        return None
    try:
        if node.get("zarr_format") == 3 and node.get("node_type") == "array":
            chunks = node["chunk_grid"]["configuration"]["chunk_shape"]
            itemsize = np.dtype(node["data_type"]).itemsize if isinstance(node["data_type"], str) else None
        elif "chunks" in node and "dtype" in node:
            chunks, itemsize = node["chunks"], np.dtype(node["dtype"]).itemsize
        else:
            return None
        if not itemsize or node.get("data_type") == "string" or str(node.get("dtype", "")).startswith(("|O", "O")):
            return None
        decoded = int(np.prod([int(c) for c in chunks], dtype=np.int64)) * itemsize
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    return decoded + decoded // 8 + 65536  # compressors expand incompressible data by well under 1/8


def _check_zip_entry(info: zipfile.ZipInfo, where: str) -> None:
    if info.file_size > MAX_ZIP_ENTRY_BYTES:
        raise _bound(where, info.filename, f"zip entry {info.filename} declares {info.file_size} bytes, more than the {MAX_ZIP_ENTRY_BYTES} allowed")
    if info.file_size > _RATIO_EXEMPT_BYTES and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
        raise _bound(where, info.filename, f"zip entry {info.filename} inflates {info.compress_size} bytes to {info.file_size}, "
                     f"more than {MAX_COMPRESSION_RATIO} times")


def _read_zip_entry(bundle: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, where: str) -> bytes:
    """An entry's bytes, never inflating more than ``limit + 1`` (declared sizes can lie)."""
    try:
        with bundle.open(info) as handle:
            raw = handle.read(limit + 1)
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError, NotImplementedError) as error:
        raise BrokenStoreError(
            f"{where}: zip entry {info.filename} cannot be read ({type(error).__name__}: {error}) [ATTN-STORE-005]; the archive is damaged",
            "ATTN-STORE-005",
            location=_node_location(info.filename),
        ) from error
    if len(raw) > limit:
        raise _bound(where, info.filename, f"zip entry {info.filename} inflates to more than {limit} bytes")
    return raw


# ----------------------------------------------------------------------------------------------
# URLs


class _Remote:
    """Bounded reads and listings of a store behind fsspec."""

    def __init__(self, location, where: str):
        self.filesystem, root = location.filesystem()
        self.root = root.rstrip("/")
        self.where = where

    def url(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def read(self, key: str, limit: int = MAX_METADATA_DOCUMENT_BYTES) -> bytes | None:
        try:
            with self.filesystem.open(self.url(key), "rb") as handle:
                size = getattr(handle, "size", None)
                if isinstance(size, int) and size > limit:
                    raise _bound(self.where, key, f"metadata document {key} is {size} bytes, more than the {limit} allowed")
                raw = handle.read(limit + 1)
        except (FileNotFoundError, KeyError):
            return None
        except BrokenStoreError:
            raise
        except Exception as error:  # network and protocol errors come in many classes
            if _is_missing(error):
                return None
            raise UnreadableFileError(f"{self.where}: cannot read {key} ({type(error).__name__}: {error})") from error
        if len(raw) > limit:
            raise _bound(self.where, key, f"metadata document {key} is more than the {limit} bytes allowed")
        return raw

    def children(self, key: str) -> list[str]:
        try:
            listed = self.filesystem.ls(self.url(key), detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except Exception as error:
            if _is_missing(error):
                return []
            raise UnreadableFileError(f"{self.where}: cannot list {key or 'the store'} ({type(error).__name__}: {error})") from error
        base = self.url(key).rstrip("/") + "/"
        names = []
        for item in listed:
            item = str(item).rstrip("/")
            name = item[len(base):] if item.startswith(base) else item.rpartition("/")[2]
            if name and "/" not in name and name not in METADATA_NAMES and name not in names:
                names.append(name)
        return names


def _is_missing(error: Exception) -> bool:
    status = getattr(error, "status", None) or getattr(error, "code", None)
    return status in (403, 404) or "404" in str(error)[:200]


def _screen_url(location, where: str) -> None:
    remote = _Remote(location, where)
    budget = _Budget(where)

    def screened(key: str):
        raw = remote.read(key)
        if raw is None:
            return None
        budget.add_node(key)
        return screen_document(raw, key, where, budget)

    root = screened("zarr.json")
    if root is not None:
        if isinstance(root, dict) and root.get("node_type") == "group" and not root.get("consolidated_metadata"):
            _screen_remote_members(remote, "", 3, screened)
        return
    group = screened(".zgroup")
    screened(".zattrs")
    if screened(".zmetadata") is None and group is not None:
        _screen_remote_members(remote, "", 2, screened)


def _screen_remote_members(remote: _Remote, prefix: str, zarr_format: int, screened) -> None:
    """Every node document zarr reads when it lists a group without consolidated metadata."""
    pending, listed = [(prefix, 0)], 0
    while pending:
        group, depth = pending.pop()
        if depth > MAX_GROUP_DEPTH:
            raise _bound(remote.where, group, f"{group} is nested more than the {MAX_GROUP_DEPTH} allowed")
        for name in remote.children(group):
            listed += 1
            if listed > MAX_NODES:
                raise _bound(remote.where, group, f"the store lists more than the {MAX_NODES} nodes allowed")
            key = f"{group}{name}/"
            if zarr_format == 3:
                document = screened(key + "zarr.json")
                is_group = isinstance(document, dict) and document.get("node_type") == "group"
            else:
                array = screened(key + ".zarray")
                is_group = screened(key + ".zgroup") is not None and array is None
                screened(key + ".zattrs")
            if is_group:
                pending.append((key, depth + 1))


# ----------------------------------------------------------------------------------------------
# The screen


def screen_zarr(location) -> None:
    """Refuse a Zarr store (directory, ``.zarr.zip`` or URL) that is unsafe to hand to zarr.

    Raises :class:`BrokenStoreError` with the rule id: a pickle codec anywhere
    [ATTN-STORE-003]; a symbolic link, device file, FIFO or socket in a directory
    [ATTN-STORE-004]; a size beyond the spec's bounds [ATTN-STORE-006]. Raises
    :class:`UnreadableFileError` for metadata that is not JSON or an unreadable archive. Nothing
    is parsed but bounded JSON, and nothing outside the store is followed.

    Parameters
    ----------
    location
        A :class:`attnformat.engines.Location`, path or URL.

    Examples
    --------
    >>> import attnformat
    >>> screen_zarr(attnformat.example_path("dense"))  # a file attnformat wrote: nothing to say
    """
    from attnformat.engines.common import Location

    location = Location.of(location)
    where = location.text
    if location.is_url:
        if location.name.endswith(".zip"):
            _screen_zip(location, where)
        else:
            _screen_url(location, where)
        return
    path = location.path
    if path.is_dir():
        _screen_directory(path, where)
    elif zipfile.is_zipfile(path):
        _screen_zip(location, where)
    elif path.exists():
        raise UnreadableFileError(f"{where}: neither a Zarr directory nor a zip archive of one")
    else:
        raise UnreadableFileError(f"{where}: no such file or directory")


# ----------------------------------------------------------------------------------------------
# Chunks actually stored


def stored_chunks(location, array_path: str) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """``(chunk shape, sorted grid indices of the chunks actually stored)`` of one array.

    The array's metadata is read (its own document, else the root's consolidated metadata), then
    the store is listed under the array's folder; keys are parsed with the array's chunk key
    encoding (Zarr v3 ``default`` with ``/`` or ``.``, ``v2``; Zarr v2 ``.`` or ``/``). The cost
    follows the entries actually present, never the grid the metadata declares. Works for local
    directories, ``.zarr.zip`` archives and URLs.

    Parameters
    ----------
    location
        A :class:`attnformat.engines.Location`, path or URL of the store.
    array_path
        The array's path in the store, e.g. ``"encoder/self/weights"``.

    Examples
    --------
    >>> import attnformat
    >>> shape, stored = stored_chunks(attnformat.example_path("dense"), "encoder/self/head")
    >>> len(shape), stored
    (1, [(0,)])
    """
    from attnformat.engines.common import Location

    location = Location.of(location)
    where = location.text
    array_path = array_path.strip("/")
    reader = _reader_for(location)
    try:
        array = _array_document(reader, array_path, where)
        chunk_shape, parse = _chunk_key_parser(array, array_path, where)
        grid = [-(-size // chunk) for size, chunk in zip(array["shape"], chunk_shape)]
        found = set()
        for key in reader.keys_under(array_path):
            index = parse(key)
            if index is not None and all(0 <= i < n for i, n in zip(index, grid)):
                found.add(index)
    finally:
        reader.close()
    return tuple(chunk_shape), sorted(found)


def _array_document(reader, array_path: str, where: str) -> dict:
    prefix = f"{array_path}/" if array_path else ""
    for name in ("zarr.json", ".zarray"):
        raw = reader.read(prefix + name)
        if raw is not None:
            document = screen_document(raw, prefix + name, where)
            if isinstance(document, dict) and (name == ".zarray" or document.get("node_type") == "array"):
                return document
    for name in ("zarr.json", ".zmetadata"):
        raw = reader.read(name)
        if raw is None:
            continue
        document = screen_document(raw, name, where)
        if not isinstance(document, dict):
            continue
        if name == "zarr.json":
            entries = (document.get("consolidated_metadata") or {}).get("metadata") or {}
            entry = entries.get(array_path)
        else:
            entry = (document.get("metadata") or {}).get(f"{prefix}.zarray")
        if isinstance(entry, dict):
            return entry
    raise UnreadableFileError(f"{where}: no array at {array_path!r}")


def _chunk_key_parser(array: dict, array_path: str, where: str):
    """The array's chunk shape, and a function from a key under its folder to a grid index or None."""
    ndim = len(array.get("shape") or [])
    _check_array_bounds(array, "/" + array_path, where)
    if array.get("zarr_format") == 2 or "chunks" in array:
        chunk_shape = array["chunks"]
        separator = array.get("dimension_separator") or "."
        prefix = ""
    else:
        chunk_shape = array["chunk_grid"]["configuration"]["chunk_shape"]
        for codec in array.get("codecs") or []:
            if isinstance(codec, dict) and codec.get("name") == "sharding_indexed":
                break  # stored objects are shards: the outer grid is what is listed
        encoding = array.get("chunk_key_encoding") or {"name": "default"}
        configuration = encoding.get("configuration") or {}
        if encoding.get("name") == "v2":
            separator, prefix = configuration.get("separator", "."), ""
        else:
            separator = configuration.get("separator", "/")
            prefix = "c"
    if separator not in ("/", "."):
        raise UnreadableFileError(f"{where}: /{array_path} declares chunk key separator {separator!r}")

    def parse(key: str) -> tuple[int, ...] | None:
        if prefix:
            if ndim == 0:
                return () if key == prefix else None
            if not key.startswith(prefix + separator):
                return None
            key = key[len(prefix) + 1:]
        elif ndim == 0:
            return () if key == "0" else None
        parts = key.split(separator)
        if len(parts) != ndim or not all(part.isdigit() and part.isascii() for part in parts):
            return None
        return tuple(int(part) for part in parts)

    return list(chunk_shape), parse


class _LocalReader:
    def __init__(self, root: Path, where: str):
        self.root, self.where = root, where

    def read(self, key: str) -> bytes | None:
        handle = open_regular_file(self.root / key)
        if handle is None:
            return None
        try:
            if os.fstat(handle).st_size > MAX_METADATA_DOCUMENT_BYTES:
                raise _bound(self.where, key, f"metadata document {key} is more than the {MAX_METADATA_DOCUMENT_BYTES} bytes allowed")
            return _read_bounded(handle, MAX_METADATA_DOCUMENT_BYTES)
        finally:
            os.close(handle)

    def keys_under(self, array_path: str):
        folder = self.root / array_path if array_path else self.root
        if not folder.is_dir():
            return
        for key, _, _ in _walk_directory(folder, self.where):
            yield key

    def close(self) -> None:
        pass


class _ZipReader:
    def __init__(self, location, where: str):
        from attnformat.engines.remote import open_zip

        self.where = where
        self.bundle = open_zip(location)

    def read(self, key: str) -> bytes | None:
        try:
            info = self.bundle.getinfo(key)
        except KeyError:
            return None
        if info.file_size > MAX_METADATA_DOCUMENT_BYTES:
            raise _bound(self.where, key, f"metadata document {key} declares {info.file_size} bytes, more than the {MAX_METADATA_DOCUMENT_BYTES} allowed")
        return _read_zip_entry(self.bundle, info, MAX_METADATA_DOCUMENT_BYTES, self.where)

    def keys_under(self, array_path: str):
        prefix = f"{array_path}/" if array_path else ""
        for name in self.bundle.namelist():
            if name.startswith(prefix) and not name.endswith("/"):
                yield name[len(prefix):]

    def close(self) -> None:
        self.bundle.close()


class _RemoteReader(_Remote):
    def keys_under(self, array_path: str):
        base = self.url(array_path).rstrip("/") + "/"
        try:
            found = self.filesystem.find(self.url(array_path))
        except FileNotFoundError:
            return
        except Exception as error:
            raise UnreadableFileError(f"{self.where}: cannot list /{array_path} ({type(error).__name__}: {error})") from error
        for item in found:
            item = str(item)
            if item.startswith(base):
                yield item[len(base):]
            elif "://" in base and item.startswith(base.split("://", 1)[1]):
                yield item[len(base.split("://", 1)[1]):]

    def close(self) -> None:
        pass


def _reader_for(location):
    where = location.text
    if location.is_url:
        return _ZipReader(location, where) if location.name.endswith(".zip") else _RemoteReader(location, where)
    path = location.path
    if path.is_dir():
        return _LocalReader(path, where)
    if zipfile.is_zipfile(path):
        return _ZipReader(location, where)
    raise UnreadableFileError(f"{where}: neither a Zarr directory nor a zip archive of one")


# ----------------------------------------------------------------------------------------------
# Screening what zarr reads, as it reads it


def screened_store(store, where: str):
    """Wrap a zarr store so that every metadata document zarr reads through it is screened first.

    :func:`screen_zarr` reads a store before zarr does; a server (or a concurrent writer) could
    then hand zarr different documents. Through this wrapper zarr gets exactly the bytes that
    were screened: each metadata document (``zarr.json``, ``.zarray``, ``.zgroup``, ``.zattrs``,
    ``.zmetadata``) is size-checked where the store can tell its size, then parsed and screened
    (:func:`screen_document`) before zarr sees it. Chunks pass through untouched (their reads
    are checked by :mod:`attnformat.engines.zarr_sync`). Meant for stores behind URLs and zip
    archives; local directories read by :mod:`attnformat.engines.zarr_sync` open their chunk
    files themselves and need no wrapper.

    Parameters
    ----------
    store
        A zarr store (``FsspecStore``, ``ZipStore``...).
    where
        The file or URL, for messages.

    Examples
    --------
    >>> import zarr
    >>> inner = zarr.storage.MemoryStore()
    >>> _ = zarr.create_array(inner, shape=(2,), dtype="int8")
    >>> zarr.open_array(screened_store(inner, "memory"), mode="r").shape
    (2,)
    """
    return _screened_store_class()(store, where)


@functools.cache
def _screened_store_class():
    # Made on first use so that importing this module does not import zarr.
    from zarr.abc.store import Store
    from zarr.storage import WrapperStore

    class ScreenedStore(WrapperStore):
        """A store whose metadata documents are screened as zarr reads them."""

        def __init__(self, store, where: str = ""):
            super().__init__(store)
            self.where = where or str(store)

        def _with_store(self, store):
            return type(self)(store, self.where)

        async def get(self, key, prototype, byte_range=None):
            if key.rpartition("/")[2] not in METADATA_NAMES:
                return await self._store.get(key, prototype, byte_range)
            size = None
            if type(self._store).getsize is not Store.getsize:  # the default would read it all
                try:
                    size = await self._store.getsize(key)
                except (FileNotFoundError, NotImplementedError, OSError, KeyError, TypeError, ValueError):
                    pass  # unknown or missing: the read below answers
            if isinstance(size, int) and size > MAX_METADATA_DOCUMENT_BYTES:
                raise _bound(self.where, key, f"metadata document {key} is {size} bytes, more than the {MAX_METADATA_DOCUMENT_BYTES} allowed")
            value = await self._store.get(key, prototype, None)
            if value is None:
                return None
            screen_document(value.to_bytes(), key, self.where)
            return value if byte_range is None else await self._store.get(key, prototype, byte_range)

        async def get_partial_values(self, prototype, key_ranges):
            key_ranges = list(key_ranges)
            if any(key.rpartition("/")[2] in METADATA_NAMES for key, _ in key_ranges):
                return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]
            return await self._store.get_partial_values(prototype, key_ranges)

        def close(self) -> None:
            self._store.close()

    return ScreenedStore
