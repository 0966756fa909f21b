"""Seed 002's pairwise figures, checked against the arrays written into the file.

The file is written with attnformat's Writer the way a training loop snapshots a protein model:
steps, a batch of samples with their own C-alpha distances, logits, an additive geometric bias
(all negative) and the softmax weights. Every test compares what is drawn (scatter offsets,
image arrays, line data, colorbar limits and labels, tick labels) with numpy on those arrays.
"""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import attnformat
from attnformat.errors import SelectionError
from attnformat.examples import _root, softmax
from attnformat.testing.figures import colorbars, drawn_values, overlapping_labels
from attnformat.viewer.pairwise import (
    attention_vs_distance,
    distance_profile,
    distance_statistics,
    local_global_histogram,
    pairwise_data,
    pairwise_overview,
    query_profiles,
)

STEPS, SAMPLES, LAYERS, HEADS = (100, 200), 2, 2, 2


def _arrays(residues, seed=11):
    rng = np.random.default_rng(seed)
    walk = rng.normal(size=(SAMPLES, residues, 3))
    walk *= 3.8 / np.linalg.norm(walk, axis=-1, keepdims=True)
    coords = walk.cumsum(axis=1)
    distance = np.linalg.norm(coords[:, :, None] - coords[:, None], axis=-1)  # (sample, query, key)
    shape = (len(STEPS), SAMPLES, LAYERS, HEADS, residues, residues)
    gamma = rng.uniform(0.5, 2.0, size=(len(STEPS), 1, LAYERS, HEADS, 1, 1))
    bias = np.broadcast_to(-gamma * np.log1p(np.exp(4.0 - distance))[None, :, None, None] - 0.3, shape)
    logits = rng.normal(size=shape) + bias
    return {"weights": softmax(logits).astype(np.float32), "logits": logits.astype(np.float32),
            "bias": bias.astype(np.float32), "distance": distance.astype(np.float32)}


def _write(path, arrays):
    residues = arrays["distance"].shape[-1]
    labels = [f"R{i}" for i in range(residues)]
    with attnformat.Writer(path, model_name="toy-iga") as writer:
        site = writer.create_site(
            "trunk/iga", sizes={"step": 0, "sample": SAMPLES, "layer": LAYERS, "head": HEADS, "query": residues, "key": residues},
            variables=("weights", "logits", "bias"), coords={"query_label": ("query", labels), "key_label": ("key", labels)},
            attrs={"attention_type": "self", "causal": 0})
        site.add_variable("distance", arrays["distance"], ("sample", "query", "key"),
                          attrs={"role": "pairwise", "units": "angstrom", "long_name": "C-alpha distance"})
        for index, step in enumerate(STEPS):
            for layer in range(LAYERS):
                for name in ("weights", "logits", "bias"):
                    site.write(name, arrays[name][index, :, layer], step=step, layer=layer)
    return path


@pytest.fixture(scope="module")
def protein(tmp_path_factory):
    arrays = _arrays(24)
    return _write(tmp_path_factory.mktemp("pairwise") / "protein.attn.zarr", arrays), arrays


@pytest.fixture(scope="module")
def long_protein(tmp_path_factory):
    arrays = _arrays(64, seed=12)
    return _write(tmp_path_factory.mktemp("pairwise") / "long.attn.zarr", arrays), arrays


def _pairs(offsets):
    return sorted(map(tuple, np.asarray(offsets, dtype=np.float64).tolist()))


def test_each_sample_is_compared_with_its_own_distances(protein):
    path, truth = protein
    data = pairwise_data(path, step=200, sample=1, layer=1, head=0)
    np.testing.assert_array_equal(data.pairwise, truth["distance"][1])
    np.testing.assert_array_equal(data.weights.values, truth["weights"][1, 1, 1, 0])
    np.testing.assert_array_equal(data.bias, truth["bias"][1, 1, 1, 0])
    with pytest.raises(SelectionError, match="cannot take the mean over sample"):
        pairwise_data(path, step=200, sample="mean", layer=1)


def test_scatter_offsets_are_the_distance_weight_pairs(protein):
    path, truth = protein
    weights, distance = truth["weights"][0, 1, 0, 1].astype(np.float64), truth["distance"][1].astype(np.float64)
    ax = attention_vs_distance(path, step=100, sample=1, layer=0, head=1)
    local, far = ax.collections
    near = distance < 8.0
    assert _pairs(local.get_offsets()) == _pairs(np.column_stack([distance[near], weights[near]]))
    assert _pairs(far.get_offsets()) == _pairs(np.column_stack([distance[~near], weights[~near]]))
    ratio = weights[near].mean() / weights[~near].mean()
    assert f"local/global {ratio:.2f}" in ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["local (< 8 angstrom)", "global"]
    assert ax.get_xlabel() == "distance (angstrom)" and ax.get_ylabel() == "weights (softmax)"


def test_scatter_coloured_by_bias_honours_user_colours(protein):
    path, truth = protein
    bias = truth["bias"][1, 0, 1, 1].astype(np.float64)
    ax = attention_vs_distance(path, step=200, sample=0, layer=1, head=1, color_by_bias=True, vmin=-6, vmax=-1,
                               cmap="Blues_r", title="scatter", figsize=(5, 4))
    points = ax.collections[0]
    expected = np.column_stack([truth["distance"][0].ravel(), truth["weights"][1, 0, 1, 1].ravel()]).astype(np.float64)
    np.testing.assert_array_equal(points.get_offsets(), expected)
    np.testing.assert_array_equal(drawn_values(points), bias.ravel())
    (bar,) = colorbars(ax.figure)
    assert (bar.norm.vmin, bar.norm.vmax) == (-6, -1) and bar.ax.get_ylabel() == "bias (additive)"
    assert points.get_cmap().name.startswith("Blues_r")
    assert ax.get_title() == "scatter" and tuple(ax.figure.get_size_inches()) == (5, 4)


def test_overview_panels_values_colorbars_and_labels(protein):
    path, truth = protein
    index = (1, 1, 0, 1)  # step 200, sample 1, layer 0, head 1
    figure = pairwise_overview(path, step=200, sample=1, layer=0, head=1)
    logits, bias, weights = (truth[name][index].astype(np.float64) for name in ("logits", "bias", "weights"))
    maps = figure.axes[:5]
    np.testing.assert_allclose(drawn_values(maps[0].images[0]), logits - bias, rtol=1e-12)
    np.testing.assert_array_equal(drawn_values(maps[1].images[0]), bias)
    np.testing.assert_array_equal(drawn_values(maps[2].images[0]), logits)
    np.testing.assert_array_equal(drawn_values(maps[3].images[0]), weights)
    np.testing.assert_array_equal(drawn_values(maps[4].images[0]), truth["distance"][1])
    scatter = figure.axes[5].collections[0]
    np.testing.assert_array_equal(scatter.get_offsets(), np.column_stack([truth["distance"][1].ravel(), weights.ravel()]))
    np.testing.assert_array_equal(drawn_values(scatter), bias.ravel())
    bars = colorbars(figure)
    assert [bar.ax.get_ylabel() for bar in bars] == [
        "logits before bias (pre-softmax)", "bias (additive)", "logits (pre-softmax)", "weights (softmax)",
        "distance (angstrom)", "bias (additive)"]
    limits = [(bar.norm.vmin, bar.norm.vmax) for bar in bars]
    before = np.abs(logits - bias).max()
    assert limits[0] == (pytest.approx(-before), pytest.approx(before))  # both signs: symmetric about 0
    assert limits[1] == (pytest.approx(bias.min()), pytest.approx(bias.max()))  # all negative: one-sided
    assert limits[3] == (pytest.approx(weights.min()), pytest.approx(weights.max()))
    assert limits[5] == limits[1]  # the scatter's bias colours are the bias panel's
    assert "step 200 | sample 1 | layer 0 | head 1" in figure._suptitle.get_text()
    assert overlapping_labels(figure) == []


def test_overview_user_colour_options_win(protein):
    path, truth = protein
    figure = pairwise_overview(path, step=100, sample=0, layer=1, head=0, vmin=-6, vmax=-1, figsize=(16, 9),
                               title="IGA layer 1", scales={"bias": {"cmap": "Blues_r", "vmin": -5, "vmax": -0.3},
                                                          "weights": {"vmax": 0.2}})
    bars = colorbars(figure)
    limits = [(bar.norm.vmin, bar.norm.vmax) for bar in bars]
    assert limits[0] == limits[2] == (-6, -1)
    assert limits[1] == limits[5] == (-5, -0.3)
    assert limits[3][1] == 0.2
    assert figure.axes[1].images[0].get_cmap().name.startswith("Blues_r")
    assert figure.axes[5].collections[0].get_cmap().name.startswith("Blues_r")
    assert tuple(figure.get_size_inches()) == (16, 9) and figure._suptitle.get_text() == "IGA layer 1"
    with pytest.raises(SelectionError, match="no overview panel"):
        pairwise_overview(path, step=100, sample=0, scales={"distance": {}})


def test_overview_of_a_long_chain_thins_labels_instead_of_overlapping(long_protein):
    path, truth = long_protein
    figure = pairwise_overview(path, step=100, sample=0, layer=0, head=0)
    assert overlapping_labels(figure) == []
    ticks = [t.get_text() for t in figure.axes[0].get_yticklabels()]
    assert ticks[0] == "R0" and 1 < len(ticks) < 64  # thinned, and the axis says so
    assert "every" in figure.axes[0].get_ylabel()
    width, height = figure.get_size_inches()
    assert width <= 20 and height <= 16
    figure = pairwise_overview(path, step=100, sample=0, layer=0, head=0, figsize=(12, 7))
    assert overlapping_labels(figure) == []


def test_distance_profile_and_statistics_draw_the_binned_means(protein):
    path, truth = protein
    weights, distance = truth["weights"][1, 0, 1, 0].astype(np.float64), truth["distance"][0].astype(np.float64)
    ax = distance_profile(path, bins=5, step=200, sample=0, layer=1, head=0, title="decay", figsize=(4, 3))
    edges = np.linspace(distance.min(), distance.max(), 6)
    which = np.clip(np.digitize(distance.ravel(), edges) - 1, 0, 4)
    means = [weights.ravel()[which == b].mean() for b in range(5)]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), means, rtol=1e-12)
    np.testing.assert_allclose(ax.lines[0].get_xdata(), (edges[:-1] + edges[1:]) / 2)
    assert ax.get_title() == "decay" and tuple(ax.figure.get_size_inches()) == (4, 3)
    figure = distance_statistics(path, bins=5, step=200, sample=0, layer=1, head=0, title="IGA statistics", figsize=(12, 4))
    assert figure._suptitle.get_text() == "IGA statistics" and tuple(figure.get_size_inches()) == (12, 4)
    np.testing.assert_allclose(figure.axes[0].lines[0].get_ydata(), means, rtol=1e-12)
    bias = truth["bias"][1, 0, 1, 0].astype(np.float64)
    np.testing.assert_allclose(figure.axes[1].lines[0].get_ydata(), [bias.ravel()[which == b].mean() for b in range(5)], rtol=1e-6)
    near = distance < 8.0
    assert figure.axes[2].get_title() == f"local {weights[near].mean():.4f} vs global {weights[~near].mean():.4f} " \
                                         f"(ratio {weights[near].mean() / weights[~near].mean():.2f})"
    assert overlapping_labels(figure) == []


def test_histogram_splits_local_and_global_weights(protein):
    path, truth = protein
    data = pairwise_data(path, step=100, sample=1, layer=0, head=0, threshold=6.0)
    ax = local_global_histogram(data)
    weights, distance = truth["weights"][0, 1, 0, 0].astype(np.float64), truth["distance"][1]
    local_counts, _ = np.histogram(weights[distance < 6.0], bins=20, density=True)
    heights = [patch.get_height() for patch in ax.patches[:20]]
    np.testing.assert_allclose(heights, local_counts, rtol=1e-6)


def test_query_profiles_follow_the_chosen_sample(protein):
    path, truth = protein
    figure = query_profiles(path, queries=["R3", 10], step=100, sample=1, layer=1, head=1, ncols=1,
                            title="profiles", figsize=(6, 6))
    weights, bias, distance = truth["weights"][0, 1, 1, 1], truth["bias"][0, 1, 1, 1], truth["distance"][1]
    first, twin = figure.axes[0], figure.axes[2]  # the two query panels, then their bias twins
    np.testing.assert_array_equal(first.lines[0].get_ydata(), weights[3])
    np.testing.assert_array_equal(twin.lines[0].get_ydata(), bias[3])
    assert len(first.patches) == int((distance[3] < 8.0).sum())  # shaded neighbourhood of this sample
    assert twin.get_ylabel() == "bias (additive)"
    assert figure._suptitle.get_text() == "profiles" and tuple(figure.get_size_inches()) == (6, 6)
    assert overlapping_labels(figure) == []
    assert overlapping_labels(query_profiles(path, step=100, sample=1)) == []


def test_units_of_logits_and_bias_reach_the_colorbars():
    rng = np.random.default_rng(2)
    n = 6
    distance = rng.uniform(1, 20, size=(n, n))
    bias = -np.log1p(np.exp(4.0 - distance))
    logits = rng.normal(size=(n, n)) + bias
    site = xr.Dataset(
        {"weights": (("query", "key"), softmax(logits)), "logits": (("query", "key"), logits, {"units": "kT"}),
         "bias": (("query", "key"), bias, {"units": "kT"}),
         "distance": (("query", "key"), distance, {"role": "pairwise", "units": "nm"})},
        attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key", "attention_type": "self", "causal": 0})
    tree = xr.DataTree.from_dict({"/": _root("units"), "/attn": site})
    labels = [bar.ax.get_ylabel() for bar in colorbars(pairwise_overview(tree, threshold=5.0))]
    assert labels == ["logits before bias (pre-softmax) [kT]", "bias (additive) [kT]", "logits (pre-softmax) [kT]",
                      "weights (softmax)", "distance (nm)", "bias (additive) [kT]"]
