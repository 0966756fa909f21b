"""Edge-layout attention (graphs, seed 000): top-k edges of a time step, node-link drawings."""

from __future__ import annotations

import numpy as np
from matplotlib.collections import LineCollection

from attnformat.conventions import is_site
from attnformat.errors import SelectionError
from attnformat.viewer.colors import BAR_COLOR, color_scale
from attnformat.viewer.output import axes_or_new
from attnformat.viewer.selection import node_labels, open_source, resolve_site, select, site_name, sites_of


def _edge_site(source, site, node_dim: str = "node"):
    """The named site, or the first edge site whose edges join ``node_dim`` (spatial before temporal)."""
    if site is not None:
        return resolve_site(source, site)
    tree = open_source(source)
    if is_site(tree.attrs):
        return tree
    candidates = [s for s in sites_of(tree) if s.attrs.get("layout") == "edge"]
    preferred = [s for s in candidates if s.attrs.get("edge_node_dim", "node") == node_dim]
    if not candidates:
        raise SelectionError(f"no edge-layout site in {tree.encoding.get('source', 'the tree')}; "
                             f"sites: {', '.join(s.path.strip('/') for s in sites_of(tree))}")
    return (preferred or candidates)[0]


def edge_names(site) -> list[str]:
    """``"source -> target"`` for every edge, with node labels.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import resolve_site
    >>> edge_names(resolve_site(attnformat.example_path("edge")))[:2]
    ['sensor 0 -> sensor 0', 'sensor 1 -> sensor 0']
    """
    labels = node_labels(site)
    return [f"{labels[s]} -> {labels[t]}" for s, t in zip(site.coords["source"].values, site.coords["target"].values)]


def top_edges_data(source, *, site=None, k: int = 20, variable="weights", layer=None, head=None, sample=None,
                   step=None, time=None, node=None):
    """The ``k`` largest edge values of one selection: ``(selection, edge indices, values, names)``.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import top_edges_data
    >>> chosen, edges, values, names = top_edges_data(attnformat.example_path("edge-time"), k=3, time=1)
    >>> len(values), bool(values[0] >= values[1] >= values[2])
    (3, True)
    """
    site_node = _edge_site(source, site)
    chosen = select(site_node, variable, densify=False, layer=layer, head=head, sample=sample, step=step, time=time, node=node)
    values = np.asarray(chosen.values, dtype=np.float64)
    finite = np.where(np.isfinite(values), values, -np.inf)
    order = np.argsort(-finite, kind="stable")[: max(0, min(k, values.size))]
    order = order[np.isfinite(values[order])]
    names = edge_names(site_node)
    return chosen, order, values[order], [names[i] for i in order]


def top_edges(source, *, site=None, k: int = 20, variable="weights", layer=None, head=None, sample=None, step=None,
              time=None, node=None, ax=None):
    """Bar chart of the ``k`` edges with the largest attention at one time step (seed 000).

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import top_edges
    >>> ax = top_edges(attnformat.example_path("edge-time"), k=5, time=0)
    >>> len(ax.patches)
    5
    """
    chosen, edges, values, names = top_edges_data(source, site=site, k=k, variable=variable, layer=layer, head=head,
                                                  sample=sample, step=step, time=time, node=node)
    ax = axes_or_new(ax, figsize=(max(6.4, 0.35 * len(values) + 2), 4.8))
    positions = np.arange(len(values))
    ax.bar(positions, values, color=BAR_COLOR)
    ax.set_xticks(positions, names, rotation=90, fontsize=8)
    ax.set_xlabel("edge (source -> target)")
    ax.set_ylabel(chosen.normalization)
    ax.set_title(f"{chosen.title()} | top {len(values)} of {chosen.values.size} edges", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    return ax


def node_link(source, *, site=None, variable="weights", layer=None, head=None, sample=None, step=None, time=None,
              node=None, cmap=None, labels: bool = True, ax=None):
    """Nodes at their stored positions (``node_x``, ``node_y``), edges coloured and sized by attention.

    Self-loops are left out of the drawing (they have no length); the title says how many.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import node_link
    >>> ax = node_link(attnformat.example_path("edge"), layer=0, head=1)
    >>> len(ax.collections[0].get_array())
    16
    """
    site_node = _edge_site(source, site)
    if "node_x" not in site_node.coords or "node_y" not in site_node.coords:
        raise SelectionError(f"site {site_name(site_node)} of {site_node.root.encoding.get('source', 'the tree')} stores no "
                             f"node positions (node_x, node_y), so it cannot be drawn as a graph; coordinates: "
                             f"{', '.join(site_node.coords)}")
    chosen = select(site_node, variable, densify=False, layer=layer, head=head, sample=sample, step=step, time=time, node=node)
    x, y = site_node.coords["node_x"].values, site_node.coords["node_y"].values
    sources, targets = site_node.coords["source"].values, site_node.coords["target"].values
    drawn = sources != targets
    values = np.asarray(chosen.values, dtype=np.float64)[drawn]
    colormap, norm = color_scale(values, variable=variable, cmap=cmap)
    starts = np.column_stack([x[sources[drawn]], y[sources[drawn]]]).astype(np.float64)
    ends = np.column_stack([x[targets[drawn]], y[targets[drawn]]]).astype(np.float64)
    # Edges i -> j and j -> i would hide each other: shift each to the right of its direction.
    direction = ends - starts
    length = np.linalg.norm(direction, axis=1, keepdims=True)
    normal = np.column_stack([direction[:, 1], -direction[:, 0]]) / np.where(length > 0, length, 1.0)
    span = max(np.ptp(x), np.ptp(y)) or 1.0
    shift = 0.015 * span * normal
    segments = np.stack([starts + shift, ends + shift], axis=1)
    finite = np.where(np.isfinite(values), values, 0.0)
    peak = np.max(np.abs(finite)) if finite.size else 1.0
    lines = LineCollection(segments, cmap=colormap, norm=norm, linewidths=0.5 + 4.0 * np.abs(finite) / (peak or 1.0), alpha=0.85)
    lines.set_array(values)
    ax = axes_or_new(ax)
    ax.add_collection(lines)
    ax.scatter(x, y, s=120, color="white", edgecolors="black", zorder=3)
    if labels:
        for label, px, py in zip(node_labels(site_node), x, y):
            ax.annotate(label, (px, py), textcoords="offset points", xytext=(0, 9), ha="center", fontsize=8)
    ax.autoscale_view()
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("node_x")
    ax.set_ylabel("node_y")
    loops = int((~drawn).sum())
    ax.set_title(f"{chosen.title()}\n{int(drawn.sum())} edges drawn" + (f", {loops} self-loops not drawn" if loops else ""), fontsize=9)
    ax.figure.colorbar(lines, ax=ax, label=chosen.normalization)
    return ax
