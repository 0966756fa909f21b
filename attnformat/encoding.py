"""How variables are laid out on disk: chunks, compression, dtypes and declared lossy rounding.

Defaults (the spec's section "Storage"):

* chunks that fit the map: a map of at least MIN_MAP_CHUNK_ELEMENTS (256 KiB of float32) is
  whole in its chunk, one chunk per map; smaller maps are grouped, heads first, then layers, then
  the other leading dimensions (node, time, sample; never step, which grows one step at a time),
  until a chunk reaches that size, so that 200 short texts are a few hundred files rather than
  tens of thousands of 3 KB ones. Maps larger than 1024 x 1024 elements are cut into strips of
  whole rows (at most 4 MiB of float32 each): every chunk holds complete softmax rows, one
  query's attention is one read, and a reader decodes the strips of a map side by side. Either
  way one head of one layer lies inside one chunk (or one row of strips): reading it is one read;
* lossless compression: Blosc LZ4 with byte shuffle in Zarr (the shuffle groups the nearly
  constant sign/exponent bytes of probabilities so they compress; the mantissa bytes are close to
  random and no codec shrinks them; against bit-shuffle it decodes real attention ~20% faster and
  stores causal maps ~10% smaller, for dense maps 4-7% larger), deflate + shuffle in HDF5
  (readable by every netCDF-C build); bit-rounded variables use bit-shuffle, which lines up the
  zeroed low mantissa bits so that they vanish; every chunk carries a checksum (crc32c in Zarr,
  :mod:`attnformat.engines.zarr_encoding`; fletcher32 in HDF5, :mod:`attnformat.engines.hdf5`);
* strings are variable-length UTF-8; float16 becomes float32 in HDF5 (netCDF4 has no float16).

Lossy storage is never a default. ``keepbits`` rounds the mantissa to that many bits (relative
error at most 2**-(keepbits+1)), which keeps small probabilities small but non-zero; it is
declared on the variable with ``lossy_method = "bitround"`` and ``lossy_keepbits``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numcodecs
import numpy as np
import xarray as xr

from attnformat.conventions import LEADING_DIMS, MAX_MAP_CHUNK_ELEMENTS, MIN_MAP_CHUNK_ELEMENTS

#: Dimensions that lie inside a map: whole in a chunk, or cut into strips of whole rows; ``rank``
#: (the kept keys of a top-k row) is innermost, like ``key``.
MAP_DIMS = ("query", "key", "edge", "rank")
#: The leading dimensions small maps are grouped along, in this order. Heads first: a layer's
#: heads are computed (and written) together; step never, it grows one step at a time.
GROUPED_DIMS = ("head", "layer", "node", "time", "sample")


def map_chunks(dims, shape, separate=()) -> tuple[int, ...]:
    """Chunk shape for a map variable: small maps grouped, whole maps, or strips of whole rows.

    A map dimension (query, key, edge) is whole unless the map has more than
    ``MAX_MAP_CHUNK_ELEMENTS``; then the outer map dimension is cut into strips of whole rows.
    A map smaller than ``MIN_MAP_CHUNK_ELEMENTS`` is grouped with its neighbours along
    ``GROUPED_DIMS`` (heads, then layers, then node, time, sample) until the chunk reaches that
    size, taking a divisor of the dimension where one fits so that chunks are equal. One map
    always lies inside one chunk (or one row of strips). Dimensions in ``separate`` (those a
    streaming writer writes one entry at a time) are grouped last, so that a chunk is, where it
    can be, what one write covers, and writes need not merge into chunks written before.

    Parameters
    ----------
    dims
        Dimension names of the variable, in its order.
    shape
        Its sizes (0 for a dimension that grows later: it is chunked by 1).
    separate
        Leading dimensions that are written one entry at a time (grouped last).

    Examples
    --------
    >>> map_chunks(("layer", "head", "query", "key"), (6, 12, 512, 512))
    (1, 1, 512, 512)
    >>> map_chunks(("head", "query", "key"), (2, 4096, 4096))
    (1, 256, 4096)
    >>> map_chunks(("layer", "head", "query", "key"), (6, 12, 128, 128))
    (1, 4, 128, 128)
    >>> map_chunks(("sample", "layer", "head", "query", "key"), (200, 6, 12, 12, 12))
    (8, 6, 12, 12, 12)
    >>> map_chunks(("sample", "layer", "head", "query", "key"), (200, 6, 12, 12, 12), separate=("layer",))
    (40, 1, 12, 12, 12)
    """
    dims, shape = tuple(dims), tuple(int(size) for size in shape)
    chunks = [1 if dim in LEADING_DIMS else max(1, size) for dim, size in zip(dims, shape)]
    # Map dimensions from the innermost out: each takes what the chunk budget leaves, so rows
    # (the softmax axis) stay whole and only the outer map dimension is cut.
    budget = MAX_MAP_CHUNK_ELEMENTS
    for position in reversed(range(len(dims))):
        if dims[position] in MAP_DIMS:
            chunks[position] = max(1, min(shape[position], budget))
            budget = max(1, budget // chunks[position])
    elements = int(np.prod(chunks))
    order = [dim for dim in GROUPED_DIMS if dim not in separate] + [dim for dim in GROUPED_DIMS if dim in separate]
    for dim in order:
        if elements >= MIN_MAP_CHUNK_ELEMENTS:
            break
        if dim not in dims or shape[dims.index(dim)] <= 1:
            continue
        position = dims.index(dim)
        need = -(-MIN_MAP_CHUNK_ELEMENTS // elements)
        chunks[position] = _group_size(shape[position], need, MAX_MAP_CHUNK_ELEMENTS // elements)
        elements *= chunks[position]
    return tuple(chunks)


def _group_size(size: int, need: int, limit: int) -> int:
    """How many entries of a dimension of ``size`` to group: all if ``need`` or fewer, else the
    smallest divisor of ``size`` from ``need`` on (equal chunks) unless it exceeds ``limit``."""
    if size <= need:
        return size
    divisor = next(d for d in range(need, size + 1) if size % d == 0)
    return divisor if divisor <= limit else need


def is_map(dims) -> bool:
    """True for dimensions laid out as maps (they hold query/key or edge).

    Examples
    --------
    >>> is_map(("layer", "query", "key")), is_map(("query",)), is_map(("image_row", "image_col"))
    (True, True, False)
    """
    return any(dim in MAP_DIMS for dim in dims)


def bitround(values: np.ndarray, keepbits: int) -> np.ndarray:
    """Round floating-point values to ``keepbits`` mantissa bits (round to nearest).

    Relative error is at most ``2 ** -(keepbits + 1)``; zeros stay zero and small probabilities
    stay positive, unlike absolute quantization.

    Examples
    --------
    >>> import numpy as np
    >>> float(bitround(np.array([0.1234567], "float32"), 7)[0])
    0.12353515625
    """
    values = np.asarray(values)
    if values.dtype.kind != "f":
        raise TypeError(f"bit rounding needs floating-point values, not {values.dtype}")
    return numcodecs.BitRound(keepbits=keepbits).encode(values).view(values.dtype).reshape(values.shape)


def apply_keepbits(tree: xr.DataTree, keepbits: Mapping[str, int]) -> xr.DataTree:
    """Bit-round the named variables in every site and declare it in their attributes."""

    def round_dataset(dataset: xr.Dataset) -> xr.Dataset:
        dataset = dataset.copy()
        for name, bits in keepbits.items():
            if name in dataset.data_vars:
                variable = dataset[name]
                rounded = xr.apply_ufunc(bitround, variable, kwargs={"keepbits": bits}, dask="parallelized", output_dtypes=[variable.dtype])
                rounded.attrs = {**variable.attrs, "lossy_method": "bitround", "lossy_keepbits": int(bits)}
                dataset[name] = rounded
        return dataset

    return tree.map_over_datasets(round_dataset)
