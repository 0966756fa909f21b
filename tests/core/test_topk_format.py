"""Top-k sites (spec 1.2, section 10): written by the Writer, read back, densified, validated."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr
import zarr

import attnformat
from attnformat.encoding import map_chunks
from attnformat.errors import WriterError
from attnformat.examples import build, softmax
from attnformat.reductions import densify_topk, top_k


def _causal(rng, shape):
    logits = rng.normal(scale=2.0, size=shape)
    logits = np.where(np.triu(np.ones(shape[-2:], bool), k=1), -np.inf, logits)
    return softmax(logits).astype(np.float32)


def _written(tmp_path, suffix=".zarr", layers=(0, 1)):
    """A topk site of random causal maps (sample 2, layer 2, head 3, 9 tokens, k 4), written layer by layer."""
    weights = _causal(np.random.default_rng(0), (2, 2, 3, 9, 9))
    causal = np.tril(np.ones((9, 9), bool))
    kept, index, omitted = top_k(weights, 4, key_mask=causal)
    words = [f"t{i}" for i in range(9)]
    path = tmp_path / f"topk{suffix}"
    with attnformat.Writer(path, model_name="toy", model_framework="numpy") as writer:
        site = writer.create_site(
            "decoder/self_topk", layout="topk", sizes={"sample": 2, "layer": 2, "head": 3, "query": 9, "key": 9, "rank": 4},
            coords={"query_label": ("query", words), "key_label": ("key", words)},
            attrs={"attention_type": "self", "causal": 1, "describes": "decoder/self"})
        for layer in layers:
            site.write("weights", kept[:, layer], layer=layer)
            site.write("key_index", index[:, layer], layer=layer)
            site.write("omitted_weight", omitted[:, layer], layer=layer)
    return path, weights, (kept, index, omitted)


def test_written_topk_site_reads_back_exactly_and_densifies_to_the_kept_pairs(tmp_path):
    path, weights, (kept, index, omitted) = _written(tmp_path)
    site = attnformat.open(path)["decoder/self_topk"]
    assert site.attrs["layout"] == "topk" and site.attrs["top_k"] == 4 and site.attrs["key_count"] == 9
    assert site["weights"].dims == ("sample", "layer", "head", "query", "rank")
    assert site["omitted_weight"].dims == ("sample", "layer", "head", "query")
    assert site["key_index"].dtype == np.int32 and site["key_label"].dims == ("key",)
    np.testing.assert_array_equal(site["weights"].values, kept)
    np.testing.assert_array_equal(site["key_index"].values, index)
    np.testing.assert_array_equal(site["omitted_weight"].values, omitted)
    dense = densify_topk(site["weights"].values, site["key_index"].values, site.attrs["key_count"])
    for position in np.ndindex(weights.shape[:-1]):
        row, ranks = weights[position], index[position]
        kept_keys = {int(j) for j in ranks if j >= 0}
        # row 0 keeps only key 0; later rows keep min(k, q + 1) keys, the largest ones
        assert len(kept_keys) == min(4, position[-1] + 1)
        for key in range(9):
            if key in kept_keys:
                assert dense[position][key] == row[key]
                assert row[key] >= max((row[j] for j in range(position[-1] + 1) if j not in kept_keys), default=0.0)
            else:
                assert math.isnan(dense[position][key])
        assert omitted[position] == pytest.approx(1.0 - sum(row[j] for j in kept_keys), abs=1e-6)
    report = attnformat.validate(path)
    assert report.ok and report.findings == [], report.format()


def test_topk_site_in_hdf5_validates_and_keeps_int32_indices(tmp_path):
    path, _, (_, index, _) = _written(tmp_path, ".h5")
    site = attnformat.open(path)["decoder/self_topk"]
    assert site["key_index"].dtype == np.int32
    np.testing.assert_array_equal(site["key_index"].values, index)
    assert attnformat.validate(path).ok


def test_rows_never_written_read_as_not_captured_and_are_exempt(tmp_path):
    path, _, _ = _written(tmp_path, layers=(0,))
    site = attnformat.open(path)["decoder/self_topk"]
    assert (site["key_index"].sel(layer=1).values == -1).all() and np.isnan(site["weights"].sel(layer=1).values).all()
    assert np.isnan(site["omitted_weight"].sel(layer=1).values).all()
    report = attnformat.validate(path)  # the small maps share one chunk: no chunk is missing, rows are NaN
    assert report.ok, report.format()


def test_topk_chunks_keep_one_heads_rows_in_one_chunk(tmp_path):
    path, _, _ = _written(tmp_path)
    group = zarr.open_group(str(path / "decoder" / "self_topk"), mode="r")
    assert group["weights"].chunks[-3:] == (3, 9, 4)  # whole rows, every head of a layer together
    assert group["omitted_weight"].chunks[-1] == 9
    # long contexts: one head's 4096 rows of top-32 are one chunk, and rows are never cut
    assert map_chunks(("layer", "head", "query", "rank"), (12, 12, 4096, 32)) == (1, 1, 4096, 32)
    assert map_chunks(("layer", "head", "query"), (12, 12, 4096)) == (2, 12, 4096)  # grouped up to 64 Ki elements
    assert map_chunks(("head", "query", "rank"), (2, 65536, 32)) == (1, 32768, 32)


def test_writer_refuses_topk_sites_it_cannot_describe(tmp_path):
    writer = attnformat.Writer(tmp_path / "x.zarr")
    with pytest.raises(WriterError, match="key_count"):
        writer.create_site("site_a", layout="topk", sizes={"query": 4, "rank": 2})
    with pytest.raises(WriterError, match="top_k is 3"):
        writer.create_site("site_b", layout="topk", sizes={"query": 4, "key": 4, "rank": 2}, attrs={"top_k": 3})
    with pytest.raises(WriterError, match="ATTN-TOPK-001"):
        writer.create_site("site_c", layout="topk", sizes={"query": 4, "key": 4})
    with pytest.raises(WriterError, match="not \\['logits'\\]"):
        writer.create_site("site_d", layout="topk", sizes={"query": 4, "key": 4, "rank": 2}, variables=("weights", "logits"))
    site = writer.create_site("site_e", layout="topk", sizes={"query": 4, "rank": 2}, attrs={"key_count": 10})
    assert site.attrs["key_count"] == 10 and "key" not in site.sizes
    writer.close(complete=False)


def _edited(change) -> xr.DataTree:
    tree = build("topk")
    datasets = {node.path: node.to_dataset(inherit=False) for node in tree.subtree}
    site = datasets["/decoder/self_topk"].copy(deep=True)
    change(site)
    datasets["/decoder/self_topk"] = site
    return xr.DataTree.from_dict(datasets)


def _set(site, name, index, value):
    values = site[name].values.copy()
    values[index] = value
    site[name] = site[name].copy(data=values)


def _drop_rank(site, row, rank):
    """Forget one kept weight of a row, consistently (index -1, its mass omitted), leaving a gap."""
    weight = float(site["weights"].values[row + (rank,)])
    _set(site, "weights", row + (rank,), np.nan)
    _set(site, "key_index", row + (rank,), -1)
    _set(site, "omitted_weight", row, float(site["omitted_weight"].values[row]) + weight)


def _rules(tree) -> set:
    return {f.rule_id for f in attnformat.validate(tree).errors}


def test_the_topk_example_is_what_top_k_gives_for_its_dense_layer():
    tree = build("topk")
    dense, topk = tree["decoder/self"], tree["decoder/self_topk"]
    causal = np.tril(np.ones((8, 8), bool))
    kept, index, omitted = top_k(dense["weights"].values, 3, key_mask=causal)
    np.testing.assert_array_equal(topk["weights"].sel(layer=1).values, kept[0])
    np.testing.assert_array_equal(topk["key_index"].sel(layer=1).values, index[0])
    assert topk.attrs["describes"] == dense.attrs["describes"] == "decoder/self"


@pytest.mark.parametrize(("change", "rule"), [
    (lambda s: _set(s, "key_index", (0, 0, 5, 0), 8), "ATTN-TOPK-002"),       # index == key_count
    (lambda s: _set(s, "key_index", (0, 0, 0, 1), 3), "ATTN-TOPK-002"),       # an index where the weight is NaN
    (lambda s: _set(s, "key_index", (0, 0, 5, 2), -1), "ATTN-TOPK-002"),      # -1 where a weight is kept
    (lambda s: _drop_rank(s, (0, 0, 5), 1), "ATTN-TOPK-003"),                 # a NaN before a kept weight
    (lambda s: _set(s, "omitted_weight", (1, 0, 7), np.nan), "ATTN-TOPK-004"),
    (lambda s: _set(s, "omitted_weight", (1, 0, 7), -0.5), "ATTN-TOPK-004"),
])
def test_validator_finds_each_broken_topk_value(change, rule):
    assert _rules(_edited(change)) == {rule}


def test_omitted_weight_may_not_outweigh_what_the_smallest_kept_weight_allows():
    # Row: key_count 8, kept [0.5, 0.05, 0.05] sums to 0.6 and omitted says 0.4 (the sum is right),
    # but 5 keys left out, none above 0.05, can hold at most 0.25.
    def change(site):
        _set(site, "weights", (0, 0, 7), [0.5, 0.05, 0.05])
        _set(site, "omitted_weight", (0, 0, 7), 0.4)

    assert _rules(_edited(change)) == {"ATTN-TOPK-004"}


def test_masked_query_rows_are_exempt_from_the_mass_rule_like_row_sums():
    def change(site, masked):
        _set(site, "weights", (0, 0, 7), [0.0, 0.0, 0.0])
        _set(site, "omitted_weight", (0, 0, 7), 1.0)  # a padded query: its row holds no weight
        mask = np.ones(8, bool)
        mask[7] = not masked
        site.coords["query_mask"] = ("query", mask)

    assert _rules(_edited(lambda s: change(s, masked=True))) == set()
    assert _rules(_edited(lambda s: change(s, masked=False))) == {"ATTN-TOPK-004"}


@pytest.mark.parametrize(("change", "rule"), [
    (lambda s: s.__setitem__("key_index", s["key_index"].astype("float32")), "ATTN-TOPK-001"),
    (lambda s: s.__delitem__("omitted_weight"), "ATTN-TOPK-001"),
    (lambda s: s.attrs.__setitem__("top_k", 4), "ATTN-TOPK-001"),
    (lambda s: s.attrs.__setitem__("key_count", 0), "ATTN-TOPK-001"),
    (lambda s: s.attrs.__delitem__("key_count"), "ATTN-TOPK-001"),
    (lambda s: s.attrs.__setitem__("key_count", 9), "ATTN-TOPK-001"),  # the key coordinates cover 8
    (lambda s: s.__setitem__("logits", s["weights"]), "ATTN-TOPK-001"),
    (lambda s: s.__delitem__("weights"), "ATTN-SITE-005"),
])
def test_validator_finds_each_broken_topk_structure(change, rule):
    assert rule in _rules(_edited(change))


def test_a_pre_1_2_reader_shape_file_still_validates_and_version_is_1_2():
    assert attnformat.FORMAT_VERSION == "1.2.0"
    tree = build("dense")
    tree.attrs = {**tree.attrs, "attnformat_version": "1.1.0"}
    assert attnformat.validate(tree).ok


def test_kept_weights_on_future_or_masked_keys_break_the_value_rules():
    def future(site):  # row 2 of a causal site keeps key 5, after the query
        _set(site, "key_index", (0, 0, 2, 0), 5)

    assert _rules(_edited(future)) == {"ATTN-VAL-003"}

    def masked(site):
        key_mask = np.ones(8, bool)
        key_mask[int(site["key_index"].values[0, 0, 6, 0])] = False
        site.coords["key_mask"] = ("key", key_mask)

    assert _rules(_edited(masked)) == {"ATTN-VAL-004"}
