"""One plot in a fresh process, against a plain script drawing the same map from a ``.npy`` (issue 9, point 7).

Prints, from one run on this machine:

1. **Fresh process, one map.** Three scripts, each a new Python process, taking turns round after
   round (so that load from other processes on this shared machine falls on all alike):

   - ``npy``: ``np.load`` of the map, then ``imshow`` + ``colorbar`` + ``savefig`` (the baseline);
   - ``cli``: ``attnformat plot FILE heatmap --layer L --head H -o x.png``;
   - ``python``: ``from attnformat.viewer import heatmap; heatmap(FILE, layer=L, head=H)`` + ``savefig``;
   - ``unchecked``: the ``cli`` command with no verdict memo (``ATTNFORMAT_CACHE_DIR=none``), so that
     every run plots a file version never checked on this machine (a file straight from a
     collaborator): its metadata rules are checked on the raw consolidated JSON
     (:mod:`attnformat.metadata_rules`) before the direct road draws.

   For each: the median wall time and the median CPU time (user + system, of the child, from
   ``getrusage``), and the ratios to ``npy``. The target is at most 1.5x. Before the rounds one
   untimed ``cli`` run plots the file once, which checks it against the spec's metadata rules and
   remembers the verdict for this version of the file (see :mod:`attnformat.viewer.selection`);
   that first run is timed and printed on its own (``first plot of a file version``).

2. **Small files in one process.** ``attnformat.open(...)["site"]["weights"].sel(layer, head).values``
   and ``attnformat.read_map`` of one 128-token map of a 6 x 12 x 128 file, against ``np.load``
   of that map's ``.npy`` and, when torch is importable here, ``torch.load`` of the whole ``.pt``
   (the seeds' way) and indexing it. Medians of many calls after a few warm ones.

Run: ``python benchmarks/bench_plot_startup.py [--rounds N] [--tokens T]``. The scratch files and a
private verdict cache live in a temporary folder removed at the end.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LAYERS, HEADS = 6, 12
LAYER, HEAD = 3, 5

NPY_SCRIPT = """
import sys
import numpy as np
import matplotlib.pyplot as plt
values = np.load(sys.argv[1])
figure, ax = plt.subplots()
image = ax.imshow(values)
figure.colorbar(image, ax=ax)
figure.savefig(sys.argv[2])
"""

PYTHON_SCRIPT = """
import sys
from attnformat.viewer import heatmap
ax = heatmap(sys.argv[1], layer=int(sys.argv[3]), head=int(sys.argv[4]))
ax.figure.savefig(sys.argv[2])
"""


def build_file(folder: Path, tokens: int) -> tuple[Path, Path, np.ndarray]:
    """A 6 x 12 x T softmax file with token labels (as attnformat writes it) and the .npy of one map."""
    import xarray as xr

    import attnformat
    from attnformat.examples import _root, softmax

    rng = np.random.default_rng(0)
    weights = softmax(rng.normal(size=(LAYERS, HEADS, tokens, tokens))).astype(np.float32)
    labels = np.array([f"tok{i}" for i in range(tokens)], dtype=object)
    site = xr.Dataset(
        {"weights": (("layer", "head", "query", "key"), weights)},
        coords={"layer": np.arange(LAYERS), "head": np.arange(HEADS), "query_label": ("query", labels), "key_label": ("key", labels)},
        attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key", "attention_type": "self", "causal": 0},
    )
    tree = xr.DataTree.from_dict({"/": _root("benchmark", model_name="all-MiniLM-L6-v2-shaped"), "/encoder/self": site})
    path = attnformat.save(tree, folder / "attention.zarr")
    npy = folder / "map.npy"
    np.save(npy, weights[LAYER, HEAD])
    return path, npy, weights


def run(argv: list[str], env: dict) -> tuple[float, float]:
    """Wall and CPU seconds (user + system) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _attnformat_command() -> list[str]:
    """The installed ``attnformat`` console script next to this Python, else ``python -m attnformat``."""
    script = Path(sys.executable).parent / "attnformat"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "attnformat"]


def fresh_processes(folder: Path, path: Path, npy: Path, rounds: int, bytecode_as_is: bool = False) -> None:
    env = {**os.environ, "MPLBACKEND": "Agg", "ATTNFORMAT_CACHE_DIR": str(folder / "cache")}
    if not bytecode_as_is:
        # As an installed package runs: compiled once, then loaded from bytecode. (This machine
        # sets PYTHONDONTWRITEBYTECODE, which recompiles every module of a source checkout that
        # has no bytecode yet in every process, while site-packages came with theirs.) Every
        # script gets the same private bytecode cache, filled by the untimed first runs.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(folder / "bytecode")
    print(f"bytecode: {'as this environment says (PYTHONDONTWRITEBYTECODE=' + os.environ.get('PYTHONDONTWRITEBYTECODE', '') + ')' if bytecode_as_is else 'cached (a private PYTHONPYCACHEPREFIX, filled by untimed first runs)'}")
    scripts = {"npy": folder / "npy_plot.py", "python": folder / "attnformat_plot.py"}
    scripts["npy"].write_text(NPY_SCRIPT)
    scripts["python"].write_text(PYTHON_SCRIPT)
    commands = {
        "npy": [sys.executable, str(scripts["npy"]), str(npy), str(folder / "npy.png")],
        "cli": [*_attnformat_command(), "plot", str(path), "heatmap", "--layer", str(LAYER), "--head", str(HEAD),
                "-o", str(folder / "cli.png")],
        "python": [sys.executable, str(scripts["python"]), str(path), str(folder / "python.png"), str(LAYER), str(HEAD)],
    }
    run(commands["npy"], env)  # page cache and bytecode for everyone
    run(commands["cli"], {**env, "ATTNFORMAT_CACHE_DIR": "none"})  # bytecode of the general road; no verdict kept
    first = run(commands["cli"], env)
    print(f"first plot of a file version (no verdict remembered yet): wall {first[0]:.2f} s, CPU {first[1]:.2f} s")
    run(commands["python"], env)
    commands["unchecked"] = commands["cli"]
    envs = {name: env for name in commands}
    envs["unchecked"] = {**env, "ATTNFORMAT_CACHE_DIR": "none"}  # never a remembered verdict
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for round_ in range(rounds):
        order = list(commands) if round_ % 2 == 0 else list(reversed(commands))
        for name in order:
            times[name].append(run(commands[name], envs[name]))
    wall = {name: statistics.median(t[0] for t in values) for name, values in times.items()}
    cpu = {name: statistics.median(t[1] for t in values) for name, values in times.items()}
    print(f"\nfresh process, one {LAYERS}x{HEADS} file's map (layer {LAYER}, head {HEAD}); medians of {rounds} alternating rounds")
    print(f"{'':9} {'wall s':>8} {'CPU s':>8} {'wall ratio':>11} {'CPU ratio':>10}")
    for name in commands:
        print(f"{name:9} {wall[name]:8.2f} {cpu[name]:8.2f} {wall[name] / wall['npy']:10.2f}x {cpu[name] / cpu['npy']:9.2f}x")
    print("target: at most 1.5x the npy script")


def median_seconds(function, repeat: int = 50, warm: int = 5) -> float:
    for _ in range(warm):
        function()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def small_files(folder: Path, path: Path, npy: Path, weights: np.ndarray) -> None:
    import attnformat

    def open_sel():
        return attnformat.open(path)["encoder/self"]["weights"].sel(layer=LAYER, head=HEAD).values

    def read_map():
        return attnformat.read_map(path, "encoder/self", layer=LAYER, head=HEAD).values

    assert np.array_equal(open_sel(), weights[LAYER, HEAD]) and np.array_equal(read_map(), weights[LAYER, HEAD])
    results = {"open + sel": median_seconds(open_sel), "read_map": median_seconds(read_map),
               "np.load .npy": median_seconds(lambda: np.load(npy))}
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        pt = folder / "attention.pt"
        torch.save({f"layer{layer}": torch.from_numpy(weights[layer][None]) for layer in range(LAYERS)}, pt)
        results["torch.load .pt"] = median_seconds(
            lambda: torch.load(pt, map_location="cpu", weights_only=False)[f"layer{LAYER}"][0, HEAD].numpy())
    tokens = weights.shape[-1]
    print(f"\none process, one map of a {LAYERS}x{HEADS}x{tokens} file (median of 50 calls after 5 warm)")
    for name, seconds in results.items():
        print(f"{name:16} {seconds * 1e3:8.2f} ms")
    if torch is None:
        print("(torch is not importable here: no .pt comparison)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds of fresh processes")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per map")
    parser.add_argument("--bytecode-as-is", action="store_true",
                        help="keep this environment's PYTHONDONTWRITEBYTECODE instead of a bytecode cache")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-plot-startup-"))
    try:
        path, npy, weights = build_file(folder, args.tokens)
        fresh_processes(folder, path, npy, args.rounds, args.bytecode_as_is)
        small_files(folder, path, npy, weights)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
