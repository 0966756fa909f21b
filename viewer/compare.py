"""Drawing comparisons of two attention files (or two steps of one): what :mod:`attnformat.compare` computes.

* :func:`diff`: the difference map ``B - A`` of one layer and head, on a diverging scale centred at
  0 with symmetric limits (unless ``vmin``/``vmax`` are given: they win), the colour bar shown,
  token labels thinned so none overlap;
* :func:`jsd_grid`: a layer x head grid of a per-head summary (mean Jensen-Shannon divergence, in
  bits, by default) with the values written in the cells;
* :func:`changed_heads`: the heads that changed most, ranked, as bars;
* :func:`diff_summary`: the three side by side, one figure (what ``attnformat diff -o`` writes).

Each takes two files (paths, URLs or trees) or, for the grid and the ranking, a
:class:`attnformat.compare.Comparison` already computed (so a whole-file comparison runs once).
"""

from __future__ import annotations

import numpy as np

from attnformat.compare import SUMMARIES, SUMMARY_DOCS, Comparison, compare, difference
from attnformat.errors import AttnFormatError
from attnformat.viewer.colors import color_scale, labelled_colorbar
from attnformat.viewer.docs import documented, register
from attnformat.viewer.heatmaps import _placed_axes, draw_map, fit_title
from attnformat.viewer.layer_head_maps import draw_layer_head_map, layer_head_figsize
from attnformat.viewer.output import (
    TICK_FONTSIZE,
    TITLE_FONTSIZE,
    MapPanel,
    axes_or_new,
    layout_maps,
    longest_label,
    new_figure,
    ordinal,
    text_width,
    tick_step,
)

register(
    compare_inputs="""
        a, b : str, os.PathLike or xarray.DataTree
            The two files (paths, URLs or opened trees); what is drawn is ``B - A``. Without ``b``,
            two steps of ``a`` (``step_a``, ``step_b``).
    """,
    compare_options="""
        site : str, optional
            Site path; the only dense site holding ``variable`` when there is one (the grid and the
            ranking: every site compared).
        variable : str, default "weights"
            ``weights`` (differences and Jensen-Shannon divergence), ``logits`` or ``bias``.
        step_a, step_b : int or label, optional
            Compare step ``step_a`` of A with step ``step_b`` of B.
        allow_label_mismatch : bool, default False
            Compare even when token labels differ (by default the first difference is an error).
        storage_options : mapping, optional
            fsspec options for URLs (both inputs).
    """,
    comparison_input="""
        a : Comparison, str, os.PathLike or xarray.DataTree
            A :class:`attnformat.compare.Comparison` already computed, or the first file (then
            ``b`` and the options of :func:`attnformat.compare.compare` say what to compare).
        b : str, os.PathLike or xarray.DataTree, optional
            The second file.
    """,
)


def _comparison(a, b, *, site, variable, step_a, step_b, allow_label_mismatch, storage_options) -> Comparison:
    if isinstance(a, Comparison):
        return a
    return compare(a, b, site=site, variable=variable, step_a=step_a, step_b=step_b,
                   allow_label_mismatch=allow_label_mismatch, rows=False, storage_options=storage_options)


def _short(text: str) -> str:
    """The last part of a path or URL (and its step), for titles."""
    head, _, step = text.partition(" step ")
    name = head.rstrip("/").rsplit("/", 1)[-1]
    return name + (f" step {step}" if step else "")


@documented
def diff(a, b=None, *, site=None, variable: str = "weights", layer=None, head=None, sample=None, time=None,
         node=None, step_a=None, step_b=None, allow_label_mismatch: bool = False, storage_options=None, cmap=None,
         vmin=None, vmax=None, origin: str = "upper", colorbar: bool = True, figsize=None, title: str | None = None,
         ax=None):
    """Difference map ``B - A`` of one layer and head of two files (or two steps of one file).

    The scale diverges from 0 (white) with symmetric limits ``-m..m``, ``m`` the largest
    ``|B - A|`` drawn; ``vmin``/``vmax`` given win. Padding tokens (in either file) are left out;
    cells absent from either file (NaN), and pairs of nodes without an edge in a graph site, are
    drawn in the missing colour. Without ``layer`` and
    ``head`` (when the site has several), the head that changed most is drawn (this compares the
    whole site first) and the title says so.

    Parameters
    ----------
    $compare_inputs
    $compare_options
    layer, head, sample, time, node : int or str, optional
        Which map: a label or a position along each dimension the site has.
    $color_limits
    $origin
    $colorbar
    $heatmap_figsize
    title : str, optional
        Axes title, used as given; the default names the site, the selection and ``B - A``.
    $ax

    Returns
    -------
    matplotlib.axes.Axes
        ``ax.images[0]`` holds the drawn differences.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer.compare import diff
    >>> ax = diff(attnformat.example_path("steps"), step_a=100, step_b=300, layer=1, head=0)
    >>> ax.get_title()
    'trunk/iga | layer 1 | head 0 | weights: steps.zarr step 300 - steps.zarr step 100'
    >>> ax.figure.axes[1].get_ylabel()
    'weights difference (B - A)'
    """
    selectors = {name: value for name, value in (("layer", layer), ("head", head), ("sample", sample), ("time", time),
                                                  ("node", node)) if value is not None}
    note = ""
    if layer is None or head is None:
        picked = _most_changed(a, b, site=site, variable=variable, step_a=step_a, step_b=step_b,
                               allow_label_mismatch=allow_label_mismatch, storage_options=storage_options,
                               fixed=selectors)
        if picked is not None:
            site = picked["site"]
            for dim in ("layer", "head"):
                if dim in picked:
                    selectors.setdefault(dim, picked[dim])
            note = " (most changed)"
    one = difference(a, b, site=site, variable=variable, step_a=step_a, step_b=step_b,
                     allow_label_mismatch=allow_label_mismatch, storage_options=storage_options, **selectors)
    values = one["difference"].values
    query_labels = [str(v) for v in one["query_label"].values]
    key_labels = [str(v) for v in one["key_label"].values]
    names = f"{_short(one.attrs['a'] + (f' step {step_a}' if step_a is not None else ''))}"
    names_b = f"{_short(one.attrs['b'] + (f' step {step_b}' if step_b is not None else ''))}"
    if title is None:
        parts = [one.attrs["site"], *([one.attrs["selection"]] if one.attrs["selection"] else [])]
        title = " | ".join(parts) + f"{note} | {variable}: {names_b} - {names}"
    cmap, norm = color_scale(values, variable=variable, cmap=cmap, vmin=vmin, vmax=vmax, diverging=True,
                             scale="symmetric", center=0.0)
    colorbar_axes = steps = None
    if ax is None:
        rows, cols = values.shape
        layout = layout_maps([MapPanel(rows, cols, tuple(query_labels), tuple(key_labels), title=title)], ncols=1,
                             figsize=figsize, colorbar=colorbar)
        ax, colorbar_axes = _placed_axes(layout, colorbar)
        steps = layout.steps(rows, cols)
        width = layout.panel[0]
    else:
        width = ax.get_position().width * ax.figure.get_size_inches()[0]
    xlabel, ylabel = ("source node (key)", "target node (query)") if one.attrs.get("layout") == "edge" else ("key", "query")
    image = draw_map(ax, values, cmap=cmap, norm=norm, query_labels=query_labels, key_labels=key_labels,
                     origin=origin, title=title, steps=steps, xlabel=xlabel, ylabel=ylabel)
    if colorbar:
        labelled_colorbar(image, ax=ax, label=f"{variable} difference (B - A)", values=values,
                          **({"cax": colorbar_axes} if colorbar_axes is not None else {}))
    fit_title(ax, width)
    return ax


def _most_changed(a, b, *, site, variable, step_a, step_b, allow_label_mismatch, storage_options, fixed) -> dict | None:
    """The most changed head (of ``site``), or None when there is nothing to choose."""
    result = _comparison(a, b, site=site, variable=variable, step_a=step_a, step_b=step_b,
                         allow_label_mismatch=allow_label_mismatch, storage_options=storage_options)
    candidates = [head for head in result.top(None) if all(head.get(dim, value) == value for dim, value in fixed.items())]
    return candidates[0] if candidates else None


register(
    summary_statistic="""
        statistic : str, default "mean_jsd"
            The per-head summary drawn: ``mean_jsd``, ``max_jsd`` (bits), ``max_abs_diff``,
            ``mean_abs_diff``, ``mean_l1``, ``max_l1`` or ``rows``.
    """,
)


def _grid_values(result: Comparison, site: str | None, statistic: str):
    dataset = result.dataset(site)
    if statistic not in dataset:
        raise AttnFormatError(f"{result.a} vs {result.b}: no {statistic!r} for {result.variable} "
                              f"(available: {', '.join(n for n in SUMMARIES if n in dataset)})")
    values = dataset[statistic]
    for dim in ("layer", "head"):
        if dim not in values.dims:
            values = values.expand_dims(dim)
    values = values.transpose("layer", "head")
    layers = [str(v) for v in (dataset["layer"].values if "layer" in dataset.coords else range(values.shape[0]))]
    heads = [str(v) for v in (dataset["head"].values if "head" in dataset.coords else range(values.shape[1]))]
    return np.asarray(values.values, dtype=np.float64), layers, heads, dataset.attrs["site"]


@documented
def jsd_grid(a, b=None, *, statistic: str = "mean_jsd", site=None, variable: str = "weights", step_a=None,
             step_b=None, allow_label_mismatch: bool = False, storage_options=None, cmap=None, vmin=None, vmax=None,
             annotate: bool | None = None, colorbar: bool = True, figsize=None, title: str | None = None, ax=None):
    """Layer x head grid of how much each head changed (mean Jensen-Shannon divergence by default).

    Each cell is one head's summary over every query row compared (padding and empty rows left
    out); a head with no row compared is drawn in the missing colour. The scale starts at 0 (no
    change) unless ``vmin`` is given.

    Parameters
    ----------
    $comparison_input
    $summary_statistic
    $compare_options
    $color_limits
    $annotate
    $colorbar
    $figsize
    $title
    $ax

    Returns
    -------
    matplotlib.axes.Axes
        ``ax.images[0]`` holds the drawn ``(layer, head)`` values.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer.compare import jsd_grid
    >>> ax = jsd_grid(attnformat.example_path("steps"), step_a=100, step_b=300)
    >>> ax.images[0].get_array().shape, ax.figure.axes[1].get_ylabel()
    ((2, 2), 'mean_jsd [bits]')
    """
    if statistic not in SUMMARIES:
        raise AttnFormatError(f"no per-head summary {statistic!r}; use one of: {', '.join(SUMMARIES)}")
    result = _comparison(a, b, site=site, variable=variable, step_a=step_a, step_b=step_b,
                         allow_label_mismatch=allow_label_mismatch, storage_options=storage_options)
    values, layers, heads, site_name = _grid_values(result, site, statistic)
    text = title if title is not None else f"{site_name} | {statistic}: {_short(result.b)} vs {_short(result.a)}"
    label = statistic + (" [bits]" if statistic.endswith("jsd") else "")
    if ax is None:
        if figsize is None:
            figsize = layer_head_figsize(layers, heads, text, [label])
        ax = axes_or_new(None, figsize=figsize)
    low = 0.0 if vmin is None and vmax is None and statistic != "rows" else vmin
    if low is not None and vmax is None and np.isfinite(values).any() and np.nanmax(values) <= low:
        low = None  # nothing above 0 (identical inputs): let the scale widen around the data
    cmap, norm = color_scale(values, cmap=cmap if cmap is not None else "magma_r", vmin=low, vmax=vmax, diverging=False)
    draw_layer_head_map(ax, values, layers, heads, cmap=cmap, norm=norm, annotate=annotate,
                        cell_text=lambda value: f"{value:.2g}" if statistic != "rows" else f"{int(value)}",
                        colorbar=colorbar, colorbar_label=label, title=text, fit=True)
    return ax


@documented
def changed_heads(a, b=None, *, top: int = 10, by: str | None = None, site=None, variable: str = "weights",
                  step_a=None, step_b=None, allow_label_mismatch: bool = False, storage_options=None, figsize=None,
                  title: str | None = None, ax=None):
    """The heads that changed most, ranked, as horizontal bars (the largest at the top).

    Parameters
    ----------
    $comparison_input
    top : int, default 10
        How many heads.
    by : str, optional
        The summary that ranks them (``mean_jsd`` for weights, ``mean_abs_diff`` otherwise).
    $compare_options
    $figsize
    $title
    $ax

    Returns
    -------
    matplotlib.axes.Axes
        One bar per head, ``ax.patches`` in rank order.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer.compare import changed_heads
    >>> ax = changed_heads(attnformat.example_path("steps"), step_a=100, step_b=300, top=3)
    >>> [t.get_text() for t in ax.get_yticklabels()][0].startswith("trunk/iga L")
    True
    """
    result = _comparison(a, b, site=site, variable=variable, step_a=step_a, step_b=step_b,
                         allow_label_mismatch=allow_label_mismatch, storage_options=storage_options)
    by = by or result.rank_by
    ranked = [head for head in result.top(top, by=by) if head[by] is not None]
    several_sites = len(result.sites) > 1 or site is None
    names = [_head_name(head, several_sites) for head in ranked]
    values = [float(head[by]) for head in ranked]
    text = title if title is not None else f"most changed heads by {by}: {_short(result.b)} vs {_short(result.a)}"
    if ax is None:
        if figsize is None:
            height = max(2.4, 0.28 * len(names) + 1.4)
            width = max(4.5, longest_label(names) + 3.5, text_width(text, TITLE_FONTSIZE) + 0.6)
            figsize = (min(20.0, width), min(16.0, height))
        ax = axes_or_new(None, figsize=figsize)
        # Constrained layout gives the title, the x axis and its label about an inch.
        room = ax.figure.get_size_inches()[1] - 1.1
    else:
        room = ax.get_position().height * ax.figure.get_size_inches()[1] * 0.9
    positions = np.arange(len(names))
    ax.barh(positions, values, color="#c0504d")
    # More heads than the Axes has lines for: every k-th name, and the axis says so.
    step = tick_step(len(names), max(room, 0.1)) if names else 1
    ax.set_yticks(positions[::step], names[::step], fontsize=TICK_FONTSIZE)
    if step > 1:
        ax.set_ylabel(f"head (every {ordinal(step)} label)")
    ax.invert_yaxis()
    ax.set_xlabel(by + (" [bits]" if by.endswith("jsd") else ""))
    if values:
        ax.set_xlim(0, max(values) * 1.25 or 1.0)
        for position, value in list(zip(positions, values))[::step]:
            ax.text(value, position, f" {value:.3g}", va="center", fontsize=TICK_FONTSIZE)
    else:
        ax.text(0.5, 0.5, "no head compared", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(text, fontsize=TITLE_FONTSIZE)
    fit_title(ax, ax.get_position().width * ax.figure.get_size_inches()[0])
    return ax


def _head_name(head: dict, with_site: bool) -> str:
    parts = [head["site"]] if with_site else []
    if "layer" in head:
        parts.append(f"L{head['layer']}")
    if "head" in head:
        parts.append(f"H{head['head']}")
    return " ".join(parts)


@documented
def diff_summary(a, b=None, *, site=None, variable: str = "weights", step_a=None, step_b=None, layer=None,
                 head=None, sample=None, top: int = 10, allow_label_mismatch: bool = False, storage_options=None,
                 figsize=None, title: str | None = None):
    """One figure: the difference map of one head (the most changed by default), the layer x head
    grid of mean JSD (or mean ``|B - A|``) and the ranked heads.

    The whole site is compared once; the three panels are drawn from that comparison.

    Parameters
    ----------
    $compare_inputs
    $compare_options
    layer, head, sample : int or str, optional
        The map of the difference panel (the most changed head by default).
    top : int, default 10
        Heads in the ranking.
    figsize : (float, float), optional
        Figure size in inches, used as given (default: sized to the panels).
    title : str, optional
        Figure title; the default names the two inputs.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer.compare import diff_summary
    >>> figure = diff_summary(attnformat.example_path("steps"), step_a=100, step_b=300)
    >>> len(figure.axes)
    5
    """
    result = compare(a, b, site=site, variable=variable, step_a=step_a, step_b=step_b,
                     allow_label_mismatch=allow_label_mismatch, rows=False, storage_options=storage_options)
    site_name = site or (result.sites[0] if len(result.sites) == 1 else result.top(1)[0]["site"])
    if layer is None or head is None:
        fixed = {k: v for k, v in (("layer", layer), ("head", head)) if v is not None}
        ranked = [h for h in result.top(None) if h["site"] == site_name.strip("/")
                  and all(h.get(d, v) == v for d, v in fixed.items())]
        if ranked:
            layer = ranked[0].get("layer", layer)
            head = ranked[0].get("head", head)
    dataset = result.dataset(site_name)
    rows = dataset.attrs["compared_dims"].get("query", 10)
    map_side = min(7.0, max(3.5, 0.13 * rows + 1.5))
    layers = dataset.sizes.get("layer", 1)
    heads = dataset.sizes.get("head", 1)
    grid_w = min(7.0, max(3.5, 0.45 * heads + 2.2))
    ranked_w = 4.2
    if figsize is None:
        figsize = (map_side + 1.8 + grid_w + ranked_w + 1.0, max(map_side + 1.6, 0.45 * layers + 2.0, 0.28 * top + 2.0))
    figure = new_figure(figsize)
    axes = figure.subplots(1, 3, width_ratios=[map_side, grid_w, ranked_w])
    selectors = {k: v for k, v in (("layer", layer), ("head", head), ("sample", sample)) if v is not None}
    shown = " | ".join(f"{dim} {value}" for dim, value in selectors.items())
    diff(a, b, site=site_name, variable=variable, step_a=step_a, step_b=step_b, allow_label_mismatch=allow_label_mismatch,
         storage_options=storage_options, ax=axes[0], title=f"{site_name} | {shown} | B - A" if shown else f"{site_name} | B - A",
         **selectors)
    statistic = result.rank_by
    jsd_grid(result, site=site_name, statistic=statistic, ax=axes[1], title=f"{statistic} per head")
    changed_heads(result, top=top, ax=axes[2], title="most changed heads")
    figure.suptitle(title if title is not None else f"{variable}: {_short(result.b)} - {_short(result.a)}",
                    fontsize=TITLE_FONTSIZE)
    return figure


__all__ = ["changed_heads", "diff", "diff_summary", "jsd_grid", "SUMMARY_DOCS"]
