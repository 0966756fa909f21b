"""A file written by hand, with plain xarray and the spec only, is a conforming attnformat file."""

from __future__ import annotations

import numpy as np
import xarray as xr

import attnformat


def test_file_written_with_plain_xarray_validates(tmp_path):
    # Everything below follows spec/attnformat-spec.md, sections "Root", "Sites" and "Coordinates".
    rng = np.random.default_rng(7)
    scores = rng.normal(size=(3, 4, 5, 5))
    weights = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
    tokens = np.array(["<s>", "a", "b", "c", "</s>"], dtype=object)
    site = xr.Dataset(
        {"weights": (("layer", "head", "query", "key"), weights.astype("float32"))},
        coords={"layer": [0, 1, 2], "head": [0, 1, 2, 3], "query_label": ("query", tokens), "key_label": ("key", tokens)},
        attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key", "attention_type": "self", "causal": 0},
    )
    root = xr.Dataset(attrs={
        "attnformat": "attnformat", "attnformat_version": "1.0.0", "producer": "a hand-written script",
        "completeness": "complete", "model_name": "handmade", "model_framework": "numpy",
    })
    tree = xr.DataTree.from_dict({"/": root, "/encoder/self": site})
    tree.to_zarr(tmp_path / "hand.zarr", zarr_format=3, consolidated=True)
    tree.to_netcdf(tmp_path / "hand.nc", engine="h5netcdf")

    for path in (tmp_path / "hand.zarr", tmp_path / "hand.nc"):
        report = attnformat.validate(path)
        assert report.ok and report.findings == [], report.format()
        opened = attnformat.open(path)
        np.testing.assert_array_equal(opened["encoder/self"]["weights"].sel(layer=2, head=3).values, weights[2, 3].astype("float32"))
        assert list(opened["encoder/self"]["key_label"].values) == list(tokens)


def test_hand_written_file_that_forgets_the_version_is_reported(tmp_path):
    site = xr.Dataset({"weights": (("query", "key"), np.full((2, 2), 0.5, "float32"))}, attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key"})
    tree = xr.DataTree.from_dict({"/": xr.Dataset(attrs={"attnformat": "attnformat", "producer": "me", "completeness": "complete"}), "/self": site})
    tree.to_zarr(tmp_path / "no-version.zarr", zarr_format=3)
    report = attnformat.validate(tmp_path / "no-version.zarr")
    assert [f.rule_id for f in report.errors] == ["ATTN-ROOT-002"]
    assert "attnformat_version" in report.errors[0].message
