"""The metadata rules on the raw consolidated JSON (the one-map road of a never-validated file):
sound against the real validator on every conformance fixture and example, and a sealed file that
breaks a rule is still refused with its rule id."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import attnformat
from attnformat.engines.direct import open_direct
from attnformat.examples import EXAMPLES, _root, softmax
from attnformat.metadata_rules import passes_metadata_rules, valid_instance
from attnformat.verdicts import may_read_directly

SPEC = Path(__file__).resolve().parents[2] / "spec"
FIXTURES = sorted((SPEC / "conformance").glob("*/*.zarr"))


@pytest.mark.parametrize("path", FIXTURES + [None], ids=[p.parent.name + "/" + p.name for p in FIXTURES] + ["examples"])
def test_it_never_passes_a_file_the_validator_refuses(path):
    paths = [path] if path is not None else [attnformat.example_path(name) for name in EXAMPLES]
    for one in paths:
        store = open_direct(one)
        if store is None:
            continue
        if passes_metadata_rules(store):
            report = attnformat.validate(one, check_values=False)
            assert report.ok, (one, [f.rule_id for f in report.findings])


@pytest.mark.parametrize("name", ["dense", "encoder-decoder", "frames", "padded-batch"])
def test_dense_examples_pass_without_a_remembered_verdict(name):
    assert passes_metadata_rules(open_direct(attnformat.example_path(name)))


def _sealed_file(tmp_path, *, dims=("layer", "head", "query", "key"), causal=0) -> Path:
    rng = np.random.default_rng(0)
    weights = softmax(rng.normal(size=(2, 2, 5, 5))).astype(np.float32)
    if dims != ("layer", "head", "query", "key"):
        weights = np.moveaxis(weights, 0, 1)
    site = xr.Dataset({"weights": (dims, weights)},
                      coords={"query_label": ("query", np.array(list("abcde"), dtype=object)),
                              "key_label": ("key", np.array(list("abcde"), dtype=object))},
                      attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key",
                             "attention_type": "self", "causal": causal})
    tree = xr.DataTree.from_dict({"/": _root("rules", model_name="m"), "/encoder/self": site})
    return attnformat.save(tree, tmp_path / "f.zarr", check="none")


def test_a_fresh_conforming_file_may_be_read_directly(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNFORMAT_CACHE_DIR", str(tmp_path / "cache"))  # nothing remembered
    store = open_direct(_sealed_file(tmp_path))
    assert store.sealed and may_read_directly(store)


@pytest.mark.parametrize("case, rule_id", [
    ({"dims": ("head", "layer", "query", "key")}, "ATTN-DIM-002"),
    ({"causal": 2}, "ATTN-SITE-004"),
])
def test_a_sealed_file_breaking_a_metadata_rule_is_refused_with_its_rule_id(tmp_path, monkeypatch, capsys, case, rule_id):
    from attnformat.cli import main

    monkeypatch.setenv("ATTNFORMAT_CACHE_DIR", str(tmp_path / "cache"))
    path = _sealed_file(tmp_path, **case)
    store = open_direct(path)
    assert store is not None and store.sealed
    assert not passes_metadata_rules(store) and not may_read_directly(store)
    assert rule_id in [f.rule_id for f in attnformat.validate(path, check_values=False).findings]
    code = main(["plot", str(path), "heatmap", "--layer", "0", "--head", "0", "-o", str(tmp_path / "x.png")])
    error = capsys.readouterr().err
    assert code != 0 and rule_id in error
    assert len([line for line in error.splitlines() if line.strip()]) == 1
    assert not (tmp_path / "x.png").exists()


def test_the_schema_subset_agrees_with_jsonschema_on_the_spec_s_attribute_schemas():
    import jsonschema

    schema = json.loads((SPEC / "schemas" / "site-attributes.schema.json").read_text())
    instances = [
        {"layout": "dense", "normalization": "softmax", "normalized_dim": "key", "causal": 1},
        {"layout": "dense", "normalization": "softmax", "causal": 1},  # normalized_dim required for softmax
        {"layout": "dense", "normalization": "other", "causal": True},  # a boolean is not an integer
        {"layout": "dense", "normalization": "other", "causal": 1.0},  # 1.0 is an integer in JSON Schema
        {"layout": "topk", "normalization": "softmax", "normalized_dim": "key", "top_k": 0, "key_count": 4},
        {"layout": "edge", "normalization": "softmax", "normalized_dim": "query"},
        {"layout": "dense", "normalization": "other", "patch_grid": [2, 0]},
        {"layout": "dense", "normalization": "other", "patch_grid": [2, 3]},
        {"layout": "grid", "normalization": "other"},
    ]
    for instance in instances:
        assert valid_instance(instance, schema) == jsonschema.Draft202012Validator(schema).is_valid(instance), instance
