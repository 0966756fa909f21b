"""Chunks that fit the map: small maps grouped (few files), large maps in strips of whole rows,
values unchanged, one head read from one chunk. Ground truth is zarr's own reading."""

from __future__ import annotations

import json
import sys

import google_crc32c
import numpy as np
import pytest
import xarray as xr
import zarr

import attnformat
from attnformat.encoding import MIN_MAP_CHUNK_ELEMENTS, map_chunks
from attnformat.examples import softmax

SITE_ATTRS = {"attention_type": "self", "causal": 0}


def _chunk_files(array_dir):
    return sorted(p for p in array_dir.rglob("*") if p.is_file() and p.name not in ("zarr.json", ".zarray", ".zattrs"))


def test_short_texts_are_a_few_chunks_not_one_file_per_map(tmp_path):
    # 200 short texts of a 6-layer, 12-head model, captured layer by layer as the adapters do.
    rng = np.random.default_rng(0)
    weights = softmax(rng.normal(size=(200, 6, 12, 12, 12))).astype(np.float32)
    path = tmp_path / "texts.zarr"
    with attnformat.Writer(path, model_name="toy", model_framework="numpy") as writer:
        site = writer.create_site("encoder/self", sizes={"sample": 200, "layer": 6, "head": 12, "query": 12, "key": 12}, attrs=SITE_ATTRS)
        for layer in range(6):
            site.write("weights", weights[:, layer], layer=layer)
    stored = zarr.open_array(path / "encoder/self/weights")
    # A chunk is what one write covers (all samples' heads of one layer), grouped to the minimum.
    assert stored.chunks == (40, 1, 12, 12, 12)
    assert np.prod(stored.chunks) >= MIN_MAP_CHUNK_ELEMENTS
    assert len(_chunk_files(path / "encoder/self/weights")) == 5 * 6  # one chunk per map would be 14,400
    np.testing.assert_array_equal(stored[...], weights)
    files = [p for p in path.rglob("*") if p.is_file()]
    assert len(files) < 60


def test_saving_a_tree_groups_small_maps_and_keeps_large_ones_in_strips(tmp_path):
    rng = np.random.default_rng(1)
    small = softmax(rng.normal(size=(6, 12, 12, 12))).astype(np.float32)
    large = softmax(rng.normal(size=(2, 1, 1100, 1100))).astype(np.float32)
    sites = {}
    for name, weights in (("small", small), ("large", large)):
        layers, heads, tokens = weights.shape[0], weights.shape[1], weights.shape[2]
        sites[f"/{name}"] = xr.Dataset(
            {"weights": (("layer", "head", "query", "key"), weights)},
            coords={"layer": np.arange(layers), "head": np.arange(heads), "query_label": ("query", [f"t{i}" for i in range(tokens)]),
                    "key_label": ("key", [f"t{i}" for i in range(tokens)])},
            attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key", **SITE_ATTRS},
        )
    root = xr.Dataset(attrs={"attnformat": "attnformat", "attnformat_version": attnformat.conventions.FORMAT_VERSION,
                             "producer": "test", "completeness": "complete"})
    tree = xr.DataTree.from_dict({"/": root, **sites})
    path = attnformat.save(tree, tmp_path / "mixed.zarr", check="none")
    small_array = zarr.open_array(path / "small/weights")
    large_array = zarr.open_array(path / "large/weights")
    assert small_array.chunks == (6, 12, 12, 12)  # every map of the site in one chunk
    assert len(_chunk_files(path / "small/weights")) == 1
    assert large_array.chunks == (1, 1, 953, 1100)  # strips of whole rows, at most 1024 x 1024
    assert len(_chunk_files(path / "large/weights")) == 2 * 2
    np.testing.assert_array_equal(small_array[...], small)
    np.testing.assert_array_equal(large_array[...], large)


@pytest.mark.parametrize("dims, shape, expected", [
    (("layer", "head", "query", "key"), (6, 12, 12, 12), (6, 12, 12, 12)),
    (("layer", "head", "query", "key"), (12, 16, 128, 128), (1, 4, 128, 128)),
    (("layer", "head", "query", "key"), (12, 12, 1024, 1024), (1, 1, 1024, 1024)),
    (("step", "head", "query", "key"), (0, 2, 8, 8), (1, 2, 8, 8)),  # step is never grouped
    (("layer", "head", "edge"), (4, 8, 500), (4, 8, 500)),
    (("head", "query", "key"), (7, 100, 100), (7, 100, 100)),  # 7 is prime: all of it
])
def test_map_chunks_group_heads_then_layers(dims, shape, expected):
    assert map_chunks(dims, shape) == expected


@pytest.mark.parametrize("tensorstore", [True, False])
@pytest.mark.parametrize("write_behind", [False, True])
def test_head_by_head_writes_into_grouped_chunks_merge_correctly(tmp_path, monkeypatch, tensorstore, write_behind):
    if not tensorstore:
        monkeypatch.setitem(sys.modules, "tensorstore", None)  # as if it were not installed
    rng = np.random.default_rng(2)
    weights = softmax(rng.normal(size=(3, 4, 10, 10))).astype(np.float32)
    path = tmp_path / "heads.zarr"
    order = [(layer, head) for layer in range(3) for head in range(4)]
    rng.shuffle(order)
    with attnformat.Writer(path, write_behind=write_behind, model_name="toy", model_framework="numpy") as writer:
        site = writer.create_site("self", sizes={"layer": 3, "head": 4, "query": 10, "key": 10}, attrs=SITE_ATTRS)
        for layer, head in order:
            buffer = weights[layer, head].copy()
            site.write("weights", buffer, layer=layer, head=head)
            buffer[...] = -1  # the caller reuses its buffer: what was written must not change
    stored = zarr.open_array(path / "self/weights")
    assert stored.chunks == (3, 4, 10, 10)  # many writes, one chunk
    np.testing.assert_array_equal(stored[...], weights)


def test_reading_one_head_decodes_one_chunk(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorstore", None)  # every chunk read goes through zarr's codecs
    rng = np.random.default_rng(3)
    weights = softmax(rng.normal(size=(8, 12, 40, 40))).astype(np.float32)
    path = tmp_path / "one.zarr"
    with attnformat.Writer(path, model_name="toy", model_framework="numpy") as writer:
        site = writer.create_site("self", sizes={"layer": 8, "head": 12, "query": 40, "key": 40}, attrs=SITE_ATTRS)
        for layer in range(8):
            site.write("weights", weights[layer], layer=layer)
    assert zarr.open_array(path / "self/weights").chunks == (4, 12, 40, 40)  # two chunks of four layers
    tree = attnformat.open(path)  # coordinates are read here
    checked = []
    original = google_crc32c.value

    def spy(data):
        if len(data) > 64:  # the chunk manifest also hashes the chunk's key (a few bytes) first
            checked.append(len(data))
        return original(data)

    # Every chunk carries a CRC32C that every reading road verifies: one verification, one chunk.
    monkeypatch.setattr(google_crc32c, "value", spy)
    values = tree["self"]["weights"].sel(layer=5, head=7).values
    np.testing.assert_array_equal(values, weights[5, 7])
    chunk_file = path / "self/weights/c/1/0/0/0"  # layers 4-7
    assert checked == [chunk_file.stat().st_size - 4]


def test_every_stored_chunk_carries_a_checksum(tmp_path):
    path = tmp_path / "sum.zarr"
    with attnformat.Writer(path, model_name="toy", model_framework="numpy") as writer:
        site = writer.create_site("self", sizes={"head": 2, "query": 3, "key": 3}, attrs=SITE_ATTRS)
        site.write("weights", np.full((2, 3, 3), 1 / 3))
    codecs = [codec["name"] for codec in json.loads((path / "self/weights/zarr.json").read_text())["codecs"]]
    assert codecs == ["bytes", "blosc", "crc32c"]
