"""Remembered conformance verdicts: which versions of sealed files have passed the metadata rules.

Why this exists: checking a file against the spec's metadata rules needs the file opened as an
xarray tree, and importing xarray and zarr costs a fresh process more than drawing one map does.
A sealed file (every array carries a chunk manifest, so its root ``zarr.json`` pins the CRC-32C of
every chunk it stores) is identified exactly by the SHA-256 of that document. Once one version
has passed the rules under this validator code, the viewer's direct road may skip checking it
again. The verdict is recorded wherever attnformat validated the file anyway: when
:func:`attnformat.save` wrote it, when :func:`attnformat.validate` or the viewer's general road
checked it. (A streaming :class:`attnformat.Writer` does not validate what it writes, so the
first plot of its file validates.)

What is stored: one empty file per passing (validator, version) pair, named by a SHA-256, under
:func:`verdict_directory`. Nothing is ever read from these files but their existence, their names
come from hashes (never from the attention file), and a missing or read-only cache only costs
speed. ``ATTNFORMAT_CACHE_DIR=none`` turns the memo off (every plot validates).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path


def verdict_directory() -> Path | None:
    """Where passing verdicts are remembered.

    ``$ATTNFORMAT_CACHE_DIR/verdicts``, else ``$XDG_CACHE_HOME/attnformat/verdicts``, else
    ``~/.cache/attnformat/verdicts``; None when ``ATTNFORMAT_CACHE_DIR`` is ``none`` (nothing is
    remembered).

    Examples
    --------
    >>> verdict_directory() is None or verdict_directory().name == "verdicts"
    True
    """
    configured = os.environ.get("ATTNFORMAT_CACHE_DIR")
    if configured is not None:
        if configured.strip().lower() in ("", "none", "off", "0"):
            return None
        return Path(configured) / "verdicts"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "attnformat" / "verdicts"


_VALIDATOR: list[str] = []


def _validator_fingerprint() -> str:
    """The version and the files of the code that decides conformance (the package's modules,
    its engines and the spec's schemas), by size and modification time: a changed validator
    does not trust verdicts of an older one."""
    if not _VALIDATOR:
        import importlib.util

        from attnformat._version import __version__

        core = Path(sys.modules["attnformat"].__file__).resolve().parent
        folders = [core, core / "engines"]
        schemas = importlib.util.find_spec("attnformat.schemas")
        folders += [Path(p) for p in (schemas.submodule_search_locations or [])] if schemas else []
        digest = hashlib.sha256(__version__.encode())
        for folder in folders:
            try:
                entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
            except OSError:
                continue
            for entry in entries:
                if entry.name.endswith((".py", ".json")) and entry.is_file():
                    info = entry.stat()
                    digest.update(f"{entry.path}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
        _VALIDATOR.append(digest.hexdigest())
    return _VALIDATOR[0]


def _verdict_file(version: str) -> Path | None:
    folder = verdict_directory()
    if folder is None:
        return None
    return folder / hashlib.sha256(f"{_validator_fingerprint()}\0{version}".encode()).hexdigest()


def version_of(location) -> str | None:
    """The version (SHA-256 of the root metadata) of a sealed file the direct road reads, else None.

    Parameters
    ----------
    location : str, os.PathLike or attnformat.engines.Location
        The file.

    Examples
    --------
    >>> import attnformat
    >>> len(version_of(attnformat.example_path("dense")) or "0" * 64)
    64
    """
    from attnformat.engines.direct import open_direct

    store = open_direct(location, screen=False)  # callers screen the store on their own road
    return store.version if store is not None and store.sealed else None


def known_conforming(version: str) -> bool:
    """True when this version has passed the metadata rules under this validator code.

    Parameters
    ----------
    version : str
        As returned by :func:`version_of`.

    Examples
    --------
    >>> known_conforming("0" * 64)
    False
    """
    path = _verdict_file(version)
    return path is not None and path.is_file()


def remember_conforming(version: str | None) -> None:
    """Record that this version passed the metadata rules (no-op for None or without a cache).

    Parameters
    ----------
    version : str or None
        As returned by :func:`version_of`.

    Examples
    --------
    >>> remember_conforming(None)
    """
    path = _verdict_file(version) if version else None
    if path is None or path.is_file():
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, scratch = tempfile.mkstemp(dir=path.parent, prefix=".verdict-")
        os.close(handle)
        os.replace(scratch, path)  # whole or absent, whatever runs alongside
    except OSError:
        pass  # a read-only cache only costs speed


def may_read_directly(store) -> bool:
    """True when the viewer's one-map road may draw from this sealed store without validating
    the tree: a passing verdict is remembered for its version, or its metadata breaks none of the
    spec's metadata rules (:func:`attnformat.metadata_rules.passes_metadata_rules`, checked on the
    consolidated JSON without xarray).

    The value rules are not checked by the second way (drawing one map does not need them; the
    chunks it reads are checked as on every road), so nothing is remembered for it. False sends
    the caller to the general road, which validates the tree and refuses a file breaking a rule
    with a one-line error naming the rule id.

    Parameters
    ----------
    store : attnformat.engines.zarr_direct.ZarrDirectory
        The file's direct reader (:func:`attnformat.engines.direct.open_direct`).

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.engines.direct import open_direct
    >>> may_read_directly(open_direct(attnformat.example_path("dense")))
    True
    """
    if not store.sealed:
        return False
    if known_conforming(store.version):
        return True
    from attnformat.metadata_rules import passes_metadata_rules

    return passes_metadata_rules(store)

