"""Figures of several maps with one shared colour scale: all heads of a layer, all layers, encoder to decoder."""

from __future__ import annotations


from attnformat.errors import SelectionError
from attnformat.viewer.colors import color_scale
from attnformat.viewer.groups import group_kind, group_selection
from attnformat.viewer.heatmaps import axis_names, draw_map, heatmap
from attnformat.viewer.output import grid
from attnformat.viewer.selection import DISPLAY_SIZE, open_source, pool_for_display, select, sites_of


def _map_grid(chosen, dim: str, *, panel_title, variable, ncols, origin, cmap, vmin, vmax, log, xlabel=None, ylabel=None):
    names = chosen.kept[dim]
    cmap, norm = color_scale(chosen.values, variable=variable, cmap=cmap, vmin=vmin, vmax=vmax, log=log)
    figure, axes = grid(len(names), ncols=ncols)
    default_x, default_y = axis_names(chosen)
    image = None
    columns = min(ncols, len(names))
    for index, (ax, name, values) in enumerate(zip(axes, names, chosen.values)):
        # Every panel shares the tokens: label the outer edges only (clearer, and much faster to draw).
        left, bottom = index % columns == 0, index >= len(names) - columns
        image = draw_map(ax, values, cmap=cmap, norm=norm, query_labels=chosen.query_labels if left else (),
                         key_labels=chosen.key_labels if bottom else (), origin=origin,
                         xlabel=(xlabel or default_x) if bottom else "", ylabel=(ylabel or default_y) if left else "",
                         title=panel_title(name))
        if not left:
            ax.tick_params(labelleft=False)
        if not bottom:
            ax.tick_params(labelbottom=False)
    figure.colorbar(image, ax=axes, label=chosen.normalization, shrink=0.8)
    figure.suptitle(chosen.title(skip=(dim,)) + f" | every {dim}", fontsize=11)
    return figure


def head_grid(source, *, site=None, variable="weights", layer=None, sample=None, step=None, time=None, node=None,
              by_group: bool = False, aggregate=None, ncols: int = 4, origin: str = "upper", cmap=None, vmin=None,
              vmax=None, log: bool = False, max_size: int = DISPLAY_SIZE):
    """Every head of one layer side by side, on one colour scale (symmetric ``RdBu_r`` for logits).

    With ``by_group=True`` each panel is a group x group map (seed 004's frame x frame logits, best
    drawn with ``origin="lower"``).

    Returns
    -------
    matplotlib.figure.Figure
        One Axes per head, then the shared colorbar's.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import head_grid
    >>> figure = head_grid(attnformat.example_path("dense"), layer=1)
    >>> [ax.get_title() for ax in figure.axes[:3]]
    ['head 0', 'head 1', 'head 2']
    """
    selectors = dict(layer=layer, sample=sample, step=step, time=time, node=node)
    if by_group:
        chosen = group_selection(source, site=site, variable=variable, aggregate=aggregate, keep=("head",), **selectors)
        kind = group_kind(chosen.attrs)
        labels = {"xlabel": f"key {kind}", "ylabel": f"query {kind}"}
    else:
        chosen = pool_for_display(select(source, variable, site=site, keep=("head",), **selectors), max_size)
        labels = {}
    return _map_grid(chosen, "head", panel_title=lambda h: f"head {h}", variable=variable, ncols=ncols, origin=origin,
                     cmap=cmap, vmin=vmin, vmax=vmax, log=log, **labels)


def layer_comparison(source, *, site=None, variable="weights", head=None, sample=None, step=None, time=None, node=None,
                     ncols: int = 4, origin: str = "upper", cmap=None, vmin=None, vmax=None, log: bool = False,
                     max_size: int = DISPLAY_SIZE):
    """The same head (or the mean over heads) in every layer, on one colour scale (seed 001, seed 003).

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import layer_comparison
    >>> figure = layer_comparison(attnformat.example_path("encoder-decoder"), site="decoder/cross")
    >>> [ax.get_title() for ax in figure.axes[:2]]
    ['layer 0', 'layer 1']
    """
    chosen = pool_for_display(select(source, variable, site=site, keep=("layer",), head=head, sample=sample, step=step,
                                     time=time, node=node), max_size)
    return _map_grid(chosen, "layer", panel_title=lambda l: f"layer {l}", variable=variable, ncols=ncols, origin=origin,
                     cmap=cmap, vmin=vmin, vmax=vmax, log=log)


def step_comparison(source, *, site=None, variable="weights", layer=None, head=None, sample=None, time=None, node=None,
                    ncols: int = 4, origin: str = "upper", cmap=None, vmin=None, vmax=None, log: bool = False,
                    max_size: int = DISPLAY_SIZE):
    """The same layer and head (or head mean) at every stored training step, on one colour scale
    (seed 002's snapshots every N steps, side by side).

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import step_comparison
    >>> figure = step_comparison(attnformat.example_path("steps"), layer=1, head=0)
    >>> [ax.get_title() for ax in figure.axes[:3]]
    ['step 100', 'step 200', 'step 300']
    """
    chosen = pool_for_display(select(source, variable, site=site, keep=("step",), layer=layer, head=head, sample=sample,
                                     time=time, node=node), max_size)
    return _map_grid(chosen, "step", panel_title=lambda s: f"step {s}", variable=variable, ncols=ncols, origin=origin,
                     cmap=cmap, vmin=vmin, vmax=vmax, log=log)


def flow_sites(source) -> tuple[str, str, str]:
    """``(encoder self, decoder self, cross)`` site paths of an encoder-decoder file.

    The cross site is the one with ``attention_type="cross"``; its ``key_site`` names the encoder;
    the decoder's self-attention is the self site that shares the cross site's parent group.

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


def attention_flow(source, *, layer=None, head=None, sample=None, step=None, variable="weights", cmap=None):
    """Encoder self-, decoder self- and cross-attention of one layer side by side (seed 001's flow).

    Returns
    -------
    matplotlib.figure.Figure
        Three map Axes (encoder self, decoder self, cross), each with its colorbar.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import attention_flow
    >>> figure = attention_flow(attnformat.example_path("encoder-decoder"), layer=0)
    >>> figure.axes[2].get_title().split(" | ")[0]
    'decoder/cross'
    """
    tree = open_source(source)
    encoder, decoder, cross = flow_sites(tree)
    figure, axes = grid(3, ncols=3, panel_size=(5.2, 4.6))
    for ax, name in zip(axes, (encoder, decoder, cross)):
        heatmap(tree, site=name, variable=variable, layer=layer, head=head, sample=sample, step=step, cmap=cmap, ax=ax)
    figure.suptitle("attention flow: encoder self -> decoder self -> cross (decoder queries, encoder keys)")
    return figure
