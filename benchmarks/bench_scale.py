"""Whole-file statistics at scale: ``attnformat stats`` as a dask graph against a plain numpy pass.

Three measurements, side by side, one run each (the machine may be shared: the numbers are what
was measured, not a best of many):

1. ``stats`` of a 12 x 12 x 2048^2 float32 file (causal softmax maps, ~0.9 GB on disk), written
   with :class:`attnformat.Writer` into ``--scratch`` (reused when present), against a plain numpy
   pass computing the same statistics (mean, std, min, max, row entropy, sink score, local/global
   means over the +/-2 token window, per map) over the same float32 array from an uncompressed
   memory-mapped ``.npy``. Printed: wall time of each and their ratio (target <= 1.5), peak RSS of
   each (measured in a child process: ``resource.getrusage(RUSAGE_CHILDREN)``; target <= 1 GB),
   CPU/wall of the dask run (target >= 1.6 on 2 cores), for the ``threads`` and the ``processes``
   scheduler.
2. With ``--big``: a synthetic 32 x 32 x 4096^2 site in the top-k layout (k = 32, spec 1.2; the
   dense float32 file would be 64 GB): ``stats`` throughput (maps and stored bytes per second) and
   peak RSS. Needs about 1.1 GB of disk in ``--scratch`` (2.2 GB while the writer converts).
3. The same statistics on a ``dask.distributed.LocalCluster`` (2 worker processes, 1 thread each):
   wall time, and whether the numbers equal the local scheduler's.

``--quick`` uses a 4 x 4 x 1024^2 file instead (seconds) for a smoke run.

    .venv/bin/python benchmarks/bench_scale.py --scratch /tmp/attn-scale [--quick] [--big]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WINDOW = 2  # the token window statistics_summary uses for sequences (viewer.statistics.LOCAL_WINDOW)


def causal_softmax(rng, tokens: int) -> np.ndarray:
    """One causal softmax map (float32): random logits, future keys masked."""
    logits = rng.standard_normal((tokens, tokens), dtype=np.float32) * 2.0
    logits[np.triu_indices(tokens, 1)] = -np.inf
    logits -= logits.max(axis=-1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=-1, keepdims=True)
    return logits


def make_dense(path: Path, npy: Path, layers: int, heads: int, tokens: int) -> None:
    """The attention file and the same float32 values as an uncompressed ``.npy``."""
    import attnformat

    if path.exists() and npy.exists():
        return
    rng = np.random.default_rng(0)
    partial = npy.with_suffix(".partial.npy")
    array = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(layers, heads, tokens, tokens))
    with attnformat.Writer(path, model_name="bench-scale", model_framework="numpy", overwrite=True) as writer:
        site = writer.create_site("decoder/self", sizes={"layer": layers, "head": heads, "query": tokens, "key": tokens},
                                  attrs={"attention_type": "self", "causal": 1})
        for layer in range(layers):
            maps = np.stack([causal_softmax(rng, tokens) for _ in range(heads)])
            site.write("weights", maps, layer=layer)
            array[layer] = maps
    array.flush()
    del array
    partial.rename(npy)


def make_topk(path: Path, layers: int, heads: int, tokens: int, k: int) -> None:
    """A top-k site: per row the k largest weights of a causal softmax-like row and their keys."""
    import attnformat

    if path.exists():
        return
    rng = np.random.default_rng(1)
    with attnformat.Writer(path, model_name="bench-scale-topk", model_framework="numpy", overwrite=True) as writer:
        site = writer.create_site("decoder/self", layout="topk",
                                  sizes={"layer": layers, "head": heads, "query": tokens, "key": tokens, "rank": k},
                                  attrs={"attention_type": "self", "causal": 1})
        query = np.arange(tokens)[:, None]
        for layer in range(layers):
            weights = np.sort(rng.dirichlet(np.ones(2 * k), size=(heads, tokens)).astype(np.float32)[..., :k], axis=-1)[..., ::-1]
            keys = (query - np.arange(k)[None, :]) % tokens
            keys = np.broadcast_to(np.where(keys <= query, keys, -1), (heads, tokens, k)).astype(np.int32)
            weights = np.where(keys >= 0, weights, np.nan).astype(np.float32)
            site.write("weights", weights, layer=layer)
            site.write("key_index", keys, layer=layer)
            site.write("omitted_weight", (1 - np.nansum(weights, axis=-1)).astype(np.float32), layer=layer)


def numpy_statistics(npy: str) -> dict:
    """The per-map statistics of the file, computed plainly with numpy over the memory-mapped .npy."""
    array = np.load(npy, mmap_mode="r")
    layers, heads, tokens, _ = array.shape
    positions = np.arange(tokens)
    local = np.abs(positions[:, None] - positions[None, :]) <= WINDOW
    out = {name: np.empty((layers, heads)) for name in ("mean", "std", "min", "max", "entropy", "sink_score", "local_mean", "global_mean")}
    for layer in range(layers):
        for head in range(heads):
            values = np.asarray(array[layer, head], dtype=np.float64)
            out["mean"][layer, head] = values.mean()
            out["std"][layer, head] = values.std()
            out["min"][layer, head] = values.min()
            out["max"][layer, head] = values.max()
            with np.errstate(divide="ignore", invalid="ignore"):
                terms = np.where(values > 0, -values * np.log(values), 0.0)
            out["entropy"][layer, head] = terms.sum(axis=-1).mean()
            profile = values.mean(axis=0)
            out["sink_score"][layer, head] = profile[0] - profile[1:-1].mean()
            out["local_mean"][layer, head] = values[local].mean()
            out["global_mean"][layer, head] = values[~local].mean()
    return {name: value.tolist() for name, value in out.items()}


def child(kind: str, target: str, scheduler: str) -> dict:
    """Run one measurement in this (child) process; prints JSON with wall and CPU time. Imports
    (xarray, zarr, dask: a few seconds on a busy machine) happen before the clock starts, for both."""
    if kind != "numpy":
        import attnformat.reading  # noqa: F401 - imported before timing
        import dask.array  # noqa: F401 - xarray imports it on first use of a variable
        import dask.multiprocessing  # noqa: F401
        import zarr.codecs  # noqa: F401
        from attnformat.viewer.statistics import statistics_summary
    sampler = RssSampler()
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    if kind == "numpy":
        result = numpy_statistics(target)
    else:
        result = {"summary": statistics_summary(target, scheduler=scheduler, progress=False)}
    wall = time.perf_counter() - start_wall
    cpu = time.process_time() - start_cpu  # this process's threads; worker processes are counted by the parent
    # This process's own peak (threads share it); worker processes of the "processes" scheduler
    # are separate processes, reported by the parent as the largest child.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"wall": wall, "cpu_self": cpu, "peak_self_mb": peak, "peak_tree_mb": sampler.stop() / 1e6,
            "cpu_tree": sampler.cpu, "result": result}


class RssSampler:
    """Peak of the summed RSS of this process and its descendants (worker processes), sampled every
    50 ms, and their CPU time at the last sample (psutil)."""

    def __init__(self):
        import threading

        import psutil

        self.process, self.peak, self.cpu, self._cpu0 = psutil.Process(), 0, 0.0, None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        rss, cpu = 0, 0.0
        for process in [self.process, *self.process.children(recursive=True)]:
            try:
                rss += process.memory_info().rss
                times = process.cpu_times()
                cpu += times.user + times.system
            except psutil.Error:
                continue
        self.peak = max(self.peak, rss)
        self._cpu0 = cpu if self._cpu0 is None else self._cpu0
        self.cpu = max(self.cpu, cpu - self._cpu0)

    def _run(self) -> None:
        while not self._done.wait(0.05):
            self._sample()

    def stop(self) -> int:
        self._sample()
        self._done.set()
        self._thread.join()
        return self.peak


def measure(kind: str, target: Path, scheduler: str = "threads") -> dict:
    """Run :func:`child` in a fresh process; its peak RSS and CPU time (children included) come
    from ``getrusage(RUSAGE_CHILDREN)`` differences, which cover that child and its workers."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    process = subprocess.run([sys.executable, __file__, "--child", kind, str(target), scheduler],
                             capture_output=True, text=True, check=False)
    wall_outside = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if process.returncode != 0:
        raise SystemExit(f"{kind} {scheduler} failed:\n{process.stderr[-3000:]}")
    report = json.loads(process.stdout.strip().splitlines()[-1])
    report["cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    # ru_maxrss of RUSAGE_CHILDREN is the largest of any child waited for so far (KiB on Linux):
    # children are run from the smallest expected to the largest, and the maximum is reported.
    report["peak_rss_mb"] = after.ru_maxrss / 1024
    report["wall_outside"] = wall_outside
    return report


def disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(os.stat(p).st_blocks * 512 for p in path.rglob("*") if p.is_file())


def compare(summary: dict, reference: dict, site: str) -> float:
    """Largest absolute difference between the summary's per-head numbers (JSON: rounded to 6
    decimals) and the numpy pass."""
    worst = 0.0
    for layer, entry in enumerate(summary["sites"][site]):
        for head, numbers in enumerate(entry["heads"]):
            for name in ("mean", "std", "min", "max", "entropy", "sink_score", "local_mean", "global_mean"):
                worst = max(worst, abs(numbers[name] - reference[name][layer][head]))
    return worst


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, target, scheduler = sys.argv[2:5]
        print(json.dumps(child(kind, target, scheduler)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/attn-scale"), help="where the files are written (reused)")
    parser.add_argument("--quick", action="store_true", help="a 4 x 4 x 1024^2 file (smoke run)")
    parser.add_argument("--big", action="store_true", help="also the 32 x 32 x 4096^2 top-k file (~1.1 GB of disk)")
    parser.add_argument("--no-cluster", action="store_true", help="skip the LocalCluster run")
    parser.add_argument("--generate-only", action="store_true", help="write the files and stop")
    args = parser.parse_args()
    args.scratch.mkdir(parents=True, exist_ok=True)
    layers, heads, tokens = (4, 4, 1024) if args.quick else (12, 12, 2048)
    name = f"dense-{layers}x{heads}x{tokens}"
    path, npy = args.scratch / f"{name}.zarr", args.scratch / f"{name}.npy"
    start = time.perf_counter()
    make_dense(path, npy, layers, heads, tokens)
    print(f"file: {path} ({disk_bytes(path) / 1e9:.2f} GB on disk; .npy {disk_bytes(npy) / 1e9:.2f} GB; "
          f"ready in {time.perf_counter() - start:.0f} s)")
    big = args.scratch / "topk-32x32x4096-k32.zarr"
    if args.big:
        start = time.perf_counter()
        make_topk(big, 32, 32, 4096, 32)
        print(f"big file: {big} ({disk_bytes(big) / 1e9:.2f} GB on disk; ready in {time.perf_counter() - start:.0f} s)")
    if args.generate_only:
        return
    cores = os.cpu_count() or 1
    print(f"cores: {cores}; load average before: {os.getloadavg()[0]:.1f}")
    reference = measure("numpy", npy)
    print(f"numpy pass (memory-mapped .npy, one process): {reference['wall']:.1f} s wall, "
          f"CPU/wall {reference['cpu_self'] / reference['wall']:.2f}, peak RSS {reference['peak_self_mb']:.0f} MB "
          "(the memory-mapped pages count)")
    summaries = {}
    for scheduler in ("threads", "processes"):
        ours = measure("stats", path, scheduler)
        summaries[scheduler] = ours["result"]["summary"]
        # CPU of the process and its workers (sampled with psutil; workers that exit between samples are missed)
        cpu = max(ours["cpu_self"], ours["cpu_tree"])
        usage = (f"CPU/wall {cpu / ours['wall']:.2f} (target >= 1.6 on 2 cores), peak RSS {ours['peak_self_mb']:.0f} MB "
                 f"(process), {ours['peak_tree_mb']:.0f} MB (process + workers, sampled)")
        print(f"attnformat stats, scheduler={scheduler}: {ours['wall']:.1f} s wall, ratio to numpy "
              f"{ours['wall'] / reference['wall']:.2f} (target <= 1.5), {usage} (target <= 1000 MB); "
              f"largest difference from numpy {compare(summaries[scheduler], reference['result'], 'decoder/self'):.1e}")
    if not args.no_cluster:
        from dask.distributed import Client, LocalCluster

        from attnformat.viewer.statistics import statistics_summary

        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            start = time.perf_counter()
            summary = statistics_summary(path, scheduler=client, progress=False)
            wall = time.perf_counter() - start
        same = summary == summaries["threads"]
        print(f"LocalCluster (2 workers x 1 thread): {wall:.1f} s wall; numbers equal the local scheduler's: {same}")
    if args.big:
        ours = measure("stats", big, "threads")
        maps = 32 * 32
        print(f"big top-k file: stats {ours['wall']:.1f} s wall, {maps / ours['wall']:.0f} maps/s, "
              f"{disk_bytes(big) / 1e6 / ours['wall']:.0f} MB/s stored, CPU/wall {ours['cpu_self'] / ours['wall']:.2f}, "
              f"peak RSS {ours['peak_self_mb']:.0f} MB")


if __name__ == "__main__":
    main()
