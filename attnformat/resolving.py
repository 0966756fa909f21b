"""Turning a selector (a label or an index) into a position along a dimension: one rule for the
whole library.

``open().sel``-style reads, :func:`attnformat.read_map` (every engine's fast road), the viewer and
the command line all resolve ``layer=3`` or ``query="cat"`` here, so a selector means the same
thing everywhere and a miss is reported the same way.

The rule: integers match the dimension's coordinate values when it has integer ones (``layer=3``
is the layer labelled 3, not the fourth), otherwise they are positions (negative ones count from
the end); strings match token labels (``query="cat"``, ``node="sensor 2"``), then string
coordinate values, then, when they spell an integer, are treated as that integer (so the command
line's ``--layer 3`` works). Repeated labels resolve to their first occurrence.
"""

from __future__ import annotations

import numpy as np

from attnformat.errors import SelectionError

#: How many existing values a "not found" message lists before "... (N more)".
LISTED_VALUES = 20


def position(dim: str, value, *, size: int, index=None, labels=None, where: str = "") -> int:
    """Integer position of ``value`` along ``dim``.

    Parameters
    ----------
    dim
        The dimension name (``"layer"``, ``"query"``...), used in messages.
    value
        The selector: a label, a coordinate value or a position.
    size
        Length of the dimension.
    index
        Values of the dimension's own coordinate (``layer`` labels...), or None.
    labels
        Display labels along the dimension (``query_label`` values...), or None.
    where
        What to name in a message, e.g. ``"file run.zarr, site encoder/self"``.

    Returns
    -------
    int
        A position in ``range(size)``.

    Raises
    ------
    attnformat.SelectionError
        When nothing matches; the message lists what exists.

    Examples
    --------
    >>> position("layer", 3, size=2, index=[2, 3])
    1
    >>> position("query", "cat", size=3, labels=["the", "cat", "sat"]), position("head", -1, size=4)
    (1, 3)
    """
    index = None if index is None else np.asarray(index)
    labels = None if labels is None else np.asarray(labels, dtype=object)
    if isinstance(value, np.generic):
        value = value.item()
    requested = value
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        if labels is not None:
            matches = np.flatnonzero(labels == value)
            if matches.size:
                return int(matches[0])
        if index is not None and index.dtype.kind in "OUST":
            matches = np.flatnonzero(index.astype(str) == value)
            if matches.size:
                return int(matches[0])
        try:
            value = int(value)
        except ValueError:
            value = None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = int(value)
        if index is not None and index.dtype.kind in "iu":
            matches = np.flatnonzero(index == value)
            if matches.size:
                return int(matches[0])
        elif -size <= value < size:
            return value % size
    if index is not None:
        exists = f"{plural(dim)}: {listing(index)}"
    elif labels is not None:
        exists = f"{plural(dim)}: {listing(labels)} (or positions 0..{size - 1})"
    else:
        exists = f"{plural(dim)}: positions 0..{size - 1}"
    place = f"in {where}" if where else "found"
    raise SelectionError(f"{dim} {requested} not {place}; {exists}")


def listing(values) -> str:
    """Up to :data:`LISTED_VALUES` values, comma-separated, then how many more.

    Examples
    --------
    >>> listing(range(25))
    '0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, ... (5 more)'
    """
    values = list(np.asarray(values).tolist()) if not isinstance(values, range) else list(values)
    shown = [str(v) for v in values[:LISTED_VALUES]]
    more = len(values) - len(shown)
    return ", ".join(shown) + (f", ... ({more} more)" if more > 0 else "")


def plural(dim: str) -> str:
    """The dimension's name in the plural, for messages.

    Examples
    --------
    >>> plural("query"), plural("layer")
    ('queries', 'layers')
    """
    return {"query": "queries", "sample": "samples"}.get(dim, dim + "s")
