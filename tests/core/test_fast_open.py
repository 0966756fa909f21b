"""The direct road (a local Zarr v3 directory read with numpy and numcodecs, no zarr-python, no
xarray) reads exactly what zarr-python reads, refuses exactly what the other roads refuse, and
``import attnformat`` imports nothing heavy until a name needs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, GzipCodec, ShardingCodec, TransposeCodec, ZstdCodec

import attnformat
from attnformat.engines import zarr_manifest
from attnformat.engines.common import Location
from attnformat.engines.direct import open_direct
from attnformat.engines.zarr_direct import open_directory
from attnformat.errors import BrokenStoreError
from attnformat.examples import build

RNG = np.random.default_rng(3)


def _store(path: Path, arrays: dict, *, seal: bool = True) -> Path:
    """A Zarr v3 group with the given arrays ``name -> (values, options)``, consolidated (and sealed)."""
    group = zarr.open_group(path, mode="w", zarr_format=3)
    for name, (values, options) in arrays.items():
        array = group.create_array(name, shape=values.shape, dtype=values.dtype if values.dtype != object else str,
                                   dimension_names=[f"d{i}" for i in range(values.ndim)], **options)
        array[...] = values
    if seal:
        zarr_manifest.seal(path)
    else:
        zarr.consolidate_metadata(str(path))
    return path


FLOATS = RNG.random((3, 10, 7)).astype("float32")
CASES = {
    "float32 blosc crc32c": (FLOATS, {"chunks": (1, 4, 7), "compressors": [BloscCodec(cname="lz4", shuffle="shuffle"), Crc32cCodec()],
                                      "fill_value": np.nan}),
    "float64 zstd": (RNG.random((5, 6)), {"chunks": (2, 4), "compressors": [ZstdCodec(level=1)]}),
    "big-endian int16 gzip": (RNG.integers(-300, 300, (9,)).astype("int16"),
                              {"chunks": (4,), "serializer": BytesCodec(endian="big"), "compressors": [GzipCodec()]}),
    "uint8 uncompressed": (RNG.integers(0, 255, (4, 4)).astype("uint8"), {"chunks": (3, 3), "compressors": None}),
    "bool": (RNG.random((11,)) > 0.5, {"chunks": (5,)}),
    "float16": (RNG.random((6, 2)).astype("float16"), {"chunks": (6, 2)}),
    "int64 blosc": (RNG.integers(0, 10**12, (7,)), {"chunks": (3,), "compressors": [BloscCodec(cname="zstd", shuffle="bitshuffle")]}),
    # chunks of 64 KiB and more are memory-mapped: decoded views of the map must not outlive it
    "large float32 uncompressed": (RNG.random((2, 160, 160)).astype("float32"), {"chunks": (1, 160, 160), "compressors": None}),
    "large float32 crc32c only": (RNG.random((2, 160, 160)).astype("float32"), {"chunks": (1, 160, 160), "compressors": [Crc32cCodec()]}),
    "strings zstd": (np.array(["[CLS]", "héllo", "", "猫", "x" * 300], dtype=object), {"chunks": (2,), "compressors": [ZstdCodec(level=0)]}),
}


@pytest.mark.parametrize("case", CASES)
def test_direct_reads_equal_what_zarr_reads(tmp_path, case):
    values, options = CASES[case]
    path = _store(tmp_path / "store.zarr", {"data": (values, options)})
    truth = zarr.open_array(path / "data", mode="r")[...]
    store = open_direct(path)
    array = store.array("data")
    assert array is not None and store.sealed
    whole = store.read(array)
    if values.dtype == object:
        assert whole.dtype == object and whole.tolist() == [str(v) for v in truth.tolist()]
    else:
        assert whole.dtype == truth.dtype.newbyteorder("=") and np.array_equal(whole, truth)
    if values.ndim > 1:  # one row, as a map is read: integers and whole dimensions
        np.testing.assert_array_equal(store.read(array, (values.shape[0] - 1,)), truth[-1])
        np.testing.assert_array_equal(store.read(array, (-1, 1)), truth[-1, 1])


def test_chunks_never_written_read_as_the_fill_value_unless_required(tmp_path):
    group = zarr.open_group(tmp_path / "store.zarr", mode="w", zarr_format=3)
    array = group.create_array("data", shape=(4, 3), chunks=(2, 3), dtype="float32", fill_value=np.nan, dimension_names=["a", "b"])
    array[:2] = 1.0
    zarr_manifest.seal(tmp_path / "store.zarr")
    store = open_direct(tmp_path / "store.zarr")
    values = store.read(store.array("data"))
    np.testing.assert_array_equal(values, zarr.open_array(tmp_path / "store.zarr/data", mode="r")[...])
    assert np.isnan(values[2:]).all() and (values[:2] == 1).all()
    with pytest.raises(BrokenStoreError, match=r"c/1/0: chunk is missing .*\[ATTN-STORE-007\]"):
        store.read(store.array("data"), chunks_required=True)


@pytest.mark.parametrize("name", ["dense", "padded-batch", "steps", "edge-time", "frames", "image"])
def test_every_array_of_the_examples_reads_as_zarr_reads_it(tmp_path, name):
    path = attnformat.save(build(name), tmp_path / f"{name}.zarr")
    store = open_direct(path)
    assert store is not None and store.sealed
    arrays = [p for p, node in store.nodes.items() if node["node_type"] == "array"]
    assert arrays
    for array_path in arrays:
        array = store.array(array_path)
        assert array is not None, array_path  # everything attnformat writes takes this road
        truth = zarr.open_array(path / array_path, mode="r")[...]
        mine = store.read(array)
        if truth.dtype.kind in "TUO":
            assert mine.tolist() == truth.astype(object).tolist()
        else:
            np.testing.assert_array_equal(mine, truth)


def test_layouts_it_does_not_know_go_to_the_general_road(tmp_path):
    values = RNG.random((4, 4)).astype("float32")
    path = _store(tmp_path / "store.zarr", {
        "sharded": (values, {"chunks": (2, 2), "shards": (4, 4)}),
        "transposed": (values, {"chunks": (4, 4), "filters": [TransposeCodec(order=(1, 0))]}),
        "plain": (values, {"chunks": (4, 4)}),
    })
    store = open_direct(path)
    assert store.array("sharded") is None and store.array("transposed") is None and store.array("plain") is not None
    assert isinstance(zarr.open_array(path / "sharded", mode="r").metadata.codecs[0], ShardingCodec)
    v2 = attnformat.save(build("dense"), tmp_path / "v2.zarr", zarr_format=2)
    zipped = attnformat.save(build("dense"), tmp_path / "dense.zarr.zip")
    unconsolidated = _store(tmp_path / "loose.zarr", {"plain": (values, {"chunks": (4, 4)})}, seal=False)
    root = json.loads((unconsolidated / "zarr.json").read_text())
    root.pop("consolidated_metadata")
    (unconsolidated / "zarr.json").write_text(json.dumps(root))
    for other in (v2, zipped, unconsolidated, "https://example.org/run.zarr", tmp_path / "missing.zarr"):
        assert open_direct(other) is None, other


def test_an_unsealed_store_says_so(tmp_path):
    path = _store(tmp_path / "store.zarr", {"plain": (FLOATS, {"chunks": (1, 10, 7)})}, seal=False)
    store = open_direct(path)
    assert store is not None and not store.sealed


# -- refusals: the same as on every other road -----------------------------------------------------


def _dense(tmp_path) -> tuple[Path, object]:
    path = attnformat.save(build("dense"), tmp_path / "dense.zarr")
    store = open_direct(path)
    return path, store


def test_a_bit_flip_is_damage_naming_the_chunk(tmp_path):
    path, store = _dense(tmp_path)
    chunk = path / "encoder/self/weights/c/0/0/0/0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x08
    chunk.write_bytes(bytes(data))
    with pytest.raises(BrokenStoreError, match=r"weights/c/0/0/0/0.*\[ATTN-STORE-005\]") as caught:
        store.read(store.array("encoder/self/weights"), (1,))
    assert str(path) in str(caught.value)
    # the same refusal as the tree road's
    with pytest.raises(attnformat.UnreadableFileError, match=r"\[ATTN-STORE-005\]"):
        attnformat.open(path)["encoder/self"]["weights"].isel(layer=1).values


def test_chunks_swapped_between_maps_are_caught_by_the_manifest(tmp_path):
    path = tmp_path / "big.zarr"
    logits = RNG.normal(size=(2, 1, 256, 256)).astype("float32")  # one chunk per map
    weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    with attnformat.Writer(path, model_name="toy", model_framework="numpy") as writer:
        site = writer.create_site("encoder/self", sizes={"layer": 2, "head": 1, "query": 256, "key": 256},
                                  attrs={"attention_type": "self", "causal": 0})
        for layer in range(2):
            site.write("weights", weights[layer], layer=layer)
    chunks = sorted(p for p in (path / "encoder/self/weights").rglob("*") if p.is_file() and p.name != "zarr.json")
    assert len(chunks) == 2
    first, second = chunks[0].read_bytes(), chunks[1].read_bytes()
    chunks[0].write_bytes(second)
    chunks[1].write_bytes(first)
    # the ground truth: zarr reads the swap silently, each chunk passing its own checksum
    assert not np.array_equal(zarr.open_array(path / "encoder/self/weights", mode="r")[...], weights)
    store = open_direct(path)
    with pytest.raises(BrokenStoreError, match=r"manifest.*\[ATTN-STORE-005\]"):
        store.read(store.array("encoder/self/weights"), (0, 0))


def test_a_lost_chunk_of_a_complete_file_is_damage(tmp_path):
    path, store = _dense(tmp_path)
    (path / "encoder/self/query_label/c/0").unlink()
    with pytest.raises(BrokenStoreError, match=r"query_label/c/0: chunk is missing.*\[ATTN-STORE-007\]"):
        store.read(store.array("encoder/self/query_label"))


def test_links_are_refused_when_screening_and_when_reading(tmp_path):
    path, store = _dense(tmp_path)
    chunk = path / "encoder/self/weights/c/0/0/0/0"
    outside = tmp_path / "outside"
    outside.write_bytes(chunk.read_bytes())
    chunk.unlink()
    os.symlink(outside, chunk)
    # swapped in after this reader screened the store: refused when the chunk is opened
    with pytest.raises(BrokenStoreError, match=r"symbolic link \[ATTN-STORE-004\]"):
        store.read(store.array("encoder/self/weights"), (0,))
    # a new reader screens the whole store first, as attnformat.open does
    with pytest.raises(BrokenStoreError, match=r"\[ATTN-STORE-004\]"):
        open_directory(Location.of(path))
    assert open_direct(path) is None  # the general road then refuses it with its own message
    with pytest.raises(attnformat.UnreadableFileError, match=r"\[ATTN-STORE-004\]"):
        attnformat.open(path)


def test_a_pickle_codec_in_the_metadata_is_refused_before_anything_is_read(tmp_path):
    path, _ = _dense(tmp_path)
    root = json.loads((path / "zarr.json").read_text())
    entry = root["consolidated_metadata"]["metadata"]["encoder/self/weights"]
    entry["codecs"].insert(1, {"name": "numcodecs.pickle"})
    (path / "zarr.json").write_text(json.dumps(root))
    own = json.loads((path / "encoder/self/weights/zarr.json").read_text())
    own["codecs"].insert(1, {"name": "numcodecs.pickle"})
    (path / "encoder/self/weights/zarr.json").write_text(json.dumps(own))
    with pytest.raises(BrokenStoreError, match=r"pickle codec \[ATTN-STORE-003\]"):
        open_directory(Location.of(path))


def test_strings_declaring_another_count_are_refused_before_decoding(tmp_path):
    path, store = _dense(tmp_path)
    array = store.array("encoder/self/query_label")
    chunk = path / "encoder/self/query_label/c/0"
    import numcodecs

    decoded = bytearray(numcodecs.Zstd().decode(chunk.read_bytes()))
    decoded[:4] = (10**9).to_bytes(4, "little")  # a billion strings in a chunk of six
    chunk.write_bytes(numcodecs.Zstd(level=0).encode(bytes(decoded)))
    zarr_manifest.seal(path)  # a consistent file otherwise: only the count is wrong
    store = open_direct(path)
    with pytest.raises(BrokenStoreError, match=r"declares 1000000000 strings.*\[ATTN-STORE-005\]"):
        store.read(store.array("encoder/self/query_label"))
    assert array.shape == (6,)


def test_a_cut_blosc_frame_is_damage(tmp_path):
    path, store = _dense(tmp_path)
    chunk = path / "encoder/self/weights/c/0/0/0/0"
    chunk.write_bytes(chunk.read_bytes()[:-9])
    zarr_manifest.seal(path)  # so that it is the frame, not the manifest, that says so
    store = open_direct(path)
    with pytest.raises(BrokenStoreError, match=r"c/0/0/0/0.*\[ATTN-STORE-005\]"):
        store.read(store.array("encoder/self/weights"), (0,))


def test_the_store_stays_pinned_to_the_version_it_opened(tmp_path):
    path, store = _dense(tmp_path)
    expected = store.read(store.array("encoder/self/weights"), (1, 2))
    moved = tmp_path / "old.zarr"
    path.rename(moved)
    other = build("dense")
    weights = other["encoder/self"]["weights"]
    other["encoder/self"]["weights"] = weights.copy(data=np.flip(weights.values, -1))  # rows still sum to 1
    attnformat.save(other, path)
    np.testing.assert_array_equal(store.read(store.array("encoder/self/weights"), (1, 2)), expected)
    assert open_direct(path).version != store.version


# -- imports ----------------------------------------------------------------------------------------


def _modules_after(code: str) -> set[str]:
    output = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
                            check=True, capture_output=True, text=True, env={**os.environ, "MPLBACKEND": "Agg"}).stdout
    return set(output.split())


def test_import_attnformat_imports_nothing_heavy_until_asked():
    loaded = _modules_after("import attnformat")
    assert not loaded & {"xarray", "zarr", "pandas", "matplotlib", "numcodecs", "attnformat.writer", "attnformat.validation"}
    loaded = _modules_after("import attnformat; attnformat.validate")
    assert {"attnformat.validation", "xarray"} <= loaded


def test_the_public_names_are_all_there():
    import attnformat.viewer as viewer

    for package in (attnformat, viewer):
        assert set(package.__all__) <= set(dir(package))
        for name in package.__all__:
            assert getattr(package, name) is not None
    from attnformat import Writer, open as open_file, read_map  # noqa: F401 - importing is the test

    assert attnformat.examples.build("dense")["encoder/self"]["weights"].shape == (2, 3, 6, 6)  # submodules too
    assert callable(viewer.report) and viewer.report.__name__ == "report"  # the function, not its module
    from attnformat.viewer.report import plan_report  # the module is still importable as a module

    assert sys.modules["attnformat.viewer.report"].plan_report is plan_report
    assert viewer.report is sys.modules["attnformat.viewer.report"].report
    with pytest.raises(AttributeError):
        attnformat.no_such_name  # noqa: B018
