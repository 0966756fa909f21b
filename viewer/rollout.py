"""Attention rollout across layers (Abnar & Zuidema, 2020): how much each output token draws on each input token.

For each layer the heads are averaged, the identity is added for the residual connection, rows are
renormalised to sum to 1, and the layers' matrices are multiplied from the first layer up.
"""

from __future__ import annotations

import numpy as np

from attnformat.errors import SelectionError
from attnformat.viewer.colors import color_scale
from attnformat.viewer.heatmaps import draw_map
from attnformat.viewer.output import axes_or_new
from attnformat.viewer.selection import Selection, select


def rollout_matrices(layers: np.ndarray, *, residual: bool = True) -> np.ndarray:
    """Roll out a ``(layer, query, key)`` stack of head-averaged weights into one ``(query, key)`` matrix.

    Examples
    --------
    >>> layer = np.array([[0.5, 0.5], [0.0, 1.0]])
    >>> rollout_matrices(np.stack([layer, layer])).tolist()
    [[0.5625, 0.4375], [0.0, 1.0]]
    """
    layers = np.nan_to_num(np.asarray(layers, dtype=np.float64))
    size = layers.shape[-1]
    result = np.eye(size)
    for weights in layers:
        if residual:
            weights = weights + np.eye(size)
        totals = weights.sum(axis=-1, keepdims=True)
        weights = np.divide(weights, totals, out=np.zeros_like(weights), where=totals > 0)
        result = weights @ result
    return result


def attention_rollout(source, *, site=None, sample=None, step=None, time=None, node=None, head="mean",
                      residual: bool = True) -> Selection:
    """Rollout of a self-attention site's weights over all its layers, as a :class:`Selection`.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import attention_rollout
    >>> rolled = attention_rollout(attnformat.example_path("dense"))
    >>> rolled.values.shape, bool(np.allclose(rolled.values.sum(axis=1), 1.0))
    ((6, 6), True)
    """
    chosen = select(source, "weights", site=site, keep=("layer",), head=head, sample=sample, step=step, time=time, node=node)
    if chosen.values.shape[-1] != chosen.values.shape[-2] or chosen.attrs.get("attention_type", "self") != "self":
        raise SelectionError(f"rollout needs self-attention with as many queries as keys; site {chosen.site} of "
                             f"{chosen.source} is {chosen.attrs.get('attention_type')} with {chosen.values.shape[-2:]} maps")
    stack = chosen.values if "layer" in chosen.dims else chosen.values[None]
    chosen.values = rollout_matrices(stack, residual=residual)
    chosen.dims = ("query", "key")
    layers = chosen.kept.get("layer", ["0"])
    chosen.described["layer"] = f"rollout {layers[0]}..{layers[-1]}" if len(layers) > 1 else f"rollout {layers[0]}"
    return chosen


def rollout_map(source, *, site=None, sample=None, step=None, time=None, node=None, head="mean", residual: bool = True,
                cmap=None, log: bool = False, ax=None):
    """Heatmap of the attention rollout (rows: output tokens, columns: input tokens).

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import rollout_map
    >>> rollout_map(attnformat.example_path("dense")).get_title()
    'encoder/self | layer rollout 0..1 | head mean of 3 | weights (softmax) | rollout with residual'
    """
    chosen = attention_rollout(source, site=site, sample=sample, step=step, time=time, node=node, head=head, residual=residual)
    cmap, norm = color_scale(chosen.values, cmap=cmap, log=log)
    ax = axes_or_new(ax)
    image = draw_map(ax, chosen.values, cmap=cmap, norm=norm, query_labels=chosen.query_labels, key_labels=chosen.key_labels,
                     xlabel="input token (key)", ylabel="output token (query)",
                     title=chosen.title() + (" | rollout with residual" if residual else " | rollout"))
    ax.figure.colorbar(image, ax=ax, label="rolled-out attention")
    return ax
