"""Edge attention (seed 000), pairwise analyses (seed 002) and image overlays (seed 003)."""

from __future__ import annotations

import numpy as np
import pytest

import attnformat
from attnformat.errors import SelectionError
from attnformat.viewer import (
    attention_vs_distance,
    binned_means,
    distance_profile,
    distance_statistics,
    image_attention_grid,
    image_overlay,
    node_link,
    pairwise_overview,
    query_profiles,
    top_edges,
)

from conftest import drawn


def test_top_edges_bars_are_the_largest_weights_of_the_time_step(example):
    tree = attnformat.open(example("edge-time"))
    site = tree["spatial"]
    ax = top_edges(tree, k=5, time=2)
    weights = site["weights"].sel(time=2).isel(sample=0, layer=0).values
    order = np.argsort(-weights)[:5]
    np.testing.assert_array_equal([bar.get_height() for bar in ax.patches], weights[order])
    labels = site["node_label"].values
    expected = [f"{labels[s]} -> {labels[t]}" for s, t in zip(site["source"].values[order], site["target"].values[order])]
    assert [t.get_text() for t in ax.get_xticklabels()] == expected
    assert ax.get_title() == "spatial | sample 0 | layer 0 | time 2 | weights (softmax) | top 5 of 17 edges"


def test_node_link_draws_every_non_loop_edge(example):
    tree = attnformat.open(example("edge"))
    site = tree["gat"]
    ax = node_link(tree, layer=1, head=0)
    loops = site["source"].values == site["target"].values
    np.testing.assert_array_equal(ax.collections[0].get_array(), site["weights"].sel(layer=1, head=0).values[~loops])
    assert "16 edges drawn, 6 self-loops not drawn" in ax.get_title()
    assert {t.get_text() for t in ax.texts} == {f"sensor {i}" for i in range(6)}
    with pytest.raises(SelectionError, match="no node positions"):
        node_link(example("edge-time"))


def test_overview_panels_follow_seed_002(example):
    tree = attnformat.open(example("steps"))
    site = tree["trunk/iga"]
    figure = pairwise_overview(tree, step=200, layer=1, head=1)
    selected = {name: site[name].sel(step=200, layer=1, head=1).values for name in ("logits", "bias", "weights")}
    assert len(figure.axes) == 6 + 6  # 2x3 panels, each with its colorbar
    maps = figure.axes[:5]
    np.testing.assert_allclose(drawn(maps[0]), selected["logits"] - selected["bias"], rtol=1e-6)
    np.testing.assert_array_equal(drawn(maps[1]), selected["bias"])
    np.testing.assert_array_equal(drawn(maps[2]), selected["logits"])
    np.testing.assert_array_equal(drawn(maps[3]), selected["weights"])
    np.testing.assert_array_equal(drawn(maps[4]), site["distance"].values)
    bias_norm = maps[1].images[0].norm  # all-negative bias: a one-sided scale over the data, no crash
    assert bias_norm.vmax <= 0 and bias_norm.vmin == pytest.approx(float(selected["bias"].min()))
    scatter = figure.axes[5].collections[0]
    np.testing.assert_array_equal(scatter.get_offsets()[:, 0], site["distance"].values.ravel())
    np.testing.assert_array_equal(scatter.get_array(), selected["bias"].ravel())
    assert "step 200 | layer 1 | head 1" in figure._suptitle.get_text()


def test_attention_vs_distance_local_global_split(example):
    tree = attnformat.open(example("steps"))
    site = tree["trunk/iga"]
    ax = attention_vs_distance(tree, threshold=5.0, step=100, layer=0, head=0)
    weights = site["weights"].sel(step=100, layer=0, head=0).values.astype(np.float64)
    distance = site["distance"].values.astype(np.float64)
    local, far = ax.collections
    np.testing.assert_array_equal(np.sort(local.get_offsets()[:, 0]), np.sort(distance[distance < 5.0]))
    np.testing.assert_array_equal(np.sort(far.get_offsets()[:, 1]), np.sort(weights[distance >= 5.0]))
    ratio = weights[distance < 5.0].mean() / weights[distance >= 5.0].mean()
    assert f"local/global {ratio:.2f}" in ax.get_title()
    assert ax.lines[0].get_xdata()[0] == 5.0


def test_binned_profile_and_statistics(example):
    tree = attnformat.open(example("steps"))
    site = tree["trunk/iga"]
    ax = distance_profile(tree, bins=4, step=300, layer=1, head=0)
    weights = site["weights"].sel(step=300, layer=1, head=0).values
    centres, means, counts = binned_means(site["distance"].values, weights, 4)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), means)
    assert counts.sum() == weights.size
    figure = distance_statistics(tree, step=300)
    assert len(figure.axes) == 3
    assert "local" in figure.axes[2].get_title()


def test_query_profiles_shade_the_neighbourhood(example):
    tree = attnformat.open(example("steps"))
    site = tree["trunk/iga"]
    figure = query_profiles(tree, queries=["R3"], threshold=8.0, layer=0, step=100)
    ax = figure.axes[0]
    weights = site["weights"].sel(step=100, layer=0, head=0).values
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), weights[3])
    shaded = [p for p in ax.patches]
    assert len(shaded) == int((site["distance"].values[3] < 8.0).sum())
    twin = figure.axes[1]  # the bias, on its own y axis
    np.testing.assert_array_equal(twin.lines[0].get_ydata(), site["bias"].sel(step=100, layer=0, head=0).values[3])
    assert len(query_profiles(tree).axes) == 4 + 4


def test_cls_attention_upsampled_onto_the_image(example):
    tree = attnformat.open(example("image"))
    site = tree["encoder/self"]
    ax = image_overlay(tree, layer=1, head=0)
    np.testing.assert_array_equal(drawn(ax), site["image"].values)
    cls_row = site["weights"].sel(layer=1, head=0).values[0, 1:]  # CLS -> every patch, row-major
    overlay = np.ma.filled(ax.images[1].get_array(), np.nan)
    assert overlay.shape == (28, 28)
    np.testing.assert_allclose(overlay[::7, ::7], cls_row.reshape(4, 4), rtol=1e-6)
    np.testing.assert_allclose(overlay[6, 13], cls_row[1], rtol=1e-6)  # pixel (6, 13) lies in patch (0, 1)
    assert "query [CLS]" in ax.get_title()


def test_image_grids_per_head_and_per_layer(example):
    tree = attnformat.open(example("image"))
    site = tree["encoder/self"]
    figure = image_attention_grid(tree, over="head", layer=0)
    panels = [ax for ax in figure.axes if getattr(ax, "_colorbar", None) is None]
    assert [ax.get_title() for ax in panels] == ["head 0", "head 1", "head 0 on the image", "head 1 on the image"]
    np.testing.assert_allclose(drawn(panels[1]).ravel(), site["weights"].sel(layer=0, head=1).values[0, 1:], rtol=1e-6)
    by_layer = image_attention_grid(tree, over="layer", query="patch (1,1)")
    panels = [ax for ax in by_layer.axes if getattr(ax, "_colorbar", None) is None]
    mean_row = site["weights"].sel(layer=1).values.mean(axis=0)[6, 1:]  # CLS, then patches row-major
    np.testing.assert_allclose(drawn(panels[1]).ravel(), mean_row, rtol=1e-6)


def test_overlay_picks_the_sample_image_and_handles_colour(tmp_path):
    import xarray as xr

    from attnformat.examples import _root, softmax

    rng = np.random.default_rng(3)
    tokens = 1 + 2 * 2
    weights = softmax(rng.normal(size=(2, 1, 1, tokens, tokens))).astype(np.float32)
    images = rng.random((2, 8, 8, 3)).astype(np.float32) * 255
    rows = np.array([-1, 0, 0, 1, 1])
    cols = np.array([-1, 0, 1, 0, 1])
    site = xr.Dataset(
        {"weights": (("sample", "layer", "head", "query", "key"), weights),
         "image": (("sample", "image_row", "image_col", "channel"), images, {"role": "image"})},
        coords={"layer": [0], "head": [0], "query_patch_row": ("query", rows), "query_patch_col": ("query", cols),
                "key_patch_row": ("key", rows), "key_patch_col": ("key", cols)},
        attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key", "attention_type": "self",
               "causal": 0, "patch_grid": [2, 2]})
    path = attnformat.save(xr.DataTree.from_dict({"/": _root("rgb"), "/vit": site}), tmp_path / "rgb.zarr")
    ax = image_overlay(path, sample=1, head=0)
    shown = np.asarray(ax.images[0].get_array())
    expected = (images[1] - images[1].min()) / (images[1].max() - images[1].min())
    np.testing.assert_allclose(shown, expected, rtol=1e-5)
    overlay = np.ma.filled(ax.images[1].get_array(), np.nan)
    np.testing.assert_allclose(overlay[::4, ::4], weights[1, 0, 0, 0, 1:].reshape(2, 2), rtol=1e-6)
    assert "sample 1" in ax.get_title()


@pytest.mark.parametrize("suffix", [".h5", ".zarr.zip"])
def test_every_storage_draws_the_same(example, tmp_path, suffix):
    from attnformat.viewer import heatmap

    copy = tmp_path / f"frames{suffix}"
    attnformat.convert(example("frames"), copy)
    ax = heatmap(copy, variable="logits", layer=3, head=2)
    np.testing.assert_array_equal(drawn(ax), attnformat.open(example("frames"))["blocks"]["logits"].sel(layer=3, head=2).values)


def test_image_overlay_from_hdf5_where_attributes_are_arrays(example, tmp_path):
    copy = tmp_path / "image.h5"
    attnformat.convert(example("image"), copy)
    ax = image_overlay(copy, layer=1, head=0)
    cls_row = attnformat.open(example("image"))["encoder/self"]["weights"].sel(layer=1, head=0).values[0, 1:]
    np.testing.assert_allclose(np.ma.filled(ax.images[1].get_array(), np.nan)[::7, ::7], cls_row.reshape(4, 4), rtol=1e-6)
