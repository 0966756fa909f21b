"""Zarr v3, Zarr v2, zip and HDF5 hold the same trees; the fast Zarr reader matches xarray's."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import attnformat
from attnformat.examples import EXAMPLES, build

STORAGES = {"zarr-v3": (".zarr", 3), "zarr-v2": (".zarr", 2), "zip": (".zarr.zip", 3), "hdf5": (".h5", 3), "netcdf": (".nc", 3)}


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("name", EXAMPLES)
def test_save_then_open_gives_an_identical_tree(tmp_path, name, storage):
    suffix, zarr_format = STORAGES[storage]
    tree = build(name)
    path = attnformat.save(tree, tmp_path / f"{name}{suffix}", zarr_format=zarr_format)
    xr.testing.assert_identical(attnformat.open(path), tree)


@pytest.mark.parametrize("name", EXAMPLES)
def test_fast_zarr_reader_equals_xarray_open_datatree(tmp_path, name):
    from attnformat.engines.zarr_manifest import MANIFEST_ATTR

    path = attnformat.save(build(name), tmp_path / f"{name}.zarr")
    reference = xr.open_datatree(path, engine="zarr", chunks=None)
    for node in reference.subtree:  # storage bookkeeping, which attnformat checks and hides
        for variable in node.variables.values():
            variable.attrs.pop(MANIFEST_ATTR, None)
    xr.testing.assert_identical(attnformat.open(path), reference)


@pytest.mark.parametrize("source", ["zarr-v3", "zip", "hdf5"])
@pytest.mark.parametrize("destination", ["zarr-v3", "zarr-v2", "zip", "hdf5"])
def test_convert_between_every_pair_of_storages(tmp_path, source, destination):
    tree = build("encoder-decoder")
    src_suffix, src_format = STORAGES[source]
    dst_suffix, dst_format = STORAGES[destination]
    src = attnformat.save(tree, tmp_path / f"src{src_suffix}", zarr_format=src_format)
    changes = attnformat.convert(src, tmp_path / f"dst{dst_suffix}", zarr_format=dst_format)
    assert changes == []
    xr.testing.assert_identical(attnformat.open(tmp_path / f"dst{dst_suffix}"), tree)


def test_float16_is_kept_in_zarr_and_becomes_float32_in_hdf5_as_documented(tmp_path):
    tree = build("dense")
    half = tree.copy()
    half["encoder/self"].dataset = half["encoder/self"].to_dataset(inherit=False).assign(
        weights=tree["encoder/self"]["weights"].astype(np.float16), logits=tree["encoder/self"]["logits"].astype(np.float16)
    )
    zarr_copy = attnformat.open(attnformat.save(half, tmp_path / "half.zarr"))
    assert zarr_copy["encoder/self"]["weights"].dtype == np.float16
    xr.testing.assert_identical(zarr_copy, half)
    changes = attnformat.convert(tmp_path / "half.zarr", tmp_path / "half.h5")
    assert changes == [
        "/encoder/self/logits: float16 stored as float32 (netCDF4 has no float16)",
        "/encoder/self/weights: float16 stored as float32 (netCDF4 has no float16)",
    ]
    hdf5_copy = attnformat.open(tmp_path / "half.h5")
    assert hdf5_copy["encoder/self"]["weights"].dtype == np.float32
    np.testing.assert_array_equal(hdf5_copy["encoder/self"]["weights"].values, half["encoder/self"]["weights"].values.astype(np.float32))


def test_small_maps_are_grouped_but_a_map_is_never_split(tmp_path):
    import zarr

    path = attnformat.save(build("steps"), tmp_path / "steps.zarr")
    weights = zarr.open_array(path / "trunk" / "iga" / "weights", mode="r")
    assert weights.shape == (3, 2, 2, 10, 10)
    # Small maps share a chunk (heads, then layers; never steps), so one head is still one read.
    assert weights.chunks == (1, 2, 2, 10, 10)


def test_large_maps_are_cut_in_strips_of_whole_rows():
    from attnformat.encoding import map_chunks

    assert map_chunks(("layer", "head", "query", "key"), (12, 12, 1024, 1024)) == (1, 1, 1024, 1024)
    assert map_chunks(("layer", "head", "query", "key"), (12, 12, 2048, 2048)) == (1, 1, 512, 2048)
    assert map_chunks(("layer", "head", "query", "key"), (1, 1, 1000, 3000)) == (1, 1, 349, 3000)
    assert map_chunks(("layer", "edge"), (2, 10_000_000)) == (1, 1024 * 1024)
    assert map_chunks(("query", "key"), (4, 3_000_000)) == (1, 1024 * 1024)  # a row longer than a chunk


def test_bit_rounding_is_declared_and_bounded(tmp_path):
    tree = build("dense")
    path = attnformat.save(tree, tmp_path / "lossy.zarr", keepbits={"weights": 8})
    stored = attnformat.open(path)["encoder/self"]["weights"]
    assert stored.attrs["lossy_method"] == "bitround" and stored.attrs["lossy_keepbits"] == 8
    original = tree["encoder/self"]["weights"].values
    relative = np.abs(stored.values - original) / original
    assert relative.max() <= 2.0**-9
    assert (stored.values > 0).all()  # small probabilities stay positive, unlike absolute quantization
    assert attnformat.validate(path).ok


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_lossless_maps_use_byte_shuffle_and_bit_rounded_maps_bit_shuffle(tmp_path, zarr_format):
    """Both the whole-tree save and the streaming writer pick the shuffle by what the data is."""
    import zarr

    def shuffle_of(array_path):
        array = zarr.open_array(array_path, mode="r")
        # Zarr v3: bytes -> blosc -> crc32c; Zarr v2: blosc as the filter, CRC32C as the compressor.
        compressor = next(c for c in (*array.filters, *array.compressors) if "blosc" in type(c).__name__.lower())
        shuffle = compressor.shuffle
        return {0: "noshuffle", 1: "shuffle", 2: "bitshuffle"}[shuffle] if isinstance(shuffle, int) else shuffle.value

    tree = build("dense")
    plain = attnformat.save(tree, tmp_path / "plain.zarr", zarr_format=zarr_format)
    rounded = attnformat.save(tree, tmp_path / "rounded.zarr", zarr_format=zarr_format, keepbits={"weights": 8})
    assert shuffle_of(plain / "encoder/self/weights") == "shuffle"
    assert shuffle_of(rounded / "encoder/self/weights") == "bitshuffle"

    with attnformat.Writer(tmp_path / "streamed.zarr", zarr_format=zarr_format) as writer:
        site = writer.create_site("self", sizes={"head": 2, "query": 4, "key": 4}, variables=("weights", "logits"), keepbits={"weights": 6}, attrs={"attention_type": "self", "causal": 0})
        site.write("weights", np.full((2, 4, 4), 0.25, "float32"))
        site.write("logits", np.zeros((2, 4, 4), "float32"))
    assert shuffle_of(tmp_path / "streamed.zarr/self/weights") == "bitshuffle"
    assert shuffle_of(tmp_path / "streamed.zarr/self/logits") == "shuffle"
