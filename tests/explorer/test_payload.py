"""The explorer's payload against the files' own arrays (read independently with xarray through
attnformat.open): every embedded map decodes to the file's values within its stated max_error,
NaN and padding are code 255, labels, groups and key_site labels are the file's, pooled cells are
the block means of the file's array, and the size budget holds."""

from __future__ import annotations

import base64
import math
import zlib

import numpy as np
import pytest
import xarray as xr

import attnformat
from attnformat.examples import FORMAT_NAME, FORMAT_VERSION
from attnformat.viewer.explorer import build_payload, decode_map, encode_map, pool_map, render_page
from attnformat.viewer.explorer.payload import ABSENT, MIN_SIDE, map_key


def _dense_truth(site, variable, key_parts):
    """The map a key names, read from the file with xarray; padding rows/columns NaN."""
    sample, step, layer, head = key_parts
    array = site[variable]
    picks = {dim: index for dim, index in (("sample", sample), ("step", step), ("layer", layer)) if dim in array.dims}
    array = array.isel(picks)
    if "head" in array.dims:
        values = np.asarray(array.values, dtype=np.float64)
        if head == "mean":
            with _quiet():
                values = np.nanmean(values, axis=array.dims.index("head"))
        else:
            values = np.take(values, head, axis=array.dims.index("head"))
    else:
        values = np.asarray(array.values, dtype=np.float64)
    values = values.copy()
    for dim, axis in (("query", 0), ("key", 1)):
        mask = f"{dim}_mask"
        if mask in site.coords:
            real = site.coords[mask]
            real = np.asarray(real.isel(sample=sample).values if "sample" in real.dims else real.values, dtype=bool)
            if axis == 0:
                values[~real, :] = np.nan
            else:
                values[:, ~real] = np.nan
    return values


class _quiet:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)


def _codes(encoded):
    """The uint8 codes of an encoded map, inflated with zlib (not the module's decoder) when deflated."""
    data = base64.b64decode(encoded["q"])
    if encoded.get("compression") == "deflate":
        data = zlib.decompress(data)
    assert len(data) == encoded["rows"] * encoded["cols"]
    return np.frombuffer(data, dtype=np.uint8).reshape(encoded["rows"], encoded["cols"])


def _parse(key):
    variable, sample, step, layer, head = key.split("/")
    head = head[1:]
    return variable, (int(sample[1:]), int(step[1:]), int(layer[1:]), "mean" if head == "mean" else int(head))


def _assert_close(decoded, truth, encoded):
    truth = np.where(np.isfinite(truth), truth, np.nan)
    assert decoded.shape == truth.shape
    np.testing.assert_array_equal(np.isnan(decoded), np.isnan(truth))
    finite = ~np.isnan(truth)
    if finite.any():
        error = np.abs(decoded[finite] - truth[finite]).max()
        assert error <= encoded["max_error"] * (1 + 1e-9) + 1e-12
    codes = _codes(encoded)
    assert ((codes == ABSENT) == ~finite).all()
    # the codes themselves, not only decode_map: value = offset + scale * q
    values = encoded["offset"] + encoded["scale"] * codes.astype(np.float64)
    np.testing.assert_array_equal(np.where(codes == ABSENT, np.nan, values), decoded)


@pytest.mark.parametrize("name", ["dense", "padded-batch", "encoder-decoder", "steps", "image", "frames", "head-mean",
                                  "generation"])
def test_dense_maps_equal_the_files_arrays(name):
    path = attnformat.example_path(name)
    tree = attnformat.open(path)
    payload = build_payload(path, samples=None)
    assert payload["format"] == "attnformat-explorer" and payload["version"] == 1
    checked = 0
    for site in payload["sites"]:
        node = tree[site["name"]]
        assert site["maps"], site["name"]
        for key, encoded in site["maps"].items():
            variable, parts = _parse(key)
            if "head" not in node[variable].dims:
                assert parts[3] in ("mean", 0)
            _assert_close(decode_map(encoded), _dense_truth(node, variable, parts), encoded)
            checked += 1
        # every layer and head of the first sample, and the head mean
        heads = node.sizes.get("head", 0)
        per_layer = heads + (1 if heads > 1 or node.attrs.get("head_reduction") == "mean" else 0) or 1
        steps = node.sizes.get("step", 1)
        assert len(site["maps"]) == node.sizes.get("layer", 1) * steps * per_layer
    assert checked


def test_padding_is_code_255_and_other_samples():
    path = attnformat.example_path("padded-batch")
    node = attnformat.open(path)["encoder/self"]
    payload = build_payload(path, samples=[0, 1])
    site = payload["sites"][0]
    encoded = site["maps"][map_key("weights", 1, 0, 0, 0)]
    codes = _codes(encoded)
    real = node.coords["key_mask"].values[1]
    assert (codes[:, ~real] == ABSENT).all() and (codes[~real, :] == ABSENT).all()
    assert (codes[np.ix_(real, real)] != ABSENT).all()
    assert site["key_mask"][1] == [int(v) for v in real] and site["key_mask"][0] is None
    assert site["query_labels"][1] == [str(v) for v in node.coords["query_label"].values[1]]


def test_labels_groups_and_key_site():
    path = attnformat.example_path("encoder-decoder")
    tree = attnformat.open(path)
    sites = {site["name"]: site for site in build_payload(path)["sites"]}
    cross = sites["decoder/cross"]
    node = tree["decoder/cross"]
    assert cross["key_site"] == "encoder/self"
    assert cross["query_labels"][0] == [str(v) for v in node.coords["query_label"].values]
    assert cross["key_labels"][0] == [str(v) for v in tree["encoder/self"].coords["query_label"].values]
    groups = node.coords["key_group"].values
    runs = cross["groups"]["key"]
    assert runs[0]["start"] == 0 and runs[-1]["stop"] == len(groups)
    for run in runs:
        assert {str(g) for g in groups[run["start"]:run["stop"]]} == {run["name"]}
    for before, after in zip(runs, runs[1:]):
        assert before["stop"] == after["start"] and str(groups[after["start"] - 1]) != str(groups[after["start"]])


def test_generation_groups_from_generation_steps():
    path = attnformat.example_path("generation")
    node = attnformat.open(path)["decoder/self"]
    site = build_payload(path)["sites"][0]
    steps = np.asarray(node.coords["query_generation_step"].values)
    steps = steps[0] if steps.ndim == 2 else steps
    first = int(np.flatnonzero(steps >= 0)[0])
    assert site["groups"]["query"] == [{"name": "prompt", "start": 0, "stop": first},
                                       {"name": "generated", "start": first, "stop": len(steps)}]


def test_edge_maps_are_densified_from_the_files_edges():
    path = attnformat.example_path("edge")
    node = attnformat.open(path)["gat"]
    site = build_payload(path)["sites"][0]
    assert site["layout"] == "edges"
    source, target = node["source"].values, node["target"].values
    nodes = node.sizes["node"]
    weights = node["weights"].values  # (layer, head, edge)
    for layer in range(node.sizes["layer"]):
        for head in range(node.sizes["head"]):
            truth = np.full((nodes, nodes), np.nan)
            truth[target, source] = weights[layer, head]
            encoded = site["maps"][map_key("weights", 0, 0, layer, head)]
            _assert_close(decode_map(encoded), truth, encoded)
    assert site["query_labels"][0] == [str(v) for v in node.coords["node_label"].values]


def test_topk_maps_are_densified_from_key_index():
    path = attnformat.example_path("topk")
    node = attnformat.open(path)["decoder/self_topk"]
    site = {s["name"]: s for s in build_payload(path)["sites"]}["decoder/self_topk"]
    weights, index = node["weights"].values, node["key_index"].values  # (layer, head, query, rank)
    keys = int(node.attrs.get("key_count", node.sizes.get("key")))
    for layer in range(node.sizes["layer"]):
        for head in range(node.sizes["head"]):
            truth = np.full((node.sizes["query"], keys), np.nan)
            for query in range(node.sizes["query"]):
                for rank in range(weights.shape[-1]):
                    if np.isfinite(weights[layer, head, query, rank]) and index[layer, head, query, rank] >= 0:
                        truth[query, index[layer, head, query, rank]] = weights[layer, head, query, rank]
            encoded = site["maps"][map_key("weights", 0, 0, layer, head)]
            _assert_close(decode_map(encoded), truth, encoded)


def test_encode_map_edge_cases():
    constant = encode_map(np.full((2, 3), 0.25))
    assert decode_map(constant).tolist() == [[0.25] * 3] * 2 and constant["max_error"] == 0
    empty = encode_map(np.full((2, 2), np.nan))
    assert set(base64.b64decode(empty["q"])) == {ABSENT} and empty["min"] is None and empty["compression"] is None
    squeezed = encode_map(np.zeros((64, 64)), compress=True)
    assert squeezed["compression"] == "deflate" and len(squeezed["q"]) < 100 and (decode_map(squeezed) == 0).all()
    logits = np.array([[1.5, -np.inf], [-2.0, 0.0]])
    encoded = encode_map(logits)
    codes = list(base64.b64decode(encoded["q"]))
    assert codes[1] == ABSENT and codes[0] == 254 and codes[2] == 0
    assert encoded["offset"] == -2.0 and math.isclose(encoded["scale"], 3.5 / 254)
    with pytest.raises(ValueError):
        encode_map(np.zeros(3))


def test_pool_map_is_the_block_mean_of_the_array():
    rng = np.random.default_rng(0)
    values = rng.random((50, 37))
    values[rng.random(values.shape) < 0.2] = np.nan
    values[:8, :5] = np.nan  # a block with no value stays absent
    pooled, pool_q, pool_k = pool_map(values, 8)
    assert (pool_q, pool_k) == (7, 5) and pooled.shape == (8, 8)
    for row in range(pooled.shape[0]):
        for col in range(pooled.shape[1]):
            block = values[row * pool_q:(row + 1) * pool_q, col * pool_k:(col + 1) * pool_k]
            if np.isnan(block).all():
                assert np.isnan(pooled[row, col])
            else:
                assert math.isclose(pooled[row, col], np.nanmean(block), rel_tol=1e-12)
    same, one, other = pool_map(values, 64)
    assert same is values and (one, other) == (1, 1)


def _write_dense(path, *, layers, heads, tokens, samples=None, labels=None, causal=False):
    rng = np.random.default_rng(1)
    sizes = {"layer": layers, "head": heads, "query": tokens, "key": tokens}
    if samples:
        sizes = {"sample": samples, **sizes}
    logits = rng.normal(scale=2.0, size=tuple(sizes.values()))
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    weights = (weights / weights.sum(axis=-1, keepdims=True)).astype(np.float32)
    labels = labels if labels is not None else [f"tok{i}" for i in range(tokens)]
    coords = {"layer": np.arange(layers), "head": np.arange(heads),
              "query_label": ("query", np.array(labels, dtype=object)),
              "key_label": ("key", np.array(labels, dtype=object))}
    site = xr.Dataset({"weights": (tuple(sizes), weights)}, coords=coords,
                      attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key",
                             "attention_type": "self", "causal": int(causal)})
    root = xr.Dataset(attrs={"attnformat": FORMAT_NAME, "attnformat_version": FORMAT_VERSION,
                             "producer": "attnformat tests", "completeness": "complete", "model_framework": "numpy"})
    attnformat.save(xr.DataTree.from_dict({"/": root, "/encoder/self": site}), path)
    return path


@pytest.fixture(scope="module")
def file_6x12x128(tmp_path_factory):
    return _write_dense(tmp_path_factory.mktemp("explorer") / "bert.zarr", layers=6, heads=12, tokens=128)


def test_size_budget_6x12x128_under_2mb_with_every_map(file_6x12x128):
    payload = build_payload(file_6x12x128)
    site = payload["sites"][0]
    assert len(site["maps"]) == 6 * 13 and payload["budget"]["omitted"] == [] and payload["budget"]["pooled_to"] is None
    assert all(m["rows"] == 128 and m["cols"] == 128 and m["pool_q"] == 1 for m in site["maps"].values())
    assert payload["budget"]["used_bytes"] == sum(len(m["q"]) for m in site["maps"].values())
    page = render_page(payload)
    size = len(page.encode("utf-8"))
    print(f"6 x 12 x 128 page: {size / 1e6:.3f} MB, {128 * 128} bytes per map "
          f"({len(site['maps'][map_key('weights', 0, 0, 0, 0)]['q'])} characters deflated and base64)")
    assert size < 2_000_000
    node = attnformat.open(file_6x12x128)["encoder/self"]
    for key in (map_key("weights", 0, 0, 5, 11), map_key("weights", 0, 0, 2, "mean")):
        _, parts = _parse(key)
        _assert_close(decode_map(site["maps"][key]), _dense_truth(node, "weights", parts), site["maps"][key])


def test_over_budget_maps_are_pooled_means_then_left_out(file_6x12x128):
    node = attnformat.open(file_6x12x128)["encoder/self"]
    payload = build_payload(file_6x12x128, max_bytes=600_000)
    budget, site = payload["budget"], payload["sites"][0]
    assert budget["used_bytes"] <= 600_000 and budget["pooled_to"] is not None and budget["omitted"] == []
    assert len(site["maps"]) == 6 * 13
    encoded = site["maps"][map_key("weights", 0, 0, 4, 7)]
    pool_q, pool_k = encoded["pool_q"], encoded["pool_k"]
    assert pool_q > 1 and encoded["pool"] == "mean"
    truth = np.asarray(node["weights"].values[4, 7], dtype=np.float64)
    blocks = np.array([[truth[r:r + pool_q, c:c + pool_k].mean() for c in range(0, 128, pool_k)]
                       for r in range(0, 128, pool_q)])
    _assert_close(decode_map(encoded), blocks, encoded)
    # Below MIN_SIDE a side, maps are left out instead, and the payload says which.
    max_bytes = 20 * 4 * math.ceil(MIN_SIDE * MIN_SIDE / 3)
    small = build_payload(file_6x12x128, max_bytes=max_bytes)
    kept = small["sites"][0]["maps"]
    assert 20 <= small["budget"]["maps"] < 6 * 13 and small["budget"]["used_bytes"] <= max_bytes
    assert all(max(m["rows"], m["cols"]) <= MIN_SIDE for m in kept.values())
    assert any("layer 5" in line for line in small["budget"]["omitted"])
    assert all(map_key("weights", 0, 0, 0, head) in kept for head in ["mean", *range(12)])  # most wanted first


def test_server_mode_reads_no_maps_and_selection_options(file_6x12x128):
    payload = build_payload(file_6x12x128, mode="server")
    assert payload["mode"] == "server" and all(not site["maps"] for site in payload["sites"])
    chosen = build_payload(file_6x12x128, layers=[1, 3], heads=[0], max_bytes=10_000_000)
    assert sorted(chosen["sites"][0]["maps"]) == sorted(
        map_key("weights", 0, 0, layer, head) for layer in (1, 3) for head in (0, "mean"))
    with pytest.raises(attnformat.SelectionError):
        build_payload(file_6x12x128, sites=["nowhere"])
    with pytest.raises(attnformat.SelectionError, match="'bias' is not a map"):
        build_payload(file_6x12x128, variables="bias")


def test_other_variables_are_embedded_on_request():
    path = attnformat.example_path("topk")  # decoder/self has weights only, decoder/self_topk too; steps has logits
    steps = attnformat.example_path("steps")
    node = attnformat.open(steps)["trunk/iga"]
    # the step labelled 300 is position 2
    site = build_payload(steps, variables=["logits", "bias"], layers=[1], steps=[300])["sites"][0]
    assert site["embedded_variables"] == ["logits", "bias"] and site["signed_variables"]["logits"]
    for variable in ("logits", "bias"):
        for head in ("mean", 0, 1):
            key = map_key(variable, 0, 2, 1, head)
            truth = _dense_truth(node, variable, (0, 2, 1, head))
            _assert_close(decode_map(site["maps"][key]), truth, site["maps"][key])
    assert {key.split("/")[0] for key in site["maps"]} == {"logits", "bias"}
    mixed = build_payload(path, variables="weights")
    assert all(s["maps"] for s in mixed["sites"])


def test_maps_too_large_to_embed_are_refused_not_read(monkeypatch, tmp_path, capsys):
    from attnformat.cli import main
    from attnformat.viewer.explorer import payload as payload_module

    monkeypatch.setattr(payload_module, "MAX_EMBEDDED_CELLS", 35)  # the dense example's maps are 6 x 6
    path = attnformat.example_path("dense")
    with pytest.raises(attnformat.AttnFormatError, match="attnformat serve"):
        build_payload(path)
    assert build_payload(path, mode="server")["sites"][0]["maps"] == {}
    assert main(["view", str(path), "-o", str(tmp_path / "page.html")]) == 2
    assert "too large to embed" in capsys.readouterr().err and not (tmp_path / "page.html").exists()
