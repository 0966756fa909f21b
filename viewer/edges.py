"""Edge-layout attention (graphs, seed 000): top-k edges of a time step, node-link drawings.

Both plots read the edge values as stored (no densifying, no rescaling). ``top_edges`` draws
them as bars (the value axis is the scale; with a ``cmap`` the bars are also coloured, with a
colorbar); ``node_link`` colours every edge on one colour scale shown by a colorbar.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection

from attnformat.conventions import is_site
from attnformat.errors import SelectionError
from attnformat.viewer.colors import BAR_COLOR, color_scale, labelled_colorbar
from attnformat.viewer.docs import documented, register
from attnformat.viewer.heatmaps import colorbar_label
from attnformat.viewer.images import wrap_title
from attnformat.viewer.output import new_figure, ordinal, text_width, tick_step
from attnformat.viewer.selection import Selection, node_labels, open_source, resolve_site, select, site_name, sites_of

#: Font size of edge names under the bars, in points.
EDGE_LABEL_FONTSIZE = 8
#: Height of the bars' plotting area, in inches, when the figure sizes itself.
BAR_AREA_INCHES = 3.2

register(
    edge_k="""
        k : int, default 20
            How many edges: the ``k`` largest finite values, largest first (fewer when the selection has fewer).
    """,
    edge_bar_color="""
        cmap : str or matplotlib.colors.Colormap, optional
            Colour the bars by value on this colormap and add a colorbar; by default the bars have
            one colour and the value axis is the only scale.
        vmin, vmax : float, optional
            Limits of the value axis (and of the colour scale with ``cmap``), used exactly.
    """,
    edge_color="""
        cmap : str or matplotlib.colors.Colormap, optional
            Colormap of the edges, used as given; defaults follow
            :func:`attnformat.viewer.colors.color_scale` (``viridis`` for weights).
        vmin, vmax : float, optional
            Colour limits, used exactly; see :func:`attnformat.viewer.colors.color_scale` for the
            rule when one or neither is given.
        log : bool, default False
            Logarithmic colour scale (values <= 0 are drawn as missing).
        center : float, optional
            Centre of a signed scale (default 0 for logits and biases).
    """,
    edge_node_labels="""
        labels : bool, default True
            Write each node's label next to it.
    """,
)


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

    Parameters
    ----------
    site : xarray.DataTree
        An edge-layout site.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import resolve_site
    >>> edge_names(resolve_site(attnformat.example_path("edge")))[:2]
    ['sensor 0 -> sensor 0', 'sensor 1 -> sensor 0']
    """
    labels = node_labels(site)
    return [f"{labels[s]} -> {labels[t]}" for s, t in zip(site.coords["source"].values, site.coords["target"].values)]


@documented
def top_edges_data(source, *, site=None, k: int = 20, variable="weights", layer=None, head=None, sample=None,
                   step=None, time=None, node=None):
    """The ``k`` largest edge values of one selection: ``(selection, edge indices, values, names)``; draws nothing.

    Edges whose value is NaN (not captured) or infinite are never among them.

    Parameters
    ----------
    $source
    $site
    $edge_k
    $variable
    $selectors

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


def _thin_labels(ax, names: list[str], fontsize: float) -> int:
    """Keep every n-th bar name so that the rotated names fit the Axes' width; returns n (1: all shown)."""
    # Before layout, the Axes' share of the figure is the subplot default; 0.9 leaves room for the
    # margins constrained layout adds.
    width = 0.9 * ax.get_position().width * ax.figure.get_figwidth()
    step = tick_step(len(names), width, fontsize)
    if step > 1:
        ax.set_xticks(np.arange(0, len(names), step), names[::step], rotation=90, fontsize=fontsize)
    return step


@documented
def top_edges(source, *, site=None, k: int = 20, variable="weights", layer=None, head=None, sample=None, step=None,
              time=None, node=None, cmap=None, vmin=None, vmax=None, colorbar: bool = True, ax=None, figsize=None,
              title: str | None = None):
    """Bar chart of the ``k`` edges with the largest attention at one time step (seed 000).

    Bars are the stored values, largest first, named ``"source -> target"`` by node label. A figure
    made here is tall enough for the longest name and wide enough for every name; on an ``ax`` too
    narrow for all of them only every n-th name is written (the x label says so).

    Parameters
    ----------
    $source
    $site
    $edge_k
    $variable
    $selectors
    $edge_bar_color
    colorbar : bool, default True
        With ``cmap``, draw a colorbar labelled with what the colours mean.
    $ax
    $figsize
    $title

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import top_edges
    >>> ax = top_edges(attnformat.example_path("edge-time"), k=5, time=0)
    >>> len(ax.patches), ax.get_xticklabels()[0].get_text()
    (5, 'n1 -> n2')
    """
    chosen, edges, values, names = top_edges_data(source, site=site, k=k, variable=variable, layer=layer, head=head,
                                                  sample=sample, step=step, time=time, node=node)
    fontsize = EDGE_LABEL_FONTSIZE
    default = f"{chosen.title()} | top {len(values)} of {chosen.values.size} edges"
    if ax is None:
        longest = max((text_width(name, fontsize) for name in names), default=0.0)
        # Wide enough for every bar's name and for the title on one line (up to 10 inches; then it wraps).
        width = max(6.4, 0.22 * len(values) + 1.6, min(10.0, text_width(title or default, 9) + 0.7))
        ax = new_figure(figsize or (width, BAR_AREA_INCHES + longest + 1.2)).add_subplot()
    positions = np.arange(len(values))
    if cmap is not None:
        colormap, norm = color_scale(values, variable=variable, cmap=cmap, vmin=vmin, vmax=vmax)
        ax.bar(positions, values, color=colormap(norm(values)))
    else:
        ax.bar(positions, values, color=BAR_COLOR)
    ax.set_xticks(positions, names, rotation=90, fontsize=fontsize)
    shown = _thin_labels(ax, names, fontsize)
    ax.set_xlabel("edge (source -> target)" + (f"\nevery {ordinal(shown)} named" if shown > 1 else ""))
    ax.set_ylabel(colorbar_label(chosen))
    if vmin is not None or vmax is not None:
        ax.set_ylim(bottom=vmin, top=vmax)
    if len(values):
        ax.set_xlim(-0.6, len(values) - 0.4)
    ax.set_title(title if title is not None else wrap_title(default, ax.figure.get_figwidth() - 0.6, 9), fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    if cmap is not None and colorbar:
        labelled_colorbar(ScalarMappable(norm=norm, cmap=colormap), ax=ax, values=values, label=colorbar_label(chosen))
    return ax


@dataclass
class NodeLinkData:
    """What :func:`node_link` draws: node positions and the non-loop edges with their stored values."""

    selection: Selection
    x: np.ndarray
    y: np.ndarray
    labels: list
    sources: np.ndarray
    targets: np.ndarray
    values: np.ndarray
    loops: int

    @property
    def segments(self) -> np.ndarray:
        """``(edges, 2, 2)`` line segments from source to target, each shifted to the right of its
        direction so that ``i -> j`` and ``j -> i`` do not hide each other."""
        starts = np.column_stack([self.x[self.sources], self.y[self.sources]]).astype(np.float64)
        ends = np.column_stack([self.x[self.targets], self.y[self.targets]]).astype(np.float64)
        direction = ends - starts
        length = np.linalg.norm(direction, axis=1, keepdims=True)
        normal = np.column_stack([direction[:, 1], -direction[:, 0]]) / np.where(length > 0, length, 1.0)
        span = max(np.ptp(self.x), np.ptp(self.y)) if self.x.size else 1.0
        shift = 0.015 * (span or 1.0) * normal
        return np.stack([starts + shift, ends + shift], axis=1)


@documented
def node_link_data(source, *, site=None, variable="weights", layer=None, head=None, sample=None, step=None,
                   time=None, node=None) -> NodeLinkData:
    """The nodes (at ``node_x``, ``node_y``) and every edge that is not a self-loop, with its value; draws nothing.

    Parameters
    ----------
    $source
    $site
    $variable
    $selectors

    Examples
    --------
    >>> import attnformat
    >>> data = node_link_data(attnformat.example_path("edge"), layer=0, head=1)
    >>> data.values.shape, data.loops, data.segments.shape
    ((16,), 6, (16, 2, 2))
    """
    site_node = _edge_site(source, site)
    if "node_x" not in site_node.coords or "node_y" not in site_node.coords:
        raise SelectionError(f"site {site_name(site_node)} of {site_node.root.encoding.get('source', 'the tree')} stores no "
                             f"node positions (node_x, node_y), so it cannot be drawn as a graph; coordinates: "
                             f"{', '.join(site_node.coords)}")
    chosen = select(site_node, variable, densify=False, layer=layer, head=head, sample=sample, step=step, time=time, node=node)
    sources, targets = site_node.coords["source"].values, site_node.coords["target"].values
    drawn = sources != targets
    return NodeLinkData(selection=chosen, x=np.asarray(site_node.coords["node_x"].values, dtype=np.float64),
                        y=np.asarray(site_node.coords["node_y"].values, dtype=np.float64),
                        labels=node_labels(site_node), sources=sources[drawn], targets=targets[drawn],
                        values=np.asarray(chosen.values, dtype=np.float64)[drawn], loops=int((~drawn).sum()))


@documented
def node_link(source, *, site=None, variable="weights", layer=None, head=None, sample=None, step=None, time=None,
              node=None, cmap=None, vmin=None, vmax=None, log: bool = False, center=None, labels: bool = True,
              colorbar: bool = True, ax=None, figsize=None, title: str | None = None):
    """Nodes at their stored positions (``node_x``, ``node_y``), edges coloured by attention.

    Each edge's colour is its stored value on the colour scale shown by the colorbar; its width
    grows with ``|value|`` relative to the largest (a second cue only). Self-loops are left out of
    the drawing (they have no length); the title says how many.

    Parameters
    ----------
    $source
    $site
    $variable
    $selectors
    $edge_color
    $edge_node_labels
    $colorbar
    $ax
    $figsize
    $title

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import node_link
    >>> ax = node_link(attnformat.example_path("edge"), layer=0, head=1)
    >>> len(ax.collections[0].get_array()), ax.figure.axes[1].get_ylabel()
    (16, 'weights (softmax)')
    """
    data = node_link_data(source, site=site, variable=variable, layer=layer, head=head, sample=sample, step=step,
                          time=time, node=node)
    chosen, values = data.selection, data.values
    colormap, norm = color_scale(values, variable=variable, cmap=cmap, vmin=vmin, vmax=vmax, log=log, center=center)
    finite = np.where(np.isfinite(values), values, 0.0)
    peak = float(np.max(np.abs(finite))) if finite.size else 1.0
    lines = LineCollection(data.segments, cmap=colormap, norm=norm, linewidths=0.5 + 4.0 * np.abs(finite) / (peak or 1.0),
                           alpha=0.85)
    lines.set_array(values)
    if ax is None:
        ax = new_figure(figsize or (6.4, 5.6)).add_subplot()
    ax.add_collection(lines)
    ax.scatter(data.x, data.y, s=120, color="white", edgecolors="black", zorder=3)
    if labels:
        for label, px, py in zip(data.labels, data.x, data.y):
            ax.annotate(label, (px, py), textcoords="offset points", xytext=(0, 9), ha="center", fontsize=8)
    ax.autoscale_view()
    ax.margins(0.08)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("node_x")
    ax.set_ylabel("node_y")
    drawn = f"{values.size} edges drawn" + (f", {data.loops} self-loops not drawn" if data.loops else "")
    ax.set_title(title if title is not None else wrap_title(chosen.title(), ax.figure.get_figwidth() - 1.6, 9) + "\n" + drawn,
                 fontsize=9)
    if colorbar:
        labelled_colorbar(lines, ax=ax, values=values, label=colorbar_label(chosen))
    return ax
