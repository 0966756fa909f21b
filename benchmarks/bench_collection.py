"""2,000 small captures opened as one collection and summarised (a script, not a test).

The files (one prompt each: 4 layers x 4 heads, 12 to 16 tokens, so joining along ``sample`` pads
and masks) are generated into ``--scratch`` once and reused: five captures written with
:class:`attnformat.Writer` (one per length), copied to make the rest. Each measurement runs in a
fresh child process, so peak RSS (``ru_maxrss``) is its own:

- ``open``: ``attnformat.open`` of every file in a loop, nothing joined (the floor: screening and
  reading each file's metadata);
- ``open_many``: :func:`attnformat.open_many` of the folder along ``sample`` (opening, checking
  that the files agree, padding, building one lazy tree);
- ``summary``: ``open_many`` then :func:`attnformat.viewer.statistics_summary` of the joined tree
  (every value of every file read once per layer);
- ``numpy``: every file's weights read with zarr directly and summed (no checks, no tree): what
  reading the values costs at the least.

Printed per measurement: wall time, time per file, peak RSS, open file descriptors at the end; and
the ratios open_many/open and summary/numpy, side by side, one run.

Usage: ``python benchmarks/bench_collection.py [--files 2000] [--quick] [--scratch DIR]``
(``--quick``: 200 files).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYERS, HEADS, LENGTHS = 4, 4, (12, 13, 14, 15, 16)


def generate(scratch: Path, files: int) -> Path:
    """``files`` captures in ``scratch/files-<n>`` (kept for the next run)."""
    import numpy as np

    import attnformat

    folder = scratch / f"files-{files}"
    existing = sorted(folder.glob("prompt-*.zarr")) if folder.is_dir() else []
    if len(existing) == files:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    templates = scratch / "templates"
    shutil.rmtree(templates, ignore_errors=True)
    templates.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for tokens in LENGTHS:
        with attnformat.Writer(templates / f"t{tokens}.zarr", model_name="toy", model_framework="numpy") as writer:
            site = writer.create_site("encoder/self", sizes={"layer": LAYERS, "head": HEADS, "query": tokens, "key": tokens},
                                      coords={"query_label": ("query", [f"w{i}" for i in range(tokens)]),
                                              "key_label": ("key", [f"w{i}" for i in range(tokens)])},
                                      attrs={"attention_type": "self", "causal": 0})
            for layer in range(LAYERS):
                logits = rng.normal(size=(HEADS, tokens, tokens))
                weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
                site.write("weights", weights, layer=layer)
    folder.mkdir(parents=True)
    for i in range(files):
        shutil.copytree(templates / f"t{LENGTHS[i % len(LENGTHS)]}.zarr", folder / f"prompt-{i:05d}.zarr")
    return folder


def child(what: str, folder: Path) -> dict:
    """One measurement, in this (fresh) process."""
    import numpy as np

    import attnformat  # imported before timing: start-up is not the collection's cost
    from attnformat.collection import open_many
    from attnformat.viewer import statistics_summary

    paths = sorted(folder.glob("prompt-*.zarr"))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = {}
    if what == "open":
        trees = [attnformat.open(p) for p in paths]
        result["sites"] = sum(len(t.children) for t in trees)
    elif what == "open_many":
        tree = open_many(folder, dim="sample")
        result["shape"] = list(tree["encoder/self"]["weights"].shape)
    elif what == "summary":
        tree = open_many(folder, dim="sample")
        opened = time.perf_counter() - start
        summary = statistics_summary(tree)
        result["open_s"] = round(opened, 3)
        result["mean_layer0"] = summary["sites"]["encoder/self"][0]["mean"]
    elif what == "numpy":
        import zarr

        total = 0.0
        for p in paths:
            total += float(np.asarray(zarr.open_array(p / "encoder" / "self" / "weights", mode="r")[:], dtype=np.float64).sum())
        result["sum"] = total
    result["wall_s"] = round(time.perf_counter() - start, 3)
    result["per_file_ms"] = round(1000 * result["wall_s"] / len(paths), 3)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["rss_after_imports_mb"] = round(base_rss / 1024, 1)
    result["open_fds"] = len(os.listdir("/proc/self/fd"))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="200 files")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "attnformat-bench-collection")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]))))
        return
    files = 200 if args.quick else args.files
    start = time.perf_counter()
    folder = generate(args.scratch, files)
    print(f"{files} files in {folder} ({LAYERS} layers x {HEADS} heads, {LENGTHS[0]}-{LENGTHS[-1]} tokens), "
          f"ready in {time.perf_counter() - start:.1f} s")
    results = {}
    for what in ("open", "open_many", "summary", "numpy"):
        out = subprocess.run([sys.executable, __file__, "--child", what, str(folder)], capture_output=True, text=True, check=True)
        results[what] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[what]
        print(f"{what:10s} wall {r['wall_s']:8.2f} s  {r['per_file_ms']:7.2f} ms/file  peak RSS {r['peak_rss_mb']:7.1f} MB "
              f"(after imports {r['rss_after_imports_mb']:.1f})  open fds {r['open_fds']}")
    print(f"open_many / plain open loop: {results['open_many']['wall_s'] / results['open']['wall_s']:.2f}x")
    print(f"open_many + statistics_summary / zarr read of every value: {results['summary']['wall_s'] / results['numpy']['wall_s']:.2f}x "
          f"(of which opening {results['summary']['open_s']:.2f} s)")


if __name__ == "__main__":
    main()
