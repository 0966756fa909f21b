"""Small trees with top-k and statistics sites, built by hand with numpy and xarray as the spec says
(spec 1.2.0: ``layout="topk"`` and ``layout="statistics"``), for the viewer's tests.

Everything here is computed independently of attnformat's own reductions: the top-k rows by a
stable argsort of the dense softmax, the statistics by their definitions.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from attnformat.examples import _root, softmax

WORDS = ["<s>", "the", "cat", "sat", "on", "the", "warm", "mat", "and", "purred", "loud", "ly"]


def dense_weights(layers=2, heads=3, tokens=10, *, causal=True, seed=0) -> np.ndarray:
    """Softmax weights (layer, head, query, key) of random logits, causal by default."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(layers, heads, tokens, tokens))
    if causal:
        logits = np.where(np.triu(np.ones((tokens, tokens), bool), k=1), -np.inf, logits)
    return softmax(logits)


def top_k_rows(weights: np.ndarray, k: int, *, causal=True):
    """(kept weights, key_index, omitted) of each row's k largest weights; NaN/-1 past the row's keys."""
    *lead, queries, keys = weights.shape
    kept = np.full((*lead, queries, k), np.nan)
    index = np.full((*lead, queries, k), -1, dtype=np.int32)
    omitted = np.zeros((*lead, queries))
    for position in np.ndindex(*lead, queries):
        row = weights[position]
        available = position[-1] + 1 if causal else keys
        order = np.argsort(-row[:available], kind="stable")[:k]
        kept[position][: order.size] = row[order]
        index[position][: order.size] = order
        omitted[position] = max(0.0, 1.0 - row[order].sum())
    return kept, index, omitted


def topk_tree(weights: np.ndarray, k: int, *, causal=True, site="decoder/self_topk", labels=WORDS,
              uncaptured_rows=(), key_mask=None) -> xr.DataTree:
    """A one-site tree holding the top-k layout of ``weights`` (layer, head, query, key)."""
    kept, index, omitted = top_k_rows(weights, k, causal=causal)
    for row in uncaptured_rows:  # rows never captured: NaN weights, -1 indices, NaN omitted
        kept[..., row, :] = np.nan
        index[..., row, :] = -1
        omitted[..., row] = np.nan
    layers, heads, queries, keys = weights.shape
    dims = ("layer", "head", "query", "rank")
    coords = {"layer": np.arange(layers), "head": np.arange(heads),
              "query_label": ("query", np.array(labels[:queries], dtype=object)),
              "key_label": ("key", np.array(labels[:keys], dtype=object)),
              "key_position": ("key", np.arange(keys))}
    if key_mask is not None:
        coords["key_mask"] = ("key", np.asarray(key_mask, dtype=bool))
    data = {"weights": (dims, kept.astype(np.float32)), "key_index": (dims, index),
            "omitted_weight": (dims[:-1], omitted.astype(np.float32))}
    attrs = {"layout": "topk", "normalization": "softmax", "normalized_dim": "key", "attention_type": "self",
             "causal": int(causal), "top_k": k, "key_count": keys, "describes": "decoder/self"}
    return xr.DataTree.from_dict({"/": _root("top-k test tree"), f"/{site}": xr.Dataset(data, coords=coords, attrs=attrs)})


def row_statistics(weights: np.ndarray, *, window: int, causal=True) -> dict:
    """entropy, max_weight, sink_weight, local_weight, top_key of every row, by their definitions."""
    queries, keys = weights.shape[-2:]
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(weights > 0, weights * np.log(weights), 0.0).sum(axis=-1)
    local = np.abs(np.arange(queries)[:, None] - np.arange(keys)[None, :]) <= window
    return {"entropy": entropy, "max_weight": weights.max(axis=-1), "sink_weight": weights[..., 0],
            "local_weight": np.where(local, weights, 0.0).sum(axis=-1),
            "top_key": weights.argmax(axis=-1).astype(np.int32)}


def statistics_tree(weights: np.ndarray, *, window=2, site="decoder/self_stats", labels=WORDS, uncaptured_rows=(),
                    names=("entropy", "max_weight", "sink_weight", "local_weight", "top_key")) -> xr.DataTree:
    """A one-site tree holding the per-row statistics of ``weights`` (layer, head, query, key)."""
    stats = row_statistics(weights, window=window)
    layers, heads, queries, keys = weights.shape
    data = {}
    for name in names:
        values = stats[name].copy()
        for row in uncaptured_rows:
            values[..., row] = -1 if name == "top_key" else np.nan
        values = values.astype(np.int32 if name == "top_key" else np.float32)
        data[name] = (("layer", "head", "query"), values, {"role": "per_query"})
    coords = {"layer": np.arange(layers), "head": np.arange(heads),
              "query_label": ("query", np.array(labels[:queries], dtype=object)),
              "query_position": ("query", np.arange(queries)),
              "key_label": ("key", np.array(labels[:keys], dtype=object)),
              "key_position": ("key", np.arange(keys))}
    attrs = {"layout": "statistics", "normalization": "softmax", "normalized_dim": "key", "attention_type": "self",
             "causal": 1, "key_count": keys, "local_window": window, "describes": "decoder/self"}
    return xr.DataTree.from_dict({"/": _root("statistics test tree"), f"/{site}": xr.Dataset(data, coords=coords, attrs=attrs)})
