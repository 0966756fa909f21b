"""Statistics sites drawn: the per-row statistics a capture stored for every layer and head.

A statistics site (``layout="statistics"``) holds, per query row, ``entropy`` (nats),
``max_weight``, ``sink_weight`` (weight on the row's first unmasked key), ``local_weight`` (weight
within ``local_window`` positions of the query) and ``top_key`` (the argmax key, -1 not captured).
These figures draw the stored values as they are (nothing is recomputed):

* :func:`statistics_overview`: a layer x head map of one statistic averaged over query rows;
* :func:`statistics_profile`: one statistic along the query rows for chosen layers and heads;
* :func:`top_key_plot`: each row's top key (or its offset from the query).

Rows that were not captured (NaN, or -1 for ``top_key``) are left out of every mean and drawn as
gaps, and the figures say how many rows they cover.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from attnformat.errors import SelectionError
from attnformat.viewer.colors import color_scale
from attnformat.viewer.docs import documented, register
from attnformat.viewer.layer_head_maps import draw_layer_head_map, layer_head_figsize
from attnformat.viewer.output import (
    LEGEND_FONTSIZE,
    TICK_FONTSIZE,
    TITLE_FONTSIZE,
    axes_or_new,
    label_pitch,
    longest_label,
    text_width,
    thinned_label,
    tick_step,
)
from attnformat.viewer.selection import (
    REDUCTIONS,
    SELECTABLE_DIMS,
    _view,
    first_generated,
    key_count,
    labels_of,
    position,
    positions_along,
    real_tokens,
    select,
    selector_list,
    site_name,
    site_of_layout,
)

#: The statistics a statistics site may store (spec 1.2.0), in the order figures list them.
STORED_STATISTICS = ("entropy", "max_weight", "sink_weight", "local_weight", "top_key")
#: What each statistic (and the derived ``top_key_offset``) is called in labels, and its units.
STATISTIC_LABELS = {
    "entropy": ("entropy", "nats"),
    "max_weight": ("max weight", "fraction of the row"),
    "sink_weight": ("sink weight (first key)", "fraction of the row"),
    "local_weight": ("local weight", "fraction of the row"),
    "top_key": ("top key", "key index"),
    "top_key_offset": ("top-key offset (query - key position)", "positions"),
}
#: Statistics the overview and the profile can draw (``top_key`` only as its offset).
DRAWABLE = ("entropy", "max_weight", "sink_weight", "local_weight", "top_key_offset")

register(
    statistic="""
        statistic : {"entropy", "max_weight", "sink_weight", "local_weight", "top_key_offset"}
            The stored statistic to draw. ``top_key_offset`` is each row's query position minus
            the position of its top key (0: the query itself, 1: the previous token, the query's
            position: the first key), derived from the stored ``top_key``; key indices themselves
            are not averaged.
    """,
    statistics_rows="""
        queries : int, str or list of them, optional
            Only these query rows (labels or positions); all rows by default. Rows not captured
            are left out either way.
    """,
    statistics_selectors="""
        sample, step, time, node : int or str, optional
            Which copy of the statistics, where the site has these dimensions (the first by default).
    """,
)


def statistic_label(statistic: str, attrs=None) -> str:
    """``entropy [nats]``: a statistic's name and units, as axes and colorbars say it.

    ``local_weight`` names its window when the site's attributes are given.

    Examples
    --------
    >>> statistic_label("entropy"), statistic_label("local_weight", {"local_window": 2})
    ('entropy [nats]', 'local weight (|query - key position| <= 2) [fraction of the row]')
    """
    if statistic not in STATISTIC_LABELS:
        raise SelectionError(f"no statistic {statistic!r}; statistics: {', '.join(STATISTIC_LABELS)}")
    name, units = STATISTIC_LABELS[statistic]
    if statistic == "local_weight" and attrs is not None and "local_window" in attrs:
        name = f"local weight (|query - key position| <= {int(attrs['local_window'])})"
    return f"{name} [{units}]"


def _stored(node, statistic: str) -> str:
    name = "top_key" if statistic == "top_key_offset" else statistic
    if statistic not in STATISTIC_LABELS:
        raise SelectionError(f"no statistic {statistic!r}; statistics: {', '.join(DRAWABLE)}")
    if name not in node.data_vars:
        stored = [s for s in STORED_STATISTICS if s in node.data_vars]
        raise SelectionError(f"statistic {name!r} not in file {_view(node).source}, site {site_name(node)}; "
                             f"it stores: {', '.join(stored) or '(none)'}")
    return name


def _read(node, statistic: str, *, keep, selectors: dict):
    """A Selection of one statistic with ``keep`` whole, as floats: NaN where a row was not captured.

    ``top_key_offset`` becomes query position minus top-key position.
    """
    name = _stored(node, statistic)
    dims = node[name].dims
    keep = tuple(d for d in keep if d in dims)
    for dim, value in selectors.items():
        if value is not None and dim not in dims:
            raise SelectionError(f"{dim} {value!r} not in file {_view(node).source}, site {site_name(node)}: "
                                 f"{name} has no {dim} dimension; its dimensions: {', '.join(dims)}")
    # Padded query rows (query_mask False) hold fill values, not statistics: they are left out, and
    # chosen.query_index keeps the positions of the rows that remain.
    chosen = select(node, name, keep=keep, drop_padding=True,
                    **{d: v for d, v in selectors.items() if d in SELECTABLE_DIMS and d not in keep and d in dims})
    values = np.asarray(chosen.values)
    if name == "top_key":
        keys = values.astype(np.int64)
        missing = keys < 0
        if statistic == "top_key_offset":
            sample = chosen.positions.get("sample")
            query_positions = positions_along(node, "query", sample)[chosen.query_index]
            key_positions = positions_along(node, "key", sample)
            offsets = query_positions - key_positions[np.clip(keys, 0, key_positions.size - 1)]
            values = np.where(missing, np.nan, offsets.astype(np.float64))
        else:
            values = np.where(missing, np.nan, keys.astype(np.float64))
    else:
        values = values.astype(np.float64)
    chosen.values = values
    return chosen


def _row_positions(node, queries, sample) -> np.ndarray | None:
    if queries is None:
        return None
    return np.array(sorted({position(node, "query", value, sample=sample) for value in selector_list(queries)}),
                    dtype=np.int64)


def _rows_text(node, rows, sample) -> str:
    if rows is None:
        return "mean over rows"
    labels = labels_of(node, "query", sample)
    shown = ", ".join(labels[r] for r in rows[:6]) + (f", ... ({rows.size - 6} more)" if rows.size > 6 else "")
    return f"mean over {'query' if rows.size == 1 else 'queries'} {shown}" if rows.size > 1 else f"query {shown}"


@dataclass
class StatisticsTable:
    """A statistic averaged over query rows, per layer and head (the preparer's result).

    ``values`` is ``(layer, head)`` (a site without ``layer`` or ``head`` has one row or column,
    labelled ``"all"`` or ``"mean"``); ``rows`` counts the captured rows behind each mean.
    """

    values: np.ndarray
    rows: np.ndarray
    layers: list
    heads: list
    statistic: str
    label: str
    site: str
    described: dict = field(default_factory=dict)
    over: str = "mean over rows"

    def title(self) -> str:
        """``decoder/self_stats | entropy [nats] | mean over rows``, with any sample or step chosen."""
        chosen = " | ".join(f"{d} {t}" for d, t in self.described.items() if d not in ("layer", "head"))
        return " | ".join(p for p in (self.site, chosen, self.label, self.over) if p)


@documented
def statistics_table(source, statistic: str = "entropy", *, site=None, queries=None, sample=None, step=None,
                     time=None, node=None) -> StatisticsTable:
    """One stored statistic averaged over (chosen) query rows, per layer and head, without drawing.

    Parameters
    ----------
    $source
    $statistic
    $site
    $statistics_rows
    $statistics_selectors

    Returns
    -------
    StatisticsTable

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import statistics_table
    >>> table = statistics_table(attnformat.example_path("statistics"), "sink_weight")
    >>> table.values.shape, table.label
    ((3, 4), 'sink weight (first key) [fraction of the row]')
    """
    if statistic == "top_key":
        raise SelectionError("key indices are not averaged: draw top_key_offset (query - top key position), or each "
                             "row's top key with top_key_plot")
    site_node = site_of_layout(source, site, "statistics")
    chosen = _read(site_node, statistic, keep=("layer", "head"),
                   selectors=dict(sample=sample, step=step, time=time, node=node))
    values = chosen.values
    dims = list(chosen.dims)
    for dim in ("layer", "head"):  # a site without the dimension: one row or column
        if dim not in dims:
            values = np.expand_dims(values, 0 if dim == "layer" else len(dims) - 1)
            dims.insert(0 if dim == "layer" else len(dims) - 1, dim)
    values = np.moveaxis(values, [dims.index("layer"), dims.index("head")], [0, 1])
    rows = _row_positions(site_node, queries, chosen.positions.get("sample"))
    if rows is not None:
        values = values[..., np.isin(chosen.query_index, rows)]
    captured = np.isfinite(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(captured.any(axis=-1), np.where(captured, values, 0.0).sum(axis=-1) / captured.sum(axis=-1),
                         np.nan)
    layers = labels_of(site_node, "layer") if "layer" in chosen.dims else ["all"]
    heads = labels_of(site_node, "head") if "head" in chosen.dims else [
        "mean" if site_node.attrs.get("head_reduction") == "mean" else "all"]
    return StatisticsTable(values=means, rows=captured.sum(axis=-1), layers=layers, heads=heads, statistic=statistic,
                           label=statistic_label(statistic, site_node.attrs), site=site_name(site_node),
                           described={d: t for d, t in chosen.described.items() if d not in ("layer", "head")},
                           over=_rows_text(site_node, rows, chosen.positions.get("sample")))


@documented
def statistics_overview(source, statistic: str = "entropy", *, site=None, queries=None, sample=None, step=None,
                        time=None, node=None, cmap=None, vmin=None, vmax=None, annotate: bool | None = None,
                        colorbar: bool = True, figsize=None, title: str | None = None, ax=None):
    """Layer x head map of one stored statistic, averaged over query rows (or over chosen rows).

    Each cell is the mean of the statistic over the rows the site captured for that layer and
    head; the colorbar (and the cell texts, when they fit) give the values in the statistic's
    units (nats for entropy). A layer and head with no captured row is drawn in the missing colour.

    Parameters
    ----------
    $source
    $statistic
    $site
    $statistics_rows
    $statistics_selectors
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
    >>> from attnformat.viewer import statistics_overview
    >>> ax = statistics_overview(attnformat.example_path("statistics"), "entropy")
    >>> ax.figure.axes[1].get_ylabel()
    'entropy [nats]\\nmean over rows'
    """
    table = statistics_table(source, statistic, site=site, queries=queries, sample=sample, step=step, time=time,
                             node=node)
    text = title if title is not None else table.title()
    if ax is None:
        if figsize is None:
            figsize = layer_head_figsize(table.layers, table.heads, text, (table.label, table.over))
        ax = axes_or_new(None, figsize=figsize)
    cmap, norm = color_scale(table.values, variable=table.statistic, cmap=cmap, vmin=vmin, vmax=vmax, diverging=False)
    draw_layer_head_map(ax, table.values, table.layers, table.heads, cmap=cmap, norm=norm, annotate=annotate,
                        cell_text=lambda value: f"{value:.2f}", colorbar=colorbar,
                        colorbar_label=f"{table.label}\n{table.over}", title=text)
    return ax


@documented
def statistics_profile(source, statistic: str = "sink_weight", *, site=None, layer=None, head=None, sample=None,
                       step=None, time=None, node=None, ax=None, figsize=None, title: str | None = None):
    """One stored statistic along the query rows, one line per chosen layer (and head).

    Parameters
    ----------
    $source
    $statistic
    $site
    layer : int, str or list of them, optional
        Layers to draw (labels or positions); every layer by default.
    head : int, str, list of them, or {"mean", "max"}, optional
        Heads to draw, one line each; by default the mean over heads (rows not captured by a head
        are left out of its mean). ``top_key_offset`` takes heads, not a reduction.
    $statistics_selectors
    $ax
    $figsize
    $title

    Returns
    -------
    matplotlib.axes.Axes
        One line per (layer, head), labelled ``layer L`` or ``layer L head H``; its y data are the
        stored values (NaN, a gap, where a row was not captured).

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import statistics_profile
    >>> ax = statistics_profile(attnformat.example_path("statistics"), "sink_weight")
    >>> [line.get_label() for line in ax.get_lines()]
    ['layer 0, mean of 4 heads', 'layer 1, mean of 4 heads', 'layer 2, mean of 4 heads']
    """
    if statistic == "top_key":
        raise SelectionError("key indices are not drawn as a profile: draw top_key_offset, or top_key_plot")
    site_node = site_of_layout(source, site, "statistics")
    chosen = _read(site_node, statistic, keep=("layer", "head"),
                   selectors=dict(sample=sample, step=step, time=time, node=node))
    values, dims = chosen.values, list(chosen.dims)
    for dim, value in (("layer", layer), ("head", head)):
        if value is not None and dim not in dims and not (dim == "head" and value == "mean"):
            raise SelectionError(f"{dim} {value!r} not in file {_view(site_node).source}, site {site_name(site_node)}: "
                                 f"{statistic} has no {dim} dimension")
    if "layer" not in dims:
        values, dims = values[None], ["layer", *dims]
    if "head" not in dims:
        values, dims = values[:, None], [dims[0], "head", *dims[1:]]
    values = np.moveaxis(values, [dims.index("layer"), dims.index("head")], [0, 1])
    layer_labels = labels_of(site_node, "layer") if "layer" in chosen.dims else ["all"]
    head_labels = labels_of(site_node, "head") if "head" in chosen.dims else ["mean"]
    layer_rows = ([position(site_node, "layer", v) for v in selector_list(layer)] if "layer" in chosen.dims and layer is not None
                  else list(range(values.shape[0])))
    reduce = head is None or (isinstance(head, str) and head in REDUCTIONS)
    if reduce and "head" in chosen.dims:
        how = head or "mean"
        if statistic == "top_key_offset":
            raise SelectionError("top_key_offset is drawn per head: choose heads (head=0 or head=[0, 1])")
        with warnings.catch_warnings():  # rows no head captured stay NaN (a gap)
            warnings.simplefilter("ignore", RuntimeWarning)
            reduced = np.nanmean(values, axis=1) if how == "mean" else np.nanmax(values, axis=1)
        lines = [(f"layer {layer_labels[l]}, {how} of {len(head_labels)} heads", reduced[l]) for l in layer_rows]
    else:
        heads = [position(site_node, "head", v) for v in selector_list(head)] if "head" in chosen.dims else [0]
        lines = [(f"layer {layer_labels[l]}" + (f" head {head_labels[h]}" if "head" in chosen.dims else ""), values[l, h])
                 for l in layer_rows for h in heads]
    queries = values.shape[-1]
    labels = list(chosen.query_labels)
    if figsize is None and ax is None:
        legend_width = max(text_width(name, LEGEND_FONTSIZE) for name, _ in lines) + 0.6
        figsize = (min(20.0, max(6.4, queries * label_pitch() + longest_label(["0.000"]) + 1.6 + legend_width)),
                   max(3.6, longest_label(labels) + 3.0))
    ax = axes_or_new(ax, figsize=figsize)
    x = np.arange(queries)
    for index, (name, row) in enumerate(lines):
        ax.plot(x, row, marker="o" if queries <= 64 else None, markersize=3, linewidth=1.2, label=name,
                color=f"C{index % 10}")
    missing = sum(int(np.isnan(row).sum()) for _, row in lines)
    _mark_generation(ax, site_node, chosen)
    box = ax.get_position()
    step_ = tick_step(queries, box.width * ax.figure.get_size_inches()[0] * 0.8)
    ax.set_xticks(range(0, queries, step_), labels[::step_], rotation=90, fontsize=TICK_FONTSIZE)
    ax.set_xlim(-0.5, queries - 0.5)
    xlabel = thinned_label("query", step_)
    if missing:
        xlabel += "; gaps: rows not captured"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(statistic_label(statistic, site_node.attrs))
    ax.yaxis.get_major_formatter().set_useOffset(False)
    if statistic == "entropy" and "key_count" in site_node.attrs:
        bound = math.log(key_count(site_node))
        ax.axhline(bound, color="0.5", linestyle=":", linewidth=0.8, label=f"ln {key_count(site_node)} (uniform over every key)")
    chosen_text = " | ".join(f"{d} {t}" for d, t in chosen.described.items() if d not in ("layer", "head"))
    ax.set_title(title if title is not None else " | ".join(
        p for p in (site_name(site_node), chosen_text, f"{STATISTIC_LABELS[statistic][0]} per query row") if p),
        fontsize=TITLE_FONTSIZE)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=LEGEND_FONTSIZE, frameon=False)
    return ax


def _mark_generation(ax, site_node, chosen) -> None:
    """A dashed line before the first generated query row (``query_generation_step`` >= 0), in the legend."""
    start = first_generated(site_node, "query", chosen.positions.get("sample"), chosen.query_index)
    if start is not None:
        ax.axvline(start - 0.5, color="black", linestyle="--", linewidth=0.8, label="generated rows from here")


@documented
def top_key_plot(source, *, site=None, layer=None, head=None, sample=None, step=None, time=None, node=None,
                 offset: bool = False, ax=None, figsize=None, title: str | None = None):
    """Each query row's top key (argmax), one marker colour per head.

    With ``offset=False`` the y axis is the top key (labelled with the key tokens) against the query
    row: a dashed diagonal marks the query itself, markers on the first key are an attention sink.
    With ``offset=True`` it is query position minus top-key position (1: the previous token).
    Rows not captured (``top_key`` -1) are left out and counted in the legend title.

    Parameters
    ----------
    $source
    $site
    layer : int or str, optional
        The layer (label or position); the first by default.
    head : int, str or list of them, optional
        Heads to draw; every head by default.
    $statistics_selectors
    offset : bool, default False
        Draw query position minus top-key position instead of the key.
    $ax
    $figsize
    $title

    Returns
    -------
    matplotlib.axes.Axes
        One scatter per head (label ``head H``) whose offsets are (query row, top key or offset).

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import top_key_plot
    >>> ax = top_key_plot(attnformat.example_path("statistics"), layer=1)
    >>> len(ax.collections), ax.get_ylabel()
    (4, 'top key')
    """
    site_node = site_of_layout(source, site, "statistics")
    statistic = "top_key_offset" if offset else "top_key"
    chosen = _read(site_node, statistic, keep=("head",),
                   selectors=dict(layer=layer, sample=sample, step=step, time=time, node=node))
    values, dims = chosen.values, list(chosen.dims)
    if "head" not in dims:
        values = values[None]
    head_labels = labels_of(site_node, "head") if "head" in chosen.dims else ["mean"]
    heads = ([position(site_node, "head", v) for v in selector_list(head)] if head is not None and "head" in chosen.dims
             else list(range(values.shape[0])))
    sample_ = chosen.positions.get("sample")
    query_labels = list(chosen.query_labels)
    key_labels = labels_of(site_node, "key", sample_)
    real_keys = real_tokens(site_node, "key", sample_) if "key" in site_node.sizes else None
    if real_keys is not None:  # padded keys are no key of this sample: the y axis has the real ones
        key_labels = [label for label, real in zip(key_labels, real_keys) if real]
        if not offset:  # key index along the file's key axis -> position among the real keys drawn
            present = np.isfinite(values)
            values = np.where(present, np.searchsorted(np.flatnonzero(real_keys), np.where(present, values, 0)), np.nan)
    queries = values.shape[-1]
    keys = len(key_labels)
    if ax is None:
        if figsize is None:
            height_labels = 0 if offset else keys
            figsize = (min(20.0, max(6.4, queries * label_pitch() + longest_label(key_labels) + 3.0)),
                       min(16.0, max(4.0, height_labels * label_pitch() + longest_label(query_labels) + 1.6)))
        ax = axes_or_new(None, figsize=figsize)
    x = np.arange(queries)
    missing = 0
    jitter = 0.25 if len(heads) > 1 else 0.0
    for index, h in enumerate(heads):
        row = values[h]
        present = np.isfinite(row)
        missing += int((~present).sum())
        shift = (index / max(len(heads) - 1, 1) - 0.5) * jitter if jitter else 0.0
        ax.scatter(x[present] + shift, row[present], s=14, color=f"C{index % 10}",
                   label=f"head {head_labels[h]}" if "head" in chosen.dims else "mean of heads", zorder=3)
    _mark_generation(ax, site_node, chosen)
    box = ax.get_position()
    width_in, height_in = box.width * ax.figure.get_size_inches()[0], box.height * ax.figure.get_size_inches()[1]
    query_step = tick_step(queries, width_in * 0.8)
    ax.set_xticks(range(0, queries, query_step), query_labels[::query_step], rotation=90, fontsize=TICK_FONTSIZE)
    ax.set_xlim(-0.7, queries - 0.3)
    ax.set_xlabel(thinned_label("query", query_step))
    query_positions = positions_along(site_node, "query", sample_)[chosen.query_index]
    if offset:
        first_key = positions_along(site_node, "key", sample_)[np.flatnonzero(real_keys)[0] if real_keys is not None else 0]
        ax.axhline(0, color="0.5", linestyle="--", linewidth=0.8, label="the query itself")
        ax.plot(x, query_positions - first_key, color="0.5", linestyle=":", linewidth=0.8, label="the first key (sink)")
        ax.set_ylabel("query position - top key position")
    else:
        key_step = tick_step(keys, height_in * 0.85)
        ax.set_yticks(range(0, keys, key_step), key_labels[::key_step], fontsize=TICK_FONTSIZE)
        ax.set_ylim(keys - 0.5, -0.5)  # first key at the top, like a map
        if site_node.attrs.get("attention_type", "self") == "self" and keys == queries:
            ax.plot(x, x, color="0.5", linestyle="--", linewidth=0.8, label="the query itself")
        ax.set_ylabel(thinned_label("top key", key_step))
    chosen_text = chosen.describe(skip=("head",))
    ax.set_title(title if title is not None else " | ".join(
        p for p in (site_name(site_node), chosen_text, "top key per query row" + (" (offset)" if offset else "")) if p),
        fontsize=TITLE_FONTSIZE)
    ax.grid(True, alpha=0.25)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=LEGEND_FONTSIZE, frameon=False,
              title=f"{missing} row(s) not captured" if missing else None, title_fontsize=LEGEND_FONTSIZE)
    return ax


__all__ = ["DRAWABLE", "STORED_STATISTICS", "StatisticsTable", "statistic_label", "statistics_overview",
           "statistics_profile", "statistics_table", "top_key_plot"]
