"""Every read road checks every chunk: a damaged chunk (cut short, bit flipped, swapped, too
large) is an error naming it [ATTN-STORE-005/006], never garbage; a chunk missing from a file that
says it is complete is an error [ATTN-STORE-007]; a chunk file swapped for a link or a FIFO after
screening is refused [ATTN-STORE-004]. Intact chunks read exactly what zarr-python reads.
"""

from __future__ import annotations

import functools
import gzip
import http.server
import os
import threading
import tracemalloc
import zipfile
from itertools import product
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, GzipCodec, ZstdCodec

import attnformat
from attnformat.engines import zarr_screen, zarr_sync
from attnformat.examples import build
from attnformat.engines.common import Location
from attnformat.engines.zarr import _LazyZarrArray, _read_eagerly
from attnformat.errors import BrokenStoreError

VALUES = np.random.default_rng(7).random((2, 64, 48)).astype("float32")


def _write(path: Path, zarr_format: int = 3, **options) -> zarr.Array:
    options.setdefault("compressors", [BloscCodec(cname="lz4", shuffle="shuffle")] if zarr_format == 3 else numcodecs.Blosc(cname="lz4"))
    array = zarr.create_array(path, shape=VALUES.shape, chunks=(1, 64, 48), dtype="float32", fill_value=np.nan, zarr_format=zarr_format, **options)
    array[...] = VALUES
    return array


def _chunk(array: zarr.Array, coords=(1, 0, 0)) -> Path:
    return Path(array.store_path.store.root) / array.path / array.metadata.encode_chunk_key(coords)


def _zip(directory: Path) -> Path:
    archive = directory.with_suffix(".zarr.zip")
    with zipfile.ZipFile(archive, "w") as bundle:
        for file in sorted(p for p in directory.rglob("*") if p.is_file()):
            bundle.write(file, file.relative_to(directory).as_posix())
    return archive


def _zipped(directory: Path) -> zarr.Array:
    return zarr.open_array(zarr.storage.ZipStore(_zip(directory), mode="r"), mode="r")


def _lazy_read(array: zarr.Array, key=(1,), **options):
    return _LazyZarrArray(array, **options)._read(key + (slice(None),) * (3 - len(key)))


@pytest.mark.parametrize("road", ["v3 directory", "v3 zip", "v2 directory", "v2 slash-separated", "v2 zip"])
def test_a_truncated_blosc_chunk_is_an_error_on_every_road(tmp_path, road):
    zarr_format = 2 if road.startswith("v2") else 3
    options = {"chunk_key_encoding": {"name": "v2", "separator": "/"}} if "slash" in road else {}
    array = _write(tmp_path / "cut.zarr", zarr_format, **options)
    chunk = _chunk(array)
    chunk.write_bytes(chunk.read_bytes()[:40])
    if road.endswith("zip"):
        array = _zipped(tmp_path / "cut.zarr")
    key = array.metadata.encode_chunk_key((1, 0, 0))
    with pytest.raises(BrokenStoreError, match=rf"{key}: chunk is not a whole Blosc frame \(cut short\?\) \[ATTN-STORE-005\]") as caught:
        _lazy_read(array)
    assert caught.value.rule_id == "ATTN-STORE-005" and caught.value.location == key
    np.testing.assert_array_equal(_lazy_read(array, (0,)), VALUES[0])  # the intact chunk still reads


def test_a_crc32c_mismatch_names_the_chunk(tmp_path):
    array = _write(tmp_path / "crc.zarr", compressors=[BloscCodec(cname="lz4"), Crc32cCodec()])
    chunk = _chunk(array)
    damaged = bytearray(chunk.read_bytes())
    damaged[len(damaged) // 2] ^= 0x10  # one bit
    chunk.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="checksum"):
        array[1]  # zarr itself sees it too
    for reader in (lambda: _lazy_read(array), lambda: zarr_sync.read(array.metadata, array.store_path, (1,)), lambda: _lazy_read(_zipped(tmp_path / "crc.zarr"))):
        with pytest.raises(BrokenStoreError, match=r"/crc\.zarr(\.zip)?/c/1/0/0: chunk does not match its checksum \[ATTN-STORE-005\]") as caught:
            reader()
        assert caught.value.location == "c/1/0/0"


def test_a_swapped_chunk_with_its_own_checksum_is_caught_by_size_or_value(tmp_path):
    # A whole, checksummed chunk of another array: its checksum matches, its size does not.
    array = _write(tmp_path / "a.zarr", compressors=[BloscCodec(cname="lz4"), Crc32cCodec()])
    other = zarr.create_array(tmp_path / "b.zarr", shape=(1, 32, 48), chunks=(1, 32, 48), dtype="float32", compressors=[BloscCodec(cname="lz4"), Crc32cCodec()])
    other[...] = 1.0
    _chunk(array).write_bytes(_chunk(other, (0, 0, 0)).read_bytes())
    with pytest.raises(BrokenStoreError, match=r"c/1/0/0: chunk decodes to 6144 bytes, but the array's metadata makes it 12288 bytes \[ATTN-STORE-005\]"):
        _lazy_read(array)


def test_a_v2_numcodecs_checksum_mismatch_is_reported(tmp_path):
    array = _write(tmp_path / "v2crc.zarr", 2, compressors=numcodecs.CRC32C())
    chunk = _chunk(array)
    damaged = bytearray(chunk.read_bytes())
    damaged[100] ^= 0x01
    chunk.write_bytes(bytes(damaged))
    with pytest.raises(BrokenStoreError, match=r"1\.0\.0: chunk does not match its checksum \[ATTN-STORE-005\]"):
        _lazy_read(array)


V2_COMPRESSORS = {
    "blosc": numcodecs.Blosc(cname="zstd"),
    "zstd": numcodecs.Zstd(level=3),
    "gzip": numcodecs.GZip(level=1),
    "zlib": numcodecs.Zlib(level=1),
    "lz4": numcodecs.LZ4(),
    "bz2": numcodecs.BZ2(),
}


@pytest.mark.parametrize("name", V2_COMPRESSORS)
def test_v2_compressors_read_what_zarr_reads_and_refuse_a_cut_chunk(tmp_path, name):
    array = _write(tmp_path / f"{name}.zarr", 2, compressors=V2_COMPRESSORS[name])
    np.testing.assert_array_equal(zarr_sync.read(array.metadata, array.store_path), array[...])
    np.testing.assert_array_equal(_LazyZarrArray(array)._read((np.array([1, 0]), slice(3, 9), slice(None))), array.oindex[[1, 0], 3:9, :])
    chunk = _chunk(array)
    chunk.write_bytes(chunk.read_bytes()[:-7])
    with pytest.raises(BrokenStoreError, match=r"1\.0\.0: chunk .*\[ATTN-STORE-005\]"):
        _lazy_read(array)


@pytest.mark.parametrize("compressor", [ZstdCodec(level=3), GzipCodec(level=1)], ids=["zstd", "gzip"])
def test_v3_compressors_refuse_a_cut_chunk(tmp_path, compressor):
    array = _write(tmp_path / "c.zarr", compressors=[compressor])
    np.testing.assert_array_equal(_lazy_read(array), VALUES[1])
    chunk = _chunk(array)
    chunk.write_bytes(chunk.read_bytes()[:-7])
    with pytest.raises(BrokenStoreError, match=r"c/1/0/0: chunk .*\[ATTN-STORE-005\]"):
        _lazy_read(array)


def test_a_gzip_bomb_is_stopped_at_the_chunks_declared_size(tmp_path):
    array = _write(tmp_path / "bomb.zarr", compressors=[GzipCodec(level=1)])
    _chunk(array).write_bytes(gzip.compress(b"\0" * (64 << 20), compresslevel=9))
    tracemalloc.start()
    try:
        with pytest.raises(BrokenStoreError, match=r"chunk inflates to more than the 12288 bytes its array allows \[ATTN-STORE-005\]"):
            _lazy_read(array)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # the bomb inflates to 64 MiB; only the bound is ever produced


def test_a_frame_declaring_more_than_the_chunk_is_refused_before_decoding(tmp_path):
    array = _write(tmp_path / "zstd.zarr", compressors=[ZstdCodec(level=3)])
    chunk = _chunk(array)
    frame = chunk.read_bytes()
    assert frame[4] == 0x60  # single segment, content size in 2 bytes (minus 256)
    assert int.from_bytes(frame[5:7], "little") + 256 == 12288
    # The same frame, declaring 2 GiB in a 4-byte content size field.
    chunk.write_bytes(frame[:4] + bytes([0xA0]) + (1 << 31).to_bytes(4, "little") + frame[7:])
    with pytest.raises(BrokenStoreError, match=r"chunk decodes to 2147483648 bytes, but the array's metadata makes it 12288 bytes"):
        _lazy_read(array)


def test_a_chunk_missing_from_a_complete_file_is_an_error(tmp_path):
    array = _write(tmp_path / "torn.zarr")
    _chunk(array).unlink()
    assert np.isnan(_lazy_read(array)).all()  # an incomplete file: not captured, the fill value
    for read in (lambda: _lazy_read(array, chunks_required=True), lambda: zarr_sync.read(array.metadata, array.store_path, (1,), chunks_required=True),
                 lambda: _lazy_read(_zipped(tmp_path / "torn.zarr"), chunks_required=True)):
        with pytest.raises(BrokenStoreError, match=r"c/1/0/0: chunk is missing .*\[ATTN-STORE-007\]") as caught:
            read()
        assert caught.value.rule_id == "ATTN-STORE-007"


def test_a_link_or_fifo_swapped_in_after_screening_is_refused_at_read_time(tmp_path):
    array = _write(tmp_path / "swap.zarr")
    zarr_screen.screen_zarr(tmp_path / "swap.zarr")
    chunk = _chunk(array)
    outside = tmp_path / "outside"
    outside.write_bytes(chunk.read_bytes())
    chunk.unlink()
    chunk.symlink_to(outside)
    with pytest.raises(BrokenStoreError, match=r"c/1/0/0 is a symbolic link \[ATTN-STORE-004\]"):
        _lazy_read(array)
    chunk.unlink()
    os.mkfifo(chunk)
    with pytest.raises(BrokenStoreError, match=r"c/1/0/0 is a FIFO \[ATTN-STORE-004\]"):
        _lazy_read(array)  # opened without blocking: no writer will ever come


@pytest.fixture
def http_base(tmp_path):
    """Base URL of a file server on 127.0.0.1 serving ``tmp_path``, stopped when the test ends."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_reads_over_http_are_checked_and_fetched_together(tmp_path, http_base):
    _write(tmp_path / "remote.zarr")
    labels = zarr.create_array(tmp_path / "labels.zarr", shape=(3,), dtype=str)
    labels[:] = ["a", "b", "c"]
    remote = zarr.open_array(zarr.storage.FsspecStore.from_url(f"{http_base}/remote.zarr", read_only=True), mode="r")
    remote_labels = zarr.open_array(zarr.storage.FsspecStore.from_url(f"{http_base}/labels.zarr", read_only=True), mode="r")
    np.testing.assert_array_equal(_lazy_read(remote), VALUES[1])
    loaded = _read_eagerly({"values": remote, "labels": remote_labels}, None)
    np.testing.assert_array_equal(loaded["values"], VALUES)
    assert loaded["labels"].tolist() == ["a", "b", "c"]
    chunk = tmp_path / "remote.zarr" / "c/1/0/0"
    chunk.write_bytes(chunk.read_bytes()[:40])
    with pytest.raises(BrokenStoreError, match=rf"{http_base}/remote.zarr/c/1/0/0: chunk is not a whole Blosc frame"):
        _lazy_read(remote)


def _listed_chunks(array: zarr.Array) -> list[tuple[int, ...]]:
    """Ground truth: the grid indices whose key zarr's own store API lists under the array."""
    from zarr.core.sync import sync

    async def listed():
        return [key async for key in array.store_path.store.list_prefix(f"{array.path}/" if array.path else "")]

    keys = {key[len(array.path) + 1:] if array.path else key for key in sync(listed())}
    grid = [range(-(-size // chunk)) for size, chunk in zip(array.shape, array.chunks)]
    return sorted(coords for coords in product(*grid) if array.metadata.encode_chunk_key(coords) in keys)


LAYOUTS = {
    "v3 default /": {},
    "v3 default .": {"chunk_key_encoding": {"name": "default", "separator": "."}},
    "v3 v2-style": {"chunk_key_encoding": {"name": "v2", "separator": "."}},
    "v2 .": {"zarr_format": 2},
    "v2 /": {"zarr_format": 2, "chunk_key_encoding": {"name": "v2", "separator": "/"}},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stored_chunks_are_the_chunk_files_zarr_wrote(tmp_path, http_base, layout):
    options = dict(LAYOUTS[layout])
    zarr_format = options.pop("zarr_format", 3)
    group = zarr.open_group(tmp_path / "sparse.zarr", mode="w", zarr_format=zarr_format)
    array = group.create_group("site").create_array("weights", shape=(5, 7, 3), chunks=(2, 3, 3), dtype="int16", fill_value=0, **options)
    array[0:2, 0:3] = 1
    array[4, 6] = 2
    array[2, 4, 1] = 3
    scalar = group.create_array("scalar", shape=(), dtype="int8", fill_value=0, **options)
    scalar[...] = 5
    zarr.consolidate_metadata(tmp_path / "sparse.zarr")
    expected = _listed_chunks(array)
    assert expected == [(0, 0, 0), (1, 1, 0), (2, 2, 0)]
    archive = _zip(tmp_path / "sparse.zarr")
    for location in (tmp_path / "sparse.zarr", archive, f"{http_base}/sparse.zarr"):
        assert zarr_screen.stored_chunks(Location.of(location), "site/weights") == ((2, 3, 3), expected)
        assert zarr_screen.stored_chunks(Location.of(location), "scalar") == ((), _listed_chunks(scalar)) == ((), [()])


def test_a_screened_local_store_still_opens_chunks_without_following_links(tmp_path):
    array = _write(tmp_path / "wrapped.zarr")
    wrapped = zarr.open_array(zarr_screen.screened_store(zarr.storage.LocalStore(tmp_path / "wrapped.zarr", read_only=True), "wrapped.zarr"), mode="r")
    np.testing.assert_array_equal(_lazy_read(wrapped), VALUES[1])
    chunk = _chunk(array)
    (tmp_path / "outside").write_bytes(chunk.read_bytes())
    chunk.unlink()
    chunk.symlink_to(tmp_path / "outside")
    with pytest.raises(BrokenStoreError, match=r"wrapped.zarr/c/1/0/0 is a symbolic link \[ATTN-STORE-004\]"):
        _lazy_read(wrapped)


@pytest.mark.parametrize("name", ["bz2", "lzma"])
def test_bzip2_and_lzma_bombs_are_stopped_at_the_chunks_declared_size(tmp_path, name):
    import bz2
    import lzma

    compressor = numcodecs.BZ2() if name == "bz2" else numcodecs.LZMA()
    array = _write(tmp_path / f"{name}.zarr", 2, compressors=compressor)
    np.testing.assert_array_equal(_lazy_read(array), VALUES[1])
    zeros = b"\0" * (64 << 20)
    _chunk(array).write_bytes(bz2.compress(zeros) if name == "bz2" else lzma.compress(zeros))
    tracemalloc.start()
    try:
        with pytest.raises(BrokenStoreError, match=r"chunk inflates to more than the 12288 bytes its array allows \[ATTN-STORE-005\]"):
            _lazy_read(array)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # the 64 MiB are never produced; lzma's own dictionary is 8 MiB


# -- the chunk manifest: chunks that swap places, coordinate chunks that vanish -----------------


def _big_file(path):
    """Maps of 256 x 256: one chunk each (small maps would share a chunk)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 256, 256)).astype("float32")
    weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    with attnformat.Writer(path, model_name="toy", model_framework="numpy") as writer:
        site = writer.create_site("encoder/self", sizes={"layer": 2, "head": 3, "query": 256, "key": 256}, attrs={"attention_type": "self", "causal": 0})
        for layer in range(2):
            site.write("weights", weights[layer], layer=layer)
    return weights


@pytest.mark.parametrize("road", ["writer", "save-v3", "save-v2"])
def test_chunks_swapped_between_maps_are_caught_by_the_manifest(tmp_path, road):
    import shutil

    path = tmp_path / "big.zarr"
    weights = _big_file(tmp_path / "written.zarr")
    if road == "writer":
        shutil.move(tmp_path / "written.zarr", path)
    else:
        attnformat.save(attnformat.open(tmp_path / "written.zarr").load(), path, zarr_format=2 if road == "save-v2" else 3)
    array_dir = path / "encoder/self/weights"
    chunks = sorted(p for p in array_dir.rglob("*") if p.is_file() and p.name not in ("zarr.json", ".zarray", ".zattrs"))
    assert len(chunks) == 6
    first, second = chunks[0].read_bytes(), chunks[1].read_bytes()
    chunks[0].write_bytes(second)
    chunks[1].write_bytes(first)
    # The ground truth: zarr reads the swap silently, since each chunk passes its own checksum.
    assert not np.array_equal(zarr.open_array(array_dir, mode="r")[...], weights)
    with pytest.raises(attnformat.UnreadableFileError, match=r"manifest.*\[ATTN-STORE-005\]"):
        attnformat.open(path)["encoder/self"]["weights"].values
    with pytest.raises(attnformat.UnreadableFileError, match=r"\[ATTN-STORE-005\]"):
        attnformat.read_map(path, "encoder/self", layer=0, head=0)
    report = attnformat.validate(path)
    assert "ATTN-STORE-005" in report.rule_ids and report.damaged


def test_a_lost_coordinate_chunk_is_caught_by_the_manifest(tmp_path):
    path = attnformat.save(build("dense"), tmp_path / "dense.zarr")
    (path / "encoder/self/query_label/c/0").unlink()
    with pytest.raises(attnformat.UnreadableFileError, match=r"query_label.*\[ATTN-STORE-007\]"):
        attnformat.open(path)
