"""Torch block reductions (adapters.reductions) against the numpy reference (attnformat.reductions).

The reference works on the weights (softmax in float64); the torch side works on logits block by
block, with keys outside a block's range, masked keys (float32's minimum), causal rows, padding
and rows that see no key at all.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnformat import reductions
from attnformat.adapters.errors import CaptureShapeError
from attnformat.adapters.keep import Keep
from attnformat.adapters.kernel import AttentionCall, WeightsCall
from attnformat.adapters.reductions import RowReducer, Workspace, reduce_call

MIN = torch.finfo(torch.float32).min


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(-1, keepdims=True)


def _case(seed=0, batch=2, heads=3, queries=40, keys=300):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, heads, queries, keys, generator=generator, dtype=torch.float64) * 3
    allowed = torch.ones(batch, 1, queries, keys, dtype=torch.bool)
    allowed[1, :, :, :20] = False  # left padding of sample 1
    allowed &= torch.arange(keys)[None, :] <= torch.arange(queries)[:, None] + (keys - queries)  # causal, bottom-right
    allowed[1, :, 0] = False  # a row that sees no key at all: spread evenly, as eager does
    masked = logits.masked_fill(~allowed, MIN)
    return masked, allowed


@pytest.mark.parametrize("block_rows", [1, 7, 40])
def test_reducer_matches_numpy_reference_on_long_masked_rows(block_rows, reduction_path):
    logits, allowed = _case()
    batch, heads, queries, keys = logits.shape
    weights = _softmax(logits.numpy())
    keep = Keep(dense=True, top_k=8, statistics=True, head_mean=True, local_window=5)
    positions = torch.arange(queries) + keys - queries
    padding = allowed.any(2).any(1)  # (batch, keys): keys some row sees
    first_keys = padding.to(torch.int8).argmax(-1)
    reducer = RowReducer(batch, heads, queries, keys, keep, dense=True, query_positions=positions, first_keys=first_keys)
    workspace = Workspace()
    for start in range(0, queries, block_rows):
        rows = slice(start, min(start + block_rows, queries))
        block = logits[:, :, rows].float()
        # Trim keys that no row of the block sees (as block_logits does), except when a row sees none.
        visible = allowed[:, :, rows]
        first, stop = 0, keys
        if bool(visible.any(-1).all()):
            columns = torch.nonzero(visible.flatten(0, -2).any(0)).flatten()
            first, stop = int(columns[0]), int(columns[-1]) + 1
        reducer.add(rows, block[..., first:stop].contiguous(), first, workspace)
    result = reducer.result()

    np.testing.assert_allclose(result["weights"], weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result["head_mean"], weights.mean(1), rtol=1e-5, atol=1e-6)
    kept, key_index, omitted = reductions.top_k(weights, 8, key_mask=allowed.numpy() | ~allowed.numpy().any(-1, keepdims=True))
    np.testing.assert_allclose(result["topk_weights"], kept, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result["omitted_weight"], omitted, rtol=1e-5, atol=1e-5)
    real = allowed.numpy().any(-1).repeat(heads, 1)  # rows that see some key (the others are ties)
    np.testing.assert_array_equal(result["key_index"][real], key_index[real])
    assert (result["key_index"][0, :, 0] >= 0).sum(-1).tolist() == [8] * heads  # the first row of sample 0 sees 261 keys
    statistics = reductions.row_statistics(weights, local_window=5, query_positions=positions.numpy(), key_mask=padding.numpy()[:, None, None, :])
    for name, values in statistics.items():  # a row that sees no key is padding: its statistics mean nothing
        if name == "top_key":
            np.testing.assert_array_equal(result[name][real], values[real])
        else:
            np.testing.assert_allclose(result[name][real], values[real], rtol=1e-5, atol=1e-5, err_msg=name)


def test_rows_with_fewer_keys_than_k_end_in_nan_and_minus_one(reduction_path):
    call = AttentionCall.from_tensors(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), is_causal=True, site="s")
    result = reduce_call(call, Keep(dense=False, top_k=3), dense=False)
    index, kept = result["key_index"][0], result["topk_weights"][0]
    assert index[:, 0].tolist() == [[0, -1, -1]] * 2  # row 0 sees key 0 only
    assert [sorted(row[:2]) for row in index[:, 1].tolist()] == [[0, 1]] * 2 and (index[:, 1, 2] == -1).all()
    assert (index[:, 2:] >= 0).all()
    assert np.isnan(kept[:, 0, 1:]).all() and np.isnan(kept[:, 1, 2:]).all() and not np.isnan(kept[:, 2:]).any()
    np.testing.assert_allclose(result["omitted_weight"][0, :, :3], 0, atol=1e-6)  # rows 0-2 keep every key they see
    assert (np.diff(kept[:, 2:], axis=-1) <= 0).all()


def test_grouped_query_heads_and_sliding_window_without_a_mask(reduction_path):
    generator = torch.Generator().manual_seed(4)
    query, key = torch.randn(1, 4, 9, 8, generator=generator), torch.randn(1, 2, 9, 8, generator=generator)
    call = AttentionCall.from_tensors(query, key, is_causal=True, sliding_window=3, site="s")
    repeated = key.repeat_interleave(2, dim=1)
    scores = (query @ repeated.transpose(-1, -2)) * 8 ** -0.5
    rows, columns = torch.arange(9)[:, None], torch.arange(9)[None, :]
    scores = scores.masked_fill((columns > rows) | (columns <= rows - 3), MIN)
    expected = torch.softmax(scores, -1)
    np.testing.assert_allclose(call.weights(slice(None)).numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    for rows_per_block in (1, 2, 5):
        result = reduce_call(call, Keep(), dense=True, budget_bytes=rows_per_block * 4 * 9 * 4)
        np.testing.assert_allclose(result["weights"], expected.numpy(), rtol=1e-5, atol=1e-6)


def test_weights_call_ignores_rows_spread_evenly_over_every_key():
    weights = torch.tensor([[[[0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.5, 0.5]]]])
    call = WeightsCall(weights, site="s")
    assert call.key_valid().tolist() == [[False, False, True, True]]
    assert call.first_keys().tolist() == [2]


def test_dense_rows_out_of_range_are_refused():
    call = AttentionCall.from_tensors(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4), site="s")
    with pytest.raises(CaptureShapeError, match="rows"):
        reduce_call(call, Keep(rows=[0, 5]), dense=True)
