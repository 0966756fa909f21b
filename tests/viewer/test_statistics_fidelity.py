"""Statistics that mean what the file supports (issue 9, points 1 and 4), against numpy ground truth.

Files are written with attnformat's streaming Writer, as a training loop would; every expected
number is computed here from the arrays that went into the file, with the seeds' own formulas.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

import attnformat
from attnformat.errors import SelectionError
from attnformat.examples import _root, softmax
from attnformat.testing.figures import overlapping_labels
from attnformat.viewer import attention_statistics, format_summary, statistics_boxplots, statistics_summary, top_pairs_plot
from attnformat.viewer.statistics import constant_statistics, locality

SAMPLES, LAYERS, HEADS, RESIDUES = 3, 2, 2, 30


def _protein_arrays(seed=7):
    rng = np.random.default_rng(seed)
    # A chain per sample (a random walk of ~3.8 angstrom steps): each sample has its own distances.
    steps = rng.normal(size=(SAMPLES, RESIDUES, 3))
    steps *= 3.8 / np.linalg.norm(steps, axis=-1, keepdims=True)
    coords = steps.cumsum(axis=1)
    distance = np.linalg.norm(coords[:, :, None] - coords[:, None], axis=-1).astype(np.float32)
    bias = -np.log1p(np.exp(6.0 - distance))  # (sample, query, key), all negative, most negative when close
    gamma = np.array([1.5, 0.4])[None, :, None, None, None]  # layer 0 local, layer 1 less so
    logits = rng.normal(size=(SAMPLES, LAYERS, HEADS, RESIDUES, RESIDUES)) - gamma * bias[:, None, None]
    weights = softmax(logits).astype(np.float32)
    return weights, distance, logits.astype(np.float32)


@pytest.fixture(scope="module")
def protein(tmp_path_factory):
    """A protein-model file: weights (sample, layer, head, query, key) and a per-sample distance."""
    weights, distance, logits = _protein_arrays()
    path = tmp_path_factory.mktemp("protein") / "protein.attn.zarr"
    labels = [f"R{i}" for i in range(RESIDUES)]
    with attnformat.Writer(path, model_name="toy-iga") as writer:
        site = writer.create_site("trunk/iga", sizes={"sample": SAMPLES, "layer": LAYERS, "head": HEADS, "query": RESIDUES,
                                                      "key": RESIDUES},
                                  variables=("weights", "logits"),
                                  coords={"query_label": ("query", labels), "key_label": ("key", labels)},
                                  attrs={"attention_type": "self", "causal": 0})
        site.add_variable("distance", distance, ("sample", "query", "key"),
                          attrs={"role": "pairwise", "units": "angstrom", "long_name": "C-alpha distance"})
        for layer in range(LAYERS):
            site.write("weights", weights[:, layer], layer=layer)
            site.write("logits", logits[:, layer], layer=layer)
    return path, weights.astype(np.float64), distance.astype(np.float64)


def _ratio(weights, local):
    """Seed 002: mean attention within the neighbourhood over mean attention outside it (pooled)."""
    return weights[local].mean() / weights[~local].mean()


def test_per_sample_distances_give_the_8_angstrom_ratio(protein):
    path, weights, distance = protein
    local = np.broadcast_to((distance < 8.0)[:, None], weights[:, 0].shape)  # (sample, head, query, key)
    summary = statistics_summary(path)
    json.dumps(summary, allow_nan=False)
    assert summary["locality"]["trunk/iga"] == {
        "kind": "distance", "description": "pairwise 'distance' < 8 angstrom, per sample", "variable": "distance",
        "units": "angstrom", "threshold": 8.0, "per": ["sample"]}
    token_window = np.abs(np.arange(RESIDUES)[:, None] - np.arange(RESIDUES)[None, :]) <= 2
    for layer, entry in enumerate(summary["sites"]["trunk/iga"]):
        layer_weights = weights[:, layer]
        expected = _ratio(layer_weights, local)
        assert entry["local_mean"] == pytest.approx(layer_weights[local].mean(), abs=1e-6)
        assert entry["global_mean"] == pytest.approx(layer_weights[~local].mean(), abs=1e-6)
        assert entry["local_global_ratio"] == pytest.approx(expected, rel=1e-5)
        # the old fallback (a +/-2 token window) gives another number: the test can tell them apart
        assert abs(_ratio(layer_weights, np.broadcast_to(token_window, layer_weights.shape)) - expected) > 0.05 * expected
        for head, head_entry in enumerate(entry["heads"]):
            assert head_entry["local_global_ratio"] == pytest.approx(_ratio(layer_weights[:, head], local[:, 0]), rel=1e-5)
    text = format_summary(summary)
    assert "loc/glob of trunk/iga: pairwise 'distance' < 8 angstrom, per sample" in text
    assert f"{summary['sites']['trunk/iga'][0]['local_global_ratio']:9.4f}" in text


def test_each_map_uses_its_own_samples_distances(protein):
    path, weights, distance = protein
    stats = attention_statistics(path)
    assert stats.attrs["locality_kind"] == "distance"
    for sample in range(SAMPLES):
        local = distance[sample] < 8.0
        for layer in range(LAYERS):
            for head in range(HEADS):
                one = weights[sample, layer, head]
                found = stats.isel(sample=sample, layer=layer, head=head)
                assert found["local_global_ratio"].item() == pytest.approx(_ratio(one, local), rel=1e-9)
                assert found["local_count"].item() == local.sum() and found["global_count"].item() == (~local).sum()


def test_threshold_is_a_parameter_in_the_variables_units(protein):
    path, weights, distance = protein
    summary = statistics_summary(path, threshold=6.0)
    local = np.broadcast_to((distance < 6.0)[:, None], weights[:, 1].shape)
    assert summary["sites"]["trunk/iga"][1]["local_global_ratio"] == pytest.approx(_ratio(weights[:, 1], local), rel=1e-5)
    assert summary["locality"]["trunk/iga"]["description"] == "pairwise 'distance' < 6 angstrom, per sample"


def test_streaming_in_row_blocks_gives_the_same_numbers(protein, monkeypatch):
    from attnformat.viewer import statistics as module

    path, weights, distance = protein
    whole = attention_statistics(path)
    monkeypatch.setattr(module, "_BLOCK_ELEMENTS", 7 * RESIDUES)  # one head of 7 query rows per read
    blocks = attention_statistics(path)
    for name in ("mean", "std", "min", "max", "entropy", "sink_score", "local_global_ratio", "count", "local_count"):
        np.testing.assert_allclose(blocks[name].values, whole[name].values, rtol=1e-12, err_msg=name)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = np.where(weights > 0, -weights * np.log(weights), 0.0).sum(-1).mean(-1)
    np.testing.assert_allclose(blocks["entropy"].values, entropy, rtol=1e-10)
    np.testing.assert_allclose(blocks["std"].values, weights.std(axis=(-2, -1)), rtol=1e-9)


def test_distances_along_step_and_sample_align_with_the_maps():
    rng = np.random.default_rng(3)
    steps, samples, n = 2, 2, 12
    distance = rng.uniform(2.0, 20.0, size=(steps, samples, n, n))
    weights = softmax(rng.normal(size=(steps, samples, 2, n, n)))
    site = xr.Dataset(
        {"weights": (("step", "sample", "head", "query", "key"), weights),
         "distance": (("step", "sample", "query", "key"), distance, {"role": "pairwise", "units": "nm"})},
        coords={"step": [10, 20], "head": [0, 1]},
        attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key", "attention_type": "self", "causal": 0})
    tree = xr.DataTree.from_dict({"/": _root("steps and samples"), "/model/attn": site})
    stats = attention_statistics(tree, threshold=9.0)
    assert stats.attrs["locality"] == "pairwise 'distance' < 9 nm, per step, sample"
    for step in range(steps):
        for sample in range(samples):
            local = distance[step, sample] < 9.0
            for head in range(2):
                assert stats["local_global_ratio"].values[step, sample, head] == pytest.approx(
                    _ratio(weights[step, sample, head], local), rel=1e-12)


def test_pairwise_variable_that_cannot_align_is_refused_or_stated():
    rng = np.random.default_rng(4)
    weights = softmax(rng.normal(size=(2, 6, 6)))
    site = xr.Dataset(
        {"weights": (("head", "query", "key"), weights),
         "distance": (("sample", "query", "key"), rng.uniform(0, 10, size=(3, 6, 6)), {"role": "pairwise", "units": "angstrom"})},
        attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key", "attention_type": "self", "causal": 0})
    tree = xr.DataTree.from_dict({"/": _root("misaligned"), "/attn": site})
    found = locality(tree)
    # never a silent fallback: the description says why the distance was not used
    assert found.kind == "token_window" and "'distance' has dimensions sample that weights has not" in found.description
    with pytest.raises(SelectionError, match="sample that weights has not"):
        locality(tree, pairwise="distance")


# --- sequences, patches, graphs, cross-attention -------------------------------------------------------


def test_sequence_token_window_uses_stored_positions():
    rng = np.random.default_rng(5)
    weights = softmax(rng.normal(size=(1, 2, 6, 6)))
    positions = np.array([0, 1, 2, 10, 11, 12])  # two segments far apart
    site = xr.Dataset(
        {"weights": (("layer", "head", "query", "key"), weights)},
        coords={"layer": [0], "head": [0, 1], "query_position": ("query", positions), "key_position": ("key", positions)},
        attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key", "attention_type": "self", "causal": 0})
    tree = xr.DataTree.from_dict({"/": _root("positions"), "/attn": site})
    stats = attention_statistics(tree)
    local = np.abs(positions[:, None] - positions[None, :]) <= 2
    assert stats.attrs["locality"] == "token window +/-2 (|query - key position| <= 2)"
    np.testing.assert_allclose(stats["local_global_ratio"].values[0], [_ratio(weights[0, h], local) for h in range(2)])
    wider = attention_statistics(tree, window=10)
    local = np.abs(positions[:, None] - positions[None, :]) <= 10
    np.testing.assert_allclose(wider["local_global_ratio"].values[0], [_ratio(weights[0, h], local) for h in range(2)])


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """A ViT-like file: CLS + 4x4 patches, written one layer at a time, 3 samples."""
    rng = np.random.default_rng(6)
    grid, samples, layers, heads = 4, 3, 3, 2
    tokens = 1 + grid * grid
    weights = softmax(rng.normal(scale=1.5, size=(samples, layers, heads, tokens, tokens))).astype(np.float32)
    rows = np.concatenate([[-1], np.repeat(np.arange(grid), grid)])
    cols = np.concatenate([[-1], np.tile(np.arange(grid), grid)])
    labels = ["[CLS]"] + [f"patch ({r},{c})" for r, c in zip(rows[1:], cols[1:])]
    path = tmp_path_factory.mktemp("vit") / "vit.attn.zarr"
    with attnformat.Writer(path, model_name="toy-vit") as writer:
        site = writer.create_site(
            "encoder/self", sizes={"sample": samples, "layer": layers, "head": heads, "query": tokens, "key": tokens},
            coords={"query_label": ("query", labels), "key_label": ("key", labels), "query_patch_row": ("query", rows),
                    "query_patch_col": ("query", cols), "key_patch_row": ("key", rows), "key_patch_col": ("key", cols)},
            attrs={"attention_type": "self", "causal": 0, "patch_grid": [grid, grid], "patch_size": [7, 7]})
        for layer in range(layers):
            site.write("weights", weights[:, layer], layer=layer)
    return path, weights.astype(np.float64), rows, cols


def test_patch_grid_adjacency_leaves_cls_out(vit):
    path, weights, rows, cols = vit
    on_grid = rows >= 0
    chebyshev = np.maximum(np.abs(rows[:, None] - rows[None, :]), np.abs(cols[:, None] - cols[None, :]))
    eligible = on_grid[:, None] & on_grid[None, :]
    for radius in (1, 2):
        local = (chebyshev <= radius) & eligible
        far = (chebyshev > radius) & eligible
        stats = attention_statistics(path, radius=radius)
        assert stats.attrs["locality_kind"] == "patch_grid"
        expected = weights[..., local].mean(-1) / weights[..., far].mean(-1)
        np.testing.assert_allclose(stats["local_global_ratio"].values, expected, rtol=1e-10)
        assert (stats["local_count"].values == local.sum()).all() and (stats["global_count"].values == far.sum()).all()
    summary = statistics_summary(path)
    info = summary["locality"]["encoder/self"]
    assert info["kind"] == "patch_grid" and info["radius"] == 1
    assert info["description"] == "patch grid 4x4 adjacency: the patch and its 8 neighbours; non-patch tokens ([CLS]) left out"
    local = (chebyshev <= 1) & eligible
    far = (chebyshev > 1) & eligible
    for layer, entry in enumerate(summary["sites"]["encoder/self"]):
        assert entry["local_global_ratio"] == pytest.approx(weights[:, layer][..., local].mean() / weights[:, layer][..., far].mean(), rel=1e-5)


def test_cls_only_statistics_are_the_cls_row(vit):
    path, weights, rows, cols = vit
    cls = weights[..., 0, :]  # (sample, layer, head, key)
    stats = attention_statistics(path, queries="[CLS]")
    assert stats.attrs["queries"] == "query [CLS] only"
    np.testing.assert_allclose(stats["max"].values, cls.max(-1), rtol=1e-12)
    np.testing.assert_allclose(stats["mean"].values, cls.mean(-1), rtol=1e-12)
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(stats["entropy"].values, -(cls * np.log(cls)).sum(-1), rtol=1e-10)
    assert np.isnan(stats["local_global_ratio"].values).all()  # [CLS] is no patch: neither local nor global
    summary = statistics_summary(path, queries=["[CLS]"])
    assert summary["queries"] == "query [CLS] only"
    assert summary["sites"]["encoder/self"][0]["shape"] == [3, 2, 1, 17]  # samples, heads, the [CLS] row, keys
    assert summary["sites"]["encoder/self"][1]["max"] == pytest.approx(cls[:, 1].max(), abs=1e-6)
    assert "statistics of query [CLS] only" in format_summary(summary)
    two = attention_statistics(path, queries=[0, "patch (1,1)"])
    assert two.attrs["queries"] == "queries [CLS], patch (1,1) only"
    np.testing.assert_allclose(two["max"].values, weights[..., [0, 6], :].max(axis=(-2, -1)), rtol=1e-12)


def _box_values(ax, box: int) -> tuple[float, float]:
    """(lowest, highest) y drawn for the box at x = box + 1 (whiskers, caps and fliers included)."""
    ys = []
    for line in ax.lines:
        x, y = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
        if x.size and np.all(np.abs(x - (box + 1)) < 0.5):
            ys.extend(y.tolist())
    return min(ys), max(ys)


def test_cls_box_plot_draws_the_per_layer_maxima_of_the_cls_row(vit):
    path, weights, rows, cols = vit
    figure = statistics_boxplots(path, queries="[CLS]")
    cls_max = weights[..., 0, :].max(-1)  # (sample, layer, head)
    max_ax, mean_ax, entropy_ax = figure.axes
    assert max_ax.get_title() == "max per map"
    assert "query [CLS] only" in figure._suptitle.get_text()
    for layer in range(cls_max.shape[1]):
        values = cls_max[:, layer].ravel()  # every sample and head of the layer
        low, high = _box_values(max_ax, layer)
        assert (low, high) == (pytest.approx(values.min()), pytest.approx(values.max()))
        medians = [line.get_ydata()[0] for line in max_ax.lines
                   if len(line.get_ydata()) == 2 and line.get_ydata()[0] == line.get_ydata()[1]
                   and np.all(np.abs(np.asarray(line.get_xdata()) - (layer + 1)) < 0.5)]
        assert any(m == pytest.approx(np.median(values)) for m in medians)
    # the CLS row is a softmax row: its mean is 1/17 for every map, drawn as a labelled constant
    assert mean_ax.get_title() == "mean per map (constant)"
    assert [t.get_text() for t in mean_ax.texts] == ["= 1/17 = 0.05882\nfor every map (softmax rows sum to 1)"]
    np.testing.assert_allclose(mean_ax.lines[0].get_ydata(), 1 / 17, rtol=1e-12)
    figure.canvas.draw()
    assert mean_ax.yaxis.get_offset_text().get_text() == ""
    assert not mean_ax.patches  # no boxes of rounding noise
    assert overlapping_labels(figure) == []


def test_softmax_mean_is_never_drawn_as_noise(example):
    figure = statistics_boxplots(example("image"))
    mean_ax = figure.axes[1]
    figure.canvas.draw()
    assert mean_ax.yaxis.get_offset_text().get_text() == ""
    low, high = mean_ax.get_ylim()
    assert high - low > 0.01  # an axis of rounding noise would span ~1e-9
    stats = attention_statistics(example("image"))
    assert np.ptp(stats["mean"].values) < 1e-7  # the values really are constant
    constants = constant_statistics(stats)
    assert constants["mean"]["value"] == 1 / 17


def test_edge_site_constants_and_graph_locality(example):
    tree = attnformat.open(example("edge"))
    site = tree["gat"]
    target = site["target"].values
    summary = statistics_summary(tree)
    info = summary["locality"]["gat"]
    assert info["kind"] == "graph" and info["description"].startswith("not defined for graph edges")
    assert all(entry["local_global_ratio"] is None for entry in summary["sites"]["gat"])
    expected = np.unique(target).size / target.size  # each target's edges sum to 1
    assert summary["constants"]["gat"]["mean"]["value"] == pytest.approx(expected, rel=1e-12)
    assert summary["constants"]["gat"]["mean"]["text"].startswith(f"= 3/11 = {expected:.4g} for every map")
    figure = statistics_boxplots(tree)
    assert figure.axes[1].get_title() == "mean per map (constant)"
    np.testing.assert_allclose(figure.axes[1].lines[0].get_ydata(), expected)
    # target-node restriction: statistics of the edges into node 2 only
    stats = attention_statistics(tree, queries="sensor 2")
    into = target == 2
    np.testing.assert_allclose(stats["max"].values, site["weights"].values[..., into].max(-1), rtol=1e-6)
    assert stats.attrs["queries"] == "target node sensor 2 only"


def test_causal_first_row_makes_max_a_numerical_constant(example):
    tree = attnformat.open(example("encoder-decoder"))
    stats = attention_statistics(tree, site="decoder/self")
    weights = tree["decoder/self"]["weights"].values.astype(np.float64)
    assert (weights.max(axis=(-2, -1)) == 1.0).all()
    assert constant_statistics(stats)["max"] == {"value": 1.0, "text": "= 1 for every map"}
    figure = statistics_boxplots(tree, site="decoder/self")
    assert figure.axes[0].get_title() == "max per map (constant)"
    assert summary_locality_kinds(tree) == {"decoder/cross": "none", "decoder/self": "token_window", "encoder/self": "token_window"}


def summary_locality_kinds(tree):
    return {name: info["kind"] for name, info in statistics_summary(tree)["locality"].items()}


def test_padding_changes_the_softmax_mean_so_it_is_not_called_constant(example):
    stats = attention_statistics(example("padded-batch"))
    means = stats["mean"].values  # sample 0 has 5 real keys, sample 1 has 3
    np.testing.assert_allclose(means[0], 1 / 5, rtol=1e-6)
    np.testing.assert_allclose(means[1], 1 / 3, rtol=1e-6)
    assert "mean" not in constant_statistics(stats)


# --- figure rules ----------------------------------------------------------------------------------------


def test_box_plots_take_figsize_and_title_and_many_layers_do_not_overlap():
    rng = np.random.default_rng(8)
    layers = 24
    weights = softmax(rng.normal(size=(layers, 3, 8, 8)))
    site = xr.Dataset({"weights": (("layer", "head", "query", "key"), weights)}, coords={"layer": np.arange(layers), "head": [0, 1, 2]},
                      attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key", "attention_type": "self", "causal": 0})
    tree = xr.DataTree.from_dict({"/": _root("deep"), "/attn": site})
    figure = statistics_boxplots(tree)
    assert overlapping_labels(figure) == []
    figure = statistics_boxplots(tree, figsize=(9, 3), title="stats")
    assert tuple(figure.get_size_inches()) == (9, 3) and figure._suptitle.get_text() == "stats"
    assert overlapping_labels(figure) == []


def test_top_pairs_plot_figure_options_and_no_overlap(example):
    ax = top_pairs_plot(example("image"), k=40, layer=0, title="top 40", figsize=(6, 4))
    assert ax.get_title() == "top 40" and tuple(ax.figure.get_size_inches()) == (6, 4)
    assert len(ax.patches) == 40
    assert overlapping_labels(ax.figure) == []
    ax = top_pairs_plot(example("image"), k=40, layer=0)
    assert overlapping_labels(ax.figure) == []


def test_edge_site_with_a_node_distance_uses_each_edges_target_and_source(example):
    site = attnformat.open(example("edge"))["gat"].to_dataset()
    rng = np.random.default_rng(9)
    distance = rng.uniform(0.0, 10.0, size=(6, 6))  # between the graph's 6 nodes
    site["distance"] = xr.DataArray(distance, dims=("query", "key"), attrs={"role": "pairwise", "units": "m"})
    tree = xr.DataTree.from_dict({"/": _root("graph with distances"), "/gat": site})
    stats = attention_statistics(tree, threshold=5.0)
    assert stats.attrs["locality"] == "pairwise 'distance' < 5 m (at each edge's target, source)"
    weights = site["weights"].values.astype(np.float64)
    local = distance[site["target"].values, site["source"].values] < 5.0
    np.testing.assert_allclose(stats["local_global_ratio"].values, weights[..., local].mean(-1) / weights[..., ~local].mean(-1),
                               rtol=1e-12)


def test_ratio_panels_say_what_local_meant(protein, example):
    path, weights, distance = protein
    figure = statistics_boxplots(path, statistics=["local_global_ratio"])
    (ax,) = figure.axes
    assert ax.get_xlabel() == "layer\nlocal: pairwise 'distance' < 8 angstrom, per sample"
    local = distance < 8.0
    per_map = [_ratio(weights[s, 0, h], local[s]) for s in range(SAMPLES) for h in range(HEADS)]
    assert _box_values(ax, 0) == (pytest.approx(min(per_map)), pytest.approx(max(per_map)))
    figure = statistics_boxplots(example("encoder-decoder"), site="decoder/cross", statistics=["local_global_ratio"])
    (ax,) = figure.axes
    assert ax.get_title() == "local/global ratio per map (none)"
    assert "not defined: cross-attention" in ax.texts[0].get_text() and not ax.patches
