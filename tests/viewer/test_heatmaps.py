"""Heatmaps: drawn values equal the file, labels, colour scales (diverging logits too), pooling."""

from __future__ import annotations

import matplotlib.colors as mcolors
import numpy as np
import pytest

import attnformat
from attnformat.viewer import heatmap, temporal_matrix

from conftest import dense_tree, drawn


def test_one_head_with_labels_and_title(example):
    tree = attnformat.open(example("dense"))
    ax = heatmap(tree, layer=1, head=2)
    np.testing.assert_array_equal(drawn(ax), tree["encoder/self"]["weights"].sel(layer=1, head=2).values)
    assert ax.get_title() == "encoder/self | layer 1 | head 2 | weights (softmax)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["[CLS]", "the", "cat", "sat", "down", "[SEP]"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("key", "query")
    assert len(ax.figure.axes) == 2  # the map and its colorbar


def test_mean_over_heads_cmap_limits_and_log(example):
    tree = attnformat.open(example("dense"))
    weights = tree["encoder/self"]["weights"].sel(layer=0).values
    ax = heatmap(tree, layer=0, cmap="hot", vmin=0.0, vmax=0.1)
    np.testing.assert_allclose(drawn(ax), weights.mean(axis=0), rtol=1e-6)
    image = ax.images[0]
    assert image.cmap.name.startswith("hot") and (image.norm.vmin, image.norm.vmax) == (0.0, 0.1)
    assert "head mean of 3" in ax.get_title()
    log_ax = heatmap(tree, layer=0, head=0, log=True)
    assert isinstance(log_ax.images[0].norm, mcolors.LogNorm)


def test_steps_file_selects_by_step_and_draws_bias(example):
    tree = attnformat.open(example("steps"))
    ax = heatmap(tree, variable="bias", step=200, layer=1, head=0)
    np.testing.assert_array_equal(drawn(ax), tree["trunk/iga"]["bias"].sel(step=200, layer=1, head=0).values)
    assert ax.get_title() == "trunk/iga | step 200 | layer 1 | head 0 | bias (additive)"


@pytest.mark.parametrize("case", ["all-negative", "all-positive", "nan-and-inf", "all-nan"])
def test_diverging_logits_never_crash_and_scale_honestly(case):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 2, 6, 6))
    if case == "all-negative":
        logits = -np.abs(logits) - 1.0
    elif case == "all-positive":
        logits = np.abs(logits) + 1.0
    elif case == "nan-and-inf":
        logits[0, 0, 0, 1] = np.nan
        logits[0, 0, 2, 3] = -np.inf
        logits[0, 0, 4, 5] = np.inf
    else:
        logits[:] = np.nan
    tree = dense_tree(logits, with_weights=False)
    ax = heatmap(tree, variable="logits", head=0)
    norm = ax.images[0].norm
    finite = logits[0, 0][np.isfinite(logits[0, 0])]
    if case in ("all-negative", "all-positive"):
        # Data on one side of 0 get a one-sided scale over their own range (no wasted half).
        assert (norm.vmin, norm.vmax) == pytest.approx((finite.min(), finite.max()), rel=1e-6)
    else:
        # Data on both sides (or none) get a symmetric scale with white at 0.
        assert norm.vmin == -norm.vmax and norm.vmax > 0
        assert float(norm(0.0)) == pytest.approx(0.5)
        if finite.size:
            assert norm.vmax == pytest.approx(np.abs(finite).max(), rel=1e-6)
    colorbar = ax.figure.axes[1]
    low, high = colorbar.get_ylim()
    assert (low, high) == pytest.approx((norm.vmin, norm.vmax))
    shown = drawn(ax)
    assert np.isnan(shown[~np.isfinite(logits[0, 0])]).all()  # NaN and inf drawn as missing
    assert ax.get_title().endswith("not captured (all NaN)") == (case == "all-nan")
    ax.figure.canvas.draw()  # and the figure really renders


def test_explicit_limits_around_zero_use_two_slopes():
    tree = dense_tree(np.random.default_rng(1).normal(size=(1, 1, 4, 4)))
    norm = heatmap(tree, variable="logits", vmin=-1.0, vmax=3.0).images[0].norm
    assert isinstance(norm, mcolors.TwoSlopeNorm) and (norm.vmin, norm.vcenter, norm.vmax) == (-1.0, 0.0, 3.0)
    # Limits that do not straddle the centre are used exactly as given (issue 9: user limits win).
    norm = heatmap(tree, variable="logits", vmin=-5.0, vmax=-1.0).images[0].norm
    assert (norm.vmin, norm.vmax) == (-5.0, -1.0)


def test_large_map_is_pooled_and_the_title_says_so():
    size = 4096
    rng = np.random.default_rng(2)
    import xarray as xr

    from attnformat.examples import _root

    weights = rng.random((size, size), dtype=np.float32)
    tree = xr.DataTree.from_dict({"/": _root("big"), "/s": xr.Dataset(
        {"weights": (("query", "key"), weights)}, attrs={"layout": "dense", "normalization": "other"})})
    ax = heatmap(tree, pool="max")
    assert drawn(ax).shape == (1024, 1024)
    np.testing.assert_array_equal(drawn(ax)[0, 0], weights[:4, :4].max())
    assert ax.get_title().endswith("shown as 4x4 block max")
    assert len(ax.get_xticklabels()) < 64  # positions, not 4096 labels


def test_edges_densified_for_a_temporal_node(example):
    tree = attnformat.open(example("edge-time"))
    site = tree["temporal"]
    ax = temporal_matrix(tree, node=3)
    expected = np.zeros((4, 4))
    expected[site["target"].values, site["source"].values] = site["weights"].isel(sample=0, layer=0, node=3).values
    np.testing.assert_array_equal(drawn(ax), expected)
    assert ax.get_title() == "temporal | sample 0 | layer 0 | node 3 | weights (softmax)"
    assert ax.get_ylabel() == "target time (query)"


def test_accepts_a_site_group_and_draws_on_a_given_axes(example):
    import matplotlib.pyplot as plt

    tree = attnformat.open(example("encoder-decoder"))
    figure, (left, right) = plt.subplots(1, 2)
    assert heatmap(tree["decoder/cross"], layer=1, head=0, ax=right) is right
    np.testing.assert_array_equal(drawn(right), tree["decoder/cross"]["weights"].sel(layer=1, head=0).values)
    assert not left.images and right.get_title().startswith("decoder/cross | layer 1 | head 0")
