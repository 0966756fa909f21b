"""Top-k sites in the viewer: the drawn sparse map and row profiles hold exactly the kept weights.

Ground truth: the dense softmax the top-k rows were taken from, reduced with numpy here (a stable
argsort per row, densified by hand), never the viewer's own densifying.
"""

from __future__ import annotations

import matplotlib.colors as mcolors
import numpy as np
import pytest
from topk_trees import dense_weights, top_k_rows, topk_tree

import attnformat
from attnformat.testing.figures import colorbars, drawn_values, overlapping_labels, overlapping_texts
from attnformat.viewer import heatmap, row_profile, select, topk_heatmap, topk_map
from attnformat.viewer.colors import MISSING_COLOR
from attnformat.viewer.topk import NOT_KEPT_ALTERNATIVE, NOT_KEPT_COLOR, PARTIAL_COLOR

K = 4


def kept_by_hand(weights: np.ndarray, k: int) -> np.ndarray:
    """Dense (..., query, key) with the k largest weights of each causal row in place, NaN elsewhere."""
    dense = np.full(weights.shape, np.nan)
    for position in np.ndindex(*weights.shape[:-1]):
        row = weights[position][: position[-1] + 1]
        for key in np.argsort(-row, kind="stable")[:k]:
            dense[position + (key,)] = weights[position + (key,)]
    return dense


@pytest.fixture
def weights():
    return dense_weights(layers=2, heads=3, tokens=10, seed=3)


def test_the_map_shows_exactly_the_kept_weights_and_not_kept_pairs_are_not_zero(weights):
    tree = topk_tree(weights, K)
    ax = topk_heatmap(tree, layer=1, head=2)
    drawn = drawn_values(ax.images[0])
    expected = kept_by_hand(weights, K)[1, 2]
    np.testing.assert_allclose(drawn, expected, rtol=1e-6, equal_nan=True)
    not_kept = np.isnan(expected)
    assert not_kept.sum() == 10 * 10 - sum(min(K, q + 1) for q in range(10))
    # Not kept cells are masked (drawn in the "not kept" colour), never drawn as 0.
    assert np.ma.getmaskarray(ax.images[0].get_array())[not_kept].all()
    cmap = ax.images[0].get_cmap()
    assert mcolors.to_hex(cmap.get_bad()) == NOT_KEPT_COLOR
    assert mcolors.to_hex(cmap(ax.images[0].norm(0.0))) != NOT_KEPT_COLOR
    assert NOT_KEPT_COLOR not in (mcolors.to_hex(MISSING_COLOR), mcolors.to_hex(PARTIAL_COLOR))
    # The colorbar spans the kept weights drawn and says what they are.
    bar = colorbars(ax.figure)[0]
    assert (bar.norm.vmin, bar.norm.vmax) == pytest.approx((np.nanmin(expected), np.nanmax(expected)), rel=1e-6)
    assert bar.ax.get_ylabel() == "kept weights (softmax)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["<s>", "the", "cat", "sat", "on", "the", "warm", "mat", "and",
                                                            "purred"]
    assert overlapping_labels(ax.figure) == [] and overlapping_texts(ax.figure) == []


def test_the_legend_names_k_and_the_omitted_mass_from_the_file(weights):
    tree = topk_tree(weights, K, uncaptured_rows=(6,))
    ax = topk_heatmap(tree, layer=0, head=1)
    omitted = 1.0 - np.nansum(kept_by_hand(weights, K)[0, 1], axis=-1)
    omitted[6] = np.nan
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts[0] == (f"not kept (top {K} of 10 keys per row); omitted mass per row: mean {np.nanmean(omitted):.3g}, "
                        f"max {np.nanmax(omitted):.3g}")
    assert texts[1] == "row not captured"
    # The uncaptured row is covered by a band in the missing colour, the others are not.
    bands = [p for p in ax.patches if mcolors.to_hex(p.get_facecolor()) == mcolors.to_hex(MISSING_COLOR)]
    assert len(bands) == 1
    extent = bands[0].get_extents().transformed(ax.transData.inverted())
    assert sorted((extent.y0, extent.y1)) == pytest.approx([5.5, 6.5])
    assert np.isnan(drawn_values(ax.images[0])[6]).all()


def test_the_head_mean_is_exact_where_every_head_kept_the_pair(weights):
    tree = topk_tree(weights, K)
    kept = kept_by_hand(weights, K)[0]  # (head, query, key)
    every = ~np.isnan(kept).any(axis=0)
    some = ~np.isnan(kept).all(axis=0) & ~every
    ax = topk_heatmap(tree, layer=0)
    drawn = drawn_values(ax.images[0])
    np.testing.assert_allclose(drawn[every], weights[0].mean(axis=0)[every], rtol=1e-6)
    assert np.isnan(drawn[~every]).all()
    assert some.any()
    overlay = ax.images[1].get_array()  # pairs kept by some heads only, in their own colour
    np.testing.assert_array_equal(overlay[..., 3] > 0, some)
    assert mcolors.to_hex(overlay[some][0]) == PARTIAL_COLOR
    assert "kept by some of the 3 heads only (mean unknown)" in [t.get_text() for t in ax.get_legend().get_texts()]
    # The preparer's lower bound counts heads that did not keep a pair as 0.
    detail = topk_map(tree, layer=0).topk
    np.testing.assert_allclose(detail.lower[some], np.nansum(kept, axis=0)[some] / 3, rtol=1e-6)
    assert ax.get_title() == f"decoder/self_topk | layer 0 | head mean of 3 | weights (softmax) | top {K} of 10 keys per row"


def test_user_options_win(weights):
    tree = topk_tree(weights, K)
    ax = topk_heatmap(tree, layer=1, head=0, vmin=0.2, vmax=0.6, cmap="magma", title="mine", figsize=(5, 4))
    bar = colorbars(ax.figure)[0]
    assert (bar.norm.vmin, bar.norm.vmax) == (0.2, 0.6)
    assert ax.images[0].get_cmap().name.startswith("magma")
    assert ax.get_title() == "mine"
    assert ax.figure.get_size_inches().tolist() == [5.0, 4.0]
    assert bar.extend == "both"  # kept weights lie on both sides of the given limits
    # A colormap that reaches white keeps not-kept pairs apart in another colour, named in the legend.
    ax = topk_heatmap(tree, layer=1, head=0, cmap="Greys")
    assert mcolors.to_hex(ax.images[0].get_cmap().get_bad()) == NOT_KEPT_ALTERNATIVE
    assert mcolors.to_hex(ax.get_legend().legend_handles[0].get_facecolor()) == NOT_KEPT_ALTERNATIVE


def test_long_maps_thin_their_labels_and_pool_kept_weights_only():
    weights = dense_weights(layers=1, heads=2, tokens=40, seed=5)
    labels = [f"token_{i}" for i in range(40)]
    tree = topk_tree(weights, 6, labels=labels)
    ax = topk_heatmap(tree, layer=0, head=1)
    assert overlapping_labels(ax.figure) == []
    pooled = topk_heatmap(tree, layer=0, head=1, max_size=16)
    kept = kept_by_hand(weights, 6)[0, 1]
    blocks = np.full((14, 14), np.nan)
    for row in range(14):
        for col in range(14):
            block = kept[row * 3:(row + 1) * 3, col * 3:(col + 1) * 3]
            if np.isfinite(block).any():
                blocks[row, col] = np.nanmax(block)
    np.testing.assert_allclose(drawn_values(pooled.images[0]), blocks, rtol=1e-6, equal_nan=True)
    assert "shown as 3x3 block max of kept weights" in pooled.get_title()
    assert overlapping_labels(pooled.figure) == []


def test_row_profile_draws_kept_weights_by_key_and_the_omitted_mass(weights):
    tree = topk_tree(weights, K)
    ax = row_profile(tree, ["on", 9], layer=1, head=2)
    lines = {line.get_gid(): line for line in ax.get_lines() if line.get_gid()}
    bars = {patch.get_gid(): patch for patch in ax.patches if patch.get_gid()}
    for row in (4, 9):
        row_weights = weights[1, 2, row, : row + 1]
        keys = np.argsort(-row_weights, kind="stable")[:K]
        x, y = lines[f"kept:{row}"].get_data()
        np.testing.assert_array_equal(np.round(x).astype(int), keys)
        np.testing.assert_allclose(y, row_weights[keys], rtol=1e-6)
        assert bars[f"omitted:{row}"].get_height() == pytest.approx(1.0 - row_weights[keys].sum(), abs=1e-6)
        assert y.sum() + bars[f"omitted:{row}"].get_height() == pytest.approx(1.0, abs=1e-6)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[-1] == "omitted mass"
    assert overlapping_labels(ax.figure) == [] and overlapping_texts(ax.figure) == []
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts[0].startswith("query 'on' (row 4): 4 kept, omitted ")


def test_row_profile_of_a_head_mean_shows_partial_pairs_at_their_lower_bound(weights):
    tree = topk_tree(weights, K)
    ax = row_profile(tree, 9, layer=0)
    kept = kept_by_hand(weights, K)[0, :, 9]  # (head, key)
    every = ~np.isnan(kept).any(axis=0)
    some = ~np.isnan(kept).all(axis=0) & ~every
    lines = {line.get_gid(): line for line in ax.get_lines() if line.get_gid()}
    x, y = lines["kept:9"].get_data()
    np.testing.assert_array_equal(np.sort(np.round(x).astype(int)), np.flatnonzero(every))
    x, y = lines["partial:9"].get_data()
    np.testing.assert_array_equal(np.round(x).astype(int), np.flatnonzero(some))
    np.testing.assert_allclose(y, np.nansum(kept, axis=0)[some] / 3, rtol=1e-6)
    omitted = np.mean(1.0 - np.nansum(kept, axis=-1))
    assert [p for p in ax.patches if p.get_gid() == "omitted:9"][0].get_height() == pytest.approx(omitted, abs=1e-6)
    # Exact, partial (lower bound) and omitted parts add up to the row's whole attention.
    assert lines["kept:9"].get_data()[1].sum() + y.sum() + omitted == pytest.approx(1.0, abs=1e-5)


def test_row_profile_user_options_win(weights):
    ax = row_profile(topk_tree(weights, K), layer=0, head=0, title="profile", figsize=(7, 3))
    assert ax.get_title() == "profile" and ax.figure.get_size_inches().tolist() == [7.0, 3.0]
    # The default row is the last captured one.
    assert [line.get_gid() for line in ax.get_lines() if line.get_gid()] == ["kept:9"]


def test_select_densifies_top_k_sites_for_every_map_plot(weights):
    tree = topk_tree(weights, K)
    chosen = select(tree, layer=1, head=0)
    np.testing.assert_allclose(chosen.values, kept_by_hand(weights, K)[1, 0], rtol=1e-6, equal_nan=True)
    assert chosen.dims == ("query", "key") and chosen.missing_note == f"not kept (top {K} of 10 keys per row)"
    kept, _, omitted = top_k_rows(weights, K)
    np.testing.assert_allclose(chosen.topk.omitted, omitted[1, 0], atol=1e-6)
    # The general heatmap draws the same values, not-kept pairs named in its legend.
    ax = heatmap(tree, layer=1, head=0)
    np.testing.assert_allclose(drawn_values(ax.images[0]), chosen.values, equal_nan=True)
    assert ax.get_legend().get_texts()[0].get_text() == f"not kept (top {K} of 10 keys per row)"


def test_padding_keys_are_left_out_of_the_map(weights):
    mask = np.ones(10, bool)
    mask[8:] = False
    tree = topk_tree(weights, K, key_mask=mask)
    chosen = topk_map(tree, layer=0, head=0)
    assert chosen.values.shape == (10, 8) and chosen.key_labels[-1] == "mat"


def test_a_dense_site_is_not_a_top_k_site(example):
    with pytest.raises(attnformat.SelectionError, match="not a top-k site"):
        topk_heatmap(example("dense"))


def _recorded(tmp_path, weights, k):
    """A file written by the format's Recorder: the top-k rows of ``weights`` (numpy reference reduction)."""
    from attnformat import reductions
    from attnformat.adapters import Recorder

    path = tmp_path / "topk.attn.zarr"
    causal = np.tril(np.ones(weights.shape[-2:], bool))
    with Recorder(path, model_name="test", model_framework="numpy") as recorder:
        recorder.describe("decoder/self_topk", layout="topk", attrs={"key_count": weights.shape[-1], "causal": 1,
                                                                      "describes": "decoder/self"},
                          query_labels=[f"t{i}" for i in range(weights.shape[-2])],
                          key_labels=[f"t{i}" for i in range(weights.shape[-1])])
        for layer in range(weights.shape[0]):
            kept, index, omitted = reductions.top_k(weights[layer].astype(np.float32), k, key_mask=causal)
            recorder.log("decoder/self_topk", layer=layer, weights=kept, key_index=index, omitted_weight=omitted)
    return path


def test_command_line_plots_a_recorded_top_k_file(tmp_path, weights):
    from PIL import Image

    from attnformat.cli import main

    path = _recorded(tmp_path, weights, K)
    assert attnformat.validate(path).ok
    for kind, extra in (("topk-heatmap", ["--layer", "1", "--head", "2"]), ("row-profile", ["--query", "t4", "--query", "9"]),
                        ("heatmap", ["--layer", "0"])):
        out = tmp_path / f"{kind}.png"
        assert main(["plot", str(path), kind, *extra, "-o", str(out)]) == 0
        with Image.open(out) as image:
            assert image.size[0] > 200
    # What the file holds, drawn from the path: the kept weights of the dense softmax, by hand.
    ax = topk_heatmap(path, layer=1, head=2)
    np.testing.assert_allclose(drawn_values(ax.images[0]), kept_by_hand(weights, K)[1, 2], rtol=1e-6, equal_nan=True)
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"t{i}" for i in range(10)]


@pytest.mark.parametrize("name", ["topk", "statistics"])
def test_every_report_item_of_the_new_kinds_draws(example, name):
    """The plots a report lists for top-k and statistics sites (PlotKind.report) all draw, titled."""
    from attnformat.viewer import PLOT_KINDS, plot, sites_of

    tree = attnformat.open(example(name))
    drawn = 0
    for site in sites_of(tree):
        for kind, entry in PLOT_KINDS.items():
            if entry.report is None or not entry.applies(site):
                continue
            for caption, parts, options in entry.report(site):
                assert caption and all(isinstance(part, str) for part in parts)
                result = plot(tree, kind, site=site.path.strip("/"), **options)
                ax = result if hasattr(result, "get_title") else result.axes[0]
                assert ax.get_title().startswith(site.path.strip("/"))
                assert overlapping_labels(ax.figure) == []
                drawn += 1
    assert drawn >= (2 if name == "topk" else 5)


def test_the_direct_road_densifies_like_the_tree(example):
    """A sealed file read without a tree (attnformat.viewer.selection's direct road) gives the same top-k map."""
    from attnformat.viewer.selection import _direct_site, _select, _TreeSite

    path = example("topk")
    select(path, site="decoder/self_topk", layer=0)  # validates once (and remembers), as a first plot does
    direct = _direct_site(path, "decoder/self_topk")
    assert direct is not None
    options = dict(variable="weights", keep=(), drop_padding=True, densify=True, selectors={"layer": 1})
    by_tree = _select(_TreeSite(attnformat.open(path)["decoder/self_topk"]), **options)
    by_direct = _select(direct, **options)
    np.testing.assert_array_equal(by_direct.values, by_tree.values)
    np.testing.assert_array_equal(by_direct.topk.partial, by_tree.topk.partial)
    np.testing.assert_array_equal(by_direct.topk.omitted, by_tree.topk.omitted)
    assert by_direct.key_labels == by_tree.key_labels and by_direct.missing_note == by_tree.missing_note
    tree = attnformat.open(path)["decoder/self_topk"]
    weights, index = tree["weights"].values[1], tree["key_index"].values[1]  # (head, query, rank)
    dense = np.full(weights.shape[:-1] + (8,), np.nan)
    for head, query, rank in np.ndindex(*weights.shape):
        if index[head, query, rank] >= 0:
            dense[head, query, index[head, query, rank]] = weights[head, query, rank]
    every = ~np.isnan(dense).any(axis=0)
    np.testing.assert_allclose(by_direct.values[every], dense.mean(axis=0)[every], rtol=1e-6)
    assert np.isnan(by_direct.values[~every]).all()
