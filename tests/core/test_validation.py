"""Value checks: what counts as a broken row sum, and what is exempt."""

from __future__ import annotations

import numpy as np
import xarray as xr

import attnformat
from attnformat.examples import build


def _replace_site(tree: xr.DataTree, site: str, dataset: xr.Dataset) -> xr.DataTree:
    datasets = {node.path: node.to_dataset(inherit=False) for node in tree.subtree}
    datasets[f"/{site}"] = dataset
    return xr.DataTree.from_dict(datasets)


def test_rows_not_captured_are_exempt_but_partial_rows_are_not():
    tree = build("dense")
    site = tree["encoder/self"].to_dataset(inherit=False).drop_vars("logits")
    weights = site["weights"].values.copy()
    weights[0, 0] = np.nan  # a head never written
    site["weights"] = site["weights"].copy(data=weights)
    assert attnformat.validate(_replace_site(tree, "encoder/self", site)).ok
    weights[1, 1, 2, :3] = 0.0  # a row with zeros where probability was
    site["weights"] = site["weights"].copy(data=weights)
    report = attnformat.validate(_replace_site(tree, "encoder/self", site))
    assert [f.rule_id for f in report.errors] == ["ATTN-VAL-002"]
    assert "layer=1, head=1" in report.errors[0].message


def test_padding_queries_are_exempt_from_row_sums():
    report = attnformat.validate(build("padded-batch"))  # padding rows are all zero there
    assert report.ok and report.findings == []


def test_float16_rows_get_the_looser_tolerance():
    tree = build("dense")
    site = tree["encoder/self"].to_dataset(inherit=False).drop_vars("logits")
    site["weights"] = site["weights"].astype(np.float16)
    assert attnformat.validate(_replace_site(tree, "encoder/self", site)).ok


def test_softmax_of_logits_must_match_weights_as_a_warning():
    tree = build("dense")
    site = tree["encoder/self"].to_dataset(inherit=False)
    site["logits"] = site["logits"] * 2
    report = attnformat.validate(_replace_site(tree, "encoder/self", site))
    assert report.ok
    assert [f.rule_id for f in report.warnings] == ["ATTN-VAL-005"]


def test_metadata_only_validation_skips_values():
    tree = build("dense")
    site = tree["encoder/self"].to_dataset(inherit=False)
    site["weights"] = site["weights"] * 3
    broken = _replace_site(tree, "encoder/self", site)
    assert attnformat.validate(broken, check_values=False).ok
    assert {"ATTN-VAL-001", "ATTN-VAL-002"} <= {f.rule_id for f in attnformat.validate(broken).errors}


def test_edge_rows_group_by_target():
    tree = build("edge")
    report = attnformat.validate(tree)
    assert report.ok
    site = tree["gat"].to_dataset(inherit=False)
    target = site["target"].values
    incoming = np.bincount(target, weights=site["weights"].values[0, 0])
    np.testing.assert_allclose(incoming, 1.0, rtol=1e-6)
