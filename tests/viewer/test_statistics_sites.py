"""Statistics sites in the viewer: figures and ``stats`` show the stored per-row statistics.

Ground truth: the statistics computed here from the dense softmax by their definitions (numpy),
and, for "stored, not recomputed", values written into the file that no computation would give.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import xarray as xr
from topk_trees import WORDS, dense_weights, row_statistics, statistics_tree, topk_tree

import attnformat
from attnformat.testing.figures import colorbars, drawn_values, overlapping_labels, overlapping_texts
from attnformat.viewer import (
    attention_statistics,
    format_summary,
    heatmap,
    statistics_overview,
    statistics_profile,
    statistics_summary,
    statistics_table,
    top_key_plot,
)

WINDOW = 2


@pytest.fixture
def weights():
    return dense_weights(layers=2, heads=3, tokens=10, seed=7)


@pytest.fixture
def truth(weights):
    return row_statistics(weights, window=WINDOW)


@pytest.mark.parametrize("statistic", ["entropy", "max_weight", "sink_weight", "local_weight"])
def test_overview_draws_the_row_mean_of_each_layer_and_head(weights, truth, statistic):
    tree = statistics_tree(weights, window=WINDOW, uncaptured_rows=(3,))
    expected = np.delete(truth[statistic], 3, axis=-1).mean(axis=-1)  # (layer, head), row 3 not captured
    np.testing.assert_allclose(statistics_table(tree, statistic).values, expected, rtol=1e-5)
    ax = statistics_overview(tree, statistic)
    np.testing.assert_allclose(drawn_values(ax.images[0]), expected, rtol=1e-5)
    bar = colorbars(ax.figure)[0]
    assert (bar.norm.vmin, bar.norm.vmax) == pytest.approx((expected.min(), expected.max()), rel=1e-5)
    units = "nats" if statistic == "entropy" else "fraction of the row"
    assert bar.ax.get_ylabel().endswith(f"[{units}]\nmean over rows")
    # Each cell's value is written in it (2 decimals), at its (head, layer) position.
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert cells == {(layer, head): f"{expected[layer, head]:.2f}" for layer in range(2) for head in range(3)}
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1"]
    assert overlapping_labels(ax.figure) == [] and overlapping_texts(ax.figure) == []


def test_overview_names_the_window_and_the_chosen_rows(weights, truth):
    tree = statistics_tree(weights, window=WINDOW)
    ax = statistics_overview(tree, "local_weight", queries=["cat", 9])
    expected = truth["local_weight"][..., [2, 9]].mean(axis=-1)
    np.testing.assert_allclose(drawn_values(ax.images[0]), expected, rtol=1e-5)
    assert colorbars(ax.figure)[0].ax.get_ylabel() == (
        f"local weight (|query - key position| <= {WINDOW}) [fraction of the row]\nmean over queries cat, purred")


def test_overview_user_options_win(weights):
    tree = statistics_tree(weights, window=WINDOW)
    ax = statistics_overview(tree, "entropy", vmin=0.0, vmax=math.log(10), cmap="magma", title="mine", figsize=(5, 3),
                             annotate=False)
    bar = colorbars(ax.figure)[0]
    assert (bar.norm.vmin, bar.norm.vmax) == (0.0, pytest.approx(math.log(10)))
    assert ax.images[0].get_cmap().name.startswith("magma") and ax.get_title() == "mine"
    assert ax.figure.get_size_inches().tolist() == [5.0, 3.0] and not ax.texts


def test_top_key_offset_is_query_minus_top_key_position(weights, truth):
    tree = statistics_tree(weights, window=WINDOW)
    offsets = np.arange(10) - truth["top_key"]
    np.testing.assert_allclose(statistics_table(tree, "top_key_offset").values, offsets.mean(axis=-1), rtol=1e-6)
    with pytest.raises(attnformat.SelectionError, match="top_key"):
        statistics_table(tree, "top_key")  # key indices are not averaged


def test_profile_draws_each_row_per_layer_head_mean_by_default(weights, truth):
    tree = statistics_tree(weights, window=WINDOW, uncaptured_rows=(5,))
    ax = statistics_profile(tree, "sink_weight")
    lines = {line.get_label(): line for line in ax.get_lines()}
    for layer in range(2):
        y = lines[f"layer {layer}, mean of 3 heads"].get_ydata()
        expected = truth["sink_weight"][layer].mean(axis=0)
        expected[5] = np.nan
        np.testing.assert_allclose(y, expected, rtol=1e-5, equal_nan=True)
    assert ax.get_xlabel() == "query; gaps: rows not captured"
    assert ax.get_ylabel() == "sink weight (first key) [fraction of the row]"
    assert [t.get_text() for t in ax.get_xticklabels()] == WORDS[:10]
    assert overlapping_labels(ax.figure) == [] and overlapping_texts(ax.figure) == []


def test_profile_of_chosen_heads_and_the_entropy_bound(weights, truth):
    tree = statistics_tree(weights, window=WINDOW)
    ax = statistics_profile(tree, "entropy", layer=1, head=[0, 2], title="t", figsize=(6, 3))
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_allclose(lines["layer 1 head 0"].get_ydata(), truth["entropy"][1, 0], rtol=1e-5)
    np.testing.assert_allclose(lines["layer 1 head 2"].get_ydata(), truth["entropy"][1, 2], rtol=1e-5)
    assert lines["ln 10 (uniform over every key)"].get_ydata()[0] == pytest.approx(math.log(10))
    assert ax.get_title() == "t" and ax.figure.get_size_inches().tolist() == [6.0, 3.0]
    with pytest.raises(attnformat.SelectionError, match="per head"):
        statistics_profile(tree, "top_key_offset")


@pytest.mark.parametrize("offset", [False, True])
def test_top_key_plot_marks_each_rows_argmax(weights, truth, offset):
    tree = statistics_tree(weights, window=WINDOW, uncaptured_rows=(4,))
    ax = top_key_plot(tree, layer=1, offset=offset)
    rows = np.delete(np.arange(10), 4)
    for head, collection in enumerate(ax.collections):
        x, y = collection.get_offsets().T
        np.testing.assert_array_equal(np.round(x).astype(int), rows)
        top = truth["top_key"][1, head, rows]
        np.testing.assert_array_equal(y, rows - top if offset else top)
        assert collection.get_label() == f"head {head}"
    assert ax.get_legend().get_title().get_text() == "3 row(s) not captured"
    assert overlapping_labels(ax.figure) == [] and overlapping_texts(ax.figure) == []
    if not offset:
        assert [t.get_text() for t in ax.get_yticklabels()] == WORDS[:10]


def _statistics_and_topk(weights):
    topk = topk_tree(weights, 4)
    stats = statistics_tree(weights, window=WINDOW)
    return xr.DataTree.from_dict({"/": topk.to_dataset(), "/decoder/self_topk": topk["decoder/self_topk"].to_dataset(),
                                  "/decoder/self_stats": stats["decoder/self_stats"].to_dataset()})


def test_stats_reports_the_stored_statistics_not_recomputed(weights):
    tree = _statistics_and_topk(weights)
    stored = tree["decoder/self_stats"].to_dataset()
    # Values no computation from weights would give: the summary must show them as stored.
    stored["entropy"] = stored["entropy"] * 0 + np.arange(3, dtype=np.float32)[None, :, None]
    tree["decoder/self_stats"] = xr.DataTree(stored)
    summary = statistics_summary(tree)
    entries = summary["sites"]["decoder/self_stats"]
    assert [entry["entropy"] for entry in entries] == [1.0, 1.0]
    assert [head["entropy"] for head in entries[0]["heads"]] == [0.0, 1.0, 2.0]
    truth = row_statistics(weights, window=WINDOW)
    assert entries[1]["sink_weight"] == pytest.approx(truth["sink_weight"][1].mean(), abs=1e-6)
    assert entries[0]["local_weight"] == pytest.approx(truth["local_weight"][0].mean(), abs=1e-6)
    assert entries[0]["max"] == pytest.approx(truth["max_weight"][0].max(), abs=1e-6)
    assert entries[0]["top_key_first"] == pytest.approx(np.mean(truth["top_key"][0] == 0), abs=1e-6)
    assert summary["locality"]["decoder/self_stats"]["window"] == WINDOW
    json.dumps(summary, allow_nan=False)
    text = format_summary(summary)
    assert "stored per-row statistics (mean over captured rows; entropy in nats):" in text
    assert "top-k sites (kept weights, exact; omitted mass as stored):" in text


def test_stats_of_a_top_k_site_reports_exact_figures(weights):
    summary = statistics_summary(_statistics_and_topk(weights), queries=["cat", "purred"])
    entry = summary["sites"]["decoder/self_topk"][1]
    rows = weights[1][..., [2, 9], :]  # (head, 2 rows, key)
    top = np.sort(rows, axis=-1)[..., ::-1][..., :4]
    assert entry["max_weight"] == pytest.approx(rows.max(axis=-1).mean(), abs=1e-6)
    assert entry["kept_weight"] == pytest.approx(top.sum(axis=-1).mean(), abs=1e-6)
    assert entry["omitted_weight"] == pytest.approx((1 - top.sum(axis=-1)).mean(), abs=1e-6)
    assert entry["entropy"] is None and entry["rows"] == 6 and (entry["top_k"], entry["key_count"]) == (4, 10)
    assert summary["queries"] == "queries cat, purred only"


def test_plots_of_whole_maps_refuse_statistics_sites_with_a_hint(weights):
    tree = statistics_tree(weights, window=WINDOW)
    with pytest.raises(attnformat.SelectionError, match="a statistics site: plot kinds statistics-overview"):
        heatmap(tree)
    with pytest.raises(attnformat.SelectionError, match="per-map statistics cannot be computed"):
        attention_statistics(_statistics_and_topk(weights), site="decoder/self_topk")
    with pytest.raises(attnformat.SelectionError, match="not a statistics site"):
        statistics_overview(topk_tree(weights, 4))


def test_command_line_stats_and_plots_of_a_recorded_statistics_file(tmp_path, weights, capsys):
    from attnformat import reductions
    from attnformat.adapters import Recorder
    from attnformat.cli import main

    path = tmp_path / "stats.attn.zarr"
    causal = np.tril(np.ones((10, 10), bool))
    with Recorder(path, model_name="test", model_framework="numpy") as recorder:
        recorder.describe("decoder/self_stats", layout="statistics",
                          attrs={"key_count": 10, "local_window": WINDOW, "causal": 1, "describes": "decoder/self"},
                          query_labels=WORDS[:10], key_labels=WORDS[:10])
        for layer in range(2):
            recorder.log("decoder/self_stats", layer=layer,
                         **reductions.row_statistics(weights[layer].astype(np.float32), local_window=WINDOW, key_mask=causal))
    assert main(["stats", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    truth = row_statistics(weights, window=WINDOW)
    entries = summary["sites"]["decoder/self_stats"]
    for layer in range(2):
        for name in ("entropy", "max_weight", "sink_weight", "local_weight"):
            assert entries[layer][name] == pytest.approx(truth[name][layer].mean(), abs=1e-5)
        heads = [head["entropy"] for head in entries[layer]["heads"]]
        assert heads == pytest.approx(truth["entropy"][layer].mean(axis=-1), abs=1e-5)
    assert main(["stats", str(path)]) == 0
    assert "stored per-row statistics" in capsys.readouterr().out
    for kind, extra in (("statistics-overview", ["--statistic", "sink_weight"]),
                        ("statistics-profile", ["--statistic", "entropy", "--layer", "1"]),
                        ("top-key", ["--layer", "0", "--offset"])):
        out = tmp_path / f"{kind}.svg"
        assert main(["plot", str(path), kind, *extra, "-o", str(out)]) == 0
        assert out.read_text().count("<text") > 10
    assert main(["plot", str(path), "heatmap", "-o", str(tmp_path / "x.png")]) != 0
    assert "a statistics site: plot kinds statistics-overview" in capsys.readouterr().err


def test_batched_files_drop_each_samples_padding(tmp_path):
    """Texts of different lengths in one file (Recorder.samples pads them): each sample shows its own tokens."""
    from attnformat import reductions
    from attnformat.adapters import Recorder
    from attnformat.viewer import topk_heatmap

    lengths, padded = [5, 8, 3], 8
    path = tmp_path / "batch.attn.zarr"
    dense = []
    with Recorder(path, model_name="test", model_framework="numpy") as recorder:
        for offset, length in enumerate(lengths):
            causal = np.tril(np.ones((length, length), bool))
            weights = dense_weights(layers=1, heads=2, tokens=length, seed=offset)[0][None].astype(np.float32)
            dense.append(weights[0])  # (head, query, key)
            labels = np.array([[f"s{offset}t{i}" for i in range(length)]])
            with recorder.samples(offset, total=len(lengths), length=padded):
                for site, layout in (("d/self_topk", "topk"), ("d/self_stats", "statistics")):
                    recorder.describe(site, layout=layout, labels=labels,
                                      attrs={"key_count": length, "local_window": 1, "describes": "d/self"}
                                      if layout == "statistics" else {"key_count": length, "describes": "d/self"})
                kept, index, omitted = reductions.top_k(weights, 3, key_mask=causal)
                recorder.log("d/self_topk", layer=0, weights=kept, key_index=index, omitted_weight=omitted,
                             dims=("sample", "head", "query", "rank"))
                recorder.log("d/self_stats", layer=0, dims=("sample", "head", "query"),
                             **reductions.row_statistics(weights, local_window=1, key_mask=causal))
    assert attnformat.validate(path).ok
    ax = topk_heatmap(path, site="d/self_topk", sample=2, layer=0, head=1)
    expected = np.full((3, 3), np.nan)
    for query in range(3):
        row = dense[2][1, query, : query + 1]
        for key in np.argsort(-row, kind="stable")[:3]:
            expected[query, key] = row[key]
    np.testing.assert_allclose(drawn_values(ax.images[0]), expected, rtol=1e-6, equal_nan=True)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["s2t0", "s2t1", "s2t2"]
    truth = row_statistics(dense[0][None].astype(np.float64), window=1)
    ax = statistics_profile(path, "entropy", site="d/self_stats", sample=0, head=1)
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), truth["entropy"][0, 1], rtol=1e-5)
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"s0t{i}" for i in range(5)]
    ax = top_key_plot(path, site="d/self_stats", sample=0, head=0)
    np.testing.assert_array_equal(ax.collections[0].get_offsets()[:, 1], truth["top_key"][0, 0])
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"s0t{i}" for i in range(5)]
    table = statistics_table(path, "max_weight", site="d/self_stats", sample=1)
    truth = row_statistics(dense[1][None].astype(np.float64), window=1)
    np.testing.assert_allclose(table.values, truth["max_weight"].mean(axis=-1), rtol=1e-5)
    summary = statistics_summary(path)
    assert summary["sites"]["d/self_stats"][0]["rows"] == 2 * sum(lengths)  # padded rows are no rows


def test_generated_rows_are_marked(weights):
    """Prompt + generated tokens (query_generation_step >= 0 from the first generated one): a dashed line there."""
    from attnformat.viewer import topk_heatmap

    steps = np.array([-1] * 6 + [0, 1, 2, 3])
    stats = statistics_tree(weights, window=WINDOW)
    stats["decoder/self_stats"] = xr.DataTree(
        stats["decoder/self_stats"].to_dataset().assign_coords(query_generation_step=("query", steps)))
    ax = statistics_profile(stats, "entropy")
    mark = [line for line in ax.get_lines() if line.get_label() == "generated rows from here"]
    assert len(mark) == 1 and mark[0].get_xdata()[0] == pytest.approx(5.5)
    topk = topk_tree(weights, 4)
    topk["decoder/self_topk"] = xr.DataTree(topk["decoder/self_topk"].to_dataset().assign_coords(
        query_generation_step=("query", steps), key_generation_step=("key", steps)))
    ax = topk_heatmap(topk, layer=0, head=0)
    assert ax.get_ylabel() == "query; generated below the dashed line"
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert sorted(float(line.get_ydata()[0]) for line in dashed if line.get_ydata()[0] == line.get_ydata()[1]) == [5.5]
    assert overlapping_texts(ax.figure) == []
