"""``compact=True`` (what the report draws): the file's values, the same layout, labels, titles and
colour scale as the default one-Axes-per-panel figures, checked against the file's arrays and
against the default figure of the same call."""

from __future__ import annotations

import matplotlib
import numpy as np

import attnformat
from attnformat.viewer import head_grid, heatmap, layer_comparison

from conftest import dense_tree


def _labels_on_canvas(canvas) -> list[str]:
    """Every text the canvas shows once per copy: strips count once per panel they label."""
    from attnformat.viewer.output import _LabelStrip

    texts = [t.get_text() for t in canvas.texts]
    for artist in canvas.artists:
        if isinstance(artist, _LabelStrip):
            texts += [t.get_text() for t in artist.texts] * (1 + len(artist.offsets))
    return texts


def _inches(box, figure) -> np.ndarray:
    width, height = figure.get_size_inches()
    return np.array([box.x0 * width, box.y0 * height, box.x1 * width, box.y1 * height])


def test_compact_head_grid_shows_the_file_s_maps_where_the_default_puts_its_axes(example):
    tree = attnformat.open(example("dense"))
    weights = tree["encoder/self"]["weights"].sel(layer=1).values
    default = head_grid(tree, layer=1)
    compact = head_grid(tree, layer=1, compact=True)
    canvas, bar = compact.axes
    assert len(canvas.images) == weights.shape[0]
    assert compact.get_size_inches().tolist() == default.get_size_inches().tolist()
    for head, (image, ax) in enumerate(zip(canvas.images, default.axes[:-1])):
        np.testing.assert_array_equal(np.ma.filled(image.get_array(), np.nan), weights[head])
        left, right, bottom, top = image.get_extent()
        np.testing.assert_allclose([left, bottom, right, top], _inches(ax.get_position(), default), atol=1e-9)
        assert image.norm.vmin == float(weights.min()) and image.norm.vmax == float(weights.max())
    # the same words on the figure: titles, axis labels and every shown tick label of every panel
    shown = [ax.get_title() for ax in default.axes[:-1]] + [ax.get_xlabel() for ax in default.axes[:-1]]
    shown += [ax.get_ylabel() for ax in default.axes[:-1]]
    shown += [t.get_text() for ax in default.axes[:-1] for t in ax.get_xticklabels() + ax.get_yticklabels()]
    assert sorted(t for t in _labels_on_canvas(canvas) if t) == sorted(t for t in shown if t)
    assert bar.get_ylabel() == default.axes[-1].get_ylabel() == "weights (softmax)"
    assert compact._suptitle.get_text() == default._suptitle.get_text()


def test_compact_grid_of_128_tokens_thins_labels_like_the_default_and_keeps_them_apart():
    rng = np.random.default_rng(0)
    labels = [f"tok{i}" for i in range(128)]
    tree = dense_tree(rng.normal(size=(2, 3, 128, 128)).astype(np.float32), labels=labels)
    default = layer_comparison(tree, head=1)
    compact = layer_comparison(tree, head=1, compact=True)
    canvas = compact.axes[0]
    assert sorted(_labels_on_canvas(canvas)) == sorted(
        [t.get_text() for ax in default.axes[:-1] for t in ax.get_xticklabels() + ax.get_yticklabels() if t.get_text()]
        + [ax.get_title() for ax in default.axes[:-1]] + [ax.get_xlabel() for ax in default.axes[:-1] if ax.get_xlabel()]
        + [ax.get_ylabel() for ax in default.axes[:-1] if ax.get_ylabel()])
    # drawn: no two tick labels of the canvas overlap (strips are drawn once, copied whole)
    compact.canvas.draw()
    renderer = compact.canvas.get_renderer()
    from attnformat.viewer.output import _LabelStrip

    for strip in (a for a in canvas.artists if isinstance(a, _LabelStrip)):
        boxes = [t.get_window_extent(renderer) for t in strip.texts]
        assert not any(a.overlaps(b) for a, b in zip(boxes, boxes[1:]))
    weights = tree["encoder/self"]["weights"].sel(head=1).values
    for layer, image in enumerate(canvas.images):
        np.testing.assert_allclose(np.ma.filled(image.get_array(), np.nan), weights[layer], rtol=1e-6)


def test_compact_heatmap_same_map_title_scale_and_panel_as_the_default(example):
    tree = attnformat.open(example("dense"))
    expected = tree["encoder/self"]["weights"].sel(layer=0).values.mean(axis=0)
    default = heatmap(tree, layer=0)
    canvas = heatmap(tree, layer=0, compact=True)
    image = canvas.images[0]
    np.testing.assert_allclose(np.ma.filled(image.get_array(), np.nan), expected, rtol=1e-6)
    left, right, bottom, top = image.get_extent()
    np.testing.assert_allclose([left, bottom, right, top], _inches(default.get_position(), default.figure), atol=1e-9)
    assert default.get_title() in _labels_on_canvas(canvas)
    bar, default_bar = canvas.figure.axes[1], default.figure.axes[1]
    assert bar.get_ylabel() == default_bar.get_ylabel()
    assert bar.get_ylim() == default_bar.get_ylim()
    np.testing.assert_allclose(bar.get_position().bounds, default_bar.get_position().bounds)


def test_a_panel_never_captured_reads_so_in_the_compact_grid():
    logits = np.random.default_rng(1).normal(size=(1, 2, 4, 4)).astype(np.float32)
    tree = dense_tree(logits)
    tree["encoder/self"]["weights"].values[0, 1] = np.nan
    canvas = head_grid(tree, layer=0, compact=True).axes[0]
    assert len(canvas.images) == 1
    assert "not captured" in [t.get_text() for t in canvas.texts]


def test_compact_grid_saves_as_svg_with_every_label_as_text(example, tmp_path):
    from attnformat.viewer import save_figure

    figure = head_grid(example("dense"), layer=0, compact=True)
    path = save_figure(figure, tmp_path / "grid.svg")
    svg = path.read_text(encoding="utf-8")
    labels = [str(v) for v in attnformat.open(example("dense"))["encoder/self"]["query_label"].values]
    # 3 heads in one row: query labels on the left panel only, key labels under every panel
    assert svg.count(f">{labels[2]}<") == 1 + 3
    assert matplotlib.get_backend().lower() == "agg"


def test_compact_rollout_same_map_title_labels_and_colorbar_as_the_default(example):
    from attnformat.viewer import attention_rollout, rollout_map

    tree = attnformat.open(example("dense"))
    default = rollout_map(tree)
    canvas = rollout_map(tree, compact=True)
    image = canvas.images[0]
    np.testing.assert_allclose(np.ma.filled(image.get_array(), np.nan), attention_rollout(tree).values, rtol=1e-6)
    assert canvas.figure.get_size_inches().tolist() == default.figure.get_size_inches().tolist()
    assert canvas.figure.get_layout_engine() is None
    shown = [default.get_title(), default.get_xlabel(), default.get_ylabel()]
    shown += [t.get_text() for t in default.get_xticklabels() + default.get_yticklabels()]
    assert sorted(t for t in _labels_on_canvas(canvas) if t) == sorted(t for t in shown if t)
    bar, default_bar = canvas.figure.axes[1], default.figure.axes[1]
    assert bar.get_ylabel() == default_bar.get_ylabel() == "rolled-out attention (rollout with residual)"
    assert bar.get_ylim() == default_bar.get_ylim()
    assert image.norm.vmin == default.images[0].norm.vmin and image.norm.vmax == default.images[0].norm.vmax
    # the title (wider than the 6-token panel) gets the room the default figure widened for it, at full size
    title = next(t for t in canvas.texts if t.get_text() == default.get_title())
    assert title.get_fontsize() == default.title.get_fontsize()
    canvas.figure.canvas.draw()
    box = title.get_window_extent()
    assert 0 <= box.x0 and box.x1 <= canvas.figure.bbox.width
