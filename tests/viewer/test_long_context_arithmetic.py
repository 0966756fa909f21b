"""The cheaper arithmetic of the 12 x 12 x 2048 report (issue 9, point 8) gives the values of the
textbook numpy steps, bit for bit: head means read map by map, display pooling, the rollout, the
explorer's layer means and the statistics' shared local masks. Each is checked against numpy
written out here (not against the viewer's own output), on maps with and without NaN."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr

import attnformat
from attnformat.examples import _root, softmax
from attnformat.viewer import attention_rollout, select, statistics_summary
from attnformat.viewer.explorer.payload import _read_layer
from attnformat.viewer.rollout import rollout_matrices
from attnformat.viewer.selection import block_pool
import attnformat.viewer.selection as selection

LAYERS, HEADS, TOKENS = 3, 4, 40


def _tree(weights):
    labels = [f"t{i}" for i in range(weights.shape[-1])]
    site = xr.Dataset({"weights": (("layer", "head", "query", "key"), weights)},
                      coords={"layer": np.arange(weights.shape[0]), "head": np.arange(weights.shape[1]),
                              "query_label": ("query", np.array(labels, dtype=object)),
                              "key_label": ("key", np.array(labels, dtype=object))},
                      attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key",
                             "attention_type": "self", "causal": 0})
    return xr.DataTree.from_dict({"/": _root("arithmetic", model_name="m"), "/encoder/self": site})


@pytest.fixture(scope="module", params=["finite", "with-nan"])
def stored(request, tmp_path_factory):
    """A file and its weights; "with-nan" has rows of one head not captured (NaN) and one NaN cell."""
    rng = np.random.default_rng(11)
    weights = softmax(rng.normal(scale=2.0, size=(LAYERS, HEADS, TOKENS, TOKENS))).astype(np.float32)
    weights[weights < 1e-3] = 0.0  # exact zeros, as real files have
    if request.param == "with-nan":
        weights[1, 2, 5:9, :] = np.nan
        weights[2, 0, 3, 7] = np.nan
    path = attnformat.save(_tree(weights), tmp_path_factory.mktemp("arith") / "w.zarr", check="metadata")
    return path, weights


@pytest.fixture
def streamed(monkeypatch):
    """Head means read map by map, as for a 12 x 2048^2 layer (the small test file would be read whole)."""
    monkeypatch.setattr(selection, "_STREAM_ELEMENTS", 1)


@pytest.mark.parametrize("how", ["mean", "max"])
def test_a_head_reduction_read_map_by_map_is_numpy_s_nan_reduction(stored, streamed, how):
    path, weights = stored
    for layer in range(LAYERS):
        got = select(path, layer=layer, head=how).values
        wide = weights[layer].astype(np.float64)
        with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning) if np.isnan(wide).all(axis=0).any() else _nothing():
            expected = (np.nanmean if how == "mean" else np.nanmax)(wide, axis=0)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected.astype(np.float32))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("shape, factor", [((4, 2048, 2048), 3), ((3, 50, 37), 7), ((5, 5), 2), ((2, 9, 9), 3), ((6, 8), 4)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_display_pooling_is_numpy_s_nanmean_of_the_nan_padded_blocks(shape, factor, dtype):
    rng = np.random.default_rng(5)
    values = (rng.random(shape) ** 4).astype(dtype)
    rows, cols = shape[-2:]
    padded_rows, padded_cols = math.ceil(rows / factor) * factor, math.ceil(cols / factor) * factor
    padded = np.full(shape[:-2] + (padded_rows, padded_cols), np.nan, dtype=np.float32 if (padded_rows, padded_cols) != (rows, cols) else dtype)
    padded[..., :rows, :cols] = values
    blocks = padded.reshape(shape[:-2] + (padded_rows // factor, factor, padded_cols // factor, factor))
    expected = np.nanmean(blocks, axis=(-3, -1))
    got = block_pool(values, factor)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)
    values[..., 0, 0] = np.nan  # a NaN: numpy's nanmean itself
    padded[..., 0, 0] = np.nan
    np.testing.assert_array_equal(block_pool(values, factor), np.nanmean(blocks, axis=(-3, -1)))


def _textbook_rollout(layers, residual=True):
    layers = np.nan_to_num(np.asarray(layers, dtype=np.float64))
    size = layers.shape[-1]
    result = np.eye(size)
    for weights in layers:
        if residual:
            weights = weights + np.eye(size)
        totals = weights.sum(axis=-1, keepdims=True)
        weights = np.divide(weights, totals, out=np.zeros_like(weights), where=totals > 0)
        result = weights @ result
    return result


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("count", [1, 2, 4])
def test_rollout_is_the_textbook_product_bit_for_bit(residual, count):
    rng = np.random.default_rng(count)
    layers = rng.random((count, 30, 30)).astype(np.float32)
    layers[layers < 0.3] = 0.0
    layers[0, 1, :] = np.nan  # a row not captured
    layers[-1, 0, :] = 0.0  # a row that sums to 0
    layers[0, 2, 1] = -0.0
    got = rollout_matrices(layers, residual=residual)
    expected = _textbook_rollout(layers, residual)
    np.testing.assert_array_equal(got, expected)
    assert np.array_equal(np.signbit(got), np.signbit(expected))
    signed = layers.copy()
    signed[0, 3, 4] = -0.5  # negative weights: the first factor is the literal product
    np.testing.assert_array_equal(rollout_matrices(signed, residual=residual), _textbook_rollout(signed, residual))


def test_the_rollout_of_a_file_is_the_textbook_product_of_its_head_means(stored, streamed):
    path, weights = stored
    means = []
    for layer in range(LAYERS):
        with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning) if np.isnan(weights[layer]).all(axis=0).any() else _nothing():
            means.append(np.nanmean(weights[layer].astype(np.float64), axis=0).astype(np.float32))
    np.testing.assert_array_equal(attention_rollout(path).values, _textbook_rollout(np.stack(means)))


def test_the_explorer_s_layer_maps_and_head_mean_are_the_file_s_maps_and_their_nan_mean(stored, monkeypatch):
    import attnformat.viewer.explorer.payload as payload

    monkeypatch.setattr(payload, "_LAYER_READ_ELEMENTS", 1)  # map by map, as for a 12 x 2048^2 layer
    path, weights = stored
    node = attnformat.open(path)["encoder/self"]
    for layer in range(LAYERS):
        maps = _read_layer(node, "weights", 0, 0, layer, list(range(HEADS)), True)
        for head in range(HEADS):
            np.testing.assert_array_equal(maps[head], weights[layer, head])
        stack = weights[layer].astype(np.float64)
        present = np.isfinite(stack)
        with np.errstate(invalid="ignore", divide="ignore"):
            expected = np.where(present.any(axis=0), np.where(present, stack, 0.0).sum(axis=0) / present.sum(axis=0), np.nan)
        np.testing.assert_array_equal(maps["mean"], expected)


def test_statistics_with_local_masks_shared_between_tasks_are_numpy_s(stored, monkeypatch):
    from attnformat import compute
    import attnformat.viewer.statistics as statistics

    # One map per task and blocks of 7 rows: every task reuses the masks of the blocks it shares.
    monkeypatch.setattr(compute, "TASK_BYTES", TOKENS * TOKENS * 4)
    monkeypatch.setattr(statistics, "_BLOCK_ELEMENTS", 7 * TOKENS)
    path, weights = stored
    entries = statistics_summary(path, progress=False)["sites"]["encoder/self"]
    positions = np.arange(TOKENS)
    window = np.abs(positions[:, None] - positions[None, :]) <= statistics.LOCAL_WINDOW  # a sequence's token window
    printed = 1e-6  # the summary rounds to 6 decimals
    for entry in entries:
        for head in entry["heads"]:
            values = weights[entry["layer"], head["head"]].astype(np.float64)
            finite = np.isfinite(values)
            assert head["max"] == pytest.approx(values[finite].max(), abs=printed)
            assert head["mean"] == pytest.approx(values[finite].mean(), abs=printed)
            rows = values[finite.any(axis=-1)]
            with np.errstate(divide="ignore", invalid="ignore"):
                entropy = -np.where(rows > 0, rows * np.log(rows), 0.0).sum(axis=-1)
            assert head["entropy"] == pytest.approx(entropy.mean(), abs=printed)
            assert head["local_mean"] == pytest.approx(values[window & finite].mean(), abs=printed)
            assert head["global_mean"] == pytest.approx(values[~window & finite].mean(), abs=printed)


@pytest.mark.parametrize("shape, side", [((2048, 2048), 977), ((300, 211), 100), ((50, 37), 8), ((64, 64), 4), ((40, 90), 9)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("missing", [False, True])
def test_the_explorer_s_pooled_maps_are_numpy_s_block_sums(shape, side, dtype, missing):
    from attnformat.viewer.explorer.payload import pool_map

    rng = np.random.default_rng(7)
    values = (rng.random(shape) ** 6).astype(dtype)
    values[values < 1e-3] = 0.0
    if missing:
        values[rng.random(shape) < 0.1] = np.nan
        values[:3, :4] = np.nan
    pooled, pool_q, pool_k = pool_map(values, side)
    rows, cols = shape
    assert (pool_q, pool_k) == (math.ceil(rows / side), math.ceil(cols / side))
    present = np.isfinite(values)
    row_starts, col_starts = np.arange(0, rows, pool_q), np.arange(0, cols, pool_k)
    total = np.add.reduceat(np.add.reduceat(np.where(present, values, 0.0), col_starts, axis=1, dtype=np.float64),
                            row_starts, axis=0)
    count = np.add.reduceat(np.add.reduceat(present, col_starts, axis=1, dtype=np.int64), row_starts, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.where(count > 0, total / count, np.nan)
    np.testing.assert_array_equal(pooled, expected)


@pytest.mark.parametrize("case", ["finite", "nan", "constant", "empty"])
def test_the_explorer_s_8_bit_codes_are_the_rounded_affine_codes(case):
    import base64

    from attnformat.viewer.explorer.payload import encode_map

    rng = np.random.default_rng(2)
    values = rng.random((60, 45)) ** 3
    if case == "nan":
        values[4, :] = np.nan
        values[7, 9] = np.inf
    elif case == "constant":
        values[...] = 0.25
    elif case == "empty":
        values[...] = np.nan
    encoded = encode_map(values)
    codes = np.frombuffer(base64.b64decode(encoded["q"]), dtype=np.uint8).reshape(values.shape)
    finite = np.isfinite(values)
    assert (codes[~finite] == 255).all()
    if case == "empty":
        assert encoded["min"] is None and encoded["scale"] == 0.0
        return
    low, high = values[finite].min(), values[finite].max()
    assert (encoded["offset"], encoded["min"], encoded["max"]) == (low, low, high)
    if high > low:
        scale = (high - low) / 254
        assert encoded["scale"] == scale
        np.testing.assert_array_equal(codes[finite], np.clip(np.rint((values[finite] - low) / scale), 0, 254))
    else:
        assert (codes[finite] == 0).all()
