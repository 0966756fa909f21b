"""The parts that make the report cheaper to draw (issue 9, point 8) change no content: fewer Tick
objects, titles placed directly, the crop found in one pass, helpers that start with what opening
the file imports. Checked against the file's arrays and against Matplotlib's own placement."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import xarray as xr

import attnformat
from attnformat.examples import _root, softmax
from attnformat.viewer import head_grid, heatmap
from attnformat.viewer.heatmaps import draw_map
from attnformat.viewer.output import TITLE_FONTSIZE
from attnformat.viewer.report import _drawn_part, _preload_modules, plan_report, report

LAYERS, HEADS, TOKENS = 2, 6, 24


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 2-layer, 6-head file of 24 tokens and the weights written into it."""
    rng = np.random.default_rng(3)
    weights = softmax(rng.normal(size=(LAYERS, HEADS, TOKENS, TOKENS))).astype(np.float32)
    labels = [f"tok{i}" for i in range(TOKENS)]
    site = xr.Dataset({"weights": (("layer", "head", "query", "key"), weights)},
                      coords={"layer": np.arange(LAYERS), "head": np.arange(HEADS),
                              "query_label": ("query", np.array(labels, dtype=object)),
                              "key_label": ("key", np.array(labels, dtype=object))},
                      attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key",
                             "attention_type": "self", "causal": 0})
    tree = xr.DataTree.from_dict({"/": _root("speed parts", model_name="m"), "/encoder/self": site})
    path = attnformat.save(tree, tmp_path_factory.mktemp("speed") / "small.zarr")
    return path, weights, labels


def _ticks_built(figure) -> int:
    return sum(len(axis.majorTicks) + len(axis.minorTicks) for ax in figure.axes for axis in (ax.xaxis, ax.yaxis))


def test_inner_panels_of_a_head_grid_build_no_ticks_and_outer_ones_show_the_tokens(small):
    path, weights, labels = small
    figure = head_grid(path, layer=1, ncols=3)
    figure.canvas.draw()
    maps = [ax for ax in figure.axes if ax.images]
    assert len(maps) == HEADS
    for index, ax in enumerate(maps):
        left, bottom = index % 3 == 0, index >= HEADS - 3
        # drawn values are the file's, head by head
        np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), weights[1, index], rtol=1e-6)
        shown_x = {int(t): label.get_text() for t, label in zip(ax.get_xticks(), ax.get_xticklabels())}
        shown_y = {int(t): label.get_text() for t, label in zip(ax.get_yticks(), ax.get_yticklabels())}
        assert shown_x == ({i: labels[i] for i in shown_x} if bottom else {})
        assert shown_y == ({i: labels[i] for i in shown_y} if left else {})
        if bottom:
            assert len(shown_x) > 1
        if left:
            assert len(shown_y) > 1
        if not left:  # nothing but Matplotlib's one lazily built placeholder tick per axis
            assert len(ax.yaxis.majorTicks) <= 1
        if not bottom:
            assert len(ax.xaxis.majorTicks) <= 1
    labelled = sum(len(ax.get_xticks()) + len(ax.get_yticks()) for ax in maps)
    colorbar_ticks = len(figure.axes[-1].get_yticks())
    # one Tick per shown label, the colorbar's, and at most a placeholder major and minor tick per axis
    assert _ticks_built(figure) <= labelled + colorbar_ticks + 4 * len(figure.axes)
    plt.close(figure)


def test_a_title_placed_directly_draws_the_pixels_matplotlib_s_own_placement_draws(small):
    path, weights, labels = small
    values = weights[0, 0]
    images = []
    for direct in (True, False):
        figure = plt.figure(figsize=(4, 4), dpi=60)
        ax = figure.add_axes((0.2, 0.2, 0.7, 0.65))
        cmap, norm = plt.get_cmap("viridis"), matplotlib.colors.Normalize(0, float(values.max()))
        draw_map(ax, values, cmap=cmap, norm=norm, query_labels=labels, key_labels=labels,
                 title="layer 0 | head 0" if direct else None, steps=(2, 2))
        if not direct:  # the same title, placed by Matplotlib
            ax.set_title("layer 0 | head 0", fontsize=TITLE_FONTSIZE)
        assert ax._autotitlepos is (not direct)
        figure.canvas.draw()
        images.append(np.asarray(figure.canvas.buffer_rgba()).copy())
        plt.close(figure)
    np.testing.assert_array_equal(images[0], images[1])


def test_a_title_over_axes_with_ticks_on_top_keeps_matplotlib_s_placement():
    figure = plt.figure()
    ax = figure.add_subplot()
    ax.xaxis.tick_top()
    draw_map(ax, np.eye(3), cmap=plt.get_cmap("viridis"), norm=matplotlib.colors.Normalize(0, 1),
             query_labels=list("abc"), key_labels=list("abc"), title="t", steps=(1, 1))
    assert ax._autotitlepos is not False
    figure.canvas.draw()
    top_labels = max(label.get_window_extent().y1 for label in ax.get_xticklabels())
    assert ax.title.get_window_extent().y0 >= top_labels - 0.5  # moved above the top tick labels
    plt.close(figure)


def test_the_crop_is_the_drawn_part_of_the_canvas_plus_the_pad(small):
    path = small[0]
    ax = heatmap(path, layer=0, head=2)
    figure = ax.figure
    figure.set_dpi(50)
    figure.canvas.draw()
    pixels = np.asarray(figure.canvas.buffer_rgba()).copy()
    plt.close(figure)
    pixels[:3, :] = pixels[0, 0]  # a clean background margin whatever the layout did at the edge
    pixels[-3:, :] = pixels[0, 0]
    pixels[:, :3] = pixels[0, 0]
    pixels[:, -3:] = pixels[0, 0]
    cropped = _drawn_part(pixels, figure, 2)
    drawn = np.any(pixels != pixels[0, 0], axis=-1)  # the reference: any channel differs
    rows, cols = np.flatnonzero(drawn.any(axis=1)), np.flatnonzero(drawn.any(axis=0))
    expected = pixels[rows[0] - 2:rows[-1] + 3, cols[0] - 2:cols[-1] + 3]
    np.testing.assert_array_equal(cropped, expected)


def test_helpers_start_with_what_opening_a_file_imports():
    pytest.importorskip("dask")  # xarray imports dask.array on its first variable where dask is installed
    modules = _preload_modules()
    assert "dask.array" in modules and "attnformat.engines.zarr" in modules


def test_a_report_drawn_on_two_processes_still_holds_every_planned_figure(small, tmp_path):
    path, weights, labels = small
    planned = [item.stem for item in plan_report(path)]
    index = report(path, tmp_path / "r", progress=False, workers=2)
    written = sorted(p.stem for p in index.parent.glob("*.png"))
    assert written == sorted(planned)
    assert {"encoder_self-head-grid-layer0", "encoder_self-heatmap-layer1", "encoder_self-layer-comparison"} <= set(written)
    page = index.read_text(encoding="utf-8")
    assert all(f"{stem}.png" in page for stem in planned)


def test_grids_are_drawn_first_from_both_ends_and_single_plots_last(small):
    from attnformat.viewer.report import _GRID_KINDS, _REUSING_KINDS, _drawing_order

    items = plan_report(small[0])
    order = _drawing_order(items)
    assert sorted(order) == list(range(len(items)))  # every plot drawn once
    # the box plots come last: the report's own process draws them first, from its summary's statistics
    reusing = sum(items[index].kind in _REUSING_KINDS for index in order)
    assert reusing == 1 and items[order[-1]].kind in _REUSING_KINDS
    order = order[:len(order) - reusing]
    kinds = [items[index].kind in _GRID_KINDS for index in order]
    grids = sum(kinds)
    assert grids >= 2 and kinds[0] and kinds[-1]
    # helpers take from the front, the report's process from the back: the middle (drawn last) is single plots
    front = (grids + 1) // 2
    assert kinds[:front] == [True] * front and kinds[len(kinds) - (grids - front):] == [True] * (grids - front)
    assert not any(kinds[front:len(kinds) - (grids - front)])


# -- texts laid out and rasterised once per process -----------------------------------------------------


def _png_pixels(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGBA"))


@pytest.mark.parametrize("kind", ["heatmap", "head-grid", "rollout", "stats"])
def test_the_report_s_text_renderer_draws_matplotlib_s_pixels(small, tmp_path, kind):
    from attnformat.viewer import catalog
    from attnformat.viewer.report import _text_renderer, save_png

    path = small[0]
    assert _text_renderer() is not None  # this Matplotlib passes the per-process check
    options = {"layer": 1} if kind in ("heatmap", "head-grid") else {}
    if "compact" in catalog.PLOT_KINDS[kind].parameters:
        options["compact"] = True
    with matplotlib.rc_context({"savefig.bbox": "standard"}):
        for attempt in range(2):  # the second figure is drawn from the caches the first one filled
            figure = catalog.plot(path, kind, **options)
            figure = getattr(figure, "figure", figure)
            save_png(figure, tmp_path / f"ours{attempt}.png", dpi=80)
            plt.close(figure)
        figure = catalog.plot(path, kind, **options)
        figure = getattr(figure, "figure", figure)
        figure.savefig(tmp_path / "matplotlib.png", dpi=80)  # Matplotlib's own renderer, from scratch
        plt.close(figure)
    expected = _png_pixels(tmp_path / "matplotlib.png")
    for attempt in range(2):
        assert np.array_equal(_png_pixels(tmp_path / f"ours{attempt}.png"), expected)


def test_a_text_renderer_that_draws_other_pixels_is_not_used(monkeypatch):
    import importlib

    report_module = importlib.import_module("attnformat.viewer.report")  # the package's "report" is the function
    original = report_module._text_renderer_class

    def shifted():
        base = original()

        class Shifted(base):
            def draw_text(self, gc, x, y, s, prop, angle, ismath=False, mtext=None):
                return super().draw_text(gc, x + 0.5, y, s, prop, angle, ismath=ismath, mtext=mtext)

        return Shifted

    monkeypatch.setattr(report_module, "_TEXT_RENDERER", {})
    monkeypatch.setattr(report_module, "_text_renderer_class", shifted)
    assert report_module._text_renderer() is None


def test_the_box_plots_of_a_report_reuse_the_summary_s_statistics(small, tmp_path, monkeypatch):
    import importlib

    from attnformat.viewer import attention_statistics

    statistics = importlib.import_module("attnformat.viewer.statistics")
    computed = []
    original = statistics._computed_statistics

    def counting(*args, **kwargs):
        computed.append(statistics.site_name(args[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(statistics, "_computed_statistics", counting)
    index = report(small[0], tmp_path / "one", progress=False, workers=1)
    assert computed == ["encoder/self"]  # once for the summary and the box plots together
    assert (index.parent / "encoder_self-stats.png").is_file()
    # outside a report nothing is kept, and the kept numbers are the ones computed afresh
    tree = attnformat.open(small[0])
    with statistics.reusing_statistics():
        kept = attention_statistics(tree)
        assert attention_statistics(tree) is kept
    fresh = attention_statistics(tree)
    assert fresh is not kept and fresh.equals(kept)
