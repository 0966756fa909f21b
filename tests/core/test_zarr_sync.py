"""The synchronous chunk reader gives exactly what zarr-python itself reads, for every codec
chain, chunk layout and selection, and the one-map paths really use it."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, GzipCodec, TransposeCodec, ZstdCodec

import attnformat
from attnformat.engines import zarr_sync
from attnformat.examples import build

CODEC_CHAINS = {
    "blosc-byte-shuffle (default)": {"compressors": [BloscCodec(cname="lz4", shuffle="shuffle")]},
    "blosc-bitshuffle": {"compressors": [BloscCodec(cname="lz4", shuffle="bitshuffle")]},
    "zstd": {"compressors": [ZstdCodec(level=3)]},
    "gzip+crc32c": {"compressors": [GzipCodec(level=1), Crc32cCodec()]},
    "uncompressed": {"compressors": None},
    "big-endian": {"compressors": None, "serializer": BytesCodec(endian="big")},
    "transpose+blosc": {"filters": [TransposeCodec(order=(2, 0, 1))], "compressors": [BloscCodec(cname="zstd")]},
}

SELECTIONS = [
    (),
    (1,),
    (-1, slice(None), slice(3, 17)),
    (0, 5, slice(None)),
    (slice(None), slice(2, 30, 3), slice(None, None, 4)),
    (slice(1, 1), slice(None), slice(None)),
    (np.int64(1), slice(None), 0),
]


def _array(tmp_path, chain: str, shape=(3, 37, 21), chunks=(1, 16, 8), dtype="float32"):
    array = zarr.create_array(tmp_path / f"{chain.replace(' ', '_')}.zarr", shape=shape, chunks=chunks, dtype=dtype, fill_value=np.nan, **CODEC_CHAINS[chain])
    values = np.random.default_rng(0).random(shape).astype(dtype)
    array[...] = values
    return array


@pytest.mark.parametrize("chain", CODEC_CHAINS)
def test_reads_what_zarr_reads_for_every_codec_chain_and_selection(tmp_path, chain):
    array = _array(tmp_path, chain)
    assert zarr_sync.can_read(array.metadata, array.store_path)
    for selection in SELECTIONS:
        expected = array[selection] if selection else array[...]
        got = zarr_sync.read(array.metadata, array.store_path, selection)
        np.testing.assert_array_equal(got, expected, err_msg=f"{chain} {selection}")
        assert got.dtype == expected.dtype and got.shape == np.shape(expected)
        if got.size:
            assert got.flags.writeable  # callers may change what they are handed


def test_chunks_never_written_read_as_the_fill_value(tmp_path):
    array = zarr.create_array(tmp_path / "sparse.zarr", shape=(4, 10, 10), chunks=(1, 10, 10), dtype="float32", fill_value=np.nan)
    array[1] = np.ones((10, 10), "float32")
    got = zarr_sync.read(array.metadata, array.store_path, (slice(0, 2),))
    assert np.isnan(got[0]).all() and (got[1] == 1).all()


def test_a_large_map_in_strips_is_assembled_side_by_side(tmp_path):
    # 1100 x 300 float32 = 1.3 MB, read from five strips on the thread pool, each decoded in place.
    array = zarr.create_array(tmp_path / "strips.zarr", shape=(2, 1100, 300), chunks=(1, 256, 300), dtype="float32", compressors=[BloscCodec(cname="lz4", shuffle="shuffle")])
    values = np.random.default_rng(1).random((2, 1100, 300)).astype("float32")
    array[...] = values
    np.testing.assert_array_equal(zarr_sync.read(array.metadata, array.store_path, (1,)), values[1])
    np.testing.assert_array_equal(zarr_sync.read(array.metadata, array.store_path, (1, slice(250, 520))), values[1, 250:520])


def test_strings_come_back_as_python_strings(tmp_path):
    labels = zarr.create_array(tmp_path / "labels.zarr", shape=(3,), dtype=str)
    labels[:] = ["[CLS]", "héllo", ""]
    got = zarr_sync.read_all(labels.metadata, labels.store_path)
    assert got.dtype == object and got.tolist() == ["[CLS]", "héllo", ""]


def test_layouts_it_cannot_read_are_declined(tmp_path):
    sharded = zarr.create_array(tmp_path / "sharded.zarr", shape=(8, 8), chunks=(2, 2), shards=(4, 4), dtype="float32")
    version2 = zarr.create_array(tmp_path / "v2.zarr", shape=(8,), dtype="float32", zarr_format=2)
    assert not zarr_sync.can_read(sharded.metadata, sharded.store_path)
    assert not zarr_sync.can_read(version2.metadata, version2.store_path)


def test_out_of_range_indices_are_an_index_error(tmp_path):
    array = _array(tmp_path, "uncompressed")
    with pytest.raises(IndexError):
        zarr_sync.read(array.metadata, array.store_path, (3,))


def test_parsed_metadata_follows_the_document_not_the_path():
    document = {"zarr_format": 3, "node_type": "array", "shape": [6], "data_type": "int64",
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [6]}},
                "chunk_key_encoding": {"name": "default"}, "fill_value": 0, "codecs": [{"name": "bytes"}]}
    first = zarr_sync.array_metadata(document)
    changed = zarr_sync.array_metadata({**document, "shape": [7]})
    assert first.shape == (6,) and changed.shape == (7,)


def test_one_map_paths_decode_in_the_callers_thread(tmp_path, monkeypatch):
    """read_map, open().sel() and open's eager coordinates all take the synchronous reader for a
    default file (the fast path must not be silently bypassed), and give the same values."""
    from attnformat.engines import zarr_direct

    path = attnformat.save(build("dense"), tmp_path / "dense.zarr")
    reads = []
    # read_map takes the direct road (checked chunk reads without zarr-python or a tree) ...
    direct_read = zarr_direct.ZarrDirectory.read
    monkeypatch.setattr(zarr_direct.ZarrDirectory, "read",
                        lambda self, array, *args, **kwargs: reads.append(array.path) or direct_read(self, array, *args, **kwargs))
    head = attnformat.read_map(path, "encoder/self", layer=1, head=2)
    assert "encoder/self/weights" in reads and "encoder/self/query_label" in reads
    reads.clear()
    # ... and a tree's arrays the synchronous reader.
    original = zarr_sync.read
    monkeypatch.setattr(zarr_sync, "read", lambda *args, **kwargs: reads.append(args[1].path) or original(*args, **kwargs))
    tree = attnformat.open(path)
    assert "encoder/self/query_label" in reads and "encoder/self/weights" not in reads  # labels eager, maps lazy
    from_tree = tree["encoder/self"]["weights"].sel(layer=1, head=2).load()
    assert "encoder/self/weights" in reads
    xr.testing.assert_identical(head, from_tree)
    np.testing.assert_array_equal(head.values, build("dense")["encoder/self"]["weights"].sel(layer=1, head=2).values)


@pytest.mark.parametrize("chain", ["blosc-byte-shuffle (default)", "uncompressed"])
def test_a_chunk_of_the_wrong_size_is_an_error_not_garbage(tmp_path, chain):
    # A chunk that decodes to fewer bytes than the metadata promises would leave part of the
    # result uninitialized memory; it must be refused, naming the chunk.
    array = _array(tmp_path, chain, shape=(2, 8, 8), chunks=(1, 8, 8))
    small = zarr.create_array(tmp_path / "small.zarr", shape=(1, 4, 8), chunks=(1, 4, 8), dtype="float32", **CODEC_CHAINS[chain])
    small[...] = 1.0
    (tmp_path / small.store_path.store.root / "c/0/0/0").replace(array.store_path.store.root / "c/1/0/0")
    with pytest.raises(attnformat.UnreadableFileError, match=r"c/1/0/0: chunk decodes to 128 bytes, but the array's metadata makes it 256 bytes"):
        zarr_sync.read(array.metadata, array.store_path, (1,))
    np.testing.assert_array_equal(zarr_sync.read(array.metadata, array.store_path, (0,)), array[0])


def test_open_takes_the_root_from_consolidated_metadata_without_zarrs_event_loop(tmp_path, monkeypatch):
    from attnformat.engines import zarr as zarr_engine

    v3 = attnformat.save(build("dense"), tmp_path / "dense.zarr")
    v2 = attnformat.save(build("dense"), tmp_path / "dense2.zarr", zarr_format=2)
    expected = attnformat.open(v3).load()
    calls = []
    original = zarr_engine._open_root_group
    monkeypatch.setattr(zarr_engine, "_open_root_group", lambda *args: calls.append(args) or original(*args))
    xr.testing.assert_identical(attnformat.open(v3).load(), expected)
    assert calls == []  # consolidated Zarr v3: parsed by zarr's GroupMetadata, no open_group
    xr.testing.assert_identical(attnformat.open(v2).load(), expected)
    assert len(calls) == 1  # Zarr v2 goes through zarr.open_group


@pytest.mark.parametrize("chain", ["blosc-byte-shuffle (default)", "transpose+blosc"])
def test_a_truncated_chunk_is_an_error_not_garbage(tmp_path, chain):
    # A Blosc frame cut short still declares its full size; decoding it would read past its end
    # (zarr-python itself hands back garbage for such a chunk).
    array = _array(tmp_path, chain, shape=(2, 64, 64), chunks=(1, 64, 64))
    chunk = array.store_path.store.root / "c/1/0/0"
    chunk.write_bytes(chunk.read_bytes()[:40])
    with pytest.raises(attnformat.UnreadableFileError, match=r"c/1/0/0: chunk is not a whole Blosc frame \(cut short\?\)"):
        zarr_sync.read(array.metadata, array.store_path, (1,))


def test_the_cli_names_a_damaged_chunk_and_exits_2(tmp_path):
    import shutil
    import subprocess
    import sys

    from attnformat.examples import example_path

    path = tmp_path / "damaged.zarr"
    shutil.copytree(example_path("dense"), path)
    chunk = path / "encoder/self/weights/c/0/0/0/0"
    chunk.write_bytes(chunk.read_bytes()[:40])
    result = subprocess.run([sys.executable, "-m", "attnformat", "validate", str(path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "encoder/self/weights/c/0/0/0/0" in result.stderr + result.stdout and "ATTN-STORE-005" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
