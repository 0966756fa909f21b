"""The streaming Writer: layer-by-layer writes, steps, incomplete files, errors that say where."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import xarray as xr

import attnformat
from attnformat.examples import softmax


def _declare(writer, **extra):
    return writer.create_site(
        "encoder/self",
        sizes={"layer": 3, "head": 2, "query": 4, "key": 4, **extra},
        variables=("weights", "logits"),
        coords={"layer": [0, 1, 2], "query_label": ("query", list("abcd")), "key_label": ("key", list("abcd"))},
        attrs={"attention_type": "self", "causal": 0},
    )


@pytest.mark.parametrize("suffix", [".zarr", ".zarr.zip", ".h5"])
def test_layer_by_layer_writes_land_where_they_should(tmp_path, suffix):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 2, 4, 4)).astype(np.float32)
    weights = softmax(logits).astype(np.float32)
    path = tmp_path / f"capture{suffix}"
    with attnformat.Writer(path, model_name="toy", model_framework="numpy") as writer:
        site = _declare(writer)
        for layer in (2, 0, 1):  # any order
            site.write("weights", weights[layer], layer=layer)
            for head in range(2):
                site.write("logits", logits[layer, head], layer=layer, head=head)
    tree = attnformat.open(path)
    assert tree.attrs["completeness"] == "complete"
    np.testing.assert_array_equal(tree["encoder/self"]["weights"].values, weights)
    np.testing.assert_array_equal(tree["encoder/self"]["logits"].values, logits)
    assert list(tree["encoder/self"]["query_label"].values) == list("abcd")
    assert attnformat.validate(tree).findings == []
    assert not (tmp_path / f"capture{suffix}.partial.zarr").exists()


def test_steps_append_and_existing_steps_are_rewritten(tmp_path):
    path = tmp_path / "steps.zarr"
    with attnformat.Writer(path, model_name="toy", model_framework="numpy") as writer:
        site = writer.create_site("iga", sizes={"step": 0, "head": 2, "query": 3, "key": 3}, attrs={"attention_type": "self", "causal": 0})
        for step in (100, 200, 300):
            site.write("weights", np.full((2, 3, 3), 1 / 3), step=step)
        site.write("weights", np.eye(3)[None].repeat(2, 0), step=200)
        with pytest.raises(attnformat.WriterError, match="step 150 comes after step 300"):
            site.write("weights", np.full((2, 3, 3), 1 / 3), step=150)
    weights = attnformat.open(path)["iga"]["weights"]
    assert weights.step.values.tolist() == [100, 200, 300]
    np.testing.assert_array_equal(weights.sel(step=200, head=1).values, np.eye(3))


def test_shape_mismatch_names_site_variable_and_layer(tmp_path):
    with attnformat.Writer(tmp_path / "x.zarr") as writer:
        site = _declare(writer)
        with pytest.raises(attnformat.WriterError, match=r"encoder/self/weights \[layer=1\]: values have shape \(2, 4, 5\), expected \(2, 4, 4\)"):
            site.write("weights", np.zeros((2, 4, 5)), layer=1)
        with pytest.raises(attnformat.WriterError, match=r"layer 7 not in .*; layers: 0, 1, 2"):
            site.write("weights", np.zeros((2, 4, 4)), layer=7)
        with pytest.raises(attnformat.WriterError, match="no variable 'bias'"):
            site.write("bias", np.zeros((2, 4, 4)), layer=0)


def test_exception_in_the_block_leaves_a_readable_incomplete_file(tmp_path):
    path = tmp_path / "crash.zarr"
    with pytest.raises(RuntimeError, match="model blew up"):
        with attnformat.Writer(path, model_name="toy", model_framework="numpy") as writer:
            site = _declare(writer)
            site.write("weights", np.full((2, 4, 4), 0.25), layer=0)
            raise RuntimeError("model blew up")
    tree = attnformat.open(path)
    assert tree.attrs["completeness"] == "incomplete"
    assert not attnformat.is_complete(tree)
    weights = tree["encoder/self"]["weights"]
    np.testing.assert_array_equal(weights.sel(layer=0).values, np.full((2, 4, 4), 0.25, np.float32))
    assert np.isnan(weights.sel(layer=1).values).all()  # never written: NaN means not captured
    assert attnformat.validate(tree).ok


def test_a_killed_writer_process_leaves_a_readable_partial_store(tmp_path):
    script = textwrap.dedent(f"""
        import os, numpy as np, attnformat
        writer = attnformat.Writer({str(tmp_path / 'killed.h5')!r}, model_name="toy", model_framework="numpy")
        site = writer.create_site("self", sizes={{"step": 0, "query": 2, "key": 2}}, attrs={{"attention_type": "self", "causal": 0}})
        site.write("weights", np.full((2, 2), 0.5), step=10)
        site.write("weights", np.full((2, 2), 0.5), step=20)
        os._exit(9)  # no close, no cleanup: as if the process were killed
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 9, result.stderr
    assert not (tmp_path / "killed.h5").exists()
    tree = attnformat.open(tmp_path / "killed.h5.partial.zarr")
    assert tree.attrs["completeness"] == "incomplete"
    assert tree["self"]["step"].values.tolist() == [10, 20]
    np.testing.assert_array_equal(tree["self"]["weights"].sel(step=20).values, np.full((2, 2), 0.5, np.float32))


def test_existing_file_is_kept_until_the_new_one_is_complete(tmp_path):
    path = attnformat.save(xr.DataTree.from_dict({"/": attnformat.open(attnformat.example_path("dense")).to_dataset()} | {
        "/encoder/self": attnformat.open(attnformat.example_path("dense"))["encoder/self"].to_dataset()}), tmp_path / "keep.zarr")
    with pytest.raises(attnformat.AttnFormatError, match="already exists"):
        attnformat.Writer(path)
    writer = attnformat.Writer(path, overwrite=True)
    _declare(writer)
    assert attnformat.open(path)["encoder/self"]["weights"].shape == (2, 3, 6, 6)  # old file intact meanwhile
    writer.close()
    assert attnformat.open(path)["encoder/self"]["weights"].shape == (3, 2, 4, 4)


def test_edge_site_with_auxiliary_data(tmp_path):
    path = tmp_path / "graph.zarr"
    source, target = np.array([0, 1, 2, 0]), np.array([1, 2, 0, 0])
    with attnformat.Writer(path, model_name="gat", model_framework="numpy") as writer:
        site = writer.create_site(
            "gat", layout="edge", sizes={"head": 2, "edge": 4},
            coords={"source": ("edge", source), "target": ("edge", target), "node_label": ("node", ["x", "y", "z"])},
            attrs={"edge_node_dim": "node", "attention_type": "self", "causal": 0, "self_loops_added": 1},
        )
        site.write("weights", np.array([[1.0, 1.0, 0.5, 0.5], [1.0, 1.0, 0.25, 0.75]]))
    tree = attnformat.open(path)
    assert attnformat.validate(tree).findings == []
    assert tree["gat"]["source"].values.tolist() == [0, 1, 2, 0]


def test_bitround_in_the_writer_is_declared(tmp_path):
    path = tmp_path / "lossy.zarr"
    values = softmax(np.random.default_rng(1).normal(size=(2, 4, 4)))
    with attnformat.Writer(path, model_name="toy", model_framework="numpy") as writer:
        site = writer.create_site("self", sizes={"head": 2, "query": 4, "key": 4}, keepbits={"weights": 6}, attrs={"attention_type": "self", "causal": 0})
        site.write("weights", values)
    stored = attnformat.open(path)["self"]["weights"]
    assert stored.attrs["lossy_keepbits"] == 6
    assert np.max(np.abs(stored.values - values) / values) <= 2.0**-7
    assert attnformat.validate(path).ok


def test_leading_dimensions_declared_empty_grow_as_labels_arrive(tmp_path):
    path = tmp_path / "grow.zarr"
    with attnformat.Writer(path, model_name="toy", model_framework="numpy") as writer:
        site = writer.create_site("self", sizes={"layer": 0, "head": 2, "query": 2, "key": 2}, attrs={"attention_type": "self", "causal": 0})
        for layer in (4, 2, 7):
            site.write("weights", np.full((2, 2, 2), 0.5) * [[[1]], [[1]]], layer=layer)
        with pytest.raises(attnformat.WriterError, match="layer=2 exists already"):
            site.append_label("layer", 2)
        with pytest.raises(attnformat.WriterError, match="head 5 not in"):
            site.write("weights", np.full((2, 2), 0.5), layer=4, head=5)
    weights = attnformat.open(path)["self"]["weights"]
    assert weights.layer.values.tolist() == [4, 2, 7]
    assert weights.shape == (3, 2, 2, 2) and not np.isnan(weights.values).any()


@pytest.mark.parametrize("write_behind", [False, True])
def test_write_behind_gives_the_same_file(tmp_path, write_behind):
    rng = np.random.default_rng(3)
    weights = softmax(rng.normal(size=(4, 3, 8, 8))).astype(np.float32)
    path = tmp_path / f"behind-{write_behind}.zarr"
    with attnformat.Writer(path, write_behind=write_behind, model_name="toy", model_framework="numpy") as writer:
        site = writer.create_site("self", sizes={"step": 0, "layer": 4, "head": 3, "query": 8, "key": 8}, attrs={"attention_type": "self", "causal": 0})
        for step in (1, 2):
            for layer in range(4):
                site.write("weights", weights[layer] * 1.0, layer=layer, step=step)
    stored = attnformat.open(path)["self"]["weights"]
    np.testing.assert_array_equal(stored.sel(step=2).values, weights)
    np.testing.assert_array_equal(stored.sel(step=1).values, weights)


@pytest.mark.parametrize("tensorstore", [False, True])
def test_write_behind_stores_the_values_given_even_when_the_caller_reuses_its_buffer(tmp_path, monkeypatch, tensorstore):
    """With write-behind, write returns while the region is still being stored, from a staging copy
    reused from write to write: each stored region must hold the values as they were when written,
    whatever the caller does with its buffer afterwards, across region sizes and a float64 input."""
    if not tensorstore:
        monkeypatch.setitem(sys.modules, "tensorstore", None)  # as if it were not installed: zarr-python writes
    rng = np.random.default_rng(11)
    expected = softmax(rng.normal(size=(3, 4, 16, 16)))
    buffer = np.empty((4, 16, 16))  # float64: converted to the file's float32 on the way
    path = tmp_path / "reused.zarr"
    with attnformat.Writer(path, write_behind=True, model_name="toy", model_framework="numpy") as writer:
        site = writer.create_site("self", sizes={"layer": 3, "head": 4, "query": 16, "key": 16}, attrs={"attention_type": "self", "causal": 0})
        for head in range(4):  # small regions first
            buffer[0] = expected[0, head]
            site.write("weights", buffer[0], layer=0, head=head)
            buffer[0] = np.nan  # the caller reuses its buffer at once
        for layer in (1, 2):  # then whole layers
            buffer[:] = expected[layer]
            site.write("weights", buffer, layer=layer)
            buffer[:] = -1.0
    stored = attnformat.open(path)["self"]["weights"].values
    np.testing.assert_array_equal(stored, expected.astype(np.float32))
