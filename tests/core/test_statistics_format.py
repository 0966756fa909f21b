"""Statistics sites, head means and generation coordinates (spec 1.2, sections 7, 11, 12)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr

import attnformat
from attnformat.errors import WriterError
from attnformat.examples import build, softmax
from attnformat.reductions import row_statistics


def _causal(rng, shape):
    logits = rng.normal(scale=2.0, size=shape)
    logits = np.where(np.triu(np.ones(shape[-2:], bool), k=1), -np.inf, logits)
    return softmax(logits).astype(np.float32)


def test_written_statistics_site_reads_back_the_statistics_of_each_row(tmp_path):
    weights = _causal(np.random.default_rng(1), (3, 4, 10, 10))  # layer, head, query, key
    path = tmp_path / "stats.zarr"
    with attnformat.Writer(path, model_name="toy", model_framework="numpy") as writer:
        site = writer.create_site("decoder/self_stats", layout="statistics", sizes={"layer": 3, "head": 4, "query": 10, "key": 10},
                                  variables=("entropy", "max_weight", "sink_weight", "local_weight", "top_key"),
                                  attrs={"local_window": 1, "causal": 1, "attention_type": "self", "describes": "decoder/self"})
        for layer in range(3):
            stats = row_statistics(weights[layer], local_window=1, key_mask=np.tril(np.ones((10, 10), bool)))
            for name, values in stats.items():
                site.write(name, values, layer=layer)
    stored = attnformat.open(path)["decoder/self_stats"]
    assert stored.attrs["key_count"] == 10 and stored.attrs["local_window"] == 1
    assert stored["top_key"].dtype == np.int32 and stored["entropy"].dims == ("layer", "head", "query")
    for position in np.ndindex(weights.shape[:-1]):
        row = weights[position].astype(np.float64)
        query = position[-1]
        assert stored["entropy"].values[position] == pytest.approx(sum(-w * math.log(w) for w in row if w > 0), abs=1e-5)
        assert stored["max_weight"].values[position] == pytest.approx(row.max(), abs=1e-7)
        assert stored["top_key"].values[position] == int(np.argmax(row))
        assert stored["sink_weight"].values[position] == pytest.approx(row[0], abs=1e-7)
        assert stored["local_weight"].values[position] == pytest.approx(row[max(0, query - 1):query + 2].sum(), abs=1e-6)
    report = attnformat.validate(path)
    assert report.ok and report.findings == [], report.format()


def test_writer_asks_for_what_a_statistics_site_needs(tmp_path):
    writer = attnformat.Writer(tmp_path / "x.zarr")
    with pytest.raises(WriterError, match="name the statistics"):
        writer.create_site("site_a", layout="statistics", sizes={"query": 4, "key": 4})
    with pytest.raises(WriterError, match="ATTN-STAT-003"):
        writer.create_site("site_b", layout="statistics", sizes={"query": 4, "key": 4}, variables=("local_weight",))
    with pytest.raises(WriterError, match="key_count"):
        writer.create_site("site_c", layout="statistics", sizes={"query": 4}, variables=("entropy",))
    with pytest.raises(WriterError, match="ATTN-STAT-001"):
        writer.create_site("site_d", layout="statistics", sizes={"query": 4, "key": 4}, variables=("entropy", "weights"))
    writer.close(complete=False)


def _edited(example: str, site_path: str, change) -> xr.DataTree:
    tree = build(example)
    datasets = {node.path: node.to_dataset(inherit=False) for node in tree.subtree}
    site = datasets[site_path].copy(deep=True)
    changed = change(site)  # a function that edits in place returns None
    site = site if changed is None else changed
    datasets[site_path] = site
    return xr.DataTree.from_dict(datasets)


def _set(site, name, index, value):
    values = site[name].values.copy()
    values[index] = value
    site[name] = site[name].copy(data=values)


def _stats_rules(change) -> set:
    return {f.rule_id for f in attnformat.validate(_edited("statistics", "/decoder/self_stats", change)).errors}


@pytest.mark.parametrize(("name", "value"), [
    ("entropy", math.log(8) + 0.01), ("entropy", -0.01), ("max_weight", 1.01), ("max_weight", 1 / 8 - 0.01),
    ("sink_weight", -0.01), ("local_weight", 1.01), ("top_key", 8), ("top_key", -2),
])
def test_validator_finds_each_statistic_out_of_its_range(name, value):
    def change(site):
        if name == "max_weight" and value < 0.5:  # keep sink <= max: only the lower bound breaks
            _set(site, "sink_weight", (0, 0, 7), 0.0)
        _set(site, name, (0, 0, 7), value)

    assert _stats_rules(change) == {"ATTN-STAT-002"}


def test_sink_weight_above_max_weight_and_masked_rows_exemption():
    assert _stats_rules(lambda s: _set(s, "sink_weight", (1, 1, 5), float(s["max_weight"].values[1, 1, 5]) + 0.05)) == {"ATTN-STAT-002"}

    def padded_query(site, masked):
        _set(site, "max_weight", (0, 0, 7), 0.0)  # a padded query's row holds no weight
        _set(site, "sink_weight", (0, 0, 7), 0.0)
        site.coords["query_mask"] = ("query", np.arange(8) != 7 if masked else np.ones(8, bool))

    assert _stats_rules(lambda s: padded_query(s, True)) == set()
    assert _stats_rules(lambda s: padded_query(s, False)) == {"ATTN-STAT-002"}


def test_rows_not_captured_are_exempt():
    def change(site):
        for name in ("entropy", "max_weight", "sink_weight", "local_weight"):
            _set(site, name, (2,), np.nan)
        _set(site, "top_key", (2,), -1)

    assert _stats_rules(change) == set()


@pytest.mark.parametrize(("change", "rule"), [
    (lambda s: s.assign(top_key=s["top_key"].astype("float32")), "ATTN-STAT-001"),
    (lambda s: s.assign(entropy=s["entropy"].astype("int32")), "ATTN-STAT-001"),
    (lambda s: s.assign(entropy=s["entropy"].transpose("head", "layer", "query")), "ATTN-STAT-001"),
    (lambda s: s.assign(weights=(("layer", "head", "query", "key"), np.zeros((3, 4, 8, 8), np.float32))), "ATTN-STAT-001"),
    (lambda s: s.assign_attrs(key_count=9), "ATTN-STAT-001"),
    (lambda s: s.drop_vars(["entropy", "max_weight", "sink_weight", "local_weight", "top_key"]), "ATTN-SITE-005"),
    (lambda s: s.assign_attrs(local_window=-1), "ATTN-STAT-003"),
    (lambda s: s.assign_attrs(local_window=1.5), "ATTN-STAT-003"),
])
def test_validator_finds_each_broken_statistics_structure(change, rule):
    assert rule in _stats_rules(change)


def test_head_means_are_the_mean_over_heads_and_keep_no_head_dimension():
    tree = build("head-mean")
    site = tree["encoder/self_mean"]
    assert "head" not in site["weights"].dims and site.attrs["head_reduction"] == "mean"
    np.testing.assert_allclose(site["weights"].values.sum(axis=-1), 1.0, atol=1e-6)
    assert attnformat.validate(tree).ok

    def with_head(dataset):
        return dataset.assign(weights=dataset["weights"].expand_dims(head=[0], axis=1))

    rules = {f.rule_id for f in attnformat.validate(_edited("head-mean", "/encoder/self_mean", with_head)).errors}
    assert rules == {"ATTN-SITE-009"}


def test_generation_coordinates_are_checked():
    tree = build("generation")
    site = tree["decoder/self"]
    assert site["query_generation_step"].values.tolist() == [-1, -1, -1, 0, 1, 2]
    assert site["query_token"].values[0, 2] == "Ġcat" and site["query_label"].values[0, 2] == " cat"
    assert attnformat.validate(tree).ok

    def rules(change):
        return {f.rule_id for f in attnformat.validate(_edited("generation", "/decoder/self", change)).errors}

    assert rules(lambda s: s.assign_coords(query_token=(("sample", "query"), np.zeros((2, 6), np.int64)))) == {"ATTN-COORD-006"}
    assert rules(lambda s: s.assign_coords(key_generation_step=s["key_generation_step"].astype("float64"))) == {"ATTN-COORD-006"}
    assert rules(lambda s: s.assign_coords(key_generation_step=("layer", [0, 1]))) == {"ATTN-COORD-006"}
