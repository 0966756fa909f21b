"""Reference reductions of dense attention: top-k per row, row statistics, and back to dense.

These are the spec's definitions written as numpy (spec sections "Top-k layout" and
"Statistics layout"): what a ``topk`` or ``statistics`` site holds for a dense map. They favour
being obviously right over being fast (a stable sort per row), and they are what the adapters'
block-wise torch reductions are tested against. Every function takes weights whose last two axes
are (query, key) and any leading axes (sample, layer, head...).

Conventions shared by all of them:

* a key is *available* to a row when its weight is not NaN and ``key_mask`` (broadcast against
  the weights) is true there. Pass a (query, key) mask to make future keys of a causal map
  unavailable (``np.tril(np.ones((n, n), bool))``);
* a row whose weights are all NaN was not captured: its results are NaN (and -1 for indices);
* ties are broken towards the lower key index (a stable order), so results are deterministic.
"""

from __future__ import annotations

import numpy as np

__all__ = ["densify_topk", "row_statistics", "top_k"]


def _available(weights: np.ndarray, key_mask) -> np.ndarray:
    available = ~np.isnan(weights)
    if key_mask is not None:
        mask = np.asarray(key_mask, dtype=bool)
        try:
            available &= np.broadcast_to(mask, weights.shape)
        except ValueError:
            raise ValueError(f"key_mask of shape {mask.shape} does not broadcast against weights of shape {weights.shape}") from None
    return available


def _as_weights(weights) -> np.ndarray:
    weights = np.asarray(weights)
    if weights.ndim < 2:
        raise ValueError(f"weights need (query, key) as their last axes; got shape {weights.shape}")
    if weights.dtype.kind != "f":
        weights = weights.astype(np.float64)
    return weights


def top_k(weights, k: int, key_mask=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``k`` largest weights of every query row, their key indices, and the mass left out.

    Parameters
    ----------
    weights
        Array (..., query, key) of attention weights (softmax rows); NaN marks what was not
        captured.
    k
        How many weights to keep per row (the size of the ``rank`` dimension), at least 1.
    key_mask
        Boolean array broadcastable against ``weights``: false keys are not available to a row
        (padding as (..., key); future keys of a causal map as (query, key)). Default: every
        key not NaN is available.

    Returns
    -------
    kept : numpy.ndarray
        (..., query, k), the weights' dtype: the row's largest available weights, non-increasing
        along the last axis (ties: lower key index first); NaN beyond the row's available keys
        (fewer than ``k``) and for rows not captured.
    key_index : numpy.ndarray
        (..., query, k) int32: the key index of each kept weight; -1 where ``kept`` is NaN.
    omitted_weight : numpy.ndarray
        (..., query), the weights' dtype: ``1 - sum(kept)`` computed in float64 and clipped to
        [0, 1]; NaN for rows not captured.

    Examples
    --------
    >>> import numpy as np
    >>> weights = np.array([[1.0, 0.0, 0.0], [0.5, 0.2, 0.3]])
    >>> kept, index, omitted = top_k(weights, 2, key_mask=np.tril(np.ones((2, 3), bool)))
    >>> kept.tolist(), index.tolist(), omitted.round(6).tolist()
    ([[1.0, nan], [0.5, 0.2]], [[0, -1], [0, 1]], [0.0, 0.3])
    """
    weights = _as_weights(weights)
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    available = _available(weights, key_mask)
    captured = ~np.all(np.isnan(weights), axis=-1)
    keys = weights.shape[-1]
    score = np.where(available, weights.astype(np.float64), -np.inf)
    # A stable sort of the negated scores: largest first, equal weights by lower key index.
    order = np.argsort(-score, axis=-1, kind="stable")[..., :k]
    chosen = np.take_along_axis(score, order, axis=-1)
    present = np.isfinite(chosen)
    kept64 = np.where(present, chosen, np.nan)
    index = np.where(present, order, -1).astype(np.int32)
    if k > keys:  # more ranks than keys: the extra ranks hold nothing
        width = [(0, 0)] * (weights.ndim - 1) + [(0, k - keys)]
        kept64 = np.pad(kept64, width, constant_values=np.nan)
        index = np.pad(index, width, constant_values=-1)
    omitted = np.clip(1.0 - np.nansum(kept64, axis=-1), 0.0, 1.0)
    omitted = np.where(captured, omitted, np.nan)
    kept64[~captured] = np.nan
    index[~captured] = -1
    return kept64.astype(weights.dtype), index, omitted.astype(weights.dtype)


def row_statistics(weights, local_window: int | None = None, query_positions=None, key_positions=None, key_mask=None) -> dict[str, np.ndarray]:
    """Per-query-row statistics of attention weights, as a statistics site stores them.

    Parameters
    ----------
    weights
        Array (..., query, key) of attention weights; NaN marks what was not captured.
    local_window
        Keys with ``|key_position - query_position| <= local_window`` are local; ``None``
        leaves ``local_weight`` out.
    query_positions, key_positions
        Integer positions broadcastable against (..., query) and (..., key) (default: the
        indices 0..n-1), e.g. the positions of generated rows in a growing sequence.
    key_mask
        Boolean array broadcastable against ``weights``: false keys are not available (they
        are never the maximum, the sink or local; their weight, 0 in a valid map, does not
        count).

    Returns
    -------
    dict
        ``entropy`` (nats, ``-sum w ln w`` over positive weights), ``max_weight``,
        ``sink_weight`` (the weight on the row's first available key; key 0 without a mask),
        ``local_weight`` (with ``local_window``), each (..., query) in the weights' float dtype,
        and ``top_key`` (..., query) int32, the key of the largest weight (lowest index on ties).
        Rows not captured (all NaN) or without available keys give NaN and -1.

    Examples
    --------
    >>> import numpy as np
    >>> stats = row_statistics(np.array([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]), local_window=0)
    >>> stats["top_key"].tolist(), stats["sink_weight"].tolist(), stats["local_weight"].tolist()
    ([0, 2], [0.5, 0.1], [0.5, 0.2])
    >>> round(float(stats["entropy"][0]), 4)  # ln 2 / 2 + 2 * ln 4 / 4
    1.0397
    """
    weights = _as_weights(weights)
    available = _available(weights, key_mask)
    has_key = available.any(axis=-1)
    values = np.where(available, weights.astype(np.float64), 0.0)
    positive = values > 0
    # Each term w ln(1/w) is >= 0, so a row with one weight of 1 gives 0.0 (not -0.0).
    entropy = np.sum(np.where(positive, values * -np.log(np.where(positive, values, 1.0)), 0.0), axis=-1)
    score = np.where(available, weights.astype(np.float64), -np.inf)
    top = np.argmax(score, axis=-1)  # first maximum: the lowest key index on ties
    max_weight = np.take_along_axis(score, top[..., None], axis=-1)[..., 0]
    first = np.argmax(available, axis=-1)
    sink = np.take_along_axis(values, first[..., None], axis=-1)[..., 0]
    result = {"entropy": entropy, "max_weight": max_weight, "sink_weight": sink}
    if local_window is not None:
        window = int(local_window)
        if window < 0:
            raise ValueError(f"local_window must be a non-negative integer, not {local_window}")
        queries, keys = weights.shape[-2], weights.shape[-1]
        query = np.arange(queries) if query_positions is None else np.asarray(query_positions)
        key = np.arange(keys) if key_positions is None else np.asarray(key_positions)
        distance = np.abs(key[..., None, :].astype(np.int64) - query[..., :, None].astype(np.int64))
        local = np.broadcast_to(distance <= window, weights.shape)
        result["local_weight"] = np.sum(np.where(local, values, 0.0), axis=-1)
    for name, value in result.items():
        result[name] = np.where(has_key, value, np.nan).astype(weights.dtype)
    result["top_key"] = np.where(has_key, top, -1).astype(np.int32)
    return result


def densify_topk(weights, key_index, key_count: int) -> np.ndarray:
    """The dense map a top-k site describes: kept weights in place, every other pair NaN.

    Absent pairs are NaN, not 0: the site does not say what they were (only that together they
    hold ``omitted_weight`` and that none exceeds the smallest kept weight).

    Parameters
    ----------
    weights
        (..., query, rank) kept weights (NaN where nothing is kept).
    key_index
        (..., query, rank) integer key indices (-1 where nothing is kept).
    key_count
        Number of keys: the size of the result's last axis.

    Returns
    -------
    numpy.ndarray
        (..., query, key_count) in the weights' dtype.

    Examples
    --------
    >>> import numpy as np
    >>> densify_topk(np.array([[0.7, 0.2]]), np.array([[2, 0]]), 4).tolist()
    [[0.2, nan, 0.7, nan]]
    """
    weights = _as_weights(weights)
    index = np.asarray(key_index)
    if index.shape != weights.shape:
        raise ValueError(f"key_index has shape {index.shape}, weights {weights.shape}; they must match")
    key_count = int(key_count)
    kept = (index >= 0) & ~np.isnan(weights)
    if np.any(index[kept] >= key_count):
        raise ValueError(f"key_index holds indices >= key_count ({key_count})")
    dense = np.full(weights.shape[:-1] + (key_count,), np.nan, dtype=weights.dtype)
    rows = np.nonzero(kept)
    dense[rows[:-1] + (index[kept],)] = weights[kept]
    return dense
