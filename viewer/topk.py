"""Top-k sites drawn as what they are: a sparse map whose missing pairs are unknown, not zero.

A top-k site (``layout="topk"``) keeps, for each query row, the k largest weights, their key
positions and the mass left out. Drawing rules here:

* the map is densified for drawing only: kept pairs are coloured by their weight; pairs that were
  not kept are drawn in :data:`NOT_KEPT_COLOR` (see :func:`not_kept_color`), never as 0, and the legend names k, the number of
  keys per row and the omitted mass; rows never captured are drawn in the missing colour;
* reductions (the head mean, the max over samples) are exact only for pairs every reduced map
  kept. Pairs kept by some of the maps only are drawn in :data:`PARTIAL_COLOR` on the heatmap
  (their mean is unknown); :func:`row_profile` shows them as hollow markers at their lower bound
  (the maps that did not keep them counted as 0), so that the kept parts plus the omitted mass of
  a row still add up to the row's total;
* a row profile always shows the omitted mass next to the kept weights, so a reader sees what is
  missing.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from attnformat.errors import SelectionError
from attnformat.viewer.colors import MISSING_COLOR, color_scale, labelled_colorbar, masked
from attnformat.viewer.docs import documented, register
from attnformat.viewer.heatmaps import fit_title, legend_below  # also registers the heatmap parameter docs used below
from attnformat.viewer.output import (
    LEGEND_FONTSIZE,
    TICK_FONTSIZE,
    TITLE_FONTSIZE,
    MapPanel,
    axes_or_new,
    label_pitch,
    layout_maps,
    new_figure,
    text_width,
    thinned_label,
    tick_step,
)
from attnformat.viewer.selection import (
    DISPLAY_SIZE,
    REDUCTIONS,
    Selection,
    _view,
    first_generated,
    position,
    resolve_site,
    select,
    selector_list,
    site_of_layout,
)

#: Colour of pairs a top-k site did not keep (unknown weight, at most the row's smallest kept one).
NOT_KEPT_COLOR = "#ffffff"
#: Their colour instead when the colormap reaches white at an end (see :func:`not_kept_color`).
NOT_KEPT_ALTERNATIVE = "#eadfc8"
#: Colour of pairs kept by some of the reduced maps only (e.g. some heads of a head mean).
PARTIAL_COLOR = "#f4a582"
#: Colour of the omitted-mass bars of a row profile (hatched).
OMITTED_COLOR = "#bdbdbd"
#: Colours of the query rows of a row profile, in order.
ROW_COLORS = ("#0173B2", "#DE8F05", "#029E73", "#D55E00", "#CC78BC", "#CA9161", "#FBAFE4", "#949494", "#ECE133",
              "#56B4E9")

register(
    topk_selectors="""
        layer, head, sample, step, time, node : int, str or {"mean", "max"}, optional
            Which map: a label or a position along each dimension the site has; ``"mean"`` or
            ``"max"`` reduce over it (one way at a time). ``head`` defaults to the mean over heads;
            a reduced pair is exact only where every reduced map kept it (see
            :mod:`attnformat.viewer.topk`).
    """,
    topk_pooling="""
        max_size : int, default 1024
            Maps with more rows or columns than this are shown in blocks; the title says so.
        pool : {"max", "mean"}, default "max"
            How a block's kept weights are combined: the largest (default: a sparse map's
            structure survives) or the mean of the kept ones. Pairs not kept never enter a block's
            value; a block with no kept pair is drawn as not kept.
    """,
)


@documented
def topk_map(source, *, site=None, layer=None, head=None, sample=None, step=None, time=None, node=None,
             drop_padding: bool = True) -> Selection:
    """The densified map of a top-k site, ready to draw (the preparer of :func:`topk_heatmap`).

    ``values`` is ``(query, key)``: the kept weight where the pair was kept (by every reduced map),
    NaN elsewhere; ``topk`` (:class:`attnformat.viewer.selection.TopkDetail`) holds ``top_k``,
    ``key_count``, the per-row ``omitted`` mass, which rows were ``captured``, and for reductions
    the ``partial`` pairs with their ``lower`` bound.

    Parameters
    ----------
    $source
    $site
    $topk_selectors
    drop_padding : bool, default True
        Leave out padded tokens (``query_mask``/``key_mask`` False) of the chosen sample.

    Returns
    -------
    attnformat.viewer.Selection

    Raises
    ------
    attnformat.SelectionError
        When the site is not a top-k site, or a selector names nothing.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer.topk import topk_map
    >>> chosen = topk_map(attnformat.example_path("topk"), site="decoder/self_topk", layer=0, head=1)
    >>> chosen.values.shape, chosen.topk.top_k
    ((8, 8), 3)
    """
    node_ = site_of_layout(source, site, "topk")
    return select(node_, "weights", layer=layer, head=head, sample=sample, step=step, time=time, node=node,
                  drop_padding=drop_padding)


def _reduced_phrase(chosen: Selection) -> str:
    detail = chosen.topk
    reduced = [dim for dim, text in chosen.described.items() if str(text).split(" ")[0] in REDUCTIONS]
    return f"{' and '.join(f'{d}s' for d in reduced) or 'maps'}" if detail.maps > 1 else ""


def _omitted_text(detail) -> str:
    omitted = None if detail.omitted is None else np.asarray(detail.omitted, dtype=np.float64)
    if omitted is None or not np.isfinite(omitted).any():
        return ""
    finite = omitted[np.isfinite(omitted)]
    return f"omitted mass per row: mean {finite.mean():.3g}, max {finite.max():.3g}"


def _blocks(values: np.ndarray, factor: int, fill) -> np.ndarray:
    """``(rows/f, f, cols/f, f)`` blocks of a map padded with ``fill`` to whole blocks."""
    rows, cols = values.shape[-2:]
    padded = (math.ceil(rows / factor) * factor, math.ceil(cols / factor) * factor)
    if padded != (rows, cols):
        values = np.pad(values, [(0, padded[0] - rows), (0, padded[1] - cols)], constant_values=fill)
    return values.reshape(padded[0] // factor, factor, padded[1] // factor, factor)


def _pooled_topk(values, partial, captured, factor: int, how: str):
    """Block-pool a top-k map: blocks combine kept values only; partial where a block has only partial pairs.

    Not NaN-aware reductions over the whole map (they cost seconds at 4096 tokens): the max of
    kept values is a plain max with not-kept cells as -inf, the mean a sum over a count.
    """
    kept = ~np.isnan(values)
    count = _blocks(kept, factor, False).sum(axis=(1, 3))
    if how == "max":
        pooled = _blocks(np.where(kept, values, -np.inf), factor, -np.inf).max(axis=(1, 3))
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            pooled = _blocks(np.where(kept, values, 0.0), factor, 0.0).sum(axis=(1, 3)) / count
    pooled = np.where(count > 0, pooled, np.nan).astype(values.dtype, copy=False)
    if np.any(partial):
        partial = _blocks(partial, factor, False).any(axis=(1, 3)) & (count == 0)
    else:
        partial = np.zeros(pooled.shape, dtype=bool)
    rows = math.ceil(captured.shape[-1] / factor) * factor
    captured = np.pad(captured, (0, rows - captured.shape[-1]), constant_values=False)
    captured = captured.reshape(-1, factor).any(axis=-1)
    return pooled, partial, captured


def _row_blocks(mask):
    """``(start, stop)`` of each run of True in a 1-d mask."""
    padded = np.concatenate([[False], np.asarray(mask, bool), [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return list(zip(edges[::2], edges[1::2]))


def _topk_handles(chosen: Selection, partial, captured, not_kept: str) -> list:
    from matplotlib.patches import Patch

    detail = chosen.topk
    omitted = _omitted_text(detail)
    handles = [Patch(facecolor=not_kept, edgecolor="0.4", linewidth=0.6,
                     label=detail.note() + (f"; {omitted}" if omitted else ""))]
    if np.any(partial):
        handles.append(Patch(facecolor=PARTIAL_COLOR, edgecolor="0.4", linewidth=0.6,
                             label=f"kept by some of the {detail.maps} {_reduced_phrase(chosen)} only ("
                                   f"{detail.reduction} unknown)"))
    if not np.all(captured):
        handles.append(Patch(facecolor=MISSING_COLOR, edgecolor="0.4", linewidth=0.6, label="row not captured"))
    return handles


def _ticks(ax, labels, count: int, step: int, axis: str) -> None:
    if not len(labels) or len(labels) != count:
        return
    positions = range(0, count, step)
    shown = [str(labels[i]) for i in positions]
    if axis == "x":
        ax.set_xticks(list(positions), shown, rotation=90, fontsize=TICK_FONTSIZE)
    else:
        ax.set_yticks(list(positions), shown, fontsize=TICK_FONTSIZE)


def not_kept_color(cmap) -> str:
    """The colour of not-kept pairs on a map drawn with ``cmap``: white, unless the colormap itself
    reaches white at an end (``Greys``, ``Blues``...), where a light tan keeps them apart.

    Examples
    --------
    >>> from matplotlib import colormaps
    >>> not_kept_color(colormaps["viridis"]), not_kept_color(colormaps["Blues"])
    ('#ffffff', '#eadfc8')
    """
    ends = np.array([cmap(0.0)[:3], cmap(1.0)[:3]])
    return NOT_KEPT_ALTERNATIVE if (ends > 0.9).all(axis=1).any() else NOT_KEPT_COLOR


@documented
def topk_heatmap(source, *, site=None, layer=None, head=None, sample=None, step=None, time=None, node=None,
                 cmap=None, vmin=None, vmax=None, log: bool = False, origin: str = "upper",
                 max_size: int = DISPLAY_SIZE, pool: str = "max", colorbar: bool = True, figsize=None,
                 title: str | None = None, ax=None):
    """Heatmap of a top-k site's sparse map: kept weights in colour, pairs not kept in their own colour.

    Pairs that were not kept are drawn in :func:`not_kept_color` (white, or light tan for a
    colormap that reaches white), never as 0: their weight is unknown, at most the row's smallest
    kept one. The legend says ``not kept (top k of n keys per row)`` and the omitted mass per row
    (mean and max). Rows never captured are drawn in the
    missing colour ("row not captured"). For a reduction over maps (the default head mean), pairs
    kept by every map show their exact mean; pairs kept by some maps only are drawn in
    :data:`PARTIAL_COLOR`. The colour scale spans the kept weights drawn (user limits win, see
    :func:`attnformat.viewer.colors.color_scale`) and its colorbar says what they are.

    Parameters
    ----------
    $source
    $site
    $topk_selectors
    $color_limits
    log : bool, default False
        Logarithmic colour scale (``vmin`` must then be > 0).
    $origin
    $topk_pooling
    $colorbar
    $heatmap_figsize
    $heatmap_title
    $ax

    Returns
    -------
    matplotlib.axes.Axes
        ``ax.images[0]`` holds the drawn values (kept weights; NaN where not kept).

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import topk_heatmap
    >>> ax = topk_heatmap(attnformat.example_path("topk"), site="decoder/self_topk", layer=0, head=0)
    >>> ax.get_title()
    'decoder/self_topk | layer 0 | head 0 | weights (softmax) | top 3 of 8 keys per row'
    >>> ax.get_legend().get_texts()[0].get_text().startswith("not kept (top 3 of 8 keys per row)")
    True
    """
    if pool not in REDUCTIONS:
        raise SelectionError(f"pool must be one of {', '.join(REDUCTIONS)}, not {pool!r}")
    site_view = _view(resolve_site(source, site))
    chosen = topk_map(site_view.node, layer=layer, head=head, sample=sample, step=step, time=time, node=node)
    detail = chosen.topk
    values, partial, captured = chosen.values, detail.partial, np.asarray(detail.captured, bool)
    query_labels, key_labels = list(chosen.query_labels), list(chosen.key_labels)
    factor = 1
    longest = max(values.shape[-2:]) if values.size else 0
    if longest > max_size:
        factor = math.ceil(longest / max_size)
        values, partial, captured = _pooled_topk(values, partial, captured, factor, pool)
        query_labels, key_labels = query_labels[::factor], key_labels[::factor]
        chosen = dataclasses.replace(chosen, pooled=factor, pool=pool)
    cmap, norm = color_scale(values, variable="weights", cmap=cmap, vmin=vmin, vmax=vmax, log=log)
    not_kept = not_kept_color(cmap)
    cmap = cmap.with_extremes(bad=not_kept)
    if title is None:
        parts = [chosen.site, chosen.describe(), chosen.normalization,
                 f"top {detail.top_k} of {detail.key_count} keys per row"]
        if factor > 1:
            parts.append(f"shown as {factor}x{factor} block {pool} of kept weights")
        title = " | ".join(p for p in parts if p)
    handles = _topk_handles(chosen, partial, captured, not_kept)
    legend_text = max((h.get_label() for h in handles), key=len)
    rows, cols = values.shape[-2:]
    colorbar_axes = None
    if ax is None:
        layout = layout_maps([MapPanel(rows, cols, tuple(query_labels), tuple(key_labels), title=title)], ncols=1,
                             figsize=figsize, colorbar=colorbar, legend=legend_text)
        extra = (len(handles) - 1) * LEGEND_FONTSIZE * 1.5 / 72
        if figsize is None and extra > 0:  # one more legend line per extra entry, below the map
            left, bottom, top = layout.margins
            layout = dataclasses.replace(layout, figsize=(layout.figsize[0], layout.figsize[1] + extra),
                                         margins=(left, bottom + extra, top))
        figure = new_figure(layout.figsize, layout=None)
        rect = layout.panel_rect()
        ax = figure.add_axes(rect)
        if colorbar:
            bar = min(max(layout.panel[1] / 20, 0.12), 0.25)
            colorbar_axes = figure.add_axes((rect[0] + (layout.panel[0] + 0.2) / layout.figsize[0], rect[1],
                                             bar / layout.figsize[0], rect[3]))
        query_step, key_step = layout.steps(rows, cols)
        width = layout.panel[0]
    else:
        figure_width, figure_height = ax.figure.get_size_inches()
        box = ax.get_position()
        width = box.width * figure_width
        query_step = tick_step(rows, box.height * figure_height * 0.9)
        key_step = tick_step(cols, width * 0.85)
    image = ax.imshow(masked(values), cmap=cmap, norm=norm, aspect="auto", origin=origin, interpolation="nearest")
    if np.any(partial):
        overlay = np.zeros(partial.shape + (4,))
        overlay[partial] = _rgba(PARTIAL_COLOR)
        ax.imshow(overlay, aspect="auto", origin=origin, interpolation="nearest")
    for start, stop in _row_blocks(~captured):
        ax.axhspan(start - 0.5, stop - 0.5, color=MISSING_COLOR, linewidth=0, zorder=2)
    _ticks(ax, key_labels, cols, key_step, "x")
    _ticks(ax, query_labels, rows, query_step, "y")
    xlabel = thinned_label("key", key_step if key_labels else 1)
    ylabel = thinned_label("query", query_step if query_labels else 1)
    # Generated maps: a dashed line between the prompt and the generated tokens.
    sample_position = chosen.positions.get("sample")
    for dim, draw in (("query", ax.axhline), ("key", ax.axvline)):
        index = chosen.query_index if dim == "query" else chosen.key_index
        start = first_generated(site_view, dim, sample_position, index)
        if start is not None:
            draw(start / factor - 0.5, color="black", linestyle="--", linewidth=0.8, zorder=3)
            if dim == "query":
                ylabel += "; generated below the dashed line"
            else:
                xlabel += "; generated right of the dashed line"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=TITLE_FONTSIZE)
    if colorbar:
        label = f"kept {chosen.normalization}"
        if detail.maps > 1:
            label += f", {detail.reduction} of {detail.maps}"
        labelled_colorbar(image, ax=ax, label=label, values=values,
                          **({"cax": colorbar_axes} if colorbar_axes is not None else {}))
    legend_below(ax, handles)
    fit_title(ax, width)
    return ax


def _rgba(color) -> tuple:
    from matplotlib.colors import to_rgba

    return to_rgba(color)


# -- row profiles ---------------------------------------------------------------------------------------


@dataclass
class RowProfile:
    """One query row of a top-k site: its kept weights by key, and the mass left out.

    ``keys`` are positions along the site's ``key`` axis (as drawn), ``weights`` their exact
    (reduced) weights; ``partial_keys``/``partial_lower`` the pairs kept by some reduced maps only,
    with their lower bound; ``omitted`` the row's omitted mass (NaN when the file has none).
    """

    query: int
    label: str
    keys: np.ndarray
    key_labels: list
    weights: np.ndarray
    partial_keys: np.ndarray
    partial_lower: np.ndarray
    omitted: float
    captured: bool


@documented
def row_profiles(source, queries=None, *, site=None, layer=None, head=None, sample=None, step=None, time=None,
                 node=None) -> tuple[Selection, list[RowProfile]]:
    """The kept weights and omitted mass of chosen query rows of a top-k site (the preparer of :func:`row_profile`).

    Parameters
    ----------
    $source
    queries : int, str or list of them, optional
        Query rows (labels or positions). By default the last captured row (in a causal model, the
        one that ranges over the most keys).
    $site
    $topk_selectors

    Returns
    -------
    (attnformat.viewer.Selection, list of RowProfile)

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer.topk import row_profiles
    >>> chosen, rows = row_profiles(attnformat.example_path("topk"), [2], site="decoder/self_topk", layer=0, head=0)
    >>> sorted(rows[0].keys.tolist()), round(float(rows[0].weights.sum() + rows[0].omitted), 5)
    ([0, 1, 2], 1.0)
    """
    site_node = site_of_layout(source, site, "topk")
    view = _view(site_node)
    selectors = dict(layer=layer, head=head, sample=sample, step=step, time=time, node=node)
    wanted = selector_list(queries)
    if wanted:
        sample_position = None
        if sample is not None and "sample" in view.sizes and not (isinstance(sample, str) and sample in REDUCTIONS):
            sample_position = position(view, "sample", sample)
        rows = [position(view, "query", value, sample=sample_position) for value in wanted]
    else:  # the last captured row: weights of every row are read (k values each) to find it
        weights = site_node["weights"]
        captured = ~np.isnan(np.asarray(weights.isel({d: 0 for d in weights.dims if d not in ("query", "rank")}).values,
                                        dtype=np.float64)).all(axis=-1)
        found = np.flatnonzero(captured)
        rows = [int(found[-1]) if found.size else site_node.sizes["query"] - 1]
    chosen = select(site_node, "weights", rows=rows, drop_padding=False, **selectors)
    detail = chosen.topk
    profiles = []
    for slot, row in enumerate(rows):
        values = chosen.values[slot]
        keys = np.flatnonzero(~np.isnan(values))
        order = np.argsort(-values[keys], kind="stable")
        keys = keys[order]
        partial_keys = np.flatnonzero(detail.partial[slot])
        omitted = float(detail.omitted[slot]) if detail.omitted is not None else math.nan
        profiles.append(RowProfile(query=int(row), label=chosen.query_labels[slot], keys=keys,
                                   key_labels=[chosen.key_labels[k] for k in keys], weights=values[keys].astype(np.float64),
                                   partial_keys=partial_keys,
                                   partial_lower=np.asarray(detail.lower[slot][partial_keys], dtype=np.float64),
                                   omitted=omitted, captured=bool(detail.captured[slot])))
    return chosen, profiles


def _thinned(positions, labels, inches_per_unit: float):
    """Labels at increasing positions, leaving out each one closer than a label pitch to the last kept."""
    kept_positions, kept_labels, last = [], [], -math.inf
    pitch = label_pitch()
    for where, label in sorted(zip(positions, labels)):
        if (where - last) * inches_per_unit >= pitch:
            kept_positions.append(where)
            kept_labels.append(label)
            last = where
    return kept_positions, kept_labels


@documented
def row_profile(source, queries=None, *, site=None, layer=None, head=None, sample=None, step=None, time=None,
                node=None, ax=None, figsize=None, title: str | None = None):
    """Kept weights of chosen query rows by key, with the mass each row left out.

    Each row's kept weights are stems at their key positions (x: the site's keys, labelled at the
    kept ones), largest first in the legend's count; a hatched bar right of the keys, past a dashed
    line, is the row's omitted mass (``omitted_weight``), so that the drawn kept weights plus that
    bar are the row's whole attention. For a reduction over maps (the head mean by default), pairs
    kept by some maps only are hollow markers at their lower bound (maps that did not keep them
    counted as 0).

    Parameters
    ----------
    $source
    queries : int, str or list of them, optional
        Query rows (labels or positions); by default the last captured row.
    $site
    $topk_selectors
    $ax
    $figsize
    $title

    Returns
    -------
    matplotlib.axes.Axes
        Per row ``q``: a line with gid ``kept:q`` (markers at the kept weights), one with gid
        ``partial:q`` when some pairs are partial, and a bar with gid ``omitted:q``.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import row_profile
    >>> ax = row_profile(attnformat.example_path("topk"), [5, 7], site="decoder/self_topk", layer=1, head=1)
    >>> sorted(a.get_gid() for a in ax.patches if a.get_gid())
    ['omitted:5', 'omitted:7']
    """
    site_node = resolve_site(source, site)
    chosen, profiles = row_profiles(site_node, queries, layer=layer, head=head, sample=sample, step=step, time=time,
                                    node=node)
    view = _view(site_node)
    detail = chosen.topk
    keys = detail.key_count
    count = len(profiles)
    labelled = sorted({int(k) for p in profiles for k in p.keys} | {int(k) for p in profiles for k in p.partial_keys})
    if title is None:
        title = (" | ".join(p for p in (chosen.site, chosen.describe()) if p)
                 + f"\ntop {detail.top_k} of {keys} keys kept per row, and the mass left out")
    legend_labels = [_profile_label(p) for p in profiles]
    if figsize is None:
        # Room for one label pitch per labelled key, the legend right of the plot and the title.
        plot_width = max(3.5, 0.16 * len(labelled) + 0.4 * count + 1.5)
        legend_width = max(text_width(label, LEGEND_FONTSIZE) for label in legend_labels) + 0.6
        title_width = max(text_width(line, TITLE_FONTSIZE) for line in title.split("\n"))
        width = max(plot_width + legend_width + 0.9, title_width + 0.4)
        figsize = (min(20.0, max(6.4, width)), 4.4)
    ax = axes_or_new(ax, figsize=figsize)
    slot = keys + max(1.0, 0.06 * keys)  # the omitted-mass slot, right of the last key
    spread = 0.6 if keys < 60 else 0.6 * keys / 60
    offsets = (np.arange(count) - (count - 1) / 2) * (spread / max(count, 1)) if count > 1 else np.zeros(1)
    top = 0.0
    for index, profile in enumerate(profiles):
        color = ROW_COLORS[index % len(ROW_COLORS)]
        x = profile.keys + offsets[index]
        ax.vlines(x, 0, profile.weights, color=color, linewidth=1.4)
        omitted = profile.omitted
        ax.plot(x, profile.weights, linestyle="none", marker="o", markersize=4, color=color, label=legend_labels[index],
                gid=f"kept:{profile.query}")
        if profile.partial_keys.size:
            partial_x = profile.partial_keys + offsets[index]
            ax.vlines(partial_x, 0, profile.partial_lower, color=color, linewidth=0.8, linestyles="dashed")
            ax.plot(partial_x, profile.partial_lower, linestyle="none", marker="o", markersize=4, markerfacecolor="none",
                    color=color, gid=f"partial:{profile.query}",
                    label=f"row {profile.query}: kept by some of the {detail.maps} {_reduced_phrase(chosen)} only "
                          f"(lower bound)")
        bar_width = spread / max(count, 1) * 0.9 if count > 1 else max(0.8, 0.02 * keys)
        height = omitted if math.isfinite(omitted) else 0.0
        ax.bar([slot + offsets[index]], [height], width=bar_width, color=OMITTED_COLOR, edgecolor=color, hatch="//",
               linewidth=1.0, gid=f"omitted:{profile.query}")
        if count == 1 and math.isfinite(omitted):
            ax.annotate(f"{omitted:.3g}", (slot, height), xytext=(0, 2), textcoords="offset points", ha="center",
                        va="bottom", fontsize=LEGEND_FONTSIZE)
        top = max(top, float(np.nanmax(profile.weights, initial=0.0)), float(np.nanmax(profile.partial_lower, initial=0.0)),
                  height)
    ax.axvline(keys - 0.5 + (slot - keys + 0.5) / 2, color="0.5", linestyle=":", linewidth=0.8)
    start = first_generated(view, "key", chosen.positions.get("sample"))
    if start is not None:
        ax.axvline(start - 0.5, color="black", linestyle="--", linewidth=0.8, label="generated keys from here")
    ax.set_xlim(-1.0, slot + max(1.0, spread))
    ax.set_ylim(0.0, max(top * 1.15, 1e-3))
    # Key labels only at kept keys, thinned so that none overlap; the omitted slot always labelled.
    width_inches = ax.get_position().width * ax.figure.get_size_inches()[0] * 0.8
    inches_per_unit = width_inches / (ax.get_xlim()[1] - ax.get_xlim()[0])
    label_of = {int(k): chosen.key_labels[int(k)] for k in labelled}
    positions, labels = _thinned(labelled, [label_of[k] for k in labelled], inches_per_unit)
    while positions and (slot - positions[-1]) * inches_per_unit < label_pitch():
        positions, labels = positions[:-1], labels[:-1]
    thinned = len(positions) < len(labelled)
    omitted_label = "omitted mass"
    ax.set_xticks(list(positions) + [slot], list(labels) + [omitted_label], rotation=90, fontsize=TICK_FONTSIZE)
    ax.set_xlabel(f"key (labelled where kept{', some labels left out' if thinned else ''})")
    ax.set_ylabel(chosen.normalization)
    ax.yaxis.get_major_formatter().set_useOffset(False)
    ax.set_title(title, fontsize=TITLE_FONTSIZE)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=LEGEND_FONTSIZE, frameon=False)
    # Centred over the plot, the title may reach as far left and right as the nearer figure edge.
    ax.figure.canvas.draw()  # constrained layout places the Axes (and the legend beside it) first
    box, width = ax.get_position(), ax.figure.get_size_inches()[0]
    _fit_lines(ax, (box.width + 2 * min(box.x0, 1.0 - box.x1)) * width - 0.1)
    return ax


def _fit_lines(ax, width: float, smallest: float = 6.0) -> None:
    """:func:`attnformat.viewer.heatmaps.fit_title` for a title of several lines (its longest line counts)."""
    size = ax.title.get_fontsize()
    needed = max((text_width(line, size) for line in ax.get_title().split("\n")), default=0.0)
    if needed > width > 0:
        ax.title.set_fontsize(max(smallest, size * width / needed))


def _profile_label(profile: RowProfile) -> str:
    if not profile.captured:
        return f"query {profile.label!r} (row {profile.query}): not captured"
    omitted = f"{profile.omitted:.3g}" if math.isfinite(profile.omitted) else "unknown"
    return f"query {profile.label!r} (row {profile.query}): {profile.keys.size} kept, omitted {omitted}"


__all__ = ["NOT_KEPT_COLOR", "PARTIAL_COLOR", "RowProfile", "not_kept_color", "row_profile", "row_profiles",
           "topk_heatmap", "topk_map"]
