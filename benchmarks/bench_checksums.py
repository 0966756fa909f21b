"""What a checksum on every chunk costs: write and read, with and without, side by side.

The same attention (softmax maps, float32) is written by the streaming Writer twice, once with
the default encoding (Zarr v3 ``bytes -> blosc -> crc32c``) and once without the checksum, then
read back three ways: one map (``attnformat.read_map``), one map from an open tree, and the whole
file (every map of the site). Each timing is the best of a few repeats; the last column is the
ratio with/without (the two are run alternately, so that load from other processes falls on both
alike). Runs in well under a minute.

    .venv/bin/python benchmarks/bench_checksums.py [--layers 6] [--heads 8] [--tokens 384] [--zarr-format 3]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import attnformat
from attnformat.engines import zarr_encoding, zarr_stream
from attnformat.examples import softmax


def interleaved(functions: dict[bool, object], repeats: int) -> dict[bool, float]:
    """Best time of each function, the two run alternately (and in alternating order) so that
    load from other processes falls on both alike."""
    times: dict[bool, list[float]] = {key: [] for key in functions}
    for repeat in range(repeats):
        for key in sorted(functions, reverse=bool(repeat % 2)):
            start = time.perf_counter()
            functions[key]()
            times[key].append(time.perf_counter() - start)
    return {key: min(values) for key, values in times.items()}


def write(path: Path, weights: np.ndarray, checksum: bool, zarr_format: int) -> None:
    # The Writer's store takes its codecs from the engine's policy; switch the checksum there.
    zarr_stream.zarr_codecs = functools.partial(zarr_encoding.zarr_codecs, checksum=checksum)
    try:
        layers, heads, tokens = weights.shape[:3]
        with attnformat.Writer(path, model_name="bench", model_framework="numpy", zarr_format=zarr_format) as writer:
            site = writer.create_site("encoder/self", sizes={"layer": layers, "head": heads, "query": tokens, "key": tokens},
                                      attrs={"attention_type": "self", "causal": 0})
            for layer in range(layers):
                site.write("weights", weights[layer], layer=layer)
    finally:
        zarr_stream.zarr_codecs = zarr_encoding.zarr_codecs


def disk_bytes(path: Path) -> int:
    return sum(os.stat(p).st_blocks * 512 for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=384)
    parser.add_argument("--zarr-format", type=int, default=3, choices=(2, 3))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    weights = softmax(rng.normal(size=(args.layers, args.heads, args.tokens, args.tokens))).astype(np.float32)
    root = Path(tempfile.mkdtemp(prefix="bench-checksums-"))
    paths = {checksum: root / f"{'with' if checksum else 'without'}.zarr" for checksum in (True, False)}
    results: dict[str, dict[bool, float]] = {}
    try:
        runs = itertools.count()  # a new file per run: removing the last one is not part of writing
        results["write whole file"] = interleaved(
            {checksum: lambda checksum=checksum: write(root / f"run-{next(runs)}.zarr", weights, checksum, args.zarr_format) for checksum in paths},
            args.repeats)
        for checksum, path in paths.items():
            write(path, weights, checksum, args.zarr_format)
        layer, head = args.layers // 2, args.heads // 2
        trees = {checksum: attnformat.open(path) for checksum, path in paths.items()}
        for checksum, path in paths.items():  # both files hold exactly the input
            np.testing.assert_array_equal(attnformat.read_map(path, "encoder/self", layer=layer, head=head).values, weights[layer, head])
            np.testing.assert_array_equal(trees[checksum]["encoder/self"]["weights"].values, weights)
        results["read_map: one map"] = interleaved(
            {checksum: functools.partial(lambda p: attnformat.read_map(p, "encoder/self", layer=layer, head=head).values, path)
             for checksum, path in paths.items()}, args.repeats * 10)
        results["open tree: one map"] = interleaved(
            {checksum: functools.partial(lambda t: t["encoder/self"]["weights"].isel(layer=layer, head=head).values, tree)
             for checksum, tree in trees.items()}, args.repeats * 10)
        results["read whole file"] = interleaved(
            {checksum: functools.partial(lambda p: attnformat.open(p)["encoder/self"]["weights"].values, path)
             for checksum, path in paths.items()}, args.repeats * 2)
        print(f"{args.layers} layers x {args.heads} heads x {args.tokens}^2 float32 = {weights.nbytes / 2**20:.1f} MiB, "
              f"Zarr v{args.zarr_format}, best of {args.repeats} or more, interleaved; disk: {disk_bytes(paths[True]) / 2**20:.2f} MiB with checksums, "
              f"{disk_bytes(paths[False]) / 2**20:.2f} MiB without")
        print(f"{'operation':<22}{'with checksum':>15}{'without':>12}{'ratio':>8}")
        for name, timing in results.items():
            print(f"{name:<22}{timing[True] * 1e3:>12.2f} ms{timing[False] * 1e3:>9.2f} ms{timing[True] / timing[False]:>8.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
