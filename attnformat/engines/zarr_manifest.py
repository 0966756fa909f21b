"""A manifest of the chunks an array stores: each chunk's key and the CRC-32C of its stored bytes.

Why this exists: the checksum codec of each chunk (Zarr v3 ``crc32c``, a CRC32C compressor in
Zarr v2) proves that a chunk's bytes are the bytes that were written, but not that they were
written *there*: two chunks of the same size swapped between keys (layer 0 and layer 1 of a map,
say) both pass their own checksums and read back as each other. Nor can a reader tell a chunk
lost from a coordinate (read as its fill value) from one never written. So when a store is
finished, every array gets an attribute (:data:`MANIFEST_ATTR`) mapping each stored chunk key to
the CRC-32C of its key and stored bytes. Readers (:mod:`attnformat.engines.zarr_sync`) check every
chunk they read against it: a chunk whose bytes belong to another key, a chunk the manifest does
not list, or a listed chunk that is missing is damage [ATTN-STORE-005 / ATTN-STORE-007]. Files
without a manifest (written before format 1.1, or by other tools) are read as before. The
attribute is storage bookkeeping: trees never show it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from attnformat.errors import BrokenStoreError

#: The array attribute holding ``{chunk key: CRC-32C of the stored chunk bytes}``.
MANIFEST_ATTR = "attnformat_chunk_crc32c"


def crc32c(data, key: str = "") -> int:
    """CRC-32C of ``key`` (UTF-8, then a NUL) followed by a bytes-like object (bytes, memory map,
    numpy array).

    The key comes first for two reasons: the value then also says where the chunk belongs, and
    a chunk that already ends in its own CRC-32C (Zarr v3's ``crc32c`` codec) would otherwise
    always give the same value (the CRC's residue), whatever its content.

    Examples
    --------
    >>> crc32c(b"123456789")
    3808858755
    >>> crc32c(b"data", "c/0") != crc32c(b"data", "c/1")
    True
    """
    import google_crc32c

    # google_crc32c takes bytes or a numpy array, not a memory map: view any buffer as bytes.
    view = np.ascontiguousarray(data).view(np.uint8).ravel() if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
    start = google_crc32c.value(key.encode("utf-8") + b"\0") if key else 0
    return int(google_crc32c.extend(start, view) if key else google_crc32c.value(view))


def seal(directory: str | os.PathLike) -> None:
    """Record every array's manifest in a finished local Zarr directory, then consolidate.

    Parameters
    ----------
    directory
        A Zarr store (v3 or v2) just written, not yet moved into place.

    Examples
    --------
    >>> import attnformat, tempfile, pathlib, zarr
    >>> path = attnformat.save(attnformat.examples.build("dense"), pathlib.Path(tempfile.mkdtemp()) / "d.zarr")
    >>> manifest = zarr.open_array(path / "encoder/self/weights", mode="r").attrs[MANIFEST_ATTR]
    >>> sorted(manifest)
    ['c/0/0/0/0']
    """
    import zarr

    directory = Path(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = zarr.open_group(str(directory), mode="r+", use_consolidated=False)
        for path, array in _all_arrays(root):
            manifest = {}
            for key in _stored_keys(directory / path, array.metadata.zarr_format):
                manifest[key] = crc32c(_payload(array.metadata, (directory / path / key).read_bytes()), key)
            array.attrs[MANIFEST_ATTR] = manifest
        zarr.consolidate_metadata(str(directory))


def check(metadata, key: str, raw, name: str, location: str) -> None:
    """Raise [ATTN-STORE-005] if a chunk's stored bytes are not what the manifest recorded for ``key``.

    Parameters
    ----------
    metadata
        The array's zarr metadata (its attributes hold the manifest, if any).
    key
        The chunk's key relative to the array (``c/0/1/0/0``, or ``0.1.0.0`` in Zarr v2).
    raw
        The chunk's stored bytes.
    name, location
        How messages name the chunk (its file or URL) and its key in the store.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> check(SimpleNamespace(attributes={}), "c/0", b"x", "a", "a")  # no manifest: nothing to check
    """
    manifest = expected_chunks(metadata)
    if manifest is None:
        return
    if key not in manifest:
        raise BrokenStoreError(f"{name}: chunk is not in its array's manifest [ATTN-STORE-005]; the store is damaged", "ATTN-STORE-005", location=location)
    if crc32c(_payload(metadata, raw), key) != manifest[key]:
        raise BrokenStoreError(
            f"{name}: chunk holds bytes written for another place, or damaged ones (manifest checksum) [ATTN-STORE-005]; "
            "the store is damaged",
            "ATTN-STORE-005",
            location=location,
        )


def _payload(metadata, raw):
    """The bytes the manifest hashes: the stored chunk without a trailing CRC-32C of its own.

    A CRC over bytes that end in their own CRC-32C is the same for every chunk of that length
    (the CRC's residue; a key prefixed or anything appended does not change that, CRCs being
    affine), so the codec's trailer is left out; the codec itself verifies it on decode.
    """
    if _ends_in_crc32c(metadata) and len(raw) >= 4:
        return np.frombuffer(raw, np.uint8)[:-4]
    return raw


def _ends_in_crc32c(metadata) -> bool:
    if getattr(metadata, "zarr_format", 3) == 3:
        codecs = getattr(metadata, "codecs", ()) or ()
        return bool(codecs) and type(codecs[-1]).__name__ == "Crc32cCodec"
    compressor = getattr(metadata, "compressor", None)
    return compressor is not None and getattr(compressor, "codec_id", None) == "crc32c" and getattr(compressor, "location", "end") == "end"


def expected_chunks(metadata) -> dict[str, int] | None:
    """The manifest of an array (``{key: crc}``), or None when it has none.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> expected_chunks(SimpleNamespace(attributes={MANIFEST_ATTR: {"c/0": 1}}))
    {'c/0': 1}
    """
    attributes = getattr(metadata, "attributes", None) or {}
    manifest = attributes.get(MANIFEST_ATTR)
    return manifest if isinstance(manifest, dict) else None


def _all_arrays(group, prefix: str = ""):
    for name, member in group.members():
        path = f"{prefix}{name}"
        if hasattr(member, "members"):
            yield from _all_arrays(member, path + "/")
        else:
            yield path, member


def _stored_keys(array_directory: Path, zarr_format: int) -> list[str]:
    """Chunk keys (relative to the array) of the chunk files actually stored."""
    metadata_names = {"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"}
    keys = []
    for folder, _, files in os.walk(array_directory):
        for file in files:
            relative = (Path(folder) / file).relative_to(array_directory).as_posix()
            if file not in metadata_names and (zarr_format == 2 or relative.startswith("c")):
                keys.append(relative)
    return sorted(keys)
