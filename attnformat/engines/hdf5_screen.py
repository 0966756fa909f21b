"""Screening HDF5 files before h5netcdf or xarray parse them, in a guard process.

An HDF5 file is hostile until screened. :func:`walk` visits every link, object, attribute and
chunk index of a file with h5py's low-level API, bounded, and refuses:

* anything that reads outside the file [ATTN-STORE-004]: external storage (a dataset whose
  data lives in another file, e.g. ``/etc/passwd``), virtual datasets (data mapped from other
  files), external links, soft links, user-defined links, and filters that libhdf5 does not
  build in: an unknown filter id makes libhdf5 search ``HDF5_PLUGIN_PATH`` and load a shared
  library from it, i.e. run code from another local file. Built in and allowed: deflate,
  shuffle, fletcher32, szip, nbit, scaleoffset;
* a group reachable twice, which includes every hard-link cycle [ATTN-STORE-004]: xarray's
  group walk follows a cycle forever (``/a/loop/a/loop/...``), so objects are tracked by their
  address;
* declared sizes beyond the spec's bounds [ATTN-STORE-006]: nodes, group depth, dimensions of
  an array, bytes of one chunk, of one attribute and of all attributes, and the bytes of a
  dimension coordinate (xarray reads those whole when it opens the file);
* a damaged chunk index [ATTN-STORE-005]: a chunk off the grid, outside the shape, listed twice,
  or not found again where the listing puts it (the version-1 B-trees that index chunks have no
  checksum, and a chunk the index loses reads back as fill values, silently);
* a file that says it is complete while an attention array (weights, logits, bias) stores fewer
  chunks than its grid holds [ATTN-STORE-007].

Why a guard process: libhdf5 itself can loop forever on a damaged file. A single flipped bit in
a global heap collection (where variable-length strings and references live: every string
attribute and label) can give a heap object a length that puts the parser's cursor on bytes
that read as a free-space entry of length zero, and ``H5HG`` deserialization then spins in place, holding the GIL, in the
first call that touches the heap (reading any string attribute). Global heaps carry no checksum
in any HDF5 format version, so no writer setting prevents it, and no thread can interrupt it.
So the walk, which touches every attribute, every string dataset and every chunk index (the
structures a reader parses), runs in a separate worker process, and the caller waits for it
with a stall timeout: the worker reports each node as it goes, and a worker silent for
:data:`STALL_SECONDS` is killed and the file refused (ATTN-STORE-006, naming the node). The
worker is started once per process and reused (~0.3 s to start, then about a millisecond per
small file); results are remembered per file identity (device, inode, size, change times), so
reading many maps of one file screens it once. If no worker can be started, the walk runs in
this process (bounded, but without the guard against libhdf5's own loops).
"""

from __future__ import annotations

import atexit
import json
import math
import os
import select
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from attnformat.conventions import (
    ATTENTION_VARIABLES,
    MAX_CHUNK_BYTES,
    MAX_DIMENSIONS,
    MAX_GROUP_DEPTH,
    MAX_METADATA_DOCUMENT_BYTES,
    MAX_METADATA_TOTAL_BYTES,
    MAX_NODES,
    ROOT_COMPLETENESS,
)
from attnformat.errors import AttnFormatError, BrokenStoreError, UnreadableFileError

if TYPE_CHECKING:
    from attnformat.engines.common import Location

# This module is also the worker's program, which imports only h5py, numpy and the two
# dependency-free modules above (not xarray: ~0.5 s saved on every worker start); the engine
# interface's Location is imported where a caller hands one in.

#: Filters that libhdf5 builds in (H5Z_FILTER_DEFLATE ... H5Z_FILTER_SCALEOFFSET); any other id
#: would be looked up as a plugin library on HDF5_PLUGIN_PATH.
BUILTIN_FILTERS = {1: "deflate", 2: "shuffle", 3: "fletcher32", 4: "szip", 5: "nbit", 6: "scaleoffset"}

#: Seconds the guard waits without hearing progress from the worker before it declares the file
#: a loop for libhdf5. Local reads of one node take microseconds; URLs get :data:`STALL_SECONDS_URL`.
STALL_SECONDS = 10.0
STALL_SECONDS_URL = 60.0
#: Seconds a new worker may take to start (import h5py) before screening runs in this process.
STARTUP_SECONDS = 120.0

#: Report progress to the guard every this many nodes (and before every attribute read).
_PROGRESS_EVERY = 1


# -- the walk (runs in the worker) --------------------------------------------------------------


def _outside(where: str, node: str, what: str, fix: str) -> BrokenStoreError:
    return BrokenStoreError(
        f"{where}: {node} {what} [ATTN-STORE-004]; an attention file never refers to data outside "
        f"itself. {fix}",
        "ATTN-STORE-004",
        location=node,
    )


def _bound(where: str, node: str, what: str, limit_name: str, limit: int) -> BrokenStoreError:
    return BrokenStoreError(
        f"{where}: {node} {what}, over the bound {limit_name} = {limit} [ATTN-STORE-006]; the file "
        "is damaged or crafted. Rewrite it with attnformat from the original data",
        "ATTN-STORE-006",
        location=node,
    )


class _Walk:
    """State of one bounded walk: nodes seen (by address), attribute bytes, progress callback."""

    def __init__(self, h5file, where: str, progress: Callable[[str], None]):
        import h5py

        self.h5py = h5py
        self.file = h5file
        self.where = where
        self.progress = progress
        self.seen: dict[tuple[int, int], str] = {}
        self.nodes = 0
        self.attribute_bytes = 0
        self.complete = False  # the root says "complete": attention arrays must store every chunk

    def run(self) -> None:
        h5o, h5l = self.h5py.h5o, self.h5py.h5l
        root = self.file.id
        info = h5o.get_info(root)
        self.seen[(info.fileno, info.addr)] = "/"
        stack = [("/", self.h5py.h5g.open(root, b"/"), 0)]
        while stack:
            path, group, depth = stack.pop()
            self.progress(path)
            self._attributes(group, path)
            for name in self._link_names(group, path):
                child = path.rstrip("/") + "/" + name.decode("utf-8", "replace")
                self.progress(child)
                link = group.links.get_info(name)
                if link.type == h5l.TYPE_SOFT:
                    target = group.links.get_val(name).decode("utf-8", "replace")
                    raise _outside(self.where, child, f"is a soft link (to {target!r})", "Store the object itself, not a link to it")
                if link.type == h5l.TYPE_EXTERNAL:
                    filename, target = (part.decode("utf-8", "replace") for part in group.links.get_val(name))
                    raise _outside(self.where, child, f"is an external link (to {target!r} in {filename!r})", "Copy the data into this file")
                if link.type != h5l.TYPE_HARD:
                    raise _outside(self.where, child, f"is a user-defined link (type {link.type})", "Store the object itself")
                obj = h5o.open(group, name)
                info = h5o.get_info(obj)
                key = (info.fileno, info.addr)
                if key in self.seen:
                    raise _outside(
                        self.where,
                        child,
                        f"is the same object as {self.seen[key]} (a hard link; a group reachable twice makes a cycle)",
                        "Each group and array must appear once in the tree",
                    )
                self.seen[key] = child
                self.nodes += 1
                if self.nodes > MAX_NODES:
                    raise _bound(self.where, child, f"is node number {self.nodes}", "MAX_NODES", MAX_NODES)
                if info.type == h5o.TYPE_GROUP:
                    if depth + 1 > MAX_GROUP_DEPTH:
                        raise _bound(self.where, child, f"is nested {depth + 1} groups deep", "MAX_GROUP_DEPTH", MAX_GROUP_DEPTH)
                    stack.append((child, obj, depth + 1))
                elif info.type == h5o.TYPE_DATASET:
                    self._dataset(obj, child)
                else:  # a named datatype: only its attributes can hold anything
                    self._attributes(obj, child)

    def _link_names(self, group, path: str) -> list[bytes]:
        names: list[bytes] = []
        room = MAX_NODES - self.nodes + 1

        def collect(name):
            names.append(name)
            return True if len(names) > room else None  # a non-None return stops the iteration

        try:
            group.links.iterate(collect, idx_type=self.h5py.h5.INDEX_CRT_ORDER)
        except (ValueError, KeyError, RuntimeError):  # the group does not track creation order
            names.clear()
            group.links.iterate(collect, idx_type=self.h5py.h5.INDEX_NAME)
        if len(names) > room:
            raise _bound(self.where, path, f"holds more than {room} links", "MAX_NODES", MAX_NODES)
        return names

    def _attributes(self, obj, path: str) -> None:
        h5a = self.h5py.h5a
        count = h5a.get_num_attrs(obj)
        if count > MAX_NODES:
            raise _bound(self.where, path, f"declares {count} attributes", "MAX_NODES", MAX_NODES)
        attributes = obj_wrapper(self.h5py, obj).attrs if count else None
        for index in range(count):
            attribute = h5a.open(obj, index=index)
            name = attribute.name.decode("utf-8", "replace")
            where = f"{path.rstrip('/')}/@{name}"
            rank = attribute.get_space().get_simple_extent_ndims()
            if rank > MAX_DIMENSIONS:
                raise _bound(self.where, where, f"has {rank} dimensions", "MAX_DIMENSIONS", MAX_DIMENSIONS)
            size = attribute.get_storage_size()
            if size > MAX_METADATA_DOCUMENT_BYTES:
                raise _bound(self.where, where, f"declares {size} bytes", "MAX_METADATA_DOCUMENT_BYTES", MAX_METADATA_DOCUMENT_BYTES)
            self.attribute_bytes += size
            if self.attribute_bytes > MAX_METADATA_TOTAL_BYTES:
                raise _bound(self.where, where, f"brings the attributes to {self.attribute_bytes} bytes", "MAX_METADATA_TOTAL_BYTES", MAX_METADATA_TOTAL_BYTES)
            self.progress(where)
            # Reading the value parses what it points to (global heap collections, object
            # references): the structures that can make libhdf5 loop are touched here, in the
            # worker, not later in the reader.
            value = attributes[name]
            if name == "DIMENSION_LIST":
                self._dereference(value, where)
            elif path == "/" and name == ROOT_COMPLETENESS:
                self.complete = value in ("complete", b"complete")

    def _dereference(self, value, where: str) -> None:
        import numpy as np

        for references in np.asarray(value, dtype=object).ravel():
            for reference in np.asarray(references, dtype=object).ravel():
                if isinstance(reference, self.h5py.Reference) and reference:
                    self.progress(where)
                    self.file[reference]

    def _dataset(self, dataset, path: str) -> None:
        h5d = self.h5py.h5d
        self._attributes(dataset, path)
        plist = dataset.get_create_plist()
        layout = plist.get_layout()
        if layout == h5d.VIRTUAL:
            raise _outside(self.where, path, "is a virtual dataset (its values are mapped from other files)", "Store the values in this file")
        if plist.get_external_count() > 0:
            target = plist.get_external(0)[0].decode("utf-8", "replace")
            raise _outside(self.where, path, f"stores its values in an external file ({target!r})", "Store the values in this file")
        for index in range(plist.get_nfilters()):
            code, _, _, name = plist.get_filter(index)
            if code not in BUILTIN_FILTERS:
                label = name.decode("utf-8", "replace") or "unnamed"
                raise _outside(
                    self.where,
                    path,
                    f"uses HDF5 filter {code} ({label}), which libhdf5 would load as a plugin library from HDF5_PLUGIN_PATH",
                    f"Use only the built-in filters ({', '.join(BUILTIN_FILTERS.values())})",
                )
        space = dataset.get_space()
        rank = space.get_simple_extent_ndims()
        if rank > MAX_DIMENSIONS:
            raise _bound(self.where, path, f"has {rank} dimensions", "MAX_DIMENSIONS", MAX_DIMENSIONS)
        shape = space.get_simple_extent_dims() if rank else ()
        datatype = dataset.get_type()
        itemsize = datatype.get_size()
        if layout == h5d.CHUNKED:
            chunk = plist.get_chunk()
            chunk_bytes = math.prod(chunk) * itemsize
            if chunk_bytes > MAX_CHUNK_BYTES:
                raise _bound(self.where, path, f"declares chunks of {chunk_bytes} bytes", "MAX_CHUNK_BYTES", MAX_CHUNK_BYTES)
            self.progress(path)
            self._chunk_index(dataset, path, shape, chunk)
        total = math.prod(shape) * itemsize
        if rank == 1 and self._is_dimension_coordinate(dataset) and total > MAX_CHUNK_BYTES:
            raise _bound(self.where, path, f"is a dimension coordinate of {total} bytes (read whole on open)", "MAX_CHUNK_BYTES", MAX_CHUNK_BYTES)
        if self._is_variable_length(datatype) and total <= MAX_METADATA_DOCUMENT_BYTES:
            # Strings (labels) live in global heaps, the structure libhdf5 loops on: read them
            # here. Larger string arrays are not screened (attnformat writes none).
            self.progress(path)
            self.h5py.Dataset(dataset)[()]

    def _chunk_index(self, dataset, path: str, shape: tuple, chunk: tuple) -> None:
        """Walk the chunk index (bounded by what is stored): every chunk sits on the grid, inside
        the shape, once [ATTN-STORE-005]; a complete file stores every chunk of its attention
        arrays [ATTN-STORE-007]. A flipped bit in an unchecksummed index would otherwise move a
        chunk where nobody reads it, and its map would read back as fill values."""
        seen = set()

        def check(info) -> None:
            offset = tuple(info.chunk_offset)
            if len(offset) != len(shape) or any(o % c or (o >= s and s) for o, c, s in zip(offset, chunk, shape)):
                problem = f"at {offset}, off the chunk grid {chunk} of shape {shape}"
            elif offset in seen:
                problem = f"at {offset} twice"
            elif not _found_by_reads(dsid, offset):
                # The lookup that reads use checks the part of the index key that the listing
                # does not show (libhdf5 keys chunks by one more offset than the array has
                # dimensions; a flip there hides the chunk from reads, which see fill values).
                problem = f"at {offset}, which reads cannot find"
            else:
                seen.add(offset)
                return
            raise BrokenStoreError(
                f"{self.where}: the chunk index of {path} lists a chunk {problem} [ATTN-STORE-005]; "
                "the index is damaged. Restore the file from a copy",
                "ATTN-STORE-005",
                location=path,
            )

        dsid = dataset
        if hasattr(dsid, "chunk_iter"):
            dsid.chunk_iter(check)
        else:
            for index in range(dsid.get_num_chunks()):
                check(dsid.get_chunk_info(index))
        if self.complete and path.rsplit("/", 1)[-1] in ATTENTION_VARIABLES:
            expected = math.prod(-(-size // step) for size, step in zip(shape, chunk))
            if len(seen) < expected:
                raise BrokenStoreError(
                    f"{self.where}: {path} stores {len(seen)} of its {expected} chunks but the file says "
                    "it is complete [ATTN-STORE-007]; maps would read back as fill values. Restore the "
                    "file from a copy, or recapture it",
                    "ATTN-STORE-007",
                    location=path,
                )

    def _is_dimension_coordinate(self, dataset) -> bool:
        return self.h5py.h5a.exists(dataset, b"CLASS")

    def _is_variable_length(self, datatype) -> bool:
        h5t = self.h5py.h5t
        kind = datatype.get_class()
        if kind == h5t.VLEN or kind == h5t.REFERENCE:
            return True
        return kind == h5t.STRING and datatype.is_variable_str()


def _found_by_reads(dataset, offset: tuple) -> bool:
    """True if libhdf5's chunk lookup for reads finds the chunk at ``offset``.

    h5py asks libhdf5 for the chunk's stored size before copying it out; an empty buffer stops
    it right there (ValueError: buffer too small) without reading the chunk, while a chunk the
    lookup cannot find raises "chunk storage is not allocated".
    """
    import numpy as np

    try:
        dataset.read_direct_chunk(offset, out=np.empty(0, np.uint8))
    except ValueError:
        return True
    except (RuntimeError, OSError, KeyError):
        return False
    return True


def obj_wrapper(h5py, obj):
    """An h5py high-level object for a low-level id (attribute values are converted as h5py does)."""
    info = h5py.h5o.get_info(obj)
    if info.type == h5py.h5o.TYPE_GROUP:
        return h5py.Group(obj)
    if info.type == h5py.h5o.TYPE_DATASET:
        return h5py.Dataset(obj)
    return h5py.Datatype(obj)


def walk(h5file, where: str, progress: Callable[[str], None] = lambda node: None) -> None:
    """Screen an open ``h5py.File`` in this process; raise :class:`BrokenStoreError` if unsafe.

    Damage that h5py reports while walking raises :class:`UnreadableFileError`. This does not
    guard against libhdf5 looping on a damaged file: :func:`screen` runs it in a worker process.

    Parameters
    ----------
    h5file
        An ``h5py.File`` open for reading.
    where
        What to name in messages (the file's path or URL).
    progress
        Called with each node's path before it is parsed.

    Examples
    --------
    >>> import attnformat, h5py, tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.h5"
    >>> _ = attnformat.save(attnformat.examples.build("dense"), path)
    >>> with h5py.File(path, "r") as h5file:
    ...     walk(h5file, str(path))
    """
    node = ["/"]

    def note(path: str) -> None:
        node[0] = path
        progress(path)

    try:
        _Walk(h5file, where, note).run()
    except AttnFormatError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, OverflowError, RecursionError, MemoryError) as error:
        message = str(error).splitlines()[0] if str(error) else ""
        raise UnreadableFileError(f"{where}: damaged HDF5 metadata at {node[0]} ({type(error).__name__}: {message})") from error


def open_h5py(location: Location | str | os.PathLike):
    """``(h5py.File, close)`` for a local path or a URL (through fsspec), read-only.

    Examples
    --------
    >>> import attnformat, tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.h5"
    >>> _ = attnformat.save(attnformat.examples.build("dense"), path)
    >>> h5file, close = open_h5py(path)
    >>> sorted(h5file["encoder/self"].keys())[:2]
    ['head', 'key']
    >>> close()
    """
    import h5py

    if not isinstance(location, _LocalFile):
        from attnformat.engines.common import Location

        location = Location.of(location)
    where = str(location)
    handle = None
    try:
        if location.is_url:
            from attnformat.engines.remote import open_file

            handle = open_file(location)
            h5file = h5py.File(handle, "r")
        else:
            path = location.path
            if not path.exists():
                raise UnreadableFileError(f"{where}: no such file")
            if not path.is_file():
                raise UnreadableFileError(f"{where}: not a file")
            h5file = h5py.File(path, "r")
    except AttnFormatError:
        if handle is not None:
            handle.close()
        raise
    except Exception as error:  # h5py reports a damaged superblock with several classes
        if handle is not None:
            handle.close()
        message = str(error).splitlines()[0] if str(error) else ""
        raise UnreadableFileError(f"{where}: not a readable HDF5 file ({type(error).__name__}: {message})") from error

    def close() -> None:
        try:
            h5file.close()
        finally:
            if handle is not None:
                handle.close()

    return h5file, close


def screen_here(location: Location, progress: Callable[[str], None] = lambda node: None) -> None:
    """Open and walk a file in this process (what the worker does for each request)."""
    h5file, close = open_h5py(location)
    try:
        walk(h5file, str(location), progress)
    finally:
        close()


# -- the guard (runs in the caller) -------------------------------------------------------------

_SCREENED: dict[tuple, bool] = {}
_SCREENED_LIMIT = 256


def _identity(location: Location) -> tuple | None:
    """What identifies a local file's content for the screening cache; None for URLs."""
    if location.is_url:
        return None
    try:
        status = os.stat(location.path)
    except OSError:
        return None
    return (str(location.path), status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)


class _Worker:
    """One screening worker process, reused for every file; replaced when it hangs or dies."""

    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.owner = os.getpid()
        self.registered = False
        self.lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        if self.owner != os.getpid():  # a forked child: the worker's pipes belong to the parent
            self.process, self.owner = None, os.getpid()
        if self.process is None or self.process.poll() is not None:
            if not self.registered:
                atexit.register(self.stop)
                self.registered = True
            package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-c", _WORKER_PROGRAM, package],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                close_fds=True,
            )
            # Starting (importing h5py) is not parsing: the stall clock starts once it is ready.
            ready, _, _ = select.select([self.process.stdout.fileno()], [], [], STARTUP_SECONDS)
            if not ready or os.read(self.process.stdout.fileno(), 6) != b"ready\n":
                self.stop()
                raise OSError("the HDF5 screening worker did not start")
        return self.process

    def stop(self) -> None:
        if self.process is not None and self.owner == os.getpid():
            self.process.kill()
            self.process.wait()
            for stream in (self.process.stdin, self.process.stdout):
                stream.close()
        self.process = None

    def screen(self, location: Location) -> dict:
        """Send one request; return the worker's answer, or ``{"stalled": node}``."""
        with self.lock:
            process = self._start()
            # The options as this process resolves them now (endpoint variables set after the
            # worker started included); JSON, since the worker trusts nothing it is sent either.
            request = json.dumps([location.text, location.fsspec_options()]).encode("utf-8")
            try:
                process.stdin.write(struct.pack("<I", len(request)) + request)
                process.stdin.flush()
            except OSError:  # the worker died between requests: start afresh once
                self.stop()
                process = self._start()
                process.stdin.write(struct.pack("<I", len(request)) + request)
                process.stdin.flush()
            stall = STALL_SECONDS_URL if location.is_url else STALL_SECONDS
            descriptor = process.stdout.fileno()
            buffer = b""
            node = "/"
            while True:
                ready, _, _ = select.select([descriptor], [], [], stall)
                if not ready:
                    self.stop()
                    return {"stalled": node}
                chunk = os.read(descriptor, 65536)
                if not chunk:
                    self.stop()
                    return {"died": node}
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.startswith(b"P "):
                        node = line[2:].decode("utf-8", "replace")
                    elif line.startswith(b"R "):
                        return json.loads(line[2:])


_WORKER = _Worker()

# The worker imports this module from this copy of attnformat (-I: nothing from the caller's
# directory or environment) without running the package's __init__ (which imports xarray).
_WORKER_PROGRAM = """
import sys, types
package = sys.argv[1]
for name, path in (("attnformat", package), ("attnformat.engines", package + "/engines")):
    module = types.ModuleType(name)
    module.__path__ = [path]
    sys.modules[name] = module
from attnformat.engines.hdf5_screen import _serve
_serve()
"""


def screen(location: Location | str | os.PathLike) -> None:
    """Refuse an unsafe or damaged HDF5 file before anything in this process parses it.

    Runs :func:`walk` in the guard worker (see the module docstring), remembers files that
    passed, and raises what the walk found.

    Parameters
    ----------
    location
        The file (local path or URL).

    Raises
    ------
    attnformat.errors.BrokenStoreError
        ATTN-STORE-004 (refers outside itself), ATTN-STORE-006 (over a bound, or libhdf5 made
        no progress on it for :data:`STALL_SECONDS`).
    attnformat.errors.UnreadableFileError
        If the file is missing or damaged.

    Examples
    --------
    >>> import attnformat, tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.h5"
    >>> _ = attnformat.save(attnformat.examples.build("dense"), path)
    >>> screen(path)
    """
    from attnformat.engines.common import Location

    location = Location.of(location)
    identity = _identity(location)
    if identity is not None and identity in _SCREENED:
        return
    if not location.is_url and not location.path.is_file():
        raise UnreadableFileError(f"{location}: no such file" if not location.path.exists() else f"{location}: not a file")
    try:
        answer = _WORKER.screen(location)
    except OSError:  # no worker can be started here (an embedded interpreter...): walk in-process
        answer = None
    if answer is None:
        screen_here(location)
    elif "stalled" in answer or "died" in answer:
        node = answer.get("stalled") or answer.get("died")
        what = f"made no progress for {STALL_SECONDS_URL if location.is_url else STALL_SECONDS:g} s" if "stalled" in answer else "crashed"
        raise BrokenStoreError(
            f"{location}: the HDF5 library {what} while parsing {node} [ATTN-STORE-006]; its metadata "
            "is damaged (e.g. a corrupted global heap, which has no checksum). Restore the file from a copy",
            "ATTN-STORE-006",
            location=node,
        )
    elif answer.get("error"):
        cls = {"BrokenStoreError": BrokenStoreError}.get(answer["error"])
        if cls is not None:
            raise BrokenStoreError(answer["message"], answer["rule_id"], location=answer["location"])
        if answer["error"] == "MissingDependencyError":
            from attnformat.errors import MissingDependencyError

            raise MissingDependencyError(answer["message"])
        raise UnreadableFileError(answer["message"])
    if identity is not None:
        if len(_SCREENED) >= _SCREENED_LIMIT:
            _SCREENED.clear()
        _SCREENED[identity] = True


class _LocalFile:
    """What the walk needs of a local Location, without importing the engine interface."""

    is_url = False

    def __init__(self, text: str):
        self.text = text

    @property
    def path(self):
        from pathlib import Path

        return Path(self.text.removeprefix("file://"))

    def __str__(self) -> str:
        return self.text


def _serve() -> None:
    """The worker: screen each requested file, reporting each node before parsing it."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer

    def send(prefix: bytes, text: str) -> None:
        stdout.write(prefix + text.replace("\n", " ").encode("utf-8", "replace") + b"\n")
        stdout.flush()

    import h5py  # noqa: F401 - imported before "ready", so that no request waits for it

    stdout.write(b"ready\n")
    stdout.flush()

    while True:
        header = stdin.read(4)
        if len(header) < 4:
            return
        (length,) = struct.unpack("<I", header)
        text, options = json.loads(stdin.read(length))
        if "://" in text and not text.startswith("file://"):
            from attnformat.engines.common import Location  # URLs need fsspec (and xarray with it)

            location = Location(text, options)
        else:
            location = _LocalFile(text)
        try:
            screen_here(location, lambda node: send(b"P ", node))
            answer = {"error": None}
        except BrokenStoreError as error:
            answer = {"error": "BrokenStoreError", "message": str(error), "rule_id": error.rule_id, "location": error.location}
        except AttnFormatError as error:
            answer = {"error": type(error).__name__, "message": str(error)}
        except Exception as error:  # anything else h5py raises on a damaged file
            answer = {"error": "UnreadableFileError", "message": f"{location}: not a readable HDF5 file ({type(error).__name__}: {error})"}
        send(b"R ", json.dumps(answer))


if __name__ == "__main__":
    _serve()
