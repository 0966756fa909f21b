"""Recorder.samples(): many texts written batch by batch into one file (spec 1.2 writing API, point 7)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

import attnformat
from attnformat.adapters import Recorder
from attnformat.adapters.errors import CaptureShapeError
from attnformat.errors import AttnFormatError
from attnformat.examples import softmax
from attnformat.reductions import row_statistics, top_k

LENGTHS = [3, 5, 2, 6, 4, 1, 5]  # tokens of 7 texts
TOTAL, BATCH, LENGTH, LAYERS, HEADS = len(LENGTHS), 3, 8, 2, 2


def _batch(offset):
    """One batch as a tokenizer and an eager model give it: padded to the batch's longest text,
    masks, labels, and softmax weights (sample, head, query, key) per layer with padding keys at 0."""
    lengths = LENGTHS[offset:offset + BATCH]
    width = max(lengths)
    mask = np.array([[i < n for i in range(width)] for n in lengths])
    labels = np.array([[f"s{offset + b}t{i}" if i < n else "[PAD]" for i in range(width)] for b, n in enumerate(lengths)], dtype=object)
    rng = np.random.default_rng(offset)
    weights = []
    for _ in range(LAYERS):
        logits = rng.normal(size=(len(lengths), HEADS, width, width))
        logits = np.where(mask[:, None, None, :], logits, -np.inf)
        weights.append(softmax(logits).astype(np.float32))
    return lengths, mask, labels, weights


def _write(path, kinds=("dense",), order=None):
    with Recorder(path, model_name="toy", model_framework="numpy") as recorder:
        for offset in order or range(0, TOTAL, BATCH):
            lengths, mask, labels, weights = _batch(offset)
            with recorder.samples(offset, total=TOTAL, length=LENGTH):
                if "dense" in kinds:
                    recorder.describe("encoder/self", labels=labels, mask=mask)
                if "topk" in kinds:
                    recorder.describe("encoder/self_topk", layout="topk", query_mask=mask, key_mask=mask,
                                      attrs={"key_count": mask.shape[1], "describes": "encoder/self"})
                if "statistics" in kinds:
                    recorder.describe("encoder/self_stats", layout="statistics", query_mask=mask, key_mask=mask,
                                      attrs={"local_window": 1, "describes": "encoder/self"})
                for layer in range(LAYERS):
                    if "dense" in kinds:
                        recorder.log("encoder/self", layer=layer, weights=weights[layer], dims=("sample", "head", "query", "key"))
                    if "topk" in kinds:
                        kept, index, omitted = top_k(weights[layer], 3, key_mask=mask[:, None, None, :])
                        recorder.log("encoder/self_topk", layer=layer, weights=kept, key_index=index, omitted_weight=omitted,
                                     dims=("sample", "head", "query", "rank"))
                    if "statistics" in kinds:
                        stats = row_statistics(weights[layer], local_window=1, key_mask=mask[:, None, None, :])
                        recorder.log("encoder/self_stats", layer=layer, dims=("sample", "head", "query"), **stats)
    return path


def test_dense_batches_land_at_their_samples_padded_with_zeros_and_false_masks(tmp_path):
    path = _write(tmp_path / "many.zarr")
    site = attnformat.open(path)["encoder/self"]
    assert site["weights"].dims == ("sample", "layer", "head", "query", "key")
    assert site["weights"].shape == (TOTAL, LAYERS, HEADS, LENGTH, LENGTH)
    stored, labels, masks = site["weights"].values, site["query_label"].values, site["key_mask"].values
    for offset in range(0, TOTAL, BATCH):
        lengths, mask, batch_labels, weights = _batch(offset)
        width = mask.shape[1]
        for b, n in enumerate(lengths):
            sample = offset + b
            for layer in range(LAYERS):
                np.testing.assert_array_equal(stored[sample, layer, :, :width, :width], weights[layer][b])
            assert (stored[sample, :, :, width:, :] == 0).all() and (stored[sample, :, :, :, width:] == 0).all()
            assert labels[sample].tolist() == batch_labels[b].tolist() + [""] * (LENGTH - width)
            assert masks[sample].tolist() == [i < n for i in range(LENGTH)]
    report = attnformat.validate(path)
    assert report.ok and report.findings == [], report.format()


def test_batches_may_come_in_any_order_and_chunks_align_with_batches(tmp_path):
    in_order = attnformat.open(_write(tmp_path / "a.zarr"))["encoder/self"]
    shuffled = attnformat.open(_write(tmp_path / "b.zarr", order=[6, 3, 0]))["encoder/self"]
    np.testing.assert_array_equal(shuffled["weights"].values, in_order["weights"].values)
    np.testing.assert_array_equal(shuffled["key_mask"].values, in_order["key_mask"].values)
    chunks = zarr.open_group(str(tmp_path / "a.zarr" / "encoder" / "self"), mode="r")["weights"].chunks
    # a batch covers whole chunks, or whole batches make a chunk: no chunk boundary inside a batch
    assert BATCH % chunks[0] == 0 or chunks[0] % BATCH == 0


def test_topk_and_statistics_batches_hold_the_reductions_of_each_sample(tmp_path):
    path = _write(tmp_path / "reduced.zarr", kinds=("topk", "statistics"))
    tree = attnformat.open(path)
    topk, stats = tree["encoder/self_topk"], tree["encoder/self_stats"]
    assert topk.attrs["key_count"] == LENGTH == stats.attrs["key_count"] and topk.attrs["top_k"] == 3
    for offset in range(0, TOTAL, BATCH):
        lengths, mask, _, weights = _batch(offset)
        width = mask.shape[1]
        for b, n in enumerate(lengths):
            sample = offset + b
            for layer in range(LAYERS):
                for head in range(HEADS):
                    for query in range(width):
                        row = weights[layer][b, head, query]
                        order = sorted(range(n), key=lambda j: (-row[j], j))[:3]  # the real keys, largest first
                        index = topk["key_index"].values[sample, layer, head, query]
                        assert index.tolist() == order + [-1] * (3 - len(order))
                        np.testing.assert_array_equal(topk["weights"].values[sample, layer, head, query][:len(order)], row[order])
                        assert stats["top_key"].values[sample, layer, head, query] == order[0]
                        assert stats["sink_weight"].values[sample, layer, head, query] == pytest.approx(row[0])
            # rows of the recorder's own padding are no rows: NaN and -1
            assert np.isnan(topk["weights"].values[sample, :, :, width:]).all()
            assert (topk["key_index"].values[sample, :, :, width:] == -1).all()
            assert np.isnan(stats["entropy"].values[sample, :, :, width:]).all()
            assert (stats["top_key"].values[sample, :, :, width:] == -1).all()
            assert topk["key_mask"].values[sample].tolist() == [i < n for i in range(LENGTH)]
    report = attnformat.validate(path)
    assert report.ok and report.findings == [], report.format()


def test_recorder_writes_masks_for_its_own_padding_when_none_are_described(tmp_path):
    path = tmp_path / "auto.zarr"
    with Recorder(path) as recorder:
        for offset, width in ((0, 3), (2, 5)):
            weights = np.full((2, 1, width, width), 1.0 / width, np.float32)
            with recorder.samples(offset, total=4, length=6):
                recorder.log("self", layer=0, weights=weights, logits=np.zeros_like(weights), dims=("sample", "head", "query", "key"))
    site = attnformat.open(path)["self"]
    assert site["query_mask"].values.tolist() == [[i < w for i in range(6)] for w in (3, 3, 5, 5)]
    assert np.isnan(site["logits"].values[0, 0, 0, 0, 3:]).all() and (site["logits"].values[0, 0, 0, 0, :3] == 0).all()
    assert attnformat.validate(path).ok


def test_samples_refuses_what_would_not_fit(tmp_path):
    recorder = Recorder(tmp_path / "x.zarr")
    weights = np.full((2, 1, 3, 3), 1 / 3, np.float32)
    with pytest.raises(AttnFormatError, match="offset must lie"):
        with recorder.samples(5, total=4):
            pass
    with recorder.samples(0, total=4, length=4):
        with pytest.raises(AttnFormatError, match="do not nest"):
            with recorder.samples(2, total=4):
                pass
        recorder.describe("self", labels=[["a", "b", "c"]] * 2, attrs={"causal": 0})
        recorder.log("self", layer=0, weights=weights, dims=("sample", "head", "query", "key"))
    with recorder.samples(3, total=4, length=4):
        with pytest.raises(CaptureShapeError, match="past total"):
            recorder.log("self", layer=0, weights=weights, dims=("sample", "head", "query", "key"))
    with recorder.samples(2, total=4, length=2):
        with pytest.raises(CaptureShapeError, match="more than the length 2"):
            recorder.log("self", layer=0, weights=weights, dims=("sample", "head", "query", "key"))
    with recorder.samples(2, total=4, length=4):
        with pytest.raises(AttnFormatError, match="attrs= differs"):
            recorder.describe("self", labels=[["d", "e", "f"]] * 2, attrs={"causal": 1})
        recorder.describe("self", labels=[["d", "e", "f"]] * 2, attrs={"causal": 0})
        recorder.log("self", layer=0, weights=weights, dims=("sample", "head", "query", "key"))
    recorder.close()
    site = attnformat.open(tmp_path / "x.zarr")["self"]
    assert site["key_label"].values.tolist() == [["a", "b", "c", ""]] * 2 + [["d", "e", "f", ""]] * 2


def test_lengths_per_site_pad_self_and_cross_attention_and_reduced_sites_follow_describes(tmp_path):
    path = tmp_path / "seq2seq.zarr"
    rng = np.random.default_rng(3)
    lengths = {"encoder/self": 6, "decoder/cross": (4, 6)}
    with Recorder(path) as recorder:
        for offset, (source, target) in ((0, (5, 3)), (2, (6, 4))):
            encoder = softmax(rng.normal(size=(2, 1, source, source))).astype(np.float32)
            cross = softmax(rng.normal(size=(2, 1, target, source))).astype(np.float32)
            with recorder.samples(offset, total=4, length=lengths):
                assert recorder.in_samples
                recorder.describe("encoder/self", positions=np.arange(source))  # (token,): pads to 0..5 every batch
                recorder.log("encoder/self", layer=0, weights=encoder, dims=("sample", "head", "query", "key"))
                recorder.describe("decoder/cross", attrs={"attention_type": "cross"})
                recorder.log("decoder/cross", layer=0, weights=cross, dims=("sample", "head", "query", "key"))
                recorder.describe("encoder/self_stats", layout="statistics", attrs={"key_count": source, "describes": "encoder/self"})
                recorder.log("encoder/self_stats", layer=0, dims=("sample", "head", "query"), **row_statistics(encoder))
        assert not recorder.in_samples
    tree = attnformat.open(path)
    assert tree["encoder/self"]["weights"].shape[-2:] == (6, 6) and tree["decoder/cross"]["weights"].shape[-2:] == (4, 6)
    assert tree["encoder/self"]["key_position"].values.tolist() == list(range(6))
    assert tree["decoder/cross"]["query_mask"].values.tolist() == [[True] * 3 + [False]] * 2 + [[True] * 4] * 2
    assert tree["decoder/cross"]["key_mask"].values.tolist() == [[True] * 5 + [False]] * 2 + [[True] * 6] * 2
    stats = tree["encoder/self_stats"]
    assert stats.attrs["key_count"] == 6 and stats["entropy"].shape[-1] == 6
    assert np.isnan(stats["entropy"].values[:2, ..., 5]).all() and not np.isnan(stats["entropy"].values[2:]).any()
    assert stats["key_mask"].values.tolist() == [[True] * 5 + [False]] * 2 + [[True] * 6] * 2
    assert attnformat.validate(path).ok, attnformat.validate(path).format()


def test_left_padded_causal_rows_with_masked_queries_are_not_judged(tmp_path):
    # A left-padded causal batch: query 0 of sample 1 is padding and sees no key; eager kernels
    # spread such a row over every key. Its query_mask is false, so no value rule judges it.
    weights = np.zeros((2, 1, 3, 3), np.float32)
    for sample, start in ((0, 0), (1, 1)):
        for query in range(3):
            visible = [k for k in range(start, query + 1)]
            if visible:
                weights[sample, 0, query, visible] = 1.0 / len(visible)
            else:
                weights[sample, 0, query] = 1.0 / 3  # uniform over every key, future and padding included
    mask = np.array([[True, True, True], [False, True, True]])
    path = tmp_path / "left.zarr"
    with Recorder(path) as recorder:
        recorder.describe("decoder/self", mask=mask, attrs={"causal": 1})
        recorder.log("decoder/self", layer=0, weights=weights, dims=("sample", "head", "query", "key"))
    assert attnformat.validate(path).ok, attnformat.validate(path).format()
