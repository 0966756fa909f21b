"""attnformat.reductions against the spec's definitions written out row by row in plain Python."""

from __future__ import annotations

import math

import numpy as np
import pytest

from attnformat.examples import softmax
from attnformat.reductions import densify_topk, row_statistics, top_k


def _causal_weights(rng, shape=(2, 3, 7, 7), dtype=np.float32):
    logits = rng.normal(scale=2.0, size=shape)
    logits = np.where(np.triu(np.ones(shape[-2:], bool), k=1), -np.inf, logits)
    return softmax(logits).astype(dtype)


def _rows(array):
    """Every (leading index, row) of an array whose last axis is the row."""
    for index in np.ndindex(array.shape[:-1]):
        yield index, array[index]


def _brute_top_k(row, available, k):
    """Largest available weights, ties to the lower key index, by a Python sort."""
    candidates = sorted((-float(w), j) for j, (w, ok) in enumerate(zip(row, available)) if ok and not math.isnan(w))
    chosen = candidates[:k]
    kept = [-w for w, _ in chosen] + [math.nan] * (k - len(chosen))
    index = [j for _, j in chosen] + [-1] * (k - len(chosen))
    omitted = min(1.0, max(0.0, 1.0 - sum(-w for w, _ in chosen)))
    return kept, index, omitted


@pytest.mark.parametrize("k", [1, 3, 7, 9])
def test_top_k_matches_a_row_by_row_sort_on_causal_maps(k):
    weights = _causal_weights(np.random.default_rng(k))
    causal = np.tril(np.ones(weights.shape[-2:], bool))
    kept, index, omitted = top_k(weights, k, key_mask=causal)
    assert kept.shape == weights.shape[:-1] + (k,) and kept.dtype == np.float32
    assert index.dtype == np.int32 and omitted.shape == weights.shape[:-1]
    for position, row in _rows(weights):
        expected_kept, expected_index, expected_omitted = _brute_top_k(row, causal[position[-1]], k)
        np.testing.assert_array_equal(kept[position], np.array(expected_kept, np.float32))
        assert index[position].tolist() == expected_index
        assert omitted[position] == pytest.approx(expected_omitted, abs=1e-6)


def test_top_k_breaks_ties_towards_the_lower_key_and_respects_a_padding_mask():
    weights = np.array([[0.25, 0.25, 0.25, 0.25], [0.1, 0.4, 0.4, 0.1]])
    kept, index, omitted = top_k(weights, 2, key_mask=np.array([True, True, True, False]))
    assert index.tolist() == [[0, 1], [1, 2]]
    assert kept.tolist() == [[0.25, 0.25], [0.4, 0.4]]
    np.testing.assert_allclose(omitted, [0.5, 0.2])


def test_top_k_rows_not_captured_stay_nan_and_indices_minus_one():
    weights = np.full((2, 3, 3), np.nan)
    weights[0] = np.eye(3)
    kept, index, omitted = top_k(weights, 2)
    assert np.isnan(kept[1]).all() and (index[1] == -1).all() and np.isnan(omitted[1]).all()
    assert index[0, :, 0].tolist() == [0, 1, 2] and omitted[0].tolist() == [0.0, 0.0, 0.0]


def test_top_k_refuses_k_below_one_and_masks_that_do_not_broadcast():
    with pytest.raises(ValueError, match="k must be at least 1"):
        top_k(np.eye(3), 0)
    with pytest.raises(ValueError, match="does not broadcast"):
        top_k(np.eye(3), 1, key_mask=np.ones(4, bool))


def test_densify_puts_kept_weights_in_place_and_nan_elsewhere():
    weights = _causal_weights(np.random.default_rng(5))
    kept, index, _ = top_k(weights, 3, key_mask=np.tril(np.ones(weights.shape[-2:], bool)))
    dense = densify_topk(kept, index, weights.shape[-1])
    assert dense.shape == weights.shape
    for position, row in _rows(weights):
        for key in range(weights.shape[-1]):
            ranks = [r for r in range(3) if index[position][r] == key]
            if ranks:
                assert dense[position][key] == row[key]
            else:
                assert math.isnan(dense[position][key])
    with pytest.raises(ValueError, match="key_count"):
        densify_topk(kept, index, 2)


def _brute_statistics(row, available, window, query_position, key_positions):
    values = [float(w) if ok else 0.0 for w, ok in zip(row, available)]
    entropy = sum(-w * math.log(w) for w in values if w > 0)
    candidates = [(float(w), j) for j, (w, ok) in enumerate(zip(row, available)) if ok]
    best = max(w for w, _ in candidates)
    top = min(j for w, j in candidates if w == best)
    first = next(j for j, ok in enumerate(available) if ok)
    local = sum(w for w, p in zip(values, key_positions) if abs(p - query_position) <= window)
    return {"entropy": entropy, "max_weight": best, "sink_weight": values[first], "local_weight": local, "top_key": top}


@pytest.mark.parametrize("window", [0, 2])
def test_row_statistics_match_their_definitions_row_by_row(window):
    rng = np.random.default_rng(window)
    weights = _causal_weights(rng, shape=(2, 2, 6, 6), dtype=np.float64)
    causal = np.tril(np.ones((6, 6), bool))
    stats = row_statistics(weights, local_window=window, key_mask=causal)
    assert stats["top_key"].dtype == np.int32 and stats["entropy"].dtype == np.float64
    for position, row in _rows(weights):
        expected = _brute_statistics(row, causal[position[-1]], window, position[-1], range(6))
        for name, value in expected.items():
            assert stats[name][position] == pytest.approx(value, abs=1e-12), name


def test_row_statistics_with_positions_of_generated_rows_and_a_padding_mask():
    # Two generated rows (positions 4 and 5) over 6 keys, the last key padding.
    rng = np.random.default_rng(9)
    weights = softmax(rng.normal(size=(2, 6)))
    mask = np.array([True, True, True, True, True, False])
    weights[:, 5] = 0.0
    weights /= weights.sum(axis=-1, keepdims=True)
    stats = row_statistics(weights, local_window=1, query_positions=np.array([4, 5]), key_positions=np.arange(6), key_mask=mask)
    for q, position in enumerate((4, 5)):
        expected = _brute_statistics(weights[q], mask, 1, position, range(6))
        for name, value in expected.items():
            assert stats[name][q] == pytest.approx(value, abs=1e-12), name


def test_row_statistics_sink_is_the_first_unmasked_key_and_rows_not_captured_are_nan():
    weights = np.array([[0.0, 0.7, 0.3], [np.nan, np.nan, np.nan]])
    stats = row_statistics(weights, key_mask=np.array([False, True, True]))
    assert stats["sink_weight"][0] == pytest.approx(0.7)
    assert "local_weight" not in stats
    assert np.isnan(stats["entropy"][1]) and stats["top_key"].tolist() == [1, -1]
    assert row_statistics(np.array([[1.0, 0.0]]))["entropy"][0] == 0.0 and not np.signbit(row_statistics(np.array([[1.0, 0.0]]))["entropy"][0])
