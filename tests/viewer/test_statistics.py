"""Statistics, top-k pairs, box plots and rollout, against values computed here with numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest

import attnformat
from attnformat.viewer import (
    attention_rollout,
    attention_statistics,
    boxplot_data,
    rollout_map,
    rollout_matrices,
    statistics_boxplots,
    statistics_summary,
    top_pairs,
    top_pairs_plot,
)

from conftest import drawn


def _entropy(weights):
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(weights > 0, -weights * np.log(weights), 0.0)
    return terms.sum(axis=-1).mean(axis=-1)


def test_per_layer_and_head_statistics_match_numpy(example):
    tree = attnformat.open(example("dense"))
    weights = tree["encoder/self"]["weights"].values.astype(np.float64)
    stats = attention_statistics(tree)
    assert stats["mean"].dims == ("layer", "head")
    np.testing.assert_allclose(stats["mean"].values, weights.mean(axis=(-2, -1)))
    np.testing.assert_allclose(stats["std"].values, weights.std(axis=(-2, -1)))
    np.testing.assert_allclose(stats["max"].values, weights.max(axis=(-2, -1)))
    np.testing.assert_allclose(stats["min"].values, weights.min(axis=(-2, -1)))
    np.testing.assert_allclose(stats["entropy"].values, _entropy(weights))
    profile = weights.mean(axis=-2)
    np.testing.assert_allclose(stats["sink_score"].values, profile[..., 0] - profile[..., 1:-1].mean(axis=-1))
    positions = np.arange(6)
    local = np.abs(positions[:, None] - positions[None, :]) <= 2
    np.testing.assert_allclose(stats["local_global_ratio"].values,
                               weights[..., local].mean(axis=-1) / weights[..., ~local].mean(axis=-1))


def test_local_global_ratio_uses_the_distance_when_stored(example):
    tree = attnformat.open(example("steps"))
    stats = attention_statistics(tree)
    weights = tree["trunk/iga"]["weights"].sel(step=300, layer=0, head=1).values.astype(np.float64)
    local = tree["trunk/iga"]["distance"].values < 8.0
    expected = weights[local].mean() / weights[~local].mean()
    assert stats["local_global_ratio"].sel(step=300, layer=0, head=1).item() == pytest.approx(expected)


def test_padding_is_left_out_of_statistics(example):
    tree = attnformat.open(example("padded-batch"))
    stats = attention_statistics(tree)
    real = tree["encoder/self"]["weights"].isel(sample=1, layer=0, head=0).values[:3, :3].astype(np.float64)
    assert stats["mean"].isel(sample=1, layer=0, head=0).item() == pytest.approx(real.mean())


def test_summary_has_seed_001_fields_per_site_and_layer(example):
    summary = statistics_summary(example("encoder-decoder"))
    json.dumps(summary, allow_nan=False)
    tree = attnformat.open(example("encoder-decoder"))
    for site in ("encoder/self", "decoder/self", "decoder/cross"):
        for layer, entry in enumerate(summary["sites"][site]):
            values = tree[site]["weights"].sel(layer=layer).values.astype(np.float64)
            assert {"layer", "type", "mean", "std", "min", "max", "shape", "entropy", "sink_score", "heads"} <= set(entry)
            assert entry["layer"] == layer and entry["shape"] == list(values.shape)
            assert entry["type"] == ("cross_attention" if site == "decoder/cross" else "self_attention")
            assert entry["mean"] == pytest.approx(values.mean(), abs=1e-6)
            assert entry["std"] == pytest.approx(values.std(), abs=1e-6)
            assert entry["max"] == pytest.approx(values.max(), abs=1e-6)
            assert [h["head"] for h in entry["heads"]] == [0, 1]
    edge = statistics_summary(example("edge"))["sites"]["gat"][0]
    assert edge["sink_score"] is None and edge["shape"] == [2, 22]


def test_box_plots_across_samples_and_heads(example):
    stats = attention_statistics(example("padded-batch"))
    layers, groups = boxplot_data(stats, "max")
    assert layers == ["0"] and len(groups[0]) == 4  # 2 samples x 2 heads
    figure = statistics_boxplots(example("image"))
    # softmax: the mean per map is 1/17 by construction, drawn as a labelled constant (issue 9 point 4)
    assert [ax.get_title() for ax in figure.axes] == ["max per map", "mean per map (constant)", "entropy per map"]
    image_stats = attention_statistics(example("image"))
    horizontal = [line.get_ydata()[0] for line in figure.axes[0].lines
                  if len(line.get_ydata()) == 2 and line.get_ydata()[0] == line.get_ydata()[1]]
    for layer in (0, 1):  # each layer's median line is among the box's horizontal lines
        median = np.median(image_stats["max"].isel(layer=layer).values)
        assert any(value == pytest.approx(median) for value in horizontal)


def test_top_pairs_like_seed_001(example):
    tree = attnformat.open(example("dense"))
    mean = tree["encoder/self"]["weights"].sel(layer=0).values.mean(axis=0)
    pairs = top_pairs(tree, k=3, layer=0)
    flat = np.argsort(mean.ravel())[::-1][:3]
    assert [(p["query"], p["key"]) for p in pairs] == [divmod(int(i), 6) for i in flat]
    assert pairs[0]["value"] == pytest.approx(mean.max())
    ax = top_pairs_plot(tree, k=3, layer=0)
    assert sorted(bar.get_width() for bar in ax.patches) == pytest.approx(sorted(p["value"] for p in pairs))
    labels = tree["encoder/self"]["query_label"].values
    top = max(zip(ax.get_yticks(), ax.get_yticklabels()), key=lambda tick: tick[0])[1]  # largest pair on top
    assert top.get_text() == f"{labels[pairs[0]['query']]} -> {labels[pairs[0]['key']]}"


def test_rollout_averages_heads_adds_identity_renormalises_multiplies(example):
    tree = attnformat.open(example("dense"))
    weights = tree["encoder/self"]["weights"].values.astype(np.float64)
    expected = np.eye(6)
    for layer in range(2):
        matrix = weights[layer].mean(axis=0) + np.eye(6)
        matrix /= matrix.sum(axis=-1, keepdims=True)
        expected = matrix @ expected
    np.testing.assert_allclose(attention_rollout(tree).values, expected, rtol=1e-6)
    np.testing.assert_allclose(drawn(rollout_map(tree)), expected, rtol=1e-6)
    np.testing.assert_allclose(rollout_matrices(weights.mean(axis=1), residual=False),
                               weights[1].mean(axis=0) @ weights[0].mean(axis=0), rtol=1e-6)


def test_layer_ratio_is_the_ratio_of_local_and_global_means(example):
    tree = attnformat.open(example("steps"))
    weights = tree["trunk/iga"]["weights"].sel(layer=1).values.astype(np.float64)  # (step, head, query, key)
    local = tree["trunk/iga"]["distance"].values < 8.0
    entry = statistics_summary(tree)["sites"]["trunk/iga"][1]
    local_mean, global_mean = weights[..., local].mean(), weights[..., ~local].mean()
    assert entry["local_mean"] == pytest.approx(local_mean, abs=1e-6)
    assert entry["global_mean"] == pytest.approx(global_mean, abs=1e-6)
    assert entry["local_global_ratio"] == pytest.approx(local_mean / global_mean, rel=1e-4)
    head = entry["heads"][0]
    assert head["local_global_ratio"] == pytest.approx(weights[:, 0][..., local].mean() / weights[:, 0][..., ~local].mean(), rel=1e-4)
