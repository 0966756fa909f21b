"""Validation that stays bounded on hostile and damaged files, and the storage rules it reports:
ATTN-ROOT-008 (incomplete), ATTN-STORE-007 (chunks missing from a complete file), damage found
while reading values (ATTN-STORE-005), and value checks whose work follows the chunks a file
stores, not the sizes it declares."""

from __future__ import annotations

import json
import math
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

import attnformat
from attnformat import validation
from attnformat.examples import build
from attnformat.rules import DAMAGE_RULES

FIXTURES = Path(__file__).resolve().parents[2] / "spec" / "conformance"
ROOT_ATTRS = {"attnformat": "attnformat", "attnformat_version": "1.1.0", "producer": "a hostile test",
              "model_name": "m", "model_framework": "numpy"}
SITE_ATTRS = {"layout": "dense", "normalization": "softmax", "normalized_dim": "key", "attention_type": "self", "causal": 0}


def _huge_store(path: Path, completeness: str, shape, chunks, maps: dict) -> Path:
    """A store whose weights declare ``shape`` but hold only the chunks written from ``maps``
    (chunk index -> values), as a crafted or interrupted file would."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs.update({**ROOT_ATTRS, "completeness": completeness})
    site = root.create_group("encoder").create_group("self")
    site.attrs.update(SITE_ATTRS)
    weights = site.create_array("weights", shape=shape, chunks=chunks, dtype="float32", fill_value=np.nan,
                                dimension_names=("sample", "head", "query", "key"))
    for index, values in maps.items():
        weights[tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunks))] = values
    zarr.consolidate_metadata(str(path))
    return path


def _chunk_files(array_folder: Path) -> int:
    """Chunks stored, counted from the file system (zarr's ``nchunks_initialized`` would try
    every key of the declared grid)."""
    return sum(1 for p in (array_folder / "c").rglob("*") if p.is_file())


def _uniform(chunks):
    return np.full(chunks, 1.0 / chunks[-1], dtype="float32")


def test_an_incomplete_file_gets_a_warning_in_text_and_json(tmp_path):
    tree = build("dense")
    tree.attrs = {**tree.attrs, "completeness": "incomplete"}
    report = attnformat.validate(tree)
    assert report.ok and not report.damaged
    assert [(f.rule_id, f.level) for f in report.findings] == [("ATTN-ROOT-008", "warning")]
    assert "ATTN-ROOT-008" in report.format()
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["ok"] is True and as_json["damaged"] is False
    assert [f["rule_id"] for f in as_json["findings"]] == ["ATTN-ROOT-008"]


def test_a_huge_declared_array_is_checked_by_its_stored_chunks_only(tmp_path):
    # 10^10 maps declared (2.6 TB of float32), three stored: one of them out of range.
    shape, chunks = (100_000, 100_000, 8, 8), (1, 1, 8, 8)
    broken = _uniform(chunks)
    broken[0, 0, 3, :2] = [1.25, -1.0]  # out of range, but the row still sums to 1
    path = _huge_store(tmp_path / "huge.zarr", "incomplete", shape, chunks,
                       {(0, 0, 0, 0): _uniform(chunks), (7, 99_999, 0, 0): broken, (99_999, 3, 0, 0): _uniform(chunks)})
    assert _chunk_files(path / "encoder/self/weights") == 3
    tracemalloc.start()
    try:
        report = attnformat.validate(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200 * 2**20
    errors = [(f.rule_id, f.message) for f in report.errors]
    assert [rule_id for rule_id, _ in errors] == ["ATTN-VAL-001"]
    assert errors[0][1].startswith("2 values outside [0, 1]; first at sample=7, head=99999")
    assert [f.rule_id for f in report.warnings] == ["ATTN-ROOT-008"]


def test_a_complete_file_with_missing_chunks_is_damaged_and_counted_arithmetically(tmp_path):
    shape, chunks = (100_000, 100_000, 8, 8), (1, 1, 8, 8)
    path = _huge_store(tmp_path / "cut.zarr", "complete", shape, chunks,
                       {(0, 0, 0, 0): _uniform(chunks), (0, 1, 0, 0): _uniform(chunks)})
    array = zarr.open_array(str(path / "encoder/self/weights"), mode="r")
    declared, stored = array.nchunks, _chunk_files(path / "encoder/self/weights")  # zarr's count of the grid
    report = attnformat.validate(path)
    assert report.damaged and not report.ok
    [finding] = report.errors
    assert finding.rule_id == "ATTN-STORE-007" and finding.location == "/encoder/self/weights"
    assert f"{declared - stored} of {declared} chunks are not stored" in finding.message
    assert "first missing: chunk 0/2/0/0" in finding.message


def test_a_missing_chunk_is_counted_per_variable(tmp_path):
    path = tmp_path / "dense.zarr"
    attnformat.save(build("dense"), path)
    weights = zarr.open_array(str(path / "encoder/self/weights"), mode="r")
    logits = zarr.open_array(str(path / "encoder/self/logits"), mode="r")
    chunk_files = sorted(p for p in (path / "encoder/self/logits/c").rglob("*") if p.is_file())
    chunk_files[0].unlink()
    report = attnformat.validate(path)
    assert [(f.rule_id, f.location) for f in report.errors] == [("ATTN-STORE-007", "/encoder/self/logits")]
    assert f"1 of {logits.nchunks} chunks" in report.errors[0].message
    assert weights.nchunks_initialized == weights.nchunks  # the weights are whole and not reported
    # An incomplete file may miss chunks: only the warning remains.
    root = json.loads((path / "zarr.json").read_text())
    root["attributes"]["completeness"] = "incomplete"
    (path / "zarr.json").write_text(json.dumps(root))
    report = attnformat.validate(path)
    assert report.ok and [f.rule_id for f in report.findings] == ["ATTN-ROOT-008"]


def test_a_damaged_chunk_found_while_reading_values_is_a_finding_not_an_exception(tmp_path):
    path = tmp_path / "flipped.zarr"
    shutil.copytree(FIXTURES / "invalid" / "ATTN-STORE-005.zarr", path)
    report = attnformat.validate(path)
    assert [f.rule_id for f in report.errors] == ["ATTN-STORE-005"] and report.damaged
    assert attnformat.validate(path, check_values=False).ok  # the damage is in a chunk's values


@pytest.mark.parametrize("block", [1, 5, 6, 7, 36, 72, 1 << 22])
def test_block_size_does_not_change_what_is_found(block, monkeypatch):
    """Whatever the block (pieces of one row, whole rows, many maps), the same values are found."""
    tree = build("padded-batch")
    site = tree["encoder/self"].to_dataset(inherit=False)
    weights = site["weights"].values.copy()
    weights[1, 0, 1, 2, :2] += 0.25  # a row that no longer sums to 1
    weights[0, 0, 0, 0, 1] = 1.5  # out of range (its row is off too)
    weights[1, 0, 0, 1, 4] = 0.2  # weight on a padding key (its row is off too)
    site["weights"] = site["weights"].copy(data=weights)
    site = site.drop_vars("logits", errors="ignore")
    datasets = {node.path: node.to_dataset(inherit=False) for node in tree.subtree}
    datasets["/encoder/self"] = site
    broken = xr.DataTree.from_dict(datasets)
    # Ground truth from numpy: rows of real queries whose sum is off.
    query_mask = site["query_mask"].values[:, None, None, :]
    sums = np.nansum(weights, axis=-1)
    expected_rows = int(np.sum((np.abs(sums - 1) > 1e-3) & np.all(np.isfinite(weights), axis=-1) & query_mask))
    expected_range = int(np.sum((weights < -1e-6) | (weights > 1 + 1e-6)))
    key_mask = site["key_mask"].values[:, None, None, None, :]
    expected_masked = int(np.sum(~key_mask & (np.abs(np.nan_to_num(weights)) > 1e-6)))
    monkeypatch.setattr(validation, "BLOCK_ELEMENTS", block)
    report = attnformat.validate(broken)
    found = {f.rule_id: f.message for f in report.errors}
    assert set(found) == {"ATTN-VAL-001", "ATTN-VAL-002", "ATTN-VAL-004"}
    assert found["ATTN-VAL-002"].startswith(f"{expected_rows} rows do not sum to 1")
    assert found["ATTN-VAL-001"].startswith(f"{expected_range} values outside [0, 1]; first at sample=0, layer=0, head=0")
    assert found["ATTN-VAL-004"].startswith(f"{expected_masked} weights on keys whose key_mask is false; first at sample=1, layer=0, head=0")


def test_rows_split_across_chunks_are_summed_whole_and_partly_stored_rows_are_exempt(tmp_path):
    shape, chunks = (1, 2, 8, 8), (1, 1, 4, 4)  # each row lies in two chunks
    values = np.full(shape, 1 / 8, dtype="float32")
    values[0, 0, 5, 6] = 0.5  # row (head 0, query 5) sums to 1.375
    path = _huge_store(tmp_path / "split.zarr", "incomplete", shape, chunks, {})
    array = zarr.open_array(str(path / "encoder/self/weights"), mode="a")
    array[...] = values
    report = attnformat.validate(path)
    assert [(f.rule_id, f.message[:40]) for f in report.errors] == [("ATTN-VAL-002", "1 rows do not sum to 1 (tolerance 0.001)")]
    # Without the chunk holding keys 0-3 of queries 4-7, that row is not captured: exempt.
    (path / "encoder/self/weights/c/0/0/1/0").unlink()
    assert not attnformat.validate(path).errors


def test_damage_rules_are_the_storage_rules_that_mean_damage():
    assert DAMAGE_RULES == {"ATTN-STORE-003", "ATTN-STORE-004", "ATTN-STORE-005", "ATTN-STORE-006", "ATTN-STORE-007"}
    assert not attnformat.validate(FIXTURES / "invalid" / "ATTN-SITE-001.zarr").damaged
    assert attnformat.validate(FIXTURES / "invalid" / "ATTN-STORE-004.zarr").damaged


def test_chunk_grid_is_arithmetic():
    assert validation._chunk_grid((10**12, 7), (3, 7)) == (math.ceil(10**12 / 3), 1)


@pytest.mark.parametrize("block", [1, 7, 1 << 22])
def test_edge_rows_are_summed_whole_whatever_the_block(block, monkeypatch):
    tree = build("edge")
    site = tree["gat"].to_dataset(inherit=False)
    weights = site["weights"].values.copy()
    weights[..., 3] += 0.5  # the row of edge 3's target, in every map
    site["weights"] = site["weights"].copy(data=weights)
    datasets = {node.path: node.to_dataset(inherit=False) for node in tree.subtree}
    datasets["/gat"] = site.drop_vars("logits", errors="ignore")
    # Ground truth: incoming sums per target node, with numpy.
    target = site["target"].values
    sums = np.stack([np.bincount(target, weights=row) for row in weights.reshape(-1, weights.shape[-1])])
    expected = int(np.sum(np.abs(sums[:, np.unique(target)] - 1) > 1e-3))
    monkeypatch.setattr(validation, "BLOCK_ELEMENTS", block)
    report = attnformat.validate(xr.DataTree.from_dict(datasets))
    assert [f.rule_id for f in report.errors] == ["ATTN-VAL-002"]
    assert report.errors[0].message.startswith(f"{expected} rows do not sum to 1")


@pytest.mark.parametrize("suffix", [".h5", ".zarr.zip"])
def test_files_of_every_storage_are_checked_by_their_stored_chunks(suffix, tmp_path):
    path = tmp_path / f"dense{suffix}"
    attnformat.save(build("dense"), path)
    assert attnformat.validate(path).findings == []
    tree = build("dense")
    site = tree["encoder/self"].to_dataset(inherit=False)
    site["weights"] = site["weights"] * 2
    datasets = {node.path: node.to_dataset(inherit=False) for node in tree.subtree}
    datasets["/encoder/self"] = site.drop_vars("logits")
    broken = tmp_path / f"broken{suffix}"  # written by xarray: attnformat's writer refuses it
    if suffix == ".h5":
        xr.DataTree.from_dict(datasets).to_netcdf(broken, engine="h5netcdf")
    else:
        directory = tmp_path / "broken.zarr"
        xr.DataTree.from_dict(datasets).to_zarr(directory, zarr_format=3, consolidated=True)
        shutil.make_archive(str(broken).removesuffix(".zip"), "zip", directory)
    report = attnformat.validate(broken)
    assert {"ATTN-VAL-001", "ATTN-VAL-002"} <= {f.rule_id for f in report.errors}


def test_infinite_weights_are_out_of_range_not_uncaptured():
    tree = build("dense")
    site = tree["encoder/self"].to_dataset(inherit=False).drop_vars("logits")
    weights = site["weights"].values.copy()
    weights[0, 1, 2, 3] = np.inf
    site["weights"] = site["weights"].copy(data=weights)
    datasets = {node.path: node.to_dataset(inherit=False) for node in tree.subtree}
    datasets["/encoder/self"] = site
    report = attnformat.validate(xr.DataTree.from_dict(datasets))
    assert [f.rule_id for f in report.errors] == ["ATTN-VAL-001"]
    assert report.errors[0].message.startswith("1 values outside [0, 1]; first at layer=0, head=1")
    assert "max inf" in report.errors[0].message
