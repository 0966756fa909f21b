"""Whole-file computations as dask graphs: statistics, value checks and head means give the numbers
the file's own arrays give (read independently with zarr-python), the same with every scheduler
(synchronous, threads, a dask.distributed LocalCluster of 2 worker processes), and read the file
in bounded pieces."""

from __future__ import annotations

import dask
import numpy as np
import pytest
import zarr

import attnformat
from attnformat import compute
from attnformat.engines import zarr_sync
from attnformat.errors import AttnFormatError
from attnformat.viewer import statistics as statistics_module
from attnformat.viewer.statistics import attention_statistics, statistics_summary

SITE = "decoder/self"
LAYERS, HEADS, TOKENS = 3, 4, 40
BAD_LAYER = 2  # rows of this layer's head 1 sum to 1.5, and its head 3 puts weight on future keys


def _maps(rng) -> np.ndarray:
    logits = rng.standard_normal((LAYERS, HEADS, TOKENS, TOKENS)) * 2
    logits = np.where(np.triu(np.ones((TOKENS, TOKENS), bool), 1), -np.inf, logits)
    values = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (values / values.sum(axis=-1, keepdims=True)).astype(np.float32)


def _write(path, values):
    with attnformat.Writer(path, model_name="test") as writer:
        site = writer.create_site(SITE, sizes={"layer": LAYERS, "head": HEADS, "query": TOKENS, "key": TOKENS},
                                  attrs={"attention_type": "self", "causal": 1})
        for layer in range(LAYERS):
            site.write("weights", values[layer], layer=layer)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dask-compute")
    good = _maps(np.random.default_rng(11))
    bad = good.copy()
    bad[BAD_LAYER, 1, 5:9] *= 1.5  # 4 rows sum to 1.5
    bad[BAD_LAYER, 3, 0, 1:3] = 0.25  # first row: weight on 2 future keys (and the row sums to 1.5)
    return _write(folder / "good.zarr", good), _write(folder / "bad.zarr", bad)


@pytest.fixture(scope="module")
def cluster_client():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            yield client


def _independent(path) -> np.ndarray:
    return zarr.open_array(str(path / SITE / "weights"), mode="r")[...].astype(np.float64)


def test_statistics_equal_numpy_on_the_files_own_arrays(files):
    good, _ = files
    values = _independent(good)
    summary = statistics_summary(good, scheduler="threads", progress=False)
    positions = np.arange(TOKENS)
    local = np.abs(positions[:, None] - positions[None, :]) <= statistics_module.LOCAL_WINDOW
    for layer, entry in enumerate(summary["sites"][SITE]):
        assert entry["mean"] == pytest.approx(values[layer].mean(), abs=1e-6)
        assert entry["max"] == pytest.approx(values[layer].max(), abs=1e-6)
        for head, numbers in enumerate(entry["heads"]):
            one = values[layer, head]
            with np.errstate(divide="ignore", invalid="ignore"):
                entropy = np.where(one > 0, -one * np.log(one), 0.0).sum(axis=-1).mean()
            profile = one.mean(axis=0)
            assert numbers["mean"] == pytest.approx(one.mean(), abs=1e-6)
            assert numbers["std"] == pytest.approx(one.std(), abs=1e-6)
            assert numbers["min"] == pytest.approx(one.min(), abs=1e-6)
            assert numbers["entropy"] == pytest.approx(entropy, abs=1e-6)
            assert numbers["sink_score"] == pytest.approx(profile[0] - profile[1:-1].mean(), abs=1e-6)
            assert numbers["local_mean"] == pytest.approx(one[local].mean(), abs=1e-6)
            assert numbers["global_mean"] == pytest.approx(one[~local].mean(), abs=1e-6)


def test_statistics_are_identical_with_every_scheduler(files, cluster_client):
    good, _ = files
    reference = statistics_summary(good, scheduler="synchronous", progress=False)
    assert statistics_summary(good, scheduler="threads", progress=False) == reference
    # "A LocalCluster with 2 workers gives the same numbers as the local scheduler."
    assert statistics_summary(good, scheduler=cluster_client, progress=False) == reference
    address = cluster_client.scheduler.address
    assert statistics_summary(good, scheduler=address, progress=False) == reference
    per_map = attention_statistics(good, scheduler=cluster_client)
    np.testing.assert_array_equal(per_map["mean"].values, attention_statistics(good, scheduler="synchronous")["mean"].values)


def test_value_checks_find_the_broken_rows_with_every_scheduler(files, cluster_client):
    _, bad = files
    reports = {name: attnformat.validate(bad, scheduler=scheduler, progress=False).to_dict()
               for name, scheduler in (("synchronous", "synchronous"), ("threads", "threads"), ("cluster", cluster_client))}
    assert reports["threads"] == reports["synchronous"] == reports["cluster"]
    # Ground truth from the file's own values: rows off 1 and weights on future keys.
    values = _independent(bad)
    sums = values.sum(axis=-1)
    off = int((np.abs(sums - 1) > 1e-3).sum())
    future = int(((values > 1e-6) & np.triu(np.ones((TOKENS, TOKENS), bool), 1)).sum())
    messages = {finding["rule_id"]: finding["message"] for finding in reports["threads"]["findings"]}
    assert messages["ATTN-VAL-002"].startswith(f"{off} rows do not sum to 1")
    assert f"layer={BAD_LAYER}, head=1" in messages["ATTN-VAL-002"]
    assert messages["ATTN-VAL-003"].startswith(f"{future} weights on future keys")
    good, _ = files
    assert attnformat.validate(good, scheduler=cluster_client, progress=False).ok


@pytest.mark.parametrize("suffix", [".zarr.zip", ".h5"])
def test_zip_and_hdf5_files_give_the_same_findings_and_statistics_with_threads(files, tmp_path, suffix):
    good, bad = files
    for source in (good, bad):
        copy = tmp_path / (source.name.split(".")[0] + suffix)
        with dask.config.set(scheduler="synchronous"):  # the cluster fixture may be the default scheduler
            attnformat.convert(source, copy)
        assert (attnformat.validate(copy, scheduler="threads", progress=False).to_dict()["findings"]
                == attnformat.validate(copy, scheduler="synchronous", progress=False).to_dict()["findings"]
                == attnformat.validate(source, scheduler="synchronous", progress=False).to_dict()["findings"])
        threads = statistics_summary(copy, scheduler="threads", progress=False)
        assert threads["sites"] == statistics_summary(source, scheduler="synchronous", progress=False)["sites"]


def test_convert_works_while_a_cluster_client_is_the_default_scheduler(files, tmp_path, cluster_client):
    """A distributed Client makes itself dask's default scheduler; copying a file must not send the
    engine's lazy arrays (which refuse to be pickled) to its workers."""
    import dask.base

    good, _ = files
    assert dask.base.get_scheduler() == cluster_client.get  # the client is the default here
    for suffix in (".h5", ".zarr.zip"):
        copy = tmp_path / f"copy{suffix}"
        attnformat.convert(good, copy)
        np.testing.assert_array_equal(attnformat.open(copy)[SITE]["weights"].values,
                                      zarr.open_array(str(good / SITE / "weights"), mode="r")[...])


def test_a_damaged_chunk_found_in_a_worker_is_the_same_finding(tmp_path, files, cluster_client):
    good, _ = files
    damaged = tmp_path / "damaged.zarr"
    _write(damaged, _maps(np.random.default_rng(11)))
    chunk = sorted(p for p in (damaged / SITE / "weights" / "c").rglob("*") if p.is_file())[0]
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x04
    chunk.write_bytes(bytes(raw))
    local = attnformat.validate(damaged, scheduler="synchronous", progress=False)
    remote = attnformat.validate(damaged, scheduler=cluster_client, progress=False)
    assert local.damaged and remote.to_dict() == local.to_dict()
    with pytest.raises(AttnFormatError, match="ATTN-STORE-005"):
        statistics_summary(damaged, scheduler=cluster_client, progress=False)


def test_head_means_equal_numpy(files):
    good, _ = files
    site = attnformat.open(good)[SITE]
    expected = _independent(good).mean(axis=1)
    for scheduler in ("synchronous", "threads"):
        np.testing.assert_allclose(compute.head_mean(site, scheduler=scheduler), expected, rtol=1e-12)


def test_rollout_over_layers_equals_numpy_with_every_scheduler(files, cluster_client):
    from attnformat.viewer.rollout import attention_rollout

    good, _ = files
    values = _independent(good).mean(axis=1)  # head means per layer
    expected = np.eye(TOKENS)
    for layer in values:
        layer = layer + np.eye(TOKENS)
        expected = (layer / layer.sum(axis=-1, keepdims=True)) @ expected
    for scheduler in ("synchronous", "threads", cluster_client):
        rolled = attention_rollout(good, scheduler=scheduler, progress=False)
        np.testing.assert_allclose(rolled.values, expected, rtol=1e-6, atol=1e-9)  # head means in float32
        assert rolled.described["layer"] == f"rollout 0..{LAYERS - 1}"


def test_reads_are_bounded_by_the_block_size_not_the_file(tmp_path, monkeypatch):
    """Bounded memory without timing: with blocks of 8 rows, no read is larger than 8 rows of one
    map, the graph has one task per stored chunk (one map each here), and every value is read."""
    tokens = 256  # maps of 256 x 256 are stored one per chunk
    rng = np.random.default_rng(5)
    values = rng.random((LAYERS, HEADS, tokens, tokens)).astype(np.float32)
    values /= values.sum(axis=-1, keepdims=True)
    path = tmp_path / "blocks.zarr"
    with attnformat.Writer(path, model_name="test") as writer:
        site = writer.create_site(SITE, sizes={"layer": LAYERS, "head": HEADS, "query": tokens, "key": tokens},
                                  attrs={"attention_type": "self", "causal": 0})
        for layer in range(LAYERS):
            site.write("weights", values[layer], layer=layer)
    stored = zarr.open_array(str(path / SITE / "weights"), mode="r").chunks
    assert stored == (1, 1, tokens, tokens)
    sizes = []
    original = zarr_sync.read_outer

    def recording(*args, **kwargs):
        found = original(*args, **kwargs)
        sizes.append(found.nbytes)
        return found

    monkeypatch.setattr(zarr_sync, "read_outer", recording)
    monkeypatch.setattr(statistics_module, "_BLOCK_ELEMENTS", 8 * tokens)
    monkeypatch.setattr(compute, "TASK_BYTES", tokens * tokens * 4)
    tasks = []
    real_run = compute.run
    monkeypatch.setattr(compute, "run", lambda work, **options: tasks.append(len(work)) or real_run(work, **options))
    summary = statistics_summary(path, scheduler="threads", progress=False)
    assert max(sizes) <= 8 * tokens * 4
    assert sum(sizes) >= values.nbytes
    assert tasks == [LAYERS * HEADS]
    assert summary["sites"][SITE][1]["heads"][2]["max"] == pytest.approx(float(values[1, 2].max()), abs=1e-6)


def test_in_memory_trees_are_computed_here_only(files):
    good, _ = files
    tree = attnformat.open(good).load()
    tree.encoding = {}
    with pytest.raises(AttnFormatError, match="in memory"):
        statistics_summary(tree, scheduler="processes")
    assert statistics_summary(tree, scheduler="threads", progress=False)["sites"][SITE]


def test_bad_scheduler_values_are_one_line_errors():
    for value in ("bogus", 3):
        with pytest.raises(AttnFormatError, match="scheduler"):
            compute.scheduler_name(value)
    with pytest.raises(AttnFormatError, match=r"cannot reach the dask scheduler at tcp://127\.0\.0\.1:1 within 0\.5 s"):
        compute.connect("tcp://127.0.0.1:1", timeout=0.5)


@pytest.mark.parametrize("rule", ["ATTN-TOPK-002", "ATTN-TOPK-003", "ATTN-TOPK-004", "ATTN-VAL-001", "ATTN-VAL-002",
                                  "ATTN-VAL-003", "ATTN-VAL-004", "ATTN-STAT-002"])
def test_conformance_files_get_the_same_findings_on_a_cluster(rule, cluster_client):
    """The spec's invalid files (each breaks one value rule) are judged alike by every scheduler."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "spec" / "conformance" / "invalid" / f"{rule}.zarr"
    reports = [attnformat.validate(path, scheduler=scheduler, progress=False).to_dict()
               for scheduler in ("synchronous", "threads", cluster_client)]
    assert reports[0] == reports[1] == reports[2]
    assert rule in {finding["rule_id"] for finding in reports[0]["findings"]}


def test_a_forked_child_computes_after_its_parent_did(files):
    """dask caches thread pools per thread; a child forked after the parent computed must not hand
    its tasks to the parent's threads (which the child does not have) and wait forever."""
    import os
    import signal

    good, _ = files
    expected = statistics_summary(good, scheduler="threads", progress=False)
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if it computes the same numbers (the alarm ends a hang)
        signal.alarm(120)
        try:
            same = statistics_summary(good, scheduler="threads", progress=False) == expected
            ok = attnformat.validate(good, scheduler="threads", progress=False).ok
            os._exit(0 if same and ok else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
