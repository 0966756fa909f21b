"""Comparing two files: ``attnformat.compare.compare`` against a plain numpy loop, side by side.

One run each (the machine may be shared: the numbers are what was measured, not a best of many):

* ``compare(A, B)`` (:mod:`attnformat.compare`: per layer/head Jensen-Shannon divergence of every
  query row, L1 and |B - A| summaries, as one dask graph over the stored chunks) on two
  12 x 12 x 1024^2 float32 files (``--quick``: 12 x 12 x 256^2), written with
  :class:`attnformat.Writer` into ``--scratch`` (reused when present);
* a plain numpy loop computing the same per-row JSD (bits, base 2, rows renormalised,
  0 log 0 = 0) layer by layer, one layer of both held as float64, from uncompressed
  memory-mapped ``.npy`` copies of the same float32 arrays.

The two must give the same mean JSD per head within 1e-6 (checked here; the script fails
otherwise). Printed: wall time of each and their ratio, CPU/wall, peak RSS of each (VmHWM; each run in
a fresh child process, imports done before the clock starts). Peak RSS counts the pages of the
memory-mapped ``.npy`` that numpy touched, so the peak of anonymous memory (RssAnon, sampled every
50 ms over the process and its workers) is printed too. Both runs read files the page cache
most likely holds (just written or read), so this compares computation, not disk speed.

A and B: seeded random softmax rows (logits ~ N(0, 2^2)); B's logits are A's plus noise whose
scale grows with the head, so that heads differ by a known order.

    .venv/bin/python benchmarks/bench_compare.py [--quick] [--scratch /tmp/attn-compare]
        [--scheduler threads|processes|synchronous]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

TOLERANCE = 1e-6  # largest allowed difference of a head's mean JSD between the two


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Softmax along the last axis, in place, float32."""
    logits -= logits.max(axis=-1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=-1, keepdims=True)
    return logits


def make_pair(scratch: Path, layers: int, heads: int, tokens: int) -> dict[str, Path]:
    """``a.zarr``/``b.zarr`` (attnformat.Writer) and the same float32 values as ``a.npy``/``b.npy``.

    Reused when all four exist; the ``.npy`` files are renamed into place last, so an interrupted
    run is redone rather than reused half-written.
    """
    import attnformat

    name = f"{layers}x{heads}x{tokens}"
    paths = {f"{side}_{kind}": scratch / f"compare-{name}-{side}.{kind}" for side in "ab" for kind in ("zarr", "npy")}
    if all(path.exists() for path in paths.values()):
        return paths
    rng = np.random.default_rng(0)
    shape = (layers, heads, tokens, tokens)
    partial = {side: paths[f"{side}_npy"].with_suffix(".partial.npy") for side in "ab"}
    arrays = {side: np.lib.format.open_memmap(partial[side], mode="w+", dtype=np.float32, shape=shape) for side in "ab"}
    noise = np.linspace(0.1, 2.0, heads, dtype=np.float32)[:, None, None]  # head h of B moved more than head h-1
    sizes = {"layer": layers, "head": heads, "query": tokens, "key": tokens}
    with attnformat.Writer(paths["a_zarr"], model_name="bench-compare-a", model_framework="numpy", overwrite=True) as writer_a, \
            attnformat.Writer(paths["b_zarr"], model_name="bench-compare-b", model_framework="numpy", overwrite=True) as writer_b:
        site_a = writer_a.create_site("encoder/self", sizes=sizes, attrs={"attention_type": "self"})
        site_b = writer_b.create_site("encoder/self", sizes=sizes, attrs={"attention_type": "self"})
        for layer in range(layers):
            logits = rng.standard_normal((heads, tokens, tokens), dtype=np.float32) * 2.0
            moved = logits + noise * rng.standard_normal((heads, tokens, tokens), dtype=np.float32)
            for side, site, values in (("a", site_a, softmax_rows(logits)), ("b", site_b, softmax_rows(moved))):
                site.write("weights", values, layer=layer)
                arrays[side][layer] = values
    for side in "ab":
        arrays[side].flush()
    del arrays
    for side in "ab":
        partial[side].rename(paths[f"{side}_npy"])
    return paths


def numpy_mean_jsd(npy_a: str, npy_b: str) -> list[list[float]]:
    """Mean over query rows of the per-row JSD (bits), per layer and head: a plain numpy loop,
    one layer of both files at a time (float64), from the memory-mapped ``.npy`` files."""
    a_all, b_all = np.load(npy_a, mmap_mode="r"), np.load(npy_b, mmap_mode="r")
    means = np.empty(a_all.shape[:2])
    for layer in range(a_all.shape[0]):
        a = np.asarray(a_all[layer], dtype=np.float64)
        b = np.asarray(b_all[layer], dtype=np.float64)
        p = a / a.sum(axis=-1, keepdims=True)
        q = b / b.sum(axis=-1, keepdims=True)
        m = (p + q) / 2
        with np.errstate(divide="ignore", invalid="ignore"):
            kl_p = np.where(p > 0, p * np.log2(p / m), 0.0).sum(axis=-1)
            kl_q = np.where(q > 0, q * np.log2(q / m), 0.0).sum(axis=-1)
        means[layer] = ((kl_p + kl_q) / 2).mean(axis=-1)
    return means.tolist()


def status_bytes(pid, field: str) -> int:
    """A memory figure of ``/proc/<pid>/status`` (``VmHWM``: peak RSS; ``RssAnon``) in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler:
    """Peak of the summed RSS and RssAnon of this process and its descendants (worker processes of
    the ``processes`` scheduler), sampled every 50 ms, and their CPU time at the last sample."""

    def __init__(self):
        import psutil

        self.process, self.peak_rss, self.peak_anon, self.cpu, self._cpu0 = psutil.Process(), 0, 0, 0.0, None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _anon(pid: int) -> int:
        return status_bytes(pid, "RssAnon")

    def _sample(self) -> None:
        import psutil

        rss = anon = 0
        cpu = 0.0
        for process in [self.process, *self.process.children(recursive=True)]:
            try:
                rss += process.memory_info().rss
                anon += self._anon(process.pid)
                times = process.cpu_times()
                cpu += times.user + times.system
            except (psutil.Error, OSError):
                continue
        self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)
        self._cpu0 = cpu if self._cpu0 is None else self._cpu0
        self.cpu = max(self.cpu, cpu - self._cpu0)

    def _run(self) -> None:
        while not self._done.wait(0.05):
            self._sample()

    def stop(self) -> None:
        self._sample()
        self._done.set()
        self._thread.join()


def child(kind: str, a: str, b: str, scheduler: str) -> dict:
    """One measurement in this (fresh) process: wall, CPU, peak memory and the mean JSD per head."""
    if kind == "compare":
        import dask.array  # noqa: F401 - imported before timing, as numpy is for the loop
        import zarr.codecs  # noqa: F401

        from attnformat.compare import compare
    sampler = Sampler()
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    if kind == "numpy":
        means = numpy_mean_jsd(a, b)
    else:
        result = compare(a, b, scheduler=scheduler, progress=False)
        means = result.dataset("encoder/self")["mean_jsd"].transpose("layer", "head").values.tolist()
    wall = time.perf_counter() - start_wall
    cpu_self = time.process_time() - start_cpu  # every thread of this process
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec, so a child would report
    # the parent's peak (the generator's) whenever that was larger.
    sampler.stop()
    return {"wall": wall, "cpu": max(cpu_self, sampler.cpu), "peak_rss_mb": status_bytes("self", "VmHWM") / 2**20,
            "peak_tree_rss_mb": sampler.peak_rss / 2**20, "peak_anon_mb": sampler.peak_anon / 2**20, "means": means}


def measure(kind: str, a: Path, b: Path, scheduler: str) -> dict:
    """Run :func:`child` in a fresh Python process and return what it printed (JSON)."""
    process = subprocess.run([sys.executable, __file__, "--child", kind, str(a), str(b), scheduler],
                             capture_output=True, text=True, check=False)
    if process.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{process.stderr[-3000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, a, b, scheduler = sys.argv[2:6]
        print(json.dumps(child(kind, a, b, scheduler)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/attn-compare"), help="where the files are written (reused)")
    parser.add_argument("--quick", action="store_true", help="12 x 12 x 256^2 files instead of 12 x 12 x 1024^2 (smoke run)")
    parser.add_argument("--scheduler", default="threads", choices=["threads", "processes", "synchronous"],
                        help="dask scheduler of compare (default threads)")
    parser.add_argument("--generate-only", action="store_true", help="write the files and stop")
    args = parser.parse_args()
    args.scratch.mkdir(parents=True, exist_ok=True)
    layers, heads, tokens = (12, 12, 256) if args.quick else (12, 12, 1024)
    start = time.perf_counter()
    paths = make_pair(args.scratch, layers, heads, tokens)
    print(f"files: {paths['a_zarr']}, {paths['b_zarr']} ({layers} x {heads} x {tokens}^2 float32; "
          f"{disk_bytes(paths['a_zarr']) / 1e6:.0f} + {disk_bytes(paths['b_zarr']) / 1e6:.0f} MB on disk, "
          f".npy {disk_bytes(paths['a_npy']) / 1e6:.0f} MB each; ready in {time.perf_counter() - start:.0f} s)")
    if args.generate_only:
        return
    print(f"cores: {os.cpu_count()}; load average before: {os.getloadavg()[0]:.1f}")
    plain = measure("numpy", paths["a_npy"], paths["b_npy"], args.scheduler)
    ours = measure("compare", paths["a_zarr"], paths["b_zarr"], args.scheduler)

    reference, computed = np.array(plain["means"]), np.array(ours["means"])
    if computed.shape != reference.shape or not np.isfinite(computed).all():
        raise AssertionError(f"compare gave mean JSD of shape {computed.shape} (finite: {np.isfinite(computed).all()}), "
                             f"numpy {reference.shape}")
    worst = float(np.max(np.abs(computed - reference)))
    if worst > TOLERANCE:
        raise AssertionError(f"mean JSD per head differs from the numpy loop by {worst:.2e} (> {TOLERANCE:g})")

    for label, run in ((f"compare (dask, scheduler={args.scheduler})", ours), ("numpy loop (memory-mapped .npy)", plain)):
        print(f"{label:<36} {run['wall']:6.1f} s wall, CPU/wall {run['cpu'] / run['wall']:.2f}, "
              f"peak RSS {run['peak_rss_mb']:.0f} MiB (process + workers, sampled: {run['peak_tree_rss_mb']:.0f} MiB; "
              f"anonymous {run['peak_anon_mb']:.0f} MiB)")
    print(f"ratio compare / numpy: wall {ours['wall'] / plain['wall']:.2f}, "
          f"peak RSS {ours['peak_rss_mb'] / plain['peak_rss_mb']:.2f}, anonymous {ours['peak_anon_mb'] / plain['peak_anon_mb']:.2f}")
    print(f"mean JSD per head: same within {TOLERANCE:g} (largest difference {worst:.1e}); "
          f"range {reference.min():.4f} .. {reference.max():.4f} bits; head means over layers: "
          + " ".join(f"{value:.3f}" for value in reference.mean(axis=0)))


if __name__ == "__main__":
    main()
