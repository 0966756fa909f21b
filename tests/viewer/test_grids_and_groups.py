"""Head grids, layer comparison, encoder-decoder flow, group maps and per-head bars with sink scores."""

from __future__ import annotations

import numpy as np
import pytest

import attnformat
from attnformat.errors import SelectionError
from attnformat.viewer import attention_flow, group_bars, group_map, head_grid, layer_comparison, sink_score, step_comparison

from conftest import drawn


def test_head_grid_one_axes_per_head_on_one_scale(example):
    tree = attnformat.open(example("dense"))
    figure = head_grid(tree, layer=1)
    assert len(figure.axes) == 3 + 1  # heads and the shared colorbar
    weights = tree["encoder/self"]["weights"].sel(layer=1).values
    for head, ax in enumerate(figure.axes[:3]):
        assert ax.get_title() == f"head {head}"
        np.testing.assert_array_equal(drawn(ax), weights[head])
    norms = {(ax.images[0].norm.vmin, ax.images[0].norm.vmax) for ax in figure.axes[:3]}
    assert norms == {(float(weights.min()), float(weights.max()))}
    assert figure._suptitle.get_text() == "encoder/self | layer 1 | weights (softmax) | every head"


def test_frame_by_frame_logits_grid_like_seed_004(example):
    tree = attnformat.open(example("frames"))
    figure = head_grid(tree, variable="logits", by_group=True, origin="lower")
    logits = tree["blocks"]["logits"].sel(layer=3).values
    groups = tree["blocks"]["query_group"].values
    expected = np.array([[[logits[h][np.ix_(groups == q, groups == k)].mean() for k in range(5)] for q in range(5)]
                         for h in range(4)])
    for head, ax in enumerate(figure.axes[:4]):
        np.testing.assert_allclose(drawn(ax), expected[head], rtol=1e-5)
        assert ax.images[0].origin == "lower"
        # one row of 4: every panel is on the bottom edge, only the first on the left edge
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("key frame", "query frame" if head == 0 else "")
    norm = figure.axes[0].images[0].norm
    assert norm.vmin == -norm.vmax == pytest.approx(-np.abs(expected).max(), rel=1e-5)
    assert figure.axes[0].images[0].cmap.name.startswith("RdBu_r")


def test_layer_comparison(example):
    tree = attnformat.open(example("encoder-decoder"))
    figure = layer_comparison(tree, site="decoder/cross", head=1)
    assert [ax.get_title() for ax in figure.axes[:2]] == ["layer 0", "layer 1"]
    for layer, ax in enumerate(figure.axes[:2]):
        np.testing.assert_array_equal(drawn(ax), tree["decoder/cross"]["weights"].sel(layer=layer, head=1).values)


def test_step_comparison_of_training_snapshots(example):
    tree = attnformat.open(example("steps"))
    figure = step_comparison(tree, variable="logits", layer=1, head=1)
    assert [ax.get_title() for ax in figure.axes[:3]] == ["step 100", "step 200", "step 300"]
    for step, ax in zip((100, 200, 300), figure.axes[:3]):
        np.testing.assert_array_equal(drawn(ax), tree["trunk/iga"]["logits"].sel(step=step, layer=1, head=1).values)
    assert figure._suptitle.get_text() == "trunk/iga | layer 1 | head 1 | logits (pre-softmax) | every step"


def test_encoder_decoder_flow_like_seed_001(example):
    tree = attnformat.open(example("encoder-decoder"))
    figure = attention_flow(tree, layer=1, head=0)
    assert len(figure.axes) == 3 + 1  # three maps on one shared colour scale, one colorbar
    maps = figure.axes[:3]
    assert [ax.get_title().split(" | ")[0] for ax in maps] == ["encoder/self", "decoder/self", "decoder/cross"]
    for ax, site in zip(maps, ("encoder/self", "decoder/self", "decoder/cross")):
        np.testing.assert_array_equal(drawn(ax), tree[site]["weights"].sel(layer=1, head=0).values)
    assert drawn(maps[2]).shape == (5, 7)
    assert [t.get_text() for t in maps[2].get_xticklabels()][3] == "robot0_eef_pos:3"
    with pytest.raises(SelectionError, match="no cross-attention site"):
        attention_flow(example("dense"))


def test_modality_map_sums_key_groups(example):
    tree = attnformat.open(example("encoder-decoder"))
    ax = group_map(tree, site="encoder/self", layer=0, head=1)
    weights = tree["encoder/self"]["weights"].sel(layer=0, head=1).values
    groups = tree["encoder/self"]["query_group"].values
    order = ["text", "robot0_eef_pos", "agentview_image"]  # order of first appearance
    expected = [[weights[np.ix_(groups == q, groups == k)].sum(axis=1).mean() for k in order] for q in order]
    np.testing.assert_allclose(drawn(ax), expected, rtol=1e-6)
    assert [t.get_text() for t in ax.get_yticklabels()] == order
    np.testing.assert_allclose(drawn(ax).sum(axis=1), 1.0, rtol=1e-5)


def test_group_bars_heights_and_sink_scores_like_seed_004(example):
    tree = attnformat.open(example("frames"))
    figure = group_bars(tree, variable="logits")
    logits = tree["blocks"]["logits"].sel(layer=3).values
    groups = tree["blocks"]["query_group"].values
    assert len(figure.axes) == 4
    for head, ax in enumerate(figure.axes):
        block = logits[head][groups == 4].mean(axis=0)  # the last frame's queries
        per_frame = np.array([block[groups == frame].mean() for frame in range(5)])
        np.testing.assert_allclose([bar.get_height() for bar in ax.patches], per_frame, rtol=1e-5)
        expected = per_frame[0] - per_frame[1:-1].mean()
        assert ax.get_title() == f"H{head} (sink={expected:.2f})"
        assert ax.patches[0].get_facecolor()[:3] == pytest.approx((0x01 / 255, 0x73 / 255, 0xB2 / 255))
    assert figure._suptitle.get_text().splitlines()[-1] == "Query: frames [4]"
    assert sink_score([7.0, 1.0, 2.0, 3.0, 9.0]) == 5.0


def test_group_bars_for_named_queries_over_key_tokens(example):
    tree = attnformat.open(example("frames"))
    figure = group_bars(tree, variable="logits", queries=["f4t0", 13], by_group=False)
    logits = tree["blocks"]["logits"].sel(layer=3, head=2).values
    np.testing.assert_allclose([bar.get_height() for bar in figure.axes[2].patches], logits[[12, 13]].mean(axis=0), rtol=1e-6)
    with pytest.raises(SelectionError, match="query groups: 0, 1, 2, 3, 4"):
        group_bars(tree, query_groups=[9])
