"""Direct reading: a file's metadata and chunks without building a tree, where an engine has such a road.

The one-plot road of the viewer and :func:`attnformat.read_map` ask here instead of asking which
engine a file uses. Today the Zarr engine has a direct road for local directories
(:mod:`attnformat.engines.zarr_direct`); every other location answers None and the caller opens
the tree. Importing this module imports neither xarray nor zarr-python.
"""

from __future__ import annotations

from attnformat.engines.common import Location, engine_name_for_path
from attnformat.errors import AttnFormatError


def open_direct(source, storage_options=None, *, screen: bool = True):
    """The direct reader of a file (see :class:`attnformat.engines.zarr_direct.ZarrDirectory`), or None.

    None when the file's engine has no direct road for it, or when anything about the file is
    not as that road expects, unsafe included (the caller's general road then reads it, or
    explains what is wrong, exactly as it always did). Damage found later, while reading chunks,
    raises. ``screen=False`` skips screening the whole store (the root document it parses is
    screened all the same): for callers that only want the file's ``version``.

    Examples
    --------
    >>> import attnformat
    >>> open_direct(attnformat.example_path("dense")).groups[""]["attnformat"]
    'attnformat'
    >>> open_direct("missing.zarr") is None
    True
    """
    location = Location.of(source, storage_options)
    if location.is_url:
        return None
    try:
        if engine_name_for_path(location) != "zarr":
            return None
        from attnformat.engines.zarr_direct import open_directory

        return open_directory(location, screen=screen)
    except (AttnFormatError, OSError):
        return None  # missing, unsafe or odd: the general road says what it is
