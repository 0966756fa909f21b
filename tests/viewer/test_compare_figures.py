"""Comparison figures, checked on what is drawn: the image holds B - A as the files store it, the
scale is symmetric about 0 unless the user's limits win, one visible colorbar, no overlapping
labels at the default size, the JSD grid holds scipy's divergences averaged per head."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from scipy.spatial.distance import jensenshannon

import attnformat
from attnformat.compare import compare
from attnformat.testing.figures import colorbars, drawn_values, overlapping_labels, overlapping_texts
from attnformat.viewer.compare import changed_heads, diff, diff_summary, jsd_grid

TOKENS = 90  # more labels than fit at the default size: they must be thinned, not overlap


def _labels(count: int) -> list[str]:
    return [f"token_{i:03d}_long" for i in range(count)]


def _write(path, seed: int, layers=2, heads=3, tokens=TOKENS):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(layers, heads, tokens, tokens))
    weights = np.exp(logits)
    weights /= weights.sum(-1, keepdims=True)
    with attnformat.Writer(path) as writer:
        site = writer.create_site("encoder/self", sizes={"layer": layers, "head": heads, "query": tokens, "key": tokens},
                                  coords={"query_label": ("query", _labels(tokens)), "key_label": ("key", _labels(tokens))})
        for layer in range(layers):
            site.write("weights", weights[layer], layer=layer)
    return path


def stored(path, variable="encoder/self/weights") -> np.ndarray:
    return zarr.open_group(zarr.storage.LocalStore(path, read_only=True), mode="r")[variable][...]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare-figures")
    return _write(folder / "a.zarr", 1), _write(folder / "b.zarr", 2)


def test_diff_draws_b_minus_a_on_a_symmetric_scale_with_a_colorbar(pair):
    a, b = pair
    expected = stored(b)[1, 2].astype(np.float64) - stored(a)[1, 2]
    ax = diff(a, b, layer=1, head=2)
    np.testing.assert_allclose(drawn_values(ax.images[0]), expected, rtol=0, atol=1e-7)
    bars = colorbars(ax.figure)
    assert len(bars) == 1 and bars[0].ax.get_visible() and bars[0].ax.get_ylabel() == "weights difference (B - A)"
    limit = np.abs(expected).max()
    assert bars[0].norm.vmin == pytest.approx(-limit, rel=1e-6) and bars[0].norm.vmax == pytest.approx(limit, rel=1e-6)
    assert ax.images[0].get_cmap().name.startswith("RdBu_r")
    assert ax.get_title() == "encoder/self | layer 1 | head 2 | weights: b.zarr - a.zarr"


def test_user_limits_and_colormap_win(pair):
    ax = diff(*pair, layer=0, head=0, vmin=-0.01, vmax=0.05, cmap="PuOr")
    norm = ax.images[0].norm
    assert (norm.vmin, norm.vmax) == (-0.01, 0.05)
    assert ax.images[0].get_cmap().name.startswith("PuOr")
    assert colorbars(ax.figure)[0].extend == "both"  # the data pass both user limits: arrows say so
    ax = diff(*pair, layer=0, head=0, figsize=(5.0, 4.0), title="my title")
    assert ax.figure.get_size_inches().tolist() == [5.0, 4.0] and ax.get_title() == "my title"
    assert overlapping_labels(ax.figure) == []  # a small figure the user chose: labels thinned further


def test_labels_never_overlap_at_the_default_size(pair):
    ax = diff(*pair, layer=0, head=1)
    assert overlapping_labels(ax.figure) == []
    assert "every" in ax.get_xlabel() and "every" in ax.get_ylabel()  # thinned, and the axis says so
    assert overlapping_texts(jsd_grid(*pair).figure) == []
    assert overlapping_texts(changed_heads(*pair).figure) == []
    assert overlapping_texts(diff_summary(*pair)) == []


def test_diff_without_layer_and_head_draws_the_most_changed_head(pair):
    a, b = pair
    result = compare(a, b)
    best = result.top(1)[0]
    ax = diff(a, b)
    expected = stored(b)[best["layer"], best["head"]].astype(np.float64) - stored(a)[best["layer"], best["head"]]
    np.testing.assert_allclose(drawn_values(ax.images[0]), expected, atol=1e-7)
    assert "(most changed)" in ax.get_title()


def test_jsd_grid_holds_scipy_divergences_averaged_per_head(pair):
    a, b = pair
    wa, wb = stored(a).astype(np.float64), stored(b).astype(np.float64)
    expected = np.array([[np.mean([jensenshannon(wa[l, h, q], wb[l, h, q], base=2) ** 2 for q in range(TOKENS)])
                          for h in range(3)] for l in range(2)])
    ax = jsd_grid(a, b)
    np.testing.assert_allclose(drawn_values(ax.images[0]), expected, rtol=1e-5)
    assert ax.images[0].norm.vmin == 0.0  # no change at the bottom of the scale
    assert colorbars(ax.figure)[0].ax.get_ylabel() == "mean_jsd [bits]"
    written = sorted(float(t.get_text()) for t in ax.texts)
    np.testing.assert_allclose(written, np.sort(expected.ravel()), rtol=0.05)  # the cell texts say the values


def test_changed_heads_ranks_from_a_computed_comparison(pair):
    result = compare(*pair)
    ax = changed_heads(result, top=4)
    heights = [patch.get_width() for patch in ax.patches]
    assert heights == sorted(heights, reverse=True) and len(heights) == 4
    np.testing.assert_allclose(heights, [head["mean_jsd"] for head in result.top(4)])
    names = [t.get_text() for t in ax.get_yticklabels()]
    assert names[0] == f"encoder/self L{result.top(1)[0]['layer']} H{result.top(1)[0]['head']}"


def test_figures_draw_on_a_given_axes(pair):
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 5))
    assert diff(*pair, layer=0, head=0, ax=axes[0]) is axes[0]
    assert jsd_grid(*pair, ax=axes[1]) is axes[1]


def test_graph_difference_is_drawn_target_by_source(tmp_path):
    original = attnformat.example_path("edge")
    tree = attnformat.open(original).load()
    weights = tree["gat"]["weights"].values
    changed = tree.copy()
    changed["gat"] = changed["gat"].to_dataset().assign(weights=(tree["gat"]["weights"].dims, weights[:, ::-1].copy()))
    path = attnformat.save(changed, tmp_path / "swapped.zarr", check="metadata")
    ax = diff(original, path, layer=0, head=1)
    group = zarr.open_group(zarr.storage.LocalStore(path, read_only=True), mode="r")["gat"]
    expected = np.full((6, 6), np.nan)
    expected[group["target"][...], group["source"][...]] = group["weights"][0, 1].astype(float) - stored(original, "gat/weights")[0, 1]
    np.testing.assert_allclose(drawn_values(ax.images[0]), expected, atol=1e-7)
    assert ax.get_xlabel() == "source node (key)" and ax.get_ylabel() == "target node (query)"
    assert [t.get_text() for t in ax.get_yticklabels()][0] == "sensor 0"


def test_a_long_ranking_in_a_small_figure_thins_its_names(pair):
    result = compare(*pair)
    ax = changed_heads(result, top=6, figsize=(4.5, 1.2))
    assert overlapping_texts(ax.figure) == []
    assert len(ax.patches) == 6 and "every" in ax.get_ylabel()
