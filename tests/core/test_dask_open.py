"""attnformat.open(path, chunks=...): dask arrays aligned with the stored chunks, few tasks, the
file's own values (read independently with zarr-python and h5py), checked reads."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import dask
import h5py
import numpy as np
import pytest
import xarray as xr
import zarr

import attnformat
from attnformat.compute import plan_chunks
from attnformat.engines import Location, engine_for
from attnformat.errors import AttnFormatError, BrokenStoreError

SITE = "encoder/self"
SHAPE = {"layer": 3, "head": 4, "query": 48, "key": 48}


def _weights() -> np.ndarray:
    rng = np.random.default_rng(3)
    logits = rng.standard_normal(tuple(SHAPE.values())).astype(np.float32)
    values = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (values / values.sum(axis=-1, keepdims=True)).astype(np.float32)


def _write(path: Path, *, many_small: bool = False) -> Path:
    values = _weights()
    with attnformat.Writer(path, model_name="test") as writer:
        site = writer.create_site(SITE, sizes=SHAPE, attrs={"attention_type": "self", "causal": 0})
        for layer in range(SHAPE["layer"]):
            if many_small:  # one write per map: what a capture hook does
                for head in range(SHAPE["head"]):
                    site.write("weights", values[layer, head], layer=layer, head=head)
            else:
                site.write("weights", values[layer], layer=layer)
    return path


@pytest.fixture(scope="module")
def zarr_file(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("dask-open") / "run.zarr")


@pytest.fixture(scope="module")
def h5_file(tmp_path_factory, zarr_file) -> Path:
    path = tmp_path_factory.mktemp("dask-open-h5") / "run.h5"
    attnformat.convert(zarr_file, path)
    return path


def _stored_chunk(path: Path, variable: str = f"{SITE}/weights") -> tuple[int, ...]:
    """The stored chunk shape, as the storage library itself reports it."""
    if path.suffix == ".h5":
        with h5py.File(path, "r") as handle:
            return tuple(handle[variable].chunks)
    return tuple(zarr.open_array(str(path / variable), mode="r").chunks)


def _independent(path: Path, variable: str = f"{SITE}/weights") -> np.ndarray:
    if path.suffix == ".h5":
        with h5py.File(path, "r") as handle:
            return handle[variable][...]
    return zarr.open_array(str(path / variable), mode="r")[...]


def test_default_and_none_keep_the_lazy_numpy_arrays(zarr_file):
    for tree in (attnformat.open(zarr_file), attnformat.open(zarr_file, chunks=None)):
        assert tree[SITE]["weights"].chunks is None
        np.testing.assert_array_equal(tree[SITE]["weights"].values, _independent(zarr_file))


@pytest.mark.parametrize("kind", ["zarr", "h5"])
def test_stored_gives_one_dask_chunk_per_stored_chunk(kind, zarr_file, h5_file):
    path = zarr_file if kind == "zarr" else h5_file
    stored = _stored_chunk(path)
    for chunks in ("stored", {}):
        weights = attnformat.open(path, chunks=chunks)[SITE]["weights"]
        assert isinstance(weights.data, dask.array.Array)
        for lengths, chunk, size in zip(weights.chunks, stored, weights.shape):
            assert lengths == tuple(min(chunk, size - start) for start in range(0, size, chunk))
        np.testing.assert_array_equal(weights.values, _independent(path))


def test_auto_merges_stored_chunks_into_few_tasks_never_splitting_one(tmp_path):
    path = _write(tmp_path / "small.zarr", many_small=True)
    stored = _stored_chunk(path)
    stored_count = math.prod(math.ceil(s / c) for s, c in zip(SHAPE.values(), stored))
    weights = attnformat.open(path, chunks="auto")[SITE]["weights"]
    # The whole variable (110 KB) fits one dask chunk: one read task, whatever the stored chunks.
    assert weights.data.npartitions == 1
    assert len(weights.data.__dask_graph__()) <= 2  # the source object and one read
    # Plain xarray + dask over the same store makes (at least) one task per stored chunk.
    plain = xr.open_datatree(path, engine="zarr", chunks={})[SITE]["weights"]
    assert plain.data.npartitions == stored_count
    assert weights.data.npartitions < plain.data.npartitions or stored_count == 1
    np.testing.assert_array_equal(weights.values, _independent(path))


def test_auto_chunks_are_whole_multiples_of_the_stored_chunks_and_bounded():
    dims = ("layer", "head", "query", "key")
    shape, stored = (12, 12, 2048, 2048), (1, 1, 256, 2048)
    target = 64 << 20
    plan = plan_chunks(dims, shape, stored, 4, "auto", target_bytes=target)
    for lengths, chunk in zip(plan, stored):
        starts = np.cumsum((0,) + lengths[:-1])
        assert all(start % chunk == 0 for start in starts)  # every dask chunk starts on a stored chunk
    largest = math.prod(max(lengths) for lengths in plan) * 4
    assert largest <= target
    assert largest >= target // 2  # merged, not left at 2 MiB stored chunks
    tasks = math.prod(len(lengths) for lengths in plan)
    assert tasks <= 2 * (12 * 12 * 2048 * 2048 * 4) // target


def test_a_dict_rounds_to_multiples_of_the_stored_chunk(zarr_file):
    stored = _stored_chunk(zarr_file)
    tree = attnformat.open(zarr_file, chunks={"layer": -1, "query": max(1, stored[2] + 1)})
    weights = tree[SITE]["weights"]
    assert weights.chunks[0] == (SHAPE["layer"],)
    assert all(length % stored[2] == 0 or length == SHAPE["query"] % stored[2] for length in weights.chunks[2])
    assert weights.chunks[1] == tuple(min(stored[1], SHAPE["head"] - s) for s in range(0, SHAPE["head"], stored[1]))
    np.testing.assert_array_equal(weights.values, _independent(zarr_file))


def test_reductions_equal_numpy_on_the_independently_read_array(zarr_file, h5_file):
    for path in (zarr_file, h5_file):
        expected = _independent(path).astype(np.float64)
        weights = attnformat.open(path, chunks="stored")[SITE]["weights"]
        for scheduler in ("synchronous", "threads"):
            means = weights.astype(np.float64).mean(("query", "key")).compute(scheduler=scheduler)
            np.testing.assert_allclose(means.values, expected.mean(axis=(2, 3)), rtol=1e-12)
            np.testing.assert_allclose(weights.max("key").compute(scheduler=scheduler).values, expected.max(axis=-1))


def test_a_dask_array_pickles_by_location_and_reads_the_same(zarr_file):
    weights = attnformat.open(zarr_file, chunks="stored")[SITE]["weights"].data
    copy = pickle.loads(pickle.dumps(weights))  # what a cluster worker receives
    np.testing.assert_array_equal(copy.compute(scheduler="synchronous"), _independent(zarr_file))


def test_a_damaged_chunk_is_an_error_through_dask(tmp_path, zarr_file):
    path = tmp_path / "damaged.zarr"
    _write(path)
    chunk = sorted(p for p in (path / SITE / "weights" / "c").rglob("*") if p.is_file())[-1]
    damaged = bytearray(chunk.read_bytes())
    damaged[len(damaged) // 2] ^= 0x10
    chunk.write_bytes(bytes(damaged))
    weights = attnformat.open(path, chunks="auto")[SITE]["weights"]
    with pytest.raises(BrokenStoreError, match=r"weights/c/.*ATTN-STORE-005"):
        weights.sum().compute(scheduler="synchronous")
    copy = pickle.loads(pickle.dumps(weights.data))  # a worker's copy reopens the file: checked too
    with pytest.raises(BrokenStoreError, match="ATTN-STORE-005"):
        copy.sum().compute(scheduler="synchronous")


def test_bad_chunks_values_are_one_line_errors(zarr_file):
    for chunks in ("huge", {"head": 0}, {"head": "many"}, 7):
        with pytest.raises(AttnFormatError, match="chunk"):
            attnformat.open(zarr_file, chunks=chunks)


def test_stored_chunks_agree_with_the_engine_listing(zarr_file):
    """The chunk shape dask follows is the one the engine lists chunk files with."""
    chunk_shape, _ = engine_for(zarr_file).stored_chunks(Location.of(zarr_file), f"{SITE}/weights")
    weights = attnformat.open(zarr_file, chunks="stored")[SITE]["weights"]
    assert tuple(lengths[0] for lengths in weights.chunks) == tuple(min(c, s) for c, s in zip(chunk_shape, weights.shape))


def test_a_worker_reads_the_new_version_of_a_replaced_file(tmp_path):
    """Workers keep files open between computations; a file replaced meanwhile is opened anew."""
    path = _write(tmp_path / "replaced.zarr")
    first = pickle.loads(pickle.dumps(attnformat.open(path, chunks="auto")[SITE]["weights"].data))
    np.testing.assert_array_equal(first.compute(scheduler="synchronous"), _weights())
    with attnformat.Writer(path, model_name="test", overwrite=True) as writer:
        site = writer.create_site(SITE, sizes=SHAPE, attrs={"attention_type": "self", "causal": 0})
        for layer in range(SHAPE["layer"]):
            site.write("weights", np.full((SHAPE["head"], SHAPE["query"], SHAPE["key"]), 1 / SHAPE["key"], np.float32), layer=layer)
    second = pickle.loads(pickle.dumps(attnformat.open(path, chunks="auto")[SITE]["weights"].data))
    np.testing.assert_array_equal(second.compute(scheduler="synchronous"), _independent(path))
    assert float(second.max().compute(scheduler="synchronous")) == np.float32(1 / SHAPE["key"])
