"""Several processes writing one store: a layout declared once, then disjoint regions of whole chunks.

Why: two writers of one chunk both read it, merge their part and write it back, so one loses what
the other wrote (plain zarr writers of disjoint layers of a 12-layer array whose chunk holds all
layers lost 0 to 6 layers per run here). Region writers own whole chunks, so nothing is lost.

Every test runs real processes (``subprocess``, a fresh interpreter each) and checks the values
each process wrote against the formula it wrote them from, read back both through attnformat and
through zarr directly.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr

import attnformat
from attnformat.errors import WriterError
from attnformat.validation import validate
from attnformat.writer import finalize

LAYERS, HEADS, TOKENS = 12, 2, 5

# What a region writer process does: write expected(sample, layer) for its samples, layer by layer;
# "crash" stops the process dead (no cleanup) after writing `crash_after` layers.
_WORKER = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import attnformat

    path, dim, start, stop, crash_after, finalize = sys.argv[1:7]
    start, stop, crash_after = int(start), int(stop), int(crash_after)

    def expected(index, layer):
        return np.full((2, 5, 5), 1000 * index + layer + 0.5, dtype=np.float32)

    with attnformat.Writer(path, mode="r+", region={dim: slice(start, stop)}, finalize=finalize == "1") as writer:
        site = writer.sites["self"]
        if dim == "layer":
            for layer in range(start, stop):
                site.write("weights", np.stack([expected(s, layer) for s in range(4)]), layer=layer)
        else:
            for layer in range(12):
                if layer == crash_after:
                    os._exit(3)
                site.write("weights", np.stack([expected(i, layer) for i in range(start, stop)]), layer=layer)
            if dim == "sample":
                site.write_coordinate("query_label", np.array([[f"s{i}t{t}" for t in range(5)] for i in range(start, stop)], dtype=object))
    """
)


def _expected(index, layer):
    return np.full((HEADS, TOKENS, TOKENS), 1000 * index + layer + 0.5, dtype=np.float32)


def _declare(path, dim, width, count):
    sizes = {"sample": 4, "layer": LAYERS, "head": HEADS, "query": TOKENS, "key": TOKENS}
    coords = {"query_label": (("sample", "query"), np.full((4, TOKENS), "", dtype=object))}
    if dim == "sample":
        sizes["sample"] = count
        coords = {"query_label": (("sample", "query"), np.full((count, TOKENS), "", dtype=object))}
    if dim == "step":
        sizes = {"step": count, "layer": LAYERS, "head": HEADS, "query": TOKENS, "key": TOKENS}
        coords = {"step": [100 * (i + 1) for i in range(count)]}
    with attnformat.Writer(path, model_name="toy", model_framework="numpy", regions={dim: width}) as writer:
        writer.create_site("self", sizes=sizes, coords=coords, attrs={"normalization": "other", "attention_type": "self", "causal": 0})


def _run(path, dim, regions, *, crash=None, finalize_=True):
    """Start one process per region at once, wait for all; the return codes."""
    processes = []
    for start, stop in regions:
        crash_after = crash[1] if crash and crash[0] == (start, stop) else -1
        processes.append(subprocess.Popen([sys.executable, "-c", _WORKER, str(path), dim, str(start), str(stop), str(crash_after),
                                           "1" if finalize_ else "0"], stderr=subprocess.PIPE, text=True))
    codes = []
    for process in processes:
        _, err = process.communicate(timeout=120)
        codes.append((process.returncode, err))
    return codes


def test_four_processes_write_disjoint_samples_and_nothing_is_lost(tmp_path):
    path = tmp_path / "run.zarr"
    _declare(path, "sample", 2, 8)
    codes = _run(path, "sample", [(0, 2), (2, 4), (4, 6), (6, 8)])
    assert [code for code, _ in codes] == [0, 0, 0, 0], codes
    # the last writer sealed the file and moved it into place
    assert path.is_dir() and not (tmp_path / "run.zarr.partial.zarr").exists()
    tree = attnformat.open(path)
    assert attnformat.is_complete(tree)
    truth = np.stack([np.stack([_expected(i, layer) for layer in range(LAYERS)]) for i in range(8)])
    np.testing.assert_array_equal(tree["self"]["weights"].values, truth)
    # read independently of attnformat: the stored array itself
    np.testing.assert_array_equal(zarr.open_array(path / "self" / "weights", mode="r")[:], truth)
    assert tree["self"]["query_label"].values[5, 3] == "s5t3"
    assert validate(path).ok
    assert not (tmp_path / "run.zarr.regions").exists()  # the writers' bookkeeping is gone


def test_two_processes_write_halves_of_twelve_layers_and_every_layer_is_there(tmp_path):
    path = tmp_path / "layers.zarr"
    _declare(path, "layer", 6, 4)
    codes = _run(path, "layer", [(0, 6), (6, 12)])
    assert [code for code, _ in codes] == [0, 0], codes
    stored = zarr.open_array(path / "self" / "weights", mode="r")[:]
    truth = np.stack([np.stack([_expected(s, layer) for layer in range(LAYERS)]) for s in range(4)])
    assert int(np.isnan(stored[:, :, 0, 0, 0]).sum()) == 0
    np.testing.assert_array_equal(stored, truth)
    assert attnformat.is_complete(attnformat.open(path))


def test_processes_write_disjoint_steps(tmp_path):
    path = tmp_path / "steps.zarr"
    _declare(path, "step", 2, 4)
    codes = _run(path, "step", [(0, 2), (2, 4)])
    assert [code for code, _ in codes] == [0, 0], codes
    tree = attnformat.open(path)
    assert tree["self"]["step"].values.tolist() == [100, 200, 300, 400]
    truth = np.stack([np.stack([_expected(i, layer) for layer in range(LAYERS)]) for i in range(4)])
    np.testing.assert_array_equal(zarr.open_array(path / "self" / "weights", mode="r")[:], truth)
    assert attnformat.is_complete(tree) and validate(path).ok


def test_a_crashed_writer_leaves_the_store_incomplete_and_readable_then_a_rerun_completes_it(tmp_path):
    path = tmp_path / "run.zarr"
    partial = tmp_path / "run.zarr.partial.zarr"
    _declare(path, "sample", 2, 4)
    codes = _run(path, "sample", [(0, 2), (2, 4)], crash=((2, 4), 5))
    assert [code for code, _ in codes] == [0, 3], codes
    assert not path.exists()  # not sealed: a region is missing
    tree = attnformat.open(partial)
    assert not attnformat.is_complete(tree)
    weights = zarr.open_array(partial / "self" / "weights", mode="r")[:]
    np.testing.assert_array_equal(weights[0:2], np.stack([np.stack([_expected(i, layer) for layer in range(LAYERS)]) for i in (0, 1)]))
    np.testing.assert_array_equal(weights[2:4, :5], np.stack([np.stack([_expected(i, layer) for layer in range(5)]) for i in (2, 3)]))
    assert np.isnan(weights[2:4, 5:]).all()  # what the crashed process never wrote
    np.testing.assert_array_equal(tree["self"]["weights"].values[2, 4], _expected(2, 4))
    with pytest.raises(WriterError, match=r"regions sample=2:4 are not written"):
        finalize(path)
    # the crashed writer's claim is stale (its lock died with it): the region is written again
    codes = _run(path, "sample", [(2, 4)])
    assert [code for code, _ in codes] == [0], codes
    tree = attnformat.open(path)
    assert attnformat.is_complete(tree) and validate(path).ok
    truth = np.stack([np.stack([_expected(i, layer) for layer in range(LAYERS)]) for i in range(4)])
    np.testing.assert_array_equal(tree["self"]["weights"].values, truth)


def test_finalize_keeps_what_a_run_that_lost_a_process_wrote_marked_incomplete(tmp_path):
    path = tmp_path / "run.zarr"
    _declare(path, "sample", 2, 4)
    codes = _run(path, "sample", [(0, 2), (2, 4)], crash=((0, 2), 0))
    assert [code for code, _ in codes] == [3, 0], codes
    finalize(path, allow_incomplete=True)
    tree = attnformat.open(path)
    assert not attnformat.is_complete(tree)
    values = tree["self"]["weights"].values
    assert np.isnan(values[0:2]).all()
    np.testing.assert_array_equal(values[3, 7], _expected(3, 7))
    report = validate(path)
    assert report.ok and report.warnings  # incomplete is a warning (ATTN-ROOT-008), not an error


def test_explicit_finalize_after_writers_told_not_to(tmp_path):
    path = tmp_path / "run.h5"  # the sealed store is converted for another engine
    _declare(path, "sample", 2, 4)
    codes = _run(path, "sample", [(0, 2), (2, 4)], finalize_=False)
    assert [code for code, _ in codes] == [0, 0], codes
    assert not path.exists()
    finalize(path)
    tree = attnformat.open(path)
    assert attnformat.is_complete(tree)
    np.testing.assert_array_equal(tree["self"]["weights"].values[1, 11], _expected(1, 11))


def test_a_region_that_splits_a_stored_chunk_is_refused(tmp_path):
    path = tmp_path / "run.zarr"
    _declare(path, "sample", 4, 8)
    with pytest.raises(WriterError, match=r"region sample=2:6 splits the stored chunks of self/\w+ \(4 sample per chunk\)"):
        attnformat.Writer(path, mode="r+", region={"sample": slice(2, 6)})


def test_overlapping_regions_are_refused_while_written_and_once_written(tmp_path):
    path = tmp_path / "run.zarr"
    _declare(path, "sample", 2, 6)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, attnformat
        writer = attnformat.Writer({str(path)!r}, mode="r+", region={{"sample": slice(0, 4)}})
        print("claimed", flush=True)
        sys.stdin.readline()
        writer.close(complete=False)
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(WriterError, match=rf"overlaps sample=0:4, which pid {holder.pid} is writing"):
            attnformat.Writer(path, mode="r+", region={"sample": slice(2, 6)})
    finally:
        holder.communicate("\n", timeout=60)
    with attnformat.Writer(path, mode="r+", region={"sample": slice(4, 6)}) as writer:
        writer.sites["self"].write("weights", np.zeros((2, LAYERS, HEADS, TOKENS, TOKENS)))
    with pytest.raises(WriterError, match=r"overlaps sample=4:6, which is written already"):
        attnformat.Writer(path, mode="r+", region={"sample": slice(4, 6)})


def test_writes_outside_the_region_and_by_the_declaring_writer_are_refused(tmp_path):
    path = tmp_path / "run.zarr"
    writer = attnformat.Writer(path, regions={"sample": 2})
    site = writer.create_site("self", sizes={"sample": 4, "query": 2, "key": 2})
    with pytest.raises(WriterError, match="only declares the store"):
        site.write("weights", np.zeros((4, 2, 2)))
    writer.close()
    assert not path.exists() and not attnformat.is_complete(attnformat.open(tmp_path / "run.zarr.partial.zarr"))
    with attnformat.Writer(path, mode="r+", region={"sample": slice(0, 2)}, finalize=False) as region:
        with pytest.raises(WriterError, match=r"sample 2:3 lies outside this writer's region sample=0:2"):
            region.sites["self"].write("weights", np.zeros((2, 2)), sample=2)
        with pytest.raises(WriterError, match="declares none"):
            region.create_site("other", sizes={"query": 2, "key": 2})
        region.sites["self"].write("weights", np.full((2, 2), 0.25), sample=1)
    stored = zarr.open_array(tmp_path / "run.zarr.partial.zarr" / "self" / "weights", mode="r")[:]
    assert np.isnan(stored[0]).all() and (stored[1] == 0.25).all() and np.isnan(stored[2:]).all()


def test_region_mode_needs_a_declared_store(tmp_path):
    with pytest.raises(WriterError, match="has no declared store"):
        attnformat.Writer(tmp_path / "none.zarr", mode="r+", region={"sample": slice(0, 1)})
