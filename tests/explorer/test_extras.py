"""The explorer's extras (viewer/explorer/extras.py) against ground truth: the arrays that went into
seed-like files (tests/viewer/seed_files.py keeps them) or the file's arrays read with xarray, and
the numbers recomputed here with numpy from those arrays."""

from __future__ import annotations

import base64
import importlib.util
import io
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import attnformat
from attnformat.viewer.explorer import extras
from attnformat.viewer.explorer.payload import build_payload, decode_map


def _seed_files():
    if "seed_files" in sys.modules:
        return sys.modules["seed_files"]
    path = Path(__file__).resolve().parents[1] / "viewer" / "seed_files.py"
    spec = importlib.util.spec_from_file_location("seed_files", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["seed_files"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def example():
    """``example("dense")`` -> path of the written example file."""
    return attnformat.example_path


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    seed_files = _seed_files()
    root = tmp_path_factory.mktemp("extras")
    return {
        "graph": seed_files.graph_model(root / "graph.zarr"),
        "protein": seed_files.protein_model(root / "protein.zarr"),
        "vit": seed_files.vit_digits(root / "vit.zarr"),
        "video": seed_files.video_frames(root / "video.zarr"),
    }


def _site(path, name):
    return attnformat.open(path)[name]


def _row_numbers(weights, key_axis=-1):
    """Per-row entropy (nats), weight on key 0, and row max; rows all NaN give NaN."""
    w = np.asarray(weights, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = np.nansum(np.where(w > 0, -w * np.log(w), 0.0), axis=key_axis)
    captured = ~np.isnan(w).all(axis=key_axis)
    peak = np.nanmax(np.where(np.isnan(w), -np.inf, w), axis=key_axis)
    sink = np.nan_to_num(w[..., 0])
    return {name: np.where(captured, value, np.nan) for name, value in
            {"entropy": entropy, "sink": sink, "max": peak}.items()}


def _table(summary, key, statistic):
    return np.array([[np.nan if v is None else v for v in row] for row in summary["values"][key][statistic]])


def test_dense_summary_equals_numpy_for_every_step_and_sample(seeds):
    path, truth = seeds["protein"]
    site = _site(path, "trunk/iga")
    summary = extras.layer_head_summary(site)
    assert summary["statistics"] == ["entropy", "sink", "max"] and summary["rows"] == "all query rows"
    weights = truth["weights"]  # (step, sample, layer, head, query, key)
    numbers = _row_numbers(weights)
    for step in range(weights.shape[0]):
        for sample in range(weights.shape[1]):
            for statistic, per_row in numbers.items():
                expected = per_row[step, sample].mean(axis=-1)  # (layer, head)
                np.testing.assert_allclose(_table(summary, f"s{sample}/t{step}", statistic), expected, rtol=1e-5)
    assert summary["layers"] == ["0", "1"] and summary["heads"] == ["0", "1"]
    # The contract's shortcut: the first embedded sample and step.
    np.testing.assert_allclose(np.array(summary["entropy"]), numbers["entropy"][0, 0].mean(axis=-1), rtol=1e-5)


def test_summary_of_logits_only_site_is_of_their_softmax_over_computed_keys(seeds):
    path, truth = seeds["video"]
    summary = extras.layer_head_summary(_site(path, "blocks"))
    logits = truth["logits"].astype(np.float64)  # (layer, head, query, key), NaN: not computed
    finite = np.isfinite(logits)
    exp = np.where(finite, np.exp(np.where(finite, logits, 0.0) - np.nanmax(logits, axis=-1, keepdims=True)), 0.0)
    weights = np.where(finite, exp / exp.sum(axis=-1, keepdims=True), np.nan)
    numbers = _row_numbers(weights)
    assert "softmax of logits" in summary["from"]
    for statistic in ("entropy", "sink", "max"):
        np.testing.assert_allclose(_table(summary, "s0/t0", statistic), numbers[statistic].mean(axis=-1), rtol=1e-5)
    # Frame 0 is computed for every query: the sink is the mean weight on it, larger where logits were raised.
    assert np.nanargmax(_table(summary, "s0/t0", "sink")[0]) == np.argmax(np.nanmean(logits[0, :, :, 0], axis=-1))


def test_summary_leaves_padding_out(example):
    path = example("padded-batch")
    site = _site(path, "encoder/self")
    summary = extras.layer_head_summary(site)
    dataset = xr.open_datatree(path, engine="zarr")["encoder/self"].to_dataset()
    for sample in range(2):
        weights = dataset["weights"].isel(sample=sample).values.astype(np.float64)  # (layer, head, q, k)
        query = dataset["query_mask"].isel(sample=sample).values.astype(bool)
        key = dataset["key_mask"].isel(sample=sample).values.astype(bool)
        real = weights[:, :, query][..., key]
        # The sink is the weight on the first real key.
        numbers = _row_numbers(real)
        for statistic in ("entropy", "sink", "max"):
            np.testing.assert_allclose(_table(summary, f"s{sample}/t0", statistic), numbers[statistic].mean(axis=-1),
                                       rtol=1e-5)


def test_summary_over_budget_reads_the_first_rows_and_says_so(seeds):
    path, truth = seeds["protein"]
    weights = truth["weights"]
    keys = weights.shape[-1]
    maps = weights.shape[0] * weights.shape[1] * weights.shape[2] * weights.shape[3]
    summary = extras.layer_head_summary(_site(path, "trunk/iga"), max_elements=maps * keys * 3)
    assert summary["rows_used"] == 3 and summary["rows"].startswith("first 3 of 40 query rows")
    expected = _row_numbers(weights[..., :3, :])["entropy"][1, 2].mean(axis=-1)
    np.testing.assert_allclose(_table(summary, "s2/t1", "entropy"), expected, rtol=1e-5)


def test_server_mode_defers_a_large_summary(seeds, monkeypatch):
    path, _ = seeds["protein"]
    monkeypatch.setattr(extras, "SERVER_SUMMARY_ELEMENTS", 100)
    result = extras.site_extras(_site(path, "trunk/iga"), "trunk/iga", {"mode": "server"})
    assert result["summary"]["deferred"] is True and result["summary"]["values"] == {}
    embedded = extras.site_extras(_site(path, "trunk/iga"), "trunk/iga", {"mode": "embedded", "samples": [1]})
    assert list(embedded["summary"]["values"]) == ["s1/t0", "s1/t1"]


def test_edges_are_the_file_values_within_the_stated_error(seeds):
    path, truth = seeds["graph"]
    for name, values, source, target in (("spatial", truth["spatial"], truth["source"], truth["target"]),
                                         ("temporal", truth["temporal"], truth["t_source"], truth["t_target"])):
        result = extras.site_extras(_site(path, name), name, {})
        edges = result["edges"]
        assert edges["source"] == source.tolist() and edges["target"] == target.tolist()
        assert edges["heads"] == ["all"] and edges["extra"]["dim"] == ("time" if name == "spatial" else "node")
        for layer in range(values.shape[1]):
            encoded = edges["values"][f"weights/s0/t0/l{layer}"]
            decoded = decode_map(encoded)
            expected = values[0, layer]  # (time or node, edge): one row per time step (one head)
            assert decoded.shape == expected.shape
            assert np.abs(decoded - expected).max() <= encoded["max_error"] + 1e-7
        assert "absent: not an edge" in edges["absent"]
        # Summary: each target's incoming-edge entropy and maximum, at the first time step (node), as the page shows.
        w = values[0, :, 0].astype(np.float64)  # (layer, edge)
        groups = np.unique(target)
        entropy = [np.mean([-(row[target == g] * np.log(row[target == g])).sum() for g in groups]) for row in w]
        peak = [np.mean([row[target == g].max() for g in groups]) for row in w]
        summary = result["summary"]
        np.testing.assert_allclose(_table(summary, "s0/t0", "entropy")[:, 0], entropy, rtol=1e-5)
        np.testing.assert_allclose(_table(summary, "s0/t0", "max")[:, 0], peak, rtol=1e-5)


def test_spatial_edges_name_their_nodes(seeds):
    path, truth = seeds["graph"]
    edges = extras.site_extras(_site(path, "spatial"), "spatial", {})["edges"]
    assert edges["nodes"] == [f"sensor_{i}" for i in range(truth["nodes"])]
    assert edges["extra"]["labels"] == [str(t) for t in range(truth["steps"])]
    edges = extras.site_extras(_site(attnformat.example_path("edge"), "gat"), "gat", {"layers": [1]})["edges"]
    dataset = xr.open_datatree(attnformat.example_path("edge"), engine="zarr")["gat"].to_dataset()
    assert edges["x"] == pytest.approx(dataset["node_x"].values.tolist(), rel=1e-5)
    encoded = edges["values"]["weights/s0/t0/l1"]
    assert list(edges["values"]) == ["weights/s0/t0/l1"] and encoded["rows"] == 2  # one row per head
    assert np.abs(decode_map(encoded) - dataset["weights"].isel(layer=1).values).max() <= encoded["max_error"] + 1e-7


def test_topk_rows_keep_indices_exact_and_weights_within_error(example):
    path = example("topk")
    result = extras.site_extras(_site(path, "decoder/self_topk"), "decoder/self_topk", {})
    topk = result["topk"]
    dataset = xr.open_datatree(path, engine="zarr")["decoder/self_topk"].to_dataset()
    assert topk["top_k"] == 3 and topk["key_count"] == 8
    for layer in range(2):
        for head in range(2):
            entry = topk["rows"][f"s0/t0/l{layer}/h{head}"]
            weights = dataset["weights"].isel(layer=layer, head=head).values
            index = dataset["key_index"].isel(layer=layer, head=head).values
            omitted = dataset["omitted_weight"].isel(layer=layer, head=head).values
            decoded = decode_map(entry["weights"])
            assert np.array_equal(np.isnan(decoded), np.isnan(weights))  # nothing kept stays absent, never 0
            assert np.nanmax(np.abs(decoded - weights)) <= entry["weights"]["max_error"] + 1e-7
            keys = np.frombuffer(base64.b64decode(entry["key_index"]["b64"]), dtype="<i2").reshape(entry["key_index"]["shape"])
            assert np.array_equal(keys, index)
            assert np.abs(decode_map(entry["omitted"])[0] - omitted).max() <= entry["omitted"]["max_error"] + 1e-7
    summary = result["summary"]
    kept = dataset["weights"].values.astype(np.float64)
    np.testing.assert_allclose(_table(summary, "s0/t0", "max"), np.nanmax(kept, axis=-1).mean(axis=-1), rtol=1e-5)
    np.testing.assert_allclose(_table(summary, "s0/t0", "omitted"), dataset["omitted_weight"].values.mean(axis=-1), rtol=1e-5)


def test_statistics_rows_are_the_stored_ones(example):
    path = example("statistics")
    result = extras.site_extras(_site(path, "decoder/self_stats"), "decoder/self_stats", {"layers": [2], "heads": [1, 3]})
    stats = result["statistics"]
    dataset = xr.open_datatree(path, engine="zarr")["decoder/self_stats"].to_dataset()
    assert stats["stored"] == ["entropy", "max_weight", "sink_weight", "local_weight", "top_key"]
    assert sorted(stats["rows"]) == ["s0/t0/l2/h1", "s0/t0/l2/h3"]
    entry = stats["rows"]["s0/t0/l2/h3"]
    for name in ("entropy", "max_weight", "sink_weight", "local_weight"):
        stored = dataset[name].isel(layer=2, head=3).values
        assert np.abs(decode_map(entry[name])[0] - stored).max() <= entry[name]["max_error"] + 1e-7
    top = np.frombuffer(base64.b64decode(entry["top_key"]["b64"]), dtype="<i2")
    assert np.array_equal(top, dataset["top_key"].isel(layer=2, head=3).values)
    assert "<= 2" in stats["labels"]["local_weight"] and stats["local_window"] == 2
    summary = result["summary"]
    assert summary["layers"] == ["2"] and summary["heads"] == ["1", "3"]
    for statistic, stored in (("entropy", "entropy"), ("sink", "sink_weight"), ("max", "max_weight"), ("local", "local_weight")):
        expected = dataset[stored].isel(layer=[2], head=[1, 3]).values.mean(axis=-1)
        np.testing.assert_allclose(_table(summary, "s0/t0", statistic), expected, rtol=1e-5)


def test_patches_place_keys_on_the_grid_and_carry_the_image(seeds):
    from PIL import Image

    path, truth = seeds["vit"]
    result = extras.site_extras(_site(path, "encoder/self"), "encoder/self", {"samples": [0, 3], "layers": [3]})
    patches = result["patches"]
    grid = truth["grid"]
    assert patches["grid"] == [grid, grid] and patches["first_patch"] == 1 and patches["default_query"] == 0
    assert patches["key_row"]["s0"] == [-1] + [r for r in range(grid) for _ in range(grid)]
    assert patches["key_col"]["s0"] == [-1] + list(range(grid)) * grid
    for sample in (0, 3):
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(patches["images"][f"s{sample}"]))))
        source = truth["images"][sample].astype(np.float64)
        expected = np.round((source - source.min()) / (source.max() - source.min()) * 255)
        assert np.array_equal(image, expected.astype(np.uint8))
    assert patches["image"] == patches["images"]["s0"] and patches["image_shape"] == [28, 28]
    # Layer 3 of the file is uniform: every weight 1/17, so the entropy is ln 17 and the sink 1/17.
    summary = result["summary"]
    np.testing.assert_allclose(_table(summary, "s3/t0", "entropy"), np.full((1, 4), np.log(17)), rtol=1e-5)
    np.testing.assert_allclose(_table(summary, "s3/t0", "sink"), np.full((1, 4), 1 / 17), rtol=1e-5)


def test_png_and_ints_encoders_round_trip():
    from PIL import Image

    colour = np.random.default_rng(0).uniform(-3, 5, size=(5, 7, 3))
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(extras.png_base64(colour)))))
    assert image.shape == (5, 7, 3)
    assert np.array_equal(image, np.round((colour - colour.min()) / (colour.max() - colour.min()) * 255).astype(np.uint8))
    wide = extras.encode_ints([[-1, 40000]])
    assert wide["dtype"] == "int32" and np.frombuffer(base64.b64decode(wide["b64"]), "<i4").tolist() == [-1, 40000]


def test_payload_carries_the_extras_of_every_site(example):
    payload = build_payload(example("topk"))
    by_name = {site["name"]: site for site in payload["sites"]}
    assert sorted(by_name["decoder/self_topk"]["extras"]) == ["summary", "topk"]
    assert sorted(by_name["decoder/self"]["extras"]) == ["summary"]
    # Extras are keyed by the same positions as the page's maps.
    assert by_name["decoder/self"]["extras"]["summary"]["layer_index"] == by_name["decoder/self"]["embedded_layers"]


def test_layers_over_the_extras_budget_are_left_out_and_given_on_request(example):
    path = example("statistics")
    site = _site(path, "decoder/self_stats")
    stats = extras.site_extras(site, "decoder/self_stats", {"extras_max_bytes": 1})["statistics"]
    assert sorted(stats["rows"]) == [f"s0/t0/l0/h{h}" for h in range(4)]  # the first layer always fits
    assert stats["embedded"]["left_out"] == ["s0/t0/l1", "s0/t0/l2"]
    asked = extras.layer_extras(site, "statistics", layer=2)["rows"]
    dataset = xr.open_datatree(path, engine="zarr")["decoder/self_stats"].to_dataset()
    entropy = asked["s0/t0/l2/h3"]["entropy"]
    assert np.abs(decode_map(entropy)[0] - dataset["entropy"].isel(layer=2, head=3).values).max() <= entropy["max_error"] + 1e-7
    with pytest.raises(IndexError):
        extras.layer_extras(site, "statistics", layer=3)
    with pytest.raises(ValueError):
        extras.layer_extras(site, "pictures")
    graph = extras.layer_extras(_site(example("edge"), "gat"), "edges", layer=1)
    assert list(graph["values"]) == ["weights/s0/t0/l1"]


def test_vit_rollout_is_the_product_of_the_layers_head_means(seeds):
    path, truth = seeds["vit"]
    patches = extras.site_extras(_site(path, "encoder/self"), "encoder/self", {"samples": [2]})["patches"]
    weights = truth["weights"][2].astype(np.float64)  # (layer, head, query, key)
    expected = np.eye(weights.shape[-1])
    for layer in weights.mean(axis=1):  # heads averaged, then 0.5 A + 0.5 I, layers multiplied first to last
        expected = (0.5 * layer + 0.5 * np.eye(layer.shape[-1])) @ expected
    encoded = patches["rollout"]["s2/t0"]
    assert list(patches["rollout"]) == ["s2/t0"]
    assert np.abs(decode_map(encoded) - expected).max() <= encoded["max_error"] + 1e-7


def test_extras_of_every_example_are_strict_json(example, tmp_path):
    """JSON has no NaN: what was not captured travels as null (summaries) or code 255 (arrays)."""
    import json

    from attnformat.examples import EXAMPLES
    from attnformat.reading import site_paths

    for name in EXAMPLES:
        tree = attnformat.open(example(name))
        for path in site_paths(tree):
            json.dumps(extras.site_extras(tree[path], path, {}), allow_nan=False)
    # A capture that stopped half way: layer 1 was never written (NaN).
    weights = np.full((2, 2, 4, 4), np.nan, dtype=np.float32)
    weights[0] = 0.25
    tree = xr.DataTree.from_dict({"/": attnformat.examples._root("half written"), "/s": xr.Dataset(
        {"weights": (("layer", "head", "query", "key"), weights)},
        attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key", "attention_type": "self", "causal": 0})})
    attnformat.save(tree, tmp_path / "half.zarr")
    result = extras.site_extras(_site(tmp_path / "half.zarr", "s"), "s", {})
    json.dumps(result, allow_nan=False)
    assert result["summary"]["values"]["s0/t0"]["entropy"] == [[pytest.approx(np.log(4), rel=1e-5)] * 2, [None, None]]


def test_row_numbers_follow_the_statistics_layout_definitions():
    """The summary's per-row numbers are those a statistics site stores (attnformat.reductions.row_statistics)."""
    from attnformat.reductions import row_statistics

    rng = np.random.default_rng(5)
    weights = attnformat.examples.softmax(rng.normal(scale=2, size=(3, 9, 11))).astype(np.float32)
    weights[1, 4] = np.nan  # a row not captured
    weights[2, :, 0] = 0.0  # nothing on key 0: the sink is 0, not skipped
    keep = np.ones(11, bool)
    keep[[0, 7]] = False  # padding keys: the first real key is key 1
    for mask in (None, keep):
        ours = extras._row_block_stats(weights, mask)
        theirs = row_statistics(weights, key_mask=mask)
        for name, stored in (("entropy", "entropy"), ("sink", "sink_weight"), ("max", "max_weight")):
            np.testing.assert_allclose(ours[name], theirs[stored].astype(np.float64), rtol=2e-6, atol=1e-7, equal_nan=True)
