"""Putting a finished file in place without tearing it for readers, and keeping writers apart.

Three promises, for local files:

* :func:`move_into_place` replaces a file or directory in one step that readers cannot observe
  half-done. A single file (``.h5``, ``.zarr.zip``) is replaced by ``os.replace``: a reader that
  has it open keeps reading the old file whole, a reader that opens it later gets the new one.
  A directory (``.zarr``) is swapped with the staged one by one ``renameat2(RENAME_EXCHANGE)``
  (Linux); then the old copy is removed. Where the exchange is not available (other systems,
  some filesystems) the old directory is renamed aside and the new one renamed in: between the
  two renames the path does not exist, so a reader fails clearly ("no such file") instead of
  reading a mix.
* :func:`pin_directory` lets a reader of a directory store keep reading the version it opened:
  it reads through an open descriptor of the directory (``/proc/self/fd/N``), which a rename
  does not move, and holds a shared ``flock`` on it. :func:`move_into_place` waits (a bounded
  time, ``wait`` seconds) for pinned readers of the old copy to let go before removing it; a
  reader still pinned after that finds the old copy's files gone and fails on a missing chunk
  (readers report that as ATTN-STORE-007), never reading the new version's chunks under the old
  metadata.
* :class:`WriterLock` keeps two writers off one destination: an exclusive ``flock`` on a lock
  file next to it, which the operating system releases when the process dies (so a crash never
  leaves a stale lock), holding the holder's pid for the message.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import shutil
import time
from functools import lru_cache
from pathlib import Path

from attnformat.errors import StoreLockedError, WriteFailedError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@lru_cache(maxsize=1)
def _renameat2():
    """libc's ``renameat2`` or None (not Linux, or a libc without it)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def exchange(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Swap two existing paths in one atomic step; False where the system cannot.

    Parameters
    ----------
    first, second
        Two existing paths on the same filesystem (files or directories).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (root / "a").write_text("A"), (root / "b").write_text("B")
    >>> exchange(root / "a", root / "b") and (root / "a").read_text() == "B"
    True
    """
    function = _renameat2()
    if function is None:
        return False
    result = function(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # the filesystem (or kernel) does not support exchanging
    raise OSError(code, os.strerror(code), os.fspath(first), None, os.fspath(second))


def move_into_place(staged: str | os.PathLike, path: str | os.PathLike, *, wait: float = 10.0) -> None:
    """Replace ``path`` by ``staged`` (same filesystem) so that readers never see a mix of both.

    If ``path`` does not exist, ``staged`` is renamed to it. A single file replaces the old one
    with ``os.replace``. A directory is swapped with the old one atomically (Linux
    ``renameat2(RENAME_EXCHANGE)``), then the old copy is removed once readers that pinned it
    (:func:`pin_directory`) let go, or after ``wait`` seconds. The old copy is never removed
    before the new one is in place, so a failure never loses both. Failures raise
    :class:`~attnformat.errors.WriteFailedError` naming ``path``.

    Parameters
    ----------
    staged
        The finished new file or directory, next to ``path``.
    path
        The destination.
    wait
        Seconds to wait for pinned readers of an old directory before removing it anyway.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> (root / "new.zarr").mkdir(); (root / "run.zarr").mkdir()
    >>> _ = (root / "new.zarr" / "zarr.json").write_text("{}")
    >>> move_into_place(root / "new.zarr", root / "run.zarr")
    >>> sorted(p.name for p in root.iterdir()), (root / "run.zarr" / "zarr.json").exists()
    (['run.zarr'], True)
    """
    staged, path = Path(staged), Path(path)
    try:
        if not os.path.lexists(path) or not (path.is_dir() or staged.is_dir()):
            os.replace(staged, path)
            return
        if exchange(staged, path):
            old = staged  # the exchange left the old version under the staged name
        else:
            old = path.with_name(f".{path.name}.replaced-{os.getpid()}")
            os.replace(path, old)
            os.replace(staged, path)
    except OSError as error:
        raise WriteFailedError(f"{path}: could not move the finished file into place ({error}); the new copy is kept at {staged}") from error
    _remove_when_unpinned(old, wait)


def _remove_when_unpinned(old: Path, wait: float) -> None:
    if not old.is_dir() or old.is_symlink():
        old.unlink(missing_ok=True)
        return
    try:
        descriptor = os.open(old, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        descriptor = None
    try:
        deadline = time.monotonic() + wait
        while descriptor is not None:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.01)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if descriptor is not None:
            os.close(descriptor)


def pin_directory(path: str | os.PathLike) -> tuple[int, str]:
    """Pin a directory store for reading: ``(descriptor, path to read through)``.

    Every read through the returned path goes to the directory that ``path`` named at this
    moment, even if :func:`move_into_place` swaps a new version in meanwhile; a shared lock on it
    asks the writer to wait (a bounded time) before removing it. Close the descriptor
    (``os.close``) when done reading. Guarantee: what is read through the pinned path is the old
    version whole, or, if the writer stopped waiting and removed it, a missing file (which a
    reader of a complete file reports as damage, ATTN-STORE-007); never the new version's
    chunks under the old version's metadata. Where ``/proc/self/fd`` does not exist the path is
    returned as given (no pinning).

    Parameters
    ----------
    path
        A local directory (a ``.zarr`` store).

    Examples
    --------
    >>> import os, tempfile
    >>> descriptor, pinned = pin_directory(tempfile.mkdtemp())
    >>> pinned.startswith("/proc/self/fd/")
    True
    >>> os.close(descriptor)
    """
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH)
    except OSError:
        pass  # a filesystem without flock: reads are still pinned, only the wait is lost
    pinned = f"/proc/self/fd/{descriptor}"
    if not os.path.isdir(pinned):
        return descriptor, os.fspath(path)
    return descriptor, pinned


class WriterLock:
    """An exclusive lock on a destination, held by one writer until :meth:`release`.

    The lock is an ``flock`` on ``<destination>.lock``; the operating system drops it when the
    holding process exits or dies, so a crashed writer never blocks the next one. The file holds
    the holder's pid, for the message a second writer gets (:class:`StoreLockedError`).

    Parameters
    ----------
    destination
        The file the writer will produce.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "run.zarr"
    >>> lock = WriterLock(target)
    >>> try:
    ...     WriterLock(target)
    ... except StoreLockedError as error:
    ...     print("locked")
    locked
    >>> lock.release()
    """

    def __init__(self, destination: str | os.PathLike):
        self.path = Path(destination).with_name(Path(destination).name + ".lock")
        while True:
            try:
                descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise WriteFailedError(f"{self.path}: cannot create the writer's lock file ({error})") from error
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(descriptor)
                os.close(descriptor)
                raise StoreLockedError(
                    f"{destination}: another writer is writing it (lock {self.path} held by pid {holder}); "
                    "wait for it to finish, or write to another path"
                ) from None
            # The holder before us may have removed the lock file after we opened it: our lock
            # is then on a file nobody else sees. Only a lock on the file at the path counts.
            try:
                same = os.path.samestat(os.fstat(descriptor), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(descriptor)
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        self._descriptor: int | None = descriptor

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        if self._descriptor is None:
            return
        self.path.unlink(missing_ok=True)  # removed while still held, so no one locks a stale file
        os.close(self._descriptor)
        self._descriptor = None

    def __del__(self):
        # A writer dropped without closing lets go of the destination, as a dead process would.
        if getattr(self, "_descriptor", None) is not None:
            self.release()


def _read_pid(descriptor: int) -> str:
    try:
        return os.pread(descriptor, 32, 0).decode().strip() or "unknown"
    except OSError:
        return "unknown"
