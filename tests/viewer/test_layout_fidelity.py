"""Figures that are exact and readable: grids sized to their labels, user options used as given,
missing cells never drawn like zeros, steps never captured said so, saved files at the user's dpi.

Files are written with :class:`attnformat.Writer`; every expectation is computed here with numpy
from the arrays that went into the file, and checked against what the figure draws.
"""

from __future__ import annotations

import itertools
import math

import matplotlib
import numpy as np
import pytest
from matplotlib.colors import to_rgba
from matplotlib.text import Text

import attnformat
from attnformat.examples import softmax
from attnformat.testing.figures import colorbars, drawn_values, overlapping_labels
from attnformat.viewer import attention_flow, head_grid, heatmap, layer_comparison, save_figure, step_comparison
from attnformat.viewer.colors import MISSING_COLOR
from attnformat.viewer.output import MAX_FIGSIZE, MAX_PANEL, MapPanel, label_pitch, layout_maps, ordinal, save_options

ENCODER = "agentview_image"
DECODER = "robot0_eef_pos_past_traj"
LAYERS, HEADS = 3, 2


def overlapping_texts(figure, tolerance=0.5):
    """Pairs of overlapping Text artists (titles, axis labels, tick labels, legend and colorbar texts)
    of a figure drawn just before.

    Like :func:`attnformat.testing.figures.overlapping_texts`, but counting each legend entry once
    (a legend's ``TextArea`` wraps its ``Text`` and would otherwise overlap it), and without drawing
    the figure again (large grids take seconds to draw).
    """
    renderer = figure.canvas.get_renderer()
    texts = [t for t in figure.findobj(Text) if t.get_visible() and str(t.get_text()).strip()
             and (t.axes is None or t.axes.get_visible())]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    pairs = []
    for (text_a, a), (text_b, b) in itertools.combinations(boxes, 2):
        if min(a.x1, b.x1) - max(a.x0, b.x0) > tolerance and min(a.y1, b.y1) - max(a.y0, b.y0) > tolerance:
            pairs.append((text_a, text_b))
    return pairs


def assert_readable(figure):
    assert overlapping_labels(figure) == []  # draws the figure once
    assert overlapping_texts(figure) == []


def map_axes(figure):
    return [ax for ax in figure.axes if ax.images and getattr(ax, "_colorbar", None) is None]


def shown_ticks(ax, axis="x"):
    """``{position: text}`` of the tick labels an axis shows."""
    getter = ax.get_xticklabels if axis == "x" else ax.get_yticklabels
    ticks = ax.get_xticks() if axis == "x" else ax.get_yticks()
    return {int(round(t)): label.get_text() for t, label in zip(ticks, getter()) if label.get_text()}


def write_seq2seq(path, encoder_tokens, decoder_tokens, seed=0):
    """An encoder-decoder file (encoder self, decoder self, cross) and the arrays written into it."""
    rng = np.random.default_rng(seed)
    enc_labels = [f"{ENCODER}_{i}" for i in range(encoder_tokens)]
    dec_labels = [f"{DECODER}_{i}" for i in range(decoder_tokens)]
    shapes = {"encoder/self": (encoder_tokens, encoder_tokens, enc_labels, enc_labels, {"attention_type": "self"}),
              "decoder/self": (decoder_tokens, decoder_tokens, dec_labels, dec_labels, {"attention_type": "self"}),
              "decoder/cross": (decoder_tokens, encoder_tokens, dec_labels, enc_labels,
                                {"attention_type": "cross", "key_site": "encoder/self"})}
    truth = {"enc_labels": enc_labels, "dec_labels": dec_labels}
    with attnformat.Writer(path, model_name="seq2seq") as writer:
        for name, (queries, keys, q_labels, k_labels, attrs) in shapes.items():
            site = writer.create_site(name, sizes={"layer": LAYERS, "head": HEADS, "query": queries, "key": keys},
                                      coords={"query_label": ("query", q_labels), "key_label": ("key", k_labels)},
                                      attrs={"causal": 0, **attrs})
            weights = softmax(rng.normal(scale=2.0, size=(LAYERS, HEADS, queries, keys))).astype(np.float32)
            for layer in range(LAYERS):
                site.write("weights", weights[layer], layer=layer)
            truth[name] = weights
    return path, truth


@pytest.fixture(scope="module")
def seq2seq(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq2seq")
    cache = {}

    def build(decoder_tokens, encoder_tokens=None):
        encoder_tokens = encoder_tokens or decoder_tokens
        key = (encoder_tokens, decoder_tokens)
        if key not in cache:
            cache[key] = write_seq2seq(root / f"s{encoder_tokens}x{decoder_tokens}.zarr", encoder_tokens, decoder_tokens)
        return cache[key]

    return build


def check_ticks(ax, labels, axis="x"):
    """The axis shows ``labels[::k]`` at positions ``0, k, 2k...``; returns k."""
    shown = shown_ticks(ax, axis)
    positions = sorted(shown)
    step = positions[1] - positions[0] if len(positions) > 1 else 1
    assert positions == list(range(0, len(labels), step))
    assert [shown[p] for p in positions] == [labels[p] for p in positions]
    axis_label = ax.get_xlabel() if axis == "x" else ax.get_ylabel()
    assert (f"(every {ordinal(step)} label)" in axis_label) == (step > 1)
    return step


# --- cramped grids: sized to their labels at default size ----------------------------------------------

@pytest.mark.parametrize("tokens", [8, 29, 64, 100])
def test_layer_comparison_sized_to_its_labels(seq2seq, tokens):
    encoder_tokens = max(2, round(tokens * 20 / 29))  # cross-attention of different lengths (29 x 20)
    path, truth = seq2seq(tokens, encoder_tokens)
    figure = layer_comparison(path, site="decoder/cross")
    panels = map_axes(figure)
    assert [ax.get_title() for ax in panels] == [f"layer {i}" for i in range(LAYERS)]
    for layer, ax in enumerate(panels):
        np.testing.assert_allclose(drawn_values(ax.images[0]), truth["decoder/cross"][layer].mean(axis=0), rtol=1e-6)
    width, height = figure.get_size_inches()
    assert width <= MAX_FIGSIZE[0] and height <= MAX_FIGSIZE[1]
    key_step = check_ticks(panels[0], truth["enc_labels"], "x")
    query_step = check_ticks(panels[0], truth["dec_labels"], "y")
    if tokens <= 29:
        assert (key_step, query_step) == (1, 1), "29 labels fit a default-size figure whole"
    [colorbar] = colorbars(figure)
    every = np.stack([truth["decoder/cross"][layer].mean(axis=0) for layer in range(LAYERS)])
    assert colorbar.ax.get_ylabel() == "weights (softmax)"
    assert (colorbar.norm.vmin, colorbar.norm.vmax) == pytest.approx((every.min(), every.max()), rel=1e-6)
    assert {(ax.images[0].norm.vmin, ax.images[0].norm.vmax) for ax in panels} == {(colorbar.norm.vmin, colorbar.norm.vmax)}
    assert figure._suptitle.get_text() == "decoder/cross | head mean of 2 | weights (softmax) | every layer"
    assert_readable(figure)


@pytest.mark.parametrize("tokens", [8, 29, 64, 100])
def test_attention_flow_sized_to_its_labels(seq2seq, tokens):
    encoder_tokens = max(2, round(tokens * 20 / 29))
    path, truth = seq2seq(tokens, encoder_tokens)
    figure = attention_flow(path, layer=1)
    panels = map_axes(figure)
    names = ["encoder/self", "decoder/self", "decoder/cross"]
    assert [ax.get_title() for ax in panels] == names
    for ax, name in zip(panels, names):
        np.testing.assert_allclose(drawn_values(ax.images[0]), truth[name][1].mean(axis=0), rtol=1e-6)
    encoder, decoder, cross = panels
    assert (cross.get_xlabel().split(" (")[0], encoder.get_ylabel().split(" (")[0]) == ("encoder key", "encoder query")
    steps = [check_ticks(encoder, truth["enc_labels"], "x"), check_ticks(decoder, truth["dec_labels"], "y"),
             check_ticks(cross, truth["enc_labels"], "x")]
    assert shown_ticks(cross, "y") == {}, "the cross panel shares the decoder panel's rows and their labels"
    if tokens <= 29:
        assert steps == [1, 1, 1]
    [colorbar] = colorbars(figure)  # one scale for the three maps
    every = np.concatenate([truth[name][1].mean(axis=0).ravel() for name in names])
    assert (colorbar.norm.vmin, colorbar.norm.vmax) == pytest.approx((every.min(), every.max()), rel=1e-6)
    assert colorbar.ax.get_ylabel() == "weights (softmax)"
    assert figure._suptitle.get_text() == ("attention flow: encoder/self -> decoder/self -> decoder/cross | layer 1 | "
                                           "head mean of 2 | weights (softmax)")
    width, height = figure.get_size_inches()
    assert width <= MAX_FIGSIZE[0] and height <= MAX_FIGSIZE[1]
    assert_readable(figure)


@pytest.mark.parametrize("tokens", [29, 100])
def test_head_grid_and_heatmap_sized_to_their_labels(seq2seq, tokens):
    path, truth = seq2seq(tokens)
    figure = head_grid(path, site="decoder/self", layer=2)
    for head, ax in enumerate(map_axes(figure)):
        np.testing.assert_array_equal(drawn_values(ax.images[0]), truth["decoder/self"][2, head])
    assert len(colorbars(figure)) == 1
    assert_readable(figure)
    ax = heatmap(path, site="decoder/cross", layer=0, head=1)
    np.testing.assert_array_equal(drawn_values(ax.images[0]), truth["decoder/cross"][0, 1])
    assert ax.get_title() == "decoder/cross | layer 0 | head 1 | weights (softmax)"
    assert colorbars(ax.figure)[0].ax.get_ylabel() == "weights (softmax)"
    step = check_ticks(ax, truth["dec_labels"], "y")
    assert (step == 1) == (tokens <= 29)
    assert_readable(ax.figure)


def test_panels_get_the_room_the_layout_computed(seq2seq):
    """The arithmetic is honest: after Matplotlib's layout, every panel is at least as large as
    its labels need (one pitch per label), so no label can overlap another."""
    path, truth = seq2seq(29)
    figure = layer_comparison(path, site="encoder/self")
    figure.canvas.draw()
    width, height = figure.get_size_inches()
    for ax in map_axes(figure):
        box = ax.get_position()
        assert box.width * width >= 29 * label_pitch() * 0.98
        assert box.height * height >= 29 * label_pitch() * 0.98
    labels = tuple(truth["enc_labels"])
    layout = layout_maps([MapPanel(29, 29, labels, labels)], ncols=1)
    assert layout.steps(29, 29) == (1, 1)
    many = tuple(f"{ENCODER}_{i}" for i in range(1000))
    layout = layout_maps([MapPanel(1000, 1000, many, many)], ncols=1)
    assert layout.panel == (MAX_PANEL, MAX_PANEL)  # 1000 labels need 126 inches: capped, then thinned
    assert layout.steps(1000, 1000) == (math.ceil(1000 * label_pitch() / MAX_PANEL),) * 2 == (16, 16)


# --- user options always win ----------------------------------------------------------------------------

@pytest.mark.parametrize("function", [layer_comparison, head_grid, attention_flow])
def test_figsize_title_limits_cmap_and_ncols_are_used_as_given(seq2seq, function):
    path, truth = seq2seq(29, 20)
    selectors = {"layer": 0} if function is not layer_comparison else {}
    site = {} if function is attention_flow else {"site": "decoder/cross"}
    figure = function(path, figsize=(9.0, 4.5), title="my title", vmin=0.01, vmax=0.2, cmap="magma", ncols=2,
                      **site, **selectors)
    assert tuple(figure.get_size_inches()) == (9.0, 4.5)
    assert figure._suptitle.get_text() == "my title"
    panels = map_axes(figure)
    assert {ax.get_subplotspec().get_gridspec().ncols for ax in panels} == {2}
    for ax in panels:
        assert (ax.images[0].norm.vmin, ax.images[0].norm.vmax) == (0.01, 0.2)
        assert ax.images[0].get_cmap().name.startswith("magma")
    [colorbar] = colorbars(figure)
    assert (colorbar.norm.vmin, colorbar.norm.vmax) == (0.01, 0.2)
    # A small figsize thins the labels (and says so) instead of stacking them.
    assert any("every" in ax.get_xlabel() + ax.get_ylabel() for ax in panels)
    assert_readable(figure)


def test_heatmap_figsize_title_and_axes(seq2seq):
    import matplotlib.pyplot as plt

    path, truth = seq2seq(29, 20)
    ax = heatmap(path, site="decoder/cross", layer=2, figsize=(5.0, 4.0), title="cross, layer 2", vmin=0.0, vmax=0.5)
    assert tuple(ax.figure.get_size_inches()) == (5.0, 4.0)
    assert ax.get_title() == "cross, layer 2"
    assert (colorbars(ax.figure)[0].norm.vmin, colorbars(ax.figure)[0].norm.vmax) == (0.0, 0.5)
    np.testing.assert_allclose(drawn_values(ax.images[0]), truth["decoder/cross"][2].mean(axis=0), rtol=1e-6)
    assert_readable(ax.figure)
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5), layout="constrained")
    assert heatmap(path, site="encoder/self", layer=0, ax=right) is right
    assert not left.images
    assert right.get_title() == "encoder/self | layer 0 | head mean of 2 | weights (softmax)"
    assert overlapping_labels(figure) == []


# --- missing is not zero --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def with_gaps(tmp_path_factory):
    """One map with real zeros and NaN cells (captured partly), layer 1 complete."""
    rng = np.random.default_rng(5)
    weights = softmax(rng.normal(size=(2, 1, 6, 6)))
    weights[0, 0, 1, :3] = 0.0  # real zeros
    weights[0, 0, 4, 2:] = np.nan  # not captured
    path = tmp_path_factory.mktemp("gaps") / "gaps.zarr"
    labels = [f"token_{i}" for i in range(6)]
    writer = attnformat.Writer(path)
    site = writer.create_site("encoder/self", sizes={"layer": 2, "head": 1, "query": 6, "key": 6},
                              coords={"query_label": ("query", labels), "key_label": ("key", labels)},
                              attrs={"attention_type": "self", "causal": 0})
    for layer in range(2):
        site.write("weights", weights[layer], layer=layer)
    writer.close(complete=False)  # the NaN cells were never captured
    return path, weights.astype(np.float32)


def _legend_entries(legend):
    return [(t.get_text(), to_rgba(h.get_facecolor())) for t, h in zip(legend.get_texts(), legend.legend_handles)]


def test_missing_cells_are_marked_and_zeros_are_not(with_gaps):
    path, weights = with_gaps
    ax = heatmap(path, layer=0, head=0)
    shown = drawn_values(ax.images[0])
    np.testing.assert_array_equal(np.isnan(shown), np.isnan(weights[0, 0]))
    assert (shown[1, :3] == 0.0).all(), "real zeros are drawn as values, not as missing"
    assert to_rgba(ax.images[0].get_cmap().get_bad()) == to_rgba(MISSING_COLOR)
    assert _legend_entries(ax.get_legend()) == [("not captured", to_rgba(MISSING_COLOR))]
    assert_readable(ax.figure)
    assert heatmap(path, layer=1, head=0).get_legend() is None  # nothing missing, no legend


def test_the_selection_says_what_missing_cells_mean(with_gaps, monkeypatch):
    import attnformat.viewer.heatmaps as heatmaps

    real_select = heatmaps.select
    note = "absent: outside the temporal window (max_distance=2)"

    def select_with_note(*args, **kwargs):
        chosen = real_select(*args, **kwargs)
        chosen.missing_note = note
        return chosen

    monkeypatch.setattr(heatmaps, "select", select_with_note)
    path, _ = with_gaps
    ax = heatmap(path, layer=0, head=0)
    assert _legend_entries(ax.get_legend()) == [(note, to_rgba(MISSING_COLOR))]
    assert_readable(ax.figure)


def test_grid_with_missing_cells_has_one_figure_legend(with_gaps):
    path, weights = with_gaps
    figure = layer_comparison(path, head=0)
    panels = map_axes(figure)
    for layer, ax in enumerate(panels):
        np.testing.assert_array_equal(drawn_values(ax.images[0]), weights[layer, 0])
    [legend] = figure.legends
    assert _legend_entries(legend) == [("not captured", to_rgba(MISSING_COLOR))]
    assert_readable(figure)


# --- a step never captured ------------------------------------------------------------------------------

def test_step_never_captured_says_so(tmp_path):
    rng = np.random.default_rng(7)
    path = tmp_path / "training.zarr"
    labels = [f"R{i}" for i in range(12)]
    written = {}
    writer = attnformat.Writer(path, model_name="snapshots")
    site = writer.create_site("trunk/iga", sizes={"step": 0, "layer": 2, "head": 2, "query": 12, "key": 12},
                              variables=("logits",),
                              coords={"query_label": ("query", labels), "key_label": ("key", labels)},
                              attrs={"attention_type": "self", "causal": 0})
    for step in (100, 200, 300):
        for layer in range(2):
            if (step, layer) == (200, 1):
                continue  # the run never captured this one
            written[step, layer] = rng.normal(size=(2, 12, 12)).astype(np.float32) - 2.0
            site.write("logits", written[step, layer], step=step, layer=layer)
    writer.close(complete=False)
    assert attnformat.open(path).attrs["completeness"] == "incomplete"

    figure = step_comparison(path, variable="logits", layer=1, head=0, vmin=-6.0, vmax=1.0)
    panels = map_axes(figure)
    assert [ax.get_title() for ax in panels] == ["step 100", "step 200", "step 300"]
    for ax, step in zip(panels, (100, 200, 300)):
        if step == 200:
            assert [t.get_text() for t in ax.texts] == ["not captured"]
            assert not ax.images[0].get_visible(), "no colour for a map that was never captured"
            assert np.isnan(drawn_values(ax.images[0])).all()
        else:
            assert len(ax.texts) == 0 and ax.images[0].get_visible()
            np.testing.assert_array_equal(drawn_values(ax.images[0]), written[step, 1][0])
    [colorbar] = colorbars(figure)
    assert (colorbar.norm.vmin, colorbar.norm.vmax) == (-6.0, 1.0)  # the user's limits
    assert colorbar.ax.get_ylabel() == "logits (pre-softmax)"
    assert figure.legends == []  # an uncaptured panel says so itself; no missing cells elsewhere
    assert_readable(figure)


# --- saving at the user's resolution --------------------------------------------------------------------

def test_save_figure_uses_the_users_savefig_dpi(seq2seq, tmp_path):
    from PIL import Image

    path, _ = seq2seq(8)
    with matplotlib.rc_context({"savefig.dpi": 300, "savefig.bbox": "standard"}):
        ax = heatmap(path, site="encoder/self", layer=0, figsize=(3.0, 2.5))
        assert Image.open(save_figure(ax, tmp_path / "rc.png", close=False)).size == (900, 750)
        assert Image.open(save_figure(ax, tmp_path / "given.png", dpi=40, close=False)).size == (120, 100)
    with matplotlib.rc_context({"savefig.dpi": 100, "savefig.bbox": "tight"}):
        tight = Image.open(save_figure(ax, tmp_path / "tight.png", close=False)).size
        full = Image.open(save_figure(ax, tmp_path / "full.png", bbox_inches="standard")).size
    assert full == (300, 250) and tight != full
    with matplotlib.rc_context({"savefig.dpi": "figure"}):
        assert save_options()["dpi"] == "figure"


# --- grids placed by arithmetic: every text on the canvas ------------------------------------------------

LONG = "robot0_eef_pos_past_traj_delta"


@pytest.fixture(scope="module")
def long_labels(tmp_path_factory):
    """Files whose token labels are long (``robot0_eef_pos_past_traj_delta_8``), with two stored
    steps, two layers and six heads, and the arrays written into them."""
    root = tmp_path_factory.mktemp("long")
    cache = {}

    def build(tokens):
        if tokens not in cache:
            rng = np.random.default_rng(tokens)
            labels = [f"{LONG}_{i}" for i in range(tokens)]
            path = root / f"long{tokens}.zarr"
            weights = softmax(rng.normal(scale=2.0, size=(2, 2, 6, tokens, tokens))).astype(np.float32)
            with attnformat.Writer(path, model_name="long") as writer:
                site = writer.create_site("policy/self", sizes={"step": 0, "layer": 2, "head": 6, "query": tokens,
                                                                "key": tokens},
                                          coords={"query_label": ("query", labels), "key_label": ("key", labels)},
                                          attrs={"attention_type": "self", "causal": 0})
                for s, step in enumerate((10, 20)):
                    for layer in range(2):
                        site.write("weights", weights[s, layer], step=step, layer=layer)
            cache[tokens] = path, weights, labels
        return cache[tokens]

    return build


def texts_off_canvas(figure, tolerance=0.5):
    """Visible, non-empty texts (tick labels, titles, axis and colorbar labels, legend) whose drawn
    box pokes out of the figure's pixel box, for a figure drawn just before."""
    renderer = figure.canvas.get_renderer()
    canvas = figure.bbox
    off = []
    for text in figure.findobj(Text):
        if not (text.get_visible() and str(text.get_text()).strip()) or (text.axes is not None and not text.axes.get_visible()):
            continue
        box = text.get_window_extent(renderer)
        if (box.x0 < canvas.x0 - tolerance or box.y0 < canvas.y0 - tolerance or box.x1 > canvas.x1 + tolerance
                or box.y1 > canvas.y1 + tolerance):
            off.append(text.get_text())
    return off


def check_grid(figure, expected, labels):
    """Drawn values, labels, colorbar, no layout engine, no overlap and nothing off the canvas."""
    panels = map_axes(figure)
    assert len(panels) == len(expected)
    for ax, values in zip(panels, expected):
        np.testing.assert_array_equal(drawn_values(ax.images[0]), values)
    check_ticks(panels[0], labels, "y")
    check_ticks(panels[-1], labels, "x")
    [colorbar] = colorbars(figure)
    every = np.stack(expected)
    assert (colorbar.norm.vmin, colorbar.norm.vmax) == pytest.approx((every.min(), every.max()), rel=1e-6)
    assert colorbar.ax.get_ylabel() == "weights (softmax)"
    assert figure.get_layout_engine() is None, "placed by the layout arithmetic, no engine at draw time"
    assert_readable(figure)  # draws the figure
    assert texts_off_canvas(figure) == []


@pytest.mark.parametrize("tokens", [8, 29, 100])
@pytest.mark.parametrize("kind", ["head", "layer", "step"])
def test_grids_keep_every_text_on_the_canvas(long_labels, tokens, kind):
    import matplotlib.pyplot as plt

    path, weights, labels = long_labels(tokens)
    draw, expected = {
        "head": (lambda **o: head_grid(path, layer=1, step=20, **o), list(weights[1, 1])),
        "layer": (lambda **o: layer_comparison(path, head=2, step=10, **o), list(weights[0, :, 2])),
        "step": (lambda **o: step_comparison(path, layer=0, head=5, **o), list(weights[:, 0, 5])),
    }[kind]
    figure = draw()
    check_grid(figure, expected, labels)
    width, height = figure.get_size_inches()
    plt.close(figure)
    smaller = (round(width * 0.7, 2), round(height * 0.7, 2))  # a user figsize smaller than the default
    figure = draw(figsize=smaller)
    assert tuple(figure.get_size_inches()) == smaller
    check_grid(figure, expected, labels)
    plt.close(figure)


@pytest.mark.parametrize("tokens", [8, 29, 100])
def test_attention_flow_keeps_every_text_on_the_canvas(seq2seq, tokens):
    import matplotlib.pyplot as plt

    path, truth = seq2seq(tokens, max(2, tokens // 2))
    default = attention_flow(path, layer=0).get_size_inches()
    plt.close("all")
    for figsize in (None, (round(default[0] * 0.7, 2), round(default[1] * 0.7, 2))):
        figure = attention_flow(path, layer=0, figsize=figsize)
        panels = map_axes(figure)
        for ax, name in zip(panels, ("encoder/self", "decoder/self", "decoder/cross")):
            np.testing.assert_allclose(drawn_values(ax.images[0]), truth[name][0].mean(axis=0), rtol=1e-6)
        assert figure.get_layout_engine() is None
        assert_readable(figure)
        assert texts_off_canvas(figure) == []
        plt.close(figure)


def test_grid_legend_and_long_title_stay_on_the_canvas(with_gaps):
    import matplotlib.pyplot as plt

    path, weights = with_gaps
    title = "a long figure title that a user wrote for a small figure | " * 3
    for figsize in (None, (5.0, 3.0)):
        figure = layer_comparison(path, head=0, figsize=figsize, title=title)
        assert figure._suptitle.get_text() == title  # shrunk to fit, never rewritten
        assert len(figure.legends) == 1
        for layer, ax in enumerate(map_axes(figure)):
            np.testing.assert_array_equal(drawn_values(ax.images[0]), weights[layer, 0])
        assert_readable(figure)
        assert texts_off_canvas(figure) == []
        plt.close(figure)
