"""Heatmaps of one map: one head or the mean/max over heads, token labels, any colour scale.

Drawing rules every map here follows (and the grids reuse through :func:`draw_map`):

* tick labels never overlap: a panel shows every label when they fit and every k-th otherwise,
  and then the axis label says so (``key (every 2nd label)``);
* NaN cells are *absent* (not captured, or outside a window the model never computed), drawn in
  :data:`~attnformat.viewer.colors.MISSING_COLOR` and named in a legend patch, so that they are
  never mistaken for zero; a map with no value at all says "not captured" instead of showing a
  plain grey square;
* the colour scale is always visible and labelled with what the values are.
"""

from __future__ import annotations

import matplotlib
import numpy as np

from attnformat.viewer.colors import MISSING_COLOR, color_scale, labelled_colorbar, masked
from attnformat.viewer.docs import documented, register
from attnformat.viewer.output import (
    LEGEND_FONTSIZE,
    TICK_FONTSIZE,
    TITLE_FONTSIZE,
    MapPanel,
    compact_panels,
    layout_maps,
    longest_label,
    new_figure,
    text_width,
    thinned_label,
    tick_step,
)
from attnformat.viewer.selection import DISPLAY_SIZE, pool_for_display, select, sites_of

#: Text drawn on a panel whose map holds no value, and the default legend text for NaN cells.
NOT_CAPTURED = "not captured"


def _step_from_axes(ax, rows: int, cols: int, query_labels, key_labels) -> tuple[int, int]:
    # Someone else's Axes: its size is known only roughly before layout, so estimate from its
    # current box minus the room its labels take, and err towards skipping labels.
    width, height = ax.figure.get_size_inches()
    box = ax.get_position()
    usable_w = box.width * width * 0.85 - (0.25 if len(query_labels) else 0.0)
    usable_h = box.height * height * 0.9 - 0.15 * bool(len(key_labels))
    return tick_step(rows, usable_h), tick_step(cols, usable_w)


def _title_placement(ax, *, fixed_labels: bool) -> dict:
    """``{"y": 1.0}`` when the title's automatic placement cannot move it, else ``{}``.

    Matplotlib moves a title up only past x ticks or an x label on top, or past the y axis' offset
    text ("1e6"); to find that out it measures every y tick label of the Axes again at each draw
    (about 7% of the CPU time of drawing a 12-head grid, measured). A map's ticks and labels are below
    it, and token labels (a fixed formatter) have no offset text: there the title sits at the top
    of the Axes either way, so it is placed there directly. Axes that share an axis with others
    (twins, a user's shared subplots) keep the automatic placement.
    """
    if not fixed_labels or matplotlib.rcParams["axes.titley"] is not None:
        return {}
    alone = all(len(group.get_siblings(ax)) == 1 for group in (ax.get_shared_x_axes(), ax.get_shared_y_axes()))
    below = ax.xaxis.get_ticks_position() == "bottom" and ax.xaxis.get_label_position() == "bottom"
    return {"y": 1.0} if alone and below else {}


def draw_map(ax, values, *, cmap, norm, query_labels=(), key_labels=(), origin: str = "upper",
             xlabel: str = "key", ylabel: str = "query", title: str | None = None, steps=None):
    """Draw one prepared map on ``ax`` with labelled ticks; returns the AxesImage.

    Tick labels are thinned to every k-th so that none overlap: ``steps=(query step, key step)``
    when the caller laid the figure out (:func:`attnformat.viewer.output.layout_maps`), else
    estimated from the Axes' current size. A thinned axis says so in its label. A map without any
    finite value is drawn as an empty panel reading "not captured" (its image is kept, hidden, so
    the drawn values can still be checked).

    Parameters
    ----------
    ax : matplotlib.axes.Axes
        Where to draw.
    values : array_like
        The ``(query, key)`` map, drawn as it is (NaN and +/-inf in the missing colour).
    cmap, norm : matplotlib.colors.Colormap, matplotlib.colors.Normalize
        The colour scale (:func:`attnformat.viewer.colors.color_scale`).
    query_labels, key_labels : sequence of str
        Tick labels of the rows and columns; left out when empty or not one per row/column.
    origin : {"upper", "lower"}
        Where the first query is drawn.
    xlabel, ylabel : str
        Axis labels ("key", "query").
    title : str, optional
        Axes title.
    steps : (int, int), optional
        Show every ``steps[0]``-th query label and every ``steps[1]``-th key label.

    Returns
    -------
    matplotlib.image.AxesImage

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
    values = np.asarray(values)
    rows, cols = values.shape[-2:]
    # Labels that do not match the map (a caller's pooled map) are left out rather than misplaced.
    query_labels = query_labels if len(query_labels) == rows else ()
    key_labels = key_labels if len(key_labels) == cols else ()
    image = ax.imshow(masked(values), cmap=cmap, norm=norm, aspect="auto", origin=origin, interpolation="nearest")
    if steps is None:
        steps = _step_from_axes(ax, rows, cols, query_labels, key_labels)
    query_step, key_step = steps
    if len(key_labels):
        ax.set_xticks(range(0, cols, key_step), [str(label) for label in key_labels[::key_step]], rotation=90,
                      fontsize=TICK_FONTSIZE)
    if len(query_labels):
        ax.set_yticks(range(0, rows, query_step), [str(label) for label in query_labels[::query_step]],
                      fontsize=TICK_FONTSIZE)
    ax.set_xlabel(thinned_label(xlabel, key_step if len(key_labels) else 1))
    ax.set_ylabel(thinned_label(ylabel, query_step if len(query_labels) else 1))
    if title:
        ax.set_title(title, fontsize=TITLE_FONTSIZE, **_title_placement(ax, fixed_labels=bool(len(query_labels))))
    if values.size and not np.isfinite(np.asarray(values, dtype=np.float64)).any():
        mark_not_captured(ax, image)
    return image


def fit_title(ax, width: float, smallest: float = 6.0) -> None:
    """Shrink the Axes title's font (never below ``smallest`` points) so it spans at most ``width`` inches.

    The text stays as it is (tests and users compare titles as strings); a panel that the user made
    narrow gets a smaller title instead of one that runs over its neighbours.

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> ax = plt.figure().add_subplot()
    >>> _ = ax.set_title("a rather long title | layer 0 | head 1", fontsize=TITLE_FONTSIZE)
    >>> fit_title(ax, 2.0); ax.title.get_fontsize() < TITLE_FONTSIZE
    True
    """
    text = ax.get_title()
    if not text:
        return
    size = ax.title.get_fontsize()
    needed = text_width(text, size)
    if needed > width > 0:
        ax.title.set_fontsize(max(smallest, size * width / needed))


def mark_not_captured(ax, image=None) -> None:
    """Turn a panel with no value into an empty panel reading "not captured" (title and ticks kept).

    Examples
    --------
    >>> import matplotlib.pyplot as plt, numpy as np
    >>> ax = plt.figure().add_subplot()
    >>> mark_not_captured(ax, ax.imshow(np.full((2, 2), np.nan)))
    >>> [t.get_text() for t in ax.texts], ax.images[0].get_visible()
    (['not captured'], False)
    """
    if image is not None:
        image.set_visible(False)  # its colour would be MISSING_COLOR: no colour at all is clearer
    ax.set_facecolor("white")
    ax.text(0.5, 0.5, NOT_CAPTURED, transform=ax.transAxes, ha="center", va="center", fontsize=TITLE_FONTSIZE,
            color="0.35", style="italic")


def missing_note(chosen, values=None) -> str:
    """What the cells drawn in the missing colour mean, for the legend.

    The selection's own ``missing_note`` when it has one (pairs outside a temporal window, pairs a
    mask hides); else, from the drawn ``values``: ``-inf`` cells are "masked (-inf)"; NaN cells of
    a causal site that all lie above the diagonal are "not computed (causal)"; any other NaN is
    "not captured" (the spec's meaning of NaN).

    Examples
    --------
    >>> class Chosen: missing_note = "absent: outside the temporal window (max_distance=2)"
    >>> missing_note(Chosen()), missing_note(object())
    ('absent: outside the temporal window (max_distance=2)', 'not captured')
    >>> class Causal: attrs = {"causal": 1}
    >>> missing_note(Causal(), np.array([[1.0, np.nan], [1.0, 1.0]]))
    'not computed (causal)'
    >>> missing_note(object(), np.array([[1.0, -np.inf], [np.nan, 1.0]]))
    'not captured; masked (-inf)'
    """
    note = getattr(chosen, "missing_note", None)
    if note:
        return note
    if values is None:
        return NOT_CAPTURED
    values = np.asarray(values, dtype=np.float64)
    notes = []
    nan = np.isnan(values)
    if nan.any() and values.ndim < 2:
        notes.append(NOT_CAPTURED)
    elif nan.any():
        rows, cols = np.nonzero(nan.reshape((-1,) + values.shape[-2:]).any(axis=0))
        causal = bool(int(getattr(chosen, "attrs", {}).get("causal", 0) or 0))
        notes.append("not computed (causal)" if causal and (cols > rows).all() else NOT_CAPTURED)
    if np.isinf(values).any():
        notes.append("masked (-inf)" if not np.isposinf(values).any() else "masked (+/-inf)")
    return "; ".join(notes) or NOT_CAPTURED


def has_missing_cells(values) -> bool:
    """True when some, but not all, of a map's values are NaN or infinite (drawn in the missing colour).

    Maps with no finite value at all are drawn as "not captured" panels instead, and need no legend.

    Examples
    --------
    >>> has_missing_cells(np.array([[1.0, np.nan]])), has_missing_cells(np.array([np.nan])), has_missing_cells(np.ones(2))
    (True, False, False)
    >>> has_missing_cells(np.array([[[1.0, 2.0]], [[np.nan, np.nan]]]))
    False
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim > 2:
        return any(has_missing_cells(one) for one in values.reshape((-1,) + values.shape[-2:]))
    missing = ~np.isfinite(values)
    return bool(missing.any() and not missing.all())


def missing_handles(chosen, values=None) -> list:
    """Legend handles for missing cells: one patch in the missing colour saying what they mean.

    Examples
    --------
    >>> class Chosen: missing_note = None
    >>> [h.get_label() for h in missing_handles(Chosen())]
    ['not captured']
    """
    from matplotlib.patches import Patch

    return [Patch(facecolor=MISSING_COLOR, edgecolor="0.5", linewidth=0.5, label=missing_note(chosen, values))]


def add_missing_legend(ax, chosen, values=None, *, figure_legend: bool = False):
    """Legend patch for missing cells, below the map(s), clear of every tick label.

    With ``figure_legend`` (grids) it is a figure legend below everything: in the bottom band
    :func:`attnformat.viewer.output.layout_maps` keeps for it when the figure has no layout
    engine, else outside the Axes as constrained layout arranges. Otherwise an Axes legend
    (``ax.get_legend()``) hanging below the Axes' key labels and axis label.

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> ax = plt.figure(layout="constrained").add_subplot()
    >>> class Chosen: missing_note = "absent: not an edge"
    >>> [t.get_text() for t in add_missing_legend(ax, Chosen(), figure_legend=True).get_texts()]
    ['absent: not an edge']
    """
    handles = missing_handles(chosen, values)
    if figure_legend:
        options = dict(handles=handles, fontsize=LEGEND_FONTSIZE, frameon=False, handlelength=1.2)
        if ax.figure.get_layout_engine() is None:
            # A figure placed by arithmetic (the grids) keeps a band at its bottom for this legend.
            return ax.figure.legend(loc="lower left", bbox_to_anchor=(0, 0), borderaxespad=0.4, **options)
        return ax.figure.legend(loc="outside lower left", **options)
    return legend_below(ax, handles)


def legend_below(ax, handles):
    """A legend under ``ax``, clear of its (vertical) x tick labels and its x label.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
        The Axes, with its ticks and labels set.
    handles : list of matplotlib.artist.Artist
        The legend's entries.

    Returns
    -------
    matplotlib.legend.Legend

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> from matplotlib.patches import Patch
    >>> ax = plt.figure().add_subplot()
    >>> [t.get_text() for t in legend_below(ax, [Patch(label="not kept")]).get_texts()]
    ['not kept']
    """
    width, height = ax.figure.get_size_inches()
    axes_height = max(ax.get_position().height * height, 0.5)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    below = longest_label(labels) + 0.1 + (0.3 if ax.get_xlabel() else 0.0)
    return ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, -below / axes_height), borderaxespad=0.0,
                     fontsize=LEGEND_FONTSIZE, frameon=False, handlelength=1.2)


def colorbar_label(chosen) -> str:
    """What the colours of a selection mean: ``weights (softmax)``, ``logits (pre-softmax)`` and units.

    Examples
    --------
    >>> import attnformat
    >>> colorbar_label(select(attnformat.example_path("steps"), "bias", layer=0))
    'bias (additive)'
    """
    units = getattr(chosen, "units", None)
    return chosen.normalization + (f" [{units}]" if units else "")


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


def map_panel(chosen, *, title: str = "") -> MapPanel:
    """How a selection's map is labelled, for :func:`attnformat.viewer.output.layout_maps`.

    Examples
    --------
    >>> import attnformat
    >>> panel = map_panel(select(attnformat.example_path("dense"), layer=0))
    >>> panel.rows, panel.cols, panel.query_labels[:2]
    (6, 6, ('[CLS]', 'the'))
    """
    rows, cols = np.shape(chosen.values)[-2:]
    return MapPanel(rows, cols, tuple(chosen.query_labels), tuple(chosen.key_labels), title=title)


def _placed_axes(layout, colorbar: bool):
    """The map's Axes (and the colorbar's) of a new figure, placed where :func:`layout_maps` said.

    One map needs no layout engine: the margins are known from the labels, and placing the Axes
    directly costs nothing at draw time (constrained layout would add about half again to the CPU
    time of drawing one small map, which is what ``attnformat plot FILE heatmap`` does).
    """
    figure = new_figure(layout.figsize, layout=None)
    left, bottom, width, height = layout.panel_rect()
    ax = figure.add_axes((left, bottom, width, height))
    if not colorbar:
        return ax, None
    figure_width, figure_height = layout.figsize
    bar = min(max(layout.panel[1] / 20, 0.12), 0.25)
    colorbar_axes = figure.add_axes((left + (layout.panel[0] + 0.2) / figure_width, bottom, bar / figure_width, height))
    return ax, colorbar_axes


def _compact_heatmap(chosen, layout, *, title, cmap, norm, origin, colorbar: bool, axis_labels=None, label=None,
                     mark_limits: bool = True, steps=None):
    """The map drawn by :func:`attnformat.viewer.output.compact_panels` where :func:`_placed_axes`
    would put its Axes, with the same colorbar beside it; returns the canvas.

    ``axis_labels`` (x, y) and the colorbar's ``label`` default to the selection's; ``mark_limits``
    False draws a plain colorbar (as :func:`attnformat.viewer.groups.draw_one_map` does) instead of
    :func:`~attnformat.viewer.colors.labelled_colorbar`; ``steps`` (query, key) defaults to what
    ``layout`` fits.
    """
    figure = new_figure(layout.figsize, layout=None)
    xlabel, ylabel = axis_names(chosen) if axis_labels is None else axis_labels
    rows, cols = np.shape(chosen.values)[-2:]
    steps = layout.steps(rows, cols) if steps is None else steps
    canvas, mappable = compact_panels(figure, layout, [map_panel(chosen, title=title)],
                                      [(chosen.values, chosen.query_labels, chosen.key_labels, xlabel, ylabel)], count=1,
                                      steps=lambda values: steps, cmap=cmap, norm=norm, origin=origin,
                                      missing_text=NOT_CAPTURED, rects=[layout.panel_rect()])
    if colorbar:
        left, bottom, width, height = layout.panel_rect()
        bar = min(max(layout.panel[1] / 20, 0.12), 0.25)
        figure_width = layout.figsize[0]
        colorbar_axes = figure.add_axes((left + (layout.panel[0] + 0.2) / figure_width, bottom, bar / figure_width, height))
        label = colorbar_label(chosen) if label is None else label
        if mark_limits:
            labelled_colorbar(mappable, ax=canvas, label=label, values=chosen.values, cax=colorbar_axes)
        else:
            figure.colorbar(mappable, cax=colorbar_axes, label=label)
    return canvas


register(
    heatmap_title="""
        title : str, optional
            Axes title, used as given. The default names the site, the selection (layer, head,
            pooling of heads...) and the variable, and says when the map was block-pooled or not
            captured.
    """,
    heatmap_compact="""
        compact : bool, default False
            With ``ax`` None, draw the map on one canvas Axes (image, frame, tick marks and labels
            as plain artists of it) instead of an Axes with Matplotlib ticks: the same layout,
            labels, title and colorbar in about half the time, for files (the report draws its
            heatmaps this way). Returns that canvas. A map with missing cells (which get a
            legend) is drawn the usual way.
    """,
    heatmap_figsize="""
        figsize : (float, float), optional
            Size in inches of the new figure when ``ax`` is None, used as given. By default the
            figure sizes itself to the map's labels (about 0.13 inch per token, room for the longest
            label); labels that do not fit are thinned to every k-th, and the axis label says so.
    """,
)


@documented
def heatmap(source, *, site=None, variable: str = "weights", layer=None, head=None, sample=None, step=None,
            time=None, node=None, cmap=None, vmin=None, vmax=None, log: bool = False, center=None,
            origin: str = "upper", max_size: int = DISPLAY_SIZE, pool: str = "mean", colorbar: bool = True,
            figsize=None, title: str | None = None, ax=None, compact: bool = False):
    """Heatmap of one attention map (query rows, key columns).

    Cells that are NaN in the file (not captured, or pairs the model never scores, such as those
    outside a temporal window) are drawn in the missing colour and named in a legend patch, so they
    are never read as zero.

    Parameters
    ----------
    $source
    $site
    $variable
    $selectors
    $color
    $origin
    $pooling
    $colorbar
    $heatmap_figsize
    $heatmap_title
    $ax
    $heatmap_compact

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
    >>> ax.figure.axes[1].get_ylabel()
    'weights (softmax)'
    """
    chosen = select(source, variable, site=site, layer=layer, head=head, sample=sample, step=step, time=time, node=node)
    chosen = pool_for_display(chosen, max_size, pool)
    cmap, norm = color_scale(chosen.values, variable=variable, cmap=cmap, vmin=vmin, vmax=vmax, log=log, center=center)
    default_title = title is None
    title = chosen.title() if default_title else title
    legend = missing_note(chosen, chosen.values) if has_missing_cells(chosen.values) else ""
    steps = None
    colorbar_axes = layout = None
    if ax is None:
        layout = layout_maps([map_panel(chosen, title=title)], ncols=1, figsize=figsize, colorbar=colorbar,
                             legend=legend)
        if compact and not legend:
            return _compact_heatmap(chosen, layout, title=title, cmap=cmap, norm=norm, origin=origin, colorbar=colorbar)
        ax, colorbar_axes = _placed_axes(layout, colorbar)
        steps = layout.steps(*np.shape(chosen.values)[-2:])
        width = layout.panel[0]
    else:
        width = ax.get_position().width * ax.figure.get_size_inches()[0]
    xlabel, ylabel = axis_names(chosen)
    image = draw_map(ax, chosen.values, cmap=cmap, norm=norm, query_labels=chosen.query_labels,
                     key_labels=chosen.key_labels, origin=origin, xlabel=xlabel, ylabel=ylabel, title=title,
                     steps=steps)
    if colorbar:
        labelled_colorbar(image, ax=ax, label=colorbar_label(chosen), values=chosen.values,
                          **({"cax": colorbar_axes} if colorbar_axes is not None else {}))
    if legend:
        add_missing_legend(ax, chosen, chosen.values)
    fit_title(ax, width)
    return ax


@documented
def temporal_matrix(source, *, site=None, node=0, layer=None, head=None, sample=None, variable: str = "weights",
                    cmap=None, vmin=None, vmax=None, log: bool = False, center=None, origin: str = "upper",
                    colorbar: bool = True, figsize=None, title: str | None = None, ax=None):
    """Time x time attention of one node, densified from temporal edges (seed 000's temporal heatmap).

    Picks the site whose edges join time steps (``edge_node_dim="time"``) when ``site`` is None.
    Pairs that are not edges (outside the model's temporal window) are absent, not zero: they are
    drawn in the missing colour and the legend says why (the selection's ``missing_note``).

    Parameters
    ----------
    $source
    site : str, optional
        Site path; by default the first site whose edges join time steps.
    node : int or str, default 0
        The node (a label or a position) whose attention over time is drawn.
    $selectors(layer, head, sample)
    $variable
    $color
    $origin
    $colorbar
    $heatmap_figsize
    $heatmap_title
    $ax

    Returns
    -------
    matplotlib.axes.Axes

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
    return heatmap(source, site=site, node=node, layer=layer, head=head, sample=sample, variable=variable, cmap=cmap,
                   vmin=vmin, vmax=vmax, log=log, center=center, origin=origin, colorbar=colorbar, figsize=figsize,
                   title=title, ax=ax)

