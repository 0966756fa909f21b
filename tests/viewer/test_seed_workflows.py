"""The five seed tools' figures and numbers, replayed from files shaped like what they extract.

Every check compares what the viewer drew (the arrays in the images, the colorbar's limits, the tick
labels, the titles) or computed with the seed's own formula applied with numpy to the arrays that
went into the file, and every figure is checked for overlapping labels at its default size.
"""

from __future__ import annotations

import numpy as np
import pytest

import seed_files
from attnformat.testing.figures import colorbars, drawn_values, mappables, overlapping_labels
from attnformat import viewer


def _image_axes(figure):
    return [ax for ax in figure.axes if ax.images and getattr(ax, "_colorbar", None) is None]


def _assert_readable(figure):
    assert overlapping_labels(figure) == []
    assert colorbars(figure), "a colour scale is drawn without a colorbar"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    return {
        "graph": seed_files.graph_model(root / "graph.zarr"),
        "seq2seq": seed_files.encoder_decoder(root / "seq2seq.zarr"),
        "protein": seed_files.protein_model(root / "protein.zarr"),
        "vit": seed_files.vit_digits(root / "vit.zarr"),
        "video": seed_files.video_frames(root / "video.zarr"),
    }


# --- seed 001: encoder-decoder over 29 multimodal tokens ---------------------------------------------

def test_seed001_heatmap_values_labels_and_scale(files):
    path, truth = files["seq2seq"]
    ax = viewer.heatmap(path, site="encoder/self", layer=0, head=3)
    np.testing.assert_array_equal(drawn_values(ax.images[0]), truth["encoder"][0, 3])
    shown = {int(round(t)): label.get_text() for t, label in zip(ax.get_xticks(), ax.get_xticklabels())}
    assert shown and all(truth["enc_labels"][i] == text for i, text in shown.items())
    _assert_readable(ax.figure)
    ax = viewer.heatmap(path, site="decoder/cross", layer=2, head="mean", vmin=0.0, vmax=0.1, cmap="hot")
    np.testing.assert_allclose(drawn_values(ax.images[0]), truth["cross"][2].mean(axis=0), rtol=1e-6)
    assert (ax.images[0].norm.vmin, ax.images[0].norm.vmax) == (0.0, 0.1)
    assert ax.images[0].get_cmap().name.startswith("hot")


@pytest.mark.parametrize("site, key", [("encoder/self", "encoder"), ("decoder/cross", "cross")])
def test_seed001_layer_comparison_is_readable_and_exact(files, site, key):
    path, truth = files["seq2seq"]
    figure = viewer.layer_comparison(path, site=site, head="mean")
    panels = _image_axes(figure)
    assert len(panels) == 3
    for layer, ax in enumerate(panels):
        np.testing.assert_allclose(drawn_values(ax.images[0]), truth[key][layer].mean(axis=0), rtol=1e-6)
    norms = {(m.norm.vmin, m.norm.vmax) for m in mappables(figure)}
    assert len(norms) == 1, "panels of one figure share one colour scale"
    _assert_readable(figure)


def test_seed001_multi_head_and_flow_are_readable(files):
    path, truth = files["seq2seq"]
    figure = viewer.head_grid(path, site="decoder/self", layer=1)
    for head, ax in enumerate(_image_axes(figure)):
        np.testing.assert_array_equal(drawn_values(ax.images[0]), truth["decoder"][1, head])
    _assert_readable(figure)
    figure = viewer.attention_flow(path, layer=0)
    panels = _image_axes(figure)
    assert len(panels) == 3
    np.testing.assert_allclose(drawn_values(panels[2].images[0]), truth["cross"][0].mean(axis=0), rtol=1e-6)
    _assert_readable(figure)


def test_seed001_user_figsize_and_title_win(files):
    path, _ = files["seq2seq"]
    for function in (viewer.layer_comparison, viewer.head_grid):
        selectors = {"layer": 0} if function is viewer.head_grid else {}
        figure = function(path, site="encoder/self", figsize=(20, 12), title="Encoder Layer 0 - All Heads", **selectors)
        assert tuple(figure.get_size_inches()) == (20, 12)
        assert figure._suptitle.get_text() == "Encoder Layer 0 - All Heads"
    figure = viewer.attention_flow(path, layer=0, figsize=(18, 6), title="flow")
    assert tuple(figure.get_size_inches()) == (18, 6) and figure._suptitle.get_text() == "flow"


# --- seed 002: protein model, logits/bias/distance, snapshots -----------------------------------------

def test_seed002_user_limits_win_on_signed_data(files):
    path, truth = files["protein"]
    ax = viewer.heatmap(path, variable="logits", step=100, sample=0, layer=0, head=0, vmin=-6, vmax=-1)
    assert (ax.images[0].norm.vmin, ax.images[0].norm.vmax) == (-6, -1)
    assert (colorbars(ax.figure)[0].norm.vmin, colorbars(ax.figure)[0].norm.vmax) == (-6, -1)
    np.testing.assert_array_equal(drawn_values(ax.images[0]), truth["logits"][0, 0, 0, 0])


def test_seed002_all_negative_bias_gets_a_one_sided_scale(files):
    path, truth = files["protein"]
    bias = truth["bias"][0, 0, 0, 0]
    assert bias.max() < 0
    ax = viewer.heatmap(path, variable="bias", step=100, sample=0, layer=0, head=0, cmap="Blues_r")
    norm = ax.images[0].norm
    assert norm.vmin == pytest.approx(float(bias.min())) and norm.vmax <= 0.0
    assert ax.images[0].get_cmap().name.startswith("Blues_r")
    ax = viewer.heatmap(path, variable="bias", step=100, sample=0, layer=0, head=0)
    assert ax.images[0].norm.vmax <= 0.0, "all-negative data is not stretched to a symmetric scale by default"


# --- seed 003: ViT on digits --------------------------------------------------------------------------

def test_seed003_image_grid_shares_one_visible_scale(files):
    path, truth = files["vit"]
    figure = viewer.image_attention_grid(path, over="layer", sample=0, head=0)
    grid, patch = truth["grid"], truth["patch"]
    norms = {(m.norm.vmin, m.norm.vmax) for m in mappables(figure) if m.get_array().ndim == 2 and m.get_array().shape == (grid, grid)}
    attention_panels = [m for m in mappables(figure) if np.shape(m.get_array())[:2] in ((grid, grid), (grid * patch, grid * patch))
                        and m.get_cmap().name != "gray"]
    assert attention_panels
    limits = {(round(m.norm.vmin, 9), round(m.norm.vmax, 9)) for m in attention_panels}
    assert len(limits) == 1, f"one scale per figure, got {limits}"
    assert colorbars(figure)
    cls_rows = truth["weights"][0, :, 0, 0, 1:].reshape(-1, grid, grid)
    first = drawn_values(attention_panels[0])
    expected = cls_rows[0] if first.shape == (grid, grid) else np.kron(cls_rows[0], np.ones((patch, patch)))
    np.testing.assert_allclose(first, expected, rtol=1e-6)
    del norms


# --- seed 004: frame x frame logits, per-head bars ----------------------------------------------------

def test_seed004_head_grid_symmetric_scale_and_values(files):
    path, truth = files["video"]
    logits = truth["logits"][0]
    figure = viewer.head_grid(path, variable="logits", layer=3, origin="lower", cmap="RdBu_r")
    panels = _image_axes(figure)
    assert len(panels) == truth["heads"]
    vmax = float(np.nanmax(np.abs(logits)))
    for head, ax in enumerate(panels):
        np.testing.assert_array_equal(drawn_values(ax.images[0]), logits[head])
        assert (ax.images[0].norm.vmin, ax.images[0].norm.vmax) == pytest.approx((-vmax, vmax))
        assert ax.images[0].origin == "lower"
    _assert_readable(figure)


def test_seed004_bars_of_the_last_three_frames(files):
    path, truth = files["video"]
    logits = truth["logits"][0]
    # The default block is the last block the block-causal mask shows: frames 16, 17 and 18.
    figure = viewer.group_bars(path, variable="logits", layer=3)
    assert figure._suptitle.get_text().splitlines()[-1] == "Query: frames [16, 17, 18]"
    for head, ax in enumerate(figure.axes[: truth["heads"]]):
        expected = logits[head, 16:19].mean(axis=0)  # the last block sees every frame
        heights = np.array([p.get_height() for p in ax.patches])
        np.testing.assert_allclose(heights, expected, rtol=1e-5)
        sink = expected[0] - expected[1:-1].mean()
        assert ax.get_title() == f"H{head} (sink={sink:.2f})"
    assert overlapping_labels(figure) == []


def test_seed004_savefig_dpi_of_the_user_wins(files, tmp_path):
    import matplotlib
    from PIL import Image

    path, _ = files["video"]
    with matplotlib.rc_context({"savefig.dpi": 300, "savefig.bbox": "standard"}):
        ax = viewer.heatmap(path, variable="logits", layer=3, head=0)
        size = ax.figure.get_size_inches()
        out = viewer.save_figure(ax, tmp_path / "map.png")
    width, height = Image.open(out).size
    assert (width, height) == (round(size[0] * 300), round(size[1] * 300))


# --- seed 000: graph model ----------------------------------------------------------------------------

def test_seed000_temporal_window_pairs_are_absent_not_zero(files):
    path, truth = files["graph"]
    ax = viewer.temporal_matrix(path, node=0, layer=0, sample=0)
    shown = drawn_values(ax.images[0])
    steps, window = truth["steps"], truth["max_distance"]
    expected = np.full((steps, steps), np.nan)
    expected[truth["t_target"], truth["t_source"]] = truth["temporal"][0, 0, 0]
    np.testing.assert_allclose(shown, expected, rtol=1e-6)
    far = np.abs(np.subtract.outer(np.arange(steps), np.arange(steps))) > window
    assert np.isnan(shown[far]).all()
    legend = ax.get_legend()
    assert legend is not None and any("absent" in t.get_text() for t in legend.get_texts())


def test_seed000_top_edges_are_the_largest(files):
    path, truth = files["graph"]
    ax = viewer.top_edges(path, site="spatial", k=20, layer=0, sample=0, time=0)
    values = truth["spatial"][0, 0, 0]
    heights = np.array([p.get_height() for p in ax.patches])
    np.testing.assert_allclose(heights, np.sort(values)[::-1][:20], rtol=1e-6)
    assert overlapping_labels(ax.figure) == []


def test_seed004_diagonal_first_column_and_per_head_numbers_in_one_call(files):
    path, truth = files["video"]
    logits = truth["logits"][0]
    stats = viewer.frame_statistics(path, variable="logits", layer=3)
    assert float(stats["diagonal_mean"]) == pytest.approx(float(np.diagonal(logits, axis1=1, axis2=2).mean()), rel=1e-6)
    assert float(stats["first_column_mean"]) == pytest.approx(float(logits[:, :, 0].mean()), rel=1e-6)
    block = logits[:, 16:19].mean(axis=1)
    np.testing.assert_allclose(stats["sink"].values, block[:, 0] - block[:, 1:-1].mean(axis=1), rtol=1e-5)
    text = viewer.format_frame_statistics(stats)
    first, middle, last = block[0, 0], block[0, 1:-1].mean(), block[0, -1]
    assert f"H 0: first={first:.3f}, mid={middle:.3f}, last={last:.3f}, sink={first - middle:+.3f}" in text


def test_seed002_local_global_ratio_uses_the_8_angstrom_neighbourhood(files):
    path, truth = files["protein"]
    summary = viewer.statistics_summary(path)
    (site,) = summary["sites"]
    weights, distance = truth["weights"], truth["distance"]  # (step, sample, layer, head, q, k), (sample, q, k)
    local = np.broadcast_to((distance < 8.0)[None, :, None, None], weights.shape)
    for layer, entry in enumerate(summary["sites"][site]):
        chosen, near = weights[:, :, layer], local[:, :, layer]
        expected = chosen[near].mean() / chosen[~near].mean()
        assert entry["local_global_ratio"] == pytest.approx(float(expected), rel=1e-5)
    description = summary["locality"][site]["description"]
    assert summary["locality"][site]["kind"] == "distance" and "8" in description
    assert "8" in viewer.format_summary(summary).split("loc/glob of")[1]
