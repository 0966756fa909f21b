"""Reaching files through fsspec: the one place that turns a :class:`Location` into a zarr store,
a binary file, or a bounded read or listing, for local paths and URLs alike.

The engines call these instead of building stores themselves, so that a URL is opened exactly
like a local path (same screening, same tree) and ``s3://bucket/run.zarr`` never passes through
:class:`pathlib.Path`, which would collapse its ``//``. The fsspec filesystem, with the caller's
``storage_options`` and the standard AWS endpoint variables, comes from
:meth:`Location.filesystem`; a missing fsspec or protocol package raises
:class:`~attnformat.errors.MissingDependencyError` (exit 3) with the install hint.

Reads made for screening are bounded: :func:`read_bytes` never returns (nor downloads) more than
its limit, and :func:`list_keys` stops at its limit, whatever sizes the file declares.

Writing to a URL (:func:`save_to_url`, :func:`upload`) stages the file in a local temporary
directory with the ordinary engines (so it is validated, chunked, sealed and checksummed exactly
like a local file), then uploads it: a single-file store (``.h5``, ``.zarr.zip``) in one PUT, a
Zarr directory chunk by chunk with the root metadata last, so that a reader never finds a root
document naming chunks that are not there yet.
"""

from __future__ import annotations

import functools
import os
import zipfile
from typing import IO

from attnformat.engines.common import ZIP_SUFFIX, Location, engine_name_for_path
from attnformat.errors import AttnFormatError, BrokenStoreError, UnreadableFileError

__all__ = ["is_zip", "list_keys", "open_file", "open_zip", "read_bytes", "save_to_url", "upload", "zarr_store"]

#: Bytes fetched per request when reading a single-file store (HDF5, zip) behind a URL; the
#: ``default_block_size`` storage option (s3fs, gcsfs...) overrides it.
REMOTE_BLOCK_SIZE = 1 << 20
#: Root documents of a Zarr store (v3 and v2): uploaded last, after everything they describe.
_ROOT_DOCUMENTS = ("zarr.json", ".zgroup", ".zattrs", ".zmetadata")


def is_zip(location: Location | str | os.PathLike) -> bool:
    """True if ``location`` is a zip archive of a Zarr store (its name, or its bytes when local).

    Examples
    --------
    >>> is_zip(Location.of("s3://bucket/run.zarr.zip")), is_zip(Location.of("s3://bucket/run.zarr"))
    (True, False)
    """
    location = Location.of(location)
    if location.is_url:
        return location.name.endswith(ZIP_SUFFIX)
    return engine_name_for_path(location) == "zarr-zip"


def zarr_store(location: Location | str | os.PathLike, *, read_only: bool = True):
    """A zarr store for a Zarr directory or a ``.zarr.zip`` archive, local or behind a URL.

    Local directories give a ``LocalStore``, local archives a ``ZipStore``, URLs an
    ``FsspecStore`` (archives behind a URL are read through fsspec's zip filesystem over one
    remote file, fetching only the entries asked for). Call ``close()`` on the store when done
    (it closes the archive and the remote file).

    Parameters
    ----------
    location
        Where the store is (a :class:`Location`, a path or a URL).
    read_only
        Open read-only (the default). Archives and URLs are always read-only.

    Examples
    --------
    >>> import attnformat
    >>> store = zarr_store(attnformat.example_path("dense"))
    >>> type(store).__name__, store.read_only
    ('LocalStore', True)
    """
    from zarr.storage import LocalStore, ZipStore

    location = Location.of(location)
    if not location.is_url:
        path = location.path
        if is_zip(location):
            if not zipfile.is_zipfile(path):
                raise UnreadableFileError(f"{location}: not a zip archive")
            return ZipStore(path, mode="r")
        return LocalStore(path, read_only=read_only)
    if is_zip(location):
        return _remote_zip_store(location)
    from zarr.storage import FsspecStore

    filesystem, path = location.filesystem()
    if filesystem.async_impl:
        # zarr awaits the filesystem from its own event loop, so it needs an instance made for
        # asynchronous use; the options (endpoint, credentials) are the ones Location resolved.
        filesystem = type(filesystem)(**{**filesystem.storage_options, "asynchronous": True})
        return FsspecStore(filesystem, read_only=True, path=path.rstrip("/"))
    return FsspecStore.from_mapper(filesystem.get_mapper(path), read_only=True)


def _remote_zip_store(location: Location):
    from fsspec.implementations.zip import ZipFileSystem

    handle = open_file(location)
    try:
        archive = ZipFileSystem(fo=handle, skip_instance_cache=True)
    except Exception as error:  # zipfile and the network report damage with several classes
        handle.close()
        raise UnreadableFileError(f"{location}: not a readable zip archive ({type(error).__name__}: {error})") from error
    store = _closing_store_class().from_mapper(archive.get_mapper(""), read_only=True)
    store.held = (archive.zip, handle)
    return store


@functools.cache
def _closing_store_class():
    # Made on first use so that importing this module does not import zarr.
    from zarr.storage import FsspecStore

    class ClosingFsspecStore(FsspecStore):
        """An FsspecStore that also closes the archive and remote file it reads from."""

        held: tuple = ()

        def close(self) -> None:
            super().close()
            for resource in self.held:
                resource.close()
            self.held = ()

    return ClosingFsspecStore


def open_file(location: Location | str | os.PathLike) -> IO[bytes]:
    """A seekable binary file object for a local path or a URL (for HDF5 files and zip archives).

    Parameters
    ----------
    location
        Where the file is.

    Raises
    ------
    attnformat.errors.UnreadableFileError
        If nothing is there (or the server refuses).
    attnformat.errors.MissingDependencyError
        If fsspec or the URL protocol's package is not installed.

    Examples
    --------
    >>> import attnformat, tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.h5"
    >>> path = attnformat.save(attnformat.examples.build("dense"), path)
    >>> with open_file(path) as handle:
    ...     handle.read(4)
    b'\\x89HDF'
    """
    location = Location.of(location)
    try:
        if not location.is_url:
            return open(location.path, "rb")
        filesystem, path = location.filesystem()
        # HDF5 and zip readers jump between a file's head, its tail and the chunks they need:
        # keeping several fetched blocks serves those jumps better than fsspec's read-ahead. The
        # blocks are small (s3fs's default is 50 MB, which fetched a whole 3 MB file twice to read
        # one 256 KB map): a read costs at most a block more than it asks for.
        block_size = location.fsspec_options().get("default_block_size") or REMOTE_BLOCK_SIZE
        return filesystem.open(path, "rb", cache_type="blockcache", block_size=block_size)
    except AttnFormatError:
        raise
    except FileNotFoundError as error:
        raise UnreadableFileError(f"{location}: no such file") from error
    except IsADirectoryError as error:
        raise UnreadableFileError(f"{location}: a directory, not a file") from error
    except Exception as error:  # network and permission errors come in many classes
        raise UnreadableFileError(f"{location}: cannot open ({type(error).__name__}: {error})") from error


def open_zip(location: Location | str | os.PathLike) -> zipfile.ZipFile:
    """The zip archive at ``location`` (local or URL), for reading its directory and entries.

    Only the central directory is read on opening; entries are fetched when read. Closing the
    archive closes the file under it.

    Examples
    --------
    >>> import attnformat, tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.zarr.zip"
    >>> path = attnformat.save(attnformat.examples.build("dense"), path)
    >>> with open_zip(path) as archive:
    ...     "zarr.json" in archive.namelist()
    True
    """
    location = Location.of(location)
    handle = open_file(location)
    try:
        return _ArchiveOwningItsFile(handle)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        handle.close()
        raise UnreadableFileError(f"{location}: not a readable zip archive ({type(error).__name__}: {error})") from error


class _ArchiveOwningItsFile(zipfile.ZipFile):
    """A ZipFile that closes the file object it reads (ZipFile leaves a given file open)."""

    def __init__(self, handle: IO[bytes]):
        self._owned_handle = handle
        super().__init__(handle)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._owned_handle.close()


def _inside(location: Location, key: str) -> list[str]:
    """The parts of a key, refused [ATTN-STORE-004] if they would lead out of the store."""
    parts = key.strip("/").split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise BrokenStoreError(
            f"{location}: key {key!r} points outside the store [ATTN-STORE-004]; a file never refers "
            "to data outside itself",
            "ATTN-STORE-004",
            location="/" + key.strip("/"),
        )
    return parts


def _join(location: Location, key: str) -> str:
    return location.text.rstrip("/") + "/" + key.lstrip("/")


def read_bytes(location: Location | str | os.PathLike, key: str, limit: int) -> bytes | None:
    """The bytes of ``key`` inside a store directory (local or URL), or None if there is none.

    At most ``limit + 1`` bytes are ever read: a longer entry raises instead of being fetched,
    so a metadata file that declares (or is) gigabytes costs no more than the limit.

    Parameters
    ----------
    location
        The store (a directory, or the URL of one).
    key
        Path inside the store, with ``/`` separators (``"zarr.json"``, ``"a/b/.zarray"``).
    limit
        The most bytes the caller accepts.

    Raises
    ------
    attnformat.errors.BrokenStoreError
        [ATTN-STORE-006] if the entry holds more than ``limit`` bytes; [ATTN-STORE-004] if the key
        leaves the store (``..``) or, locally, reaches a symbolic link or a special file.

    Examples
    --------
    >>> import attnformat
    >>> read_bytes(attnformat.example_path("dense"), "zarr.json", 1 << 20)[:1]
    b'{'
    >>> read_bytes(attnformat.example_path("dense"), "missing.json", 10) is None
    True
    """
    location = Location.of(location)
    parts = _inside(location, key)
    try:
        if location.is_url:
            filesystem, path = Location.of(_join(location, key), location.storage_options).filesystem()
            # No read-ahead: only what is asked for is fetched.
            with filesystem.open(path, "rb", cache_type="none") as handle:
                data = handle.read(limit + 1)
        else:
            file = _regular_file(location, parts)
            if file is None:
                return None
            with os.fdopen(file, "rb") as handle:
                data = handle.read(limit + 1)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except AttnFormatError:
        raise
    except OSError as error:
        raise UnreadableFileError(f"{location}: cannot read {key} ({type(error).__name__}: {error})") from error
    if len(data) > limit:
        raise BrokenStoreError(
            f"{location}: {key} holds more than {limit} bytes [ATTN-STORE-006]; metadata this large "
            "is refused before it is parsed",
            "ATTN-STORE-006",
            location="/" + key.rpartition("/")[0],
        )
    return data


def _regular_file(location: Location, parts: list[str]) -> int | None:
    """An open descriptor of a regular file inside a local store, or None if there is none.

    Nothing on the way is followed: a symbolic link (at any level), a device file, a FIFO (whose
    opening would block) or a socket is refused [ATTN-STORE-004].
    """
    import stat

    path = location.path
    for depth, part in enumerate(parts):
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISDIR(mode):
            if depth == len(parts) - 1:
                return None  # a folder, not a key
            continue
        if stat.S_ISREG(mode):
            if depth < len(parts) - 1:
                return None  # a file where a folder would be: no such key
            continue
        kind = "symbolic link" if stat.S_ISLNK(mode) else "special file (device, FIFO or socket)"
        raise BrokenStoreError(
            f"{location}: {'/'.join(parts[: depth + 1])} is a {kind} [ATTN-STORE-004]; a store "
            "never refers to data outside itself, so attnformat does not follow it",
            "ATTN-STORE-004",
            location="/" + "/".join(parts[: depth + 1]),
        )
    # O_NOFOLLOW closes the gap between the check above and the opening.
    return os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))


def list_keys(location: Location | str | os.PathLike, prefix: str = "", limit: int | None = None) -> list[str]:
    """Keys (``/``-separated paths of files) under ``prefix`` in a store directory or archive.

    Local directories are walked without following symbolic links (links are listed, not
    entered); URLs are listed through fsspec (over HTTP this needs the server's directory index);
    archives list their entries.

    Parameters
    ----------
    location
        The store (directory, archive, or URL of one).
    prefix
        Only keys under this folder (``""`` for all).
    limit
        Raise once more than this many keys are found (the file declares no more than
        :data:`attnformat.conventions.MAX_NODES` nodes, and listing must stay bounded).

    Raises
    ------
    attnformat.errors.BrokenStoreError
        [ATTN-STORE-006] past ``limit`` keys; [ATTN-STORE-004] for a prefix that leaves the store.

    Examples
    --------
    >>> import attnformat
    >>> "encoder/self/weights/zarr.json" in list_keys(attnformat.example_path("dense"), "encoder")
    True
    """
    location = Location.of(location)
    prefix = "/".join(_inside(location, prefix)) if prefix.strip("/") else ""
    keys: list[str] = []

    def add(key: str) -> None:
        keys.append(key)
        if limit is not None and len(keys) > limit:
            raise BrokenStoreError(
                f"{location}: more than {limit} entries under /{prefix} [ATTN-STORE-006]; "
                "the store is larger than attnformat reads",
                "ATTN-STORE-006",
                location="/" + prefix,
            )

    if is_zip(location):
        with open_zip(location) as archive:
            for name in archive.namelist():
                if not prefix or name == prefix or name.startswith(prefix + "/"):
                    add(name)
        return keys
    if not location.is_url:
        root = location.path
        top = root / prefix if prefix else root
        if top.is_symlink() or not top.is_dir():
            return [prefix] if top.is_symlink() or top.is_file() else []
        for directory, subdirectories, files in os.walk(top, followlinks=False):
            relative = os.path.relpath(directory, root).replace(os.sep, "/")
            relative = "" if relative == "." else relative + "/"
            # os.walk lists a link to a directory among the directories and does not enter it.
            for name in files + [d for d in subdirectories if os.path.islink(os.path.join(directory, d))]:
                add(relative + name)
        return keys
    filesystem, path = location.filesystem()
    root = path.rstrip("/")
    start = root + "/" + prefix if prefix else root
    try:
        found = filesystem.find(start, withdirs=False)
    except FileNotFoundError:
        return []
    except Exception as error:  # network errors come in many classes
        raise UnreadableFileError(f"{location}: cannot list /{prefix} ({type(error).__name__}: {error})") from error
    for name in found:
        key = _relative(name, root)
        if key is not None:
            add(key)
    return keys


def _relative(name: str, root: str) -> str | None:
    # fsspec returns paths as it names them (bucket/key for S3, full URLs for HTTP), like ``root``.
    return name[len(root) + 1 :] if name.startswith(root + "/") else None


# -- writing to URLs ---------------------------------------------------------------------------


def upload(local: str | os.PathLike, destination: Location | str, *, overwrite: bool = False) -> Location:
    """Copy a finished local file (``.h5``, ``.zarr.zip``) or Zarr directory to a URL.

    A Zarr directory goes up file by file (concurrently), its root metadata documents last: until
    they arrive there is no store at the URL, so a reader never opens a store whose chunks are
    still missing. A single file is one PUT (atomic on S3). With ``overwrite=True`` what was at
    the URL is removed first (a reader then briefly finds nothing, never a mix of two files).

    Parameters
    ----------
    local
        The finished local file or directory.
    destination
        The URL (a :class:`Location` carries the ``storage_options``).
    overwrite
        Replace what is at the URL.

    Returns
    -------
    Location
        The destination.

    Raises
    ------
    attnformat.AttnFormatError
        If something is at the URL and ``overwrite`` is False.
    attnformat.errors.WriteFailedError
        If the upload fails (the message names the URL).

    Examples
    --------
    >>> import attnformat, tempfile, pathlib
    >>> local = attnformat.save(attnformat.examples.build("dense"), pathlib.Path(tempfile.mkdtemp()) / "run.h5")
    >>> upload(local, "memory://examples/copy.h5").name  # s3://bucket/copy.h5 with storage_options, say
    'copy.h5'
    """
    from attnformat.errors import WriteFailedError

    destination = Location.of(destination)
    local = os.fspath(local)
    filesystem, path = destination.filesystem()
    path = path.rstrip("/")
    try:
        if filesystem.exists(path):
            if not overwrite:
                raise AttnFormatError(f"{destination}: already exists; pass overwrite=True to replace it")
            filesystem.rm(path, recursive=True)
        if not os.path.isdir(local):
            filesystem.put_file(local, path)
            return destination
        files = sorted(os.path.relpath(os.path.join(folder, name), local).replace(os.sep, "/")
                       for folder, _, names in os.walk(local) for name in names)
        body = [key for key in files if key not in _ROOT_DOCUMENTS]
        root = [key for key in files if key in _ROOT_DOCUMENTS]
        for batch in (body, root):
            if batch:
                # One call per batch: fsspec runs the uploads of a batch concurrently.
                filesystem.put([os.path.join(local, *key.split("/")) for key in batch], [f"{path}/{key}" for key in batch])
    except AttnFormatError:
        raise
    except Exception as error:  # network and permission errors come in many classes
        raise WriteFailedError(f"{destination}: upload failed ({type(error).__name__}: {error})") from error
    return destination


def save_to_url(tree, destination: Location | str, *, overwrite: bool = False, **save_options) -> Location:
    """Write ``tree`` to a URL: :func:`attnformat.save` into a local temporary directory, then :func:`upload`.

    The suffix of the URL picks the storage, as for a local path; the tree is validated first
    (``check``), and nothing is uploaded when validation or writing fails.

    Parameters
    ----------
    tree : xarray.DataTree
        The tree to write.
    destination
        The URL (a :class:`Location` carries the ``storage_options``).
    overwrite
        Replace what is at the URL.
    **save_options
        ``zarr_format``, ``keepbits``, ``check``: as :func:`attnformat.save` takes them.

    Returns
    -------
    Location
        The destination.

    Examples
    --------
    >>> import attnformat
    >>> save_to_url(attnformat.examples.build("dense"), "memory://examples/run.zarr", overwrite=True).name
    'run.zarr'
    """
    import shutil
    import tempfile

    from attnformat.saving import save

    destination = Location.of(destination)
    if not overwrite:
        filesystem, path = destination.filesystem()
        if filesystem.exists(path.rstrip("/")):
            raise AttnFormatError(f"{destination}: already exists; pass overwrite=True to replace it")
    scratch = tempfile.mkdtemp(prefix="attnformat-upload-")
    try:
        staged = save(tree, os.path.join(scratch, destination.name), **save_options)
        return upload(staged, destination, overwrite=overwrite)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def upload_finished(local: str | os.PathLike, destination: Location | str, *, overwrite: bool = False) -> Location:
    """:func:`upload`, then remove the local copy (for writers that staged a file to upload).

    Parameters
    ----------
    local
        The finished local file or directory (removed once uploaded).
    destination
        The URL (a :class:`Location` carries the ``storage_options``).
    overwrite
        Replace what is at the URL.

    Returns
    -------
    Location
        The destination.

    Examples
    --------
    >>> import attnformat, tempfile, pathlib
    >>> local = attnformat.save(attnformat.examples.build("dense"), pathlib.Path(tempfile.mkdtemp()) / "run.zarr")
    >>> upload_finished(local, "memory://examples/up.zarr", overwrite=True).name, local.exists()
    ('up.zarr', False)
    """
    import shutil

    result = upload(local, destination, overwrite=overwrite)
    if os.path.isdir(local):
        shutil.rmtree(local, ignore_errors=True)
    else:
        os.remove(local)
    return result
