"""Figures of several maps on one shared, labelled colour scale: all heads of a layer, all layers,
all training steps, encoder to decoder.

Every function here returns the Figure, takes ``figsize`` and ``title`` (used as given), and sizes
the figure to its labels otherwise (:func:`attnformat.viewer.output.layout_maps`): at most
:data:`~attnformat.viewer.output.MAX_FIGSIZE`, with every k-th label shown (and the axis label
saying so) when the labels do not fit. One colorbar serves every panel, since the panels share one
scale; a panel whose map was never captured says so instead of showing a grey square.
"""

from __future__ import annotations

import numpy as np

from attnformat.errors import SelectionError
from attnformat.viewer.colors import color_scale, labelled_colorbar
from attnformat.viewer.docs import documented, register
from attnformat.viewer.groups import group_kind, group_selection
from attnformat.viewer.heatmaps import (
    axis_names,
    colorbar_label,
    draw_map,
    add_missing_legend,
    fit_title,
    has_missing_cells,
    missing_note,
)
from attnformat.viewer.output import (
    SUPTITLE_FONTSIZE,
    MapPanel,
    compact_panels,
    layout_maps,
    longest_label,
    new_figure,
    placed_grid,
    text_width,
)
from attnformat.viewer.selection import DISPLAY_SIZE, open_source, pool_for_display, select, sites_of

register(
    grid_title="""
        title : str, optional
            Figure title, used as given (``""`` for none). The default names the site, the
            selection (what was fixed or pooled), the variable and what the panels go over.
    """,
    by_group="""
        by_group : bool, default False
            Draw each panel as a query group x key group map (frame x frame, modality x modality)
            aggregated by ``aggregate``, instead of token x token.
    """,
    compact="""
        compact : bool, default False
            Draw every panel on one canvas Axes (maps, frames, tick marks and labels as plain
            artists of it) instead of one Axes per panel: the same layout, labels, titles and
            colorbar, drawn in about a third of the time, for files (the report draws its grids
            this way). The figure's Axes are then the canvas and the colorbar's.
    """,
)


def _draw_panels(panels, maps, *, axes, steps, cmap, norm, origin):
    """Draw prepared maps on their Axes; returns the last image (they share one norm)."""
    image = None
    for ax, panel, (values, query_labels, key_labels, xlabel, ylabel) in zip(axes, panels, maps):
        image = draw_map(ax, values, cmap=cmap, norm=norm, query_labels=query_labels if panel.query_labels else (),
                         key_labels=key_labels if panel.key_labels else (), origin=origin,
                         xlabel=xlabel if panel.xlabel else "", ylabel=ylabel if panel.ylabel else "",
                         title=panel.title, steps=steps(values))
        # Panels that leave their labels to a neighbour show no ticks at all: unlabelled marks at
        # a default locator's positions (0, 20, 40...) say nothing about tokens, and every Tick
        # costs Matplotlib about a millisecond to build (a third of a 12-head grid's ticks were these).
        if not panel.query_labels:
            ax.set_yticks([])
        if not panel.key_labels:
            ax.set_xticks([])
    return image


def _draw_grid(layout, panels, maps, *, count, steps, cmap, norm, origin, label, values, suptitle, chosen_for_missing,
               missing, compact):
    """The grid figure: its panels (on one canvas Axes when ``compact``, see
    :func:`~attnformat.viewer.output.compact_panels`), the shared colorbar, title and legend."""
    if compact:
        figure = new_figure(layout.figsize, layout=None)
        canvas, mappable = compact_panels(figure, layout, panels, maps, count=count, steps=steps, cmap=cmap, norm=norm,
                                          origin=origin)
        colorbar_axes = figure.add_axes(layout.colorbar_rect(count))
        return _finish(figure, [], mappable, label=label, values=values, suptitle=suptitle,
                       chosen_for_missing=chosen_for_missing, missing=missing, layout=layout,
                       colorbar_axes=colorbar_axes, legend_axes=canvas)
    figure, axes, colorbar_axes = placed_grid(layout, count)
    image = _draw_panels(panels, maps, axes=axes, steps=steps, cmap=cmap, norm=norm, origin=origin)
    return _finish(figure, axes, image, label=label, values=values, suptitle=suptitle,
                   chosen_for_missing=chosen_for_missing, missing=missing, layout=layout, colorbar_axes=colorbar_axes)


def _finish(figure, axes, image, *, label, values, suptitle, chosen_for_missing, missing, layout, colorbar_axes,
            legend_axes=None):
    """Shared colorbar, figure title and, when cells are missing, the legend saying what they mean.

    Everything goes where :func:`attnformat.viewer.output.layout_maps` reserved room for it (no
    layout engine runs): the colorbar right of the panels, the title in the top band, the legend
    in the bottom band.
    """
    labelled_colorbar(image, ax=axes or [legend_axes], label=label, values=values, cax=colorbar_axes)
    width, height = layout.figsize
    for ax in axes:
        # A user figsize can leave a panel narrower than its title or axis labels: shrink their
        # font rather than let them run into the neighbouring panel's.
        fit_title(ax, layout.panel[0] + 0.05)
        for label, length in ((ax.xaxis.label, layout.panel[0]), (ax.yaxis.label, layout.panel[1])):
            needed = text_width(label.get_text(), label.get_fontsize())
            if needed > length > 0:
                label.set_fontsize(max(4.0, label.get_fontsize() * length / needed))
    if suptitle:
        lines = str(suptitle).split("\n")
        needed = longest_label(lines, SUPTITLE_FONTSIZE)
        # A title wider than the figure (a long one in a small user figsize) is set smaller so it
        # stays whole on the canvas; its text is never cut or rewritten.
        size = SUPTITLE_FONTSIZE if needed <= width - 0.1 else max(1.0, SUPTITLE_FONTSIZE * (width - 0.1) / needed)
        figure.suptitle(suptitle, fontsize=size, y=1 - 0.05 / height, va="top")
    if missing:
        add_missing_legend(legend_axes or axes[0], chosen_for_missing, chosen_for_missing.values, figure_legend=True)
    return figure


def _map_grid(chosen, dim: str, *, panel_title, variable, ncols, origin, cmap, vmin, vmax, log, center, figsize, title,
              compact=False, xlabel=None, ylabel=None):
    names = chosen.kept[dim]
    count = len(names)
    cmap, norm = color_scale(chosen.values, variable=variable, cmap=cmap, vmin=vmin, vmax=vmax, log=log, center=center)
    columns = max(1, min(int(ncols), count))
    map_rows, map_cols = np.shape(chosen.values)[-2:]
    default_x, default_y = axis_names(chosen)
    xlabel, ylabel = xlabel or default_x, ylabel or default_y
    panels = []
    for index, name in enumerate(names):
        # Every panel shares the tokens: label the outer edges only (clearer, and much faster to draw).
        left, bottom = index % columns == 0, index >= count - columns
        panels.append(MapPanel(map_rows, map_cols, tuple(chosen.query_labels) if left else (),
                               tuple(chosen.key_labels) if bottom else (), ylabel=left, xlabel=bottom,
                               title=panel_title(name)))
    suptitle = chosen.title(skip=(dim,)) + f" | every {dim}" if title is None else title
    missing = has_missing_cells(chosen.values)
    legend = missing_note(chosen, chosen.values) if missing else ""
    layout = layout_maps(panels, ncols=columns, figsize=figsize, suptitle=suptitle, legend=legend)
    maps = [(values, chosen.query_labels, chosen.key_labels, xlabel, ylabel) for values in chosen.values]
    return _draw_grid(layout, panels, maps, count=count, steps=lambda values: layout.steps(map_rows, map_cols), cmap=cmap,
                      norm=norm, origin=origin, label=colorbar_label(chosen), values=chosen.values, suptitle=suptitle,
                      chosen_for_missing=chosen, missing=missing, compact=compact)


@documented
def head_grid(source, *, site=None, variable="weights", layer=None, sample=None, step=None, time=None, node=None,
              by_group: bool = False, aggregate=None, ncols: int = 4, origin: str = "upper", cmap=None, vmin=None,
              vmax=None, log: bool = False, center=None, max_size: int = DISPLAY_SIZE, pool: str = "mean",
              figsize=None, title: str | None = None, compact: bool = False):
    """Every head of one layer side by side, on one colour scale with one colorbar.

    Logits and biases get the diverging scale of :func:`attnformat.viewer.colors.color_scale`
    (seed 004: ``RdBu_r``, symmetric about 0, one global colorbar labelled "logits ..."). With
    ``by_group=True`` each panel is a group x group map (seed 004's frame x frame logits, best
    drawn with ``origin="lower"``).

    Parameters
    ----------
    $source
    $site
    $variable
    $selectors(layer, sample, step, time, node)
    $by_group
    $aggregate
    $ncols
    $origin
    $color
    $pooling
    $figsize
    $grid_title
    $compact

    Returns
    -------
    matplotlib.figure.Figure
        One Axes per head (titled ``head 0``...), then the shared colorbar's.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import head_grid
    >>> figure = head_grid(attnformat.example_path("dense"), layer=1)
    >>> [ax.get_title() for ax in figure.axes[:3]], figure.axes[3].get_ylabel()
    (['head 0', 'head 1', 'head 2'], 'weights (softmax)')
    """
    selectors = dict(layer=layer, sample=sample, step=step, time=time, node=node)
    if by_group:
        chosen = group_selection(source, site=site, variable=variable, aggregate=aggregate, keep=("head",), **selectors)
        kind = group_kind(chosen.attrs)
        labels = {"xlabel": f"key {kind}", "ylabel": f"query {kind}"}
    else:
        chosen = pool_for_display(select(source, variable, site=site, keep=("head",), **selectors), max_size, pool)
        labels = {}
    return _map_grid(chosen, "head", panel_title=lambda h: f"head {h}", variable=variable, ncols=ncols, origin=origin,
                     cmap=cmap, vmin=vmin, vmax=vmax, log=log, center=center, figsize=figsize, title=title, compact=compact,
                     **labels)


@documented
def layer_comparison(source, *, site=None, variable="weights", head=None, sample=None, step=None, time=None, node=None,
                     ncols: int = 4, origin: str = "upper", cmap=None, vmin=None, vmax=None, log: bool = False,
                     center=None, max_size: int = DISPLAY_SIZE, pool: str = "mean", figsize=None,
                     title: str | None = None, compact: bool = False):
    """The same head (or the mean over heads) in every layer, on one colour scale (seed 001, seed 003).

    Parameters
    ----------
    $source
    $site
    $variable
    $selectors(head, sample, step, time, node)
    $ncols
    $origin
    $color
    $pooling
    $figsize
    $grid_title
    $compact

    Returns
    -------
    matplotlib.figure.Figure
        One Axes per layer (titled ``layer 0``...), then the shared colorbar's.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import layer_comparison
    >>> figure = layer_comparison(attnformat.example_path("encoder-decoder"), site="decoder/cross")
    >>> [ax.get_title() for ax in figure.axes[:2]]
    ['layer 0', 'layer 1']
    """
    chosen = pool_for_display(select(source, variable, site=site, keep=("layer",), head=head, sample=sample, step=step,
                                     time=time, node=node), max_size, pool)
    return _map_grid(chosen, "layer", panel_title=lambda l: f"layer {l}", variable=variable, ncols=ncols, origin=origin,
                     cmap=cmap, vmin=vmin, vmax=vmax, log=log, center=center, figsize=figsize, title=title,
                     compact=compact)


@documented
def step_comparison(source, *, site=None, variable="weights", layer=None, head=None, sample=None, time=None, node=None,
                    ncols: int = 4, origin: str = "upper", cmap=None, vmin=None, vmax=None, log: bool = False,
                    center=None, max_size: int = DISPLAY_SIZE, pool: str = "mean", figsize=None,
                    title: str | None = None, compact: bool = False):
    """The same layer and head (or head mean) at every stored training step, on one colour scale
    (seed 002's snapshots every N steps, side by side).

    A step whose map was never captured (NaN in the file, e.g. a run that stopped and left the file
    ``"incomplete"``) keeps its panel and title and reads "not captured" instead of showing a
    colour; the colour scale comes from the captured steps.

    Parameters
    ----------
    $source
    $site
    $variable
    $selectors(layer, head, sample, time, node)
    $ncols
    $origin
    $color
    $pooling
    $figsize
    $grid_title
    $compact

    Returns
    -------
    matplotlib.figure.Figure
        One Axes per step (titled ``step 100``...), then the shared colorbar's.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import step_comparison
    >>> figure = step_comparison(attnformat.example_path("steps"), layer=1, head=0)
    >>> [ax.get_title() for ax in figure.axes[:3]]
    ['step 100', 'step 200', 'step 300']
    """
    chosen = pool_for_display(select(source, variable, site=site, keep=("step",), layer=layer, head=head, sample=sample,
                                     time=time, node=node), max_size, pool)
    return _map_grid(chosen, "step", panel_title=lambda s: f"step {s}", variable=variable, ncols=ncols, origin=origin,
                     cmap=cmap, vmin=vmin, vmax=vmax, log=log, center=center, figsize=figsize, title=title,
                     compact=compact)


def flow_sites(source) -> tuple[str, str, str]:
    """``(encoder self, decoder self, cross)`` site paths of an encoder-decoder file.

    The cross site is the one with ``attention_type="cross"``; its ``key_site`` names the encoder;
    the decoder's self-attention is the self site that shares the cross site's parent group.

    Parameters
    ----------
    source : str, os.PathLike or xarray.DataTree
        The file (path or URL) or an opened tree.

    Examples
    --------
    >>> import attnformat
    >>> flow_sites(attnformat.example_path("encoder-decoder"))
    ('encoder/self', 'decoder/self', 'decoder/cross')
    """
    sites = sites_of(source)
    names = [s.path.strip("/") for s in sites]
    cross = [s for s in sites if s.attrs.get("attention_type") == "cross"]
    if not cross:
        raise SelectionError(f"no cross-attention site in {names and sites[0].root.encoding.get('source', '')}; "
                             f"sites: {', '.join(names)}")
    cross_site = cross[0]
    cross_name = cross_site.path.strip("/")
    parent = cross_name.rpartition("/")[0]
    encoder = str(cross_site.attrs.get("key_site", "")).strip("/")
    decoders = [n for s, n in zip(sites, names)
                if s.attrs.get("attention_type") == "self" and n != encoder and n.rpartition("/")[0] == parent]
    if encoder not in names or not decoders:
        raise SelectionError(f"cannot find the encoder and decoder self-attention of {cross_name}; sites: {', '.join(names)}")
    return encoder, decoders[0], cross_name


def flow_data(source, *, layer=None, head=None, sample=None, step=None, variable="weights", max_size: int = DISPLAY_SIZE,
              pool: str = "mean"):
    """The three selections :func:`attention_flow` draws: encoder self, decoder self, cross.

    Each is selected with the same selectors and pooled for display on its own.

    Examples
    --------
    >>> import attnformat
    >>> [c.values.shape for c in flow_data(attnformat.example_path("encoder-decoder"), layer=0)]
    [(7, 7), (5, 5), (5, 7)]
    """
    tree = open_source(source)
    return [pool_for_display(select(tree, variable, site=name, layer=layer, head=head, sample=sample, step=step),
                             max_size, pool)
            for name in flow_sites(tree)]


def _flow_panel_title(chosen) -> str:
    return chosen.site + (f" | {chosen.pooled}x{chosen.pooled} block {chosen.pool}" if chosen.pooled > 1 else "")


@documented
def attention_flow(source, *, layer=None, head=None, sample=None, step=None, variable="weights", ncols: int = 3,
                   origin: str = "upper", cmap=None, vmin=None, vmax=None, log: bool = False, center=None,
                   max_size: int = DISPLAY_SIZE, pool: str = "mean", figsize=None, title: str | None = None,
                   compact: bool = False):
    """Encoder self-, decoder self- and cross-attention of one layer side by side (seed 001's flow).

    The three maps share one colour scale and one colorbar, so their colours compare. The cross
    panel's rows are decoder tokens and its columns encoder tokens; when it sits right of the decoder
    panel, whose rows are the same tokens, it leaves the row labels to it. Sites of different lengths
    (29 encoder tokens, 20 decoder tokens) each keep their own shape.

    Parameters
    ----------
    $source
    $selectors(layer, head, sample, step)
    $variable
    ncols : int, default 3
        Panels per row (3: all in one row, encoder first).
    $origin
    $color
    $pooling
    $figsize
    $grid_title
    $compact

    Returns
    -------
    matplotlib.figure.Figure
        Three map Axes (encoder self, decoder self, cross), then the shared colorbar's.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import attention_flow
    >>> figure = attention_flow(attnformat.example_path("encoder-decoder"), layer=0)
    >>> [ax.get_title() for ax in figure.axes[:3]]
    ['encoder/self', 'decoder/self', 'decoder/cross']
    >>> figure.axes[2].get_xlabel(), figure.axes[2].get_ylabel()
    ('encoder key', '')
    """
    chosen = flow_data(source, layer=layer, head=head, sample=sample, step=step, variable=variable, max_size=max_size,
                       pool=pool)
    values = np.concatenate([np.ravel(c.values) for c in chosen])
    cmap, norm = color_scale(values, variable=variable, cmap=cmap, vmin=vmin, vmax=vmax, log=log, center=center)
    columns = max(1, min(int(ncols), 3))
    roles = (("encoder", "encoder"), ("decoder", "decoder"), ("decoder", "encoder"))  # (query side, key side)
    panels, maps = [], []
    for index, (one, (query_side, key_side)) in enumerate(zip(chosen, roles)):
        shares_rows = index % columns > 0 and list(chosen[index - 1].query_labels) == list(one.query_labels)
        panels.append(MapPanel(*np.shape(one.values)[-2:], () if shares_rows else tuple(one.query_labels),
                               tuple(one.key_labels), ylabel=not shares_rows, title=_flow_panel_title(one)))
        maps.append((one.values, one.query_labels, one.key_labels, f"{key_side} key", f"{query_side} query"))
    first = chosen[0]
    pooled = "block-pooled for display (see panel titles)" if any(c.pooled > 1 for c in chosen) else ""
    suptitle = (" | ".join(p for p in (f"attention flow: {' -> '.join(c.site for c in chosen)}", first.describe(),
                                        first.normalization, pooled) if p)
                if title is None else title)
    missing = any(has_missing_cells(c.values) for c in chosen)
    with_missing = next((c for c in chosen if has_missing_cells(c.values)), first)
    legend = missing_note(with_missing, with_missing.values) if missing else ""
    layout = layout_maps(panels, ncols=columns, figsize=figsize, suptitle=suptitle, legend=legend)
    return _draw_grid(layout, panels, maps, count=3, steps=lambda v: layout.steps(*np.shape(v)[-2:]), cmap=cmap,
                      norm=norm, origin=origin, label=colorbar_label(first), values=values, suptitle=suptitle,
                      chosen_for_missing=with_missing, missing=missing, compact=compact)
