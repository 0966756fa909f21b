"""Many files as one tree (attnformat.open_many): joined along sample, step or a new run dimension,
lazily; the values of the joined tree are checked against each file read on its own with zarr."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr

import attnformat
from attnformat.collection import CollectionError, collection_paths, collection_statistics, open_many
from attnformat.viewer import statistics_summary

LAYERS, HEADS = 2, 3


def _softmax(rng, shape):
    logits = rng.normal(size=shape)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (weights / weights.sum(axis=-1, keepdims=True)).astype(np.float32)


def _capture(path, tokens, seed, *, steps=None, layers=(0, 1), complete=True):
    """One capture (a prompt, a checkpoint, a rank's file) of ``tokens`` tokens."""
    rng = np.random.default_rng(seed)
    sizes = {"layer": len(layers), "head": HEADS, "query": tokens, "key": tokens}
    coords = {"layer": list(layers), "query_label": ("query", [f"t{i}" for i in range(tokens)]),
              "key_label": ("key", [f"t{i}" for i in range(tokens)])}
    if steps is not None:
        sizes["step"] = 0
    writer = attnformat.Writer(path, model_name="toy", model_framework="numpy")
    site = writer.create_site("encoder/self", sizes=sizes, coords=coords, attrs={"attention_type": "self", "causal": 0})
    for step in steps or [None]:
        for layer in layers:
            extra = {} if step is None else {"step": step}
            site.write("weights", _softmax(rng, (HEADS, tokens, tokens)), layer=layer, **extra)
    writer.close(complete=complete)
    return path


def _stored(path):
    """The weights as stored, read with zarr (not through attnformat)."""
    return zarr.open_array(path / "encoder" / "self" / "weights", mode="r")[:]


def test_samples_of_different_lengths_are_padded_and_masked(tmp_path):
    paths = [_capture(tmp_path / f"prompt{i}.zarr", tokens, seed=i) for i, tokens in enumerate((3, 5, 4))]
    tree = open_many(tmp_path / "prompt*.zarr", dim="sample")
    site = tree["encoder/self"]
    weights = site["weights"]
    assert weights.dims == ("sample", "layer", "head", "query", "key") and weights.shape == (3, LAYERS, HEADS, 5, 5)
    values = weights.values
    for i, (path, tokens) in enumerate(zip(paths, (3, 5, 4))):
        np.testing.assert_array_equal(values[i, :, :, :tokens, :tokens], _stored(path))
        assert np.isnan(values[i, :, :, tokens:, :]).all() and np.isnan(values[i, :, :, :, tokens:]).all()
        assert site["query_mask"].values[i].tolist() == [True] * tokens + [False] * (5 - tokens)
        assert site["key_label"].values[i].tolist() == [f"t{j}" for j in range(tokens)] + [""] * (5 - tokens)
    assert site["source_file"].values.tolist() == ["prompt0.zarr", "prompt1.zarr", "prompt2.zarr"]
    assert site["sample"].values.tolist() == [0, 1, 2]
    assert attnformat.is_complete(tree)
    # statistics over the collection pool every real value of every file
    summary = statistics_summary(tree)
    real = np.concatenate([_stored(p)[0].ravel() for p in paths])
    assert summary["sites"]["encoder/self"][0]["mean"] == pytest.approx(float(real.mean()), rel=1e-6)
    assert summary["sites"]["encoder/self"][0]["max"] == pytest.approx(float(real.max()), rel=1e-6)


def test_selections_read_only_the_files_they_cover_and_chunks_give_dask(tmp_path):
    paths = [_capture(tmp_path / f"p{i}.zarr", 3 + i, seed=i) for i in range(3)]
    tree = open_many(paths)
    chunked = open_many(paths, chunks="stored")
    weights = chunked["encoder/self"]["weights"]
    assert weights.chunks is not None and weights.chunks[0] == (1, 1, 1)  # file by file along sample
    np.testing.assert_array_equal(weights.values, tree["encoder/self"]["weights"].values)
    # take the last file away: what lies in the other files still reads, that file's samples do not
    shutil.rmtree(paths[2] / "encoder" / "self" / "weights" / "c")
    np.testing.assert_array_equal(tree["encoder/self"]["weights"].isel(sample=1, layer=0).values[:, :4, :4], _stored(paths[1])[0])
    with pytest.raises(attnformat.errors.AttnFormatError, match="p2.zarr"):
        tree["encoder/self"]["weights"].isel(sample=2).values


def test_checkpoints_join_along_step_in_step_order(tmp_path):
    for step in (200, 1000, 30):
        _capture(tmp_path / f"ckpt-{step}.zarr", 4, seed=step)
    tree = open_many(tmp_path, dim="step")
    weights = tree["encoder/self"]["weights"]
    assert tree["encoder/self"]["step"].values.tolist() == [30, 200, 1000]  # from the names, sorted by step
    for position, step in enumerate((30, 200, 1000)):
        np.testing.assert_array_equal(weights.isel(step=position).values, _stored(tmp_path / f"ckpt-{step}.zarr"))
    # files that hold their own steps keep them
    for part, steps in enumerate(([1, 2], [3])):
        _capture(tmp_path / "own" / f"part{part}.zarr", 4, seed=part, steps=steps)
    tree = open_many(tmp_path / "own", dim="step")
    assert tree["encoder/self"]["step"].values.tolist() == [1, 2, 3]
    np.testing.assert_array_equal(tree["encoder/self"]["weights"].sel(step=3).values, _stored(tmp_path / "own" / "part1.zarr")[0])
    with pytest.raises(CollectionError, match=r"part0.zarr: step 1 repeats or comes out of order after step 2"):
        open_many([tmp_path / "own" / "part0.zarr", tmp_path / "own" / "part0.zarr"], dim="step")
    with pytest.raises(CollectionError, match="the files hold their own steps; coords= gives the steps of files without"):
        open_many(tmp_path / "own", dim="step", coords=[5, 6])


def test_runs_join_along_a_new_dimension_with_statistics_per_run(tmp_path):
    paths = [_capture(tmp_path / f"seed{i}.zarr", 4, seed=10 + i) for i in range(3)]
    tree = open_many(paths, dim="run", coords=["a", "b", "c"])
    weights = tree["encoder/self"]["weights"]
    assert weights.dims[0] == "run" and tree["encoder/self"]["run"].values.tolist() == ["a", "b", "c"]
    np.testing.assert_array_equal(weights.sel(run="b").values, _stored(paths[1]))
    result = collection_statistics(tree)
    assert result["dim"] == "run" and result["files"] == 3
    for label, path in zip("abc", paths):
        alone = statistics_summary(attnformat.open(path))["sites"]["encoder/self"]
        joined = result["summaries"][label]["sites"]["encoder/self"]
        for mine, theirs in zip(joined, alone):
            assert mine["mean"] == pytest.approx(theirs["mean"]) and mine["entropy"] == pytest.approx(theirs["entropy"])
            assert mine["heads"][2]["max"] == pytest.approx(theirs["heads"][2]["max"])


def test_per_rank_files_joined_like_one_file_of_all_samples(tmp_path):
    # each "rank" writes its own file of 2 samples; the joined tree equals the samples side by side
    rng = np.random.default_rng(0)
    truth = _softmax(rng, (6, LAYERS, HEADS, 4, 4))
    for rank in range(3):
        with attnformat.Writer(tmp_path / f"rank{rank}.zarr") as writer:
            site = writer.create_site("encoder/self", sizes={"sample": 2, "layer": LAYERS, "head": HEADS, "query": 4, "key": 4})
            for layer in range(LAYERS):
                site.write("weights", truth[2 * rank:2 * rank + 2, layer], layer=layer)
    tree = open_many(tmp_path, dim="sample")
    np.testing.assert_array_equal(tree["encoder/self"]["weights"].values, truth)
    assert "query_mask" not in tree["encoder/self"].coords  # same lengths: nothing padded


def test_files_that_disagree_are_refused_naming_the_first_that_differs(tmp_path):
    _capture(tmp_path / "a.zarr", 4, seed=1)
    _capture(tmp_path / "b.zarr", 5, seed=2)
    _capture(tmp_path / "c.zarr", 4, seed=3, layers=(0, 7))
    with pytest.raises(CollectionError, match=r"b.zarr:encoder/self: dimension 'query' has size 5, but 4 in .*a.zarr \(samples of"):
        open_many([tmp_path / "a.zarr", tmp_path / "b.zarr"], dim="run")
    with pytest.raises(CollectionError, match=r"c.zarr:encoder/self: layer labels \[0, 7\] differ from \[0, 1\]"):
        open_many([tmp_path / "a.zarr", tmp_path / "c.zarr"], dim="sample")
    other = tmp_path / "d.zarr"
    with attnformat.Writer(other) as writer:
        writer.create_site("decoder/self", sizes={"query": 2, "key": 2}).write("weights", np.full((2, 2), 0.5))
    with pytest.raises(CollectionError, match=r"d.zarr: lacks site\(s\) encoder/self"):
        open_many([tmp_path / "a.zarr", other])
    with pytest.raises(CollectionError, match="no step dimension and no number in the file name"):
        open_many([tmp_path / "a.zarr", tmp_path / "b.zarr"], dim="step")
    with pytest.raises(CollectionError, match="cannot join files along 'layer'"):
        open_many([tmp_path / "a.zarr"], dim="layer")


def test_an_incomplete_file_makes_the_collection_incomplete_and_partial_stores_are_skipped(tmp_path):
    _capture(tmp_path / "a.zarr", 3, seed=1)
    _capture(tmp_path / "b.h5", 3, seed=2, complete=False)
    shutil.copytree(tmp_path / "a.zarr", tmp_path / "c.zarr.partial.zarr")
    assert [p.rsplit("/", 1)[-1] for p in collection_paths(tmp_path)] == ["a.zarr", "b.h5"]
    tree = open_many(tmp_path)
    assert not attnformat.is_complete(tree)
    assert tree.encoding["sources"][1].endswith("b.h5")


def test_twenty_files_open_as_one(tmp_path):
    first = _capture(tmp_path / "f00.zarr", 3, seed=0)
    for i in range(1, 20):
        shutil.copytree(first, tmp_path / f"f{i:02d}.zarr")
    tree = open_many(str(tmp_path / "f*.zarr"))
    weights = tree["encoder/self"]["weights"]
    assert weights.sizes["sample"] == 20
    np.testing.assert_array_equal(weights.isel(sample=17).values, _stored(first))
    assert float(weights.sum(["key"]).mean()) == pytest.approx(1.0, abs=1e-6)


def test_the_descriptor_limit_is_raised_for_many_files_or_the_refusal_says_why(tmp_path):
    # each open .zarr keeps a descriptor (its pin): 2,000 files exceed the usual soft limit of 1,024
    first = _capture(tmp_path / "f00.zarr", 3, seed=0)
    for i in range(1, 5):
        shutil.copytree(first, tmp_path / f"f{i:02d}.zarr")
    script = textwrap.dedent(f"""
        import resource
        from attnformat.collection import open_many, CollectionError
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, 1000))
        tree = open_many({str(tmp_path)!r})
        print(tree["encoder/self"]["weights"].sizes["sample"], resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100))
        try:
            open_many({str(tmp_path)!r})
        except CollectionError as error:
            print(error)
        """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "5 261"
    assert lines[1] == "5 files need about 261 open file descriptors, but this process may open 100 (ulimit -n); raise the limit or open fewer files at once"
