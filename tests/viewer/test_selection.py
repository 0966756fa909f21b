"""Selectors, reductions, padding, densified edges and display pooling, without drawing."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import attnformat
from attnformat.errors import NonConformingError, SelectionError
from attnformat.viewer import block_pool, densify_edges, labels_of, pool_for_display, position, resolve_site, select


def test_one_head_equals_the_file_slice(example):
    tree = attnformat.open(example("dense"))
    chosen = select(tree, layer=1, head=2)
    expected = tree["encoder/self"]["weights"].sel(layer=1, head=2).values
    np.testing.assert_array_equal(chosen.values, expected)
    assert chosen.query_labels == ["[CLS]", "the", "cat", "sat", "down", "[SEP]"]
    assert chosen.title() == "encoder/self | layer 1 | head 2 | weights (softmax)"


def test_head_defaults_to_mean_and_max_reduces(example):
    tree = attnformat.open(example("dense"))
    weights = tree["encoder/self"]["weights"].sel(layer=0).values
    np.testing.assert_allclose(select(tree, layer=0).values, weights.mean(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(select(tree, layer=0, head="max").values, weights.max(axis=0))
    both = select(tree, layer="mean", head="mean")
    np.testing.assert_allclose(both.values, tree["encoder/self"]["weights"].values.mean(axis=(0, 1)), rtol=1e-6)
    assert both.describe() == "layer mean of 2 | head mean of 3"


def test_large_slices_are_reduced_map_by_map_with_the_same_result(example, monkeypatch):
    from attnformat.viewer import selection

    tree = attnformat.open(example("steps"))
    in_memory = [select(tree, step="mean", layer=1).values, select(tree, head="max", layer="max").values]
    monkeypatch.setattr(selection, "_STREAM_ELEMENTS", 1)
    streamed = [select(tree, step="mean", layer=1).values, select(tree, head="max", layer="max").values]
    np.testing.assert_allclose(streamed[0], in_memory[0], rtol=1e-6)
    np.testing.assert_array_equal(streamed[1], in_memory[1])


def test_large_slices_keep_whole_dimensions_map_by_map_with_the_same_result(example, monkeypatch):
    """A layer comparison of the head mean/max streams one map at a time along the kept layers too."""
    from attnformat.viewer import selection

    tree = attnformat.open(example("steps"))
    weights = tree["trunk/iga"]["weights"].isel(step=0).values  # (layer, head, query, key)
    monkeypatch.setattr(selection, "_STREAM_ELEMENTS", 1)
    mean = select(tree, keep=("layer",), head="mean")
    assert mean.dims[0] == "layer" and mean.values.shape == weights.shape[:1] + weights.shape[2:]
    np.testing.assert_allclose(mean.values, weights.mean(axis=1), rtol=1e-6)
    np.testing.assert_array_equal(select(tree, keep=("layer",), head="max").values, weights.max(axis=1))
    reads = []
    original = selection._TreeSite.read

    def counting(self, variable, fixed):
        reads.append(dict(fixed))
        return original(self, variable, fixed)

    monkeypatch.setattr(selection._TreeSite, "read", counting)
    select(tree, keep=("layer",), head="mean")
    assert reads and all({"layer", "head"} <= set(read) for read in reads)  # one map per read


def test_layer_selector_matches_coordinate_values_not_positions(example):
    tree = attnformat.open(example("frames"))
    chosen = select(tree, layer=3, head=1)
    np.testing.assert_array_equal(chosen.values, tree["blocks"]["weights"].sel(layer=3, head=1).values)
    with pytest.raises(SelectionError, match=r"layer 0 not in file .*frames.zarr, site blocks; layers: 3"):
        select(tree, layer=0)


def test_missing_selectors_list_what_exists(example):
    path = example("dense")
    with pytest.raises(SelectionError, match=r"layer 99 not in file .*dense.zarr, site encoder/self; layers: 0, 1$"):
        select(path, layer=99)
    with pytest.raises(SelectionError, match=r"query nope not in .*queries: \[CLS\], the, cat, sat, down, \[SEP\]"):
        position(resolve_site(path), "query", "nope")
    with pytest.raises(SelectionError, match=r"sites: decoder/cross, decoder/self, encoder/self"):
        select(example("encoder-decoder"), site="nowhere/self")
    with pytest.raises(SelectionError, match=r"has no step dimension"):
        select(path, step=100)
    with pytest.raises(SelectionError, match=r"variables: logits, weights"):
        select(path, "bias")


def test_labels_select_queries_and_nodes(example):
    site = resolve_site(example("dense"))
    assert position(site, "query", "cat") == 2
    assert position(site, "query", 2) == 2
    edge_site = resolve_site(example("edge"))
    assert labels_of(edge_site, "node")[2] == "sensor 2"


def test_padding_is_dropped_for_one_sample(example):
    tree = attnformat.open(example("padded-batch"))
    chosen = select(tree, sample=1, head=0)
    full = tree["encoder/self"]["weights"].isel(sample=1, layer=0, head=0).values
    np.testing.assert_array_equal(chosen.values, full[:3, :3])
    assert chosen.query_labels == ["[CLS]", "hi", "[SEP]"]
    assert select(tree, sample=1, head=0, drop_padding=False).values.shape == (5, 5)


def test_edges_are_densified_target_rows_source_columns(example):
    tree = attnformat.open(example("edge-time"))
    site = tree["temporal"]
    chosen = select(tree, site="temporal", node=2)
    edges = site["weights"].isel(sample=0, layer=0, node=2).values
    expected = np.zeros((4, 4))
    expected[site["target"].values, site["source"].values] = edges
    np.testing.assert_array_equal(chosen.values, expected)
    assert densify_edges(np.array([np.nan]), np.array([0]), np.array([1]), 2, fill=np.nan)[1, 0] != 0


def test_block_pooling_states_the_reduction():
    values = np.arange(36.0).reshape(6, 6)
    np.testing.assert_array_equal(block_pool(values, 3, "max"), [[14.0, 17.0], [32.0, 35.0]])
    padded = block_pool(np.ones((5, 5)), 2)
    assert padded.shape == (3, 3) and np.all(padded == 1.0)  # NaN padding does not dilute the mean
    tree = xr.DataTree.from_dict({"/": xr.Dataset(), "/s": xr.Dataset(
        {"weights": (("query", "key"), np.full((8, 8), 0.125, np.float32))}, attrs={"layout": "dense", "normalization": "softmax"})})
    chosen = pool_for_display(select(tree["s"]), max_size=4)
    assert chosen.values.shape == (4, 4) and "shown as 2x2 block mean" in chosen.title()


def test_nonconforming_file_gets_the_validator_message(tmp_path, example):
    tree = attnformat.examples.build("dense")
    tree["encoder/self"].attrs["normalization"] = "bogus"
    path = tmp_path / "bad.zarr"
    tree.to_zarr(path)
    with pytest.raises(NonConformingError, match="does NOT conform") as caught:
        select(path)
    assert not caught.value.report.ok
