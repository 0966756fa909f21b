"""Render the README's images from example files and MiniLM-shaped attention (numpy only, no torch).

Run: ``python docs/make_images.py`` (writes docs/heatmap.png, docs/head_grid.png, docs/group_bars.png,
docs/image_overlay.png).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

import attnformat  # noqa: E402
from attnformat.examples import _root, softmax  # noqa: E402
from attnformat.viewer import group_bars, head_grid, heatmap, image_overlay, save_figure  # noqa: E402

DOCS = Path(__file__).resolve().parent
WORDS = "[CLS] the viewer draws attention from a file without the model or torch [SEP]".split()


def minilm_shaped(layers: int = 6, heads: int = 12) -> xr.DataTree:
    """Softmax attention shaped like all-MiniLM-L6-v2's: local bands, [CLS]/[SEP] sinks, per-head widths."""
    rng = np.random.default_rng(0)
    tokens = len(WORDS)
    positions = np.arange(tokens)
    distance = np.abs(positions[:, None] - positions[None, :])
    width = rng.uniform(0.5, 6.0, size=(layers, heads, 1, 1))
    logits = rng.normal(scale=0.8, size=(layers, heads, tokens, tokens)) - distance / width
    logits[..., 0] += rng.uniform(0.0, 3.0, size=(layers, heads, 1))
    logits[..., -1] += rng.uniform(0.0, 3.0, size=(layers, heads, 1))
    dims = ("layer", "head", "query", "key")
    labels = np.array(WORDS, dtype=object)
    site = xr.Dataset(
        {"weights": (dims, softmax(logits).astype(np.float32)), "logits": (dims, logits.astype(np.float32))},
        coords={"layer": np.arange(layers), "head": np.arange(heads), "query_label": ("query", labels), "key_label": ("key", labels)},
        attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key", "attention_type": "self", "causal": 0},
    )
    return xr.DataTree.from_dict({"/": _root("MiniLM-shaped attention for the README", model_name="minilm-shaped"), "/encoder/self": site})


def main() -> None:
    path = attnformat.save(minilm_shaped(), Path(tempfile.mkdtemp()) / "minilm-shaped.zarr")
    save_figure(heatmap(path, layer=2), DOCS / "heatmap.png", dpi=110)
    save_figure(head_grid(path, layer=2, ncols=6), DOCS / "head_grid.png", dpi=80)
    save_figure(group_bars(attnformat.example_path("frames"), variable="logits"), DOCS / "group_bars.png", dpi=90)
    save_figure(image_overlay(attnformat.example_path("image"), layer=1), DOCS / "image_overlay.png", dpi=90)
    print("wrote", ", ".join(sorted(p.name for p in DOCS.glob("*.png"))))


if __name__ == "__main__":
    main()
