"""Heatmaps of one map: one head or the mean/max over heads, token labels, any colour scale."""

from __future__ import annotations

import numpy as np

from attnformat.viewer.colors import color_scale, masked
from attnformat.viewer.output import axes_or_new
from attnformat.viewer.selection import DISPLAY_SIZE, pool_for_display, select, sites_of

#: Beyond this many tokens, ticks show positions instead of every label.
MAX_LABELLED_TOKENS = 64


def draw_map(ax, values, *, cmap, norm, query_labels=(), key_labels=(), origin: str = "upper",
             xlabel: str = "key", ylabel: str = "query", title: str | None = None):
    """Draw one prepared map on ``ax`` with labelled ticks; returns the AxesImage.

    Examples
    --------
    >>> import numpy as np, matplotlib.pyplot as plt
    >>> from attnformat.viewer import color_scale
    >>> values = np.eye(2)
    >>> cmap, norm = color_scale(values)
    >>> image = draw_map(plt.figure().add_subplot(), values, cmap=cmap, norm=norm, key_labels=["a", "b"])
    >>> [t.get_text() for t in image.axes.get_xticklabels()]
    ['a', 'b']
    """
    image = ax.imshow(masked(values), cmap=cmap, norm=norm, aspect="auto", origin=origin, interpolation="nearest")
    rows, cols = np.shape(values)[-2:]
    if 0 < len(key_labels) == cols and cols <= MAX_LABELLED_TOKENS:
        ax.set_xticks(range(cols), [str(label) for label in key_labels], rotation=90, fontsize=7)
    if 0 < len(query_labels) == rows and rows <= MAX_LABELLED_TOKENS:
        ax.set_yticks(range(rows), [str(label) for label in query_labels], fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    return image


def axis_names(chosen) -> tuple[str, str]:
    """``(xlabel, ylabel)``: key/query, or source/target node for densified edges.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import select
    >>> axis_names(select(attnformat.example_path("edge"), layer=0))
    ('source node (key)', 'target node (query)')
    """
    if chosen.attrs.get("layout") == "edge":
        node_dim = chosen.attrs.get("edge_node_dim", "node")
        return f"source {node_dim} (key)", f"target {node_dim} (query)"
    return "key", "query"


def heatmap(source, *, site=None, variable: str = "weights", layer=None, head=None, sample=None, step=None,
            time=None, node=None, cmap=None, vmin=None, vmax=None, log: bool = False, center=None,
            origin: str = "upper", max_size: int = DISPLAY_SIZE, pool: str = "mean", colorbar: bool = True, ax=None):
    """Heatmap of one attention map (query rows, key columns).

    Parameters
    ----------
    source
        Path, tree or site group.
    site
        Site path when the file holds several.
    variable
        ``weights`` (sequential scale), ``logits`` or ``bias`` (diverging scale centred at 0).
    layer, head, sample, step, time, node
        Selectors: a label or index; ``head`` defaults to the mean over heads, ``"max"`` also works.
    cmap, vmin, vmax, log, center
        Colour scale (see :func:`attnformat.viewer.colors.color_scale`).
    origin
        ``"upper"`` (first query at the top) or ``"lower"``.
    max_size, pool
        Maps wider than ``max_size`` are block-pooled (``"mean"`` or ``"max"``); the title says so.
    colorbar
        Add a colorbar.
    ax
        Axes to draw on; a new figure when None.

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import heatmap
    >>> ax = heatmap(attnformat.example_path("dense"), layer=0, head=1)
    >>> ax.get_title()
    'encoder/self | layer 0 | head 1 | weights (softmax)'
    """
    chosen = select(source, variable, site=site, layer=layer, head=head, sample=sample, step=step, time=time, node=node)
    chosen = pool_for_display(chosen, max_size, pool)
    cmap, norm = color_scale(chosen.values, variable=variable, cmap=cmap, vmin=vmin, vmax=vmax, log=log, center=center)
    ax = axes_or_new(ax)
    xlabel, ylabel = axis_names(chosen)
    image = draw_map(ax, chosen.values, cmap=cmap, norm=norm, query_labels=chosen.query_labels,
                     key_labels=chosen.key_labels, origin=origin, xlabel=xlabel, ylabel=ylabel, title=chosen.title())
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label=chosen.normalization)
    return ax


def temporal_matrix(source, *, site=None, node=0, layer=None, head=None, sample=None, cmap=None, ax=None):
    """Time x time attention of one node, densified from temporal edges (seed 000's temporal heatmap).

    Picks the site whose edges join time steps (``edge_node_dim="time"``) when ``site`` is None.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import temporal_matrix
    >>> temporal_matrix(attnformat.example_path("edge-time"), node=2).get_xlabel()
    'source time (key)'
    """
    if site is None:
        temporal = [s for s in sites_of(source) if s.attrs.get("edge_node_dim") == "time"]
        site = temporal[0].path if temporal else None
    return heatmap(source, site=site, node=node, layer=layer, head=head, sample=sample, cmap=cmap, ax=ax)
