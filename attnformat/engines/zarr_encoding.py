"""The Zarr encoding policy: chunks, compression and a checksum on every chunk.

One policy for both writers (:func:`attnformat.save` through ``DataTree.to_zarr`` and the
streaming :class:`attnformat.Writer`), so that a file looks the same whichever wrote it:

* chunks from :func:`attnformat.encoding.map_chunks` (small maps grouped, large ones in strips);
* Blosc LZ4 with byte shuffle for lossless data, bit-shuffle for bit-rounded data (the zeroed low
  mantissa bits only line up, and compress away, when bits rather than bytes are regrouped);
* a CRC-32C checksum of every stored chunk, verified on every read, so that a flipped bit or a cut
  chunk reads as an error instead of as wrong numbers (a chunk swapped for another keeps a valid
  checksum; the store's chunk manifest, :mod:`attnformat.engines.zarr_manifest`, catches that). Zarr v3:
  codecs ``bytes -> blosc -> crc32c`` (the checksum covers the compressed bytes as stored). Zarr v2
  has one compressor and a list of filters: Blosc runs as the (last) filter, where it still sees
  the array's item size for shuffling, and numcodecs' ``crc32c`` is the compressor, so that the
  checksum again covers exactly the stored bytes; a mismatch raises in zarr-python 2 and 3.
  (numcodecs' ``crc32c`` computes with ``google-crc32c``, which zarr 3 requires. TensorStore's
  Zarr v2 driver knows neither filters nor ``crc32c``: v2 files are read and written through
  zarr-python.)

Strings (labels) are variable-length UTF-8 without a checksum: zarr's string codec writes them and
they are small; a damaged string chunk fails to decode (its lengths no longer add up).
"""

from __future__ import annotations

import numcodecs
import xarray as xr
from zarr.codecs import BloscCodec, Crc32cCodec

from attnformat.encoding import is_map, map_chunks

BLOSC_OPTIONS = {"cname": "lz4", "clevel": 5}


def zarr_codecs(zarr_format: int = 3, *, bit_rounded: bool = False, checksum: bool = True) -> dict:
    """Compressor, filters and checksum of a numeric array, as ``create_array``/``to_zarr`` take them.

    Parameters
    ----------
    zarr_format
        3 or 2.
    bit_rounded
        The values are bit-rounded (``lossy_keepbits``): bit-shuffle instead of byte shuffle.
    checksum
        Store a CRC-32 checksum with every chunk (the default; ``False`` only for measuring).

    Examples
    --------
    >>> [type(codec).__name__ for codec in zarr_codecs(3)["compressors"]]
    ['BloscCodec', 'Crc32cCodec']
    >>> v2 = zarr_codecs(2, bit_rounded=True)
    >>> v2["filters"][0].shuffle == numcodecs.Blosc.BITSHUFFLE, v2["compressors"][0].codec_id
    (True, 'crc32c')
    """
    if zarr_format == 2:
        shuffle = numcodecs.Blosc.BITSHUFFLE if bit_rounded else numcodecs.Blosc.SHUFFLE
        blosc = numcodecs.Blosc(shuffle=shuffle, **BLOSC_OPTIONS)
        if not checksum:
            return {"compressors": [blosc]}
        return {"filters": [blosc], "compressors": [numcodecs.CRC32C()]}
    if zarr_format != 3:
        raise ValueError(f"zarr_format must be 2 or 3, not {zarr_format!r}")
    blosc = BloscCodec(shuffle="bitshuffle" if bit_rounded else "shuffle", **BLOSC_OPTIONS)
    return {"compressors": [blosc, Crc32cCodec()] if checksum else [blosc]}


def zarr_variable_encoding(variable: xr.Variable, zarr_format: int = 3, *, checksum: bool = True) -> dict:
    """Encoding for one variable in a Zarr store, keyed as ``DataTree.to_zarr`` expects.

    Numeric arrays get chunks (maps only: :func:`~attnformat.encoding.map_chunks`), Blosc and a
    checksum per chunk (see the module docstring); strings and scalars get ``{}`` (zarr's defaults).

    Parameters
    ----------
    variable
        The variable to store; ``lossy_keepbits`` in its attributes selects bit-shuffle.
    zarr_format
        3 (default) or 2.
    checksum
        Store a checksum with every chunk (default).

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> weights = xr.Variable(("head", "query", "key"), np.zeros((12, 16, 16), "float32"))
    >>> encoding = zarr_variable_encoding(weights)
    >>> encoding["chunks"], [type(codec).__name__ for codec in encoding["compressors"]]
    ((12, 16, 16), ['BloscCodec', 'Crc32cCodec'])
    """
    if variable.dtype.kind in "OUTS" or variable.ndim == 0:
        return {}
    encoding = zarr_codecs(zarr_format, bit_rounded="lossy_keepbits" in variable.attrs, checksum=checksum)
    if is_map(variable.dims):
        encoding["chunks"] = map_chunks(variable.dims, variable.shape)
    return encoding
