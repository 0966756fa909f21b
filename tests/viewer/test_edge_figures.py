"""Edge attention figures (seed 000): the top-k bars and the node-link drawing show the stored edge
values, name edges by node label without overlapping labels, show their colour scale, and let the
user's limits, colormap, figure size and title win."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import attnformat
from attnformat.examples import _root
from attnformat.testing.figures import colorbars, drawn_values, overlapping_labels, overlapping_texts
from attnformat.viewer import node_link, top_edges
from attnformat.viewer.edges import node_link_data

NODES, STEPS, LAYERS = 14, 3, 2


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    """14 nodes on a circle ("node 0" ... "node 13"), ring and skip edges plus self-loops, per time step."""
    rng = np.random.default_rng(0)
    pairs = sorted({(i, (i + d) % NODES) for i in range(NODES) for d in (1, 3, NODES - 1, NODES - 3)}
                   | {(i, i) for i in range(NODES)}, key=lambda p: (p[1], p[0]))
    source, target = np.array(pairs).T
    scores = np.exp(rng.normal(scale=1.5, size=(1, LAYERS, STEPS, source.size)))
    weights = scores / np.stack([np.bincount(target, weights=row, minlength=NODES)[target]
                                 for row in scores.reshape(-1, source.size)]).reshape(scores.shape)
    weights = weights.astype(np.float32)
    weights[0, 1, 2, :5] = np.nan  # a few edges not captured at the last step of layer 1
    angle = np.linspace(0, 2 * np.pi, NODES, endpoint=False)
    site = xr.Dataset(
        {"weights": (("sample", "layer", "time", "edge"), weights)},
        coords={"layer": np.arange(LAYERS), "time": np.arange(STEPS), "node": np.arange(NODES),
                "source": ("edge", source), "target": ("edge", target),
                "node_label": ("node", np.array([f"node {i}" for i in range(NODES)], dtype=object)),
                "node_x": ("node", 10 * np.cos(angle)), "node_y": ("node", 10 * np.sin(angle))},
        attrs={"layout": "edge", "edge_node_dim": "node", "normalization": "softmax", "normalized_dim": "key",
               "attention_type": "self", "causal": 0, "self_loops_added": 1})
    path = attnformat.save(xr.DataTree.from_dict({"/": _root("graph"), "/spatial": site}),
                           tmp_path_factory.mktemp("graph") / "graph.zarr")
    return path, {"weights": weights, "source": source, "target": target}


def expected_top(truth, k, layer, time):
    values = truth["weights"][0, layer, time].astype(np.float64)
    finite = np.flatnonzero(np.isfinite(values))
    order = finite[np.argsort(-values[finite], kind="stable")][:k]
    names = [f"node {s} -> node {t}" for s, t in zip(truth["source"][order], truth["target"][order])]
    return values[order], names


def test_top_edges_bars_names_and_no_overlap_at_default_size(graph):
    path, truth = graph
    ax = top_edges(path, k=20, layer=0, time=1)
    values, names = expected_top(truth, 20, 0, 1)
    np.testing.assert_allclose([bar.get_height() for bar in ax.patches], values, rtol=1e-6)
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert ax.get_ylabel() == "weights (softmax)"
    assert "top 20 of 70 edges" in ax.get_title() and "time 1" in ax.get_title()
    assert overlapping_labels(ax.figure) == [] and overlapping_texts(ax.figure) == []
    assert not colorbars(ax.figure)  # one colour: the value axis is the scale


def test_top_edges_skip_edges_not_captured(graph):
    path, truth = graph
    ax = top_edges(path, k=70, layer=1, time=2)
    values, names = expected_top(truth, 70, 1, 2)
    assert len(values) == 65
    np.testing.assert_allclose([bar.get_height() for bar in ax.patches], values, rtol=1e-6)
    assert overlapping_labels(ax.figure) == []


def test_top_edges_user_options_win(graph):
    path, truth = graph
    values, names = expected_top(truth, 12, 1, 0)
    ax = top_edges(path, k=12, layer=1, time=0, cmap="plasma", vmin=0.0, vmax=1.0, figsize=(7.0, 4.5), title="top 12")
    assert tuple(ax.figure.get_size_inches()) == (7.0, 4.5) and ax.get_title() == "top 12"
    assert ax.get_ylim() == (0.0, 1.0)
    (colorbar,) = colorbars(ax.figure)
    assert (colorbar.norm.vmin, colorbar.norm.vmax) == (0.0, 1.0) and colorbar.ax.get_ylabel() == "weights (softmax)"
    import matplotlib

    expected_colours = matplotlib.colormaps["plasma"](values)  # norm 0..1 is the identity here
    np.testing.assert_allclose([bar.get_facecolor() for bar in ax.patches], expected_colours, atol=1e-6)


def test_top_edges_on_a_small_axes_thin_the_names(graph):
    import matplotlib.pyplot as plt

    path, truth = graph
    figure, ax = plt.subplots(figsize=(3.0, 4.0), layout="constrained")
    assert top_edges(path, k=40, layer=0, time=0, ax=ax) is ax
    values, names = expected_top(truth, 40, 0, 0)
    np.testing.assert_allclose([bar.get_height() for bar in ax.patches], values, rtol=1e-6)  # every bar is drawn
    shown = [t.get_text() for t in ax.get_xticklabels()]
    positions = np.asarray(ax.get_xticks())
    assert shown == [names[int(p)] for p in positions]  # each name stays under its own bar
    step = int(positions[1] - positions[0])
    assert step > 1 and positions.tolist() == list(range(0, len(names), step))  # thinned: every step-th name, from the first
    assert (np.diff(positions) == step).all() and f"every {step}" in ax.get_xlabel()
    assert overlapping_labels(figure) == []


def test_node_link_colours_are_the_stored_values_on_a_visible_scale(graph):
    path, truth = graph
    ax = node_link(path, layer=1, time=0)
    values = truth["weights"][0, 1, 0]
    loops = truth["source"] == truth["target"]
    lines = ax.collections[0]
    np.testing.assert_array_equal(drawn_values(lines), values[~loops])
    (colorbar,) = colorbars(ax.figure)
    finite = values[~loops]
    assert (colorbar.norm.vmin, colorbar.norm.vmax) == (float(finite.min()), float(finite.max()))
    assert lines.norm is colorbar.norm
    assert colorbar.ax.get_ylabel() == "weights (softmax)"
    assert "56 edges drawn, 14 self-loops not drawn" in ax.get_title()
    assert {t.get_text() for t in ax.texts} == {f"node {i}" for i in range(NODES)}
    assert overlapping_labels(ax.figure) == [] and overlapping_texts(ax.figure) == []


def test_node_link_user_options_win(graph):
    path, _ = graph
    ax = node_link(path, layer=0, time=2, vmin=0.1, vmax=0.4, cmap="cividis", figsize=(5.0, 5.0), title="graph",
                   labels=False)
    (colorbar,) = colorbars(ax.figure)
    assert (colorbar.norm.vmin, colorbar.norm.vmax) == (0.1, 0.4) and ax.collections[0].get_cmap().name == "cividis"
    assert colorbar.extend in ("both", "max", "min")  # the given limits clip some of the values, and it shows
    assert tuple(ax.figure.get_size_inches()) == (5.0, 5.0) and ax.get_title() == "graph" and not ax.texts


def test_node_link_data_without_drawing(graph):
    path, truth = graph
    data = node_link_data(path, layer=1, time=2)
    loops = truth["source"] == truth["target"]
    np.testing.assert_array_equal(data.values, truth["weights"][0, 1, 2][~loops])
    assert data.loops == NODES and data.segments.shape == (int((~loops).sum()), 2, 2)
    # Segments join the stored positions (up to the small sideways shift that separates i -> j from j -> i).
    start = np.column_stack([data.x[data.sources], data.y[data.sources]])
    assert np.abs(data.segments[:, 0] - start).max() < 0.02 * 20
