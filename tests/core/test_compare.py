"""attnformat.compare against ground truth: the two files' arrays read with zarr itself, and the
Jensen-Shannon divergence of scipy (``jensenshannon(p, q, base=2) ** 2``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from scipy.spatial.distance import jensenshannon

import attnformat
from attnformat.compare import compare, difference, js_divergence
from attnformat.errors import AttnFormatError, SelectionError

LAYERS, HEADS, SAMPLES, TOKENS = 3, 4, 2, 7
LABELS = [["[CLS]", "the", "cat", "sat", "on", "mat", "[SEP]"], ["[CLS]", "a", "dog", "[SEP]", "[PAD]", "[PAD]", "[PAD]"]]
REAL = [7, 4]  # sample 1 is padded after 4 tokens


def _weights(seed: int, *, causal_zeros: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(SAMPLES, LAYERS, HEADS, TOKENS, TOKENS)) * 2
    weights = np.exp(logits)
    if causal_zeros:  # exact zeros above the diagonal in layer 0: 0 log 0 must count as 0
        weights[:, 0] *= np.tril(np.ones((TOKENS, TOKENS)))
    for sample, real in enumerate(REAL):
        weights[sample, ..., real:] = 0.0  # padding keys get no weight
    weights /= weights.sum(axis=-1, keepdims=True)
    return weights.astype(np.float32)


def _write(path, weights: np.ndarray, labels=LABELS, skip_layer: int | None = None):
    mask = np.array([[i < real for i in range(TOKENS)] for real in REAL])
    with attnformat.Writer(path, model_name="toy") as writer:
        site = writer.create_site(
            "encoder/self", sizes={"sample": SAMPLES, "layer": LAYERS, "head": HEADS, "query": TOKENS, "key": TOKENS},
            coords={"query_label": (("sample", "query"), labels), "key_label": (("sample", "key"), labels),
                    "query_mask": (("sample", "query"), mask), "key_mask": (("sample", "key"), mask)})
        for layer in range(LAYERS):
            if layer != skip_layer:
                site.write("weights", weights[:, layer], layer=layer)
    return path


def stored(path) -> np.ndarray:
    """The weights as zarr itself reads them from the file (not through attnformat)."""
    return zarr.open_group(zarr.storage.LocalStore(path, read_only=True), mode="r")["encoder/self/weights"][...]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    a = _write(folder / "a.attn.zarr", _weights(1, causal_zeros=True))
    b = _write(folder / "b.attn.zarr", _weights(2, causal_zeros=False), skip_layer=2)  # layer 2 never captured in B
    return a, b


def _expected_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row JSD with scipy, NaN where a row is padding or absent in either file."""
    expected = np.full(a.shape[:-1], np.nan)
    for sample, layer, head, query in np.ndindex(*a.shape[:-1]):
        real = REAL[sample]
        p, q = a[sample, layer, head, query, :real], b[sample, layer, head, query, :real]
        if query >= real or not (np.isfinite(p).all() and np.isfinite(q).all()):
            continue
        expected[sample, layer, head, query] = jensenshannon(p.astype(np.float64), q.astype(np.float64), base=2) ** 2
    return expected


def test_row_jsd_matches_scipy_and_leaves_out_padding_and_absent_rows(pair):
    a_path, b_path = pair
    a, b = stored(a_path), stored(b_path)
    result = compare(a_path, b_path)
    jsd = result.dataset("encoder/self")["jsd"]
    assert jsd.dims == ("sample", "layer", "head", "query") and jsd.attrs["units"] == "bits"
    expected = _expected_rows(a, b)
    np.testing.assert_allclose(jsd.values, expected, rtol=1e-5, atol=1e-6)  # NaN in the same places
    assert np.isnan(jsd.values[1, :, :, 4:]).all()  # padding rows of sample 1: excluded, not 0
    assert np.isnan(jsd.values[:, 2]).all()  # layer 2 was never captured in B


def test_per_head_summaries_against_independent_arithmetic(pair):
    a_path, b_path = pair
    a, b = stored(a_path).astype(np.float64), stored(b_path).astype(np.float64)
    dataset = compare(a_path, b_path).dataset()
    expected = _expected_rows(a, b)
    for layer, head in np.ndindex(LAYERS, HEADS):
        rows = expected[:, layer, head][np.isfinite(expected[:, layer, head])]
        cells = [np.abs(b[s, layer, head, :REAL[s], :REAL[s]] - a[s, layer, head, :REAL[s], :REAL[s]]) for s in range(SAMPLES)]
        here = dataset.sel(layer=layer, head=head)
        if layer == 2:
            assert int(here["rows"]) == 0 and np.isnan(float(here["mean_jsd"])) and np.isnan(float(here["max_abs_diff"]))
            continue
        assert int(here["rows"]) == sum(REAL) == rows.size
        assert float(here["mean_jsd"]) == pytest.approx(rows.mean(), rel=1e-6)
        assert float(here["max_jsd"]) == pytest.approx(rows.max(), rel=1e-6)
        assert float(here["max_abs_diff"]) == pytest.approx(max(c.max() for c in cells), rel=1e-6)
        l1 = np.concatenate([c.sum(axis=-1) for c in cells])
        assert float(here["mean_l1"]) == pytest.approx(l1.mean(), rel=1e-6)
        assert float(here["max_l1"]) == pytest.approx(l1.max(), rel=1e-6)
        assert float(here["mean_abs_diff"]) == pytest.approx(np.concatenate([c.ravel() for c in cells]).mean(), rel=1e-6)


def test_ranking_is_by_mean_jsd_largest_first_and_absent_heads_last(pair):
    result = compare(*pair)
    dataset = result.dataset()
    ranked = result.top(None)
    assert len(ranked) == LAYERS * HEADS
    order = sorted(((float(dataset["mean_jsd"].sel(layer=l, head=h)), l, h) for l, h in np.ndindex(LAYERS - 1, HEADS)), reverse=True)
    assert [(head["layer"], head["head"]) for head in ranked[: len(order)]] == [(l, h) for _, l, h in order]
    assert all(head["mean_jsd"] is None and head["layer"] == 2 for head in ranked[len(order):])
    assert result.top(3) == ranked[:3]


def test_difference_maps_equal_b_minus_a_read_independently(pair):
    a_path, b_path = pair
    a, b = stored(a_path), stored(b_path)
    lazy = compare(a_path, b_path, maps=True).dataset()["difference"]
    assert lazy.chunks is not None  # lazy until asked
    values = lazy.values
    for sample, real in enumerate(REAL):
        np.testing.assert_array_equal(values[sample, :, :, :, :real], (b - a)[sample, :, :, :, :real])
        assert np.isnan(values[sample, :, :, :, real:]).all()  # padding keys are not compared
    one = difference(a_path, b_path, layer=1, head=3, sample=1)
    np.testing.assert_allclose(one["difference"].values, (b - a)[1, 1, 3, :4, :4], rtol=0, atol=1e-7)
    assert list(one["query_label"].values) == LABELS[1][:4] and one.attrs["selection"] == "sample 1 | layer 1 | head 3"
    np.testing.assert_allclose(one["jsd"].values, _expected_rows(a, b)[1, 1, 3, :4], rtol=1e-5)


def test_identical_files_compare_to_zero(pair):
    dataset = compare(pair[0], pair[0]).dataset()
    assert float(dataset["max_abs_diff"].max()) == 0.0
    assert float(dataset["max_jsd"].max()) == pytest.approx(0.0, abs=1e-12)
    assert int(dataset["rows"].sum()) == LAYERS * HEADS * sum(REAL)


def test_labels_that_differ_are_refused_naming_the_first_difference(pair, tmp_path):
    other = [list(LABELS[0]), list(LABELS[1])]
    other[0][2] = "dog"
    c = _write(tmp_path / "c.attn.zarr", _weights(3, causal_zeros=False), labels=other)
    with pytest.raises(AttnFormatError) as caught:
        compare(pair[0], c)
    message = str(caught.value)
    assert "\n" not in message and "a.attn.zarr" in message and "c.attn.zarr" in message
    assert "query_label differs first at sample 0, query 2: 'cat' (A) vs 'dog' (B)" in message
    assert "allow_label_mismatch=True" in message
    result = compare(pair[0], c, allow_label_mismatch=True)
    assert int(result.dataset()["rows"].sum()) == LAYERS * HEADS * sum(REAL)


def test_shapes_and_sites_that_differ_are_refused(pair, tmp_path):
    steps = attnformat.example_path("steps")
    with pytest.raises(AttnFormatError, match=r"site encoder/self \(holding weights\) is in A only"):
        compare(pair[0], steps)
    with pytest.raises(SelectionError, match=r"no attention site 'encoder/self'"):
        compare(steps, pair[0], site="encoder/self")
    dense = attnformat.example_path("dense")
    with pytest.raises(AttnFormatError, match=r"weights dimensions differ: \(sample=2, layer=3, head=4, query=7, key=7\) vs \(layer=2"):
        compare(pair[0], dense, site="encoder/self")


def test_two_steps_of_one_file(tmp_path):
    path = attnformat.example_path("steps")
    weights = zarr.open_group(zarr.storage.LocalStore(path, read_only=True), mode="r")["trunk/iga/weights"][...]
    steps = list(attnformat.open(path)["trunk/iga"]["step"].values)
    result = compare(path, step_a=steps[0], step_b=steps[2])
    jsd = result.dataset()["jsd"].values
    for layer, head, query in np.ndindex(*jsd.shape):
        expected = jensenshannon(weights[0, layer, head, query].astype(float), weights[2, layer, head, query].astype(float), base=2) ** 2
        assert jsd[layer, head, query] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert result.a.endswith(f"step {steps[0]}") and result.b.endswith(f"step {steps[2]}")
    with pytest.raises(SelectionError, match=r"step 7 not in .*steps: 100, 200, 300"):
        compare(path, step_a=7, step_b=steps[0])


def test_logits_are_compared_without_jsd(tmp_path):
    path = attnformat.example_path("steps")
    logits = zarr.open_group(zarr.storage.LocalStore(path, read_only=True), mode="r")["trunk/iga/logits"][...]
    result = compare(path, step_a=100, step_b=300, variable="logits")
    dataset = result.dataset()
    assert "mean_jsd" not in dataset and "jsd" not in dataset and result.rank_by == "mean_abs_diff"
    assert float(dataset["max_abs_diff"].sel(layer=1, head=0)) == pytest.approx(np.abs(logits[2, 1, 0] - logits[0, 1, 0]).max(), rel=1e-6)
    summary = result.to_dict()
    assert summary["jsd"] is None and summary["rank_by"] == "mean_abs_diff"


def test_json_summary_is_plain_json(pair):
    summary = compare(*pair).to_dict(top=3)
    text = json.dumps(summary, allow_nan=False)  # absent values are null, never NaN
    again = json.loads(text)
    assert again["jsd"]["units"] == "bits" and again["difference"] == "B - A"
    site = again["sites"]["encoder/self"]
    assert site["rows_compared"] == (LAYERS - 1) * HEADS * sum(REAL)
    assert site["rows_excluded"] == LAYERS * HEADS * SAMPLES * TOKENS - site["rows_compared"]
    assert len(site["heads"]) == LAYERS * HEADS and len(again["top"]) == 3


def test_js_divergence_edge_cases_against_a_direct_formula():
    rng = np.random.default_rng(0)
    p, q = rng.random((5, 9)), rng.random((5, 9))
    p[0, :4] = 0.0  # zeros in p only
    p, q = p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True)
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        direct = 0.5 * np.nansum(np.where(p > 0, p * np.log2(p / m), 0), -1) + 0.5 * np.nansum(np.where(q > 0, q * np.log2(q / m), 0), -1)
    np.testing.assert_allclose(js_divergence(p, q), direct, rtol=1e-12)
    assert js_divergence([1.0, 0.0], [0.0, 1.0]) == 1.0  # disjoint rows: 1 bit
    assert np.isnan(js_divergence([0.0, 0.0], [0.5, 0.5]))  # no mass: no divergence, not 0
    assert np.isnan(js_divergence([0.5, -0.1], [0.5, 0.5]))  # not a distribution
    # A NaN cell (absent) leaves that key out of both rows.
    assert float(js_divergence([0.5, 0.5, np.nan], [0.5, 0.5, 0.9])) == 0.0


def test_other_processes_compute_the_same(pair):
    # Tasks that run in other processes (a dask.distributed cluster's workers) get pickled
    # references to the files, never the open stores: the results are the same.
    threads = compare(*pair).to_dict()
    assert compare(*pair, scheduler="processes").to_dict() == threads
    with pytest.raises(AttnFormatError, match=r"scheduler 'nowhere': use threads, processes, synchronous"):
        compare(*pair, scheduler="nowhere")


def _stored_site(path, name) -> dict:
    group = zarr.open_group(zarr.storage.LocalStore(path, read_only=True), mode="r")[name]
    return {key: group[key][...] for key in ("weights", "source", "target")}


def test_graph_attention_rows_are_a_nodes_incoming_edges(tmp_path):
    original = attnformat.example_path("edge")
    tree = attnformat.open(original).load()
    weights = tree["gat"]["weights"].values.astype(np.float64)
    target = tree["gat"].coords["target"].values
    other = weights * np.random.default_rng(5).random(weights.shape)
    for node in np.unique(target):  # renormalise each node's incoming edges (softmax over keys)
        other[..., target == node] /= other[..., target == node].sum(-1, keepdims=True)
    changed = tree.copy()
    changed["gat"] = changed["gat"].to_dataset().assign(weights=(tree["gat"]["weights"].dims, other.astype(np.float32)))
    path = attnformat.save(changed, tmp_path / "other.zarr")
    a, b = _stored_site(original, "gat"), _stored_site(path, "gat")
    result = compare(original, path)
    jsd = result.dataset()["jsd"]
    assert jsd.dims == ("layer", "head", "node")
    for layer, head, node in np.ndindex(*jsd.shape):
        into = b["target"] == node
        expected = jensenshannon(a["weights"][layer, head, into].astype(float), b["weights"][layer, head, into].astype(float), base=2) ** 2
        assert float(jsd[layer, head, node]) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    one = difference(original, path, layer=1, head=0)
    dense = np.full((6, 6), np.nan)
    dense[b["target"], b["source"]] = b["weights"][1, 0].astype(float) - a["weights"][1, 0]
    np.testing.assert_allclose(one["difference"].values, dense, atol=1e-7)  # NaN where no edge
    # Another graph (an edge moved) is refused: edges are compared one to one.
    moved = changed.copy()
    sources = tree["gat"].coords["source"].values.copy()
    sources[0], sources[1] = sources[1], sources[0]
    moved["gat"] = moved["gat"].to_dataset().assign_coords(source=("edge", sources))
    rewired = attnformat.save(moved, tmp_path / "rewired.zarr")
    with pytest.raises(AttnFormatError, match=r"the graphs differ: source at edge 0: 0 \(A\) vs 1 \(B\)"):
        compare(original, rewired)
