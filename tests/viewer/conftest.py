"""Shared fixtures for the viewer tests: a non-GUI backend, closed figures, small custom trees."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import xarray as xr  # noqa: E402

import attnformat  # noqa: E402
from attnformat.examples import _root, softmax  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="session")
def example():
    """``example("dense")`` -> path of the written example file."""
    return attnformat.example_path


def drawn(ax) -> np.ndarray:
    """The values an image Axes shows, with masked cells as NaN."""
    array = ax.images[0].get_array()
    return np.ma.filled(np.ma.asarray(array, dtype=np.float64), np.nan)


def dense_tree(logits: np.ndarray, *, labels=None, site="encoder/self", extra_site_attrs=None, with_weights=True) -> xr.DataTree:
    """A conforming one-site tree with the given (layer, head, query, key) logits and their softmax."""
    dims = ("layer", "head", "query", "key")
    layers, heads, queries, keys = logits.shape
    data = {"logits": (dims, logits.astype(np.float32))}
    if with_weights:
        data["weights"] = (dims, softmax(logits).astype(np.float32))
    coords = {"layer": np.arange(layers), "head": np.arange(heads)}
    if labels is not None:
        coords["query_label"] = ("query", np.array(labels[:queries], dtype=object))
        coords["key_label"] = ("key", np.array(labels[:keys], dtype=object))
    attrs = {"layout": "dense", "normalization": "softmax", "normalized_dim": "key", "attention_type": "self", "causal": 0,
             **(extra_site_attrs or {})}
    return xr.DataTree.from_dict({"/": _root("test tree"), f"/{site}": xr.Dataset(data, coords=coords, attrs=attrs)})
